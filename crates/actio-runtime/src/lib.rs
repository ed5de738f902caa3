//! actio's stage runtime: one stage of a pipeline, generic over the bus.
//!
//! # Delivery guarantee (at-least-once, per-key order)
//! A consumed message is **done** when every output it produced (or its dead-letter
//! copy) has been acknowledged by the bus. Per partition, the [`Watermark`] is the
//! first offset that is not done; only the watermark is committed, every
//! `commit_interval`, on revocation and on shutdown. So a crash at any moment
//! redelivers at most the messages between the watermark and the consumed head —
//! bounded by `max_in_flight_per_partition` — and loses none.
//!
//! # Parallelism
//! Messages of one partition enter [`KeyLanes`]: a lane per key runs in order, lanes
//! run in parallel on the stage's worker threads. A worker that finishes a lane head
//! produces its outputs (so same-key outputs are produced in order) and takes the
//! next message of the lane itself. The driver thread only polls, admits, commits
//! and pauses; it never sits between two messages of a lane. (The pool is a plain
//! channel of jobs, not rayon's: see `pool.rs` for the measurement behind that.)
//!
//! # Failures and retries
//! A handler error is *permanent* (bad input, a bug; a caught panic is one) or
//! *transient*. A permanent one sends the message to the DLQ at once. A transient one
//! is tried again in place, up to [`RetryPolicy`]`::attempts` with doubling backoff
//! (its lane waits; other lanes go on). If it still fails and the stage has a
//! [`RetryTopic`], the original record (bytes, key, headers) is produced there with
//! `actio-attempts`, `actio-retry-count` (this trip), `actio-retry-due`, `actio-error`,
//! `actio-stage` and `actio-source`. The input offset is done once that copy is
//! acknowledged, as with a DLQ copy: the watermark rule is unchanged, nothing is lost.
//!
//! The stage reads its retry topic with a second consumer, in a group of its own
//! ([`RetryTopic`]`::group`, `<pipeline>.<stage>.retry`), polled by the same driver
//! without waiting. (In the input's group, the cooperative-sticky assignor balances the
//! total partition count, not each topic's: with two replicas it gave one of them three
//! input partitions and the other one plus every retry partition.) A copy that
//! is not due yet is held in memory, in offset order, and its retry partition is
//! paused until every held copy has run (Kafka may still hand over a few fetched
//! ones: they queue behind). The driver moves due copies into their key lanes each
//! round. Input partitions are never paused for a retry, so waiting stalls nothing but
//! the retry partition itself. Held copies are in flight (the retry partition's
//! watermark stays before them): a revocation or a restart drops them and the next
//! owner reads them again, due time included. After `RetryTopic::attempts` trips the
//! message goes to the DLQ, its `actio-source` still naming the input it came from.
//!
//! **Ordering.** A message sent to the retry topic leaves its key's order: later
//! messages of the same key are processed (and, in the fraud pipeline, decided)
//! before it. Its outputs carry `actio-retried: <stage>:<trips>` so a reader can tell.
//!
//! # Back-pressure
//! When a partition holds `max_in_flight_per_partition` messages between its
//! watermark and its consumed head, or the stage holds `max_in_flight`, fetching is
//! paused and resumed below half of that. Memory stays bounded whatever the lag.
#![deny(missing_docs)]

pub mod lanes;
pub mod metrics;
pub mod trace;
#[doc(hidden)] pub mod pool;
mod stage;
pub mod watermark;

pub use lanes::{KeyLanes, Ordering};
pub use metrics::{HandlerCounter, LATENCY_BUCKETS, PROMETHEUS_CONTENT_TYPE, StageMetrics};
pub use stage::{
    Context, Deferred, FailureKind, Handler, HandlerError, HandlerHistogram, Hold, Output, RetryPolicy, RetryTopic, Stage, StageError, StageHandle, StageSpec,
    StepTime, StopMode, default_instance,
};
pub use watermark::Watermark;
