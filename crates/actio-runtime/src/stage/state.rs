//! What the driver, the workers and the rebalance listener share: each assigned
//! partition's lanes, held retry copies and watermark, and the rule by which a done
//! message advances its watermark. Kept apart so each of the three reads the same
//! definitions.

use std::collections::VecDeque;
use std::sync::Arc;

use actio_core::{GroupToken, Offset, Producer, Record, TopicPartition};
use opentelemetry::KeyValue;
use ahash::AHashMap;
use crossbeam_channel::{Receiver, Sender};
use parking_lot::Mutex;

use super::txn::{Sends, Sequencer};
use super::{Handler, Hold, StageError, StageSpec};
use crate::lanes::KeyLanes;
use crate::metrics::{StageMetrics, record_ns};
use crate::pool::WorkerPool;
use crate::watermark::Watermark;

/// One message on its way through a worker.
pub(super) struct Work {
    pub(super) rec: Record,
    pub(super) lane: Option<u64>,
    pub(super) consumed_ns: i64,
    pub(super) queue_ns: i64,
    /// Consumed from the stage's retry topic (its partition's [`Part::retry`]).
    pub(super) from_retry: bool,
}

/// A message whose outputs were all acknowledged (or failed).
pub(super) struct Done {
    pub(super) tp: TopicPartition,
    pub(super) epoch: u64,
    pub(super) offset: Offset,
    pub(super) consumed_ns: i64,
    pub(super) queue_ns: i64,
    pub(super) service_ns: i64,
    pub(super) acked_ns: i64,
    pub(super) dead_lettered: bool,
    pub(super) sent_to_retry: bool,
    pub(super) retried: u32,
    pub(super) error: Option<String>,
    /// Held, and its partition revoked: not done here, never will be.
    pub(super) abandoned: bool,
    /// Its sampled span, recorded when it is done.
    pub(super) span: Option<crate::trace::SpanIds>,
}

pub(super) struct Part {
    pub(super) epoch: u64,
    pub(super) lanes: KeyLanes<Work>,
    /// A partition of the stage's retry topic (not its input): decided once, at
    /// assignment, and carried by each of its records as [`Work::from_retry`].
    pub(super) retry: bool,
    /// Retry partitions only: consumed messages not due yet, in offset order, with
    /// their due time (ns). While any wait the partition stays paused.
    pub(super) held: VecDeque<(i64, Work)>,
    pub(super) wm: Watermark,
    /// Waiting messages dropped at revocation: not done, never will be here.
    pub(super) dropped: usize,
    pub(super) paused: bool,
    pub(super) revoking: bool,
    pub(super) last_committed: Option<Offset>,
    /// Holds of this partition's messages (see `hold`), abandoned on revocation;
    /// finished ones are pruned at commit time.
    pub(super) holds: Vec<Hold>,
    /// Exactly-once stages only: the outputs released in offset order (see `txn`).
    pub(super) seq: Option<Sequencer>,
    /// Exactly-once: being revoked, its last frontier about to be committed; what
    /// finishes from now on is not sent.
    pub(super) closed: bool,
}

pub(super) struct State {
    pub(super) parts: AHashMap<TopicPartition, Part>,
    pub(super) epoch: u64,
    pub(super) metrics: StageMetrics,
    pub(super) fatal: Option<StageError>,
    /// Exactly-once: whether released outputs may be sent (closed while a
    /// transaction commits).
    pub(super) txn_open: bool,
    /// Exactly-once: the group membership of the input consumer and of the retry
    /// consumer, as last seen (their offsets go into each transaction).
    pub(super) tokens: [Option<GroupToken>; 2],
    /// The stage failed or is aborted: no transaction commits any more (the open
    /// one is aborted with the producer, or fenced by the next member).
    pub(super) no_more_commits: bool,
}

impl State {
    pub(super) fn in_flight(&self) -> usize {
        self.parts.values().map(|p| p.wm.len()).sum()
    }

