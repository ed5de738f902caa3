//! Per-stage latency histograms and counters, named once.
//!
//! Definitions (DESIGN.md, "What is measured"): **queue** = consumed-at − previous
//! hop's produced-at (or the tx's created-at at the first hop); **service** = time in
//! the handler; **stage** = outputs acknowledged − consumed-at. All in µs, HdrHistogram
//! with 3 significant digits. Only the stage's driver thread records, so recording
//! takes no lock beyond the stage state it already holds, and allocates nothing.
//!
//! `/metrics` is written by `prometheus-client` (the Prometheus project's Rust
//! client) from a snapshot at scrape time: the histograms become Prometheus
//! histograms with fixed buckets ([`LATENCY_BUCKETS`]), which add up across
//! replicas and window with `rate()`, unlike the lifetime quantile summaries this
//! replaced. We chose it over the older `prometheus` crate for its maintained text
//! encoder and its custom-collector API, which lets the runtime keep its own
//! lock-free recording instead of a shared registry's per-observation atomics.

use hdrhistogram::Histogram;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::stage::HandlerHistogram;

pub use actio_core::latency::{latency_histogram, record_ns};

/// A series a handler keeps of its own (see [`crate::Handler::counters`]): a counter
/// (or a gauge), exposed with the stage's label and its own. Names are constants of
/// the handler's crate, `_total` suffixed for counters (Prometheus conventions).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandlerCounter {
    /// Prometheus name.
    pub name: &'static str,
    /// Help text.
    pub help: &'static str,
    /// Labels beyond `stage` (a rule's id, a file).
    pub labels: Vec<(&'static str, String)>,
    /// Value.
    pub value: u64,
    /// A gauge (a level, e.g. "the file's last reload failed"), not a counter.
    pub gauge: bool,
}

impl HandlerCounter {
    /// A counter.
    pub fn new(name: &'static str, help: &'static str, value: u64) -> Self {
        HandlerCounter { name, help, labels: Vec::new(), value, gauge: false }
    }

    /// A gauge.
    pub fn gauge(name: &'static str, help: &'static str, value: u64) -> Self {
        HandlerCounter { gauge: true, ..Self::new(name, help, value) }
    }

    /// With one more label.
    pub fn label(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.labels.push((name, value.into()));
        self
    }
}

/// What one stage measured so far.
#[derive(Debug, Clone)]
pub struct StageMetrics {
    /// Stage name.
    pub stage: String,
    /// Queue time per message (µs).
    pub queue: Histogram<u64>,
    /// Handler time per message (µs).
    pub service: Histogram<u64>,
    /// Consumed → outputs acknowledged, per message (µs).
    pub stage_latency: Histogram<u64>,
    /// Messages fully processed (outputs acknowledged).
    pub processed: u64,
    /// Messages routed to the dead-letter topic.
    pub dead_lettered: u64,
    /// Handler attempts that failed and were retried in place.
    pub retried: u64,
    /// Messages sent to the retry topic (one per trip).
    pub sent_to_retry: u64,
    /// Messages from the retry topic waiting for their due time.
    pub retry_waiting: u64,
    /// Messages currently consumed and not done.
    pub in_flight: u64,
    /// Highest in-flight seen.
    pub in_flight_peak: u64,
    /// Times a partition was paused for back-pressure.
    pub pauses: u64,
    /// Offsets commits sent to the bus.
    pub commits: u64,
    /// Exactly-once stages: how long each transaction commit took (µs).
    pub commit_latency: Histogram<u64>,
    /// Input partitions currently assigned.
    pub partitions: u64,
    /// Retry-topic partitions currently assigned.
    pub retry_partitions: u64,
    /// Rebalances seen (assign or revoke events).
    pub rebalances: u64,
    /// The handler's own counters.
    pub handler: Vec<HandlerCounter>,
    /// Per-stage service times of a handler that runs several stages (a fused
    /// service); empty otherwise.
    pub steps: Vec<HandlerHistogram>,
    /// CPU time of the stage's driver and worker threads since it started (zero
    /// where Linux's per-thread times cannot be read; [`actio_core::cpu`]). The
    /// bus's own threads (librdkafka's) are not in it.
    pub cpu: std::time::Duration,
}

