//! Fused services against a real Apache Kafka broker: the fraud chain's three stages
//! as one service (`[[service]]` in pipeline.toml, or `--stage rules,velocity,score`),
//! with the guarantees of separate stages — every transaction decided once in key
//! order, nothing lost to a SIGKILL, a graceful stop that commits exactly what was
//! consumed — and every fused stage's histograms.
//!
//! Like kafka.rs: they need `ACTIO_KAFKA_BROKERS` (set by `scripts/test`), and pass
//! saying so without it unless `ACTIO_REQUIRE_KAFKA=1`.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod support;
use support::*;

use std::time::Duration;

use actio_core::Bus;

const STAGES: [&str; 3] = ["rules", "velocity", "score"];

/// The test pipeline with its three stages declared as one service, `decide`.
fn with_decide_service(b: &str) -> TestPipeline {
    TestPipeline::new(b).edit("pipeline.toml", |t| format!("{t}\n[[service]]\nname = \"decide\"\nstages = [\"rules\", \"velocity\", \"score\"]\n"))
}

#[test]
fn a_fused_service_decides_every_transaction_once_in_order_and_commits_what_it_consumed() {
    let Some(b) = brokers("fused_service") else { return };
    let _serial = serial();
    let p = TestPipeline::new(&b);
    p.create_topics();
    let mut fused = p.stage("rules,velocity,score");
    fused.wait_ready(Duration::from_secs(60));

    let out = p.path().join("report");
    let run = p.loadgen(400, "5s", &out).output().unwrap();
    assert!(run.status.success(), "loadgen: {}", String::from_utf8_lossy(&run.stderr));
    let r = report(&out);
    let sent = n(&r, "sent");
    assert!(sent >= 1900, "{r}");
    assert_eq!(n(&r, "lost"), 0, "{r}");
    assert_eq!(n(&r, "duplicates"), 0, "{r}");
    assert_eq!(n(&r, "order_violations"), 0, "{r}");
    assert_eq!(n(&r, "decided"), sent, "{r}");
    // The trail has a hop per fused stage: each has its queue and process time.
    for s in STAGES {
        for hist in ["queue", "process"] {
            assert!(n(&r["stages"][s][hist], "count") >= sent, "{s}.{hist}: {r}");
        }
    }
    // Nothing went through the intermediate topics: the hand-off is in memory.
    for topic in ["ruled", "featured"] {
        assert_eq!(p.bus().end_offsets(&p.topic(topic)).unwrap().iter().sum::<i64>(), 0, "{topic}");
    }

    // /metrics: the service's own series, and a service histogram per fused stage.
    let (_, body) = fused.get("/metrics").unwrap();
    let service = "rules+velocity+score";
    let processed = body.lines().find(|l| l.starts_with(&format!("actio_stage_processed_total{{stage=\"{service}\"}}"))).unwrap_or_else(|| panic!("{body}"));
    assert!(processed.ends_with(&format!(" {sent}")), "{processed}, sent {sent}");
    for s in STAGES {
        let count = body
            .lines()
            .find(|l| l.starts_with(&format!("actio_stage_latency_seconds_count{{stage=\"{s}\",kind=\"service\"}}")))
            .unwrap_or_else(|| panic!("no service histogram for {s}:\n{body}"));
        assert!(count.ends_with(&format!(" {sent}")), "{count}, sent {sent}");
    }

    // SIGTERM: drain, commit, exit 0; the service's group committed the input's end.
    fused.signal("-TERM");
    let status = fused.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "exited {status}:\n{}", fused.log());
    let committed = p.bus().committed_offsets(&p.group(service), &p.topic("in")).unwrap();
    let ends = p.bus().end_offsets(&p.topic("in")).unwrap();
    assert_eq!(committed.len(), ends.len());
    for (c, e) in committed.iter().zip(&ends) {
        assert_eq!(*c, Some(*e), "committed {committed:?}, end offsets {ends:?}");
    }
    assert_eq!(ends.iter().sum::<i64>() as u64, sent);
}

#[test]
fn a_sigkilled_replica_of_a_declared_service_loses_nothing() {
    let Some(b) = brokers("fused_sigkill") else { return };
    let _serial = serial();
    let p = with_decide_service(&b);
    p.create_topics();
    let mut victim = p.stage("decide");
    victim.wait_ready(Duration::from_secs(60));
    let mut survivor = p.stage("decide");
    survivor.wait_ready(Duration::from_secs(60));

    let out = p.path().join("report");
    let load = p.loadgen(400, "8s", &out).spawn().unwrap();
    std::thread::sleep(Duration::from_secs(3));
    victim.signal("-KILL");
    let _ = victim.wait_exit(Duration::from_secs(5));
    let r = finished_report(load, &out, || format!("survivor:\n{}", survivor.log()));
    assert_eq!(n(&r, "lost"), 0, "{r}");
    assert_eq!(n(&r, "order_violations"), 0, "{r}");
    assert_eq!(n(&r, "decided") + n(&r, "dlq"), n(&r, "sent"), "{r}");
    assert!(n(&r, "duplicates") <= 10_000, "duplicates beyond max_in_flight: {r}");
    let (_, body) = survivor.get("/metrics").unwrap();
    assert!(body.lines().any(|l| l == "actio_stage_partitions{stage=\"decide\"} 4"), "the survivor took every partition:\n{body}");
    eprintln!("sigkilled fused replica: sent {} duplicates {}", n(&r, "sent"), n(&r, "duplicates"));
}
