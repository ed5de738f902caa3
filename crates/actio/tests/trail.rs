//! The decision trail in PostgreSQL, against a real server (`scripts/postgres`):
//! an embedded run at 3,000 tx/s through a 10 s database outage, and a stage service
//! on a real broker writing its trail and serving it on `GET /trail`.
//!
//! Needs `ACTIO_POSTGRES_URL` (set by `scripts/test`, which starts the server); passes
//! with a note without it unless `ACTIO_REQUIRE_POSTGRES=1` (also set by
//! `scripts/test`). The broker test also needs `ACTIO_KAFKA_BROKERS`, like kafka.rs.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod support;
use support::*;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A private PostgreSQL server of this test's own (its own port and data), so that
/// stopping it disturbs no other test; stopped when dropped.
struct PrivateServer {
    port: u16,
    state: tempfile::TempDir,
    url: String,
}

impl PrivateServer {
    fn script(port: u16, state: &Path) -> Command {
        let mut c = Command::new(actio_testkit::repo().join("scripts/postgres"));
        c.env("ACTIO_POSTGRES_PORT", port.to_string()).env("ACTIO_POSTGRES_STATE", state);
        c
    }

    fn start() -> Self {
        let state = tempfile::tempdir().unwrap();
        // PostgreSQL runs as its own user when the tests run as root.
        let _ = Command::new("chmod").arg("777").arg(state.path()).status();
        let port = free_port();
        let out = Self::script(port, state.path()).arg("start").stderr(Stdio::inherit()).output().unwrap();
        assert!(out.status.success(), "scripts/postgres start failed");
        let stdout = String::from_utf8(out.stdout).unwrap();
        let url = stdout.lines().find_map(|l| l.strip_prefix("ACTIO_POSTGRES_URL=")).unwrap().to_string();
        PrivateServer { port, state, url }
    }

    /// Stops the server for `secs` seconds, then starts it again (in the background).
    fn pause(&self, secs: u32) -> std::process::Child {
        Self::script(self.port, self.state.path()).args(["pause", &secs.to_string()]).stdout(Stdio::null()).spawn().unwrap()
    }
}

impl Drop for PrivateServer {
    fn drop(&mut self) {
        let _ = Self::script(self.port, self.state.path()).arg("stop").status();
    }
}

