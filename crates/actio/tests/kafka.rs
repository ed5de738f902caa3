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

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// One broker test at a time: each starts several processes, and on a 2-core machine
/// running them together starves the broker (its controller stalled for seconds,
/// consumer sessions expired) — a fault these tests do not mean to inject.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn brokers(test: &str) -> Option<String> {
    match std::env::var("ACTIO_KAFKA_BROKERS") {
        Ok(b) if !b.trim().is_empty() => Some(b),
        _ if std::env::var("ACTIO_REQUIRE_KAFKA").is_ok_and(|v| v == "1") => {
            panic!("{test}: ACTIO_REQUIRE_KAFKA=1 but ACTIO_KAFKA_BROKERS is not set")
        }
        _ => {
            eprintln!("{test}: skipped: ACTIO_KAFKA_BROKERS not set (run scripts/test)");
            None
        }
    }
}

fn actio() -> Command {
    Command::new(env!("CARGO_BIN_EXE_actio"))
}

fn fraud() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../pipelines/fraud")
}

/// A private copy of the fraud pipeline: its own name (so its own groups), its own
/// topics (`<name>.in`, …), 4 partitions each.
struct TestPipeline {
    dir: tempfile::TempDir,
    name: String,
    brokers: String,
}

impl TestPipeline {
    fn new(brokers: &str, edit: impl Fn(String) -> String) -> Self {
        let dir = tempfile::tempdir().unwrap();
        for e in std::fs::read_dir(fraud()).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_file() {
                std::fs::copy(e.path(), dir.path().join(e.file_name())).unwrap();
            }
        }
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let seq = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("t{:x}-{}-{seq}", nanos(), std::process::id());
        let p = dir.path().join("pipeline.toml");
        let text = std::fs::read_to_string(&p)
            .unwrap()
            .replace("name = \"fraud\"", &format!("name = \"{name}\""))
            .replace("\"tx.", &format!("\"{name}."))
            .replace("partitions = 12", "partitions = 4");
        std::fs::write(&p, edit(text)).unwrap();
        TestPipeline { dir, name, brokers: brokers.to_string() }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn topic(&self, suffix: &str) -> String {
        format!("{}.{suffix}", self.name)
    }

    fn group(&self, stage: &str) -> String {
        format!("{}.{stage}", self.name)
    }

    fn create_topics(&self) {
        let out = actio().args(["topics", "create"]).arg(self.path()).args(["--brokers", &self.brokers]).output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "topics create: {stdout}{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(stdout.matches(" ok").count(), 5, "{stdout}");
    }

    /// Starts `actio stage`; its log goes to `<dir>/<stage>-<port>.log`.
    fn stage(&self, stage: &str) -> StageProcess {
        let port = free_port();
        let log = self.path().join(format!("{stage}-{port}.log"));
        let child = actio()
            .args(["stage", "--stage", stage, "--brokers", &self.brokers, "--http", &format!("127.0.0.1:{port}")])
            .arg("--pipeline")
            .arg(self.path())
            .env("RUST_LOG", "warn,actio=info,actio_runtime=info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        StageProcess { child, port, log }
    }

    fn loadgen(&self, rate: u32, duration: &str, out: &Path) -> Command {
        let mut c = actio();
        c.args(["loadgen", "--brokers", &self.brokers, "--rate", &rate.to_string(), "--duration", duration, "--drain", "60s"])
            .arg("--pipeline")
            .arg(self.path())
            .arg("--out")
            .arg(out);
        c
    }
}

fn nanos() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 & 0xffff_ffff_ffff
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A stage service; killed when dropped (a failed test leaves no process behind).
struct StageProcess {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl StageProcess {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn get(&self, path: &str) -> Option<(u16, String)> {
        http_get(self.port, path)
    }

    fn wait_ready(&mut self, within: Duration) {
        let t0 = Instant::now();
        while t0.elapsed() < within {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("stage exited ({status}) before ready:\n{}", self.log());
            }
            if self.get("/readyz").is_some_and(|(code, _)| code == 200) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("stage on port {} not ready within {within:?}: {:?}\n{}", self.port, self.get("/readyz"), self.log());
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill").args([sig, &self.child.id().to_string()]).status().unwrap().success();
        assert!(ok, "kill {sig}");
    }

    fn wait_exit(&mut self, within: Duration) -> ExitStatus {
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

/// A plain HTTP/1.1 GET: (status, body), or None when nothing listens yet.
fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Some((status, body))
}

fn report(out: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap()
}

fn n(v: &serde_json::Value, field: &str) -> u64 {
    v[field].as_u64().unwrap_or_else(|| panic!("report.json has no integer {field}: {v}"))
}

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
    let p = TestPipeline::new(&b, |t| t);
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
    let p = TestPipeline::new(&b, |t| t);
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
    let mut load = p.loadgen(400, "8s", &out).stderr(Stdio::piped()).spawn().unwrap();
    std::thread::sleep(Duration::from_secs(3));
    victim.signal("-KILL");
    let _ = victim.wait_exit(Duration::from_secs(5));
    let mut stderr = String::new();
    load.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    let status = load.wait().unwrap();
    assert!(status.success(), "loadgen: {stderr}\nsurvivor:\n{}", others[0].log());
    let r = report(&out);
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
    let p = TestPipeline::new(&b, |t| t);
    let out = p.path().join("report");
    let run = actio()
        .arg("run")
        .arg(p.path())
        .args(["--bus", "kafka", "--brokers", &b, "--rate", "300", "--duration", "3s", "--drain", "60s"])
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
}

#[test]
fn a_bad_librdkafka_property_in_the_pipeline_stops_the_stage_with_librdkafkas_message() {
    let Some(b) = brokers("bad_property") else { return };
    let _serial = serial();
    let p = TestPipeline::new(&b, |t| t.replace("\"linger.ms\" = \"1\"", "\"linger.ms\" = \"banana\""));
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
