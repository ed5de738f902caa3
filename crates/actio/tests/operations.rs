//! Operating stage services on a real Kafka broker: rule hot reload through
//! `POST /admin/reload` and SIGHUP, a broken edit that changes nothing, and
//! `/metrics` read with a Prometheus text-format parser, its histograms adding up
//! across two replicas of one stage; a hung replica's partitions reported as stalled
//! by the live one.
//!
//! Like `kafka.rs`: needs `ACTIO_KAFKA_BROKERS` (set by `scripts/test`), passes with a
//! note without it unless `ACTIO_REQUIRE_KAFKA=1`.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod support;
use support::*;

use std::time::{Duration, Instant};

/// Per bucket bound, the counts of `stage`'s `kind` latency histogram summed over
/// `scrapes` (replicas), with the summed `_count`.
fn summed_histogram(scrapes: &[prometheus_parse::Scrape], stage: &str, kind: &str) -> (Vec<(f64, f64)>, f64) {
    let mut buckets: Vec<(f64, f64)> = Vec::new();
    let mut count = 0.0;
    for s in scrapes {
        for x in &s.samples {
            let ours = x.labels.get("stage") == Some(stage) && x.labels.get("kind") == Some(kind);
            match &x.value {
                prometheus_parse::Value::Histogram(h) if ours && x.metric == "actio_stage_latency_seconds" => {
                    for b in h {
                        match buckets.iter_mut().find(|(le, _)| *le == b.less_than) {
                            Some(e) => e.1 += b.count,
                            None => buckets.push((b.less_than, b.count)),
                        }
                    }
                }
                prometheus_parse::Value::Untyped(v) if ours && x.metric == "actio_stage_latency_seconds_count" => count += v,
                _ => {}
            }
        }
    }
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    (buckets, count)
}

fn version_of(s: &StageProcess, file: &str) -> String {
    let (code, body) = s.get("/admin/reload").unwrap();
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let f = v.as_array().unwrap().iter().find(|f| f["file"].as_str().unwrap().ends_with(file)).unwrap_or_else(|| panic!("{body}"));
    f["version"].as_str().unwrap().to_string()
}

