//! The queueing model: CPU as a function of the rate, and the latency a transaction
//! gains waiting for a core.
//!
//! **CPU.** Each group of threads (a service, the bus's threads, the load generator
//! and collector) costs `fixed + per_tx × rate` cores: the fixed part is what its
//! threads spend idle (waking to poll, timers), the rest grows with the traffic. Two
//! calibration rates fit both ([`CpuFit::through`]).
//!
//! **Latency.** A transaction's end-to-end time is what it took at a light load (the
//! base: the calibration run's distribution, hops and handlers included) plus what
//! it waits for a core once the cores get busy. Every thread that handles it (a
//! service's driver and worker, the load generator, the collector) is a visit to a
//! pool of `c` cores at utilization `ρ`; the pool is an M/M/c queue: a visit waits
//! with Erlang C's probability `C(c, cρ)`, and then for an exponential time of mean
//! `q / (c (1 − ρ))`. `q`, the work a thread holds a core for once it runs (a batch,
//! a scheduler slice: not one message's µs, which is why latency grows long before
//! the cores are full), is the one parameter fitted: so that the model gives the
//! p99 measured at the higher calibration rate ([`fit_quantum`]). The sum over
//! visits is sampled (Monte Carlo, a fixed seed: the same inputs give the same
//! figures), which gives its p99 without assuming a shape for the sum.

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::calibration::Quantiles;

/// Samples drawn per prediction.
const SAMPLES: usize = 100_000;

/// CPU of a group of threads: `fixed_cores + per_tx_us × rate / 1e6` cores.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct CpuFit {
    /// Cores used with no traffic (idle polling, timers).
    pub fixed_cores: f64,
    /// CPU per transaction, µs.
    pub per_tx_us: f64,
}

impl CpuFit {
    /// The least-squares line through `(rate, cores)` points; through the origin when
    /// there is one rate only, or the line would give negative CPU at either end.
    pub fn through(points: &[(f64, f64)]) -> CpuFit {
        let n = points.len() as f64;
        let through_origin = || {
            let rr: f64 = points.iter().map(|(r, _)| r * r).sum();
            let rc: f64 = points.iter().map(|(r, c)| r * c).sum();
            CpuFit { fixed_cores: 0.0, per_tx_us: if rr > 0.0 { 1e6 * rc / rr } else { 0.0 } }
        };
        if points.len() < 2 {
            return through_origin();
        }
        let (mr, mc) = (points.iter().map(|p| p.0).sum::<f64>() / n, points.iter().map(|p| p.1).sum::<f64>() / n);
        let var: f64 = points.iter().map(|(r, _)| (r - mr).powi(2)).sum();
        if var <= 0.0 {
            return through_origin();
        }
        let slope = points.iter().map(|(r, c)| (r - mr) * (c - mc)).sum::<f64>() / var;
        let fixed = mc - slope * mr;
        if slope <= 0.0 || fixed < 0.0 {
            return through_origin();
        }
        CpuFit { fixed_cores: fixed, per_tx_us: slope * 1e6 }
    }

    /// Cores at `rate` tx/s.
    pub fn cores_at(&self, rate: f64) -> f64 {
        self.fixed_cores + self.per_tx_us * rate / 1e6
    }

    /// The sum of two groups.
    pub fn plus(self, o: CpuFit) -> CpuFit {
        CpuFit { fixed_cores: self.fixed_cores + o.fixed_cores, per_tx_us: self.per_tx_us + o.per_tx_us }
    }
}

/// A pool of cores a transaction visits.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Pool {
    /// Cores.
    pub cores: u32,
    /// Busy fraction, 0..1.
    pub utilization: f64,
    /// Threads of the pool that handle each transaction.
    pub visits: u32,
}

/// A latency prediction, µs. Only the tail: the model spreads the waits for a core
/// evenly over the visits, which Linux's scheduler does not (most visits find a core
/// at once, a few wait a slice), so the median it would give is too high under load.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Latency {
    /// 99th percentile.
    pub p99_us: f64,
}

/// Erlang C: the probability that an arrival at `c` servers, each busy a fraction
/// `rho` of the time, waits.
pub fn erlang_c(c: u32, rho: f64) -> f64 {
    if rho <= 0.0 {
        return 0.0;
    }
    if rho >= 1.0 {
        return 1.0;
    }
    let a = c as f64 * rho;
    // Σ_{k<c} a^k / k!, and a^c / c!, term by term (no factorial overflow).
    let (mut sum, mut term) = (0.0, 1.0);
    for k in 0..c {
        sum += term;
        term *= a / (k + 1) as f64;
    }
    let top = term / (1.0 - rho);
    top / (sum + top)
}

