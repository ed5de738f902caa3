//! The contract between a stage's logic and the runtime: the [`Handler`] trait, the
//! [`Context`] it is told, the [`Output`]s it returns and the [`HandlerError`] that
//! decides between a retry and the DLQ.

use std::sync::Arc;

use actio_core::bus::Bytes;
use actio_core::{Offset, Record, TopicPartition};
use hdrhistogram::Histogram;

use crate::metrics::HandlerCounter;
pub use super::deferred::Deferred;
pub use super::hold::Hold;

/// One output of a handler. The runtime adds the headers (the input's, plus this
/// stage's trail hop) and the key, unless set here.
#[derive(Debug, Clone)]
pub struct Output {
    /// Target topic.
    pub topic: Arc<str>,
    /// Message key; `None` keeps the input's. The bus partitions by it, so a stage
    /// that re-keys moves the message to the new key's partition (and order).
    pub key: Option<Bytes>,
    /// Payload.
    pub payload: Bytes,
    /// The steps the handler ran, when it runs several stages in one (a fused
    /// service): the runtime writes one trail hop per step instead of one for itself,
    /// so readers of the trail see every stage. Empty for a handler of one stage.
    pub steps: Vec<StepTime>,
    /// Holds released when this output is acknowledged (failed if it is not): the
    /// messages a join waited with are done once the joined output is delivered.
    pub releases: Vec<Hold>,
    /// Not a message: the input's completion is held until this is released (see
    /// [`Hold`]); `topic` and `payload` are ignored.
    pub hold: Option<Hold>,
    /// Not a message: the result comes later, through this (see [`Deferred`]); the
    /// handler returns it alone.
    pub defer: Option<Deferred>,
    /// A [`Handler::tick`] output's headers (there is no input to take them from):
    /// typically a held message's, so the trail goes on. The runtime appends the
    /// stage's hop. Ignored on outputs of a message.
    pub headers: Option<actio_core::Headers>,
}

/// When one step of a multi-stage handler ran (ns since the Unix epoch). The runtime
/// stretches the first step back to when the message was consumed and the last one
/// forward to when the output is handed to the producer, so the hops tile the stage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepTime {
    /// The step's stage name (its trail hop).
    pub stage: Arc<str>,
    /// When the step started.
    pub started_ns: i64,
    /// When it ended.
    pub ended_ns: i64,
}

impl Output {
    /// An output to `topic` under the input's key.
    pub fn new(topic: impl Into<Arc<str>>, payload: impl Into<Bytes>) -> Self {
        Output { topic: topic.into(), key: None, payload: payload.into(), steps: Vec::new(), releases: Vec::new(), hold: None, defer: None, headers: None }
    }

    /// Holds the input: it is done only when `hold` is released (see [`Hold`]).
    pub fn hold(hold: Hold) -> Self {
        Output { topic: Arc::from(""), key: None, payload: Bytes::new(), steps: Vec::new(), releases: Vec::new(), hold: Some(hold), defer: None, headers: None }
    }

    /// The result comes later: the handler completes `deferred` (see [`Deferred`]).
    pub fn defer(deferred: Deferred) -> Self {
        Output { topic: Arc::from(""), key: None, payload: Bytes::new(), steps: Vec::new(), releases: Vec::new(), hold: None, defer: Some(deferred), headers: None }
    }

    /// The same output (of a tick) with these headers.
    pub fn with_headers(mut self, headers: actio_core::Headers) -> Self {
        self.headers = Some(headers);
        self
    }

    /// The same output, releasing `holds` once it is acknowledged.
    pub fn releasing(mut self, holds: Vec<Hold>) -> Self {
        self.releases = holds;
        self
    }

