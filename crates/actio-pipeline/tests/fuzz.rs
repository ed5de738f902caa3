//! Fuzzing on stable Rust, with proptest as the engine: arbitrary bytes and
//! structure-aware mutations of the seed corpus (`fuzz/corpus/`) against the ingress
//! JSON decoder (schema-driven: the fraud pipeline's `schema.toml`), the postcard
//! inter-stage codec, the stage handlers behind them and
//! the config loader. Properties: nothing panics; what decodes re-encodes to itself;
//! a valid transaction goes through rules → velocity → score to a decision; every
//! config error names a file.
//!
//! `cargo test` runs a quick pass (ACTIO_FUZZ_CASES per target; default 256, config
//! 48: a load compiles every rule). For a
//! long run, give each target a time budget:
//!
//!   ACTIO_FUZZ_SECS=600 cargo test --release -p actio-pipeline --test fuzz -- --test-threads 1 --nocapture
//!
//! A failure prints the shrunk input and the round's seed.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::fmt;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use actio_core::bus::{Bytes, Headers, Record, TopicPartition};
use actio_core::schema::{Scalar, Value};
use actio_core::{Codec, Decision, TxState};
use actio_pipeline::Pipeline;
use actio_pipeline::stages::StageHandler;
use actio_runtime::{Context, Handler, HandlerError, Output};
use actio_testkit::repo;
use proptest::collection::{btree_map, vec};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};

/// `h` on `r` as the runtime runs a message on its first attempt, from its input.
fn first_attempt(h: &dyn Handler, r: &Record) -> Result<Vec<Output>, HandlerError> {
    h.handle(r, &Context::first(r))
}

/// Runs `test` on values of `strategy`: one round of ACTIO_FUZZ_CASES cases (default
/// `quick`), or rounds of 2,000 with fresh seeds until ACTIO_FUZZ_SECS have passed.
fn fuzz<S>(target: &str, quick: u32, strategy: S, test: impl Fn(S::Value) -> Result<(), TestCaseError>)
where
    S: Strategy,
    S::Value: fmt::Debug,
{
    let secs: f64 = std::env::var("ACTIO_FUZZ_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(0.0);
    let quick: u32 = std::env::var("ACTIO_FUZZ_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(quick);
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs_f64(secs);
    let (mut total, mut round) = (0u64, 0u64);
    loop {
        let cases = if secs > 0.0 { 2000 } else { quick };
        let mut seed = [0u8; 32];
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
        seed[..8].copy_from_slice(&nanos.to_le_bytes());
        seed[8..16].copy_from_slice(&round.to_le_bytes());
        let config = Config { cases, failure_persistence: None, max_shrink_iters: 4096, ..Config::default() };
        let mut runner = TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &seed));
        if let Err(e) = runner.run(&strategy, &test) {
            panic!("fuzz {target}: {e}\nround {round} seed {seed:?}");
        }
        total += cases as u64;
        round += 1;
        if Instant::now() >= deadline {
            break;
        }
    }
    eprintln!("fuzz {target}: {total} cases in {:.1?}, 0 failures", t0.elapsed());
}

/// Bytes that print as text where they are text.
#[derive(Clone)]
struct Input(Vec<u8>);

impl fmt::Debug for Input {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} ({} bytes)", String::from_utf8_lossy(&self.0), self.0.len())
    }
}

// ---- byte-level mutations ------------------------------------------------------------

const TOKENS: &[&str] = &[
    "\"", "{", "}", "[", "]", ",", ":", "null", "true", "-1", "1e999", "-0", "9223372036854775808", "18446744073709551616",
    "\"\\u0000\"", "\"\\ud800\"", "0.0000001", "\"attrs\"", "{\"a\":{\"b\":[]}}", "\\", "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[",
    "\"created_at\":\"9999-12-31T23:59:59Z\"", "\"amount_minor\":-1", "\u{feff}",
];

#[derive(Debug, Clone)]
enum ByteOp {
    Flip(usize, u8),
    Insert(usize, u8),
    Delete(usize, usize),
    Duplicate(usize, usize),
    Token(usize, usize),
    Truncate(usize),
}

fn byte_ops() -> impl Strategy<Value = Vec<ByteOp>> {
    vec(
        prop_oneof![
            (any::<usize>(), 0u8..8).prop_map(|(p, b)| ByteOp::Flip(p, b)),
            (any::<usize>(), any::<u8>()).prop_map(|(p, b)| ByteOp::Insert(p, b)),
            (any::<usize>(), 1usize..16).prop_map(|(p, n)| ByteOp::Delete(p, n)),
            (any::<usize>(), 1usize..64).prop_map(|(p, n)| ByteOp::Duplicate(p, n)),
            (any::<usize>(), 0..TOKENS.len()).prop_map(|(p, t)| ByteOp::Token(p, t)),
            any::<usize>().prop_map(ByteOp::Truncate),
        ],
        1..6,
    )
}

