//! The embedded bus: an in-process partitioned log with consumer groups.
//!
//! It is actio's default transport (`actio run` needs no broker) and behaves like
//! Kafka where a stage can tell: topics have partitions and dense offsets, keyed
//! records land where Kafka's default partitioner puts them, groups split
//! partitions among live members and keep committed offsets, and a member that
//! leaves hands its partitions over only after its `revoking` callback returned
//! and the offsets it returned were committed. A member dropped without `close`
//! behaves like a crashed process: its partitions go back at the last commit.
//!
//! Memory is bounded: a partition keeps records until every group subscribed to
//! its topic has committed past them (a topic nobody subscribes to keeps only its
//! newest `max_partition_records`), and a full partition makes `send` wait, then
//! fail with `QueueFull` — never drop silently.
//!
//! Acknowledgements are synchronous: `send` calls the `AckFn` before returning.
#![deny(missing_docs)]

mod group;
mod log;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use actio_core::bus::{Bytes, Delivered, ReplayRange, kafka_partition};
use actio_core::{
    AckFn, Bus, BusError, BusErrorKind, ConsumerConfig, Offset, OutRecord, Producer, ProducerConfig,
    RebalanceListener, Record, TopicPartition, TopicSpec,
};
use parking_lot::{Mutex, RwLock};

pub use group::EmbeddedConsumer;
use group::Group;
use log::Partition;

/// Settings of an embedded bus.
#[derive(Debug, Clone)]
pub struct EmbeddedConfig {
    /// Most records one partition holds; past it, `send` waits for consumers.
    pub max_partition_records: usize,
    /// How long `send` waits on a full partition before failing with `QueueFull`.
    pub send_timeout: Duration,
    /// A member that has not polled for this long is evicted from its group.
    pub session_timeout: Duration,
}

impl Default for EmbeddedConfig {
    fn default() -> Self {
        EmbeddedConfig {
            // 5 topics × 12 partitions × 10k records of ~500 B ≈ 300 MB at most.
            max_partition_records: 10_000,
            // A full partition is back-pressure: the producer waits for consumers.
            // Only a pipeline stuck this long makes `send` fail.
            send_timeout: Duration::from_secs(600),
            session_timeout: Duration::from_secs(10),
        }
    }
}

/// Retention and occupancy figures.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EmbeddedStats {
    /// Records held in memory across all partitions.
    pub retained_records: usize,
    /// Payload + key bytes held.
    pub retained_bytes: usize,
    /// Records appended since start.
    pub appended: u64,
}

struct Topic {
    partitions: Vec<Arc<Partition>>,
    round_robin: AtomicUsize,
}

pub(crate) struct Inner {
    config: EmbeddedConfig,
    topics: RwLock<HashMap<Arc<str>, Arc<Topic>>>,
    groups: Mutex<HashMap<String, Arc<Group>>>,
}

impl Inner {
    fn topic(&self, name: &str) -> Result<Arc<Topic>, BusError> {
        self.topics
            .read()
            .get(name)
            .cloned()
            .ok_or_else(|| BusError::new(BusErrorKind::UnknownTopic, format!("unknown topic {name:?}")))
    }

    pub(crate) fn partitions(&self, name: &str) -> Result<Vec<Arc<Partition>>, BusError> {
        Ok(self.topic(name)?.partitions.clone())
    }
}

/// A handle on an embedded bus; clones share the same log.
#[derive(Clone)]
pub struct EmbeddedBus {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for EmbeddedBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedBus").field("config", &self.inner.config).finish_non_exhaustive()
    }
}

impl EmbeddedBus {
    /// An empty bus.
    pub fn new(config: EmbeddedConfig) -> Self {
        EmbeddedBus { inner: Arc::new(Inner { config, topics: RwLock::new(HashMap::new()), groups: Mutex::new(HashMap::new()) }) }
    }

    /// Occupancy across all topics.
    pub fn stats(&self) -> EmbeddedStats {
        let mut s = EmbeddedStats::default();
        for t in self.inner.topics.read().values() {
            for p in &t.partitions {
                let l = p.stats();
                s.retained_records += l.0;
                s.retained_bytes += l.1;
                s.appended += l.2;
            }
        }
        s
    }
}

