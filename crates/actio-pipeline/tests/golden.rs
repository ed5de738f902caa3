//! Golden cases for every shipped pipeline's rules and scoring: each JSON file in
//! `pipelines/<name>/golden/` is a transaction (after the key's or a related key's
//! earlier ones) and what the pipeline must make of it; adding a case is adding a
//! file, adding a pipeline with a `golden/` directory is adding its cases here.
//!
//! A case runs through the stages' real handlers exactly as the runtime calls them,
//! along the pipeline's graph (each message to every stage that reads its topic, so
//! parallel branches and joins run as deployed), on a fresh set of handlers so that no velocity state leaks between cases. Every
//! rule of the pipeline must be expected to fire in at least one case: a new rule
//! without a case fails here.
//!
//! Case format (see `pipelines/fraud/golden/README.md`):
//!
//! ```json
//! { "description": "…",
//!   "history": [ <ingress tx>, … ],        // optional, fed first, in order
//!   "tx": <ingress tx, as in the pipeline's tx.schema.json>,
//!   "expect": { "decision": "<an outcome of schema.toml>",   // optional
//!               "hits": ["rule_id", …],                  // must fire on `tx`
//!               "not_hits": ["rule_id", …],              // optional: must not fire
//!               "override_rule": "rule_id" | null,      // optional
//!               "egress": ["topic", …] } }              // optional: where it comes out, exactly
//! ```
//!
//! A case may name its `"ingress"` topic (a pipeline with several flows; default the
//! first declared). In a flow that ends without a decision (`pipelines/sensors`),
//! `expect.egress` says which egress topics the transaction must come out on (`[]`:
//! nowhere, e.g. dropped as older than its key's newest).
//!
//! `hits` are the rules that fired, shadow ones included (they fire but never reach
//! the decision's `rule_hits`), read from the state the score stage is handed.
//!
//! A pipeline's `{env.<NAME>_API}` (an `enrich` stage's URL) points at a real
//! `scripts/test-api` the harness starts on 127.0.0.1: its answers are stable per
//! account, so a case can count on an account's risk.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use actio_core::bus::Bytes;
use actio_core::{Decision, Headers, Record, TopicPartition, TxState};
use actio_pipeline::stages::StageHandler;
use actio_pipeline::{Pipeline, Writes};
use actio_runtime::{Context, Handler, HandlerError, Output};
use serde::{Deserialize, Deserializer};
use serde_json::Value;

/// `h` on `r` as the runtime runs a message on its first attempt, from its input; a
/// deferred result (an `enrich` stage's call) is waited for, as the runtime would.
fn first_attempt(h: &dyn Handler, r: &Record) -> Result<Vec<Output>, HandlerError> {
    let mut outputs = h.handle(r, &Context::first(r))?;
    if let Some(d) = outputs.first_mut().and_then(|o| o.defer.take()) {
        return d.wait(std::time::Duration::from_secs(30)).unwrap_or_else(|| Err(HandlerError::permanent("deferred result not completed in 30 s")));
    }
    Ok(outputs)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    description: String,
    /// The ingress topic the case's transactions enter (a pipeline with several
    /// flows); default: the first declared.
    #[serde(default)]
    ingress: Option<String>,
    #[serde(default)]
    history: Vec<Value>,
    tx: Value,
    expect: Expect,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Expect {
    #[serde(default)]
    decision: Option<String>,
    hits: Vec<String>,
    #[serde(default)]
    not_hits: Vec<String>,
    /// Absent: not checked; `null`: no rule may override; an id: that rule overrides.
    #[serde(default, deserialize_with = "present")]
    override_rule: Option<Option<String>>,
    /// The egress topics the transaction must come out on, exactly (a flow that
    /// ends without a decision); `[]`: it must come out nowhere (dropped, as a
    /// `latest` stage drops an older update). Absent: not checked.
    #[serde(default)]
    egress: Option<Vec<String>>,
}

fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<String>>, D::Error> {
    Option::<String>::deserialize(d).map(Some)
}

/// What the pipeline made of one transaction.
struct Outcome {
    /// The state on the last topic between stages it passed: every hit (shadow ones
    /// too), the features. `None` if it passed none.
    state: Option<TxState>,
    /// The decision, in a pipeline whose flow ends with one.
    decision: Option<Decision>,
    /// The egress topics it came out on, sorted.
    egress: Vec<String>,
}

/// One fresh set of stage handlers, fed like the runtime feeds them.
struct Chain<'p> {
    pipeline: &'p Pipeline,
    handlers: Vec<StageHandler>,
    offset: i64,
}

