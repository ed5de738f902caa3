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
//! # Back-pressure
//! When a partition holds `max_in_flight_per_partition` messages between its
//! watermark and its consumed head, or the stage holds `max_in_flight`, fetching is
//! paused and resumed below half of that. Memory stays bounded whatever the lag.
#![deny(missing_docs)]

pub mod lanes;
pub mod metrics;
mod pool;
mod stage;
pub mod watermark;

pub use lanes::{KeyLanes, Ordering};
pub use metrics::StageMetrics;
pub use stage::{
    FailureKind, Handler, HandlerError, Output, RetryPolicy, Stage, StageError, StageHandle, StageSpec,
    StopMode,
};
pub use watermark::Watermark;
