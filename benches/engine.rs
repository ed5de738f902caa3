//! The per-transaction engine on the shipped fraud pipeline: rules (36 CEL rules
//! compiled to a typed tree), velocity windows + 15 velocity rules, the logistic model,
//! all of them together, the wire codecs — and the `cel` interpreter with a context
//! built per transaction, the approach our compiled tree replaces (DESIGN.md).
//!
//! Run: `cargo bench -p actio-benches --bench engine`

use std::collections::HashMap;
use std::hint::black_box;
use std::path::Path;

use actio_benches::{fraud, states};
use actio_core::schema::Value;
use actio_core::{Codec, TxState};
use actio_engine::rules::RuleSet;
use actio_pipeline::kinds::{rules::Rules, score::Score, velocity::Velocity};
use mimalloc::MiMalloc;

// As in the `actio` binary: allocation costs are measured as they are in production.
#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};

const N: usize = 4096;

fn engine(c: &mut Criterion) {
    let p = fraud();
    let kind = |i: usize| p.stages[i].logic.as_any();
    let rules = kind(0).downcast_ref::<Rules>().expect("stage 0 of the fraud pipeline is rules").rules.current();
    let velocity = kind(1).downcast_ref::<Velocity>().expect("stage 1 of the fraud pipeline is velocity");
    let (vspec, vrules) = (velocity.spec.clone(), velocity.rules.as_ref().map(|r| r.current()));
    let model = kind(2).downcast_ref::<Score>().expect("stage 2 of the fraud pipeline is score").model.current();
    let input = states(&p, N);
    let time = p.schema.time_slot();
    let time_of = |st: &TxState| p.schema.time_of(&st.tx);

    let mut g = c.benchmark_group("engine");
    g.throughput(Throughput::Elements(1));

    let mut i = 0;
    g.bench_function("rules_36_per_tx", |b| {
        b.iter_batched_ref(
            || {
                i = (i + 1) % N;
                input[i].clone()
            },
            |st| rules.eval(black_box(st)),
            BatchSize::SmallInput,
        )
    });

    // Event time advances as at 3,000 tx/s, so windows hold what they would live
    // (replaying the same timestamps would pile every lap into the windows).
    let clock = std::cell::Cell::new(time_of(&input[N - 1]));
    let next_state = |i: usize| {
        let mut st = input[i].clone();
        clock.set(clock.get() + 333_333);
        st.tx.values[time] = Value::Int(clock.get());
        st
    };
    let vstate = vspec.new_state();
    let mut i = 0;
    g.bench_function("velocity_update_11_features_per_tx", |b| {
        b.iter_batched_ref(
            || {
                i = (i + 1) % N;
                next_state(i)
            },
            |st| vspec.update(&vstate, black_box(st)),
            BatchSize::SmallInput,
        )
    });

    // Velocity rules and the model read what the earlier stages computed.
    let vstate = vspec.new_state();
    let featured: Vec<TxState> = input
        .iter()
        .map(|st| {
            let mut st = st.clone();
            rules.eval(&mut st);
            vspec.update(&vstate, &mut st);
            st
        })
        .collect();
    if let Some(vrules) = &vrules {
        let mut i = 0;
        g.bench_function("velocity_rules_15_per_tx", |b| {
            b.iter_batched_ref(
                || {
                    i = (i + 1) % N;
                    featured[i].clone()
                },
                |st| vrules.eval(black_box(st)),
                BatchSize::SmallInput,
            )
        });
    }
    let mut i = 0;
    g.bench_function("score_per_tx", |b| {
        b.iter(|| {
            i = (i + 1) % N;
            black_box(model.decide(black_box(&featured[i]), "k", "bench"))
        })
    });

    let vstate = vspec.new_state();
    let mut i = 0;
    g.bench_function("rules_velocity_score_per_tx", |b| {
        b.iter_batched_ref(
            || {
                i = (i + 1) % N;
                next_state(i)
            },
            |st| {
                rules.eval(st);
                vspec.update(&vstate, st);
                if let Some(v) = &vrules {
                    v.eval(st);
                }
                black_box(model.decide(st, "k", "bench"))
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();

    let mut g = c.benchmark_group("codec");
    g.throughput(Throughput::Elements(1));
    let json: Vec<Vec<u8>> = input.iter().map(|s| p.schema.encode_json(&s.tx)).collect();
    let wire: Vec<Vec<u8>> = featured.iter().map(|s| Codec::Postcard.encode(s).unwrap_or_default()).collect();
    let mut i = 0;
    // Decoding checks every constraint as it goes; the derived fields (amount, hour)
    // are computed here too, once (rules used to compute them on each read).
    g.bench_function("ingress_json_decode_validate", |b| {
        b.iter(|| {
            i = (i + 1) % N;
            let st = p.schema.decode_json(black_box(&json[i])).map(TxState::new);
            black_box(st.map(|mut st| p.derived.fill(&mut st).is_ok()))
        })
    });
    let mut i = 0;
    g.bench_function("txstate_postcard_encode", |b| {
        b.iter(|| {
            i = (i + 1) % N;
            black_box(Codec::Postcard.encode(black_box(&featured[i])))
        })
    });
    let mut i = 0;
    g.bench_function("txstate_postcard_decode", |b| {
        b.iter(|| {
            i = (i + 1) % N;
            let st: Result<TxState, _> = Codec::Postcard.decode(black_box(&wire[i]));
            black_box(st)
        })
    });
    g.finish();
}

/// One rule, two ways: the `cel` interpreter with a context converted from a map of
/// the transaction's fields per transaction, against our compiled tree.
fn cel_baseline(c: &mut Criterion) {
    const WHEN: &str = "tx.amount > 5000.0 && tx.card_age_days < 7";
    let p = fraud();
    let txs = states(&p, N);
    let slots: Vec<(&str, usize)> = ["amount", "card_age_days", "mcc", "channel", "country", "card_country", "currency", "merchant_id"]
        .iter()
        .map(|n| (*n, p.schema.slot(n).unwrap_or_else(|| panic!("{n}"))))
        .collect();
    let values = p.schema.fields()[p.schema.slot("channel").unwrap_or(0)].values.clone();
    let mut g = c.benchmark_group("one_rule");
    g.throughput(Throughput::Elements(1));

    let program = match cel::Program::compile(WHEN) {
        Ok(p) => p,
        Err(e) => panic!("{e}"),
    };
    let mut i = 0;
    g.bench_function("cel_interpreter_context_per_tx", |b| {
        b.iter(|| {
            i = (i + 1) % N;
            let tx = &txs[i].tx;
            let mut fields: HashMap<String, cel::Value> = HashMap::new();
            for (name, slot) in &slots {
                let v: cel::Value = match &tx.values[*slot] {
                    Value::Float(f) => (*f).into(),
                    Value::Int(x) => (*x).into(),
                    Value::Str(s) => s.clone().into(),
                    Value::Enum(e) => values[*e as usize].clone().into(),
                    _ => cel::Value::Null,
                };
                fields.insert((*name).into(), v);
            }
            let mut ctx = cel::Context::default();
            ctx.add_variable_from_value("tx", fields);
            black_box(program.execute(&ctx).is_ok_and(|v| v == cel::Value::Bool(true)))
        })
    });

    let toml = format!("version = \"bench\"\n[[rule]]\nid = \"r\"\ndescription = \"d\"\nwhen = \"{WHEN}\"\nweight = 1.0\n");
    let set = match RuleSet::from_toml(&toml, Path::new("bench.toml"), &p.schema, &[]) {
        Ok(s) => s,
        Err(e) => panic!("{e}"),
    };
    let st: Vec<TxState> = txs;
    let mut i = 0;
    g.bench_function("compiled_tree", |b| {
        b.iter_batched_ref(
            || {
                i = (i + 1) % N;
                st[i].clone()
            },
            |s| set.eval(black_box(s)),
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group!(benches, engine, cel_baseline);
criterion_main!(benches);