#[test]
fn rules_reload_by_endpoint_and_sighup_and_metrics_add_up_across_replicas() {
    let Some(b) = brokers("reload_and_metrics") else { return };
    let _serial = serial();
    let p = TestPipeline::new(&b);
    p.create_topics();
    // Not watched: each reload here is one the test asks for.
    let mut stages: Vec<StageProcess> = ["rules", "rules", "velocity", "score"].into_iter().map(|s| p.stage_with(s, &["--no-watch"])).collect();
    for s in &mut stages {
        s.wait_ready(Duration::from_secs(60));
    }

    // Before any edit: one version in every decision.
    let out = p.path().join("before");
    let r = finished_report(p.loadgen(400, "4s", &out).spawn().unwrap(), &out, || stages[0].log());
    let sent = n(&r, "sent");
    assert_eq!(n(&r, "lost"), 0, "{r}");
    let versions: Vec<&String> = r["by_version"].as_object().unwrap().keys().collect();
    assert_eq!(versions, ["rules rules@2026.11.1+velocity@2026.11.1 model fraud-lr-2026.11.1"], "{r}");

    // The two replicas' histograms add up: every transaction once, in cumulative
    // buckets that rise to the count.
    let scrapes: Vec<_> = stages[..2].iter().map(|s| s.scrape()).collect();
    let processed: f64 = stages[..2].iter().map(|s| s.counter("actio_stage_processed_total") as f64).sum();
    assert!(processed >= sent as f64, "both replicas processed {processed} of {sent}");
    for kind in ["queue", "service", "stage"] {
        let (buckets, count) = summed_histogram(&scrapes, "rules", kind);
        assert_eq!(count, processed, "{kind}: the summed _count is what the replicas processed");
        assert_eq!(buckets.last().map(|b| (b.0, b.1)), Some((f64::INFINITY, count)), "{kind}: +Inf holds every sample");
        assert!(buckets.windows(2).all(|w| w[0].1 <= w[1].1), "{kind}: cumulative: {buckets:?}");
        assert_eq!(buckets.len(), actio_runtime::LATENCY_BUCKETS.len() + 1, "{kind}: the same buckets on both replicas");
    }
    // Per-rule hits: on /metrics, and as many as the collector saw in decisions.
    let hits: u64 = stages[..2].iter().map(|s| metric_samples(&s.get("/metrics").unwrap().1, "actio_rule_hits_total").iter().map(|(_, v)| *v as u64).sum::<u64>()).sum();
    assert!(hits > 0, "rules fired: {r}");

    // Edit the rules: one replica reloads on POST /admin/reload, the other not yet.
    let rules = p.path().join("rules.toml");
    let text = std::fs::read_to_string(&rules).unwrap();
    std::fs::write(&rules, text.replace("version = \"2026.11.1\"", "version = \"2026.12.1\"")).unwrap();
    let (code, body) = http_request(stages[0].port, "POST", "/admin/reload").unwrap();
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"outcome\": \"swapped\"") && body.contains("\"to\": \"2026.12.1\""), "{body}");
    assert_eq!(version_of(&stages[0], "rules.toml"), "2026.12.1");
    assert_eq!(version_of(&stages[1], "rules.toml"), "2026.11.1", "not watched, not signalled: unchanged");
    // SIGHUP reloads the other.
    stages[1].signal("-HUP");
    let t0 = Instant::now();
    while version_of(&stages[1], "rules.toml") != "2026.12.1" {
        assert!(t0.elapsed() < Duration::from_secs(10), "SIGHUP did not reload:\n{}", stages[1].log());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(stages[1].counter("actio_reloads_total"), 1);

    // A broken edit: 422 naming file, line and field; nothing changes; counted.
    let good = std::fs::read_to_string(&rules).unwrap();
    std::fs::write(&rules, good.replacen("when = \"", "when = \"tx.amount >> ", 1)).unwrap();
    let (code, body) = http_request(stages[0].port, "POST", "/admin/reload").unwrap();
    assert_eq!(code, 422, "{body}");
    assert!(body.contains("rules.toml:") && body.contains(".when"), "file, line and field: {body}");
    assert_eq!(version_of(&stages[0], "rules.toml"), "2026.12.1");
    assert_eq!(stages[0].counter("actio_reload_failures_total"), 1);
    let failing = metric_samples(&stages[0].get("/metrics").unwrap().1, "actio_reload_failing");
    assert!(failing.iter().any(|(l, v)| l.get("file") == Some("rules.toml") && *v == 1.0), "{failing:?}");
    assert!(stages[0].log().contains("reload failed"), "logged:\n{}", stages[0].log());

    // Every later decision carries the new rules version (the file fixed first: the
    // load generator loads the pipeline too, and refuses a broken one).
    std::fs::write(&rules, &good).unwrap();
    let out = p.path().join("after");
    let r = finished_report(p.loadgen(400, "3s", &out).spawn().unwrap(), &out, || stages[0].log());
    assert_eq!(n(&r, "lost"), 0, "{r}");
    let versions: Vec<&String> = r["by_version"].as_object().unwrap().keys().collect();
    assert_eq!(versions, ["rules rules@2026.12.1+velocity@2026.11.1 model fraud-lr-2026.11.1"], "{r}");
}

/// The test collector's binary (`ACTIO_OTELCOL`, exported by `scripts/test` from
/// `scripts/otelcol path`); without it the test says so and passes, unless the full
/// run asks for everything (`ACTIO_REQUIRE_KAFKA=1`).
fn otelcol() -> Option<String> {
    match std::env::var("ACTIO_OTELCOL") {
        Ok(b) if !b.is_empty() => Some(b),
        _ if std::env::var("ACTIO_REQUIRE_KAFKA").is_ok_and(|v| v == "1") => panic!("ACTIO_OTELCOL is not set: scripts/test builds the test collector (scripts/otelcol path)"),
        _ => {
            eprintln!("skipped: no test OpenTelemetry Collector (ACTIO_OTELCOL; scripts/otelcol path builds one)");
            None
        }
    }
}