    /// Messages from the retry topic waiting for their due time.
    pub(super) fn held(&self) -> usize {
        self.parts.values().map(|p| p.held.len()).sum()
    }

    pub(super) fn apply(&mut self, done: Done, stage: &str, tracer: Option<&crate::trace::Tracer>) {
        let Some(part) = self.parts.get_mut(&done.tp).filter(|p| p.epoch == done.epoch) else {
            return; // the partition was revoked or lost meanwhile
        };
        if done.abandoned {
            part.dropped += 1;
            return;
        }
        if let Some(message) = done.error {
            // Not marked done: the watermark stays before it, and the stage stops.
            if self.fatal.is_none() {
                self.fatal = Some(StageError::Delivery { stage: stage.to_string(), tp: done.tp, offset: done.offset, message });
            }
            return;
        }
        if part.wm.done(done.offset) {
            if let (Some(t), Some(ids)) = (tracer, done.span) {
                let attributes = vec![
                    KeyValue::new("messaging.system", "kafka"),
                    KeyValue::new("messaging.source.name", done.tp.topic.to_string()),
                    KeyValue::new("messaging.kafka.source.partition", i64::from(done.tp.partition)),
                    KeyValue::new("messaging.kafka.message.offset", done.offset),
                    KeyValue::new("actio.stage", stage.to_string()),
                ];
                let error = done.dead_lettered.then(|| "dead-lettered".to_string());
                t.end(stage, ids, done.consumed_ns, done.acked_ns, attributes, error);
            }
            let m = &mut self.metrics;
            record_ns(&mut m.queue, done.queue_ns);
            record_ns(&mut m.service, done.service_ns);
            record_ns(&mut m.stage_latency, done.acked_ns - done.consumed_ns);
            m.processed += 1;
            m.dead_lettered += done.dead_lettered as u64;
            m.sent_to_retry += done.sent_to_retry as u64;
            m.retried += done.retried as u64;
        }
    }
}

pub(super) struct Shared<P: Producer> {
    pub(super) spec: StageSpec,
    /// Outputs and offsets committed in transactions (`txn`): the stage asked for
    /// exactly-once and its producer is transactional.
    pub(super) eos: bool,
    pub(super) handler: Arc<dyn Handler>,
    pub(super) producer: P,
    pub(super) pool: WorkerPool,
    /// CPU of the driver and the workers.
    pub(super) cpu: actio_core::cpu::CpuMeter,
    pub(super) state: Mutex<State>,
    pub(super) done_tx: Sender<Done>,
    pub(super) done_rx: Receiver<Done>,
    /// Lane heads admitted in the driver's current poll round, not yet running
    /// (see [`Shared::dispatch_ready`]).
    pub(super) ready: Mutex<Vec<(TopicPartition, u64, Work)>>,
    /// A running mean of the handler's time per message (ns; each new sample weighs
    /// 1/16), which decides whether a round is worth a worker's wake-up.
    pub(super) handler_ns: std::sync::atomic::AtomicU64,
}

impl<P: Producer> Shared<P> {
    pub(super) fn snapshot(&self) -> StageMetrics {
        let st = self.state.lock();
        let mut m = st.metrics.clone();
        m.in_flight = st.in_flight() as u64;
        m.retry_waiting = st.held() as u64;
        m.retry_partitions = st.parts.values().filter(|p| p.retry).count() as u64;
        m.partitions = st.parts.len() as u64 - m.retry_partitions;
        drop(st);
        m.handler = self.handler.counters();
        m.cpu = self.cpu.total();
        m.steps = self.handler.histograms();
        m
    }

