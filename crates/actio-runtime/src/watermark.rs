//! The per-partition watermark: the next offset such that every consumed message
//! before it is fully processed and its outputs acknowledged.
//!
//! Completions arrive out of order (different key lanes run in parallel), but only
//! the watermark is ever committed. Unlike trackers that encode every out-of-order
//! completion into commit metadata (Confluent Parallel Consumer, capped at 4 KB and
//! known to stall once it overflows), the state here is a deque bounded by the
//! partition's in-flight cap and nothing but one offset leaves the process.

use std::collections::VecDeque;

use actio_core::Offset;

/// Consumed-but-not-committable offsets of one partition, in consumption order.
#[derive(Debug, Default)]
pub struct Watermark {
    /// (offset, done), strictly increasing offsets (Kafka offsets may have gaps).
    entries: VecDeque<(Offset, bool)>,
    /// Next offset to commit when `entries` is empty.
    next: Option<Offset>,
    /// Entries not yet done.
    pending: usize,
}

impl Watermark {
    /// Starts a partition; `position` is the first offset expected, when known.
    pub fn new(position: Option<Offset>) -> Self {
        Watermark { entries: VecDeque::new(), next: position, pending: 0 }
    }

    /// Records a consumed offset. Offsets must increase; a repeated or older offset
    /// (a bus redelivering after a seek) is ignored and reported as `false`.
    pub fn consumed(&mut self, offset: Offset) -> bool {
        let last = self.entries.back().map(|e| e.0).or(self.next.map(|n| n - 1));
        if last.is_some_and(|l| offset <= l) {
            return false;
        }
        self.entries.push_back((offset, false));
        self.pending += 1;
        true
    }

    /// Marks an offset done. Returns `false` if it is not in flight.
    pub fn done(&mut self, offset: Offset) -> bool {
        match self.entries.binary_search_by_key(&offset, |e| e.0) {
            Ok(i) if !self.entries[i].1 => {
                self.entries[i].1 = true;
                self.pending -= 1;
                while let Some(&(o, true)) = self.entries.front() {
                    self.entries.pop_front();
                    self.next = Some(o + 1);
                }
                true
            }
            _ => false,
        }
    }

    /// The offset to commit (next to consume): everything before it is done.
    /// The front entry is never done (done fronts are popped), so it is the answer;
    /// with nothing in flight it is one past the last done offset. `None` before
    /// anything was consumed on a partition whose start is unknown.
    pub fn committable(&self) -> Option<Offset> {
        self.entries.front().map(|e| e.0).or(self.next)
    }

    /// Messages consumed and not yet done.
    pub fn in_flight(&self) -> usize {
        self.pending
    }

    /// Entries held (done or not) — the memory the watermark uses.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn advances_only_over_contiguous_done_offsets() {
        let mut w = Watermark::new(Some(10));
        for o in 10..15 {
            assert!(w.consumed(o));
        }
        assert_eq!(w.committable(), Some(10));
        assert!(w.done(12));
        assert!(w.done(11));
        assert_eq!(w.committable(), Some(10), "10 is still in flight");
        assert!(w.done(10));
        assert_eq!(w.committable(), Some(13));
        assert!(w.done(14));
        assert_eq!(w.committable(), Some(13));
        assert!(w.done(13));
        assert_eq!(w.committable(), Some(15));
        assert!(w.is_empty());
    }

    #[test]
    fn gaps_in_offsets_are_fine() {
        // Compacted topics and transaction markers leave gaps.
        let mut w = Watermark::new(None);
        assert_eq!(w.committable(), None);
        for o in [3, 7, 8, 20] {
            w.consumed(o);
        }
        assert_eq!(w.committable(), Some(3), "resume at the first consumed offset");
        w.done(7);
        w.done(3);
        assert_eq!(w.committable(), Some(8));
        w.done(20);
        w.done(8);
        assert_eq!(w.committable(), Some(21));
    }

    #[test]
    fn rejects_unknown_duplicate_and_old_offsets() {
        let mut w = Watermark::new(Some(0));
        w.consumed(0);
        w.consumed(1);
        assert!(!w.consumed(1), "repeated");
        assert!(!w.done(5), "never consumed");
        assert!(w.done(1));
        assert!(!w.done(1), "twice");
        assert!(w.done(0));
        assert!(!w.consumed(0), "older than the watermark");
        assert_eq!(w.committable(), Some(2));
    }

    proptest! {
        /// Whatever the completion order, the watermark is exactly the smallest
        /// not-done offset and never moves backwards.
        #[test]
        fn watermark_is_first_not_done_under_any_order(
            n in 1usize..200,
            seed in any::<u64>(),
        ) {
            use rand::{seq::SliceRandom, SeedableRng};
            let mut order: Vec<i64> = (0..n as i64).collect();
            order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
            let mut w = Watermark::new(Some(0));
            for o in 0..n as i64 { w.consumed(o); }
            let mut done = vec![false; n];
            let mut last = 0;
            for o in order {
                w.done(o);
                done[o as usize] = true;
                let expect = done.iter().position(|d| !d).unwrap_or(n) as i64;
                let got = w.committable().unwrap();
                prop_assert_eq!(got, expect);
                prop_assert!(got >= last);
                last = got;
            }
            prop_assert!(w.is_empty());
        }
    }
}
