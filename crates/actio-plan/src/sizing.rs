//! Sizing: a shape's model (calibrated from its runs) and the deployment it needs for
//! a target rate and p99.
//!
//! A *shape* is how the stages are grouped into services: each stage alone, or all
//! fused. Its model is calibrated from two runs of that shape at different rates
//! ([`ShapeModel::calibrate`]). Then:
//! - [`ShapeModel::one_process`]: everything in one process on this machine, as
//!   `actio run` runs it (what `actio plan --verify` measures);
//! - [`ShapeModel::deploy`]: each service on replicas of `cores_per_replica` cores:
//!   as few replicas as keep every replica under `max_utilization` and the predicted
//!   p99 under the target; the bus's own CPU split over the services by their work.

use serde::Serialize;

use crate::PlanError;
use crate::calibration::{Quantiles, Run};
use crate::model::{CpuFit, Latency, Pool, fit_quantum, predict};

/// The wait unit assumed when a shape was measured at one rate only (nothing to fit
/// it to): a Linux scheduler slice, 3 ms.
pub const DEFAULT_QUANTUM_US: f64 = 3000.0;
/// Most replicas a plan gives one service.
pub const MAX_REPLICAS: u32 = 256;

/// What a plan must hold.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Target {
    /// Transactions per second.
    pub rate: f64,
    /// End-to-end p99, µs.
    pub p99_us: f64,
    /// Cores of each replica (a pod's CPU limit); its worker threads.
    pub cores_per_replica: u32,
    /// Highest CPU utilization a replica is planned at (0..1).
    pub max_utilization: f64,
}

/// One service's CPU.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ServiceModel {
    /// The service's name (a stage, or fused stages joined by `+`).
    pub name: String,
    /// Its driver's and workers' CPU.
    pub cpu: CpuFit,
}

/// A calibration point as measured.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Measured {
    /// Rate, tx/s.
    pub rate: f64,
    /// e2e p50, µs.
    pub p50_us: f64,
    /// e2e p99, µs.
    pub p99_us: f64,
    /// Cores busy (the whole process).
    pub cores: f64,
    /// The run's directory.
    pub dir: String,
}

/// A shape's model.
#[derive(Debug, Clone, Serialize)]
pub struct ShapeModel {
    /// The services, in chain order.
    pub services: Vec<ServiceModel>,
    /// The bus's threads and the rest of the process (trail writer, reloader).
    pub rest: CpuFit,
    /// The load generator and the collector (in one-process runs only).
    pub clients: CpuFit,
    /// The e2e distribution at light load: at each quantile the lowest of the
    /// calibration runs ([`Quantiles::lower_with`]).
    #[serde(skip)]
    pub base: Quantiles,
    /// The wait unit, µs ([`crate::model`]).
    pub quantum_us: f64,
    /// Whether the unit was fitted (two rates or more) or assumed.
    pub quantum_fitted: bool,
    /// The calibration runs, lightest first.
    pub calibration: Vec<Measured>,
    /// Cores of the machine the calibration ran on.
    pub machine_cores: u32,
    /// The bus calibrated on.
    pub bus: String,
}

/// A prediction for everything in one process.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OneProcess {
    /// Rate, tx/s.
    pub rate: f64,
    /// Cores busy, load generator and collector included.
    pub cores: f64,
    /// Of the machine's cores.
    pub utilization: f64,
    /// `None`: more CPU than the machine has (the backlog grows).
    pub latency: Option<Latency>,
}

/// One service of a deployment.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ServicePlan {
    /// Service name.
    pub name: String,
    /// Replicas (pods).
    pub replicas: u32,
    /// Worker threads per replica.
    pub threads: u32,
    /// Cores busy over all its replicas.
    pub cores: f64,
    /// Each replica's CPU utilization.
    pub utilization: f64,
}

/// A deployment for a target.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Deployment {
    /// The services, in chain order.
    pub services: Vec<ServicePlan>,
    /// Predicted e2e (`None`: cannot hold the rate).
    pub latency: Option<Latency>,
    /// Cores busy in all.
    pub cores: f64,
    /// Whether the predicted p99 is within the target.
    pub meets_target: bool,
    /// Why not, when it does not.
    pub why_not: Option<String>,
}

