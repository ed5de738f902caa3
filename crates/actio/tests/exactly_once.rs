//! Exactly-once stages on a real Kafka broker: each stage SIGKILLed in turn under
//! load and restarted, and a `read_committed` collector (the load generator's, as
//! librdkafka reads by default) sees every transaction decided once — no loss, no
//! duplicate. The same drill at-least-once repeats what the killed stage had done
//! since its last commit (`reliability.rs`, RELIABILITY.md).
//!
//! Like `kafka.rs`: needs `ACTIO_KAFKA_BROKERS` (set by `scripts/test`), passes with a
//! note without it unless `ACTIO_REQUIRE_KAFKA=1`.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod support;
use support::*;

use std::time::Duration;

const STAGES: [&str; 3] = ["rules", "velocity", "score"];

fn exactly_once_copy(b: &str) -> TestPipeline {
    TestPipeline::new(b).edit("pipeline.toml", |t| t.replacen("[defaults]\n", "[defaults]\nexactly_once = true\n", 1))
}

#[test]
fn each_stage_sigkilled_in_turn_and_restarted_loses_and_repeats_nothing() {
    let Some(b) = brokers("exactly_once_sigkill") else { return };
    let _serial = serial();
    let p = exactly_once_copy(&b);
    p.create_topics();
    // Each replica keeps its name across the restart: the new one's producer fences
    // the dead one's open transaction at once.
    let id = |s: &str| format!("{s}-0");
    let mut stages: Vec<StageProcess> = STAGES.iter().map(|s| p.stage_with(s, &["--instance-id", &id(s)])).collect();
    for s in &mut stages {
        s.wait_ready(Duration::from_secs(60));
    }
    assert!(stages[0].log().contains("exactly-once"), "{}", stages[0].log());

    let out = p.path().join("report");
    let load = p.loadgen(300, "16s", &out).spawn().unwrap();
    for (i, name) in STAGES.iter().enumerate() {
        std::thread::sleep(Duration::from_secs(4));
        stages[i].signal("-KILL");
        let _ = stages[i].wait_exit(Duration::from_secs(5));
        stages[i] = p.stage_with(name, &["--instance-id", &id(name)]);
    }
    let r = finished_report(load, &out, || stages.iter().map(|s| s.log()).collect::<Vec<_>>().join("\n----\n"));
    let sent = n(&r, "sent");
    assert!(sent >= 4000, "{r}");
    assert_eq!(n(&r, "lost"), 0, "{r}");
    assert_eq!(n(&r, "duplicates"), 0, "a read_committed reader sees each decision once: {r}");
    assert_eq!(n(&r, "order_violations"), 0, "{r}");
    assert_eq!(n(&r, "decided") + n(&r, "dlq"), sent, "{r}");
    for s in &stages {
        assert!(s.counter("actio_stage_transaction_commit_seconds_count") > 0, "{}", s.log());
    }
    eprintln!("exactly-once drill: sent {sent}, e2e p99 {} µs, max {} µs", n(&r["e2e"], "p99_us"), n(&r["e2e"], "max_us"));
}
