//! The `actio` binary end to end: validate and run, as a user types them.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::path::PathBuf;
use std::process::Command;

use actio_testkit::{copy_of_fraud_with, fraud};

fn actio() -> Command {
    Command::new(env!("CARGO_BIN_EXE_actio"))
}

#[test]
fn validate_accepts_the_shipped_pipeline() {
    let out = actio().arg("validate").arg(fraud()).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("is valid") && stdout.contains("36 rules") && stdout.contains("15 rules"), "{stdout}");
}

#[test]
fn validate_rejects_a_broken_copy_with_exit_code_2() {
    let dir = copy_of_fraud_with("pipeline.toml", |t| t.replace("input = \"tx.ruled\"", "input = \"tx.nowhere\""));
    let out = actio().arg("validate").arg(dir.path()).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("pipeline.toml:") && stderr.contains("stage[1].input") && stderr.contains("tx.nowhere"), "{stderr}");
}

#[test]
fn validate_json_lists_the_environment_variables_the_templates_read() {
    let out = actio().args(["validate", "--json"]).arg(actio_testkit::pipeline("transfers")).env_remove("TRANSFERS_RISK_API").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let p: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(p["env"], serde_json::json!(["TRANSFERS_RISK_API"]), "read, though unset (its default holds)");
    let p: serde_json::Value = serde_json::from_slice(&actio().args(["validate", "--json"]).arg(fraud()).output().unwrap().stdout).unwrap();
    assert_eq!(p["env"], serde_json::json!([]));
    // Without a default, an unset variable is a load error that names it and the field.
    let dir = actio_testkit::copy_of("transfers");
    let toml = dir.path().join("pipeline.toml");
    let text = std::fs::read_to_string(&toml).unwrap().replace("{env.TRANSFERS_RISK_API:-http://127.0.0.1:18099}", "{env.ACTIO_TEST_UNSET_API}");
    std::fs::write(&toml, text).unwrap();
    let out = actio().arg("validate").arg(dir.path()).env_remove("ACTIO_TEST_UNSET_API").output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("url") && stderr.contains("ACTIO_TEST_UNSET_API is not set"), "{stderr}");
    let out = actio().arg("validate").arg(dir.path()).env("ACTIO_TEST_UNSET_API", "http://risk.internal").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn validate_json_prints_the_pipeline_with_defaults_applied() {
    let out = actio().args(["validate", "--json"]).arg(fraud()).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let p: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(p["name"], "fraud");
    let stages = p["stages"].as_array().unwrap();
    let names: Vec<&str> = stages.iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["rules", "velocity", "score"]);
    for s in stages {
        let name = s["name"].as_str().unwrap();
        assert_eq!(s["group"], format!("fraud.{name}"), "{s}");
        assert_eq!(s["retry_group"], format!("fraud.{name}.retry"), "{s}");
        assert_eq!(s["retry_topic"], format!("tx.retry.{name}"), "{s}");
        assert_eq!(s["replicas"], 2, "{s}");
        // Not in [[stage]]: from [defaults].
        assert_eq!(s["drain_timeout_ms"], 10000, "{s}");
        assert_eq!(s["max_in_flight_per_partition"], 10000, "{s}");
        assert_eq!(s["budget_ms"], 5.0, "{s}");
    }
    assert_eq!(stages[0]["kind"], "rules");
    assert_eq!(stages[0]["input"], "tx.in");
    let ingress = &p["topics"][0];
    assert_eq!(ingress, &serde_json::json!({"name": "tx.in", "partitions": 3, "codec": "json", "role": "ingress"}));
    assert_eq!(p["outcomes"], serde_json::json!(["approve", "review", "decline"]));

    let dir = copy_of_fraud_with("pipeline.toml", |t| t.replace("input = \"tx.ruled\"", "input = \"tx.nowhere\""));
    let out = actio().args(["validate", "--json"]).arg(dir.path()).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(out.stdout.is_empty(), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(stderr.contains("tx.nowhere"), "{stderr}");
}

