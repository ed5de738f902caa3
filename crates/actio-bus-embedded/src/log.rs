//! One partition's log: records with dense offsets, trimmed from the head once
//! every subscribed group has committed past them.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use actio_core::bus::Bytes;
use actio_core::{BusError, BusErrorKind, Headers, Offset, Record, TopicPartition};
use parking_lot::{Condvar, Mutex};

/// Wakes one consumer member when data arrives on a partition it owns.
#[derive(Debug, Default)]
pub(crate) struct Signal {
    pending: AtomicBool,
    waiting: AtomicBool,
    lock: Mutex<()>,
    cv: Condvar,
}

impl Signal {
    pub(crate) fn notify(&self) {
        self.pending.store(true, Ordering::Release);
        if self.waiting.load(Ordering::Acquire) {
            let _g = self.lock.lock();
            self.cv.notify_one();
        }
    }

    /// Forgets earlier notifications: call before looking for data.
    pub(crate) fn arm(&self) {
        self.pending.store(false, Ordering::Release);
    }

    /// Waits for a notification since the last `arm`, up to `timeout`.
    pub(crate) fn wait(&self, timeout: Duration) {
        let mut g = self.lock.lock();
        self.waiting.store(true, Ordering::Release);
        if !self.pending.load(Ordering::Acquire) {
            self.cv.wait_for(&mut g, timeout);
        }
        self.waiting.store(false, Ordering::Release);
    }
}

struct Log {
    /// Offset of `records[0]`.
    base: Offset,
    records: VecDeque<Record>,
    bytes: usize,
    appended: u64,
    /// Per subscribed group: the offset it still needs (committed or start position).
    retain: HashMap<String, Offset>,
    /// Members to wake on append, by member id.
    watchers: Vec<(u64, Arc<Signal>)>,
}

pub(crate) struct Partition {
    tp: TopicPartition,
    capacity: usize,
    log: Mutex<Log>,
    space: Condvar,
}

/// Trim in chunks so trimming costs little per record.
const TRIM_CHUNK: usize = 256;

impl Partition {
    pub(crate) fn new(topic: Arc<str>, partition: i32, capacity: usize) -> Self {
        Partition {
            tp: TopicPartition { topic, partition },
            capacity: capacity.max(1),
            log: Mutex::new(Log { base: 0, records: VecDeque::new(), bytes: 0, appended: 0, retain: HashMap::new(), watchers: Vec::new() }),
            space: Condvar::new(),
        }
    }

    pub(crate) fn tp(&self) -> &TopicPartition {
        &self.tp
    }

    pub(crate) fn end(&self) -> Offset {
        let l = self.log.lock();
        l.base + l.records.len() as Offset
    }

    pub(crate) fn start(&self) -> Offset {
        self.log.lock().base
    }

    /// (records, bytes, appended since start).
    pub(crate) fn stats(&self) -> (usize, usize, u64) {
        let l = self.log.lock();
        (l.records.len(), l.bytes, l.appended)
    }

    pub(crate) fn append(&self, key: Option<Bytes>, payload: Bytes, headers: Headers, deadline: Instant) -> Result<Offset, BusError> {
        let mut l = self.log.lock();
        loop {
            if l.records.len() < self.capacity {
                break;
            }
            if l.retain.is_empty() {
                // Nobody subscribes: keep only the newest `capacity` records.
                let to = l.base + TRIM_CHUNK.min(l.records.len()) as Offset;
                Self::trim_to(&mut l, to);
                break;
            }
            if self.space.wait_until(&mut l, deadline).timed_out() && l.records.len() >= self.capacity {
                return Err(BusError::new(
                    BusErrorKind::QueueFull,
                    format!("{}: {} records held and consumers have not committed past them", self.tp, l.records.len()),
                ));
            }
        }
        let offset = l.base + l.records.len() as Offset;
        l.bytes += payload.len() + key.as_ref().map_or(0, |k| k.len());
        l.appended += 1;
        let timestamp_ms = Some(actio_core::time::now_ns() / 1_000_000);
        l.records.push_back(Record { tp: self.tp.clone(), offset, key, payload, headers, timestamp_ms });
        for (_, w) in &l.watchers {
            w.notify();
        }
        Ok(offset)
    }

    /// The record at `offset`, if it exists; an offset before the head is clamped to the head
    /// (as Kafka's `auto.offset.reset` would after retention), returning its real offset.
    pub(crate) fn read(&self, offset: Offset) -> Option<Record> {
        let l = self.log.lock();
        let i = offset.max(l.base) - l.base;
        l.records.get(i as usize).cloned()
    }

    pub(crate) fn watch(&self, member: u64, signal: Arc<Signal>) {
        let mut l = self.log.lock();
        if !l.watchers.iter().any(|(m, _)| *m == member) {
            l.watchers.push((member, signal.clone()));
        }
        if !l.records.is_empty() {
            signal.notify();
        }
    }

    pub(crate) fn unwatch(&self, member: u64) {
        self.log.lock().watchers.retain(|(m, _)| *m != member);
    }

    /// Registers a group's need for records from `offset` on, or updates it after a commit.
    pub(crate) fn retain_from(&self, group: &str, offset: Offset) {
        let mut l = self.log.lock();
        l.retain.insert(group.to_string(), offset);
        let min = l.retain.values().copied().min().unwrap_or(offset);
        if min - l.base >= TRIM_CHUNK as Offset || l.records.len() >= self.capacity {
            Self::trim_to(&mut l, min);
            self.space.notify_all();
        }
    }

    fn trim_to(l: &mut Log, offset: Offset) {
        while l.base < offset {
            let Some(r) = l.records.pop_front() else { break };
            l.bytes -= r.payload.len() + r.key.as_ref().map_or(0, |k| k.len());
            l.base += 1;
        }
    }
}