    /// The same output under `key` instead of the input's.
    pub fn with_key(mut self, key: impl Into<Bytes>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// The same output, made by these steps (see [`Output::steps`]).
    pub fn with_steps(mut self, steps: Vec<StepTime>) -> Self {
        self.steps = steps;
        self
    }
}

/// A latency histogram a handler keeps of its own (see [`Handler::histograms`]): a
/// fused service's per-stage service times.
#[derive(Debug, Clone)]
pub struct HandlerHistogram {
    /// The stage it measures (the `stage` label on `/metrics`).
    pub stage: String,
    /// Time in that stage's logic per message (µs).
    pub service: Histogram<u64>,
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

/// What the runtime knows about a message beyond its bytes, handed to
/// [`Handler::handle`] with it.
///
/// The runtime builds it once per consumed message. For a copy back from the stage's
/// retry topic it reads the bookkeeping it wrote on that copy itself (`actio-source`,
/// `actio-attempts`), so no handler parses runtime headers. Tests build one with
/// [`Context::first`] and the `with_`/`retried_from` methods.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Context {
    /// The input partition the message was first consumed from: the record's own, or
    /// for a retry copy the one its `actio-source` names (the retry partition itself
    /// if the copy carries none, as a copy the runtime did not write may not).
    pub source: TopicPartition,
    /// The message's offset in [`Context::source`].
    pub source_offset: Offset,
    /// Which attempt at this stage this is, from 1, counting every earlier attempt in
    /// place and through the retry topic.
    pub attempt: u32,
    /// Whether the message came back from the stage's retry topic (it then left its
    /// key's order, and `record.tp` is a retry partition, not an input one).
    pub from_retry_topic: bool,
}

impl Context {
    /// The first attempt at `record`, consumed from its input: its own partition and
    /// offset.
    pub fn first(record: &Record) -> Self {
        Context { source: record.tp.clone(), source_offset: record.offset, attempt: 1, from_retry_topic: false }
    }

    /// The same context at attempt `attempt` (1-based).
    pub fn with_attempt(mut self, attempt: u32) -> Self {
        self.attempt = attempt;
        self
    }

    /// The same context for a copy back from the retry topic, first consumed from
    /// `source` at `offset`.
    pub fn retried_from(mut self, source: TopicPartition, offset: Offset) -> Self {
        self.source = source;
        self.source_offset = offset;
        self.from_retry_topic = true;
        self
    }
}

/// The per-message work of a stage. Called on pool threads, concurrently for
/// different keys, never concurrently for one key (unless ordering is unordered).
pub trait Handler: Send + Sync + 'static {
    /// Processes one message into zero or more outputs; `ctx` says where it was first
    /// consumed from and which attempt this is.
    fn handle(&self, record: &Record, ctx: &Context) -> Result<Vec<Output>, HandlerError>;
    /// Counters of the handler's own (e.g. rule evaluation errors), read with every
    /// metrics snapshot and exposed beside the stage's.
    fn counters(&self) -> Vec<HandlerCounter> {
        Vec::new()
    }
    /// Histograms of the handler's own, read with every metrics snapshot: a handler
    /// that runs several stages reports each one's service time here.
    fn histograms(&self) -> Vec<HandlerHistogram> {
        Vec::new()
    }
    /// How often the runtime calls [`Handler::tick`]; `None` (the default): never.
    fn tick_interval(&self) -> Option<std::time::Duration> {
        None
    }
    /// Outputs not caused by a message (a join that timed out), produced by the
    /// runtime under their own key; their [`Output::releases`] are released once they
    /// are acknowledged.
    fn tick(&self) -> Vec<Output> {
        Vec::new()
    }
    /// Partitions were assigned to this stage instance.
    fn partitions_assigned(&self, _partitions: &[TopicPartition]) {}
    /// Partitions were revoked or lost: drop their state.
    fn partitions_revoked(&self, _partitions: &[TopicPartition]) {}
    /// `record` goes to the dead-letter topic for `error` (told before its copy is
    /// sent; the decision trail records the event).
    fn dead_lettered(&self, _record: &Record, _error: &HandlerError) {}
}