#[test]
fn run_drives_the_pipeline_and_writes_the_report() {
    let out_dir = tempfile::tempdir().unwrap();
    let out = actio()
        .args(["run", fraud().to_str().unwrap(), "--trail", "--rate", "2000", "--duration", "2s", "--out"])
        .arg(out_dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("lost 0") && stdout.contains("e2e"), "{stdout}");
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out_dir.path().join("report.json")).unwrap()).unwrap();
    assert_eq!(report["sent"], 4000);
    assert_eq!(report["lost"], 0);
    assert_eq!(report["duplicates"], 0);
    assert_eq!(report["order_violations"], 0);
    assert_eq!(report["decided"].as_u64().unwrap() + report["dlq"].as_u64().unwrap(), 4000);
    for stage in ["rules", "velocity", "score"] {
        for part in ["queue", "service", "stage"] {
            assert_eq!(report["stages"][stage][part]["count"].as_u64(), Some(4000), "{stage}.{part}");
        }
    }
    assert!(report["e2e"]["p99_us"].as_u64().unwrap() > 0);
    for f in ["report.html", "e2e.hgrm", "rules.queue.hgrm", "score.stage.hgrm"] {
        assert!(out_dir.path().join(f).is_file(), "{f}");
    }
    // The decision trail: one record per transaction, read back by `actio trail`.
    let db = out_dir.path().join("trail.db");
    assert!(stdout.contains("trail: 4000 records in"), "{stdout}");
    let newest = actio().arg("trail").arg(&db).args(["--limit", "1", "--json"]).output().unwrap();
    assert!(newest.status.success(), "{}", String::from_utf8_lossy(&newest.stderr));
    let rec: serde_json::Value = serde_json::from_slice(&newest.stdout).unwrap();
    let id = rec["tx_id"].as_str().unwrap();
    assert_eq!(rec["hops"].as_array().unwrap().iter().map(|h| h["stage"].as_str().unwrap()).collect::<Vec<_>>(), ["rules", "velocity", "score"], "{rec}");
    let one = actio().arg("trail").arg(&db).arg(id).output().unwrap();
    let text = String::from_utf8_lossy(&one.stdout);
    assert!(one.status.success() && text.contains(&format!("transaction {id}")) && text.contains("versions  rules rules@"), "{text}");
    let missing = actio().arg("trail").arg(&db).arg("no-such-tx").output().unwrap();
    assert_eq!(missing.status.code(), Some(1), "{}", String::from_utf8_lossy(&missing.stderr));
    let declined = actio().arg("trail").arg(&db).args(["--outcome", "decline", "--limit", "1000", "--json"]).output().unwrap();
    let n = String::from_utf8_lossy(&declined.stdout).lines().count() as u64;
    assert_eq!(n, report["decisions"]["decline"].as_u64().unwrap_or(0).min(1000), "the query finds what the report counts");
}