#[test]
fn a_three_stage_run_sends_one_trace_per_sampled_transaction_to_a_real_collector() {
    let Some(b) = brokers("traces") else { return };
    let Some(bin) = otelcol() else { return };
    let _serial = serial();
    let collector = actio_testkit::OtelCollector::start(&bin);
    let p = TestPipeline::new(&b);
    p.create_topics();
    let flags = ["--otlp-endpoint", collector.endpoint.as_str(), "--trace-ratio", "0.1"];
    let mut stages: Vec<StageProcess> = ["rules", "velocity", "score"].into_iter().map(|s| p.stage_with(s, &flags)).collect();
    for s in &mut stages {
        s.wait_ready(Duration::from_secs(60));
    }
    let out = p.path().join("report");
    let r = finished_report(p.loadgen(200, "3s", &out).spawn().unwrap(), &out, || stages[0].log());
    let sent = n(&r, "sent");
    assert_eq!(n(&r, "lost"), 0, "{r}");
    // A graceful stop flushes each exporter's queue.
    for s in &stages {
        s.signal("-TERM");
    }
    for s in &mut stages {
        assert!(s.wait_exit(Duration::from_secs(30)).success(), "{}", s.log());
    }
    let t0 = Instant::now();
    let mut spans = collector.spans();
    while t0.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(300));
        let again = collector.spans();
        if again.len() == spans.len() && !spans.is_empty() {
            break;
        }
        spans = again;
    }
    let mut traces: std::collections::BTreeMap<&str, Vec<&actio_testkit::ReceivedSpan>> = Default::default();
    for s in &spans {
        traces.entry(s.trace.as_str()).or_default().push(s);
    }
    // About a tenth of the transactions: their traces start at the first stage.
    assert!((sent / 40..=sent / 5).contains(&(traces.len() as u64)), "{} traces of {sent} transactions at ratio 0.1:\n{}", traces.len(), collector.log());
    for (trace, hops) in &traces {
        let by = |stage: &str| hops.iter().find(|s| s.name == format!("{stage} process")).copied();
        let (Some(rules), Some(velocity), Some(score)) = (by("rules"), by("velocity"), by("score")) else { panic!("trace {trace}: {hops:?}") };
        assert_eq!(hops.len(), 3, "trace {trace}: one span per stage: {hops:?}");
        assert_eq!(rules.parent, "", "the first stage starts the trace");
        assert_eq!((velocity.parent.as_str(), score.parent.as_str()), (rules.span.as_str(), velocity.span.as_str()), "each hop a child of the one before");
        assert_eq!(score.service, format!("{}.score", p.name));
    }
}

/// A hung replica: its partitions keep their lag and no commit moves them. The other
/// replica of the stage sees the whole group and reports them as stalled (gauge and
/// log); once the hung one runs again, or the group hands its partitions over, they
/// progress and the gauge returns to 0. The replica's own /metrics shows the CPU its
/// threads used.
#[test]
fn a_live_replica_reports_the_partitions_a_hung_one_holds_as_stalled() {
    let Some(b) = brokers("stalled_partitions") else { return };
    let _serial = serial();
    let p = TestPipeline::new(&b);
    p.create_topics();
    let flags = ["--no-watch", "--stall-after", "3s"];
    let mut live = p.stage_with("rules", &flags);
    let mut hung = p.stage_with("rules", &flags);
    live.wait_ready(Duration::from_secs(60));
    hung.wait_ready(Duration::from_secs(60));
    let gauge = |s: &StageProcess| s.counter("actio_stage_stalled_partitions");
    let held = |s: &StageProcess| s.counter("actio_stage_partitions");
    let t0 = Instant::now();
    while held(&live) + held(&hung) != 4 || held(&hung) == 0 {
        assert!(t0.elapsed() < Duration::from_secs(30), "the two replicas never shared the 4 partitions: {} and {}", held(&live), held(&hung));
        std::thread::sleep(Duration::from_millis(200));
    }
    let hung_holds = held(&hung);
    assert_eq!(gauge(&live), 0);

    hung.signal("-STOP");
    // Input for every partition (nothing downstream runs: the load generator's own
    // figures do not matter here).
    let out = p.path().join("load");
    let mut load = p.loadgen(300, "20s", &out).spawn().unwrap();
    let t0 = Instant::now();
    while gauge(&live) < hung_holds {
        assert!(t0.elapsed() < Duration::from_secs(20), "no stalled partition reported within 20 s (gauge {}):\n{}", gauge(&live), live.log());
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(gauge(&live), hung_holds, "exactly the hung replica's partitions stall; the live one's progress");
    assert!(live.log().contains("partition stalled"), "{}", live.log());
    let cpu = live.scrape().samples.into_iter().find(|s| s.metric == "actio_stage_cpu_seconds_total").map(|s| s.value);
    assert!(matches!(cpu, Some(prometheus_parse::Value::Counter(v)) if v > 0.0), "the replica's threads used CPU: {cpu:?}");

    hung.signal("-CONT");
    let t0 = Instant::now();
    while gauge(&live) > 0 {
        assert!(t0.elapsed() < Duration::from_secs(60), "the stalled partitions never progressed again:\n{}", live.log());
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(live.log().contains("progresses again"), "{}", live.log());
    let _ = load.kill();
    let _ = load.wait();
}
