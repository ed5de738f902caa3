//! `actio plan`: size a deployment of a pipeline for a target rate and p99, from
//! measurements rather than by hand.
//!
//! The seeds of this field sized by arithmetic (35 ms per transaction → 28 tx/s per
//! pipe → 107 pipes for 3,000 tx/s). Here a pipeline is measured — two short runs per
//! shape (each stage its own service, and all fused), or runs you already have — and
//! a queueing model ([`model`]) calibrated on them predicts, for any rate, the CPU
//! each service needs and the end-to-end p99 a deployment would see
//! ([`sizing`]). `actio plan --verify` then runs the plan and prints predicted
//! against measured (BENCHMARKS.md, "Capacity plan").
//!
//! What the model knows is what the calibration measured: the hops of the bus it ran
//! on, this machine's cores and scheduler, the scenario's keys. It does not know a
//! broker's own limits (its CPU is not in the process) nor disks or networks other
//! than those the runs crossed.
#![deny(missing_docs)]

use std::path::PathBuf;

pub mod calibration;
pub mod model;
pub mod sizing;

pub use calibration::{Quantiles, Run};
pub use model::{CpuFit, Latency, Pool};
pub use sizing::{Deployment, OneProcess, ServicePlan, ShapeModel, Target};

/// What keeps a plan from being made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PlanError {
    /// A run's report cannot be used.
    #[error("{}: {message}", path.display())]
    Report {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// No run to calibrate on.
    #[error("no calibration run")]
    NoRuns,
    /// Runs of different shapes or buses given as one shape.
    #[error("runs of one shape must share their services and bus: {0}")]
    Mixed(String),
}

/// A shape considered, with its predictions at the target.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Considered {
    /// `separate` or `fused` (or the shape's services, joined).
    pub label: String,
    /// Its model.
    pub model: ShapeModel,
    /// Its deployment for the target.
    pub deployment: Deployment,
    /// Everything in one process here (`actio run`), at the target.
    pub one_process: OneProcess,
}

/// Which of `options` to deploy: of those that hold the target, the one using the
/// fewest cores — unless an earlier one uses at most 10 % more (options come in order
/// of preference: separate services scale and deploy independently); if none holds
/// it, the one with the lowest predicted p99.
pub fn choose(options: &[Considered]) -> Option<usize> {
    let meeting: Vec<usize> = (0..options.len()).filter(|&i| options[i].deployment.meets_target).collect();
    if meeting.is_empty() {
        let p99 = |i: usize| options[i].deployment.latency.map(|l| l.p99_us).unwrap_or(f64::INFINITY);
        return (0..options.len()).min_by(|&a, &b| p99(a).total_cmp(&p99(b)));
    }
    let cores = |i: usize| options[i].deployment.cores;
    let least = meeting.iter().copied().min_by(|&a, &b| cores(a).total_cmp(&cores(b)))?;
    meeting.into_iter().find(|&i| cores(i) <= cores(least) * 1.1)
}
