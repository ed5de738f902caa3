//! The one latency histogram every part of actio records into (DESIGN.md, "What is
//! measured"): HdrHistogram, µs resolution, 3 significant digits, up to an hour. The
//! stages' metrics and the load generator's reports both use it, so their figures
//! are the same measure.

use hdrhistogram::Histogram;

/// Highest latency a histogram tracks: one hour in µs (larger values are clamped).
pub const MAX_US: u64 = 3_600_000_000;

/// A µs latency histogram with 3 significant digits.
pub fn latency_histogram() -> Histogram<u64> {
    // Cannot fail: the bounds are constants within hdrhistogram's limits.
    Histogram::new_with_bounds(1, MAX_US, 3).unwrap_or_else(|_| unreachable!("constant bounds"))
}

/// Records a duration in ns into a µs histogram, clamped into range.
pub fn record_ns(h: &mut Histogram<u64>, ns: i64) {
    h.saturating_record((ns.max(0) as u64 / 1_000).clamp(1, MAX_US));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_recorded_in_us_and_clamped() {
        let mut h = latency_histogram();
        record_ns(&mut h, 2_500_000);
        record_ns(&mut h, -5);
        record_ns(&mut h, i64::MAX);
        assert_eq!((h.min(), h.len()), (1, 3));
        assert!(h.max() >= MAX_US && h.value_at_quantile(0.5) == h.highest_equivalent(2_500));
    }
}