impl ShapeModel {
    /// The model of the shape `runs` share (at least one run; two rates fit the wait
    /// unit), on a machine of `machine_cores`.
    pub fn calibrate(runs: &[Run], machine_cores: u32) -> Result<ShapeModel, PlanError> {
        let mut runs: Vec<&Run> = runs.iter().collect();
        runs.sort_by(|a, b| a.rate.total_cmp(&b.rate));
        let (Some(first), Some(last)) = (runs.first(), runs.last()) else { return Err(PlanError::NoRuns) };
        let shape = first.shape();
        if let Some(odd) = runs.iter().find(|r| r.shape() != shape || r.bus != first.bus) {
            return Err(PlanError::Mixed(format!("{} ran {} on {}, {} ran {} on {}", first.dir.display(), shape.join(","), first.bus, odd.dir.display(), odd.shape().join(","), odd.bus)));
        }
        let fit = |cores_of: &dyn Fn(&Run) -> f64| CpuFit::through(&runs.iter().map(|r| (r.rate, cores_of(r))).collect::<Vec<_>>());
        let per_s = |r: &Run, s: f64| s / r.cpu.wall_s.max(1e-9);
        let services = shape
            .iter()
            .enumerate()
            .map(|(i, name)| ServiceModel { name: name.clone(), cpu: fit(&|r| per_s(r, r.cpu.services.get(i).map(|s| s.1).unwrap_or(0.0))) })
            .collect();
        let rest = fit(&|r| per_s(r, r.cpu.other_s));
        let clients = fit(&|r| per_s(r, r.cpu.loadgen_s + r.cpu.collector_s));
        let calibration = runs
            .iter()
            .map(|r| Measured { rate: r.rate, p50_us: r.e2e.at(0.5), p99_us: r.e2e.at(0.99), cores: r.cpu.cores(), dir: r.dir.display().to_string() })
            .collect();
        let base = runs.iter().skip(1).fold(first.e2e.clone(), |b, r| b.lower_with(&r.e2e));
        let mut model = ShapeModel {
            services,
            rest,
            clients,
            base,
            quantum_us: DEFAULT_QUANTUM_US,
            quantum_fitted: false,
            calibration,
            machine_cores: machine_cores.max(1),
            bus: first.bus.clone(),
        };
        if last.rate > first.rate * 1.2 {
            let pools = model.one_process_pools(last.rate);
            model.quantum_us = fit_quantum(&model.base, &pools, last.e2e.at(0.99));
            model.quantum_fitted = true;
        }
        Ok(model)
    }

    /// The shape's services' names.
    pub fn shape(&self) -> Vec<&str> {
        self.services.iter().map(|s| s.name.as_str()).collect()
    }

    /// The pipeline's own CPU (services and the rest) at `rate`, cores.
    pub fn pipeline_cores(&self, rate: f64) -> f64 {
        self.services.iter().fold(self.rest, |a, s| a.plus(s.cpu)).cores_at(rate)
    }

    fn one_process_pools(&self, rate: f64) -> [Pool; 1] {
        let cores = self.pipeline_cores(rate) + self.clients.cores_at(rate);
        // A driver and a worker per service, the load generator, the collector.
        let visits = 2 * self.services.len() as u32 + 2;
        [Pool { cores: self.machine_cores, utilization: cores / self.machine_cores as f64, visits }]
    }

    /// Everything in one process on the calibration machine at `rate`.
    pub fn one_process(&self, rate: f64) -> OneProcess {
        let [pool] = self.one_process_pools(rate);
        OneProcess { rate, cores: pool.utilization * pool.cores as f64, utilization: pool.utilization, latency: predict(&self.base, &[pool], self.quantum_us) }
    }

