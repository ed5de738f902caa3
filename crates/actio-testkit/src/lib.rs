//! What actio's tests share, so each crate's tests do not carry their own copy: where
//! the repository and the shipped fraud pipeline are, a private copy of that pipeline
//! to edit, and the address of the Kafka broker `scripts/test` started.
//!
//! Only for tests (a dev-dependency): it panics on I/O errors, which there mean a
//! broken checkout, not a condition to handle.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests' helpers: a failure is a failed test

use std::path::{Path, PathBuf};

/// The repository's root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The shipped fraud pipeline's directory.
pub fn fraud() -> PathBuf {
    repo().join("pipelines/fraud")
}

/// A shipped pipeline's directory (`pipelines/<name>`).
pub fn pipeline(name: &str) -> PathBuf {
    repo().join("pipelines").join(name)
}

/// A copy of a shipped pipeline (its files, scenarios and golden cases) in a temporary
/// directory, removed when dropped.
pub fn copy_of(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&pipeline(name), dir.path());
    dir
}

/// A copy of the fraud pipeline.
pub fn copy_of_fraud() -> tempfile::TempDir {
    copy_of("fraud")
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// A copy of the fraud pipeline with `edit` applied to `file` (created empty if the
/// pipeline has none). Panics if the edit changes nothing: a test that meant to break
/// the copy would otherwise pass on the shipped files.
pub fn copy_of_fraud_with(file: &str, edit: impl Fn(String) -> String) -> tempfile::TempDir {
    let dir = copy_of_fraud();
    let p = dir.path().join(file);
    let text = std::fs::read_to_string(&p).unwrap_or_default();
    let edited = edit(text.clone());
    assert_ne!(edited, text, "the edit must change {file}");
    std::fs::write(&p, edited).unwrap();
    dir
}

/// The broker for tests that need Kafka: `ACTIO_KAFKA_BROKERS`, which `scripts/test`
/// sets after starting one. Without it the test is skipped (`None`, with a line on
/// stderr), unless `ACTIO_REQUIRE_KAFKA=1` (set by `scripts/test`): then it panics, so
/// a run that should have used the broker cannot pass by skipping.
pub fn brokers(test: &str) -> Option<String> {
    server(test, "ACTIO_KAFKA_BROKERS", "ACTIO_REQUIRE_KAFKA", "run scripts/test")
}

/// The PostgreSQL server for tests of the decision trail: `ACTIO_POSTGRES_URL`, which
/// `scripts/test` sets after `scripts/postgres start`; skipped or required as
/// [`brokers`] is, by `ACTIO_REQUIRE_POSTGRES`.
pub fn postgres(test: &str) -> Option<String> {
    server(test, "ACTIO_POSTGRES_URL", "ACTIO_REQUIRE_POSTGRES", "scripts/postgres start prints it")
}

/// A server's address from `var`: `None` (skip, with a line on stderr) when unset,
/// unless `require` is `1`, where a test that should have used it panics.
fn server(test: &str, var: &str, require: &str, how: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(v) if !v.trim().is_empty() => Some(v),
        _ if std::env::var(require).is_ok_and(|v| v == "1") => panic!("{test}: {require}=1 but {var} is not set ({how})"),
        _ => {
            eprintln!("{test}: skipped: {var} not set ({how})");
            None
        }
    }
}

/// A fresh, empty database named `name` on the PostgreSQL server at `url` (dropped
/// first if a run before left it); its URL.
pub fn fresh_database(url: &str, name: &str) -> String {
    let mut admin = postgres::Client::connect(url, postgres::NoTls).unwrap_or_else(|e| panic!("connecting to {url}: {e}"));
    admin.batch_execute(&format!("DROP DATABASE IF EXISTS {name}")).unwrap_or_else(|e| panic!("{e}"));
    admin.batch_execute(&format!("CREATE DATABASE {name}")).unwrap_or_else(|e| panic!("{e}"));
    let base = url.rsplit_once('/').map_or(url, |(b, _)| b);
    format!("{base}/{name}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_of_fraud_holds_its_files_and_an_edit_must_change_one() {
        let d = copy_of_fraud_with("pipeline.toml", |t| t.replace("name = \"fraud\"", "name = \"copy\""));
        assert!(std::fs::read_to_string(d.path().join("pipeline.toml")).unwrap().contains("name = \"copy\""));
        assert!(d.path().join("rules.toml").is_file());
        let same = std::panic::catch_unwind(|| copy_of_fraud_with("pipeline.toml", |t| t));
        assert!(same.is_err(), "an edit that changes nothing is refused");
    }
}

