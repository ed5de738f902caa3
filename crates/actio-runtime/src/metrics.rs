//! Per-stage latency histograms and counters, named once.
//!
//! Definitions (DESIGN.md, "What is measured"): **queue** = consumed-at − previous
//! hop's produced-at (or the tx's created-at at the first hop); **service** = time in
//! the handler; **stage** = outputs acknowledged − consumed-at. All in µs, HdrHistogram
//! with 3 significant digits. Only the stage's driver thread records, so recording
//! takes no lock beyond the stage state it already holds.

use hdrhistogram::Histogram;

use crate::stage::HandlerHistogram;

pub use actio_core::latency::{latency_histogram, record_ns};

/// A counter a handler keeps of its own (see [`crate::Handler::counters`]), exposed
/// with the stage's label. Names are constants of the handler's crate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandlerCounter {
    /// Prometheus name, `_total` suffixed.
    pub name: &'static str,
    /// Help text.
    pub help: &'static str,
    /// Value.
    pub value: u64,
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
            partitions: 0,
            retry_partitions: 0,
            rebalances: 0,
            handler: Vec::new(),
            steps: Vec::new(),
        }
    }
}

impl StageMetrics {
    /// The metrics in Prometheus text exposition format (version 0.0.4). Latencies
    /// are summaries in seconds with quantiles 0.5/0.9/0.99/0.999 and max, over the
    /// stage's lifetime. `lag` (messages behind the end of the input, if known) and
    /// `retry_lag` (the same for the stage's retry group on its retry topic) are
    /// appended by the caller that can measure them.
    pub fn prometheus_text(&self, lag: Option<i64>, retry_lag: Option<i64>) -> String {
        use std::fmt::Write;
        let mut out = String::with_capacity(4096);
        let s = &self.stage;
        // The stage's own series, then (a fused service) each of its stages' service
        // time under that stage's name.
        let series: Vec<(&str, &str, &Histogram<u64>)> = [("queue", &self.queue), ("service", &self.service), ("stage", &self.stage_latency)]
            .into_iter()
            .map(|(kind, h)| (s.as_str(), kind, h))
            .chain(self.steps.iter().map(|st| (st.stage.as_str(), "service", &st.service)))
            .collect();
        let _ = writeln!(out, "# HELP actio_stage_latency_seconds Per-message latency: queue (since the previous hop), service (handler), stage (consumed to outputs acknowledged).");
        let _ = writeln!(out, "# TYPE actio_stage_latency_seconds summary");
        for &(s, kind, h) in &series {
            for q in [0.5, 0.9, 0.99, 0.999] {
                let _ = writeln!(out, "actio_stage_latency_seconds{{stage=\"{s}\",kind=\"{kind}\",quantile=\"{q}\"}} {}", h.value_at_quantile(q) as f64 / 1e6);
            }
            let _ = writeln!(out, "actio_stage_latency_seconds_sum{{stage=\"{s}\",kind=\"{kind}\"}} {}", h.mean() * h.len() as f64 / 1e6);
            let _ = writeln!(out, "actio_stage_latency_seconds_count{{stage=\"{s}\",kind=\"{kind}\"}} {}", h.len());
        }
        let _ = writeln!(out, "# HELP actio_stage_latency_max_seconds Largest latency seen.");
        let _ = writeln!(out, "# TYPE actio_stage_latency_max_seconds gauge");
        for &(s, kind, h) in &series {
            let _ = writeln!(out, "actio_stage_latency_max_seconds{{stage=\"{s}\",kind=\"{kind}\"}} {}", h.max() as f64 / 1e6);
        }
        let counters = [
            ("actio_stage_processed_total", "Messages fully processed (outputs acknowledged).", self.processed),
            ("actio_stage_dead_lettered_total", "Messages routed to the dead-letter topic.", self.dead_lettered),
            ("actio_stage_retried_total", "Handler attempts retried in place after a transient failure.", self.retried),
            ("actio_stage_sent_to_retry_total", "Messages sent to the stage's retry topic after their in-place attempts failed (one per trip).", self.sent_to_retry),
            ("actio_stage_pauses_total", "Partitions paused for back-pressure.", self.pauses),
            ("actio_stage_commits_total", "Watermark commits sent.", self.commits),
            ("actio_stage_rebalances_total", "Rebalance events (assign, revoke, lost).", self.rebalances),
        ];
        for (name, help, v) in counters.into_iter().chain(self.handler.iter().map(|c| (c.name, c.help, c.value))) {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name}{{stage=\"{s}\"}} {v}");
        }
        let mut gauges = vec![
            ("actio_stage_in_flight", "Messages consumed and not yet done.", self.in_flight as i64),
            ("actio_stage_in_flight_peak", "Highest in-flight seen.", self.in_flight_peak as i64),
            ("actio_stage_retry_waiting", "Messages from the retry topic waiting for their due time (counted in in-flight).", self.retry_waiting as i64),
            ("actio_stage_partitions", "Input partitions assigned to this instance.", self.partitions as i64),
            ("actio_stage_retry_partitions", "Retry-topic partitions assigned to this instance (its own consumer group).", self.retry_partitions as i64),
        ];
        if let Some(lag) = lag {
            gauges.push(("actio_stage_lag", "Messages behind the end of the input topic (end - committed).", lag));
        }
        if let Some(lag) = retry_lag {
            gauges.push((
                "actio_stage_retry_lag",
                "Messages behind the end of the stage's retry topic for its retry group (end - committed); copies wait there for their due time, so some is expected while failures are retried.",
                lag,
            ));
        }
        for (name, help, v) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name}{{stage=\"{s}\"}} {v}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_text_has_every_series_once() {
        let mut m = StageMetrics::new("rules");
        record_ns(&mut m.service, 2_000_000);
        m.processed = 7;
        m.handler.push(HandlerCounter { name: "actio_rule_errors_total", help: "Rule evaluations that failed.", value: 4 });
        let text = m.prometheus_text(Some(3), Some(5));
        assert!(text.contains("actio_rule_errors_total{stage=\"rules\"} 4"), "{text}");
        assert!(text.contains("actio_stage_latency_seconds{stage=\"rules\",kind=\"service\",quantile=\"0.99\"} 0.002"), "{text}");
        assert!(text.contains("actio_stage_processed_total{stage=\"rules\"} 7"));
        assert!(text.contains("actio_stage_lag{stage=\"rules\"} 3"));
        assert!(text.contains("actio_stage_retry_lag{stage=\"rules\"} 5"));
        assert!(!m.prometheus_text(None, None).contains("_lag{"), "no lag series before it is measured");
        // A fused service's stages appear under their own names.
        let mut step = latency_histogram();
        record_ns(&mut step, 3_000_000);
        m.steps.push(HandlerHistogram { stage: "velocity".into(), service: step });
        let text = m.prometheus_text(None, None);
        assert!(text.contains("actio_stage_latency_seconds{stage=\"velocity\",kind=\"service\",quantile=\"0.5\"} 0.003"), "{text}");
        assert!(text.contains("actio_stage_latency_max_seconds{stage=\"velocity\",kind=\"service\"} 0.003"), "{text}");
        for line in text.lines().filter(|l| l.starts_with("# TYPE")) {
            let name = line.split_whitespace().nth(2).unwrap();
            assert_eq!(text.matches(&format!("# TYPE {name} ")).count(), 1, "{name} typed twice");
        }
    }

    #[test]
    fn recording_clamps_instead_of_failing() {
        let mut h = latency_histogram();
        record_ns(&mut h, -5);
        record_ns(&mut h, i64::MAX);
        assert_eq!(h.len(), 2);
    }
}
