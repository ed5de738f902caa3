//! Topic and group administration: create topics, committed offsets, end offsets, and
//! the descriptions the CLI prints (partitions, per-group lag).
//!
//! rdkafka's admin API returns futures resolved by its own polling thread, so a tiny
//! thread-parking executor is enough to wait for them; no async runtime is needed.

use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::thread::Thread;
use std::time::Duration;

use actio_core::bus::{BusError, BusErrorKind, Offset, ReplayRange, TopicPartition, TopicSpec};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::ClientContext;
use rdkafka::consumer::ConsumerContext;
use rdkafka::consumer::Consumer as _;
use rdkafka::message::Message as _;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::topic_partition_list::{Offset as RdOffset, TopicPartitionList};
use rdkafka::ClientConfig;

use crate::error::{bus_error_ctx, kind_of_code};

/// Timeout of one admin or metadata operation.
pub const ADMIN_TIMEOUT: Duration = Duration::from_secs(15);

/// One partition of a topic, as the cluster describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionInfo {
    /// Partition index.
    pub partition: i32,
    /// Broker id of the leader (-1 when leaderless).
    pub leader: i32,
    /// Broker ids of the replicas.
    pub replicas: Vec<i32>,
    /// Broker ids of the in-sync replicas.
    pub isr: Vec<i32>,
}

/// A topic as the cluster describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicInfo {
    /// Topic name.
    pub name: String,
    /// Its partitions, by index.
    pub partitions: Vec<PartitionInfo>,
}

/// A consumer group's position on one partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionLag {
    /// Partition index.
    pub partition: i32,
    /// Committed offset (next to consume), `None` if the group never committed.
    pub committed: Option<Offset>,
    /// End offset (high watermark: next offset to be written).
    pub end: Offset,
    /// `end - committed`; `end` when nothing is committed (everything is unread,
    /// assuming retention kept it; an upper bound otherwise).
    pub lag: i64,
}

struct ThreadWaker(Thread);

impl Wake for ThreadWaker {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }
}

/// Calls `f` until it succeeds, fails with a non-transient error, or [`ADMIN_TIMEOUT`]
/// has passed (then its last error is returned), backing off from 10 ms to 500 ms.
pub(crate) fn retry_transient<T>(mut f: impl FnMut() -> Result<T, BusError>) -> Result<T, BusError> {
    let deadline = std::time::Instant::now() + ADMIN_TIMEOUT;
    let mut pause = Duration::from_millis(10);
    loop {
        match f() {
            Err(e) if e.kind == BusErrorKind::Transient && std::time::Instant::now() + pause < deadline => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(500));
            }
            r => return r,
        }
    }
}