impl<'p> Chain<'p> {
    fn new(pipeline: &'p Pipeline) -> Self {
        Chain { pipeline, handlers: pipeline.stages.iter().map(|s| StageHandler::new(pipeline, s)).collect(), offset: 0 }
    }

    fn codec(&self, topic: &str) -> actio_core::Codec {
        self.pipeline.topic(topic).unwrap().codec
    }

    fn run(&mut self, json: &Value, ingress: Option<&str>) -> Result<Outcome, String> {
        let stages = &self.pipeline.stages;
        let payload = Bytes::from(json.to_string());
        let tx = self.pipeline.schema.decode_json(&payload).map_err(|e| format!("invalid tx: {e}"))?;
        let id = self.pipeline.schema.id_of(&tx).to_string();
        let key = Bytes::from(self.pipeline.key.key(&tx));
        let ingress = match ingress {
            Some(t) => self.pipeline.topic(t).filter(|t| t.role == actio_pipeline::TopicRole::Ingress).ok_or_else(|| format!("{t:?} is no ingress topic"))?.name.clone(),
            None => self.pipeline.ingress().ok_or("no ingress topic")?.name.clone(),
        };
        // The graph as the runtime runs it: every message on a topic goes to each stage
        // that reads it (fan-out), each output to its topic with the stage's trail hop
        // (a join tells its branches apart by it), until nothing is left to run.
        let mut queue = std::collections::VecDeque::from([(ingress, payload, Headers::default())]);
        let (mut state, mut decision, mut egress) = (None, None, Vec::new());
        let decisions: Vec<&str> = stages.iter().filter(|s| s.kind.writes == Writes::Decisions).map(|s| s.output.as_str()).collect();
        while let Some((topic, payload, hdrs)) = queue.pop_front() {
            match self.pipeline.topic(&topic).map(|t| t.role) {
                Some(actio_pipeline::TopicRole::Internal) => {
                    state = Some(self.codec(&topic).decode::<TxState>(&payload).map_err(|e| format!("{topic}: {e}"))?);
                }
                Some(actio_pipeline::TopicRole::Egress) if decisions.contains(&topic.as_str()) => {
                    decision = Some(self.codec(&topic).decode::<Decision>(&payload).map_err(|e| format!("decision: {e}"))?);
                    egress.push(topic.clone());
                }
                Some(actio_pipeline::TopicRole::Egress) => egress.push(topic.clone()),
                _ => {}
            }
            for (stage, handler) in stages.iter().zip(&self.handlers).filter(|(s, _)| s.input == topic) {
                let offset = self.offset;
                self.offset += 1;
                let record = Record { tp: TopicPartition::new(stage.input.as_str(), 0), offset, key: Some(key.clone()), payload: payload.clone(), headers: hdrs.clone(), timestamp_ms: None };
                let outputs = first_attempt(handler, &record).map_err(|e| format!("stage {:?} failed on tx {id:?}: {e}", stage.name))?;
                for out in outputs.into_iter().filter(|o| o.hold.is_none()) {
                    let mut h = hdrs.clone();
                    let mut trail = h.get(actio_core::headers::TRAIL).map(<[u8]>::to_vec).unwrap_or_default();
                    actio_core::headers::append_hop(&mut trail, &stage.name, 0, 0);
                    h.set(actio_core::headers::TRAIL, trail);
                    queue.push_back((out.topic.to_string(), out.payload, h));
                }
            }
        }
        if !decisions.is_empty() && decision.is_none() && !egress.is_empty() {
            return Err(format!("tx {id:?}: came out on {egress:?} but no decision reached {decisions:?}"));
        }
        egress.sort();
        Ok(Outcome { state, decision, egress })
    }
}

/// The pipeline's rule sets, in chain order.
fn rule_sets(p: &Pipeline) -> Vec<std::sync::Arc<actio_engine::rules::RuleSet>> {
    p.stages
        .iter()
        .filter_map(|s| s.logic.rules().map(|r| r.current()))
        .collect()
}

