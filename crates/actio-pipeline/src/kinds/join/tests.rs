//! The `join` kind: two rule branches in parallel, joined per transaction; a
//! timeout emits what arrived, flagged; what waits is held; graph errors name the
//! field.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::time::Duration;

use actio_core::bus::Bytes;
use actio_core::{Codec, Headers, Record, TopicPartition, TxState, headers};
use actio_runtime::{Context, Handler, Output};

use crate::Pipeline;
use crate::kinds::testing::{pipeline_in, topic};
use crate::stages::StageHandler;

const SCHEMA: &str = r#"
[record]
id = "tx_id"
time = "at"

[[field]]
name = "tx_id"
type = "string"

[[field]]
name = "account"
type = "string"

[[field]]
name = "amount"
type = "float"

[[field]]
name = "at"
type = "timestamp"

[decision]
outcomes = ["pass", "alert"]
fields = []
features = []
"#;

const LARGE: &str = "version = \"1\"\n[[rule]]\nid = \"large\"\ndescription = \"large\"\nwhen = \"tx.amount > 1000.0\"\nweight = 0.5\n";
const ROUND: &str = "version = \"1\"\n[[rule]]\nid = \"round\"\ndescription = \"round\"\nwhen = \"tx.amount == 5000.0\"\nweight = 0.2\n";

/// Branches `large` and `round` (rules, both `in` → `results`), then `typology`
/// (join, `results` → `joined`) with `join` lines; `extra` appended to the file.
fn monitored(join: &str, extra: &str) -> (tempfile::TempDir, Result<Pipeline, String>) {
    let topics = [topic("in", "json", "ingress"), topic("results", "postcard", "internal"), topic("joined", "postcard", "internal"), topic("out", "json", "egress"), topic("dlq", "json", "dead_letter")].concat();
    let stage = |name: &str, kind: &str, input: &str, output: &str, own: &str| format!("[[stage]]\nname = \"{name}\"\nkind = \"{kind}\"\ninput = \"{input}\"\noutput = \"{output}\"\ndlq = \"dlq\"\n{own}\n");
    let text = format!(
        "name = \"monitor\"\nschema = \"schema.toml\"\n[key]\nfields = [\"account\"]\n{topics}{}{}{}{extra}",
        stage("large", "rules", "in", "results", "rules = \"large.toml\""),
        stage("round", "rules", "in", "results", "rules = \"round.toml\""),
        stage("typology", "join", "results", "joined", join),
    );
    pipeline_in(SCHEMA, &text, &[("large.toml", LARGE), ("round.toml", ROUND)])
}

const JOIN: &str = "branches = [\"large\", \"round\"]\ntimeout_ms = 40\n[[stage.typology]]\nname = \"structuring\"\nweights = { large = 0.7, round = 0.3 }\n";

