//! Key lanes: within one partition, messages that share a key run one at a time in
//! consumption order; different keys run in parallel.
//!
//! A lane exists while its head is being processed; later messages of the same key
//! wait in the lane's queue. The worker that finishes a head takes the next message
//! of the lane itself ([`KeyLanes::next`]), so advancing a lane costs no round trip
//! through the stage's driver thread.

use std::collections::VecDeque;
use std::hash::{BuildHasher, Hash};

use ahash::{AHashMap, RandomState};

/// How messages of one partition may be reordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Ordering {
    /// Per key: same key in order, different keys in parallel (default).
    #[default]
    Key,
    /// Per partition: one message at a time per partition.
    Partition,
    /// No ordering: every message runs as soon as a worker is free.
    Unordered,
}

/// The lanes of one partition, holding items of type `T` (records).
#[derive(Debug)]
pub struct KeyLanes<T> {
    ordering: Ordering,
    lanes: AHashMap<u64, VecDeque<T>>,
    hasher: RandomState,
    queued: usize,
}

impl<T> KeyLanes<T> {
    /// Empty lanes for an ordering mode.
    pub fn new(ordering: Ordering) -> Self {
        KeyLanes {
            ordering,
            lanes: AHashMap::new(),
            hasher: RandomState::with_seeds(0x61, 0x63, 0x74, 0x69),
            queued: 0,
        }
    }

    /// The lane id of a key under this ordering (`None`: no lane, run at once).
    pub fn lane_of(&self, key: Option<&[u8]>) -> Option<u64> {
        match self.ordering {
            Ordering::Unordered => None,
            Ordering::Partition => Some(0),
            Ordering::Key => Some(match key {
                Some(k) => {
                    let mut h = self.hasher.build_hasher();
                    k.hash(&mut h);
                    std::hash::Hasher::finish(&h)
                }
                None => 0,
            }),
        }
    }

    /// Offers an item to its lane. Returns the item back when it may run now (its
    /// lane was idle, and is now busy); otherwise it waits in the lane.
    pub fn admit(&mut self, lane: Option<u64>, item: T) -> Option<T> {
        let Some(lane) = lane else { return Some(item) };
        match self.lanes.get_mut(&lane) {
            Some(queue) => {
                queue.push_back(item);
                self.queued += 1;
                None
            }
            None => {
                self.lanes.insert(lane, VecDeque::new());
                Some(item)
            }
        }
    }

    /// The head of `lane` finished: returns the next item to run in that lane, or
    /// marks the lane idle and returns `None`.
    pub fn next(&mut self, lane: Option<u64>) -> Option<T> {
        let lane = lane?;
        let queue = self.lanes.get_mut(&lane)?;
        match queue.pop_front() {
            Some(item) => {
                self.queued -= 1;
                Some(item)
            }
            None => {
                self.lanes.remove(&lane);
                None
            }
        }
    }

    /// Drops every waiting item (partition revoked); running heads are unaffected.
    /// Returns how many were dropped.
    pub fn clear_waiting(&mut self) -> usize {
        let n = self.queued;
        for q in self.lanes.values_mut() {
            q.clear();
        }
        self.queued = 0;
        n
    }

    /// Items waiting behind a busy head.
    pub fn waiting(&self) -> usize {
        self.queued
    }

    /// Lanes with a head running.
    pub fn busy(&self) -> usize {
        self.lanes.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_key_waits_other_keys_run() {
        let mut l = KeyLanes::new(Ordering::Key);
        let a = l.lane_of(Some(b"a"));
        let b = l.lane_of(Some(b"b"));
        assert_ne!(a, b);
        assert_eq!(l.admit(a, 1), Some(1));
        assert_eq!(l.admit(a, 2), None);
        assert_eq!(l.admit(b, 3), Some(3));
        assert_eq!(l.admit(a, 4), None);
        assert_eq!(l.waiting(), 2);
        assert_eq!(l.next(a), Some(2));
        assert_eq!(l.next(a), Some(4));
        assert_eq!(l.next(a), None);
        assert_eq!(l.busy(), 1, "b still running");
        assert_eq!(l.next(b), None);
        assert_eq!(l.busy(), 0);
        // An idle lane admits at once again.
        assert_eq!(l.admit(a, 5), Some(5));
    }

    #[test]
    fn partition_mode_is_one_lane_and_unordered_has_none() {
        let mut p = KeyLanes::new(Ordering::Partition);
        assert_eq!(p.admit(p.lane_of(Some(b"a")), 1), Some(1));
        assert_eq!(p.admit(p.lane_of(Some(b"b")), 2), None);
        let mut u = KeyLanes::new(Ordering::Unordered);
        assert_eq!(u.admit(u.lane_of(Some(b"a")), 1), Some(1));
        assert_eq!(u.admit(u.lane_of(Some(b"a")), 2), Some(2));
    }

    #[test]
    fn clear_waiting_keeps_heads_busy() {
        let mut l = KeyLanes::new(Ordering::Key);
        let a = l.lane_of(Some(b"a"));
        l.admit(a, 1);
        l.admit(a, 2);
        l.admit(a, 3);
        assert_eq!(l.clear_waiting(), 2);
        assert_eq!(l.next(a), None);
        assert_eq!(l.busy(), 0);
    }
}
