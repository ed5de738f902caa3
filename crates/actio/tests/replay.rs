//! `actio replay`, end to end and embedded: a live run records its traffic and its
//! trail; the unchanged pipeline replayed over that traffic differs in nothing (so
//! every velocity window was rebuilt as live), and a copy with one threshold moved
//! changes exactly the transactions the recorded scores say it must. On a real
//! broker: the traffic read back from the ingress topic's time range.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod support;
use support::*;

use std::path::Path;

fn replay(pipeline: &Path, input: &Path, versus: &[&str], out: &Path) -> serde_json::Value {
    let mut args = vec!["--input", input.to_str().unwrap()];
    args.extend(versus);
    replay_with(pipeline, &args, out)
}

fn replay_with(pipeline: &Path, args: &[&str], out: &Path) -> serde_json::Value {
    let o = actio().arg("replay").arg(pipeline).args(args).arg("--json").arg("--out").arg(out).env("RUST_LOG", "warn").output().unwrap();
    assert!(o.status.success(), "{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(out.join("diff.html").is_file() && out.join("diff.json").is_file());
    v
}

fn moved(diff: &serde_json::Value) -> Vec<(String, String, u64)> {
    diff["transitions"].as_array().unwrap().iter().filter(|t| t["from"] != t["to"]).map(|t| (t["from"].as_str().unwrap().into(), t["to"].as_str().unwrap().into(), t["count"].as_u64().unwrap())).collect()
}

#[test]
fn replay_of_the_same_pipeline_differs_in_nothing_and_a_moved_threshold_in_exactly_its_band() {
    let live = tempfile::tempdir().unwrap();
    let run = actio()
        .args(["run", fraud().to_str().unwrap(), "--trail", "--record-traffic", "--no-watch", "--rate", "3000", "--duration", "4s", "--out"])
        .arg(live.path())
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let (traffic, trail) = (live.path().join("traffic.jsonl"), live.path().join("trail.db"));
    assert_eq!(std::fs::read_to_string(&traffic).unwrap().lines().count(), 12_000);

    let same = replay(&fraud(), &traffic, &["--against", trail.to_str().unwrap()], &live.path().join("same"));
    let d = &same["diff"];
    assert_eq!((n(d, "compared"), n(d, "differing"), n(d, "only_recorded"), n(d, "only_replayed")), (12_000, 0, 0, 0), "{d:#}");

    // The review threshold from 0.55 to 0.5: exactly the recorded approvals scored
    // in [0.5, 0.55) go to review, nothing else moves.
    let edited = copy_of_fraud_with("model.toml", |t| t.replace("review = 0.55", "review = 0.5"));
    let all = actio().arg("trail").arg(&trail).args(["--limit", "100000", "--json"]).output().unwrap();
    let expected = String::from_utf8_lossy(&all.stdout)
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["outcome"] == "approve" && (0.5..0.55).contains(&r["score"].as_f64().unwrap()))
        .count() as u64;
    assert!(expected > 0, "the band holds some approvals at this size");
    let moved_band = replay(edited.path(), &traffic, &["--against", trail.to_str().unwrap()], &live.path().join("edited"));
    let d = &moved_band["diff"];
    assert_eq!(moved(d), [("approve".to_string(), "review".to_string(), expected)], "{d:#}");
    assert_eq!((n(d, "outcome_changed"), n(d, "differing"), n(d, "score_changed"), n(d, "hits_changed")), (expected, expected, 0, 0));

    // The same change measured against the shipped pipeline replayed, not a trail.
    let versus = replay(edited.path(), &traffic, &["--baseline", fraud().to_str().unwrap()], &live.path().join("baseline"));
    assert_eq!(moved(&versus["diff"]), moved(d));
}

#[test]
fn replay_errors_name_the_line_and_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"not\": \"a transaction\"}\n").unwrap();
    let db = dir.path().join("trail.db");
    std::fs::write(&db, "").unwrap();
    let o = actio().arg("replay").arg(fraud()).arg("--input").arg(&bad).arg("--baseline").arg(fraud()).env("RUST_LOG", "warn").output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("bad.jsonl:1"), "{err}");
    let o = actio().arg("replay").arg(fraud()).arg("--input").arg(&bad).output().unwrap();
    assert_eq!(o.status.code(), Some(2), "--against or --baseline is required");
    let o = actio().arg("replay").arg(fraud()).arg("--input").arg(dir.path().join("none.jsonl")).arg("--against").arg(&db).output().unwrap();
    assert!(o.status.code() == Some(2) && String::from_utf8_lossy(&o.stderr).contains("--record-traffic"));
}

/// The traffic straight from a Kafka topic: a run on the broker (all stages in
/// process, its trail in SQLite) leaves its transactions on the ingress topic; the
/// replay reads that topic's time range (no group, nothing committed) and differs in
/// nothing from the trail. A range with no record is an error that says so.
#[test]
fn replay_of_a_kafka_topic_time_range_matches_the_live_trail() {
    let Some(b) = brokers("replay_from_topic") else { return };
    let _serial = serial();
    let p = TestPipeline::new(&b);
    p.create_topics();
    let live = p.path().join("live");
    let before = humantime::format_rfc3339_seconds(std::time::SystemTime::now() - std::time::Duration::from_secs(1)).to_string();
    let run = actio()
        .args(["run", p.path().to_str().unwrap(), "--bus", "kafka", "--brokers", &b, "--trail", "--no-watch", "--rate", "1000", "--duration", "4s", "--out"])
        .arg(&live)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let trail = live.join("trail.db");
    let out = p.path().join("replayed");
    let topic = p.topic("in");
    let v = replay_with(p.path(), &["--topic", &topic, "--brokers", &b, "--since", &before, "--against", trail.to_str().unwrap()], &out);
    let d = &v["diff"];
    assert_eq!((n(d, "compared"), n(d, "differing"), n(d, "only_recorded"), n(d, "only_replayed")), (4_000, 0, 0, 0), "{d:#}");
    assert_eq!(std::fs::read_to_string(out.join("traffic.jsonl")).unwrap().lines().count(), 4_000, "the range is kept as traffic.jsonl");

    let empty = p.path().join("empty");
    let o = actio()
        .args(["replay", p.path().to_str().unwrap(), "--topic", &topic, "--brokers", &b, "--since", "2099-01-01T00:00:00Z", "--against", trail.to_str().unwrap(), "--out", empty.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("no record between 2099-01-01T00:00:00Z"), "{}", String::from_utf8_lossy(&o.stderr));
}

