//! The Kubernetes manifests (k8s/) against the binary and the pipeline they deploy.
//!
//! scripts/k8s-gen writes k8s/base/stages.json beside the Deployments it generates
//! (container args, env, ports, probes, per stage), and scripts/check-k8s fails when
//! the rendered YAML of any overlay says otherwise. This test closes the loop without a
//! YAML parser or a cluster: each stage's container args run through the real binary
//! (`--dry-run`), the probe paths and port are the ones `actio stage` serves, every
//! env var is one the binary reads, and the numbers taken from pipeline.toml are what
//! actio-pipeline resolves from it (so a pipeline edited without `scripts/k8s-gen`
//! fails here too).
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use actio_testkit::repo;
use serde_json::Value;

/// The env vars `actio stage` and `actio loadgen` read, besides ACTIO_KAFKA_PROPERTY_*.
const ENV_READ: [&str; 9] = [
    "ACTIO_TRAIL",
    "ACTIO_KAFKA_BROKERS",
    "ACTIO_HTTP",
    "ACTIO_GRACE",
    "ACTIO_LOG_FORMAT",
    "ACTIO_INSTANCE_ID",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "ACTIO_TRACE_RATIO",
    "RUST_LOG",
];
const PROPERTY_PREFIX: &str = "ACTIO_KAFKA_PROPERTY_";
const DEFAULT_HTTP: &str = "0.0.0.0:9400";