    /// The deployment that holds `target`, or the closest one and why not.
    pub fn deploy(&self, target: &Target) -> Deployment {
        let cores = target.cores_per_replica.max(1);
        let work: f64 = self.services.iter().map(|s| s.cpu.per_tx_us).sum::<f64>().max(1e-9);
        // Each service's CPU at `rate` with its share of the bus's.
        let fits: Vec<CpuFit> = self
            .services
            .iter()
            .map(|s| {
                let share = s.cpu.per_tx_us / work;
                s.cpu.plus(CpuFit { fixed_cores: self.rest.fixed_cores * share, per_tx_us: self.rest.per_tx_us * share })
            })
            .collect();
        let utilization = |f: &CpuFit, replicas: u32| (f.fixed_cores + f.per_tx_us * target.rate / 1e6 / replicas as f64) / cores as f64;
        let mut replicas: Vec<u32> = fits
            .iter()
            .map(|f| (1..=MAX_REPLICAS).find(|&r| utilization(f, r) <= target.max_utilization).unwrap_or(MAX_REPLICAS))
            .collect();
        let predict_with = |replicas: &[u32]| {
            let pools: Vec<Pool> = fits.iter().zip(replicas).map(|(f, &r)| Pool { cores, utilization: utilization(f, r), visits: 2 }).collect();
            predict(&self.base, &pools, self.quantum_us)
        };
        let mut latency = predict_with(&replicas);
        // The hops alone, with no wait: what no number of replicas gets under.
        let floor = predict(&self.base, &[], self.quantum_us).map(|l| l.p99_us).unwrap_or(0.0);
        // More replicas where the utilization is highest, while the target is missed,
        // within reach, and the last one shortened the tail by 1 % at least.
        while floor <= target.p99_us && latency.is_none_or(|l| l.p99_us > target.p99_us) {
            let Some(i) = (0..fits.len()).filter(|&i| replicas[i] < MAX_REPLICAS).max_by(|&a, &b| utilization(&fits[a], replicas[a]).total_cmp(&utilization(&fits[b], replicas[b]))) else { break };
            replicas[i] += 1;
            let next = predict_with(&replicas);
            let better = match (latency, next) {
                (None, _) => true,
                (Some(l), Some(n)) => n.p99_us < l.p99_us * 0.99,
                (Some(_), None) => false,
            };
            if !better {
                replicas[i] -= 1;
                break;
            }
            latency = next;
        }
        let services: Vec<ServicePlan> = self
            .services
            .iter()
            .zip(&fits)
            .zip(&replicas)
            .map(|((s, f), &r)| ServicePlan { name: s.name.clone(), replicas: r, threads: cores, cores: f.fixed_cores * r as f64 + f.per_tx_us * target.rate / 1e6, utilization: utilization(f, r) })
            .collect();
        let meets_target = latency.is_some_and(|l| l.p99_us <= target.p99_us);
        let why_not = match (meets_target, latency) {
            (true, _) => None,
            (false, None) => Some(format!("more than {MAX_REPLICAS} replicas of a service would be needed")),
            (false, Some(_)) if floor > target.p99_us => Some(format!(
                "even with no wait for a core, its hops take {:.1} ms at p99 (the calibration's light-load latency): fewer hops (fusing) or a faster bus, not more replicas",
                floor / 1000.0
            )),
            (false, Some(_)) => Some("more replicas no longer shorten the predicted tail: the wait left is in the hops".into()),
        };
        Deployment { cores: services.iter().map(|s| s.cores).sum(), services, latency, meets_target, why_not }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(base_p99_us: f64, per_tx_us: f64) -> ShapeModel {
        ShapeModel {
            services: vec![ServiceModel { name: "s".into(), cpu: CpuFit { fixed_cores: 0.05, per_tx_us } }],
            rest: CpuFit::default(),
            clients: CpuFit::default(),
            base: Quantiles::new(vec![(0.0, 100.0), (0.5, 200.0), (0.99, base_p99_us), (1.0, base_p99_us * 2.0)]),
            quantum_us: 1500.0,
            quantum_fitted: true,
            calibration: Vec::new(),
            machine_cores: 2,
            bus: "embedded".into(),
        }
    }

    fn target(rate: f64, p99_ms: f64) -> Target {
        Target { rate, p99_us: p99_ms * 1000.0, cores_per_replica: 2, max_utilization: 0.7 }
    }

    #[test]
    fn replicas_grow_with_the_rate_and_keep_each_under_the_cap() {
        let m = model(2_000.0, 50.0);
        // 50 µs per tx: 20,000 tx/s is one core; two cores per replica at ≤ 70 %.
        let one = m.deploy(&target(10_000.0, 35.0));
        assert_eq!(one.services[0].replicas, 1);
        assert!(one.meets_target, "{one:?}");
        let more = m.deploy(&target(100_000.0, 35.0));
        assert!(more.services[0].replicas >= 4, "5 cores of work at ≤ 1.4 per replica: {more:?}");
        assert!(more.services[0].utilization <= 0.7 + 1e-9);
        assert!((more.cores - (0.05 * more.services[0].replicas as f64 + 5.0)).abs() < 1e-9);
    }

    #[test]
    fn a_target_the_hops_alone_miss_gets_no_extra_replicas_and_says_why() {
        // The light-load p99 is 40 ms: no replica count gets under 35.
        let m = model(40_000.0, 50.0);
        let d = m.deploy(&target(3_000.0, 35.0));
        assert_eq!(d.services[0].replicas, 1, "{d:?}");
        assert!(!d.meets_target);
        assert!(d.why_not.as_deref().is_some_and(|w| w.contains("hops")), "{d:?}");
    }
}