#[test]
fn bad_flags_teach() {
    let out = actio().args(["run", "pipelines/fraud", "--rate", "lots"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--rate"));
    let out = actio().args(["run", "/nonexistent/pipeline"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read"));
}

/// Every shipped pipeline (`pipelines/*` with a pipeline.toml).
fn pipelines() -> Vec<PathBuf> {
    let mut all: Vec<PathBuf> = std::fs::read_dir(actio_testkit::repo().join("pipelines"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("pipeline.toml").is_file())
        .collect();
    all.sort();
    assert!(all.len() >= 2, "{all:?}");
    all
}

#[test]
fn every_shipped_pipeline_validates() {
    for p in pipelines() {
        let out = actio().arg("validate").arg(&p).output().unwrap();
        assert!(out.status.success(), "{}: {}", p.display(), String::from_utf8_lossy(&out.stderr));
    }
}

#[test]
fn every_shipped_load_scenario_runs_without_loss() {
    let mut ran = 0;
    for p in pipelines() {
        let mut scenarios: Vec<PathBuf> = std::fs::read_dir(p.join("scenarios"))
            .unwrap_or_else(|e| panic!("{}/scenarios: {e}", p.display()))
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "toml"))
            .collect();
        scenarios.sort();
        for s in scenarios {
            let out_dir = tempfile::tempdir().unwrap();
            let out = actio()
                .arg("run")
                .arg(&p)
                .args(["--rate", "1000", "--duration", "1s", "--scenario"])
                .arg(&s)
                .arg("--out")
                .arg(out_dir.path())
                .output()
                .unwrap();
            assert!(out.status.success(), "{}: {}", s.display(), String::from_utf8_lossy(&out.stderr));
            let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out_dir.path().join("report.json")).unwrap()).unwrap();
            assert_eq!(report["lost"], 0, "{}", s.display());
            assert_eq!(report["dlq"], 0, "{}: generated traffic fits the schema", s.display());
            assert_eq!(report["order_violations"], 0, "{}", s.display());
            ran += 1;
        }
    }
    assert!(ran >= 4, "{ran} scenarios");
}

#[test]
fn the_shipped_json_schemas_are_generated_from_schema_toml() {
    for p in pipelines() {
        for (file, record) in [("tx.schema.json", "tx"), ("decision.schema.json", "decision")] {
            let out = actio().arg("schema").arg(&p).args(["--record", record]).output().unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            let shipped = std::fs::read_to_string(p.join(file)).unwrap_or_default();
            assert!(
                shipped == String::from_utf8_lossy(&out.stdout),
                "{}/{file} drifted from schema.toml: run `cargo run --release -- schema {} --write`",
                p.display(),
                p.display()
            );
            let v: serde_json::Value = serde_json::from_str(&shipped).unwrap();
            assert_eq!(v["$schema"], "https://json-schema.org/draft/2020-12/schema");
        }
    }
}

#[test]
fn a_scenario_with_an_unknown_field_names_the_file_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "seed = 10\nzipf = 1.0\n").unwrap();
    let out = actio().args(["run", fraud().to_str().unwrap(), "--duration", "1s", "--scenario"]).arg(&bad).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("bad.toml") && stderr.contains("zipf"), "{stderr}");
}

#[test]
fn validate_checks_the_load_scenarios_against_the_schema() {
    let dir = copy_of_fraud_with("scenarios/hot-keys.toml", |t| format!("{t}\n[[field]]\nname = \"card_idx\"\ngen = \"const\"\nvalue = \"x\"\n"));
    let out = actio().arg("validate").arg(dir.path()).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("hot-keys.toml") && stderr.contains("card_idx"), "{stderr}");
}

#[test]
fn graph_prints_the_stages_and_topics_as_text_and_mermaid() {
    let transfers = actio_testkit::pipeline("transfers");
    let out = actio().arg("graph").arg(&transfers).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("5 stages; in: transfers.in; out: transfers.decisions"), "{stdout}");
    assert!(stdout.contains("screening (transfers.results), history (transfers.results) ──► typology (join)"), "{stdout}");
    let out = actio().args(["graph", "--mermaid"]).arg(&transfers).output().unwrap();
    let mermaid = String::from_utf8_lossy(&out.stdout);
    assert!(mermaid.starts_with("flowchart LR") && mermaid.contains("s_history -->|transfers.results| s_typology"), "{mermaid}");
    let broken = copy_of_fraud_with("pipeline.toml", |t| t.replace("kind = \"velocity\"", "kind = \"velocty\""));
    let out = actio().arg("graph").arg(broken.path()).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("stage[1].kind") && stderr.contains("unknown stage kind \"velocty\""), "{stderr}");
}

#[test]
fn run_drives_and_collects_every_flow_of_the_sensors_pipeline() {
    let out_dir = tempfile::tempdir().unwrap();
    let sensors = actio_testkit::pipeline("sensors");
    let out = actio().arg("run").arg(&sensors).args(["--rate", "2000", "--duration", "2s", "--out"]).arg(out_dir.path()).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out_dir.path().join("report.json")).unwrap()).unwrap();
    assert_eq!((r["sent"].as_u64(), r["lost"].as_u64(), r["duplicates"].as_u64(), r["order_violations"].as_u64()), (Some(4000), Some(0), Some(0), Some(0)), "{r}");
    // Two flows, each reading of one device in one of them: both ingress topics driven.
    let count = |s: &str| r["stages"][s]["service"]["count"].as_u64().unwrap();
    assert_eq!(count("check") + count("newest"), 4000, "{r}");
    assert!(count("check") > 1000 && count("newest") > 1000, "both flows got load: {r}");
    assert_eq!((count("file"), count("publish")), (count("check"), count("newest")));
    // Every egress topic collected: the history, the errors both flows file, the
    // latest state per site, and east's (no east_lastdata topic) in sensors.unrouted.
    let by = &r["by_egress"];
    let total: u64 = by.as_object().unwrap().values().map(|v| v.as_u64().unwrap()).sum();
    assert_eq!(total, 4000, "{by}");
    for topic in ["sensors.history", "sensors.errors", "north_lastdata", "south_lastdata", "sensors.unrouted"] {
        assert!(by[topic].as_u64().unwrap_or(0) > 0, "{topic}: {by}");
    }
    assert!(stdout.contains("delivered by egress topic"), "{stdout}");
}