fn sidecar() -> Value {
    let path = repo().join("k8s/base/stages.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (run scripts/k8s-gen)", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn pipeline_dir(sc: &Value) -> PathBuf {
    repo().join(sc["pipeline_dir"].as_str().unwrap())
}

fn strs(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

/// `--flag value` or `--flag=value`.
fn flag_value<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    let prefix = format!("{flag}=");
    args.iter().enumerate().find_map(|(i, a)| {
        if a == flag {
            args.get(i + 1).map(String::as_str)
        } else {
            a.strip_prefix(&prefix)
        }
    })
}

/// The container's args with the in-image pipeline path replaced by the repo's.
fn local_args(args: &[String], mount: &str, local: &Path) -> Vec<String> {
    assert_eq!(flag_value(args, "--pipeline"), Some(mount), "{args:?}");
    args.iter()
        .map(|a| {
            if a == mount {
                local.to_str().unwrap().to_string()
            } else {
                a.clone()
            }
        })
        .collect()
}

/// `actio` with none of the caller's actio settings (scripts/test exports
/// ACTIO_KAFKA_BROKERS), then the container's env: literal values as they are,
/// ConfigMap and Secret values as the example stages.json gives for them.
fn actio_with_env(env: &Value) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_actio"));
    for (name, _) in std::env::vars() {
        if name.starts_with("ACTIO_") || name == "RUST_LOG" {
            cmd.env_remove(name);
        }
    }
    for e in env.as_array().unwrap() {
        let value = e
            .get("value")
            .or_else(|| e.get("example"))
            .and_then(Value::as_str)
            .unwrap();
        cmd.env(e["name"].as_str().unwrap(), value);
    }
    cmd
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn help(sub: &str) -> String {
    let out = actio_with_env(&Value::Array(vec![]))
        .args([sub, "--help"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    text(&out)
}

#[test]
fn every_stage_deployment_runs_its_args_through_the_binary() {
    let sc = sidecar();
    let mount = sc["mount_path"].as_str().unwrap();
    let local = pipeline_dir(&sc);
    let stages = sc["stages"].as_array().unwrap();
    assert!(!stages.is_empty());
    for s in stages {
        let c = &s["container"];
        let args = strs(&c["args"]);
        assert_eq!(args.first().map(String::as_str), Some("stage"), "{args:?}");
        assert_eq!(flag_value(&args, "--stage"), s["name"].as_str(), "{args:?}");
        let out = actio_with_env(&c["env"])
            .args(local_args(&args, mount, &local))
            .arg("--dry-run")
            .output()
            .unwrap();
        let all = text(&out);
        assert!(
            out.status.success(),
            "{}: {args:?} --dry-run: {all}",
            s["deployment"]
        );
        assert!(
            all.contains("dry run") && all.contains(s["group"].as_str().unwrap()),
            "{all}"
        );
    }
    // The dry run does check the stage: the same args with a stage that is not in
    // the pipeline are a configuration error.
    let s = &stages[0];
    let args: Vec<String> = local_args(&strs(&s["container"]["args"]), mount, &local)
        .into_iter()
        .map(|a| {
            if a == s["name"].as_str().unwrap() {
                "no-such-stage".to_string()
            } else {
                a
            }
        })
        .collect();
    let out = actio_with_env(&s["container"]["env"])
        .args(&args)
        .arg("--dry-run")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
}

#[test]
fn probes_and_ports_are_what_actio_stage_serves() {
    let sc = sidecar();
    let stage_help = help("stage");
    for path in ["/metrics", "/healthz", "/readyz"] {
        assert!(
            stage_help.contains(path),
            "`actio stage --help` does not mention {path}:\n{stage_help}"
        );
    }
    for s in sc["stages"].as_array().unwrap() {
        let c = &s["container"];
        let args = strs(&c["args"]);
        let from_env = c["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == "ACTIO_HTTP")
            .and_then(|e| e["value"].as_str());
        let http: SocketAddr = flag_value(&args, "--http")
            .or(from_env)
            .unwrap_or(DEFAULT_HTTP)
            .parse()
            .unwrap();
        assert!(
            http.ip().is_unspecified(),
            "{}: --http {http} is not reachable from the kubelet",
            s["deployment"]
        );
        let port_of = |port: &Value| -> u64 {
            if let Some(n) = port.as_u64() {
                return n;
            }
            let name = port.as_str().unwrap();
            let p = c["ports"]
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["name"] == name);
            p.unwrap_or_else(|| panic!("{}: no container port named {name}", s["deployment"]))["container_port"].as_u64().unwrap()
        };
        for (probe, path) in [
            ("startup", "/healthz"),
            ("liveness", "/healthz"),
            ("readiness", "/readyz"),
        ] {
            assert_eq!(c[probe]["path"], path, "{} {probe} probe", s["deployment"]);
            assert_eq!(
                port_of(&c[probe]["port"]),
                u64::from(http.port()),
                "{} {probe} probe port vs --http {http}",
                s["deployment"]
            );
        }
        assert_eq!(
            port_of(&s["service"]["target_port"]),
            u64::from(http.port()),
            "{} Service targetPort",
            s["deployment"]
        );
        assert_eq!(
            s["metrics_path"], "/metrics",
            "{} ServiceMonitor path",
            s["deployment"]
        );
    }
}

#[test]
fn every_env_var_is_one_the_binary_reads() {
    let sc = sidecar();
    let documented = format!("{}{}", help("stage"), help("loadgen"));
    let mut envs: Vec<(String, &Value)> = Vec::new();
    for s in sc["stages"].as_array().unwrap() {
        envs.extend(
            s["container"]["env"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| (s["deployment"].as_str().unwrap().to_string(), e)),
        );
    }
    envs.extend(
        sc["loadgen"]["env"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| ("loadgen".to_string(), e)),
    );
    assert!(!envs.is_empty());
    for (owner, e) in envs {
        let name = e["name"].as_str().unwrap();
        if let Some(suffix) = name.strip_prefix(PROPERTY_PREFIX) {
            assert!(
                !suffix.is_empty()
                    && suffix
                        .chars()
                        .all(|ch| ch.is_ascii_uppercase() || ch.is_ascii_digit() || ch == '_'),
                "{owner}: {name}"
            );
            assert!(
                documented.contains(PROPERTY_PREFIX),
                "the help does not mention {PROPERTY_PREFIX}<NAME>"
            );
            // A Secret key is named after the librdkafka property the variable sets.
            if e["from"] == "secret" {
                assert_eq!(
                    e["key"].as_str().unwrap(),
                    suffix.to_lowercase().replace('_', "."),
                    "{owner}: {name}"
                );
            }
        } else {
            assert!(
                ENV_READ.contains(&name),
                "{owner}: env {name} is not read by actio (it reads {ENV_READ:?} and {PROPERTY_PREFIX}*)"
            );
            assert!(
                documented.contains(name),
                "{owner}: env {name} is not in `actio stage --help` / `actio loadgen --help`"
            );
        }
    }
}

#[test]
fn manifests_agree_with_the_pipeline_as_actio_resolves_it() {
    let sc = sidecar();
    let stale = "k8s/ disagrees with the pipeline: run scripts/k8s-gen";
    let p = actio_pipeline::Pipeline::load(&pipeline_dir(&sc)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(sc["pipeline"], p.name.as_str(), "{stale}");
    let topics: Vec<(String, i64)> = sc["topics"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["name"].as_str().unwrap().to_string(),
                t["partitions"].as_i64().unwrap(),
            )
        })
        .collect();
    let want: Vec<(String, i64)> = p
        .topics
        .iter()
        .map(|t| (t.name.clone(), i64::from(t.partitions)))
        .collect();
    assert_eq!(topics, want, "{stale}");
    let stages = sc["stages"].as_array().unwrap();
    let names: Vec<&str> = stages.iter().map(|s| s["name"].as_str().unwrap()).collect();
    let want: Vec<&str> = p.stages.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, want, "{stale}");
    for (s, ps) in stages.iter().zip(&p.stages) {
        let d = &s["deployment"];
        let partitions = i64::from(p.topic(&ps.input).unwrap().partitions);
        assert_eq!(s["group"], ps.group.as_str(), "{d}: {stale}");
        assert_eq!(s["input"], ps.input.as_str(), "{d}: {stale}");
        assert_eq!(s["partitions"].as_i64(), Some(partitions), "{d}: {stale}");
        assert_eq!(
            s["replicas"].as_u64(),
            Some(u64::from(ps.replicas)),
            "{d}: {stale}"
        );
        let drain_ms = u64::try_from(ps.limits.drain_timeout.as_millis()).unwrap();
        assert_eq!(
            s["drain_timeout_ms"].as_u64(),
            Some(drain_ms),
            "{d}: {stale}"
        );
        assert_eq!(
            s["lag_threshold"].as_u64(),
            Some(ps.limits.max_in_flight_per_partition as u64),
            "{d}: {stale}"
        );
        let retry = ps.limits.retry.topic.as_ref().map(|t| serde_json::json!({"group": t.group, "topic": &*t.topic}));
        assert_eq!(s["retry"], retry.unwrap_or(Value::Null), "{d}: {stale}");
        // Autoscaling never past the input's partitions (more consumers sit idle).
        let (min, max) = (
            s["min_replicas"].as_i64().unwrap(),
            s["max_replicas"].as_i64().unwrap(),
        );
        assert!(
            1 <= min && min <= max && max <= partitions,
            "{d}: replicas {min}..={max}, {partitions} partitions"
        );
        // drain < --grace (drain, then commit and flush) < terminationGracePeriodSeconds.
        let grace = s["grace_seconds"].as_u64().unwrap();
        let args = strs(&s["container"]["args"]);
        assert_eq!(
            flag_value(&args, "--grace"),
            Some(format!("{grace}s").as_str()),
            "{d}"
        );
        assert!(
            grace * 1000 > drain_ms,
            "{d}: --grace {grace}s does not cover drain_timeout_ms {drain_ms}"
        );
        assert!(
            s["termination_grace_period_seconds"].as_u64().unwrap() > grace,
            "{d}: the kubelet kills before --grace ends"
        );
    }
}

#[test]
fn the_loadgen_job_uses_flags_the_binary_has() {
    let sc = sidecar();
    let args = strs(&sc["loadgen"]["args"]);
    assert_eq!(
        args.first().map(String::as_str),
        Some("loadgen"),
        "{args:?}"
    );
    assert_eq!(
        flag_value(&args, "--pipeline"),
        sc["mount_path"].as_str(),
        "{args:?}"
    );
    let loadgen_help = help("loadgen");
    for flag in args.iter().filter(|a| a.starts_with("--")) {
        let flag = flag.split('=').next().unwrap();
        assert!(
            loadgen_help.contains(flag),
            "`actio loadgen --help` has no {flag}:\n{loadgen_help}"
        );
    }
}

#[test]
fn the_image_holds_the_binary_and_the_pipelines_where_the_manifests_expect_them() {
    let sc = sidecar();
    let dockerfile = std::fs::read_to_string(repo().join("Dockerfile")).unwrap();
    // The manifests give args only: the image's entrypoint is the binary.
    assert!(
        dockerfile.contains(r#"ENTRYPOINT ["/usr/local/bin/actio"]"#),
        "{dockerfile}"
    );
    let mount = Path::new(sc["mount_path"].as_str().unwrap());
    let pipelines_root = mount.parent().unwrap().to_str().unwrap();
    assert!(
        dockerfile.contains(&format!("COPY pipelines/ {pipelines_root}/")),
        "the image does not hold the pipelines under {pipelines_root}"
    );
}

#[test]
fn a_declared_service_of_fused_stages_is_one_deployment_that_runs() {
    // A copy of the fraud pipeline whose three stages are one [[service]].
    let dir = actio_testkit::copy_of_fraud_with("pipeline.toml", |t| format!("{t}\n[[service]]\nname = \"decide\"\nstages = [\"rules\", \"velocity\", \"score\"]\n"));
    let out = tempfile::tempdir().unwrap();
    let generated = Command::new("python3")
        .arg(repo().join("scripts/k8s-gen"))
        .arg("--pipeline")
        .arg(dir.path())
        .arg("--out")
        .arg(out.path())
        .env("ACTIO_BIN", env!("CARGO_BIN_EXE_actio"))
        .output()
        .unwrap();
    assert!(generated.status.success(), "k8s-gen: {}", text(&generated));
    let sc: Value = serde_json::from_str(&std::fs::read_to_string(out.path().join("k8s/base/stages.json")).unwrap()).unwrap();
    let stages = sc["stages"].as_array().unwrap();
    assert_eq!(stages.len(), 1, "one Deployment for the service: {sc}");
    let s = &stages[0];
    assert_eq!((s["name"].as_str(), s["deployment"].as_str(), s["group"].as_str()), (Some("decide"), Some("fraud-decide"), Some("fraud.decide")), "{s}");
    let args = strs(&s["container"]["args"]);
    assert_eq!(flag_value(&args, "--stage"), Some("decide"), "{args:?}");
    let run = actio_with_env(&s["container"]["env"])
        .args(local_args(&args, sc["mount_path"].as_str().unwrap(), dir.path()))
        .arg("--dry-run")
        .output()
        .unwrap();
    let all = text(&run);
    assert!(run.status.success() && all.contains("service decide (3 stages fused: rules → velocity → score)") && all.contains("fraud.decide"), "{all}");
}
