//! The Kafka consumer: librdkafka's `BaseConsumer`, driven from the stage's poll thread,
//! with rebalances forwarded to the [`RebalanceListener`] from inside `poll`.
//!
//! When offsets are committed (at-least-once):
//! - [`Consumer::commit`] only *stores* the offsets in librdkafka
//!   (`enable.auto.offset.store=false` + `rd_kafka_offsets_store`), which is a local
//!   operation; librdkafka's auto-commit sends the latest stored offsets every
//!   `auto.commit.interval.ms` (100 ms by default). The runtime calls `commit` every few
//!   milliseconds; a broker round trip (sync) or an OffsetCommit request (async) per call
//!   would cost hundreds of `__consumer_offsets` writes per second per member for no
//!   gain. The price: a crash may redeliver up to ~100 ms of processed messages.
//!   If the user turns `enable.auto.commit` off, `commit` commits asynchronously instead.
//! - On revocation, the listener's offsets (plus anything stored and not covered) are
//!   stored and committed **synchronously** before the partitions are released, so the
//!   next owner resumes exactly there: a graceful hand-over loses and repeats nothing.
//! - On lost partitions (session timeout, fencing) nothing is committed; the listener
//!   drops their in-flight state.
//! - [`Consumer::close`] commits synchronously, then leaves the group through the same
//!   revocation path.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actio_core::bus::{
    BusError, BusErrorKind, Bytes, Consumer, GroupToken, Headers, Offset, RebalanceListener, Record, TopicPartition,
};
use parking_lot::Mutex;
use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer as _, ConsumerContext, RebalanceProtocol};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Headers as _, Message};
use rdkafka::topic_partition_list::{Offset as RdOffset, TopicPartitionList};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::ClientConfig;

use crate::error::{bus_error, bus_error_ctx};
use crate::log_to_tracing;

/// How long `close` waits for the group to be left cleanly.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(30);

/// State shared between the consumer and its rebalance callback.
#[derive(Debug, Default)]
struct Shared {
    /// Offsets handed to `commit` (stored, maybe not yet sent), per partition.
    stored: HashMap<TopicPartition, Offset>,
    /// A failure seen inside a callback, reported by the next `poll` / `close`.
    error: Option<BusError>,
}

/// Forwards librdkafka's rebalance events to the runtime's listener.
pub struct GroupContext {
    listener: Arc<dyn RebalanceListener>,
    shared: Arc<Mutex<Shared>>,
}

impl std::fmt::Debug for GroupContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupContext").finish_non_exhaustive()
    }
}

impl ClientContext for GroupContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        log_to_tracing("consumer", level, fac, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        let b = bus_error(&error);
        tracing::warn!(client = "consumer", error = %error, reason, "librdkafka error");
        if b.kind == BusErrorKind::Fatal {
            self.shared.lock().error.get_or_insert(BusError::new(b.kind, format!("{}: {reason}", b.message)));
        }
    }
}

impl GroupContext {
    /// Drains through the listener and commits synchronously before release.
    fn revoke(&self, consumer: &BaseConsumer<Self>, tpl: &TopicPartitionList, tps: &[TopicPartition]) {
        let group = consumer.group_metadata().map(|m| Arc::new(m) as GroupToken);
        let from_listener = self.listener.revoking(tps, group);
        let mut offsets: HashMap<TopicPartition, Offset> = {
            let mut sh = self.shared.lock();
            tps.iter().filter_map(|tp| sh.stored.remove(tp).map(|o| (tp.clone(), o))).collect()
        };
        for (tp, o) in from_listener {
            if tpl.find_partition(&tp.topic, tp.partition).is_some() {
                offsets.insert(tp, o);
            }
        }
        if offsets.is_empty() {
            return;
        }
        let mut commit = TopicPartitionList::with_capacity(offsets.len());
        for (tp, o) in &offsets {
            if let Err(e) = commit.add_partition_offset(&tp.topic, tp.partition, RdOffset::Offset(*o)) {
                tracing::warn!(%tp, offset = o, error = %e, "bad offset from the rebalance listener");
            }
        }
        // Store too: with auto-commit on, librdkafka commits the *stored* offsets of
        // removed partitions on its own, which must not be older than ours.
        if let Err(e) = consumer.store_offsets(&commit) {
            tracing::debug!(error = %e, "storing revoked offsets");
        }
        if let Err(e) = consumer.commit(&commit, CommitMode::Sync) {
            let b = bus_error_ctx("committing revoked partitions", &e);
            tracing::warn!(error = %b, "commit on revocation failed; the next owner may see duplicates");
            self.shared.lock().error.get_or_insert(b);
        } else {
            tracing::debug!(partitions = offsets.len(), "committed on revocation");
        }
    }
}

