//! The stage driver, its workers and its rebalance listener.
//!
//! Failures follow the crate doc's "Failures and retries": in-place attempts with
//! backoff, then the stage's retry topic (held on its own partitions until due), then
//! the DLQ.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering as AtomicOrdering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use actio_core::bus::{Bytes, Delivered};
use actio_core::time::now_ns;
use actio_core::{
    Bus, BusError, Consumer, ConsumerConfig, Headers, Offset, OutRecord, Producer, ProducerConfig,
    RebalanceListener, Record, TopicPartition, headers,
};
use ahash::AHashMap;
use crossbeam_channel::{Receiver, Sender};
use parking_lot::Mutex;

use crate::pool::WorkerPool;
use crate::lanes::{KeyLanes, Ordering};
use crate::metrics::{HandlerCounter, StageMetrics, record_ns};
use crate::watermark::Watermark;

/// One output of a handler; the runtime adds the key (the input's, unless set) and
/// the headers (the input's, plus this stage's trail hop).
#[derive(Debug, Clone)]
pub struct Output {
    /// Target topic.
    pub topic: Arc<str>,
    /// Payload.
    pub payload: Bytes,
}

/// Whether a failed message may succeed if tried again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// Bad input or a bug: dead-letter at once.
    Permanent,
    /// Something outside may recover (a lookup timed out): retry per policy.
    Transient,
}

/// Why a handler could not process a message.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct HandlerError {
    /// Retry or dead-letter.
    pub kind: FailureKind,
    /// What went wrong; becomes the `actio-error` header of the DLQ copy.
    pub message: String,
}

impl HandlerError {
    /// A failure that retrying cannot fix.
    pub fn permanent(message: impl Into<String>) -> Self {
        HandlerError { kind: FailureKind::Permanent, message: message.into() }
    }

    /// A failure that a retry may fix.
    pub fn transient(message: impl Into<String>) -> Self {
        HandlerError { kind: FailureKind::Transient, message: message.into() }
    }
}

/// The per-message work of a stage. Called on pool threads, concurrently for
/// different keys, never concurrently for one key (unless ordering is unordered).
pub trait Handler: Send + Sync + 'static {
    /// Processes one message into zero or more outputs.
    fn handle(&self, record: &Record) -> Result<Vec<Output>, HandlerError>;
    /// [`Handler::handle`], told which attempt this is: 1 for the first, counting every
    /// earlier attempt at this stage, in place and through the retry topic. The runtime
    /// calls this one; the default ignores `attempt`.
    fn handle_attempt(&self, record: &Record, attempt: u32) -> Result<Vec<Output>, HandlerError> {
        let _ = attempt;
        self.handle(record)
    }
    /// Counters of the handler's own (e.g. rule evaluation errors), read with every
    /// metrics snapshot and exposed beside the stage's.
    fn counters(&self) -> Vec<HandlerCounter> {
        Vec::new()
    }
    /// Partitions were assigned to this stage instance.
    fn partitions_assigned(&self, _partitions: &[TopicPartition]) {}
    /// Partitions were revoked or lost: drop their state.
    fn partitions_revoked(&self, _partitions: &[TopicPartition]) {}
}

/// What a stage does with transient failures: attempts in place with backoff, then
/// (if configured) trips through a retry topic, then the DLQ.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts per run of a message, in place (1 = no in-place retry). A message that
    /// comes back from the retry topic gets as many again.
    pub attempts: u32,
    /// Backoff before the second attempt; doubles each time.
    pub backoff: Duration,
    /// Largest backoff.
    pub max_backoff: Duration,
    /// The stage's retry topic, if any.
    pub topic: Option<RetryTopic>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy { attempts: 3, backoff: Duration::from_millis(1), max_backoff: Duration::from_millis(50), topic: None }
    }
}

/// A topic of the stage's own where transient failures wait before running again.
/// The stage consumes it with a second consumer, in a group of its own: in the input's
/// group, a cooperative-sticky assignment balances the *total* partition count, and
/// handed one replica all the retry partitions and a single input partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryTopic {
    /// Topic name.
    pub topic: Arc<str>,
    /// Consumer group reading it (`<pipeline>.<stage>.retry`).
    pub group: String,
    /// Transport properties for that consumer, over the stage's (Kafka: a longer fetch
    /// wait than the input's, since a copy cannot run before its delay anyway).
    pub properties: Vec<(String, String)>,
    /// Trips through the topic before the message is dead-lettered (≥ 1).
    pub attempts: u32,
    /// Time between producing the first retry copy and running it again.
    pub delay: Duration,
    /// The delay doubles with each further trip, up to this (equal to `delay`: every
    /// trip waits the same).
    pub max_delay: Duration,
}

impl RetryTopic {
    /// How long the copy of trip `trip` (1-based) waits: `delay`, doubled per trip
    /// after the first, at most `max_delay` (and never less than `delay`).
    pub fn delay_of_trip(&self, trip: u32) -> Duration {
        let doubled = self.delay.saturating_mul(1u32 << trip.saturating_sub(1).min(20));
        doubled.min(self.max_delay).max(self.delay)
    }
}