fn apply_bytes(mut b: Vec<u8>, ops: &[ByteOp]) -> Vec<u8> {
    for op in ops {
        let at = |p: usize, len: usize| if len == 0 { 0 } else { p % (len + 1) };
        match *op {
            ByteOp::Flip(p, bit) if !b.is_empty() => {
                let i = p % b.len();
                b[i] ^= 1 << bit;
            }
            ByteOp::Flip(..) => {}
            ByteOp::Insert(p, x) => b.insert(at(p, b.len()), x),
            ByteOp::Delete(p, n) => {
                let i = at(p, b.len());
                let end = (i + n).min(b.len());
                b.drain(i..end);
            }
            ByteOp::Duplicate(p, n) => {
                let i = at(p, b.len());
                let piece: Vec<u8> = b[i..(i + n).min(b.len())].to_vec();
                b.splice(i..i, piece);
            }
            ByteOp::Token(p, t) => {
                let i = at(p, b.len());
                b.splice(i..i, TOKENS[t].bytes());
            }
            ByteOp::Truncate(p) => b.truncate(at(p, b.len())),
        }
    }
    b
}

// ---- structure-aware mutations of a transaction ----------------------------------------

const FIELDS: &[&str] = &[
    "id", "card_id", "account_id", "device_id", "merchant_id", "amount_minor", "currency", "mcc", "country",
    "card_country", "ip_country", "channel", "card_age_days", "created_at", "attrs",
];

fn timestamp() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("1970-01-01T00:00:00Z".to_string()),
        Just("0000-01-01T00:00:00Z".to_string()),
        Just("9999-12-31T23:59:59.999999999Z".to_string()),
        Just("2262-04-11T23:47:16.854775808Z".to_string()),
        Just("1677-09-21T00:12:43.145224191Z".to_string()),
        Just("2026-02-30T12:00:00Z".to_string()),
        Just("2026-11-24 12:00:00Z".to_string()),
        "[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9]{1,12})?(Z|[+-][0-9]{2}:[0-9]{2})",
    ]
}

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::Value;
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        prop_oneof![Just(i64::MIN), Just(i64::MAX), Just(-1), Just(0), Just(9999), Just(10000), Just(u32::MAX as i64 + 1)].prop_map(Value::from),
        any::<f64>().prop_filter_map("finite", |f| serde_json::Number::from_f64(f).map(Value::Number)),
        ".{0,24}".prop_map(Value::String),
        "[A-Za-z]{1,4}".prop_map(Value::String),
        prop_oneof![Just("ecom"), Just("pos"), Just("atm"), Just("moto")].prop_map(Value::from),
        timestamp().prop_map(Value::String),
        (0usize..2100).prop_map(|n| Value::String("x".repeat(n))),
    ];
    leaf.prop_recursive(3, 32, 8, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..8).prop_map(Value::Array),
            btree_map("[a-z_0-9]{1,8}", inner, 0..8).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

#[derive(Debug, Clone)]
enum JsonOp {
    Set(usize, serde_json::Value),
    Remove(usize),
    Unknown(String, serde_json::Value),
    Attr(String, serde_json::Value),
    ManyAttrs(usize),
}

fn json_ops() -> impl Strategy<Value = Vec<JsonOp>> {
    vec(
        prop_oneof![
            3 => (0..FIELDS.len(), json_value()).prop_map(|(f, v)| JsonOp::Set(f, v)),
            1 => (0..FIELDS.len()).prop_map(JsonOp::Remove),
            1 => ("[a-z_]{1,10}", json_value()).prop_map(|(k, v)| JsonOp::Unknown(k, v)),
            2 => ("[a-z_0-9]{1,10}|.{0,140}", json_value()).prop_map(|(k, v)| JsonOp::Attr(k, v)),
            1 => (60usize..70).prop_map(JsonOp::ManyAttrs),
        ],
        1..5,
    )
}