impl ConsumerContext for GroupContext {
    // Overridden (not pre/post_rebalance) to get the partition list in the error case
    // and to commit between "revoking" and the actual release.
    fn rebalance(&self, consumer: &BaseConsumer<Self>, err: RDKafkaRespErr, tpl: &mut TopicPartitionList) {
        let tps = to_tps(tpl);
        let cooperative = matches!(consumer.rebalance_protocol(), RebalanceProtocol::Cooperative);
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let r = if cooperative { consumer.incremental_assign(tpl) } else { consumer.assign(tpl) };
                match r {
                    Ok(()) => {
                        // librdkafka keeps a partition's pause flag across a revoke (or
                        // loss) and re-assignment. The listener starts every assigned
                        // partition afresh (unpaused), so one paused when it went away
                        // would never be fetched again: after a session timeout under
                        // back-pressure a stage sat idle with a growing lag.
                        if let Err(e) = consumer.resume(tpl) {
                            tracing::warn!(error = %e, "resuming newly assigned partitions");
                        }
                        self.listener.assigned(&tps)
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "assign failed");
                        self.shared.lock().error.get_or_insert(bus_error_ctx("assigning partitions", &e));
                    }
                }
                return;
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                if consumer.assignment_lost() {
                    tracing::warn!(partitions = ?tps, "partitions lost (no commit possible)");
                    self.forget(&tps);
                    self.listener.lost(&tps);
                } else {
                    self.revoke(consumer, tpl, &tps);
                }
            }
            other => {
                tracing::error!(error = ?other, partitions = ?tps, "rebalance error; treating partitions as lost");
                self.forget(&tps);
                self.listener.lost(&tps);
            }
        }
        let r = if cooperative { consumer.incremental_unassign(tpl) } else { consumer.unassign() };
        if let Err(e) = r {
            tracing::error!(error = %e, "unassign failed");
        }
    }
}

impl GroupContext {
    fn forget(&self, tps: &[TopicPartition]) {
        let mut sh = self.shared.lock();
        for tp in tps {
            sh.stored.remove(tp);
        }
    }
}

fn to_tps(tpl: &TopicPartitionList) -> Vec<TopicPartition> {
    tpl.elements().iter().map(|e| TopicPartition::new(e.topic(), e.partition())).collect()
}

fn to_tpl(tps: &[TopicPartition]) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::with_capacity(tps.len());
    for tp in tps {
        tpl.add_partition(&tp.topic, tp.partition);
    }
    tpl
}

/// One member of a Kafka consumer group.
pub struct KafkaConsumer {
    inner: BaseConsumer<GroupContext>,
    shared: Arc<Mutex<Shared>>,
    /// Subscribed topic names, so records share one `Arc<str>` per topic.
    topics: Vec<Arc<str>>,
    /// Whether librdkafka's auto-commit sends stored offsets (else `commit` is async).
    auto_commit: bool,
}

impl std::fmt::Debug for KafkaConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaConsumer").field("topics", &self.topics).field("auto_commit", &self.auto_commit).finish()
    }
}

impl KafkaConsumer {
    pub(crate) fn create(
        config: &ClientConfig,
        topics: &[String],
        listener: Arc<dyn RebalanceListener>,
    ) -> Result<Self, BusError> {
        let shared = Arc::new(Mutex::new(Shared::default()));
        let ctx = GroupContext { listener, shared: shared.clone() };
        let inner: BaseConsumer<GroupContext> =
            config.create_with_context(ctx).map_err(|e| bus_error_ctx("creating consumer", &e))?;
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        inner.subscribe(&names).map_err(|e| bus_error_ctx("subscribing", &e))?;
        Ok(KafkaConsumer {
            inner,
            shared,
            topics: topics.iter().map(|t| Arc::<str>::from(t.as_str())).collect(),
            auto_commit: crate::config::is_true(config, "enable.auto.commit"),
        })
    }

    fn topic_arc(&self, name: &str) -> Arc<str> {
        match self.topics.iter().find(|t| t.as_ref() == name) {
            Some(t) => t.clone(),
            None => Arc::from(name), // regex subscriptions: rare, allocate
        }
    }

    fn record(&self, m: &BorrowedMessage<'_>) -> Record {
        to_record(m, self.topic_arc(m.topic()))
    }

    fn take_error(&self) -> Option<BusError> {
        self.shared.lock().error.take()
    }
}

/// A fetched message as a [`Record`] (its bytes copied), `topic` being its topic's name.
pub(crate) fn to_record(m: &BorrowedMessage<'_>, topic: Arc<str>) -> Record {
    let headers = match m.headers() {
        Some(h) => Headers(
            h.iter().map(|h| (h.key.to_string(), h.value.map(Bytes::copy_from_slice).unwrap_or_default())).collect(),
        ),
        None => Headers::default(),
    };
    Record {
        tp: TopicPartition { topic, partition: m.partition() },
        offset: m.offset(),
        key: m.key().map(Bytes::copy_from_slice),
        payload: m.payload().map(Bytes::copy_from_slice).unwrap_or_default(),
        headers,
        timestamp_ms: m.timestamp().to_millis(),
    }
}