/// Everything a stage needs to know to run.
#[derive(Debug, Clone)]
pub struct StageSpec {
    /// Stage name (trail hop, metrics, `actio-stage` on DLQ copies).
    pub name: String,
    /// Consumer group (`<pipeline>.<stage>`).
    pub group: String,
    /// Input topic.
    pub input: String,
    /// Dead-letter topic.
    pub dlq: Arc<str>,
    /// Ordering mode.
    pub ordering: Ordering,
    /// Most messages held per partition between watermark and consumed head.
    pub max_in_flight_per_partition: usize,
    /// Most messages held by the stage.
    pub max_in_flight: usize,
    /// How often the watermarks are committed.
    pub commit_interval: Duration,
    /// How long revoked partitions and shutdown may take to finish in-flight work.
    pub drain_timeout: Duration,
    /// Retries of transient handler failures.
    pub retry: RetryPolicy,
    /// Worker threads of the stage's pool.
    pub threads: usize,
    /// Start from the earliest offset when the group has no commit.
    pub from_earliest: bool,
    /// Transport properties for the consumer and producer (Kafka: librdkafka's).
    pub properties: Vec<(String, String)>,
}

/// A stage that cannot go on.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StageError {
    /// The bus failed in a way retrying will not fix.
    #[error("stage {stage}: bus: {source}")]
    Bus {
        /// Stage name.
        stage: String,
        /// The bus error.
        #[source]
        source: BusError,
    },
    /// An output could not be delivered; the stage stopped without committing past it.
    #[error("stage {stage}: delivery of the output of {tp}@{offset} failed: {message}")]
    Delivery {
        /// Stage name.
        stage: String,
        /// Source partition.
        tp: TopicPartition,
        /// Source offset.
        offset: Offset,
        /// The bus's message.
        message: String,
    },
    /// The worker pool could not be built.
    #[error("stage {stage}: thread pool: {message}")]
    Pool {
        /// Stage name.
        stage: String,
        /// What failed.
        message: String,
    },
}

/// How to stop a stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopMode {
    /// Stop fetching, drain in-flight work, commit, flush, leave the group.
    Graceful,
    /// Stop at once without committing or leaving (a crash, for tests and drills).
    Abort,
}

/// A running stage.
pub struct StageHandle {
    stop: Arc<Mutex<Option<StopMode>>>,
    metrics: Arc<dyn Fn() -> StageMetrics + Send + Sync>,
    join: Option<JoinHandle<Result<StageMetrics, StageError>>>,
    name: String,
}

impl std::fmt::Debug for StageHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StageHandle").field("name", &self.name).finish_non_exhaustive()
    }
}

impl StageHandle {
    /// A snapshot of the stage's metrics.
    pub fn metrics(&self) -> StageMetrics {
        (self.metrics)()
    }

    /// A cloneable source of metrics snapshots, for readers on other threads (an
    /// HTTP endpoint) that must not own the handle.
    pub fn metrics_source(&self) -> Arc<dyn Fn() -> StageMetrics + Send + Sync> {
        self.metrics.clone()
    }

    /// The stage's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Asks the stage to stop; [`StageHandle::join`] waits for it.
    pub fn stop(&self, mode: StopMode) {
        let mut s = self.stop.lock();
        if s.is_none() {
            *s = Some(mode);
        }
    }

    /// Whether the stage's thread has ended (stopped or failed).
    pub fn is_finished(&self) -> bool {
        self.join.as_ref().is_none_or(|j| j.is_finished())
    }

    /// Waits for the stage to end; returns its final metrics.
    pub fn join(mut self) -> Result<StageMetrics, StageError> {
        match self.join.take().map(|j| j.join()) {
            Some(Ok(r)) => r,
            Some(Err(_)) | None => Err(StageError::Pool { stage: self.name.clone(), message: "stage thread panicked".into() }),
        }
    }
}

/// Entry point: starts stages.
#[derive(Debug)]
pub struct Stage;