/// The end-to-end latency when a transaction takes `base` and waits in `pools`, the
/// wait unit being `quantum_us`; `None` when a pool is full (utilization ≥ 1: the
/// backlog grows without bound).
pub fn predict(base: &Quantiles, pools: &[Pool], quantum_us: f64) -> Option<Latency> {
    if pools.iter().any(|p| p.utilization >= 1.0) {
        return None;
    }
    let waits: Vec<(f64, f64, u32)> =
        pools.iter().map(|p| (erlang_c(p.cores.max(1), p.utilization), quantum_us / (p.cores.max(1) as f64 * (1.0 - p.utilization)), p.visits)).collect();
    let mut rng = SmallRng::seed_from_u64(0x5eed);
    let mut samples: Vec<f64> = (0..SAMPLES)
        .map(|_| {
            let mut v = base.at(rng.random::<f64>());
            for &(p_wait, mean, visits) in &waits {
                for _ in 0..visits {
                    // Drawn whether or not it waits: the same draws for every input,
                    // so a prediction grows smoothly with what it is given.
                    let (u, e) = (rng.random::<f64>(), rng.random::<f64>());
                    if u < p_wait {
                        v += -mean * (1.0 - e).ln();
                    }
                }
            }
            v
        })
        .collect();
    samples.sort_by(f64::total_cmp);
    let at = |q: f64| samples[((q * SAMPLES as f64) as usize).min(SAMPLES - 1)];
    Some(Latency { p99_us: at(0.99) })
}

/// The wait unit (µs) with which [`predict`] gives `measured_p99_us` for `pools`:
/// zero when the base alone reaches it, at most 10 s.
pub fn fit_quantum(base: &Quantiles, pools: &[Pool], measured_p99_us: f64) -> f64 {
    let p99 = |q: f64| predict(base, pools, q).map(|l| l.p99_us).unwrap_or(f64::INFINITY);
    let (mut lo, mut hi) = (0.1f64, 1e7f64);
    if p99(lo) >= measured_p99_us {
        return 0.0;
    }
    if p99(hi) <= measured_p99_us {
        return hi;
    }
    // Bisection on a log scale: the p99 grows with the unit.
    for _ in 0..40 {
        let mid = (lo * hi).sqrt();
        if p99(mid) < measured_p99_us {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    (lo * hi).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erlang_c_matches_known_values() {
        // One server: the probability of waiting is the utilization.
        assert!((erlang_c(1, 0.3) - 0.3).abs() < 1e-12);
        // Two servers: 2ρ² / (1 + ρ).
        assert!((erlang_c(2, 0.5) - 2.0 * 0.25 / 1.5).abs() < 1e-12);
        // The textbook case: 10 servers at a = 8 Erlang wait with probability ~0.409.
        assert!((erlang_c(10, 0.8) - 0.4092).abs() < 1e-3);
        assert_eq!((erlang_c(4, 0.0), erlang_c(4, 1.0)), (0.0, 1.0));
    }

    #[test]
    fn the_cpu_line_is_fitted_and_never_negative() {
        let f = CpuFit::through(&[(1000.0, 0.15), (5000.0, 0.35)]);
        assert!((f.fixed_cores - 0.10).abs() < 1e-9 && (f.per_tx_us - 50.0).abs() < 1e-9, "{f:?}");
        assert!((f.cores_at(3000.0) - 0.25).abs() < 1e-9);
        // Falling CPU with rate (noise) is not extrapolated: through the origin.
        let g = CpuFit::through(&[(1000.0, 0.3), (5000.0, 0.2)]);
        assert_eq!(g.fixed_cores, 0.0);
        assert!(g.per_tx_us > 0.0);
        let one = CpuFit::through(&[(2000.0, 0.1)]);
        assert_eq!((one.fixed_cores, one.per_tx_us), (0.0, 50.0));
    }

    #[test]
    fn an_m_m_1_wait_has_the_textbook_tail() {
        // Base 0, one core at ρ = 0.4, unit 1000 µs: P(W > t) = ρ e^{-(1-ρ)t/q}, so
        // the p99 is q/(1-ρ) × ln(ρ/0.01) = 1667 × ln 40 ≈ 6148 µs; 60 % do not wait.
        let zero = Quantiles::new(vec![(0.0, 0.0), (1.0, 0.0)]);
        let l = predict(&zero, &[Pool { cores: 1, utilization: 0.4, visits: 1 }], 1000.0).unwrap_or_else(|| panic!("not full"));
        assert!((l.p99_us - 6148.0).abs() / 6148.0 < 0.05, "{l:?}");
        assert_eq!(predict(&zero, &[Pool { cores: 2, utilization: 1.0, visits: 1 }], 1.0), None);
    }

    #[test]
    fn the_fitted_unit_reproduces_the_p99_it_was_fitted_to() {
        let base = Quantiles::new(vec![(0.0, 100.0), (0.5, 200.0), (0.99, 1500.0), (1.0, 3000.0)]);
        let pools = [Pool { cores: 2, utilization: 0.4, visits: 8 }];
        let q = fit_quantum(&base, &pools, 10_000.0);
        let p99 = predict(&base, &pools, q).map(|l| l.p99_us).unwrap_or_default();
        assert!((p99 - 10_000.0).abs() < 50.0, "unit {q} gives {p99}");
        assert_eq!(fit_quantum(&base, &pools, 1000.0), 0.0, "a p99 the base already has needs no wait");
        // And more load, the same unit: a longer tail.
        let busier = [Pool { cores: 2, utilization: 0.7, visits: 8 }];
        assert!(predict(&base, &busier, q).map(|l| l.p99_us).unwrap_or_default() > 2.0 * p99);
    }
}
