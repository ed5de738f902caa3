//! The transport under the stages: a partitioned, replayable log with consumer
//! groups — Apache Kafka, or actio's embedded in-process log.
//!
//! The trait is synchronous and small on purpose: the stage runtime drives one
//! [`Consumer`] from one thread and hands CPU work to a pool; a [`Producer`] is
//! shared by all threads and reports each delivery through an [`AckFn`].
//!
//! Offsets follow Kafka's convention: a committed offset is the *next* offset to
//! consume, i.e. one past the last processed message.
//!
//! Rebalances are reported through a [`RebalanceListener`] that the bus calls from
//! inside [`Consumer::poll`] (that is where librdkafka runs its rebalance
//! callbacks). Before partitions are taken away the bus calls
//! [`RebalanceListener::revoking`], which drains in-flight work and returns the
//! offsets to commit; the bus commits them synchronously before letting the
//! partitions go, so the next owner resumes exactly there.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

pub use bytes::Bytes;

/// A message's position in its partition.
pub type Offset = i64;

/// A topic and a partition index.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicPartition {
    /// Topic name.
    pub topic: Arc<str>,
    /// Partition index, from 0.
    pub partition: i32,
}

impl TopicPartition {
    /// Builds a topic-partition.
    pub fn new(topic: impl Into<Arc<str>>, partition: i32) -> Self {
        TopicPartition { topic: topic.into(), partition }
    }
}

impl fmt::Display for TopicPartition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.topic, self.partition)
    }
}

/// Message headers, in order; keys may repeat (as in Kafka).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers(pub Vec<(String, Bytes)>);

impl Headers {
    /// The last value of a header.
    pub fn get(&self, key: &str) -> Option<&[u8]> {
        self.0.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v.as_ref())
    }

    /// Sets a header, replacing earlier values of the same key.
    pub fn set(&mut self, key: &str, value: impl Into<Bytes>) {
        self.0.retain(|(k, _)| k != key);
        self.0.push((key.to_string(), value.into()));
    }

    /// Removes every value of a header.
    pub fn remove(&mut self, key: &str) {
        self.0.retain(|(k, _)| k != key);
    }

    /// Keeps only the headers for which `keep(key, value)` holds, in order.
    pub fn retain(&mut self, mut keep: impl FnMut(&str, &[u8]) -> bool) {
        self.0.retain(|(k, v)| keep(k, v));
    }

    /// Iterates over (key, value) pairs.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_ref()))
    }
}

/// A consumed message.
#[derive(Debug, Clone)]
pub struct Record {
    /// Where it came from.
    pub tp: TopicPartition,
    /// Its offset in the partition.
    pub offset: Offset,
    /// The message key (the tx key along the whole chain).
    pub key: Option<Bytes>,
    /// The payload.
    pub payload: Bytes,
    /// The headers.
    pub headers: Headers,
    /// The log append / create timestamp, ms since the epoch, if the bus has one.
    pub timestamp_ms: Option<i64>,
}

/// A message to produce. The bus picks the partition from the key with Kafka's
/// default partitioner (murmur2), unless `partition` is set.
#[derive(Debug, Clone)]
pub struct OutRecord {
    /// Target topic.
    pub topic: Arc<str>,
    /// Explicit partition; `None` means "partition by key".
    pub partition: Option<i32>,
    /// Message key.
    pub key: Option<Bytes>,
    /// Payload.
    pub payload: Bytes,
    /// Headers.
    pub headers: Headers,
}

/// Where a produced message landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivered {
    /// Partition index.
    pub partition: i32,
    /// Offset.
    pub offset: Offset,
}

/// Called once per produced message, from a bus thread, when the bus has acknowledged
/// it (Kafka: `acks=all`) or given up on it. Must not block for long.
pub type AckFn = Box<dyn FnOnce(Result<Delivered, BusError>) + Send + 'static>;

/// What kind of failure a bus reports; decides retry vs. give up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum BusErrorKind {
    /// Bad configuration (unknown property, bad value): fix and restart.
    Config,
    /// Topic or partition does not exist.
    UnknownTopic,
    /// Local queue full; retry after a moment.
    QueueFull,
    /// Transient (network, leader change, timeout); retry.
    Transient,
    /// The consumer or producer is unusable (fenced, closed, fatal librdkafka error).
    Fatal,
    /// This bus does not offer the operation (an optional capability such as
    /// [`Bus::replay`]); the caller decides what doing without it means.
    Unsupported,
}