/// Runs a future to completion on this thread.
pub(crate) fn block_on<F: Future>(f: F) -> F::Output {
    let waker = Waker::from(Arc::new(ThreadWaker(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut f = pin!(f);
    loop {
        match f.as_mut().poll(&mut cx) {
            Poll::Ready(v) => return v,
            Poll::Pending => std::thread::park(),
        }
    }
}

/// Routes the admin clients' librdkafka log lines through [`crate::log_to_tracing`]
/// like the other clients (rdkafka's default context would print them itself, e.g.
/// the expected "property will be ignored" warnings at every `actio topics describe`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct AdminContext;

impl ClientContext for AdminContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        crate::log_to_tracing("admin", level, fac, message);
    }
}

impl ConsumerContext for AdminContext {}

type BaseConsumer = rdkafka::consumer::BaseConsumer<AdminContext>;

/// The bus's administrative clients.
pub(crate) struct Admin {
    admin: AdminClient<AdminContext>,
    /// A group-less consumer for metadata and watermarks.
    meta: BaseConsumer,
    /// Base config for per-group offset fetches.
    base: ClientConfig,
    /// One offset reader per group, kept: a service polls its group's lag every
    /// second, and a client per call would cost connections and log noise.
    readers: parking_lot::Mutex<std::collections::HashMap<String, Arc<BaseConsumer>>>,
}

impl Admin {
    pub(crate) fn create(base: &ClientConfig) -> Result<Self, BusError> {
        let admin = base.create_with_context(AdminContext).map_err(|e| bus_error_ctx("creating admin client", &e))?;
        let meta = base.create_with_context(AdminContext).map_err(|e| bus_error_ctx("creating metadata client", &e))?;
        Ok(Admin { admin, meta, base: base.clone(), readers: Default::default() })
    }

    pub(crate) fn create_topics(&self, topics: &[TopicSpec]) -> Result<(), BusError> {
        if topics.is_empty() {
            return Ok(());
        }
        // -1: the cluster's default.replication.factor (1 on the test broker).
        let new: Vec<NewTopic<'_>> =
            topics.iter().map(|t| NewTopic::new(&t.name, t.partitions, TopicReplication::Fixed(-1))).collect();
        let opts = AdminOptions::new().operation_timeout(Some(ADMIN_TIMEOUT)).request_timeout(Some(ADMIN_TIMEOUT));
        let results = block_on(self.admin.create_topics(new.iter(), &opts))
            .map_err(|e| bus_error_ctx("creating topics", &e))?;
        let mut failed = Vec::new();
        let mut created = Vec::new();
        let mut kind = BusErrorKind::Transient;
        for r in results {
            match r {
                Ok(name) => created.push(name),
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((name, code)) => {
                    kind = kind_of_code(code);
                    failed.push(format!("{name}: {code}"));
                }
            }
        }
        if !failed.is_empty() {
            return Err(BusError::new(kind, format!("creating topics: {}", failed.join("; "))));
        }
        // CreateTopics answers before the controller has elected every partition's
        // leader; until it has, reads of the new topic fail with NotLeaderForPartition.
        for name in &created {
            retry_transient(|| {
                let t = self.describe_topic(name)?;
                match t.partitions.iter().find(|p| p.leader < 0) {
                    Some(p) => Err(BusError::new(
                        BusErrorKind::Transient,
                        format!("topic {name:?} partition {} has no leader yet", p.partition),
                    )),
                    None => Ok(()),
                }
            })?;
        }
        Ok(())
    }

    pub(crate) fn describe_topic(&self, topic: &str) -> Result<TopicInfo, BusError> {
        let md = self
            .meta
            .fetch_metadata(Some(topic), ADMIN_TIMEOUT)
            .map_err(|e| bus_error_ctx(&format!("metadata of {topic}"), &e))?;
        let t = md
            .topics()
            .iter()
            .find(|t| t.name() == topic)
            .ok_or_else(|| BusError::new(BusErrorKind::UnknownTopic, format!("topic {topic:?} does not exist")))?;
        if let Some(err) = t.error() {
            let code = RDKafkaErrorCode::from(err);
            return Err(BusError::new(kind_of_code(code), format!("topic {topic:?}: {code}")));
        }
        let mut partitions: Vec<PartitionInfo> = t
            .partitions()
            .iter()
            .map(|p| PartitionInfo {
                partition: p.id(),
                leader: p.leader(),
                replicas: p.replicas().to_vec(),
                isr: p.isr().to_vec(),
            })
            .collect();
        partitions.sort_by_key(|p| p.partition);
        Ok(TopicInfo { name: topic.to_string(), partitions })
    }

    pub(crate) fn committed_offsets(&self, group: &str, topic: &str) -> Result<Vec<Option<Offset>>, BusError> {
        let n = self.describe_topic(topic)?.partitions.len() as i32;
        let c = self.offset_reader(group)?;
        let mut tpl = TopicPartitionList::with_capacity(n as usize);
        tpl.add_partition_range(topic, 0, n - 1);
        // On a fresh broker the coordinator may still be loading __consumer_offsets.
        let got = retry_transient(|| {
            c.committed_offsets(tpl.clone(), ADMIN_TIMEOUT)
                .map_err(|e| bus_error_ctx(&format!("committed offsets of {group} on {topic}"), &e))
        })?;
        let mut out = vec![None; n as usize];
        for el in got.elements() {
            if let (Some(slot), RdOffset::Offset(o)) = (out.get_mut(el.partition() as usize), el.offset()) {
                *slot = Some(o);
            }
        }
        Ok(out)
    }

    /// A consumer with `group.id = group` that only reads offsets (OffsetFetch); it
    /// never joins the group.
    fn offset_reader(&self, group: &str) -> Result<Arc<BaseConsumer>, BusError> {
        let mut readers = self.readers.lock();
        if let Some(c) = readers.get(group) {
            return Ok(c.clone());
        }
        let mut cfg = self.base.clone();
        cfg.set("group.id", group);
        let c: Arc<BaseConsumer> = Arc::new(cfg.create_with_context(AdminContext).map_err(|e| bus_error_ctx("creating offset reader", &e))?);
        readers.insert(group.to_string(), c.clone());
        Ok(c)
    }

    pub(crate) fn end_offsets(&self, topic: &str) -> Result<Vec<Offset>, BusError> {
        let n = self.describe_topic(topic)?.partitions.len() as i32;
        (0..n)
            .map(|p| {
                // A leader moving (or not yet elected on a new topic) is transient.
                retry_transient(|| {
                    self.meta
                        .fetch_watermarks(topic, p, ADMIN_TIMEOUT)
                        .map(|(_, high)| high)
                        .map_err(|e| bus_error_ctx(&format!("end offset of {topic}/{p}"), &e))
                })
            })
            .collect()
    }

    /// See [`actio_core::bus::Bus::replay`]: a group-less consumer assigned `tp` at the
    /// first offset with a timestamp ≥ `from_ms` (ListOffsets by time) or
    /// `until - max_records`, whichever is later, read to `until`. Fails if it stops
    /// making progress for [`ADMIN_TIMEOUT`].
    pub(crate) fn replay(&self, tp: &TopicPartition, range: ReplayRange, f: &mut dyn FnMut(&actio_core::Record)) -> Result<u64, BusError> {
        let ReplayRange { from_ms, until, max_records } = range;
        if until <= 0 || max_records == 0 {
            return Ok(0);
        }
        let what = format!("replaying {tp}");
        let mut cfg = self.base.clone();
        // assign() needs a group id; the consumer never joins the group nor commits.
        cfg.set("group.id", "actio-replay")
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            .set("auto.offset.reset", "earliest");
        let c: BaseConsumer = cfg.create_with_context(AdminContext).map_err(|e| bus_error_ctx(&what, &e))?;
        let mut by_time = TopicPartitionList::new();
        by_time
            .add_partition_offset(&tp.topic, tp.partition, RdOffset::Offset(from_ms.max(0)))
            .map_err(|e| bus_error_ctx(&what, &e))?;
        let found = retry_transient(|| c.offsets_for_times(by_time.clone(), ADMIN_TIMEOUT).map_err(|e| bus_error_ctx(&what, &e)))?;
        // No record at or after `from_ms`: nothing to replay.
        let start = match found.elements().first().map(|e| e.offset()) {
            Some(RdOffset::Offset(o)) if o < until => o.max(until.saturating_sub(i64::try_from(max_records).unwrap_or(i64::MAX))),
            _ => return Ok(0),
        };
        let mut assign = TopicPartitionList::new();
        assign.add_partition_offset(&tp.topic, tp.partition, RdOffset::Offset(start)).map_err(|e| bus_error_ctx(&what, &e))?;
        c.assign(&assign).map_err(|e| bus_error_ctx(&what, &e))?;
        let (mut next, mut read) = (start, 0u64);
        let mut progress = std::time::Instant::now();
        while next < until {
            match c.poll(Duration::from_millis(100)) {
                Some(Ok(m)) => {
                    progress = std::time::Instant::now();
                    next = m.offset() + 1;
                    if m.offset() < until {
                        f(&crate::consumer::to_record(&m, tp.topic.clone()));
                        read += 1;
                    }
                }
                Some(Err(e)) => {
                    let e = bus_error_ctx(&what, &e);
                    if !e.is_retriable() {
                        return Err(e);
                    }
                }
                None => {}
            }
            if progress.elapsed() > ADMIN_TIMEOUT {
                return Err(BusError::new(
                    BusErrorKind::Transient,
                    format!("{what}: no record for {ADMIN_TIMEOUT:?} at offset {next} of {until}"),
                ));
            }
        }
        Ok(read)
    }

    pub(crate) fn group_lag(&self, group: &str, topic: &str) -> Result<Vec<PartitionLag>, BusError> {
        let committed = self.committed_offsets(group, topic)?;
        let end = self.end_offsets(topic)?;
        Ok(end
            .iter()
            .zip(committed)
            .enumerate()
            .map(|(p, (&end, committed))| PartitionLag {
                partition: p as i32,
                committed,
                end,
                lag: (end - committed.unwrap_or(0)).max(0),
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_on_waits_for_a_future_completed_by_another_thread() {
        let (tx, rx) = std::sync::mpsc::channel::<Waker>();
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let d2 = done.clone();
        let h = std::thread::spawn(move || {
            let w = rx.recv().ok();
            std::thread::sleep(Duration::from_millis(20));
            d2.store(true, std::sync::atomic::Ordering::SeqCst);
            if let Some(w) = w {
                w.wake();
            }
        });
        let mut sent = false;
        let v = block_on(std::future::poll_fn(|cx| {
            if done.load(std::sync::atomic::Ordering::SeqCst) {
                Poll::Ready(42)
            } else {
                if !sent {
                    let _ = tx.send(cx.waker().clone());
                    sent = true;
                }
                Poll::Pending
            }
        }));
        assert_eq!(v, 42);
        let _ = h.join();
    }

    #[test]
    fn retry_transient_retries_transient_errors_and_returns_others_at_once() {
        let mut calls = 0;
        let v = retry_transient(|| {
            calls += 1;
            if calls < 3 { Err(BusError::new(BusErrorKind::Transient, "not leader")) } else { Ok(calls) }
        });
        assert_eq!(v.ok(), Some(3));

        let mut calls = 0;
        let e = retry_transient(|| -> Result<(), BusError> {
            calls += 1;
            Err(BusError::new(BusErrorKind::UnknownTopic, "no such topic"))
        });
        assert_eq!(e.map_err(|e| e.kind).err(), Some(BusErrorKind::UnknownTopic));
        assert_eq!(calls, 1);
    }
}