/// The account-risk HTTP API of `scripts/test-api`, a real server process on
/// 127.0.0.1 (any free port), killed when dropped.
#[derive(Debug)]
pub struct TestApi {
    child: std::process::Child,
    /// Its base URL, `http://127.0.0.1:<port>`.
    pub url: String,
}

impl TestApi {
    /// Starts it; each answer waits `latency_ms`.
    pub fn start(latency_ms: u64) -> TestApi {
        use std::io::BufRead;
        let mut child = std::process::Command::new(repo().join("scripts/test-api"))
            .args(["--port", "0", "--latency-ms", &latency_ms.to_string()])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("scripts/test-api (python3) starts");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let port = line.trim().strip_prefix("PORT=").unwrap_or_else(|| panic!("scripts/test-api printed {line:?}")).to_string();
        TestApi { child, url: format!("http://127.0.0.1:{port}") }
    }

    /// `POST /control` with this JSON (`{"down_for_ms": 10000}`, `{"latency_ms": 50}` …).
    pub fn control(&self, json: &str) {
        let (status, body) = self.request("POST", "/control", json);
        assert_eq!(status, 200, "control {json}: {body}");
    }

    /// `GET /stats`: requests, max_concurrent, by_status.
    pub fn stats(&self) -> serde_json::Value {
        let (_, body) = self.request("GET", "/stats", "");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("stats: {e}: {body}"))
    }

    /// One HTTP/1.1 request (std only): the status and the body.
    fn request(&self, method: &str, path: &str, body: &str) -> (u16, String) {
        use std::io::{Read, Write};
        let addr = self.url.trim_start_matches("http://");
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        write!(s, "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_string();
        (status, body)
    }
}

impl Drop for TestApi {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// actio's test OpenTelemetry Collector (`scripts/otelcol`: the collector's OTLP
/// receiver and file exporter, built from its Go modules), a real process on
/// 127.0.0.1 (a free port), killed when dropped. What it receives it writes as OTLP
/// JSON lines, which [`OtelCollector::spans`] reads.
#[derive(Debug)]
pub struct OtelCollector {
    child: std::process::Child,
    dir: tempfile::TempDir,
    /// Its OTLP/HTTP base URL, `http://127.0.0.1:<port>`.
    pub endpoint: String,
}

/// One span as the collector received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedSpan {
    /// `service.name` of the resource that sent it.
    pub service: String,
    /// Hex trace id.
    pub trace: String,
    /// Hex span id.
    pub span: String,
    /// Hex parent span id ("" for a root).
    pub parent: String,
    /// Its name.
    pub name: String,
}

impl OtelCollector {
    /// Starts the binary at `bin` (`scripts/otelcol path`).
    pub fn start(bin: &str) -> OtelCollector {
        let dir = tempfile::tempdir().expect("a temp dir");
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
            l.local_addr().expect("its address").port()
        };
        let config = format!(
            "receivers:\n  otlp:\n    protocols:\n      http:\n        endpoint: 127.0.0.1:{port}\n\
             exporters:\n  file:\n    path: {}\n    flush_interval: 100ms\n\
             service:\n  telemetry:\n    metrics:\n      level: none\n  pipelines:\n    traces:\n      receivers: [otlp]\n      exporters: [file]\n",
            dir.path().join("traces.jsonl").display()
        );
        let cfg = dir.path().join("config.yaml");
        std::fs::write(&cfg, config).expect("the collector's config");
        let log = std::fs::File::create(dir.path().join("collector.log")).expect("its log");
        let child = std::process::Command::new(bin)
            .arg(format!("--config=file:{}", cfg.display()))
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting the test collector {bin}: {e}"));
        let c = OtelCollector { child, dir, endpoint: format!("http://127.0.0.1:{port}") };
        let t0 = std::time::Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(t0.elapsed() < std::time::Duration::from_secs(30), "the collector did not listen on {port}:\n{}", c.log());
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        c
    }

    /// What it logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("collector.log")).unwrap_or_default()
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        let text = std::fs::read_to_string(self.dir.path().join("traces.jsonl")).unwrap_or_default();
        let mut out = Vec::new();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("the collector wrote {line:?}: {e}"));
            for rs in v["resourceSpans"].as_array().into_iter().flatten() {
                let service = rs["resource"]["attributes"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|a| a["key"] == "service.name")
                    .and_then(|a| a["value"]["stringValue"].as_str())
                    .unwrap_or_default()
                    .to_string();
                for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
                    for s in ss["spans"].as_array().into_iter().flatten() {
                        let f = |k: &str| s[k].as_str().unwrap_or_default().to_string();
                        out.push(ReceivedSpan { service: service.clone(), trace: f("traceId"), span: f("spanId"), parent: f("parentSpanId"), name: f("name") });
                    }
                }
            }
        }
        out
    }
}

impl Drop for OtelCollector {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