fn apply_json(seed: &[u8], ops: &[JsonOp]) -> Vec<u8> {
    let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(seed) else { return seed.to_vec() };
    let Some(obj) = v.as_object_mut() else { return seed.to_vec() };
    for op in ops {
        match op {
            JsonOp::Set(f, x) => {
                obj.insert(FIELDS[*f].to_string(), x.clone());
            }
            JsonOp::Remove(f) => {
                obj.remove(FIELDS[*f]);
            }
            JsonOp::Unknown(k, x) => {
                obj.insert(k.clone(), x.clone());
            }
            JsonOp::Attr(k, x) => {
                let attrs = obj.entry("attrs").or_insert_with(|| serde_json::json!({}));
                if let Some(a) = attrs.as_object_mut() {
                    a.insert(k.clone(), x.clone());
                }
            }
            JsonOp::ManyAttrs(n) => {
                let attrs: serde_json::Map<String, serde_json::Value> = (0..*n).map(|i| (format!("a{i}"), serde_json::Value::from(i))).collect();
                obj.insert("attrs".into(), serde_json::Value::Object(attrs));
            }
        }
    }
    serde_json::to_vec(&v).unwrap()
}

// ---- the corpus and the pipeline under test ----------------------------------------------

fn ingress_seeds() -> &'static Vec<Vec<u8>> {
    static SEEDS: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    SEEDS.get_or_init(|| {
        let dir = repo().join("fuzz/corpus/ingress");
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
        files.sort();
        let seeds: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).unwrap()).collect();
        assert!(seeds.iter().filter(|s| chain().pipeline.schema.decode_json(s).is_ok()).count() >= 3, "corpus {}: too few valid seeds", dir.display());
        seeds
    })
}

struct Chain {
    pipeline: Pipeline,
    rules: StageHandler,
    velocity: StageHandler,
    score: StageHandler,
}

fn chain() -> &'static Chain {
    static CHAIN: OnceLock<Chain> = OnceLock::new();
    CHAIN.get_or_init(|| {
        let p = Pipeline::load(&repo().join("pipelines/fraud")).unwrap();
        let h = |name: &str| StageHandler::new(&p, p.stage(name).unwrap());
        Chain { rules: h("rules"), velocity: h("velocity"), score: h("score"), pipeline: p }
    })
}

fn record(topic: &str, payload: &[u8]) -> Record {
    Record {
        tp: TopicPartition::new(topic, 0),
        offset: 0,
        key: Some(Bytes::from_static(b"card")),
        payload: Bytes::copy_from_slice(payload),
        headers: Headers::default(),
        timestamp_ms: None,
    }
}

/// Postcard states after rules and velocity (hits and features filled in): the seeds
/// of the inter-stage codec.
fn state_seeds() -> &'static Vec<Vec<u8>> {
    static SEEDS: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    SEEDS.get_or_init(|| {
        let c = chain();
        let mut out = Vec::new();
        for s in ingress_seeds() {
            if let Ok(ruled) = first_attempt(&c.rules, &record("tx.in", s)) {
                out.push(ruled[0].payload.to_vec());
                if let Ok(featured) = first_attempt(&c.velocity, &record("tx.ruled", &ruled[0].payload)) {
                    out.push(featured[0].payload.to_vec());
                }
            }
        }
        assert!(out.len() >= 4);
        out
    })
}

fn ingress_input() -> impl Strategy<Value = Input> {
    let n = ingress_seeds().len();
    prop_oneof![
        1 => vec(any::<u8>(), 0..512).prop_map(Input),
        3 => (0..n, byte_ops()).prop_map(|(i, ops)| Input(apply_bytes(ingress_seeds()[i].clone(), &ops))),
        4 => (0..n, json_ops()).prop_map(|(i, ops)| Input(apply_json(&ingress_seeds()[i], &ops))),
        1 => (0..n, json_ops(), byte_ops()).prop_map(|(i, j, b)| Input(apply_bytes(apply_json(&ingress_seeds()[i], &j), &b))),
    ]
}

fn fail(what: impl fmt::Display) -> TestCaseError {
    TestCaseError::fail(what.to_string())
}