fn rule_ids(p: &Pipeline) -> Vec<String> {
    rule_sets(p).iter().flat_map(|s| s.rules().iter().map(|r| r.id.clone()).collect::<Vec<_>>()).collect()
}

/// Which rules failed to evaluate on a state, and why.
fn rule_errors(p: &Pipeline, st: &TxState) -> Vec<String> {
    let mut out = Vec::new();
    for set in rule_sets(p) {
        for r in set.rules() {
            if let Some(Err(e)) = set.explain(&r.id, st) {
                out.push(format!("{}: {e}", r.id));
            }
        }
    }
    out
}

fn describe(o: &Outcome) -> String {
    let empty = TxState::new(actio_core::Tx { values: Vec::new() });
    let st = o.state.as_ref().unwrap_or(&empty);
    let hits: Vec<String> = st.hits.iter().map(|h| if h.shadow { format!("{} (shadow)", h.id) } else { h.id.clone() }).collect();
    let features: Vec<String> = st.features.iter().map(|f| format!("{}={}", f.name, f.value)).collect();
    let decided = match &o.decision {
        Some(d) => format!("decision {} (score {}, override {:?})", d.decision, d.score, d.override_rule),
        None => "no decision".to_string(),
    };
    format!("  actual: {decided}, out on {:?}\n  hits: {hits:?}\n  features: {}", o.egress, features.join(" "))
}

/// Runs one case file; the rule ids it proves to fire, or what went wrong.
fn check(p: &Pipeline, known: &BTreeSet<String>, path: &Path) -> Result<Vec<String>, String> {
    let text = std::fs::read(path).map_err(|e| format!("cannot read: {e}"))?;
    let case: Case = actio_core::Codec::Json.decode(&text).map_err(|e| format!("not a golden case: {e}"))?;
    let mut problems = Vec::new();
    if case.description.trim().is_empty() {
        problems.push("empty description".to_string());
    }
    let mut ids = BTreeSet::new();
    let schema = &p.schema;
    for tx in case.history.iter().chain([&case.tx]) {
        match schema.decode_json(tx.to_string().as_bytes()) {
            Ok(t) if !ids.insert(schema.id_of(&t).to_string()) => problems.push(format!("tx id {:?} is used twice in the case", schema.id_of(&t))),
            Ok(_) => {}
            Err(e) => problems.push(format!("tx {} is invalid: {e}", tx.get(&schema.field(schema.id_slot()).name).unwrap_or(&Value::Null))),
        }
    }
    for id in case.expect.hits.iter().chain(&case.expect.not_hits) {
        if !known.contains(id) {
            problems.push(format!("unknown rule id {id:?} in expect"));
        }
    }
    if !problems.is_empty() {
        return Err(problems.join("\n  "));
    }

    let mut chain = Chain::new(p);
    let ingress = case.ingress.as_deref();
    for tx in &case.history {
        let o = chain.run(tx, ingress).map_err(|e| format!("history: {e}"))?;
        let errors = o.state.as_ref().map(|st| rule_errors(p, st)).unwrap_or_default();
        if !errors.is_empty() {
            problems.push(format!("history tx {}: rules failed to evaluate: {errors:?}", tx));
        }
    }
    let o = chain.run(&case.tx, ingress)?;
    let fired: BTreeSet<&str> = o.state.iter().flat_map(|st| st.hits.iter().map(|h| h.id.as_str())).collect();
    let missing: Vec<&String> = case.expect.hits.iter().filter(|id| !fired.contains(id.as_str())).collect();
    if !missing.is_empty() {
        problems.push(format!("expected to fire but did not: {missing:?}"));
    }
    let unwanted: Vec<&String> = case.expect.not_hits.iter().filter(|id| fired.contains(id.as_str())).collect();
    if !unwanted.is_empty() {
        problems.push(format!("fired but must not: {unwanted:?}"));
    }
    let decided = o.decision.as_ref();
    let decides = p.stages.iter().any(|s| s.kind.writes == Writes::Decisions);
    if decides && decided.is_none() && case.expect.egress.as_ref().is_none_or(|e| !e.is_empty()) {
        problems.push(format!("no decision came out (out on {:?})", o.egress));
    }
    if let Some(want) = &case.expect.decision
        && Some(want) != decided.map(|d| &d.decision)
    {
        problems.push(format!("expected decision {want}, got {:?}", decided.map(|d| &d.decision)));
    }
    if let Some(want) = &case.expect.override_rule
        && Some(want) != decided.map(|d| &d.override_rule)
    {
        problems.push(format!("expected override_rule {want:?}, got {:?}", decided.map(|d| &d.override_rule)));
    }
    if let Some(want) = &case.expect.egress {
        let mut want = want.clone();
        want.sort();
        if want != o.egress {
            problems.push(format!("expected out on {want:?}, got {:?}", o.egress));
        }
    }
    let want_id = case.tx.get(&schema.field(schema.id_slot()).name).and_then(Value::as_str).unwrap_or_default();
    if let Some(d) = decided
        && d.tx_id != want_id
    {
        problems.push(format!("the decision is for tx {:?}, not {want_id:?}", d.tx_id));
    }
    if let Some(st) = &o.state {
        let errors = rule_errors(p, st);
        if !errors.is_empty() || st.rule_errors != 0 {
            problems.push(format!("{} rule evaluation error(s): {errors:?}", st.rule_errors));
        }
    }
    if problems.is_empty() {
        // Shown with --nocapture: how close each case sits to the thresholds.
        match decided {
            Some(d) => eprintln!("{:<8} {:.6}  {}", d.decision, d.score, path.file_name().unwrap_or_default().to_string_lossy()),
            None => eprintln!("{:<24} {}", o.egress.join(","), path.file_name().unwrap_or_default().to_string_lossy()),
        }
        Ok(case.expect.hits)
    } else {
        Err(format!("{}\n  {}\n{}", case.description, problems.join("\n  "), describe(&o)))
    }
}