impl Consumer for KafkaConsumer {
    fn poll(&mut self, timeout: Duration) -> Result<Option<Record>, BusError> {
        let polled = self.inner.poll(timeout);
        // Fatal errors seen in callbacks stop the consumer; others wait for `close`.
        let fatal = {
            let mut sh = self.shared.lock();
            if sh.error.as_ref().is_some_and(|e| e.kind == BusErrorKind::Fatal) { sh.error.take() } else { None }
        };
        if let Some(e) = fatal {
            return Err(e);
        }
        match polled {
            None => Ok(None),
            Some(Ok(m)) => Ok(Some(self.record(&m))),
            Some(Err(e)) => Err(bus_error(&e)),
        }
    }

    fn pause(&mut self, partitions: &[TopicPartition]) -> Result<(), BusError> {
        if partitions.is_empty() {
            return Ok(());
        }
        self.inner.pause(&to_tpl(partitions)).map_err(|e| bus_error_ctx("pause", &e))
    }

    fn resume(&mut self, partitions: &[TopicPartition]) -> Result<(), BusError> {
        if partitions.is_empty() {
            return Ok(());
        }
        self.inner.resume(&to_tpl(partitions)).map_err(|e| bus_error_ctx("resume", &e))
    }

    fn commit(&mut self, offsets: &[(TopicPartition, Offset)]) -> Result<(), BusError> {
        if offsets.is_empty() {
            return Ok(());
        }
        let mut tpl = TopicPartitionList::with_capacity(offsets.len());
        for (tp, o) in offsets {
            tpl.add_partition_offset(&tp.topic, tp.partition, RdOffset::Offset(*o))
                .map_err(|e| bus_error_ctx(&format!("commit {tp} at {o}"), &e))?;
        }
        self.inner.store_offsets(&tpl).map_err(|e| bus_error_ctx("storing offsets", &e))?;
        // librdkafka stores what it can and flags the rest (partition not assigned).
        let mut refused = Vec::new();
        for el in tpl.elements() {
            if let Err(e) = el.error() {
                refused.push(format!("{}/{}: {e}", el.topic(), el.partition()));
            }
        }
        {
            let mut sh = self.shared.lock();
            for (tp, o) in offsets {
                if tpl.find_partition(&tp.topic, tp.partition).is_some_and(|el| el.error().is_ok()) {
                    sh.stored.insert(tp.clone(), *o);
                }
            }
        }
        if !self.auto_commit {
            self.inner.commit(&tpl, CommitMode::Async).map_err(|e| bus_error_ctx("commit", &e))?;
        }
        if refused.is_empty() {
            Ok(())
        } else {
            Err(BusError::new(
                BusErrorKind::Fatal,
                format!("not owned by this member (rebalanced away): {}", refused.join(", ")),
            ))
        }
    }

    fn group_token(&self) -> Option<GroupToken> {
        self.inner.group_metadata().map(|m| Arc::new(m) as GroupToken)
    }

    fn assignment(&self) -> Vec<TopicPartition> {
        match self.inner.assignment() {
            Ok(tpl) => to_tps(&tpl),
            Err(e) => {
                tracing::warn!(error = %e, "reading the assignment");
                Vec::new()
            }
        }
    }

    fn close(self) -> Result<(), BusError> {
        // Stored offsets first: the revoke callback below commits the listener's
        // offsets again (they are never older), so this is the safety net for
        // partitions the listener does not report.
        match self.inner.commit_consumer_state(CommitMode::Sync) {
            Ok(()) => {}
            Err(KafkaError::ConsumerCommit(rdkafka::types::RDKafkaErrorCode::NoOffset)) => {}
            Err(e) => tracing::warn!(error = %e, "commit before close"),
        }
        // Leaves the group; librdkafka revokes everything through our rebalance
        // callback (listener.revoking + sync commit) while we serve the queue.
        self.inner.close_queue().map_err(|e| bus_error_ctx("closing the consumer", &e))?;
        let deadline = Instant::now() + CLOSE_TIMEOUT;
        while !self.inner.closed() {
            if Instant::now() >= deadline {
                return Err(BusError::new(
                    BusErrorKind::Transient,
                    format!("consumer did not leave its group within {} s", CLOSE_TIMEOUT.as_secs()),
                ));
            }
            // Messages still arriving here are not processed and not committed.
            let _ = self.inner.poll(Duration::from_millis(100));
        }
        match self.take_error() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}