/// The ingress decoder and everything behind it: decodes or says why; what decodes
/// round-trips through JSON and postcard; a valid transaction is decided.
fn check_ingress(input: Input) -> Result<(), TestCaseError> {
    let bytes = &input.0;
    let c = chain();
    let handled = first_attempt(&c.rules, &record("tx.in", bytes));
    let schema = &c.pipeline.schema;
    let tx = match schema.decode_json(bytes) {
        Err(e) => {
            prop_assert!(handled.is_err(), "the rules stage accepted what the decoder rejects: {e}");
            prop_assert!(!e.field.is_empty(), "an error names its field (or `-`): {e}");
            return Ok(());
        }
        Ok(tx) => tx,
    };
    let json = schema.encode_json(&tx);
    let mut again = schema.decode_json(&json).map_err(|e| fail(format!("re-decoding our own JSON: {e}: {}", String::from_utf8_lossy(&json))))?;
    // serde_json without its `float_roundtrip` feature may parse a float an ULP or two off
    // (found here: -2.465908466011026e-254): equal within 4 ε, then compare the rest.
    for (slot, v) in again.values.iter_mut().enumerate() {
        if let (Value::Map(entries), Value::Map(orig)) = (v, &tx.values[slot]) {
            for ((_, a), (_, b)) in entries.iter_mut().zip(orig) {
                if let (Scalar::Float(x), Scalar::Float(y)) = (&*a, b)
                    && (x - y).abs() <= 4.0 * f64::EPSILON * x.abs().max(y.abs())
                {
                    *a = Scalar::Float(*y);
                }
            }
        }
    }
    prop_assert_eq!(&again, &tx);
    let st = TxState::new(tx.clone());
    let bin = Codec::Postcard.encode(&st).map_err(fail)?;
    let back: TxState = Codec::Postcard.decode(&bin).map_err(fail)?;
    prop_assert_eq!(&back, &st);
    let mut filled = st.clone();
    match c.pipeline.derived.fill(&mut filled) {
        Err(e) => prop_assert!(handled.is_err(), "a tx whose derived field fails ({e}) passed the rules stage"),
        Ok(()) => {
            let ruled = handled.map_err(|e| fail(format!("rules stage refused a valid tx: {e}")))?;
            let featured = first_attempt(&c.velocity, &record("tx.ruled", &ruled[0].payload)).map_err(|e| fail(format!("velocity: {e}")))?;
            let decided = first_attempt(&c.score, &record("tx.featured", &featured[0].payload)).map_err(|e| fail(format!("score: {e}")))?;
            let d: Decision = Codec::Json.decode(&decided[0].payload).map_err(|e| fail(format!("decision: {e}")))?;
            prop_assert_eq!(d.tx_id.as_str(), schema.id_of(&tx));
            prop_assert!((0.0..=1.0).contains(&d.score), "score {}", d.score);
        }
    }
    Ok(())
}

#[test]
fn fuzz_ingress_json_decoder_and_the_chain_behind_it() {
    fuzz("ingress", 256, ingress_input(), check_ingress);
}

/// The inter-stage codec: arbitrary and mutated postcard never panics; what decodes
/// re-encodes stably; the velocity and score stages take it or dead-letter it.
#[test]
fn fuzz_postcard_inter_stage_codec_and_internal_stages() {
    let n = state_seeds().len();
    let strategy = prop_oneof![
        1 => vec(any::<u8>(), 0..512).prop_map(Input),
        3 => (0..n, byte_ops()).prop_map(|(i, ops)| Input(apply_bytes(state_seeds()[i].clone(), &ops))),
    ];
    fuzz("postcard", 256, strategy, |input| {
        let c = chain();
        if let Ok(st) = Codec::Postcard.decode::<TxState>(&input.0) {
            let b1 = Codec::Postcard.encode(&st).map_err(fail)?;
            let st2: TxState = Codec::Postcard.decode(&b1).map_err(|e| fail(format!("re-decoding our own postcard: {e}")))?;
            let b2 = Codec::Postcard.encode(&st2).map_err(fail)?;
            prop_assert_eq!(b1, b2);
        }
        let _ = first_attempt(&c.velocity, &record("tx.ruled", &input.0));
        let _ = first_attempt(&c.score, &record("tx.featured", &input.0));
        Ok(())
    });
}

// ---- the config loader ---------------------------------------------------------------

const CONFIG_FILES: &[&str] = &["pipeline.toml", "rules.toml", "velocity.toml", "velocity_rules.toml", "model.toml", "schema.toml"];

#[derive(Debug, Clone)]
enum TomlOp {
    DeleteLine(usize),
    DuplicateLine(usize),
    SwapLines(usize, usize),
    SetValue(usize, String),
    RenameKey(usize, String),
    AppendFragment,
    Bytes(Vec<ByteOp>),
}

fn toml_scalar() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|i| i.to_string()),
        prop_oneof![Just("0"), Just("-1"), Just("1"), Just("2147483648"), Just("1e400"), Just("nan"), Just("inf"), Just("0.0")].prop_map(String::from),
        any::<f64>().prop_map(|f| format!("{f:?}")),
        any::<bool>().prop_map(|b| b.to_string()),
        "\"[a-z._0-9 ]{0,12}\"",
        "\"(tx|features)\\.[a-z_]{1,14} (>|<|==|in) [0-9.]{1,6}\"",
        Just("\"1m\"".to_string()),
        Just("[]".to_string()),
        Just("{}".to_string()),
        Just("\"../../../../etc/passwd\"".to_string()),
        Just("\"\"".to_string()),
    ]
}