impl StageMetrics {
    /// Empty metrics for a stage.
    pub fn new(stage: &str) -> Self {
        StageMetrics {
            stage: stage.to_string(),
            queue: latency_histogram(),
            service: latency_histogram(),
            stage_latency: latency_histogram(),
            processed: 0,
            dead_lettered: 0,
            retried: 0,
            sent_to_retry: 0,
            retry_waiting: 0,
            in_flight: 0,
            in_flight_peak: 0,
            pauses: 0,
            commits: 0,
            commit_latency: latency_histogram(),
            partitions: 0,
            retry_partitions: 0,
            rebalances: 0,
            handler: Vec::new(),
            steps: Vec::new(),
            cpu: std::time::Duration::ZERO,
        }
    }
}

/// Upper bounds of the latency histograms' buckets, seconds: dense where a
/// ms-scale pipeline lives (0.25 ms to 50 ms, with the 35 ms end-to-end bar a bound),
/// then coarse up to 10 s for stalls. The same everywhere, so replicas aggregate.
pub const LATENCY_BUCKETS: [f64; 16] = [0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// Per-bucket counts (not cumulative) of `h` (µs) over [`LATENCY_BUCKETS`], and the
/// sum in seconds. Exact to the histogram's 3 significant digits: a value within
/// 0.1 % of a bound may land in the next bucket.
fn buckets(h: &Histogram<u64>) -> (Vec<(f64, u64)>, f64) {
    let mut out: Vec<(f64, u64)> = LATENCY_BUCKETS.iter().map(|b| (*b, 0)).collect();
    for v in h.iter_recorded() {
        let secs = h.median_equivalent(v.value_iterated_to()) as f64 / 1e6;
        if let Some(b) = out.iter_mut().find(|(ub, _)| secs <= *ub) {
            b.1 += v.count_since_last_iteration();
        }
    }
    (out, h.mean() * h.len() as f64 / 1e6)
}

/// One scrape: a snapshot of a stage's metrics and its lags, encoded by
/// `prometheus-client`.
#[derive(Debug)]
struct Scrape {
    m: StageMetrics,
    lag: Option<i64>,
    retry_lag: Option<i64>,
    stalled: Option<i64>,
}

type Labels = Vec<(&'static str, String)>;

impl Collector for Scrape {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let m = &self.m;
        let stage = || -> Labels { vec![("stage", m.stage.clone())] };
        // The stage's own series, then (a fused service) each of its stages' service
        // time under that stage's name.
        let series: Vec<(&str, &str, &Histogram<u64>)> = [("queue", &m.queue), ("service", &m.service), ("stage", &m.stage_latency)]
            .into_iter()
            .map(|(kind, h)| (m.stage.as_str(), kind, h))
            .chain(m.steps.iter().map(|st| (st.stage.as_str(), "service", &st.service)))
            .collect();
        let mut f = enc.encode_descriptor(
            "actio_stage_latency_seconds",
            "Per-message latency since start: queue (since the previous hop), service (handler), stage (consumed to outputs acknowledged).",
            None,
            MetricType::Histogram,
        )?;
        for (s, kind, h) in series {
            let labels: Labels = vec![("stage", s.to_string()), ("kind", kind.to_string())];
            let (b, sum) = buckets(h);
            f.encode_family(&labels)?.encode_histogram::<NoLabelSet>(sum, h.len(), &b, None)?;
        }
        let mut f = enc.encode_descriptor(
            "actio_stage_transaction_commit_seconds",
            "Exactly-once stages: time to commit each transaction (its outputs and input offsets), during which finished outputs wait.",
            None,
            MetricType::Histogram,
        )?;
        let (b, sum) = buckets(&m.commit_latency);
        f.encode_family(&stage())?.encode_histogram::<NoLabelSet>(sum, m.commit_latency.len(), &b, None)?;
        let counters = [
            ("actio_stage_processed", "Messages fully processed (outputs acknowledged).", m.processed),
            ("actio_stage_dead_lettered", "Messages routed to the dead-letter topic.", m.dead_lettered),
            ("actio_stage_retried", "Handler attempts retried in place after a transient failure.", m.retried),
            ("actio_stage_sent_to_retry", "Messages sent to the stage's retry topic after their in-place attempts failed (one per trip).", m.sent_to_retry),
            ("actio_stage_pauses", "Partitions paused for back-pressure.", m.pauses),
            ("actio_stage_commits", "Watermark commits sent.", m.commits),
            ("actio_stage_rebalances", "Rebalance events (assign, revoke, lost).", m.rebalances),
        ];
        for (name, help, v) in counters {
            enc.encode_descriptor(name, help, None, MetricType::Counter)?.encode_family(&stage())?.encode_counter::<NoLabelSet, _, u64>(&v, None)?;
        }
        enc.encode_descriptor("actio_stage_cpu_seconds", "CPU time of the stage's driver and worker threads (the bus's own threads not included).", None, MetricType::Counter)?
            .encode_family(&stage())?
            .encode_counter::<NoLabelSet, _, f64>(&m.cpu.as_secs_f64(), None)?;
        let mut gauges = vec![
            ("actio_stage_in_flight", "Messages consumed and not yet done.", m.in_flight as i64),
            ("actio_stage_in_flight_peak", "Highest in-flight seen.", m.in_flight_peak as i64),
            ("actio_stage_retry_waiting", "Messages from the retry topic waiting for their due time (counted in in-flight).", m.retry_waiting as i64),
            ("actio_stage_partitions", "Input partitions assigned to this instance.", m.partitions as i64),
            ("actio_stage_retry_partitions", "Retry-topic partitions assigned to this instance (its own consumer group).", m.retry_partitions as i64),
        ];
        if let Some(lag) = self.lag {
            gauges.push(("actio_stage_lag", "Messages behind the end of the input topic (end - committed).", lag));
        }
        if let Some(n) = self.stalled {
            gauges.push((
                "actio_stage_stalled_partitions",
                "Input partitions of the stage's group with lag and no committed progress for --stall-after (a hung replica holds them): seen by every replica.",
                n,
            ));
        }
        if let Some(lag) = self.retry_lag {
            gauges.push((
                "actio_stage_retry_lag",
                "Messages behind the end of the stage's retry topic for its retry group (end - committed); copies wait there for their due time, so some is expected while failures are retried.",
                lag,
            ));
        }
        for (name, help, v) in gauges {
            enc.encode_descriptor(name, help, None, MetricType::Gauge)?.encode_family(&stage())?.encode_gauge(&v)?;
        }
        // The handler's own, one family per name (in first-seen order).
        let mut names: Vec<&str> = Vec::new();
        for c in &m.handler {
            if !names.contains(&c.name) {
                names.push(c.name);
            }
        }
        for name in names {
            let mut of = m.handler.iter().filter(|c| c.name == name).peekable();
            let Some(first) = of.peek() else { continue };
            let (kind, base) = if first.gauge { (MetricType::Gauge, name) } else { (MetricType::Counter, name.strip_suffix("_total").unwrap_or(name)) };
            let mut f = enc.encode_descriptor(base, first.help, None, kind)?;
            for c in of {
                let labels: Labels = stage().into_iter().chain(c.labels.iter().cloned()).collect();
                let mut e = f.encode_family(&labels)?;
                if c.gauge {
                    e.encode_gauge(&(c.value as i64))?;
                } else {
                    e.encode_counter::<NoLabelSet, _, u64>(&c.value, None)?;
                }
            }
        }
        Ok(())
    }
}

impl StageMetrics {
    /// The metrics in Prometheus text exposition format (version 0.0.4), encoded by
    /// `prometheus-client`: latencies as histograms in seconds over
    /// [`LATENCY_BUCKETS`] (cumulative since start, so `rate()` windows them and
    /// replicas add up), counters, gauges, the handler's own series. `lag` (messages
    /// behind the end of the input, if known) and `retry_lag` (the same for the
    /// stage's retry group on its retry topic) come from the caller that can measure
    /// them. Runs at scrape time only, on a snapshot it takes over: the hot path
    /// records into the histograms and counters it always did.
    pub fn prometheus_text(self, lag: Option<i64>, retry_lag: Option<i64>, stalled: Option<i64>) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Scrape { m: self, lag, retry_lag, stalled }));
        let mut out = String::with_capacity(8192);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &registry);
        out
    }
}