/// Writes `text` to `path` the way editors save: a temporary file renamed over it.
fn save(path: &std::path::Path, text: &str) {
    let tmp = path.with_extension("swp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Runs a copy of fraud (`ordering` for every stage) for 8 s at 1,000 tx/s, saving
/// a new rules version at ~2.5 s, a broken rules file at ~4.5 s and a new model
/// version at ~6 s; the report and stderr.
fn run_with_edits(ordering: &str) -> (serde_json::Value, String) {
    let dir = match ordering {
        "key" => actio_testkit::copy_of("fraud"),
        _ => copy_of_fraud_with("pipeline.toml", |t| t.replace("ordering = \"key\"", &format!("ordering = \"{ordering}\""))),
    };
    let out_dir = tempfile::tempdir().unwrap();
    let child = actio()
        .args(["run", "--rate", "1000", "--duration", "8s", "--out"])
        .arg(out_dir.path())
        .arg(dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (rules, model) = (dir.path().join("rules.toml"), dir.path().join("model.toml"));
    let (rules_text, model_text) = (std::fs::read_to_string(&rules).unwrap(), std::fs::read_to_string(&model).unwrap());
    std::thread::sleep(std::time::Duration::from_millis(2500));
    let v2 = rules_text.replace("version = \"2026.11.1\"", "version = \"2026.12.1\"");
    save(&rules, &v2);
    std::thread::sleep(std::time::Duration::from_secs(2));
    save(&rules, &v2.replacen("when = \"", "when = \"tx.amount >> ", 1));
    std::thread::sleep(std::time::Duration::from_millis(1500));
    save(&model, &model_text.replace("version = \"fraud-lr-2026.11.1\"", "version = \"fraud-lr-2026.12.1\""));
    let out = child.wait_with_output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr).into_owned());
    assert!(out.status.success(), "{stdout}{stderr}");
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out_dir.path().join("report.json")).unwrap()).unwrap();
    assert_eq!(report["lost"], 0, "{stdout}");
    (report, stderr)
}

#[test]
fn edited_rules_and_model_reload_during_a_run_and_a_broken_edit_changes_nothing() {
    let (report, stderr) = run_with_edits("key");
    let versions: Vec<&String> = report["by_version"].as_object().unwrap().keys().collect();
    let v = |rules: &str, model: &str| format!("rules rules@{rules}+velocity@2026.11.1 model fraud-lr-{model}");
    let mut want = [v("2026.11.1", "2026.11.1"), v("2026.12.1", "2026.11.1"), v("2026.12.1", "2026.12.1")];
    want.sort();
    assert_eq!(versions, want.iter().collect::<Vec<_>>(), "three versions, the broken edit none: {report}");
    for (version, n) in report["by_version"].as_object().unwrap() {
        assert!(n.as_u64().unwrap() >= 500, "{version}: {n}");
    }
    assert_eq!(report["version_flips_back"], 0, "each key switches once per reload: {report}");
    assert!(stderr.contains("reload failed") && stderr.contains("rules.toml:"), "the broken edit is logged with its file and line:\n{stderr}");
}

#[test]
fn with_partition_order_each_partition_switches_once_per_reload() {
    let (report, _) = run_with_edits("partition");
    let switches = report["version_switches"].as_object().unwrap();
    assert_eq!(switches.len(), 3, "every egress partition switched: {report}");
    for (partition, n) in switches {
        assert_eq!(n, 2, "{partition}: once for the rules, once for the model: {report}");
    }
}
