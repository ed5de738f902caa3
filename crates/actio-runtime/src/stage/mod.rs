//! A stage: its public types, and [`Stage::spawn`], which joins the groups and starts
//! the driver thread.
//!
//! **When an offset is committed.** A consumed message is done once every output it
//! produced, or its retry-topic or DLQ copy, has been acknowledged by the bus (`acks`
//! reports it; `State::apply` marks it in its partition's [`Watermark`]). Only a
//! partition's watermark, the first offset not done, is committed: by the driver every
//! `commit_interval`, by the rebalance listener before a partition is released (and
//! through it on a graceful shutdown), and once more by the driver when the stage
//! stops on an error. A failed delivery is never marked done: the stage stops and
//! commits nothing past it. Hence at-least-once, no loss across
//! crashes (the crate docs say the rest: parallelism, retries, back-pressure).
//!
//! The parts, one concern each: `handler` (what a stage's logic implements and is
//! told), `state` (what the driver, the workers and the listener share), `driver`
//! (poll, admit, pause, commit), `worker` (runs lanes: attempts, outputs),
//! `failures` (DLQ and retry copies), `retry_topic` (holding copies until due),
//! `rebalance` (the listener) and `acks` (a message's acknowledgements).
//!
//! [`Watermark`]: crate::Watermark

mod acks;
mod deferred;
mod driver;
mod failures;
mod handler;
mod hold;
mod rebalance;
mod retry_topic;
mod settle;
mod state;
mod txn;
mod worker;

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use actio_core::{Bus, BusError, ConsumerConfig, Offset, Producer as _, ProducerConfig, TopicPartition};
use ahash::AHashMap;
use parking_lot::Mutex;

use crate::lanes::Ordering;
use crate::metrics::StageMetrics;
use crate::pool::WorkerPool;

pub use handler::{Context, Deferred, FailureKind, Handler, HandlerError, HandlerHistogram, Hold, Output, StepTime};
pub use retry_topic::RetryTopic;

use driver::Driver;
use rebalance::Listener;
use state::{Shared, State};

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

/// For tests and embedders of the runtime alone: a pipeline's stages take every value
/// from `actio_pipeline::config`'s `DEFAULT_*` constants instead.
impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy { attempts: 3, backoff: Duration::from_millis(1), max_backoff: Duration::from_millis(50), topic: None }
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
    /// Commit outputs and input offsets in one transaction every `commit_interval`
    /// (see the `txn` module): a crash repeats nothing that `read_committed`
    /// readers see. Needs a bus with transactions (Kafka); on another the stage
    /// says so and runs at-least-once. Handlers that hold messages (a join) cannot
    /// run this way.
    pub exactly_once: bool,
    /// This member's name among its group's, unique among the live ones: its
    /// transactional id is `<group>.<instance>`, and a restarted member that reuses
    /// it fences its predecessor's open transaction at once.
    pub instance: String,
    /// OpenTelemetry: a span per message, child of its `traceparent` (see
    /// [`crate::trace`]); `None` (the default) traces nothing and costs nothing.
    pub tracer: Option<crate::trace::Tracer>,
}

/// A member name unique on this machine: host and process id.
pub fn default_instance() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_else(|_| "host".into());
    format!("{host}-{}", std::process::id())
}

impl StageSpec {
    /// Whether `topic` is this stage's retry topic (asked once per assigned partition;
    /// its records carry the answer from there).
    fn is_retry_topic(&self, topic: &str) -> bool {
        self.retry.topic.as_ref().is_some_and(|t| *t.topic == *topic)
    }
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
        let cpu = actio_core::cpu::CpuMeter::new();
        let pool = WorkerPool::new(&name, spec.threads, &cpu)
            .map_err(|e| StageError::Pool { stage: name.clone(), message: e.to_string() })?;
        let transactional_id = spec.exactly_once.then(|| format!("{}.{}", spec.group, spec.instance));
        let producer = bus
            .producer(&ProducerConfig { client_id: format!("{}-producer", spec.group), properties: spec.properties.clone(), transactional_id: transactional_id.clone() })
            .map_err(bus_err)?;
        let eos = spec.exactly_once && producer.is_transactional();
        if spec.exactly_once && !eos {
            tracing::warn!(stage = %name, "exactly_once: this bus has no transactions; running at-least-once");
        } else if let Some(id) = &transactional_id {
            tracing::info!(stage = %name, transactional_id = %id, commit_interval = ?spec.commit_interval, "exactly-once: outputs and offsets commit in transactions");
        }
        let (done_tx, done_rx) = crossbeam_channel::unbounded();
        let shared = Arc::new(Shared {
            state: Mutex::new(State { parts: AHashMap::new(), epoch: 0, metrics: StageMetrics::new(&spec.name), fatal: None, txn_open: true, tokens: [None, None], no_more_commits: false }),
            eos,
            spec,
            handler,
            producer,
            pool,
            cpu,
            done_tx,
            done_rx,
            ready: Mutex::new(Vec::new()),
            handler_ns: Default::default(),
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
            let retry = group != shared.spec.group;
            bus.consumer(&config, Arc::new(Listener { shared: shared.clone(), retry })).map_err(bus_err)
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
                move || {
                    let _counted = shared.cpu.enter();
                    Driver::<B> { shared, consumer, retry, stop }.run()
                }
            })
            .map_err(|e| StageError::Pool { stage: name.clone(), message: e.to_string() })?;
        Ok(StageHandle { stop, metrics, join: Some(join), name })
    }
}