impl Bus for EmbeddedBus {
    type Consumer = EmbeddedConsumer;
    type Producer = EmbeddedProducer;

    fn consumer(&self, config: &ConsumerConfig, listener: Arc<dyn RebalanceListener>) -> Result<EmbeddedConsumer, BusError> {
        for t in &config.topics {
            self.inner.topic(t)?;
        }
        let group = self
            .inner
            .groups
            .lock()
            .entry(config.group.clone())
            .or_insert_with(|| Arc::new(Group::new(config.group.clone())))
            .clone();
        EmbeddedConsumer::join(self.inner.clone(), group, config, listener)
    }

    fn producer(&self, _config: &ProducerConfig) -> Result<EmbeddedProducer, BusError> {
        Ok(EmbeddedProducer { inner: self.inner.clone() })
    }

    fn create_topics(&self, topics: &[TopicSpec]) -> Result<(), BusError> {
        let mut all = self.inner.topics.write();
        for t in topics {
            if t.partitions < 1 {
                return Err(BusError::new(BusErrorKind::Config, format!("topic {:?}: partitions must be ≥ 1", t.name)));
            }
            all.entry(Arc::from(t.name.as_str())).or_insert_with(|| {
                let name: Arc<str> = Arc::from(t.name.as_str());
                Arc::new(Topic {
                    partitions: (0..t.partitions).map(|i| Arc::new(Partition::new(name.clone(), i, self.inner.config.max_partition_records))).collect(),
                    round_robin: AtomicUsize::new(0),
                })
            });
        }
        Ok(())
    }

    fn committed_offsets(&self, group: &str, topic: &str) -> Result<Vec<Option<Offset>>, BusError> {
        let n = self.inner.topic(topic)?.partitions.len();
        let g = self.inner.groups.lock().get(group).cloned();
        Ok((0..n as i32).map(|p| g.as_ref().and_then(|g| g.committed(topic, p))).collect())
    }

    fn end_offsets(&self, topic: &str) -> Result<Vec<Offset>, BusError> {
        Ok(self.inner.topic(topic)?.partitions.iter().map(|p| p.end()).collect())
    }

    /// Unsupported, on purpose: a partition drops its records once every group has
    /// committed past them (see the crate docs), so a replay could only return the
    /// last few hundred records before a commit and would pass for a full restore.
    /// Its stages live in one process, so a partition's state never has to move.
    fn replay(&self, tp: &TopicPartition, _range: ReplayRange, _f: &mut dyn FnMut(&Record)) -> Result<u64, BusError> {
        Err(BusError::new(BusErrorKind::Unsupported, format!("replaying {tp}: the embedded bus keeps no history past what its groups committed")))
    }
}

/// Appends to the embedded log; acknowledges synchronously.
#[derive(Clone)]
pub struct EmbeddedProducer {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for EmbeddedProducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EmbeddedProducer")
    }
}

impl Producer for EmbeddedProducer {
    fn send(&self, record: OutRecord, ack: AckFn) -> Result<(), BusError> {
        let result = self.append(record);
        ack(result);
        Ok(())
    }

    fn flush(&self, _timeout: Duration) -> Result<(), BusError> {
        Ok(()) // every send was acknowledged before it returned
    }
}

impl EmbeddedProducer {
    fn append(&self, r: OutRecord) -> Result<Delivered, BusError> {
        let topic = self.inner.topic(&r.topic)?;
        let n = topic.partitions.len() as i32;
        let partition = match (r.partition, &r.key) {
            (Some(p), _) if (0..n).contains(&p) => p,
            (Some(p), _) => {
                return Err(BusError::new(BusErrorKind::UnknownTopic, format!("topic {:?} has no partition {p} (it has {n})", r.topic)));
            }
            (None, Some(k)) => kafka_partition(k, n),
            (None, None) => (topic.round_robin.fetch_add(1, Ordering::Relaxed) % n as usize) as i32,
        };
        let deadline = Instant::now() + self.inner.config.send_timeout;
        let offset = topic.partitions[partition as usize].append(r.key, r.payload, r.headers, deadline)?;
        Ok(Delivered { partition, offset })
    }
}

/// A zero-copy view of bytes, for callers building records.
pub fn bytes(b: &[u8]) -> Bytes {
    Bytes::copy_from_slice(b)
}
