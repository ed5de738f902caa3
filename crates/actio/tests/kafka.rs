//! The `actio` binary against a real Apache Kafka broker (never a mock): stages as
//! separate processes in their consumer groups, the load generator, topics, graceful
//! stop and a SIGKILLed replica.
//!
//! They read `ACTIO_KAFKA_BROKERS` (set by `scripts/test`, which starts the broker).
//! Without it they say so and pass, so a plain `cargo test` works anywhere — unless
//! `ACTIO_REQUIRE_KAFKA=1` (set by `scripts/test`), where a missing broker fails.
//! Each test runs its own copy of the fraud pipeline with unique topic and group
//! names, so tests never see each other's messages.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod support;
use support::*;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// Per partition of `topic`: the group's committed offset as Kafka's own
/// ConsumerGroupCommand reports it (outside our code), when its jars are at hand.
fn committed_by_kafka_tools(brokers: &str, group: &str, topic: &str) -> Option<Vec<(i64, i64)>> {
    let libs = std::env::var("ACTIO_KAFKA_LIBS").ok().filter(|l| Path::new(l).is_dir())?;
    let out = Command::new("java")
        .args(["-cp", &format!("{libs}/*"), "org.apache.kafka.tools.consumer.group.ConsumerGroupCommand"])
        .args(["--bootstrap-server", brokers, "--describe", "--group", group])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "ConsumerGroupCommand: {text}{}", String::from_utf8_lossy(&out.stderr));
    // GROUP TOPIC PARTITION CURRENT-OFFSET LOG-END-OFFSET LAG ...
    let mut rows: Vec<(i32, i64, i64)> = text
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|f| f.len() >= 6 && f[1] == topic)
        .map(|f| (f[2].parse().unwrap(), f[3].parse().unwrap_or(-1), f[4].parse().unwrap()))
        .collect();
    rows.sort();
    Some(rows.into_iter().map(|(_, c, e)| (c, e)).collect())
}

#[test]
fn three_stage_services_decide_every_transaction_once_in_order_and_stop_with_everything_committed() {
    let Some(b) = brokers("three_stage_services") else { return };
    let _serial = serial();
    let p = TestPipeline::new(&b);
    p.create_topics();
    let mut stages: Vec<(&str, StageProcess)> = ["rules", "velocity", "score"].into_iter().map(|s| (s, p.stage(s))).collect();
    for (_, s) in &mut stages {
        assert_eq!(s.get("/healthz").map(|r| r.0).or_else(|| {
            std::thread::sleep(Duration::from_millis(500));
            s.get("/healthz").map(|r| r.0)
        }), Some(200));
        s.wait_ready(Duration::from_secs(60));
    }

    let out = p.path().join("report");
    let run = p.loadgen(400, "5s", &out).output().unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "loadgen: {stderr}\n{}", String::from_utf8_lossy(&run.stdout));
    let r = report(&out);
    assert_eq!(r["bus"], "kafka");
    let sent = n(&r, "sent");
    assert!(sent >= 1900, "{r}");
    assert_eq!(n(&r, "lost"), 0, "{r}");
    assert_eq!(n(&r, "duplicates"), 0, "{r}");
    assert_eq!(n(&r, "order_violations"), 0, "{r}");
    assert_eq!(n(&r, "decided") + n(&r, "dlq"), sent, "{r}");
    assert!(n(&r, "decided") > 0, "{r}");
    // The trail headers give every stage a queue and a process time.
    for s in ["rules", "velocity", "score"] {
        for hist in ["queue", "process"] {
            assert!(n(&r["stages"][s][hist], "count") >= n(&r, "decided"), "{s}.{hist}: {r}");
        }
    }

    // Each service's metrics count what it processed.
    for (name, s) in &stages {
        let (code, body) = s.get("/metrics").unwrap();
        assert_eq!(code, 200);
        let line = body
            .lines()
            .find(|l| l.starts_with(&format!("actio_stage_processed_total{{stage=\"{name}\"}}")))
            .unwrap_or_else(|| panic!("{body}"));
        let processed: u64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(processed >= sent - n(&r, "dlq"), "{name}: {line}, sent {sent}");
        assert!(body.contains(&format!("actio_stage_lag{{stage=\"{name}\"}}")), "{body}");
    }

    // SIGTERM: drain, commit, exit 0; committed = end offset of the input, seen from
    // outside our code.
    for (_, s) in &stages {
        s.signal("-TERM");
    }
    for (name, s) in &mut stages {
        let status = s.wait_exit(Duration::from_secs(30));
        assert!(status.success(), "{name} exited {status}:\n{}", s.log());
    }
    for (stage, input) in [("rules", "in"), ("velocity", "ruled"), ("score", "featured")] {
        match committed_by_kafka_tools(&b, &p.group(stage), &p.topic(input)) {
            Some(rows) => {
                assert_eq!(rows.len(), 4, "{stage}: {rows:?}");
                let total: i64 = rows.iter().map(|r| r.1).sum();
                assert!(total >= sent as i64, "{stage}: {rows:?}");
                for (committed, end) in rows {
                    assert_eq!(committed, end, "{stage}: committed offset is the end offset");
                }
            }
            None => eprintln!("Java check skipped: ACTIO_KAFKA_LIBS not set"),
        }
    }
    let describe = actio().args(["topics", "describe"]).arg(p.path()).args(["--brokers", &b]).output().unwrap();
    let text = String::from_utf8_lossy(&describe.stdout);
    assert!(describe.status.success(), "{text}");
    for stage in ["rules", "velocity", "score"] {
        let line = text.lines().find(|l| l.contains(&format!("group {}", p.group(stage)))).unwrap_or_else(|| panic!("{text}"));
        assert!(line.contains(" lag         0 "), "{line}");
    }
}