fn tx(id: &str, amount: f64) -> Record {
    let json = format!(r#"{{"tx_id":"{id}","account":"acc-1","amount":{amount},"at":"2026-12-01T10:00:00Z"}}"#);
    Record { tp: TopicPartition::new("in", 0), offset: 0, key: Some(Bytes::from_static(b"acc-1")), payload: Bytes::from(json), headers: Headers::default(), timestamp_ms: None }
}

/// What branch `h` (a rules stage) writes for `r`, as the join consumes it: its
/// trail's last hop names the branch, as the runtime writes it.
fn branch(h: &StageHandler, r: &Record, offset: i64) -> Record {
    let out = h.handle(r, &Context::first(r)).unwrap().remove(0);
    let mut trail = Vec::new();
    headers::append_hop(&mut trail, h.name(), 1, 2);
    let mut hdrs = Headers::default();
    hdrs.set(headers::TRAIL, trail);
    Record { tp: TopicPartition::new("results", 0), offset, key: r.key.clone(), payload: out.payload, headers: hdrs, timestamp_ms: None }
}

fn feature(st: &TxState, name: &str) -> f64 {
    st.feature(name).unwrap_or_else(|| panic!("no feature {name}: {:?}", st.features))
}

fn joined(o: &Output) -> TxState {
    Codec::Postcard.decode(&o.payload).unwrap()
}

#[test]
fn the_join_waits_for_every_branch_then_emits_them_merged_releasing_what_it_held() {
    let (_d, p) = monitored(JOIN, "");
    let p = p.unwrap();
    let [large, round, join] = [0, 1, 2].map(|i| StageHandler::new(&p, &p.stages[i]));
    let input = tx("t-1", 5000.0);
    let (a, b) = (branch(&large, &input, 0), branch(&round, &input, 1));
    let first = join.handle(&a, &Context::first(&a)).unwrap();
    assert_eq!(first.len(), 1);
    let hold = first[0].hold.clone().expect("the first branch result is held");
    assert!(!hold.is_finished());
    let second = join.handle(&b, &Context::first(&b)).unwrap();
    assert_eq!(second.len(), 1, "one joined transaction, nothing held");
    assert_eq!(second[0].releases, vec![hold.clone()], "released once the joined output is delivered");
    let st = joined(&second[0]);
    let mut hits: Vec<&str> = st.hits.iter().map(|h| h.id.as_str()).collect();
    hits.sort();
    assert_eq!(hits, ["large", "round"]);
    assert_eq!((feature(&st, "typology_branches"), feature(&st, "typology_partial")), (2.0, 0.0));
    assert!((feature(&st, "structuring") - 1.0).abs() < 1e-9, "0.7 + 0.3");
    // A late copy of a branch's result is dropped, not held.
    assert!(join.handle(&b, &Context::first(&b)).unwrap().is_empty());
    assert_eq!(join.counters().iter().find(|c| c.name == super::DROPPED).unwrap().value, 1);
    assert!(join.tick().is_empty());
}

#[test]
fn a_join_that_times_out_emits_what_arrived_flagged_partial() {
    let (_d, p) = monitored(JOIN, "");
    let p = p.unwrap();
    let [large, round, join] = [0, 1, 2].map(|i| StageHandler::new(&p, &p.stages[i]));
    assert!(join.tick_interval().is_some_and(|t| t <= Duration::from_millis(40)));
    let input = tx("t-2", 2000.0);
    let a = branch(&large, &input, 0);
    let hold = join.handle(&a, &Context::first(&a)).unwrap()[0].hold.clone().unwrap();
    assert!(join.tick().is_empty(), "not yet");
    std::thread::sleep(Duration::from_millis(50));
    let out = join.tick();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].key.as_deref(), Some(&b"acc-1"[..]), "under the transaction's key");
    assert_eq!(out[0].releases, vec![hold]);
    let st = joined(&out[0]);
    assert_eq!((feature(&st, "typology_branches"), feature(&st, "typology_partial")), (1.0, 1.0));
    assert!((feature(&st, "structuring") - 0.7).abs() < 1e-9);
    assert_eq!(join.counters().iter().find(|c| c.name == super::PARTIAL).unwrap().value, 1);
    // The missing branch arrives late: dropped, never a second emission.
    let b = branch(&round, &input, 1);
    assert!(join.handle(&b, &Context::first(&b)).unwrap().is_empty());
    assert!(join.tick().is_empty());
}

#[test]
fn joins_that_time_out_together_come_out_in_the_order_they_were_first_seen() {
    let (_d, p) = monitored(JOIN, "");
    let p = p.unwrap();
    let [large, join] = [0, 2].map(|i| StageHandler::new(&p, &p.stages[i]));
    // One account's transfers, each with only its first branch's result: all time
    // out in the same tick, and must leave in the account's order.
    let ids: Vec<String> = (0..50).map(|i| format!("t-{i:02}")).collect();
    for (i, id) in ids.iter().enumerate() {
        let r = branch(&large, &tx(id, 2000.0), i as i64);
        join.handle(&r, &Context::first(&r)).unwrap();
    }
    std::thread::sleep(Duration::from_millis(50));
    let out: Vec<String> = join.tick().iter().map(|o| p.schema.id_of(&joined(o).tx).to_string()).collect();
    assert_eq!(out, ids);
}