impl Stage {
    /// Joins the stage's group on `bus` and runs it on its own driver thread.
    pub fn spawn<B: Bus>(bus: &B, spec: StageSpec, handler: Arc<dyn Handler>) -> Result<StageHandle, StageError> {
        let name = spec.name.clone();
        let bus_err = |source| StageError::Bus { stage: name.clone(), source };
        let pool = WorkerPool::new(&name, spec.threads)
            .map_err(|e| StageError::Pool { stage: name.clone(), message: e.to_string() })?;
        let producer = bus
            .producer(&ProducerConfig { client_id: format!("{}-producer", spec.group), properties: spec.properties.clone() })
            .map_err(bus_err)?;
        let (done_tx, done_rx) = crossbeam_channel::unbounded();
        let shared = Arc::new(Shared {
            state: Mutex::new(State { parts: AHashMap::new(), epoch: 0, metrics: StageMetrics::new(&spec.name), fatal: None }),
            spec,
            handler,
            producer,
            pool,
            done_tx,
            done_rx,
            ready: Mutex::new(Vec::new()),
        });
        // One consumer per group: the input's, and the retry topic's (its own group,
        // with its properties over the stage's).
        let join = |group: &str, topic: String, extra: &[(String, String)]| {
            let config = ConsumerConfig {
                group: group.to_string(),
                topics: vec![topic],
                client_id: format!("{group}-consumer"),
                from_earliest: shared.spec.from_earliest,
                properties: shared.spec.properties.iter().chain(extra).cloned().collect(),
            };
            bus.consumer(&config, Arc::new(Listener(shared.clone()))).map_err(bus_err)
        };
        let consumer = join(&shared.spec.group, shared.spec.input.clone(), &[])?;
        let retry = match &shared.spec.retry.topic {
            Some(t) => Some(join(&t.group, t.topic.to_string(), &t.properties)?),
            None => None,
        };
        let stop = Arc::new(Mutex::new(None));
        let metrics = {
            let shared = shared.clone();
            Arc::new(move || shared.snapshot()) as Arc<dyn Fn() -> StageMetrics + Send + Sync>
        };
        let join = std::thread::Builder::new()
            .name(format!("{name}-driver"))
            .spawn({
                let stop = stop.clone();
                move || Driver::<B> { shared, consumer, retry, stop }.run()
            })
            .map_err(|e| StageError::Pool { stage: name.clone(), message: e.to_string() })?;
        Ok(StageHandle { stop, metrics, join: Some(join), name })
    }
}

/// One message on its way through a worker.
struct Work {
    rec: Record,
    lane: Option<u64>,
    consumed_ns: i64,
    queue_ns: i64,
}

/// A message whose outputs were all acknowledged (or failed).
struct Done {
    tp: TopicPartition,
    epoch: u64,
    offset: Offset,
    consumed_ns: i64,
    queue_ns: i64,
    service_ns: i64,
    acked_ns: i64,
    dead_lettered: bool,
    sent_to_retry: bool,
    retried: u32,
    error: Option<String>,
}

struct Part {
    epoch: u64,
    lanes: KeyLanes<Work>,
    /// A partition of the stage's retry topic (not its input).
    retry: bool,
    /// Retry partitions only: consumed messages not due yet, in offset order, with
    /// their due time (ns). While any wait the partition stays paused.
    held: VecDeque<(i64, Work)>,
    wm: Watermark,
    /// Waiting messages dropped at revocation: not done, never will be here.
    dropped: usize,
    paused: bool,
    revoking: bool,
    last_committed: Option<Offset>,
}

struct State {
    parts: AHashMap<TopicPartition, Part>,
    epoch: u64,
    metrics: StageMetrics,
    fatal: Option<StageError>,
}

impl State {
    fn in_flight(&self) -> usize {
        self.parts.values().map(|p| p.wm.len()).sum()
    }

    /// Messages from the retry topic waiting for their due time.
    fn held(&self) -> usize {
        self.parts.values().map(|p| p.held.len()).sum()
    }