/// A bus failure.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{kind:?}: {message}")]
pub struct BusError {
    /// Its kind.
    pub kind: BusErrorKind,
    /// What the bus said (librdkafka's own message for Kafka).
    pub message: String,
}

impl BusError {
    /// Builds an error.
    pub fn new(kind: BusErrorKind, message: impl Into<String>) -> Self {
        BusError { kind, message: message.into() }
    }

    /// Whether trying again later may succeed.
    pub fn is_retriable(&self) -> bool {
        matches!(self.kind, BusErrorKind::QueueFull | BusErrorKind::Transient)
    }
}

/// A topic to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicSpec {
    /// Name.
    pub name: String,
    /// Number of partitions.
    pub partitions: i32,
}

/// How a consumer joins its group.
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    /// Consumer group id (`<pipeline>.<stage>`).
    pub group: String,
    /// Topics to subscribe to.
    pub topics: Vec<String>,
    /// Client id, for logs and metrics.
    pub client_id: String,
    /// Where to start when the group has no committed offset: `true` = earliest.
    pub from_earliest: bool,
    /// Extra transport properties, passed through unchanged (librdkafka's for Kafka).
    pub properties: Vec<(String, String)>,
}

/// How a producer is set up.
#[derive(Debug, Clone, Default)]
pub struct ProducerConfig {
    /// Client id, for logs and metrics.
    pub client_id: String,
    /// Extra transport properties, passed through unchanged (librdkafka's for Kafka).
    pub properties: Vec<(String, String)>,
    /// For an exactly-once stage: the producer's transactional id, unique among the
    /// live members of its group (a restarted member that reuses it fences its
    /// predecessor at once). A bus without transactions ignores it and says so
    /// through [`Producer::is_transactional`].
    pub transactional_id: Option<String>,
}

/// A consumer's group membership as a transaction needs it (Kafka: the consumer
/// group metadata, generation included, that fences a zombie member, KIP-447).
/// Opaque: only the bus that made it reads it.
pub type GroupToken = Arc<dyn std::any::Any + Send + Sync>;

/// Told about partitions coming and going. Called from inside [`Consumer::poll`].
pub trait RebalanceListener: Send + Sync {
    /// These partitions are now ours; messages from them follow.
    fn assigned(&self, partitions: &[TopicPartition]);
    /// These partitions are being taken away. Stop dispatching them, let their
    /// in-flight work finish (bounded by a timeout), and return the offsets to commit
    /// for them (next offset to consume). The bus commits them before releasing. A
    /// listener that commits in a transaction instead commits them itself, with
    /// `group` (the consumer's membership, if the bus has transactions), and returns
    /// none.
    fn revoking(&self, partitions: &[TopicPartition], group: Option<GroupToken>) -> Vec<(TopicPartition, Offset)>;
    /// These partitions were lost without a chance to commit (session timeout,
    /// fencing): drop their in-flight state; another member may already own them.
    fn lost(&self, partitions: &[TopicPartition]);
}

/// A listener that does nothing: for consumers that commit on their own terms
/// (the load generator's collector).
#[derive(Debug, Default, Clone, Copy)]
pub struct NoRebalanceListener;

impl RebalanceListener for NoRebalanceListener {
    fn assigned(&self, _: &[TopicPartition]) {}
    fn revoking(&self, _: &[TopicPartition], _: Option<GroupToken>) -> Vec<(TopicPartition, Offset)> {
        Vec::new()
    }
    fn lost(&self, _: &[TopicPartition]) {}
}

/// One member of a consumer group. Driven from a single thread.
pub trait Consumer: Send {
    /// Waits up to `timeout` for the next message. Rebalance callbacks run in here.
    /// `Ok(None)` on timeout.
    fn poll(&mut self, timeout: Duration) -> Result<Option<Record>, BusError>;
    /// Stops fetching from these partitions (back-pressure). Messages already
    /// fetched may still be returned.
    fn pause(&mut self, partitions: &[TopicPartition]) -> Result<(), BusError>;
    /// Resumes fetching from these partitions.
    fn resume(&mut self, partitions: &[TopicPartition]) -> Result<(), BusError>;
    /// Commits offsets (next offset to consume) for partitions this member owns.
    fn commit(&mut self, offsets: &[(TopicPartition, Offset)]) -> Result<(), BusError>;
    /// Partitions currently assigned to this member.
    fn assignment(&self) -> Vec<TopicPartition>;
    /// The member's current group membership, for committing its offsets in a
    /// producer's transaction; `None` on a bus without transactions (the default).
    fn group_token(&self) -> Option<GroupToken> {
        None
    }
    /// Leaves the group gracefully: revokes all partitions through the listener
    /// (so their offsets are committed), then releases them.
    fn close(self) -> Result<(), BusError>
    where
        Self: Sized;
}

