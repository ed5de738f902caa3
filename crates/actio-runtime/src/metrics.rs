//! Per-stage latency histograms and counters, named once.
//!
//! Definitions (DESIGN.md, "What is measured"): **queue** = consumed-at − previous
//! hop's produced-at (or the tx's created-at at the first hop); **service** = time in
//! the handler; **stage** = outputs acknowledged − consumed-at. All in µs, HdrHistogram
//! with 3 significant digits. Only the stage's driver thread records, so recording
//! takes no lock beyond the stage state it already holds.

use hdrhistogram::Histogram;

/// Highest latency a histogram tracks: one hour in µs (larger values are clamped).
const MAX_US: u64 = 3_600_000_000;

/// A µs latency histogram with 3 significant digits.
pub fn latency_histogram() -> Histogram<u64> {
    // Cannot fail: the bounds are constants within hdrhistogram's limits.
    Histogram::new_with_bounds(1, MAX_US, 3).unwrap_or_else(|_| unreachable!("constant bounds"))
}

/// Records a duration in ns into a µs histogram, clamped into range.
pub fn record_ns(h: &mut Histogram<u64>, ns: i64) {
    let us = (ns.max(0) as u64 / 1_000).clamp(1, MAX_US);
    h.saturating_record(us);
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
    /// Handler attempts that failed and were retried.
    pub retried: u64,
    /// Messages currently consumed and not done.
    pub in_flight: u64,
    /// Highest in-flight seen.
    pub in_flight_peak: u64,
    /// Times a partition was paused for back-pressure.
    pub pauses: u64,
    /// Offsets commits sent to the bus.
    pub commits: u64,
    /// Partitions currently assigned.
    pub partitions: u64,
    /// Rebalances seen (assign or revoke events).
    pub rebalances: u64,
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
            in_flight: 0,
            in_flight_peak: 0,
            pauses: 0,
            commits: 0,
            partitions: 0,
            rebalances: 0,
        }
    }
}