    fn apply(&mut self, done: Done, stage: &str) {
        let Some(part) = self.parts.get_mut(&done.tp).filter(|p| p.epoch == done.epoch) else {
            return; // the partition was revoked or lost meanwhile
        };
        if let Some(message) = done.error {
            // Not marked done: the watermark stays before it, and the stage stops.
            if self.fatal.is_none() {
                self.fatal = Some(StageError::Delivery { stage: stage.to_string(), tp: done.tp, offset: done.offset, message });
            }
            return;
        }
        if part.wm.done(done.offset) {
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

struct Shared<P: Producer> {
    spec: StageSpec,
    handler: Arc<dyn Handler>,
    producer: P,
    pool: WorkerPool,
    state: Mutex<State>,
    done_tx: Sender<Done>,
    done_rx: Receiver<Done>,
    /// Lane heads admitted in the driver's current poll round, not yet running
    /// (see [`Shared::dispatch_ready`]).
    ready: Mutex<Vec<(TopicPartition, u64, Work)>>,
}

impl<P: Producer> Shared<P> {
    /// Runs the lane heads admitted in this round: all but one on the workers and,
    /// with `inline_last`, the last on the calling (driver) thread. At moderate rates
    /// a round admits one record, which then runs without waking a worker — a futex
    /// wake and two context switches per message saved, thousands per second per
    /// stage, on cores the broker shares. When a round admits several, they run in
    /// parallel on the workers and the driver. A rebalance callback calls this too
    /// (without `inline_last`) before it waits for in-flight work, since heads
    /// admitted in the round it interrupted would otherwise never start.
    fn dispatch_ready(self: &Arc<Self>, inline_last: bool) {
        let mut ready = std::mem::take(&mut *self.ready.lock());
        let last = if inline_last { ready.pop() } else { None };
        for (tp, epoch, work) in ready {
            let shared = self.clone();
            self.pool.spawn(move || shared.run_lane(tp, epoch, work));
        }
        if let Some((tp, epoch, work)) = last {
            self.run_lane(tp, epoch, work);
        }
    }

    fn snapshot(&self) -> StageMetrics {
        let st = self.state.lock();
        let mut m = st.metrics.clone();
        m.in_flight = st.in_flight() as u64;
        m.retry_waiting = st.held() as u64;
        m.retry_partitions = st.parts.values().filter(|p| p.retry).count() as u64;
        m.partitions = st.parts.len() as u64 - m.retry_partitions;
        drop(st);
        m.handler = self.handler.counters();
        m
    }

    fn apply_pending_done(&self) {
        let mut st = self.state.lock();
        while let Ok(done) = self.done_rx.try_recv() {
            st.apply(done, &self.spec.name);
        }
    }

    /// Runs a lane: `work`, then the lane's next messages, until the lane is idle.
    fn run_lane(self: &Arc<Self>, tp: TopicPartition, epoch: u64, mut work: Work) {
        loop {
            let lane = work.lane;
            self.process(&tp, epoch, work);
            let next = {
                let mut st = self.state.lock();
                match st.parts.get_mut(&tp) {
                    Some(p) if p.epoch == epoch => p.lanes.next(lane),
                    _ => None,
                }
            };
            match next {
                Some(w) => work = w,
                None => return,
            }
        }
    }

    fn process(&self, tp: &TopicPartition, epoch: u64, work: Work) {
        let Work { rec, consumed_ns, queue_ns, .. } = work;
        let started = Instant::now();
        // A message from the retry topic carries the attempts and trips made before.
        let from_retry = is_retry_topic(&self.spec, &rec.tp.topic);
        let header = |name| if from_retry { rec.headers.get(name).and_then(headers::parse_i64).map_or(0, |n| n.clamp(0, u32::MAX as i64) as u32) } else { 0 };
        let (earlier_attempts, trips) = (header(headers::ATTEMPTS), header(headers::RETRY_COUNT));
        let mut retried = 0;
        let mut backoff = self.spec.retry.backoff;
        let result = loop {
            let attempt = earlier_attempts.saturating_add(retried + 1);
            let r = std::panic::catch_unwind(AssertUnwindSafe(|| self.handler.handle_attempt(&rec, attempt)))
                .unwrap_or_else(|panic| {
                    let what = panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "unknown panic".into());
                    Err(HandlerError::permanent(format!("handler panicked: {what}")))
                });
            match r {
                Err(e) if e.kind == FailureKind::Transient && retried + 1 < self.spec.retry.attempts => {
                    retried += 1;
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(self.spec.retry.max_backoff);
                }
                r => break r,
            }
        };
        let service_ns = started.elapsed().as_nanos() as i64;
        let attempts = earlier_attempts.saturating_add(retried + 1);
        let (records, dead_lettered, sent_to_retry) = match result {
            Ok(outputs) => {
                let retried_as = from_retry.then_some(trips);
                (outputs.into_iter().map(|o| self.output(&rec, consumed_ns, o, retried_as)).collect::<Vec<_>>(), false, false)
            }
            Err(e) if e.kind == FailureKind::Transient && let Some(t) = self.spec.retry.topic.as_ref().filter(|t| trips < t.attempts) => {
                (vec![self.retry_copy(&rec, &e, t, from_retry, attempts, trips + 1)], false, true)
            }
            Err(e) => (vec![self.dead_letter(&rec, &e, from_retry, attempts)], true, false),
        };
        let done = Done {
            tp: tp.clone(),
            epoch,
            offset: rec.offset,
            consumed_ns,
            queue_ns,
            service_ns,
            acked_ns: 0,
            dead_lettered,
            sent_to_retry,
            retried,
            error: None,
        };
        if records.is_empty() {
            let _ = self.done_tx.send(Done { acked_ns: now_ns(), ..done });
            return;
        }
        let acks = Arc::new(AckGroup { remaining: AtomicUsize::new(records.len()), failed: AtomicBool::new(false), done: Mutex::new(Some(done)), tx: self.done_tx.clone() });
        for r in records {
            let acks2 = acks.clone();
            if let Err(e) = self.producer.send(r, Box::new(move |res| acks2.ack(res))) {
                acks.ack(Err(e));
            }
        }
    }

    /// An output keeps the input's headers and appends this stage's trail hop. Of a
    /// message from the retry topic (`retried_as`: its trips), the retry bookkeeping is
    /// dropped and `actio-retried` says it left its key's order here.
    fn output(&self, rec: &Record, consumed_ns: i64, out: Output, retried_as: Option<u32>) -> OutRecord {
        let mut hdrs = rec.headers.clone();
        if let Some(trips) = retried_as {
            hdrs.0.retain(|(k, _)| ![headers::ATTEMPTS, headers::RETRY_COUNT, headers::RETRY_DUE, headers::ERROR, headers::STAGE, headers::SOURCE].contains(&k.as_str()));
            let mut retried = hdrs.get(headers::RETRIED).map(<[u8]>::to_vec).unwrap_or_default();
            if !retried.is_empty() {
                retried.push(b';');
            }
            retried.extend_from_slice(format!("{}:{trips}", self.spec.name).as_bytes());
            hdrs.set(headers::RETRIED, retried);
        }
        let mut trail = hdrs.get(headers::TRAIL).map(<[u8]>::to_vec).unwrap_or_default();
        headers::append_hop(&mut trail, &self.spec.name, consumed_ns, now_ns());
        hdrs.set(headers::TRAIL, trail);
        OutRecord { topic: out.topic, partition: None, key: rec.key.clone(), payload: out.payload, headers: hdrs }
    }

    /// The input's headers plus why (`actio-error`) and where (`actio-stage`,
    /// `actio-source`) it failed; `actio-source` keeps naming the input the message was
    /// first consumed from when it comes back from the retry topic.
    fn failure_headers(&self, rec: &Record, e: &HandlerError, from_retry: bool) -> Headers {
        let mut hdrs = rec.headers.clone();
        hdrs.set(headers::ERROR, e.message.clone().into_bytes());
        hdrs.set(headers::STAGE, self.spec.name.clone().into_bytes());
        if !(from_retry && hdrs.get(headers::SOURCE).is_some()) {
            hdrs.set(headers::SOURCE, headers::source(&rec.tp.topic, rec.tp.partition, rec.offset));
        }
        hdrs
    }

    /// The DLQ copy: original bytes, key and headers, plus why, where and (after
    /// retries) how many attempts. `actio-source` names the input the message was first
    /// consumed from, also when it comes back from the retry topic.
    fn dead_letter(&self, rec: &Record, e: &HandlerError, from_retry: bool, attempts: u32) -> OutRecord {
        tracing::debug!(stage = %self.spec.name, tp = %rec.tp, offset = rec.offset, error = %e, "dead-lettering");
        let mut hdrs = self.failure_headers(rec, e, from_retry);
        if attempts > 1 {
            hdrs.set(headers::ATTEMPTS, attempts.to_string().into_bytes());
        }
        hdrs.0.retain(|(k, _)| k != headers::RETRY_DUE);
        OutRecord { topic: self.spec.dlq.clone(), partition: None, key: rec.key.clone(), payload: rec.payload.clone(), headers: hdrs }
    }

    /// The retry-topic copy: original bytes, key and headers, plus the attempts so far,
    /// this trip's number, when it is due, the last error and where it came from. Keyed
    /// like the input, so one key's retries share a retry partition and stay in order
    /// among themselves.
    fn retry_copy(&self, rec: &Record, e: &HandlerError, t: &RetryTopic, from_retry: bool, attempts: u32, trip: u32) -> OutRecord {
        tracing::debug!(stage = %self.spec.name, tp = %rec.tp, offset = rec.offset, error = %e, trip, "to the retry topic");
        let mut hdrs = self.failure_headers(rec, e, from_retry);
        let due = now_ns().saturating_add(t.delay_of_trip(trip).as_nanos().min(i64::MAX as u128) as i64);
        hdrs.set(headers::ATTEMPTS, attempts.to_string().into_bytes());
        hdrs.set(headers::RETRY_COUNT, trip.to_string().into_bytes());
        hdrs.set(headers::RETRY_DUE, due.to_string().into_bytes());
        OutRecord { topic: t.topic.clone(), partition: None, key: rec.key.clone(), payload: rec.payload.clone(), headers: hdrs }
    }
}

/// Counts the acknowledgements of one message's outputs; the last one reports Done.
struct AckGroup {
    remaining: AtomicUsize,
    failed: AtomicBool,
    done: Mutex<Option<Done>>,
    tx: Sender<Done>,
}

impl AckGroup {
    fn ack(&self, res: Result<Delivered, BusError>) {
        if let Err(e) = res
            && !self.failed.swap(true, AtomicOrdering::AcqRel)
            && let Some(mut done) = self.done.lock().take()
        {
            done.error = Some(e.to_string());
            let _ = self.tx.send(done);
        }
        if self.remaining.fetch_sub(1, AtomicOrdering::AcqRel) == 1
            && let Some(done) = self.done.lock().take()
        {
            let _ = self.tx.send(Done { acked_ns: now_ns(), ..done });
        }
    }
}

/// Rebalance callbacks, run inside the driver's `poll`.
struct Listener<P: Producer>(Arc<Shared<P>>);

impl<P: Producer> RebalanceListener for Listener<P> {
    fn assigned(&self, partitions: &[TopicPartition]) {
        let s = &self.0;
        // The handler first: it may rebuild state for these partitions (the velocity
        // stage replays their input), and the stage counts them as held, and so can
        // turn ready, only once it has.
        s.handler.partitions_assigned(partitions);
        {
            let mut st = s.state.lock();
            for tp in partitions {
                if !st.parts.contains_key(tp) {
                    st.epoch += 1;
                    let part = Part {
                        epoch: st.epoch,
                        lanes: KeyLanes::new(s.spec.ordering),
                        retry: is_retry_topic(&s.spec, &tp.topic),
                        held: VecDeque::new(),
                        wm: Watermark::new(None),
                        dropped: 0,
                        paused: false,
                        revoking: false,
                        last_committed: None,
                    };
                    st.parts.insert(tp.clone(), part);
                }
            }
            st.metrics.rebalances += 1;
        }
        tracing::info!(stage = %s.spec.name, partitions = ?partitions.iter().map(|t| t.to_string()).collect::<Vec<_>>(), "assigned");
    }

    fn revoking(&self, partitions: &[TopicPartition]) -> Vec<(TopicPartition, Offset)> {
        let s = &self.0;
        s.dispatch_ready(false);
        {
            let mut st = s.state.lock();
            for tp in partitions {
                if let Some(p) = st.parts.get_mut(tp) {
                    p.revoking = true;
                    // Retry copies not due yet are dropped like waiting messages: the
                    // next owner gets them again and honours their due time.
                    p.dropped += p.lanes.clear_waiting() + p.held.len();
                    p.held.clear();
                }
            }
        }
        // Let what is running finish, up to the drain timeout.
        let deadline = Instant::now() + s.spec.drain_timeout;
        loop {
            {
                let mut st = s.state.lock();
                while let Ok(done) = s.done_rx.try_recv() {
                    st.apply(done, &s.spec.name);
                }
                let busy = partitions.iter().any(|tp| st.parts.get(tp).is_some_and(|p| p.wm.in_flight() > p.dropped));
                if !busy || st.fatal.is_some() {
                    break;
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                tracing::warn!(stage = %s.spec.name, "drain timeout: committing what is done");
                break;
            }
            if let Ok(done) = s.done_rx.recv_timeout(left.min(Duration::from_millis(5))) {
                s.state.lock().apply(done, &s.spec.name);
            }
        }
        let mut commits = Vec::new();
        {
            let mut st = s.state.lock();
            for tp in partitions {
                if let Some(p) = st.parts.remove(tp)
                    && let Some(o) = p.wm.committable()
                {
                    commits.push((tp.clone(), o));
                }
            }
            st.metrics.rebalances += 1;
            st.metrics.commits += !commits.is_empty() as u64;
        }
        tracing::info!(stage = %s.spec.name, commits = ?commits.iter().map(|(t, o)| format!("{t}@{o}")).collect::<Vec<_>>(), "revoked");
        s.handler.partitions_revoked(partitions);
        commits
    }

    fn lost(&self, partitions: &[TopicPartition]) {
        let s = &self.0;
        {
            let mut st = s.state.lock();
            for tp in partitions {
                st.parts.remove(tp);
            }
            st.metrics.rebalances += 1;
        }
        tracing::warn!(stage = %s.spec.name, partitions = ?partitions.iter().map(|t| t.to_string()).collect::<Vec<_>>(), "partitions lost");
        s.handler.partitions_revoked(partitions);
    }
}

struct Driver<B: Bus> {
    shared: Arc<Shared<B::Producer>>,
    consumer: B::Consumer,
    /// The retry topic's consumer (its own group), polled without waiting each round.
    retry: Option<B::Consumer>,
    stop: Arc<Mutex<Option<StopMode>>>,
}

/// Most records admitted per driver round before it looks at completions again.
const ADMIT_BATCH: usize = 256;

impl<B: Bus> Driver<B> {
    fn run(mut self) -> Result<StageMetrics, StageError> {
        let s = self.shared.clone();
        let mut last_commit = Instant::now();
        let outcome = loop {
            if let Some(mode) = *self.stop.lock() {
                break Ok(mode);
            }
            s.apply_pending_done();
            if let Some(e) = s.state.lock().fatal.take() {
                break Err(e);
            }
            if last_commit.elapsed() >= s.spec.commit_interval {
                if let Err(e) = self.commit() {
                    break Err(e);
                }
                last_commit = Instant::now();
            }
            self.release_due();
            if let Err(e) = self.flow_control() {
                break Err(e);
            }
            // Retry copies waiting for their due time are not work: poll as when idle.
            // With work in flight the driver only has completions to apply (outputs are
            // produced by whoever ran the work), so it wakes at the commit cadence, not
            // every millisecond: a wakeup per millisecond per stage was CPU the broker
            // on the same cores needed.
            let idle = { let st = s.state.lock(); st.in_flight() == st.held() };
            let mut timeout = if idle { Duration::from_millis(20) } else { s.spec.commit_interval.clamp(Duration::from_millis(1), Duration::from_millis(5)) };
            let mut admitted = 0;
            while admitted < ADMIT_BATCH {
                match self.consumer.poll(timeout) {
                    Ok(Some(rec)) => {
                        self.admit(rec)?;
                        admitted += 1;
                        timeout = Duration::ZERO;
                    }
                    Ok(None) => break,
                    Err(e) if e.is_retriable() => {
                        tracing::warn!(stage = %s.spec.name, error = %e, "poll failed; retrying");
                        break;
                    }
                    Err(e) => return Err(StageError::Bus { stage: s.spec.name.clone(), source: e }),
                }
            }
            self.poll_retry()?;
            s.dispatch_ready(true);
        };
        match outcome {
            Ok(StopMode::Abort) => {
                drop(self.consumer); // no commit, no graceful leave: like a crash
                drop(self.retry);
                Ok(s.snapshot())
            }
            Ok(StopMode::Graceful) => {
                // close() revokes everything through the listener, which drains and
                // returns the watermarks; the bus commits them before leaving.
                let name = s.spec.name.clone();
                self.consumer.close().map_err(|source| StageError::Bus { stage: name.clone(), source })?;
                if let Some(retry) = self.retry {
                    retry.close().map_err(|source| StageError::Bus { stage: name.clone(), source })?;
                }
                s.producer.flush(s.spec.drain_timeout).map_err(|source| StageError::Bus { stage: name, source })?;
                Ok(s.snapshot())
            }
            Err(e) => {
                // Commit what is safely done; nothing past a failed message.
                let _ = self.commit();
                Err(e)
            }
        }
    }

    /// Admits a record into its lane (running it at once if the lane is idle) and
    /// pauses fetching as soon as a cap is reached, so in-flight never exceeds it on
    /// a bus that honours pause at once.
    fn admit(&mut self, rec: Record) -> Result<(), StageError> {
        let s = &self.shared;
        let consumed_ns = now_ns();
        let prev = headers::parse_trail(rec.headers.get(headers::TRAIL).unwrap_or_default())
            .last()
            .map(|h| h.produced_ns)
            .or_else(|| rec.headers.get(headers::CREATED).and_then(headers::parse_i64))
            .or_else(|| rec.timestamp_ms.map(|ms| ms * 1_000_000));
        let queue_ns = prev.map_or(0, |p| consumed_ns - p);
        let tp = rec.tp.clone();
        let (run, pause) = {
            let mut st = s.state.lock();
            let total = st.in_flight() + 1;
            let Some(part) = st.parts.get_mut(&tp) else { return Ok(()) };
            if part.revoking || !part.wm.consumed(rec.offset) {
                return Ok(());
            }
            let lane = part.lanes.lane_of(rec.key.as_deref());
            let mut pause = Vec::new();
            let run = if part.retry && (!part.held.is_empty() || retry_due(&rec) > consumed_ns) {
                // Not due (or behind one that is not): hold it, and stop fetching this
                // retry partition until the held ones have run. Input partitions go on.
                part.held.push_back((retry_due(&rec), Work { rec, lane, consumed_ns, queue_ns }));
                if !part.paused {
                    part.paused = true;
                    pause.push(tp.clone());
                }
                None
            } else {
                part.lanes.admit(lane, Work { rec, lane, consumed_ns, queue_ns }).map(|w| (w, part.epoch))
            };
            if total >= s.spec.max_in_flight {
                for (tp, p) in st.parts.iter_mut().filter(|(_, p)| !p.paused) {
                    p.paused = true;
                    pause.push(tp.clone());
                }
            } else if let Some(p) = st.parts.get_mut(&tp).filter(|p| !p.paused && p.wm.len() >= s.spec.max_in_flight_per_partition) {
                p.paused = true;
                pause.push(tp.clone());
            }
            st.metrics.pauses += pause.len() as u64;
            st.metrics.in_flight_peak = st.metrics.in_flight_peak.max(total as u64);
            (run, pause)
        };
        if let Some((work, epoch)) = run {
            s.ready.lock().push((tp, epoch, work));
        }
        if !pause.is_empty() {
            let name = s.spec.name.clone();
            self.route(&pause, |c, tps| c.pause(tps)).map_err(|source| StageError::Bus { stage: name, source })?;
        }
        Ok(())
    }

    /// Polls the retry topic's consumer without waiting (its rebalance callbacks run in
    /// there too) and admits what it returned.
    fn poll_retry(&mut self) -> Result<(), StageError> {
        let Some(c) = self.retry.as_mut() else { return Ok(()) };
        let mut recs = Vec::new();
        while recs.len() < ADMIT_BATCH {
            match c.poll(Duration::ZERO) {
                Ok(Some(rec)) => recs.push(rec),
                Ok(None) => break,
                Err(e) if e.is_retriable() => {
                    tracing::warn!(stage = %self.shared.spec.name, error = %e, "retry topic poll failed; retrying");
                    break;
                }
                Err(e) => return Err(StageError::Bus { stage: self.shared.spec.name.clone(), source: e }),
            }
        }
        for rec in recs {
            self.admit(rec)?;
        }
        Ok(())
    }

    /// Applies `f` to the input consumer with the input partitions among `tps`, and to
    /// the retry consumer with the retry ones.
    fn route(&mut self, tps: &[TopicPartition], f: impl Fn(&mut B::Consumer, &[TopicPartition]) -> Result<(), BusError>) -> Result<(), BusError> {
        let Some(retry) = self.retry.as_mut() else { return f(&mut self.consumer, tps) };
        let (on_retry, on_input): (Vec<TopicPartition>, Vec<TopicPartition>) = tps.iter().cloned().partition(|tp| is_retry_topic(&self.shared.spec, &tp.topic));
        if !on_input.is_empty() {
            f(&mut self.consumer, &on_input)?;
        }
        if !on_retry.is_empty() {
            f(retry, &on_retry)?;
        }
        Ok(())
    }

    fn commit(&mut self) -> Result<(), StageError> {
        let s = &self.shared;
        let offsets: Vec<(TopicPartition, Offset)> = {
            let st = s.state.lock();
            st.parts
                .iter()
                .filter_map(|(tp, p)| p.wm.committable().filter(|o| Some(*o) != p.last_committed).map(|o| (tp.clone(), o)))
                .collect()
        };
        if offsets.is_empty() {
            return Ok(());
        }
        let (on_retry, on_input): (Vec<_>, Vec<_>) = offsets.into_iter().partition(|(tp, _)| is_retry_topic(&s.spec, &tp.topic));
        for (consumer, offsets) in [(Some(&mut self.consumer), on_input), (self.retry.as_mut(), on_retry)] {
            let Some(consumer) = consumer.filter(|_| !offsets.is_empty()) else { continue };
            match consumer.commit(&offsets) {
                Ok(()) => {
                    let mut st = s.state.lock();
                    for (tp, o) in &offsets {
                        if let Some(p) = st.parts.get_mut(tp) {
                            p.last_committed = Some(*o);
                        }
                    }
                    st.metrics.commits += 1;
                }
                Err(e) if e.is_retriable() => {
                    tracing::warn!(stage = %s.spec.name, error = %e, "commit failed; will retry");
                }
                // A partition moved away between the snapshot and the commit: harmless,
                // the listener committed its watermark on revocation.
                Err(e) => {
                    tracing::warn!(stage = %s.spec.name, error = %e, "commit refused");
                }
            }
        }
        Ok(())
    }

    /// Runs the retry copies whose due time has come, in offset order per partition.
    fn release_due(&mut self) {
        let s = &self.shared;
        let mut runs = Vec::new();
        {
            let mut st = s.state.lock();
            let now = now_ns();
            for (tp, p) in st.parts.iter_mut().filter(|(_, p)| !p.held.is_empty() && !p.revoking) {
                while let Some((due, _)) = p.held.front()
                    && *due <= now
                    && let Some((_, work)) = p.held.pop_front()
                {
                    if let Some(w) = p.lanes.admit(work.lane, work) {
                        runs.push((tp.clone(), p.epoch, w));
                    }
                }
            }
        }
        if !runs.is_empty() {
            s.ready.lock().extend(runs);
            s.dispatch_ready(false);
        }
    }

    /// Resumes paused partitions once they (and the stage) are below half their caps
    /// and, for a retry partition, nothing waits for its due time.
    fn flow_control(&mut self) -> Result<(), StageError> {
        let s = &self.shared;
        let resume = {
            let mut st = s.state.lock();
            if st.in_flight() > s.spec.max_in_flight / 2 {
                return Ok(());
            }
            let per = s.spec.max_in_flight_per_partition;
            st.parts
                .iter_mut()
                .filter(|(_, p)| p.paused && p.held.is_empty() && p.wm.len() <= per / 2)
                .map(|(tp, p)| {
                    p.paused = false;
                    tp.clone()
                })
                .collect::<Vec<_>>()
        };
        if !resume.is_empty() {
            let name = s.spec.name.clone();
            self.route(&resume, |c, tps| c.resume(tps)).map_err(|source| StageError::Bus { stage: name, source })?;
        }
        Ok(())
    }
}

/// Whether `topic` is the stage's retry topic.
fn is_retry_topic(spec: &StageSpec, topic: &str) -> bool {
    spec.retry.topic.as_ref().is_some_and(|t| *t.topic == *topic)
}

/// When a retry copy may run again (ns since the epoch); one without a readable due
/// time runs at once.
fn retry_due(rec: &Record) -> i64 {
    rec.headers.get(headers::RETRY_DUE).and_then(headers::parse_i64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trips_delay_doubles_from_delay_up_to_max_delay() {
        let ms = Duration::from_millis;
        let t = RetryTopic { topic: Arc::from("r"), group: "g".into(), properties: vec![], attempts: 40, delay: ms(100), max_delay: ms(1000) };
        let waits: Vec<Duration> = (1..=6).map(|n| t.delay_of_trip(n)).collect();
        assert_eq!(waits, [ms(100), ms(200), ms(400), ms(800), ms(1000), ms(1000)]);
        assert_eq!(t.delay_of_trip(40), ms(1000), "no overflow on many trips");
        let fixed = RetryTopic { max_delay: ms(100), ..t };
        assert_eq!(fixed.delay_of_trip(5), ms(100));
    }
}
