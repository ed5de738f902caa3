//! The engine knows no field by name: a copy of the fraud pipeline with every field
//! renamed (schema, rules, velocity, model, key, scenarios, golden cases) validates and
//! decides the same generated traffic, and its golden cases, exactly as the original.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::path::Path;

use actio_core::bus::Bytes;
use actio_core::{Codec, Decision, Headers, Record, TopicPartition};
use actio_loadgen::{Generator, Scenario};
use actio_pipeline::Pipeline;
use actio_pipeline::stages::StageHandler;
use actio_runtime::{Context, Handler, HandlerError, Output};
use serde_json::Value;

/// `h` on `r` as the runtime runs a message on its first attempt, from its input.
fn first_attempt(h: &dyn Handler, r: &Record) -> Result<Vec<Output>, HandlerError> {
    h.handle(r, &Context::first(r))
}

/// The new name of a field.
fn renamed(name: &str) -> String {
    format!("zz_{name}")
}

/// `text` with every field of `fields` renamed where a file names it. `id` is also a
/// key of rule files and a generator's name, so only its field uses are renamed.
fn rename_in(text: &str, fields: &[String]) -> String {
    let mut out = text.to_string();
    for f in fields.iter().filter(|f| *f != "id") {
        let re = regex::Regex::new(&format!(r"\b{f}\b")).unwrap();
        out = re.replace_all(&out, renamed(f).as_str()).into_owned();
    }
    for (from, to) in [("tx.id", "tx.zz_id"), ("\"id\":", "\"zz_id\":"), ("name = \"id\"", "name = \"zz_id\""), ("id = \"id\"", "id = \"zz_id\"")] {
        out = out.replace(from, to);
    }
    out
}

fn copy_renamed(from: &Path, to: &Path, fields: &[String]) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        let target = to.join(p.file_name().unwrap());
        if p.is_dir() {
            copy_renamed(&p, &target, fields);
        } else if p.extension().is_some_and(|x| x == "toml" || x == "json") {
            std::fs::write(&target, rename_in(&std::fs::read_to_string(&p).unwrap(), fields)).unwrap();
        }
    }
}

/// The stages of a pipeline fed like the runtime feeds them; the decision of each tx.
struct Chain {
    pipeline: Pipeline,
    handlers: Vec<StageHandler>,
    offset: i64,
}

impl Chain {
    fn new(pipeline: Pipeline) -> Self {
        let handlers = pipeline.stages.iter().map(|s| StageHandler::new(&pipeline, s)).collect();
        Chain { pipeline, handlers, offset: 0 }
    }

    fn decide(&mut self, json: &[u8]) -> Decision {
        let tx = self.pipeline.schema.decode_json(json).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(json)));
        let key = Bytes::from(self.pipeline.key.key(&tx));
        let mut payload = Bytes::copy_from_slice(json);
        self.offset += 1;
        for (stage, h) in self.pipeline.stages.iter().zip(&self.handlers) {
            let r = Record { tp: TopicPartition::new(stage.input.as_str(), 0), offset: self.offset, key: Some(key.clone()), payload, headers: Headers::default(), timestamp_ms: None };
            payload = first_attempt(h, &r).unwrap_or_else(|e| panic!("stage {}: {e}", stage.name))[0].payload.clone();
        }
        Codec::Json.decode(&payload).unwrap()
    }
}

/// A JSON object with its keys renamed (one level: map entries keep their names).
fn rename_keys(json: &[u8]) -> Vec<u8> {
    let Value::Object(m) = serde_json::from_slice::<Value>(json).unwrap() else { panic!("not an object") };
    let m: serde_json::Map<String, Value> = m.into_iter().map(|(k, v)| (renamed(&k), v)).collect();
    serde_json::to_vec(&m).unwrap()
}

/// What must be equal: everything but the field names themselves.
fn verdict(d: &Decision) -> (String, String, String, u64, Vec<String>, Option<String>) {
    (d.tx_id.clone(), d.key.clone(), d.decision.clone(), (d.score * 1e6) as u64, d.rule_hits.clone(), d.override_rule.clone())
}

#[test]
fn a_copy_with_every_field_renamed_decides_exactly_as_the_original() {
    let fraud = actio_testkit::fraud();
    let original = Pipeline::load(&fraud).unwrap();
    let fields: Vec<String> = original.schema.fields().iter().map(|f| f.name.clone()).collect();
    let dir = tempfile::tempdir().unwrap();
    copy_renamed(&fraud, dir.path(), &fields);
    let copy = Pipeline::load(dir.path()).unwrap_or_else(|e| panic!("the renamed copy does not load:\n{e}"));
    for f in &fields {
        assert!(copy.schema.slot(f).is_none() && copy.schema.slot(&renamed(f)).is_some(), "{f} was not renamed");
    }
    let rules = std::fs::read_to_string(dir.path().join("rules.toml")).unwrap();
    assert!(rules.contains("tx.zz_amount") && !rules.contains("tx.amount "), "the rules read the renamed fields");

    // The renamed scenario loads against the renamed schema.
    let scenario = |p: &Path| Scenario::load(&p.join("scenarios/baseline.toml")).unwrap();
    Generator::new(copy.schema.clone(), &scenario(dir.path()), "r").unwrap_or_else(|e| panic!("renamed scenario: {e}"));

    // The same generated traffic: the original's, its keys renamed.
    let mut g = Generator::new(original.schema.clone(), &scenario(&fraud), "r").unwrap();
    let (mut a, mut b) = (Chain::new(original), Chain::new(copy));
    let (mut decided, mut not_approved) = (0, 0);
    for i in 0..3000u64 {
        let tx = g.next(i, 1_800_000_000_000_000_000 + i as i64 * 5_000_000);
        let json = a.pipeline.schema.encode_json(&tx);
        let (da, db) = (a.decide(&json), b.decide(&rename_keys(&json)));
        assert_eq!(verdict(&da), verdict(&db), "tx {i}");
        decided += 1;
        not_approved += (da.decision != "approve") as u32;
    }
    assert!(decided == 3000 && not_approved > 30, "the traffic exercises the rules: {not_approved} not approved");

    // And every golden case, history first.
    let mut cases = 0;
    for e in std::fs::read_dir(fraud.join("golden")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_none_or(|x| x != "json") {
            continue;
        }
        let orig: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        let ren: Value = serde_json::from_str(&std::fs::read_to_string(dir.path().join("golden").join(p.file_name().unwrap())).unwrap()).unwrap();
        let (mut a, mut b) = (Chain::new(Pipeline::load(&fraud).unwrap()), Chain::new(Pipeline::load(dir.path()).unwrap()));
        let history = |c: &Value| c["history"].as_array().cloned().unwrap_or_default();
        for (x, y) in history(&orig).iter().zip(&history(&ren)).chain([(&orig["tx"], &ren["tx"])]) {
            let (da, db) = (a.decide(x.to_string().as_bytes()), b.decide(y.to_string().as_bytes()));
            assert_eq!(verdict(&da), verdict(&db), "{}", p.display());
        }
        cases += 1;
    }
    assert!(cases >= 40, "{cases} golden cases");
}
