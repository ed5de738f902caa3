//! Pipelines as graphs against a real Apache Kafka broker: the transfers pipeline's
//! two branches in parallel services (one of them an HTTP lookup against a real
//! `scripts/test-api`) and its typology join, SIGKILLed mid-run.
//!
//! Like kafka.rs: they need `ACTIO_KAFKA_BROKERS` (set by `scripts/test`), and pass
//! saying so without it unless `ACTIO_REQUIRE_KAFKA=1`.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod support;
use support::*;

use std::time::Duration;

const STAGES: [&str; 5] = ["risk", "screening", "history", "typology", "score"];

#[test]
fn a_join_sigkilled_mid_run_loses_nothing_and_leaves_nothing_stuck() {
    let Some(b) = brokers("join_sigkilled") else { return };
    let _serial = serial();
    let api = actio_testkit::TestApi::start(0);
    let p = TestPipeline::of("transfers", "transfers", &b).edit("pipeline.toml", |t| {
        assert!(t.contains("http://127.0.0.1:18099"), "the risk stage's default URL");
        t.replace("http://127.0.0.1:18099", &api.url)
    });
    p.create_topics();
    let mut stages: Vec<StageProcess> = STAGES.iter().map(|s| p.stage(s)).collect();
    for s in &mut stages {
        s.wait_ready(Duration::from_secs(60));
    }
    let out = p.path().join("report");
    let load = p.loadgen(300, "10s", &out).spawn().unwrap();
    std::thread::sleep(Duration::from_secs(4));
    // The join dies holding branch results it was waiting with (uncommitted), and a
    // new one takes over: it gets them again and joins them.
    let typology = STAGES.iter().position(|s| *s == "typology").unwrap();
    stages[typology].signal("-KILL");
    let _ = stages[typology].wait_exit(Duration::from_secs(5));
    std::thread::sleep(Duration::from_secs(1));
    let mut join = p.stage("typology");
    join.wait_ready(Duration::from_secs(60));
    let r = finished_report(load, &out, || format!("join:\n{}", join.log()));
    let sent = n(&r, "sent");
    assert!(sent >= 2900, "{r}");
    assert_eq!(n(&r, "lost"), 0, "{r}");
    assert_eq!(n(&r, "decided") + n(&r, "dlq"), sent, "every transfer decided: {r}");
    assert_eq!(n(&r, "dlq"), 0, "{r}");
    // Every branch result the join held is released: its group has no lag left.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let describe = actio().args(["topics", "describe"]).arg(p.path()).args(["--brokers", &b]).output().unwrap();
        let text = String::from_utf8_lossy(&describe.stdout).into_owned();
        let line = text.lines().find(|l| l.contains(&format!("group {}", p.group("typology")))).unwrap_or_else(|| panic!("{text}")).to_string();
        if line.contains(" lag         0 ") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the join's group never caught up: {line}");
        std::thread::sleep(Duration::from_millis(500));
    }
    let partial = join.counter("actio_join_partial_total");
    eprintln!("join sigkilled: sent {sent}, duplicates {}, partial joins after the restart {partial}", n(&r, "duplicates"));
    // A branch result that comes after its transfer was emitted partial (its 200 ms
    // ran out, as on a loaded machine or a cold broker) is dropped by design; any
    // other drop would be one that came twice.
    let dropped = join.counter("actio_join_dropped_total");
    assert!(dropped <= partial, "{dropped} branch results dropped, more than the {partial} partial joins: one came twice: {r}");
    // Every transfer's debtor was looked up (or answered from the cache), none went on
    // without its risk.
    let risk = &stages[STAGES.iter().position(|s| *s == "risk").unwrap()];
    let (calls, hits) = (risk.counter("actio_enrich_calls_total"), risk.counter("actio_enrich_cache_hits_total"));
    assert!(calls > 0 && calls + hits >= sent, "calls {calls} + cache hits {hits} < {sent} sent");
    assert_eq!(risk.counter("actio_enrich_continued_total"), 0, "{}", risk.log());
}