/// A producer, shared by all threads of a stage.
pub trait Producer: Send + Sync + Clone + 'static {
    /// Queues a message; `ack` is called when the bus acknowledges or fails it.
    /// May block briefly while the local queue is full.
    fn send(&self, record: OutRecord, ack: AckFn) -> Result<(), BusError>;
    /// Waits until every queued message is acknowledged or `timeout` passes.
    fn flush(&self, timeout: Duration) -> Result<(), BusError>;
    /// Whether it produces in transactions ([`Producer::commit_transaction`]): made
    /// with a transactional id on a bus that has them. `false` by default.
    fn is_transactional(&self) -> bool {
        false
    }
    /// Commits the open transaction — every message sent since the last commit,
    /// together with these consumer offsets (next offset to consume) of each group —
    /// atomically, then opens the next. Blocks until the bus confirms (a few broker
    /// round trips); no message may be sent meanwhile. On error the transaction did
    /// not commit, and the producer may be unusable (fenced): the caller stops
    /// rather than send more.
    fn commit_transaction(&self, offsets: &[(GroupToken, Vec<(TopicPartition, Offset)>)]) -> Result<(), BusError> {
        let _ = offsets;
        Err(BusError::new(BusErrorKind::Unsupported, "this bus has no transactions"))
    }
}

/// What [`Bus::replay`] reads of a partition: the records from the first whose
/// timestamp is at or after `from_ms` up to, not including, offset `until`, but only
/// the last `max_records` of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplayRange {
    /// Milliseconds since the epoch.
    pub from_ms: i64,
    /// One past the last offset read.
    pub until: Offset,
    /// At most this many records, the newest.
    pub max_records: u64,
}

/// A transport: makes consumers and producers, manages topics.
pub trait Bus: Send + Sync + 'static {
    /// Its consumer type.
    type Consumer: Consumer + 'static;
    /// Its producer type.
    type Producer: Producer;

    /// Joins a consumer group.
    fn consumer(
        &self,
        config: &ConsumerConfig,
        listener: Arc<dyn RebalanceListener>,
    ) -> Result<Self::Consumer, BusError>;
    /// Makes a producer.
    fn producer(&self, config: &ProducerConfig) -> Result<Self::Producer, BusError>;
    /// Creates topics that do not exist yet; existing ones are left alone.
    fn create_topics(&self, topics: &[TopicSpec]) -> Result<(), BusError>;
    /// The committed offset of a group for each partition of a topic (`None`: nothing committed).
    fn committed_offsets(&self, group: &str, topic: &str) -> Result<Vec<Option<Offset>>, BusError>;
    /// The end offset (next offset to be written) of each partition of a topic.
    fn end_offsets(&self, topic: &str) -> Result<Vec<Offset>, BusError>;
    /// Calls `f` on the records of `tp` that `range` names, in offset order, read
    /// outside any group, so nothing is committed. Returns how many were read. For a
    /// stage that rebuilds per-partition state when it is assigned a partition.
    ///
    /// Optional: a bus that keeps no history returns [`BusErrorKind::Unsupported`],
    /// which is also the default, so a new bus says it restores nothing rather than
    /// reading nothing in silence.
    fn replay(&self, tp: &TopicPartition, range: ReplayRange, f: &mut dyn FnMut(&Record)) -> Result<u64, BusError> {
        let _ = (range, f);
        Err(BusError::new(BusErrorKind::Unsupported, format!("replaying {tp}: this bus keeps no history to replay")))
    }
}

/// Kafka's default partitioner for keyed messages: `toPositive(murmur2(key)) % n`.
/// Implemented here so the embedded bus places keys exactly where Kafka would.
pub fn kafka_partition(key: &[u8], partitions: i32) -> i32 {
    ((murmur2(key) & 0x7fff_ffff) % partitions.max(1) as u32) as i32
}