fn trail_count(location: &str, flags: &[&str]) -> u64 {
    let out = actio().args(["trail", location, "--count"]).args(flags).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

#[test]
fn a_run_at_3000_per_second_keeps_every_trail_record_through_a_10_s_outage() {
    if actio_testkit::postgres("trail_outage").is_none() {
        return;
    }
    let server = PrivateServer::start();
    let out_dir = tempfile::tempdir().unwrap();
    let run = actio()
        .args(["run", fraud().to_str().unwrap(), "--rate", "3000", "--duration", "20s", "--no-watch", "--record-traffic"])
        .arg(format!("--trail={}", server.url))
        .arg("--out")
        .arg(out_dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Down from 4 s to 14 s of the 20 s: ~30,000 records wait in the queue (100,000).
    std::thread::sleep(Duration::from_secs(4));
    let t0 = Instant::now();
    let mut pause = server.pause(10);
    let out = run.wait_with_output().unwrap();
    assert!(pause.wait().unwrap().success(), "scripts/postgres pause failed");
    assert!(t0.elapsed() >= Duration::from_secs(10), "the outage lasted 10 s");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}{stderr}");
    let report = report(out_dir.path());
    assert_eq!((n(&report, "sent"), n(&report, "lost"), n(&report, "duplicates"), n(&report, "dlq")), (60_000, 0, 0, 0), "no decision lost or changed by the outage");
    assert!(stdout.contains("trail: 60000 records in postgres://") && !stdout.contains("DROPPED"), "{stdout}");
    assert!(stderr.contains("writing a batch failed") && stderr.contains("answers again"), "the outage was seen and caught up:\n{stderr}");
    assert_eq!(trail_count(&server.url, &[]), 60_000, "one record per transaction");
    for (outcome, count) in report["decisions"].as_object().unwrap() {
        assert_eq!(trail_count(&server.url, &["--outcome", outcome]), count.as_u64().unwrap(), "{outcome}: the trail agrees with the decisions");
    }
    // Every decision made during the outage is the one the pipeline makes without
    // it: the recorded traffic replayed against the PostgreSQL trail differs in nothing.
    let replay = actio()
        .arg("replay")
        .arg(fraud())
        .arg("--input")
        .arg(out_dir.path().join("traffic.jsonl"))
        .args(["--against", &server.url, "--json", "--out"])
        .arg(out_dir.path().join("replay"))
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(replay.status.success(), "{}", String::from_utf8_lossy(&replay.stderr));
    let diff: serde_json::Value = serde_json::from_slice(&replay.stdout).unwrap();
    assert_eq!((n(&diff["diff"], "compared"), n(&diff["diff"], "differing")), (60_000, 0), "{:#}", diff["diff"]);
}

#[test]
fn a_stage_service_writes_its_trail_to_postgres_and_serves_it() {
    let Some(url) = actio_testkit::postgres("trail_service") else { return };
    let Some(b) = brokers("trail_service") else { return };
    let _serial = serial();
    let db = actio_testkit::fresh_database(&url, &format!("trail_service_{}", std::process::id()));
    let p = TestPipeline::new(&b);
    p.create_topics();
    let mut stages: Vec<StageProcess> = vec![p.stage("rules"), p.stage("velocity"), p.stage_with("score", &["--trail", &db])];
    for s in &mut stages {
        s.wait_ready(Duration::from_secs(60));
    }
    let out = tempfile::tempdir().unwrap();
    let load = p.loadgen(200, "3s", out.path()).spawn().unwrap();
    let report = finished_report(load, out.path(), || stages.iter().map(|s| s.log()).collect());
    assert_eq!(n(&report, "lost"), 0);
    let sent = n(&report, "sent");
    let score = &stages[2];
    // The writer's batches are 5 ms apart: give it a moment after the last decision.
    let t0 = Instant::now();
    while score.counter("actio_trail_queued") > 0 && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let written: u64 = metric_samples(&score.get("/metrics").unwrap().1, "actio_trail_records_total").iter().filter(|(l, _)| l.get("result") == Some("written")).map(|(_, v)| *v as u64).sum();
    assert!(written >= sent, "every decision's record written ({written} of {sent}; a redelivery writes one again)");
    assert_eq!(trail_count(&db, &[]), sent);

    let (code, body) = score.get("/trail?limit=1").unwrap();
    assert_eq!(code, 200, "{body}");
    let newest: serde_json::Value = serde_json::from_str(&body).unwrap();
    let id = newest[0]["tx_id"].as_str().unwrap().to_string();
    let (code, body) = score.get(&format!("/trail/{id}")).unwrap();
    assert_eq!(code, 200, "{body}");
    let one: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(one["tx_id"], id.as_str());
    let hops: Vec<&str> = one["hops"].as_array().unwrap().iter().map(|h| h["stage"].as_str().unwrap()).collect();
    assert_eq!(hops, ["rules", "velocity", "score"], "the hops of every service it passed: {one}");
    assert!(one["outcome"].is_string() && one["rules_version"].as_str().unwrap().contains("rules@"), "{one}");

    let declined = report["decisions"]["decline"].as_u64().unwrap_or(0);
    let (code, body) = score.get("/trail?outcome=decline&limit=1000").unwrap();
    assert_eq!(code, 200, "{body}");
    assert_eq!(serde_json::from_str::<serde_json::Value>(&body).unwrap().as_array().unwrap().len() as u64, declined.min(1000));
    assert_eq!(score.get("/trail/no-such-tx").unwrap().0, 404);
    let (code, body) = score.get("/trail?outcom=decline").unwrap();
    assert!(code == 400 && body.contains("outcom"), "an unknown filter is named: {code} {body}");
    let (code, body) = stages[0].get("/trail/x").unwrap();
    assert!(code == 404 && body.contains("--trail"), "a service without a trail says how to get one: {body}");
}