#[test]
fn a_sigkilled_replica_hands_its_partitions_to_the_other_without_loss() {
    let Some(b) = brokers("sigkilled_replica") else { return };
    let _serial = serial();
    let p = TestPipeline::new(&b);
    p.create_topics();
    let mut victim = p.stage("rules");
    victim.wait_ready(Duration::from_secs(60));
    let mut others: Vec<StageProcess> = ["rules", "velocity", "score"].into_iter().map(|s| p.stage(s)).collect();
    for s in &mut others {
        s.wait_ready(Duration::from_secs(60));
    }
    // Both replicas hold partitions of the one input topic.
    for s in [&victim, &others[0]] {
        let (_, body) = s.get("/metrics").unwrap();
        let line = body.lines().find(|l| l.starts_with("actio_stage_partitions{")).unwrap().to_string();
        assert!(line.ends_with(" 2"), "4 partitions between 2 replicas: {line}");
    }

    let out = p.path().join("report");
    let load = p.loadgen(400, "8s", &out).spawn().unwrap();
    std::thread::sleep(Duration::from_secs(3));
    victim.signal("-KILL");
    let _ = victim.wait_exit(Duration::from_secs(5));
    let r = finished_report(load, &out, || format!("survivor:\n{}", others[0].log()));
    assert_eq!(n(&r, "lost"), 0, "{r}");
    assert_eq!(n(&r, "order_violations"), 0, "{r}");
    // Redelivered: at most what the killed replica held between watermark and head.
    assert!(n(&r, "duplicates") <= 10_000, "duplicates beyond max_in_flight: {r}");
    let (_, body) = others[0].get("/metrics").unwrap();
    assert!(body.lines().any(|l| l == "actio_stage_partitions{stage=\"rules\"} 4"), "the survivor took every partition:\n{body}");
    eprintln!("sigkilled replica: sent {} duplicates {}", n(&r, "sent"), n(&r, "duplicates"));
}

#[test]
fn run_with_the_kafka_bus_runs_every_stage_in_one_process() {
    let Some(b) = brokers("run_kafka_bus") else { return };
    let _serial = serial();
    run_on_kafka(TestPipeline::new(&b), &b);
}

#[test]
fn the_transfers_pipeline_runs_on_the_broker() {
    let Some(b) = brokers("transfers_on_kafka") else { return };
    let _serial = serial();
    run_on_kafka(TestPipeline::of("transfers", "transfers", &b), &b);
}

#[test]
fn the_sensors_pipeline_runs_every_flow_on_the_broker() {
    let Some(b) = brokers("sensors_on_kafka") else { return };
    let _serial = serial();
    run_on_kafka(TestPipeline::of("sensors", "sensors", &b), &b);
}

/// `actio run --bus kafka` of `p`: every transaction decided once, in key order.
fn run_on_kafka(p: TestPipeline, b: &str) {
    let out = p.path().join("report");
    let run = actio()
        .arg("run")
        .arg(p.path())
        .args(["--bus", "kafka", "--brokers", b, "--rate", "300", "--duration", "3s", "--drain", "60s"])
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}\n{}", String::from_utf8_lossy(&run.stdout));
    let r = report(&out);
    assert_eq!(r["bus"], "kafka");
    assert_eq!(n(&r, "lost"), 0, "{r}");
    assert_eq!(n(&r, "order_violations"), 0, "{r}");
    assert_eq!(n(&r, "decided") + n(&r, "dlq"), n(&r, "sent"), "{r}");
    assert_eq!(n(&r, "dlq"), 0, "generated traffic fits the schema: {r}");
}

#[test]
fn a_bad_librdkafka_property_in_the_pipeline_stops_the_stage_with_librdkafkas_message() {
    let Some(b) = brokers("bad_property") else { return };
    let _serial = serial();
    let p = TestPipeline::new(&b).edit("pipeline.toml", |t| {
        assert!(t.lines().any(|l| l.starts_with("\"linger.ms\" = ")), "the shipped [kafka] table sets linger.ms");
        t.lines()
            .map(|l| if l.starts_with("\"linger.ms\" = ") { "\"linger.ms\" = \"banana\"" } else { l })
            .collect::<Vec<_>>()
            .join("\n")
    });
    let out = actio().args(["stage", "--stage", "rules", "--brokers", &b]).arg("--pipeline").arg(p.path()).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("Invalid value") && stderr.contains("linger.ms"), "{stderr}");
}

#[test]
fn an_unknown_stage_is_a_configuration_error_naming_the_stages() {
    let out = actio().args(["stage", "--stage", "nope"]).arg("--pipeline").arg(fraud()).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("\"nope\"") && stderr.contains("rules, velocity, score"), "{stderr}");
}
