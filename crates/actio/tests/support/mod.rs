//! What the broker tests share: a private copy of the fraud pipeline per test (own
//! name, topics and groups), `actio stage` processes with their HTTP endpoint and
//! signals, the load generator and its report.
//!
//! Tests read `ACTIO_KAFKA_BROKERS` (set by `scripts/test`, which starts the broker) and
//! skip without it, unless `ACTIO_REQUIRE_KAFKA=1` (also set by `scripts/test`), where a
//! missing broker fails.
#![allow(dead_code)] // each test binary uses a part
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use actio_bus_kafka::{KafkaBus, KafkaConfig};
#[allow(unused_imports)] // each test binary uses a part
pub use actio_testkit::{brokers, copy_of_fraud_with, fraud};

/// One broker test at a time (see kafka.rs: parallel multi-process tests on 2 cores
/// starve the broker, a fault these tests do not mean to inject).
pub static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub fn actio() -> Command {
    Command::new(env!("CARGO_BIN_EXE_actio"))
}

pub fn nanos() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 & 0xffff_ffff_ffff
}

/// A port free now, for a stage's `--http`, taken below Linux's ephemeral range
/// (32768–60999). A port the OS hands out for `:0` comes from that range, and an
/// outgoing connection (another stage's Kafka client) can take it as its source
/// port before the stage binds it: "Address already in use", seen with four stages
/// starting at once.
pub fn free_port() -> u16 {
    let mut seed = nanos() ^ u64::from(std::process::id()) << 20;
    loop {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let port = 20_000 + (seed >> 33) as u16 % 12_000;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// A private copy of the fraud pipeline with its own name, topics and groups
/// (4 partitions each), as in kafka.rs.
pub struct TestPipeline {
    pub dir: tempfile::TempDir,
    pub name: String,
    pub brokers: String,
}

impl TestPipeline {
    pub fn new(brokers: &str) -> Self {
        Self::of("fraud", "tx", brokers)
    }

    /// A private copy of the shipped pipeline `pipeline`, whose topics are named
    /// `<topic_prefix>.<suffix>`.
    pub fn of(pipeline: &str, topic_prefix: &str, brokers: &str) -> Self {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let seq = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("t{:x}-{}-{seq}", nanos(), std::process::id());
        let dir = actio_testkit::copy_of(pipeline);
        let p = dir.path().join("pipeline.toml");
        let text = std::fs::read_to_string(&p).unwrap();
        let edited = text
            .replace(&format!("name = \"{pipeline}\""), &format!("name = \"{name}\""))
            .replace(&format!("\"{topic_prefix}."), &format!("\"{name}."))
            .replace("partitions = 3", "partitions = 4");
        assert_ne!(edited, text);
        std::fs::write(&p, edited).unwrap();
        TestPipeline { dir, name, brokers: brokers.to_string() }
    }

    /// Applies `edit` to one of the pipeline's files.
    pub fn edit(self, file: &str, edit: impl Fn(String) -> String) -> Self {
        let p = self.dir.path().join(file);
        let text = std::fs::read_to_string(&p).unwrap();
        std::fs::write(&p, edit(text)).unwrap();
        self
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn topic(&self, suffix: &str) -> String {
        format!("{}.{suffix}", self.name)
    }

    pub fn create_topics(&self) {
        let out = actio().args(["topics", "create"]).arg(self.path()).args(["--brokers", &self.brokers]).output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "topics create: {stdout}{}", String::from_utf8_lossy(&out.stderr));
        let declared = std::fs::read_to_string(self.path().join("pipeline.toml")).unwrap().matches("[[topic]]").count();
        assert_eq!(stdout.matches(" ok").count(), declared, "{stdout}");
    }

    /// The consumer group of a stage.
    pub fn group(&self, stage: &str) -> String {
        format!("{}.{stage}", self.name)
    }

    pub fn stage(&self, stage: &str) -> StageProcess {
        self.stage_with(stage, &[])
    }

    /// A stage service with more flags.
    pub fn stage_with(&self, stage: &str, flags: &[&str]) -> StageProcess {
        let port = free_port();
        let log = self.path().join(format!("{stage}-{port}.log"));
        let child = actio()
            .args(["stage", "--stage", stage, "--brokers", &self.brokers, "--http", &format!("127.0.0.1:{port}"), "--grace", "20s"])
            .args(flags)
            .arg("--pipeline")
            .arg(self.path())
            .env("RUST_LOG", "warn,actio=info,actio_runtime=info,actio_pipeline::reload=info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        StageProcess { child, port, log }
    }

    pub fn chain(&self) -> Vec<StageProcess> {
        let mut stages: Vec<StageProcess> = ["rules", "velocity", "score"].into_iter().map(|s| self.stage(s)).collect();
        for s in &mut stages {
            s.wait_ready(Duration::from_secs(60));
        }
        stages
    }

    pub fn loadgen(&self, rate: u32, duration: &str, out: &Path) -> Command {
        let mut c = actio();
        c.args(["loadgen", "--brokers", &self.brokers, "--rate", &rate.to_string(), "--duration", duration, "--drain", "90s"])
            .arg("--pipeline")
            .arg(self.path())
            .arg("--out")
            .arg(out)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        c
    }

    pub fn bus(&self) -> KafkaBus {
        KafkaBus::new(KafkaConfig::new(self.brokers.clone())).unwrap()
    }
}

/// A stage service; killed when dropped.
pub struct StageProcess {
    pub child: Child,
    pub port: u16,
    pub log: PathBuf,
}

impl StageProcess {
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn get(&self, path: &str) -> Option<(u16, String)> {
        http_get(self.port, path)
    }

    pub fn wait_ready(&mut self, within: Duration) {
        let t0 = Instant::now();
        while t0.elapsed() < within {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("stage exited ({status}) before ready:\n{}", self.log());
            }
            if http_get(self.port, "/readyz").is_some_and(|(code, _)| code == 200) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("stage on port {} not ready within {within:?}:\n{}", self.port, self.log());
    }

    /// A counter or gauge of the stage's /metrics, e.g.
    /// `actio_stage_dead_lettered_total`, summed over its label sets (per rule, per
    /// file); the exposition is read with a Prometheus text-format parser.
    pub fn counter(&self, name: &str) -> u64 {
        let (_, body) = http_get(self.port, "/metrics").unwrap();
        let samples = metric_samples(&body, name);
        assert!(!samples.is_empty(), "no {name}:\n{body}");
        samples.iter().map(|(_, v)| *v).sum::<f64>() as u64
    }

    /// The stage's /metrics, parsed.
    pub fn scrape(&self) -> prometheus_parse::Scrape {
        let (_, body) = http_get(self.port, "/metrics").unwrap();
        parse_metrics(&body)
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill").args([sig, &self.child.id().to_string()]).status().unwrap().success();
        assert!(ok, "kill {sig}");
    }

    pub fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let t0 = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(t0.elapsed() < within, "stage did not exit within {within:?}:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for StageProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A Prometheus text exposition, parsed (a panic if it does not parse).
pub fn parse_metrics(body: &str) -> prometheus_parse::Scrape {
    prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).unwrap_or_else(|e| panic!("/metrics does not parse: {e}\n{body}"))
}

/// The samples of counter or gauge `name`: labels and value.
pub fn metric_samples(body: &str, name: &str) -> Vec<(prometheus_parse::Labels, f64)> {
    parse_metrics(body)
        .samples
        .into_iter()
        .filter(|s| s.metric == name)
        .filter_map(|s| match s.value {
            prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Gauge(v) | prometheus_parse::Value::Untyped(v) => Some((s.labels, v)),
            _ => None,
        })
        .collect()
}

pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    http_request(port, "GET", path)
}

/// One HTTP/1.1 request without a body: status and body.
pub fn http_request(port: u16, method: &str, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Some((status, body))
}

/// Waits for a spawned `loadgen` (stderr piped, as [`TestPipeline::loadgen`] sets it),
/// asserts it exited 0 — its stderr and `context` in the message — and returns its
/// report.json.
pub fn finished_report(mut load: Child, out: &Path, context: impl FnOnce() -> String) -> serde_json::Value {
    let mut stderr = String::new();
    if let Some(mut e) = load.stderr.take() {
        e.read_to_string(&mut stderr).unwrap();
    }
    let status = load.wait().unwrap();
    assert!(status.success(), "loadgen exited {status}: {stderr}\n{}", context());
    report(out)
}

pub fn report(out: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap()
}

pub fn n(v: &serde_json::Value, field: &str) -> u64 {
    v[field].as_u64().unwrap_or_else(|| panic!("report.json has no integer {field}: {v}"))
}