/// Every shipped pipeline with a `golden/` directory, as named in messages.
fn pipelines_with_cases() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(actio_testkit::repo().join("pipelines"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("golden").is_dir())
        .map(|p| format!("pipelines/{}", p.file_name().unwrap().to_string_lossy()))
        .collect();
    names.sort();
    names
}

#[test]
fn golden_cases_decide_as_expected_and_cover_every_rule() {
    let all = pipelines_with_cases();
    assert!(all.contains(&"pipelines/fraud".to_string()), "{all:?}");
    let api = actio_testkit::TestApi::start(0);
    let failures: Vec<String> = all.iter().filter_map(|p| golden(p, &api).err()).collect();
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// Runs the golden cases of one pipeline (`pipelines/<name>`).
fn golden(pipeline: &str, api: &actio_testkit::TestApi) -> Result<(), String> {
    let golden_dir = format!("{pipeline}/golden");
    #[allow(non_snake_case)]
    let GOLDEN = &golden_dir;
    let env = |name: &str| name.ends_with("_API").then(|| api.url.clone());
    let p = Pipeline::load_with_env(&actio_testkit::repo().join(pipeline), &actio_pipeline::Env::new(&env)).map_err(|e| format!("{pipeline}: {e}"))?;
    let all = rule_ids(&p);
    let known: BTreeSet<String> = all.iter().cloned().collect();
    let dir = actio_testkit::repo().join(GOLDEN);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{GOLDEN}: {e}"))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();

    let mut failures = Vec::new();
    let mut covered: BTreeSet<String> = BTreeSet::new();
    let mut cases = 0;
    for path in &files {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name == "README.md" || name.starts_with('.') {
            continue;
        }
        if path.extension().is_none_or(|e| e != "json") {
            failures.push(format!("{name}: not a .json case (only *.json and README.md belong in golden/)"));
            continue;
        }
        cases += 1;
        match check(&p, &known, path) {
            Ok(hits) => covered.extend(hits),
            Err(e) => failures.push(format!("{name}: {e}")),
        }
    }
    if cases == 0 {
        return Err(format!("no golden cases in {GOLDEN}"));
    }

    let uncovered: Vec<&String> = all.iter().filter(|id| !covered.contains(*id)).collect();
    if !uncovered.is_empty() {
        failures.push(format!(
            "rules no golden case expects to fire ({} of {}): {uncovered:?}; add a case to {GOLDEN} whose expect.hits names each",
            uncovered.len(),
            all.len(),
        ));
    }
    if !failures.is_empty() {
        return Err(format!("{} golden failure(s) in {GOLDEN}:\n\n{}", failures.len(), failures.join("\n\n")));
    }
    eprintln!("golden {pipeline}: {cases} cases, {} of {} rules covered", covered.len(), all.len());
    Ok(())
}