#[test]
fn a_result_of_a_stage_that_is_no_branch_is_dead_lettered() {
    let (_d, p) = monitored(JOIN, "");
    let p = p.unwrap();
    let join = StageHandler::new(&p, &p.stages[2]);
    let mut r = branch(&StageHandler::new(&p, &p.stages[0]), &tx("t-3", 1.0), 0);
    let mut trail = Vec::new();
    headers::append_hop(&mut trail, "stranger", 1, 2);
    r.headers.set(headers::TRAIL, trail);
    let e = join.handle(&r, &Context::first(&r)).unwrap_err();
    assert!(e.message.contains("\"stranger\""), "{e}");
}

#[test]
fn graph_errors_name_the_field() {
    let cases = [
        ("branches = [\"large\"]", "", "stage[2].branches", "two or more"),
        ("branches = [\"large\", \"nobody\"]", "", "stage[2].branches", "unknown stage \"nobody\""),
        // Only two of the three writers of `results` are branches.
        (
            "branches = [\"large\", \"round\"]",
            "[[stage]]\nname = \"third\"\nkind = \"rules\"\ninput = \"in\"\noutput = \"results\"\ndlq = \"dlq\"\nrules = \"large2.toml\"\n",
            "stage[2].branches",
            "\"third\" writes \"results\"",
        ),
        ("branches = [\"large\", \"round\"]\ntimeout_ms = 0", "", "stage[2].timeout_ms", "expected 1..="),
        ("branches = [\"large\", \"round\"]\n[[stage.typology]]\nname = \"t\"\nweights = { nope = 1.0 }", "", "stage[2].typology[0].weights", "unknown rule \"nope\""),
    ];
    for (join, extra, field, message) in cases {
        let (d, _) = monitored(join, "");
        std::fs::write(d.path().join("large2.toml"), LARGE.replace("\"large\"", "\"large2\"")).unwrap();
        let (_d2, p) = if extra.is_empty() { (d, monitored(join, "").1) } else {
            let (d2, _) = monitored(join, extra);
            std::fs::write(d2.path().join("large2.toml"), LARGE.replace("\"large\"", "\"large2\"")).unwrap();
            let p = Pipeline::load(d2.path()).map_err(|e| e.to_string());
            (d2, p)
        };
        let e = p.err().unwrap_or_else(|| panic!("{join:?} loads"));
        assert!(e.contains(field) && e.contains(message), "{join:?}: {e}");
    }
    // Two writers, and a stage reads the topic that is no join: it could not tell
    // the writers apart.
    let dir = monitored(JOIN, "").0;
    let file = dir.path().join("pipeline.toml");
    let text = std::fs::read_to_string(&file).unwrap();
    let cut = text.find("[[stage]]\nname = \"typology\"").unwrap();
    std::fs::write(&file, format!("{}[[stage]]\nname = \"after\"\nkind = \"rules\"\ninput = \"results\"\noutput = \"joined\"\ndlq = \"dlq\"\nrules = \"large2.toml\"\n", &text[..cut])).unwrap();
    std::fs::write(dir.path().join("large2.toml"), LARGE.replace("\"large\"", "\"large2\"")).unwrap();
    let e = Pipeline::load(dir.path()).unwrap_err().to_string();
    assert!(e.contains("stage[1].output") && e.contains("only if it is the input of a join"), "{e}");
    // Read by no stage (an egress several flows end on), several writers are fine.
    std::fs::write(&file, &text[..cut]).unwrap();
    Pipeline::load(dir.path()).unwrap();
}

#[test]
fn a_join_runs_as_a_service_of_its_own() {
    let (_d, p) = monitored(JOIN, "");
    let p = p.unwrap();
    let e = p.consecutive(&["round", "typology"]).unwrap_err();
    assert!(e.contains("runs as a service of its own"), "{e}");
}
