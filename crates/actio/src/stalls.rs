//! Stalled partitions: input partitions with lag whose group's committed offset has
//! not moved for a while. Lag alone is no alarm (a burst makes some); lag that
//! nothing works off is: a replica that hangs while it holds the partition (stopped,
//! deadlocked, or spinning on one message) keeps its assignment until the group's
//! session times out, or for ever if its heartbeats still go out, and the lag only
//! grows. Every replica of a stage sees the whole group's offsets, so any live one
//! reports the partitions a hung one holds (`actio_stage_stalled_partitions`; the
//! alert ActioPartitionStalled in k8s/components/monitoring).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use actio_bus_kafka::PartitionLag;

/// Tracks when each partition's committed offset last moved.
#[derive(Debug)]
pub struct StallWatch {
    after: Duration,
    /// Per partition: the committed offset last seen, and since when it has been so.
    seen: HashMap<i32, (Option<i64>, Instant)>,
    stalled: Vec<i32>,
}

/// What changed at one observation.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Partitions that are stalled now and were not.
    pub stalled: Vec<i32>,
    /// Partitions that were stalled and are not any more.
    pub recovered: Vec<i32>,
}

impl StallWatch {
    /// A partition stalls after `after` with lag and no commit.
    pub fn new(after: Duration) -> Self {
        StallWatch { after, seen: HashMap::new(), stalled: Vec::new() }
    }

    /// The partitions stalled at the last observation.
    pub fn stalled(&self) -> &[i32] {
        &self.stalled
    }

    /// Takes the group's offsets at `now`.
    pub fn observe(&mut self, parts: &[PartitionLag], now: Instant) -> Changes {
        let mut stalled = Vec::new();
        for p in parts {
            let entry = self.seen.entry(p.partition).or_insert((p.committed, now));
            // Progress, or nothing to progress on: the clock starts again.
            if entry.0 != p.committed || p.lag <= 0 {
                *entry = (p.committed, now);
            }
            if p.lag > 0 && now.duration_since(entry.1) >= self.after {
                stalled.push(p.partition);
            }
        }
        let changes = Changes {
            stalled: stalled.iter().filter(|p| !self.stalled.contains(p)).copied().collect(),
            recovered: self.stalled.iter().filter(|p| !stalled.contains(p)).copied().collect(),
        };
        self.stalled = stalled;
        changes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(partition: i32, committed: Option<i64>, lag: i64) -> PartitionLag {
        PartitionLag { partition, committed, end: committed.unwrap_or(0) + lag, lag }
    }

    #[test]
    fn a_partition_stalls_with_lag_and_no_commit_and_recovers_on_one() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut w = StallWatch::new(10 * s);
        assert_eq!(w.observe(&[part(0, Some(5), 100), part(1, Some(7), 0)], t0), Changes::default());
        // 9 s without a commit: not yet.
        assert_eq!(w.observe(&[part(0, Some(5), 300), part(1, Some(7), 0)], t0 + 9 * s), Changes::default());
        // 10 s: partition 0 stalls; partition 1 has no lag, so never.
        let c = w.observe(&[part(0, Some(5), 400), part(1, Some(7), 0)], t0 + 10 * s);
        assert_eq!(c, Changes { stalled: vec![0], recovered: vec![] });
        assert_eq!(w.stalled(), [0]);
        assert_eq!(w.observe(&[part(0, Some(5), 500), part(1, Some(7), 0)], t0 + 30 * s), Changes::default(), "reported once");
        // A commit: recovered, and the clock starts again.
        assert_eq!(w.observe(&[part(0, Some(6), 500), part(1, Some(7), 0)], t0 + 31 * s), Changes { stalled: vec![], recovered: vec![0] });
        assert_eq!(w.observe(&[part(0, Some(6), 500)], t0 + 40 * s), Changes::default());
        assert_eq!(w.observe(&[part(0, Some(6), 500)], t0 + 41 * s).stalled, [0]);
    }

    #[test]
    fn a_group_that_never_committed_stalls_too_and_idle_lag_does_not() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut w = StallWatch::new(5 * s);
        w.observe(&[part(0, None, 50)], t0);
        assert_eq!(w.observe(&[part(0, None, 60)], t0 + 5 * s).stalled, [0]);
        // No lag any more (retention trimmed what was left): nothing stalls.
        assert_eq!(w.observe(&[part(0, None, 0)], t0 + 6 * s).recovered, [0]);
    }
}