/// Kafka's murmur2 (seed 0x9747b28c), as in `org.apache.kafka.common.utils.Utils`.
pub fn murmur2(data: &[u8]) -> u32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let len = data.len();
    let mut h: u32 = SEED ^ (len as u32);
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let rest = chunks.remainder();
    if rest.len() >= 3 {
        h ^= (rest[2] as u32) << 16;
    }
    if rest.len() >= 2 {
        h ^= (rest[1] as u32) << 8;
    }
    if !rest.is_empty() {
        h ^= rest[0] as u32;
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_remove_and_retain_keep_the_order_of_the_rest() {
        let mut h = Headers::default();
        for (k, v) in [("a", "1"), ("b", "2"), ("a", "3"), ("c", "4")] {
            h.0.push((k.to_string(), Bytes::from(v)));
        }
        h.remove("a");
        assert_eq!(h.iter().map(|(k, _)| k).collect::<Vec<_>>(), ["b", "c"]);
        h.retain(|k, v| k != "c" && v == b"2");
        assert_eq!(h.iter().collect::<Vec<_>>(), [("b", &b"2"[..])]);
    }

    #[test]
    fn a_bus_without_replay_says_so() {
        struct NoHistory;
        impl Bus for NoHistory {
            type Consumer = NoConsumer;
            type Producer = NoProducer;
            fn consumer(&self, _: &ConsumerConfig, _: Arc<dyn RebalanceListener>) -> Result<NoConsumer, BusError> {
                Ok(NoConsumer)
            }
            fn producer(&self, _: &ProducerConfig) -> Result<NoProducer, BusError> {
                Ok(NoProducer)
            }
            fn create_topics(&self, _: &[TopicSpec]) -> Result<(), BusError> {
                Ok(())
            }
            fn committed_offsets(&self, _: &str, _: &str) -> Result<Vec<Option<Offset>>, BusError> {
                Ok(vec![])
            }
            fn end_offsets(&self, _: &str) -> Result<Vec<Offset>, BusError> {
                Ok(vec![])
            }
        }
        struct NoConsumer;
        impl Consumer for NoConsumer {
            fn poll(&mut self, _: Duration) -> Result<Option<Record>, BusError> {
                Ok(None)
            }
            fn pause(&mut self, _: &[TopicPartition]) -> Result<(), BusError> {
                Ok(())
            }
            fn resume(&mut self, _: &[TopicPartition]) -> Result<(), BusError> {
                Ok(())
            }
            fn commit(&mut self, _: &[(TopicPartition, Offset)]) -> Result<(), BusError> {
                Ok(())
            }
            fn assignment(&self) -> Vec<TopicPartition> {
                vec![]
            }
            fn close(self) -> Result<(), BusError> {
                Ok(())
            }
        }
        #[derive(Clone)]
        struct NoProducer;
        impl Producer for NoProducer {
            fn send(&self, _: OutRecord, _: AckFn) -> Result<(), BusError> {
                Ok(())
            }
            fn flush(&self, _: Duration) -> Result<(), BusError> {
                Ok(())
            }
        }
        let range = ReplayRange { from_ms: 0, until: 10, max_records: 10 };
        let e = NoHistory.replay(&TopicPartition::new("t", 0), range, &mut |_| {}).err();
        assert_eq!(e.map(|e| e.kind), Some(BusErrorKind::Unsupported));
    }

    #[test]
    fn murmur2_matches_kafka() {
        // Vectors from Kafka's UtilsTest.testMurmur2 (as signed ints there).
        let cases: [(&[u8], i32); 6] = [
            (b"21", -973932308),
            (b"foobar", -790332482),
            (b"a-little-bit-long-string", -985981536),
            (b"a-little-bit-longer-string", -1486304829),
            (b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58897971),
            (b"abc", 479470107),
        ];
        for (key, want) in cases {
            assert_eq!(murmur2(key) as i32, want, "key {:?}", String::from_utf8_lossy(key));
        }
    }

    #[test]
    fn partition_is_in_range() {
        for i in 0..1000 {
            let p = kafka_partition(format!("card-{i}").as_bytes(), 12);
            assert!((0..12).contains(&p));
        }
    }
}