    /// Exactly-once: a message of `tp` finished with `sends`; sends what its partition
    /// now releases (in offset order) if no commit is under way. Sent under the state
    /// lock, so a commit's frontier never covers an output not yet handed over. Of a
    /// partition revoked meanwhile the outputs are dropped unsent: its next owner
    /// runs the message again.
    pub(super) fn sequence(&self, tp: &TopicPartition, epoch: u64, offset: Offset, sends: Sends) {
        let mut st = self.state.lock();
        let open = st.txn_open;
        // A partition whose revocation committed its last transaction takes no more:
        // its next owner runs what finishes now again.
        let Some(seq) = st.parts.get_mut(tp).filter(|p| p.epoch == epoch && !p.closed).and_then(|p| p.seq.as_mut()) else { return };
        seq.finished(offset, sends);
        if open {
            let out = seq.release();
            self.send_all(&mut st, out);
        }
    }

    /// Exactly-once: sends what every partition releases (after a commit).
    pub(super) fn release_all(&self, st: &mut State) {
        let out: Sends = st.parts.values_mut().filter(|p| !p.closed).filter_map(|p| p.seq.as_mut()).flat_map(|s| s.release()).collect();
        self.send_all(st, out);
    }

    /// Sends released outputs. One the producer refuses is past the frontier already,
    /// so the stage stops before any further commit (the transaction is aborted).
    fn send_all(&self, st: &mut State, out: Sends) {
        for (rec, ack) in out {
            let topic = rec.topic.clone();
            if let Err(source) = self.producer.send(rec, ack)
                && st.fatal.is_none()
            {
                tracing::error!(stage = %self.spec.name, %topic, error = %source, "send in a transaction refused: stopping");
                st.fatal = Some(StageError::Bus { stage: self.spec.name.clone(), source });
            }
        }
    }

    /// Exactly-once: commits the open transaction with every partition's sent
    /// frontier (`tokens` override the stored group memberships), then sends what
    /// waited. While it runs, finishing messages are held, not sent.
    pub(super) fn commit_transaction(&self, tokens: [Option<GroupToken>; 2]) -> Result<(), StageError> {
        let (groups, tokens) = {
            let mut st = self.state.lock();
            for (slot, t) in st.tokens.iter_mut().zip(tokens) {
                if t.is_some() {
                    *slot = t;
                }
            }
            let frontiers = st.parts.iter().filter_map(|(tp, p)| p.seq.as_ref()?.to_commit(p.last_committed).map(|o| ((tp.clone(), o), p.retry)));
            let (on_retry, on_input) = super::driver::split_by_retry(frontiers.collect());
            if st.fatal.is_some() || st.no_more_commits {
                // Never commit past a failure: the stage is stopping.
                return Ok(());
            }
            if on_retry.is_empty() && on_input.is_empty() {
                return Ok(());
            }
            st.txn_open = false;
            // Indexed as the group tokens are: the input's group, then the retry topic's.
            ([on_input, on_retry], st.tokens.clone())
        };
        let mut commit = Vec::new();
        for (offsets, token) in groups.into_iter().zip(tokens) {
            if offsets.is_empty() {
                continue;
            }
            let Some(token) = token else {
                return Err(StageError::Bus {
                    stage: self.spec.name.clone(),
                    source: actio_core::BusError::new(actio_core::BusErrorKind::Fatal, "exactly-once: the consumer has no group membership to commit in a transaction"),
                });
            };
            commit.push((token, offsets));
        }
        let t0 = std::time::Instant::now();
        self.producer.commit_transaction(&commit).map_err(|source| StageError::Bus { stage: self.spec.name.clone(), source })?;
        let mut st = self.state.lock();
        for (tp, o) in commit.iter().flat_map(|(_, offsets)| offsets) {
            if let Some(p) = st.parts.get_mut(tp) {
                p.last_committed = Some(*o);
            }
        }
        st.metrics.commits += 1;
        record_ns(&mut st.metrics.commit_latency, t0.elapsed().as_nanos() as i64);
        st.txn_open = true;
        self.release_all(&mut st);
        Ok(())
    }

    pub(super) fn apply_pending_done(&self) {
        let mut st = self.state.lock();
        while let Ok(done) = self.done_rx.try_recv() {
            st.apply(done, &self.spec.name, self.spec.tracer.as_ref());
        }
    }
}
