//! The `enrich` kind against a real HTTP server (`scripts/test-api`) through the real
//! runtime on the embedded bus: answers land in declared fields, failures are
//! classified, an outage is retried and recovered from with nothing lost, calls in
//! flight stay within `concurrency`, and the cache answers repeats.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actio_bus_embedded::{EmbeddedBus, EmbeddedConfig};
use actio_core::bus::{Bytes, NoRebalanceListener};
use actio_core::schema::Value;
use actio_core::{Bus, Codec, Consumer, ConsumerConfig, Headers, OutRecord, Producer, ProducerConfig, Record, TopicSpec, TxState};
use actio_runtime::{Handler, Stage, StopMode};
use actio_testkit::TestApi;

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
name = "at"
type = "timestamp"

[[field]]
name = "account_risk"
type = "float"
optional = true

[[field]]
name = "segment"
type = "enum"
values = ["retail", "business"]
optional = true

[decision]
outcomes = ["pass"]
fields = []
features = []
"#;

/// A pipeline of one `enrich` stage calling `api`, with `extra` lines in its stage.
fn enriched(api: &str, extra: &str) -> (tempfile::TempDir, Result<Pipeline, String>) {
    let topics = [topic("in", "json", "ingress"), topic("enriched", "postcard", "internal"), topic("out", "json", "egress"), topic("dlq", "json", "dead_letter"), topic("retry", "json", "retry")].concat();
    let text = format!(
        "name = \"lookup\"\nschema = \"schema.toml\"\n[key]\nfields = [\"account\"]\n{topics}[[stage]]\nname = \"risk\"\nkind = \"enrich\"\ninput = \"in\"\noutput = \"enriched\"\ndlq = \"dlq\"\nurl = \"{api}/risk/{{account}}\"\ntimeout_ms = 500\n{extra}\n[stage.fields]\naccount_risk = \"/risk\"\nsegment = \"/segment\"\n"
    );
    pipeline_in(SCHEMA, &text, &[])
}

/// The stage running on an embedded bus.
struct Running {
    bus: EmbeddedBus,
    stage: actio_runtime::StageHandle,
    handler: Arc<StageHandler>,
}

fn run(p: &Pipeline) -> Running {
    let bus = EmbeddedBus::new(EmbeddedConfig::default());
    bus.create_topics(&p.topics.iter().map(|t| TopicSpec { name: t.name.clone(), partitions: t.partitions }).collect::<Vec<_>>()).unwrap();
    let handler = Arc::new(StageHandler::new(p, &p.stages[0]));
    let stage = Stage::spawn(&bus, handler.spec(&[]), handler.clone()).unwrap();
    Running { bus, stage, handler }
}

fn send(bus: &EmbeddedBus, accounts: impl IntoIterator<Item = String>) -> usize {
    let p = bus.producer(&ProducerConfig::default()).unwrap();
    let mut n = 0;
    for (i, a) in accounts.into_iter().enumerate() {
        let json = format!(r#"{{"tx_id":"t-{i}","account":"{a}","at":"2026-12-01T10:00:00Z"}}"#);
        p.send(OutRecord { topic: Arc::from("in"), partition: None, key: Some(Bytes::from(a)), payload: Bytes::from(json), headers: Headers::default() }, Box::new(|r| assert!(r.is_ok())))
            .unwrap();
        n += 1;
    }
    n
}

fn read(bus: &EmbeddedBus, topic: &str, want: usize, timeout: Duration) -> Vec<Record> {
    let cfg = ConsumerConfig { group: format!("reader-{topic}-{}", rand_id()), topics: vec![topic.into()], client_id: "r".into(), from_earliest: true, properties: vec![] };
    let mut c = bus.consumer(&cfg, Arc::new(NoRebalanceListener)).unwrap();
    let mut out = Vec::new();
    let deadline = Instant::now() + timeout;
    while out.len() < want && Instant::now() < deadline {
        if let Some(r) = c.poll(Duration::from_millis(20)).unwrap() {
            out.push(r);
        }
    }
    out
}

fn rand_id() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
}

fn counter(h: &StageHandler, name: &str) -> u64 {
    h.counters().into_iter().find(|c| c.name == name).map_or(0, |c| c.value)
}

