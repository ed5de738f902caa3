//! actio's load generator: it offers transactions at a fixed rate, checks what comes
//! out, and reports latency.
//!
//! - [`generate`]: seeded synthetic transactions of any pipeline, drawn as its
//!   scenario file (`pipelines/<name>/scenarios/*.toml`) says: a distribution per
//!   schema field — Zipf-skewed keys (with all-distinct keys, key ordering costs
//!   nothing and a benchmark proves nothing), log-normal amounts, values stable per
//!   entity — and episodes of correlated traffic so rules actually fire.
//! - [`schedule`]: open loop. The i-th transaction has an *intended* send time fixed
//!   by the schedule; a sender that falls behind sends at once and latency still
//!   counts from the intended time (no coordinated omission).
//! - [`collect`]: reads decisions and dead letters; every sent id must come out
//!   exactly once and per-key order must hold. e2e is kept for the run and per second.
//! - [`drive`]: the collector on its own thread over any bus, ready once it has
//!   joined and read past the topics' old records; when the drain after the load ends.
//! - [`report`]: HdrHistogram summaries, `report.json`, `.hgrm` files, `report.html`,
//!   and the e2e per second of the run.
//! - [`broker_pauses`]: the broker JVM's stop-the-world pauses from its GC log, so the
//!   report can mark the seconds in which the broker stood still.
#![deny(missing_docs)]

pub mod broker_pauses;
pub mod collect;
pub mod drive;
pub mod generate;
pub mod report;
pub mod schedule;

pub use collect::{Collector, CollectorStats};
pub use generate::{Generator, Scenario, ScenarioError};
pub use report::{LatencySummary, RunReport, StageHistograms};
pub use schedule::{Schedule, Sender, SenderStats};
