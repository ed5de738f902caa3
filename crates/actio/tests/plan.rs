//! `actio plan`, end to end and embedded: it calibrates both shapes, plans a target,
//! verifies the chosen shape at that rate, and its figures are those of its runs;
//! runs it made can be planned from again (`--from`); bad input is refused with the
//! flag or the file at fault.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod support;
use support::*;

fn plan(args: &[&str]) -> std::process::Output {
    actio().arg("plan").arg(fraud()).args(args).env("RUST_LOG", "warn").output().unwrap()
}

#[test]
fn plan_calibrates_both_shapes_sizes_the_target_and_verifies_it() {
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().to_str().unwrap();
    let o = plan(&["--rate", "2000", "--p99", "50ms", "--calibrate-rates", "400,1500", "--calibrate-duration", "3s", "--verify", "--verify-duration", "4s", "--out", dir]);
    let (stdout, stderr) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "{stdout}{stderr}");
    assert!(stderr.contains("calibration run 4 of 4: fused, 1500 tx/s"), "progress is shown: {stderr}");
    assert!(stdout.contains("← chosen") && stdout.contains("verify:") && stdout.contains("e2e p99 ms"), "{stdout}");

    let p: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.path().join("plan.json")).unwrap()).unwrap();
    let considered = p["considered"].as_array().unwrap();
    let labels: Vec<&str> = considered.iter().map(|c| c["label"].as_str().unwrap()).collect();
    assert_eq!(labels, ["separate", "fused"]);
    assert!(labels.contains(&p["chosen"].as_str().unwrap()));
    for c in considered {
        let m = &c["model"];
        let rates: Vec<f64> = m["calibration"].as_array().unwrap().iter().map(|r| r["rate"].as_f64().unwrap()).collect();
        assert!((rates[0] - 400.0).abs() < 40.0 && (rates[1] - 1500.0).abs() < 150.0, "calibrated at the rates asked: {rates:?}");
        assert_eq!(m["quantum_fitted"], true);
        for s in m["services"].as_array().unwrap() {
            assert!(s["cpu"]["per_tx_us"].as_f64().unwrap() > 0.0, "every service costs CPU: {s}");
        }
        // Far below capacity: one replica each, holding the target.
        let d = &c["deployment"];
        assert!(d["services"].as_array().unwrap().iter().all(|s| s["replicas"] == 1), "{d}");
        assert_eq!(d["meets_target"], true, "{d}");
    }
    let services: Vec<&str> = considered[0]["deployment"]["services"].as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(services, ["rules", "velocity", "score"]);
    assert_eq!(considered[1]["deployment"]["services"][0]["name"], "rules+velocity+score");
    assert_eq!(p["partitions"][0]["topic"], "tx.in");

    // The verifying run is a real run at the target, and the prediction is of it.
    let v = &p["verify"];
    let measured = v["measured_rate"].as_f64().unwrap();
    assert!((measured - 2000.0).abs() < 200.0, "{v}");
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.path().join("verify/report.json")).unwrap()).unwrap();
    assert_eq!(report["lost"], 0);
    let (reported, read) = (report["e2e"]["p99_us"].as_f64().unwrap(), v["measured_p99_us"].as_f64().unwrap());
    assert!((reported - read).abs() <= reported * 0.05 + 50.0, "the measured p99 is the run's: {read} vs {reported}");
    let (pc, mc) = (v["predicted_cores"].as_f64().unwrap(), v["measured_cores"].as_f64().unwrap());
    assert!(pc > 0.0 && mc > 0.0 && pc / mc < 3.0 && mc / pc < 3.0, "the CPU predicted is of the order measured: {pc} vs {mc}");

    // The runs it made plan again without running anything.
    let from: Vec<String> = std::fs::read_dir(out.path().join("calibration")).unwrap().map(|e| e.unwrap().path().to_str().unwrap().to_string()).collect();
    let again_out = out.path().join("again");
    let mut args = vec!["--rate", "4000", "--p99", "50ms", "--json", "--out", again_out.to_str().unwrap(), "--from"];
    args.extend(from.iter().map(String::as_str));
    let again = plan(&args);
    assert!(again.status.success(), "{}", String::from_utf8_lossy(&again.stderr));
    let q: serde_json::Value = serde_json::from_slice(&again.stdout).unwrap();
    let cores = |p: &serde_json::Value, i: usize| p["considered"][i]["deployment"]["cores"].as_f64().unwrap();
    assert!(cores(&q, 0) > cores(&p, 0) && cores(&q, 1) > cores(&p, 1), "twice the rate, more CPU");
    assert!(q["verify"].is_null());
}

#[test]
fn plan_refuses_bad_input_naming_the_flag_or_the_file() {
    let o = plan(&["--rate", "3000", "--p99", "35ms", "--max-utilization", "1.5"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--max-utilization 1.5"), "{}", String::from_utf8_lossy(&o.stderr));

    let o = plan(&["--rate", "3000", "--p99", "35ms", "--calibrate-rates", "5000,1000"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--calibrate-rates"));

    let empty = tempfile::tempdir().unwrap();
    let o = plan(&["--rate", "3000", "--p99", "35ms", "--from", empty.path().to_str().unwrap()]);
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains(&empty.path().join("report.json").display().to_string()), "names the file: {e}");
}