/// Every counter of the stage, by name.
fn counts(h: &StageHandler) -> HashMap<&'static str, u64> {
    h.counters().into_iter().map(|c| (c.name, c.value)).collect()
}

/// The stage with `extra` against an API that is down for the next minute: `n`
/// transactions of distinct accounts sent, what came out on `topic` within 20 s, and
/// how long that took.
fn against_a_dead_api(api: &TestApi, extra: &str, n: usize, topic: &str) -> (tempfile::TempDir, Pipeline, Running, Vec<Record>, Duration) {
    let (dir, p) = enriched(&api.url, extra);
    let p = p.unwrap();
    api.control(r#"{"down_for_ms": 60000}"#);
    let r = run(&p);
    let t0 = Instant::now();
    assert_eq!(send(&r.bus, (0..n).map(|i| format!("ACC{i}"))), n);
    let out = read(&r.bus, topic, n, Duration::from_secs(20));
    (dir, p, r, out, t0.elapsed())
}

fn stop(r: Running) {
    r.stage.stop(StopMode::Graceful);
    r.stage.join().unwrap();
}

#[test]
fn the_answer_lands_in_the_declared_fields_and_failures_are_classified() {
    let api = TestApi::start(0);
    let (_d, p) = enriched(&api.url, "");
    let p = p.unwrap();
    let r = run(&p);
    send(&r.bus, ["DE01ACC2".to_string(), "unknown-1".into(), "bad-1".into()]);
    let out = read(&r.bus, "enriched", 1, Duration::from_secs(10));
    let dlq = read(&r.bus, "dlq", 2, Duration::from_secs(10));
    stop(r);
    assert_eq!(out.len(), 1);
    let st: TxState = Codec::Postcard.decode(&out[0].payload).unwrap();
    let slot = |n: &str| st.tx.values[p.schema.slot(n).unwrap()].clone();
    assert!(matches!(slot("account_risk"), Value::Float(r) if (0.0..=1.0).contains(&r)), "{:?}", slot("account_risk"));
    assert_eq!(slot("segment"), Value::Enum(1), "business");
    let why: HashMap<String, String> = dlq
        .iter()
        .map(|r| (String::from_utf8_lossy(&r.key.clone().unwrap()).into_owned(), String::from_utf8_lossy(r.headers.get(actio_core::headers::ERROR).unwrap()).into_owned()))
        .collect();
    assert!(why["unknown-1"].contains("HTTP 404"), "a 4xx is permanent: {why:?}");
    assert!(why["bad-1"].contains("not JSON"), "{why:?}");
    assert_eq!(api.stats()["by_status"]["404"], 1, "a permanent failure is not retried");
}

#[test]
fn an_api_down_for_10_s_is_retried_through_the_retry_topic_and_nothing_is_lost() {
    let api = TestApi::start(0);
    let (_d, p) = enriched(&api.url, "retry_topic = \"retry\"\nretry_topic_attempts = 40\nretry_delay_ms = 500");
    let p = p.unwrap();
    api.control(r#"{"down_for_ms": 10000}"#);
    let r = run(&p);
    let t0 = Instant::now();
    let n = send(&r.bus, (0..200).map(|i| format!("ACC{}", i % 50)));
    let out = read(&r.bus, "enriched", n, Duration::from_secs(40));
    let took = t0.elapsed();
    let dlq = read(&r.bus, "dlq", 1, Duration::from_millis(300));
    let retries = counter(&r.handler, super::RETRIES);
    stop(r);
    assert_eq!(out.len(), n, "every transaction enriched once the API is back, after {took:?}");
    assert!(dlq.is_empty(), "nothing dead-lettered");
    assert!(took >= Duration::from_secs(9), "the API was down: {took:?}");
    assert!(retries > 0 && api.stats()["by_status"]["503"].as_u64().unwrap() > 0);
    let ids: std::collections::HashSet<String> = out.iter().map(|r| p.schema.id_of(&Codec::Postcard.decode::<TxState>(&r.payload).unwrap().tx).to_string()).collect();
    assert_eq!(ids.len(), n, "each once");
}

#[test]
fn a_call_that_times_out_is_transient_and_retried_in_place() {
    let api = TestApi::start(0);
    let (_d, p) = enriched(&api.url, "retry_topic = \"retry\"\nretry_delay_ms = 200\n[stage.limits]\nretry_attempts = 2");
    let p = p.unwrap();
    // Every answer for the next 700 ms takes 700 ms: past the 500 ms timeout.
    api.control(r#"{"hang_for_ms": 700}"#);
    let r = run(&p);
    send(&r.bus, ["ACC1".to_string()]);
    let out = read(&r.bus, "enriched", 1, Duration::from_secs(15));
    let retries = counter(&r.handler, super::RETRIES);
    stop(r);
    assert_eq!(out.len(), 1, "enriched once the API answers in time");
    assert!(retries >= 1, "the timeout was retried");
}

#[test]
fn calls_in_flight_stay_within_concurrency_and_the_cache_answers_repeats() {
    let api = TestApi::start(50);
    let (_d, p) = enriched(&api.url, "concurrency = 8\ncache_ttl_ms = 60000");
    let p = p.unwrap();
    let r = run(&p);
    // 120 distinct accounts, then the first 40 again: those are cached.
    let n = send(&r.bus, (0..120).map(|i| format!("ACC{i}")).chain((0..40).map(|i| format!("ACC{i}"))));
    let out = read(&r.bus, "enriched", n, Duration::from_secs(30));
    let hits = counter(&r.handler, super::CACHE_HITS);
    stop(r);
    assert_eq!(out.len(), n);
    let stats = api.stats();
    let most = stats["max_concurrent"].as_u64().unwrap();
    // The server counts a call until its thread returns, just after the client has
    // its answer (and has given its permit to the next call): one more can show.
    assert!((2..=9).contains(&most), "calls in flight at once: {most} (concurrency 8): {stats}");
    assert!(hits >= 1 && stats["requests"].as_u64().unwrap() + hits == n as u64, "{hits} cache hits, {stats}");
}

#[test]
fn with_on_failure_continue_and_a_breaker_an_api_that_is_down_costs_no_decision() {
    let api = TestApi::start(0);
    let n = 300;
    let (_d, p, r, out, took) = against_a_dead_api(&api, "on_failure = \"continue\"\nconcurrency = 8\nbreaker_failures = 5\nbreaker_open_ms = 1500\n[stage.limits]\nretry_attempts = 2", n, "enriched");
    let dlq = read(&r.bus, "dlq", 1, Duration::from_millis(300));
    let counts = counts(&r.handler);
    // The API comes back; once the breaker lets calls through again, answers land.
    api.control(r#"{"down_for_ms": 0}"#);
    std::thread::sleep(Duration::from_millis(1600));
    send(&r.bus, ["DE01ACC2".to_string()]);
    let after = read(&r.bus, "enriched", n + 1, Duration::from_secs(10));
    stop(r);
    assert_eq!(out.len(), n, "every transaction passed on while the API was down, in {took:?}");
    assert!(dlq.is_empty(), "nothing dead-lettered");
    for rec in &out {
        let st: TxState = Codec::Postcard.decode(&rec.payload).unwrap();
        assert_eq!(st.tx.values[p.schema.slot("account_risk").unwrap()], Value::Null, "no answer, no value");
    }
    assert_eq!(counts[super::CONTINUED], n as u64, "{counts:?}");
    assert_eq!(counts[super::FAILED], 0, "{counts:?}");
    assert!(counts[super::BREAKER_OPENED] >= 1 && counts[super::SHORT_CIRCUITED] > 0, "{counts:?}");
    // Without the breaker each of the 300 would have made 2 calls; with it, about
    // the 8 in flight when it opened, and a probe now and then.
    assert!(counts[super::CALLS] < 40, "the breaker kept calls down: {counts:?}");
    assert_eq!(after.len(), n + 1, "enriched again once the API is back");
    let last: TxState = Codec::Postcard.decode(&after[n].payload).unwrap();
    assert!(matches!(last.tx.values[p.schema.slot("account_risk").unwrap()], Value::Float(_)), "{:?}", last.tx.values);
}

#[test]
fn an_open_breaker_dead_letters_each_transaction_once_without_a_call() {
    let api = TestApi::start(0);
    let n = 200;
    let (_d, _p, r, dlq, took) = against_a_dead_api(&api, "concurrency = 8\nbreaker_failures = 3\nbreaker_open_ms = 60000\n[stage.limits]\nretry_attempts = 3\nretry_backoff_ms = 50", n, "dlq");
    let counts = counts(&r.handler);
    stop(r);
    assert_eq!(dlq.len(), n, "each dead-lettered, in {took:?}: {counts:?}");
    let ids: std::collections::HashSet<Vec<u8>> = dlq.iter().map(|r| r.key.clone().unwrap().to_vec()).collect();
    assert_eq!(ids.len(), n, "each once");
    assert_eq!(counts[super::FAILED], n as u64, "each counted once: {counts:?}");
    assert_eq!(counts[super::BREAKER_OPENED], 1, "{counts:?}");
    // Refused transactions are not retried in place: 200 × 3 × 50 ms of sleeps would take 30 s.
    assert!(took < Duration::from_secs(10), "{took:?}");
    assert!(counts[super::CALLS] < 30 && counts[super::SHORT_CIRCUITED] > 150, "{counts:?}");
    assert!(String::from_utf8_lossy(dlq.last().unwrap().headers.get(actio_core::headers::ERROR).unwrap()).contains("breaker is open"));
}

#[test]
fn enrich_config_errors_name_the_field() {
    let api = "http://127.0.0.1:9";
    for (extra, field, message) in [
        ("method = \"post\"\nbody = '{\"a\": \"{nope}\"}'", "stage[0].body", "{nope}"),
        ("body = '{}'", "stage[0].body", "only with method = \"post\""),
        ("concurrency = 0", "stage[0].concurrency", "expected 1..=10000"),
        ("timeout = 5", "stage[0].timeout", "unknown field `timeout`"),
        ("breaker_open_ms = 100", "stage[0].breaker_open_ms", "only with breaker_failures"),
        ("breaker_failures = 0", "stage[0].breaker_failures", "leave it out for no breaker"),
        ("breaker_failures = 3\nbreaker_open_ms = 0", "stage[0].breaker_open_ms", "expected 1..=600000"),
        ("on_failure = \"skip\"", "stage[0].on_failure", "unknown variant `skip`"),
    ] {
        let (_d, p) = enriched(api, extra);
        let e = p.err().unwrap_or_else(|| panic!("{extra:?} loads"));
        assert!(e.contains(field) && e.contains(message), "{extra:?}: {e}");
    }
    let (d, _) = enriched(api, "");
    let file = d.path().join("pipeline.toml");
    let text = std::fs::read_to_string(&file).unwrap();
    std::fs::write(&file, text.replace("segment = \"/segment\"", "tx_id = \"/x\"\nsegmant = \"/segment\"")).unwrap();
    let e = Pipeline::load(d.path()).unwrap_err().to_string();
    assert!(e.contains("stage[0].fields.segmant") && e.contains("unknown field \"segmant\""), "{e}");
    std::fs::write(&file, text.replace("segment = \"/segment\"", "segment = \"/segment\"\naccount = \"/account\"").replace("timeout_ms = 500", "timeout_ms = 500\non_failure = \"continue\"")).unwrap();
    let e = Pipeline::load(d.path()).unwrap_err().to_string();
    assert!(e.contains("stage[0].fields.account") && e.contains("must be optional"), "{e}");
    std::fs::write(&file, text.replace(&format!("url = \"{api}/risk/{{account}}\""), "url = \"ftp://x/{account}\"")).unwrap();
    assert!(Pipeline::load(d.path()).unwrap_err().to_string().contains("expected an http:// or https:// URL"));
}

#[test]
fn an_enrich_stage_ends_a_fused_service() {
    let api = TestApi::start(0);
    let (d, _) = enriched(&api.url, "");
    let file = d.path().join("pipeline.toml");
    let text = std::fs::read_to_string(&file).unwrap();
    std::fs::write(&file, format!("{text}\n[[stage]]\nname = \"newest\"\nkind = \"latest\"\ninput = \"enriched\"\noutput = \"out\"\ndlq = \"dlq\"\ntimestamp = \"at\"\n")).unwrap();
    let p = Pipeline::load(d.path()).unwrap();
    let e = p.consecutive(&["risk", "newest"]).unwrap_err();
    assert!(e.contains("waits on I/O"), "{e}");
}