/// The `Content-Type` of [`StageMetrics::prometheus_text`].
pub const PROMETHEUS_CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> prometheus_parse::Scrape {
        prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("parses as Prometheus text")
    }

    fn value(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
        let s = scrape
            .samples
            .iter()
            .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .unwrap_or_else(|| panic!("no {name} {labels:?}"));
        match s.value {
            prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Gauge(v) | prometheus_parse::Value::Untyped(v) => v,
            ref other => panic!("{name}: {other:?}"),
        }
    }

    #[test]
    fn the_exposition_parses_and_has_every_series() {
        let mut m = StageMetrics::new("rules");
        for ms in [0.2, 0.9, 3.0, 30.0, 40.0, 20_000.0] {
            record_ns(&mut m.service, (ms * 1e6) as i64);
        }
        m.processed = 7;
        m.handler.push(HandlerCounter::new("actio_rule_hits_total", "Times a rule fired.", 4).label("rule", "r1").label("mode", "active"));
        m.handler.push(HandlerCounter::new("actio_rule_hits_total", "Times a rule fired.", 2).label("rule", "r2").label("mode", "shadow"));
        m.handler.push(HandlerCounter::gauge("actio_reload_failing", "Whether the file's last reload failed.", 1).label("file", "rules.toml"));
        let text = m.clone().prometheus_text(Some(3), Some(5), Some(1));
        let p = parse(&text);
        assert_eq!(value(&p, "actio_rule_hits_total", &[("stage", "rules"), ("rule", "r2"), ("mode", "shadow")]), 2.0, "{text}");
        assert_eq!(value(&p, "actio_reload_failing", &[("file", "rules.toml")]), 1.0, "{text}");
        assert_eq!(value(&p, "actio_stage_processed_total", &[("stage", "rules")]), 7.0);
        assert_eq!(value(&p, "actio_stage_lag", &[("stage", "rules")]), 3.0);
        assert_eq!(value(&p, "actio_stage_retry_lag", &[("stage", "rules")]), 5.0);
        assert_eq!(value(&p, "actio_stage_stalled_partitions", &[("stage", "rules")]), 1.0);
        assert_eq!(value(&p, "actio_stage_cpu_seconds_total", &[("stage", "rules")]), 0.0);
        assert!(!m.clone().prometheus_text(None, None, None).contains("_lag{"), "no lag series before it is measured");
        let h = p
            .samples
            .iter()
            .find_map(|s| match &s.value {
                prometheus_parse::Value::Histogram(h) if s.metric == "actio_stage_latency_seconds" && s.labels.get("kind") == Some("service") => Some(h.clone()),
                _ => None,
            })
            .expect("a service histogram");
        let le = |bound: f64| h.iter().find(|b| b.less_than == bound).map(|b| b.count).unwrap_or_else(|| panic!("no bucket {bound}"));
        // Cumulative: 0.2 ms and 0.9 ms by 1 ms, 3 ms by 5 ms, both 30 and 40 ms by 50
        // ms, the 20 s stall only in +Inf.
        assert_eq!((le(0.00025), le(0.001), le(0.005), le(0.035), le(0.05), le(10.0), le(f64::INFINITY)), (1.0, 2.0, 3.0, 4.0, 5.0, 5.0, 6.0), "{text}");
        for line in text.lines().filter(|l| l.starts_with("# TYPE")) {
            let name = line.split_whitespace().nth(2).unwrap();
            assert_eq!(text.matches(&format!("# TYPE {name} ")).count(), 1, "{name} typed twice");
        }
        // A fused service's stages appear under their own names.
        let mut step = latency_histogram();
        record_ns(&mut step, 3_000_000);
        m.steps.push(HandlerHistogram { stage: "velocity".into(), service: step });
        let text = m.prometheus_text(None, None, None);
        assert!(text.contains("actio_stage_latency_seconds_count{stage=\"velocity\",kind=\"service\"} 1"), "{text}");
    }

    #[test]
    fn recording_clamps_instead_of_failing() {
        let mut h = latency_histogram();
        record_ns(&mut h, -5);
        record_ns(&mut h, i64::MAX);
        assert_eq!(h.len(), 2);
    }
}
