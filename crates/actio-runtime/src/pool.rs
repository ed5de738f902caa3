//! The stage's worker threads: a fixed set of threads taking jobs (lane heads) from
//! one channel.
//!
//! Why not rayon's pool: a stage's jobs are short (a few µs of rules, windows and
//! scoring) and arrive at moderate rates, so between poll batches the workers are idle,
//! and idling is what rayon makes expensive: an idle rayon worker calls `sched_yield`
//! for 32 rounds before it sleeps. BENCHMARKS.md, "Worker pool: channel vs rayon"
//! (`benches/pool.rs`, jobs of 5 µs, 2 threads, on the project's 2-core machine): at
//! 3,000 batches/s of one job the process used 33 % of a core with rayon (65
//! `sched_yield` per batch) against 10.5 % with this pool (one job per message) and
//! 6.6 % when the calling thread runs the batch's last chunk itself; at 300 batches/s of
//! 16 jobs, 5.7 % against 4.0 / 3.2 %. rayon was not faster at those rates either (its
//! workers are asleep again by the next batch); it won only back to back on a quiet
//! machine, by 14 % with batches of 64 (within noise at 16). When the stages still ran
//! on rayon's pool, `perf` had `__sched_yield` at 28 % of the rules stage's CPU at
//! 3,000 tx/s through three stages on two cores — CPU the Kafka broker on the same
//! machine needed. Here an idle worker yields 4 times (crossbeam's receive backoff),
//! then blocks on the channel (a futex). Work stealing is not needed: lanes are
//! independent jobs of similar size.

use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};

type Job = Box<dyn FnOnce() + Send + 'static>;

/// A fixed pool of named worker threads.
#[doc(hidden)]
pub struct WorkerPool {
    jobs: Option<Sender<Job>>,
    threads: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for WorkerPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerPool").field("threads", &self.threads.len()).finish()
    }
}

impl WorkerPool {
    /// Starts `n` (≥ 1) threads named `<name>-worker-<i>`, their CPU counted in `cpu`.
    #[doc(hidden)]
    pub fn new(name: &str, n: usize, cpu: &actio_core::cpu::CpuMeter) -> std::io::Result<Self> {
        let (tx, rx): (Sender<Job>, Receiver<Job>) = crossbeam_channel::unbounded();
        let mut threads = Vec::with_capacity(n.max(1));
        for i in 0..n.max(1) {
            let rx = rx.clone();
            let cpu = cpu.clone();
            threads.push(std::thread::Builder::new().name(format!("{name}-worker-{i}")).spawn(move || {
                let _counted = cpu.enter();
                for job in rx {
                    job();
                }
            })?);
        }
        Ok(WorkerPool { jobs: Some(tx), threads })
    }

    /// Runs `job` on a free worker (queued until one is).
    #[doc(hidden)]
    pub fn spawn(&self, job: impl FnOnce() + Send + 'static) {
        if let Some(tx) = &self.jobs {
            // Cannot fail: the receivers live as long as the threads, which outlive
            // `jobs` (dropped first in `drop`).
            let _ = tx.send(Box::new(job));
        }
    }
}

impl Drop for WorkerPool {
    fn drop(&mut self) {
        self.jobs = None; // closes the channel: workers finish queued jobs and exit
        let me = std::thread::current().id();
        for t in self.threads.drain(..) {
            // A worker may drop the last reference to the stage (and so the pool).
            if t.thread().id() != me {
                let _ = t.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn runs_every_job_on_its_threads_and_drains_on_drop() {
        let done = Arc::new(AtomicUsize::new(0));
        let pool = WorkerPool::new("t", 3, &Default::default()).unwrap_or_else(|e| panic!("{e}"));
        for _ in 0..1000 {
            let done = done.clone();
            pool.spawn(move || {
                assert!(std::thread::current().name().is_some_and(|n| n.starts_with("t-worker-")));
                done.fetch_add(1, Ordering::Relaxed);
            });
        }
        drop(pool);
        assert_eq!(done.load(Ordering::Relaxed), 1000);
    }
}