fn toml_ops() -> impl Strategy<Value = Vec<TomlOp>> {
    vec(
        prop_oneof![
            2 => any::<usize>().prop_map(TomlOp::DeleteLine),
            1 => any::<usize>().prop_map(TomlOp::DuplicateLine),
            1 => (any::<usize>(), any::<usize>()).prop_map(|(a, b)| TomlOp::SwapLines(a, b)),
            4 => (any::<usize>(), toml_scalar()).prop_map(|(l, v)| TomlOp::SetValue(l, v)),
            1 => (any::<usize>(), "[a-z_]{1,12}").prop_map(|(l, k)| TomlOp::RenameKey(l, k)),
            1 => Just(TomlOp::AppendFragment),
            1 => byte_ops().prop_map(TomlOp::Bytes),
        ],
        1..4,
    )
}

fn apply_toml(text: &str, ops: &[TomlOp], fragment: &str) -> Vec<u8> {
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    let mut tail: Vec<ByteOp> = Vec::new();
    for op in ops {
        let n = lines.len().max(1);
        match op {
            TomlOp::DeleteLine(l) if !lines.is_empty() => {
                lines.remove(l % n);
            }
            TomlOp::DuplicateLine(l) if !lines.is_empty() => {
                let x = lines[l % n].clone();
                lines.insert(l % n, x);
            }
            TomlOp::SwapLines(a, b) if !lines.is_empty() => lines.swap(a % n, b % n),
            TomlOp::SetValue(l, v) => {
                // The value of a `key = value` line at or after l.
                if let Some(i) = (0..lines.len()).map(|k| (l + k) % n).find(|&i| lines[i].contains(" = ")) {
                    let key = lines[i].split(" = ").next().unwrap_or_default().to_string();
                    lines[i] = format!("{key} = {v}");
                }
            }
            TomlOp::RenameKey(l, k) => {
                if let Some(i) = (0..lines.len()).map(|j| (l + j) % n).find(|&i| lines[i].contains(" = ")) {
                    let value = lines[i].split_once(" = ").map(|x| x.1.to_string()).unwrap_or_default();
                    lines[i] = format!("{k} = {value}");
                }
            }
            TomlOp::AppendFragment => lines.extend(fragment.lines().map(String::from)),
            TomlOp::Bytes(b) => tail.extend(b.iter().cloned()),
            _ => {}
        }
    }
    apply_bytes(lines.join("\n").into_bytes(), &tail)
}

#[test]
fn fuzz_config_loader() {
    let fraud = repo().join("pipelines/fraud");
    let originals: Vec<String> = CONFIG_FILES.iter().map(|f| std::fs::read_to_string(fraud.join(f)).unwrap()).collect();
    let fragment = std::fs::read_to_string(repo().join("fuzz/corpus/config/tricky-rules.toml")).unwrap();
    let dir = actio_testkit::copy_of_fraud();
    // The fragment on its own must load: the seeds compile.
    std::fs::write(dir.path().join("rules.toml"), format!("{}\n{fragment}", originals[1])).unwrap();
    Pipeline::load(dir.path()).unwrap_or_else(|e| panic!("seed fragment: {e}"));
    std::fs::write(dir.path().join("rules.toml"), &originals[1]).unwrap();

    let strategy = (0..CONFIG_FILES.len(), toml_ops());
    fuzz("config", 48, strategy, |(f, ops)| {
        let path = dir.path().join(CONFIG_FILES[f]);
        std::fs::write(&path, apply_toml(&originals[f], &ops, &fragment)).unwrap();
        let loaded = Pipeline::load(dir.path());
        std::fs::write(&path, &originals[f]).unwrap();
        match loaded {
            Err(errors) => {
                prop_assert!(!errors.0.is_empty());
                for e in &errors.0 {
                    let text = e.to_string();
                    prop_assert!(!e.file.as_os_str().is_empty() && text.contains(&e.file.display().to_string()), "error names no file: {text}");
                }
            }
            Ok(p) => {
                // A config that loads runs: the valid seeds go through its stages
                // (rules that fail at evaluation count an error; nothing panics).
                let handlers: Vec<StageHandler> = p.stages.iter().map(|s| StageHandler::new(&p, s)).collect();
                for seed in ingress_seeds() {
                    let mut payload = Bytes::copy_from_slice(seed);
                    for (h, s) in handlers.iter().zip(&p.stages) {
                        match first_attempt(h, &record(&s.input, &payload)) {
                            Ok(out) if !out.is_empty() => payload = out[0].payload.clone(),
                            _ => break,
                        }
                    }
                }
            }
        }
        Ok(())
    });
}
