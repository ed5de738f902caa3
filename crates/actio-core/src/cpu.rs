//! CPU time, per thread group: how much CPU a stage (its driver and workers), the
//! load generator or the collector used. `actio plan` sizes deployments from these
//! figures (CPU per message per stage), and `/metrics` exposes them.
//!
//! Why per thread and not per process: one `actio run` holds every stage, the load
//! generator and the collector, and a plan needs each stage's share. Linux keeps
//! each thread's time on CPU in nanoseconds (`/proc/<pid>/task/<tid>/schedstat`,
//! the scheduler's own clock, not 10 ms ticks); reading a file needs no `unsafe`
//! and no extra crate. Elsewhere (or with that file absent) the meters read zero
//! and say so ([`available`]).
//!
//! A [`CpuMeter`] adds up its threads: each calls [`CpuMeter::enter`] when it starts
//! and keeps the guard for its life. Live threads are read when asked; a thread
//! that ends adds its last reading to the meter, so nothing is lost to exits.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Nanoseconds on CPU of the calling thread (`/proc/thread-self/schedstat`).
pub fn thread_ns() -> Option<u64> {
    read_schedstat("/proc/thread-self/schedstat")
}

/// CPU time (user + system) of this whole process so far, every thread's, live or
/// ended (`/proc/self/stat`, in clock ticks of 10 ms).
pub fn process() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // USER_HZ is 100 on every Linux ABI in use (it is fixed by the kernel ABI).
    Some(Duration::from_millis(ticks * 10))
}

/// Whether per-thread CPU time can be read here (Linux with schedstat).
pub fn available() -> bool {
    thread_ns().is_some()
}

fn read_schedstat(path: &str) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.split_whitespace().next()?.parse().ok()
}

fn current_tid() -> Option<u32> {
    // "/proc/thread-self" links to "<pid>/task/<tid>".
    let link = std::fs::read_link("/proc/thread-self").ok()?;
    link.file_name()?.to_str()?.parse().ok()
}

/// The CPU time of a group of threads.
#[derive(Debug, Clone, Default)]
pub struct CpuMeter(Arc<Inner>);

#[derive(Debug, Default)]
struct Inner {
    /// CPU of the threads that have ended, ns.
    ended_ns: AtomicU64,
    /// The live threads' ids.
    live: std::sync::Mutex<Vec<u32>>,
}

impl CpuMeter {
    /// A meter with no threads yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts the calling thread until the guard drops (keep it for the thread's life).
    pub fn enter(&self) -> CpuGuard {
        let tid = current_tid();
        if let Some(t) = tid {
            self.0.live.lock().unwrap_or_else(|e| e.into_inner()).push(t);
        }
        CpuGuard { meter: self.clone(), tid }
    }

    /// CPU used by the meter's threads so far (zero where it cannot be read).
    pub fn total(&self) -> Duration {
        let live: u64 = {
            let live = self.0.live.lock().unwrap_or_else(|e| e.into_inner());
            live.iter().filter_map(|t| read_schedstat(&format!("/proc/self/task/{t}/schedstat"))).sum()
        };
        Duration::from_nanos(self.0.ended_ns.load(Ordering::Relaxed) + live)
    }
}

/// Counts its thread in a [`CpuMeter`] while alive.
#[derive(Debug)]
pub struct CpuGuard {
    meter: CpuMeter,
    tid: Option<u32>,
}

impl Drop for CpuGuard {
    fn drop(&mut self) {
        let Some(tid) = self.tid else { return };
        // Read and retire under the lock, so `total` never counts this thread twice
        // nor misses it.
        let mut live = self.meter.0.live.lock().unwrap_or_else(|e| e.into_inner());
        self.meter.0.ended_ns.fetch_add(thread_ns().unwrap_or(0), Ordering::Relaxed);
        live.retain(|t| *t != tid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Spins until the calling thread has used `d` of CPU (not of wall time: on a
    /// busy machine the two differ).
    fn spin(d: Duration) {
        let start = thread_ns().unwrap_or(0);
        let mut x = 0u64;
        while thread_ns().unwrap_or(u64::MAX) < start + d.as_nanos() as u64 {
            for _ in 0..1000 {
                x = std::hint::black_box(x.wrapping_add(1));
            }
        }
    }

    #[test]
    fn a_meter_counts_its_threads_live_and_ended_and_no_other() {
        if !available() {
            eprintln!("no /proc/thread-self/schedstat here; skipping");
            return;
        }
        let meter = CpuMeter::new();
        let m = meter.clone();
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
        let live = std::thread::spawn(move || {
            let _g = m.enter();
            spin(Duration::from_millis(150));
            let _ = ready_tx.send(());
            let _ = rx.recv();
        });
        let m = meter.clone();
        std::thread::spawn(move || {
            let _g = m.enter();
            spin(Duration::from_millis(100));
        })
        .join()
        .unwrap_or_else(|_| panic!("spinner panicked"));
        let _ = ready_rx.recv();
        // The test thread spins too, uncounted.
        spin(Duration::from_millis(100));
        let t = meter.total();
        assert!(t >= Duration::from_millis(250) && t < Duration::from_millis(300), "counted {t:?} for 250 ms of two threads' spinning");
        let _ = tx.send(());
        live.join().unwrap_or_else(|_| panic!("spinner panicked"));
        let after = meter.total();
        assert!(after >= t && after < t + Duration::from_millis(50), "an ended thread keeps its time: {t:?} then {after:?}");
        assert!(meter.0.live.lock().unwrap_or_else(|e| e.into_inner()).is_empty());
    }

    #[test]
    fn process_time_grows_with_work() {
        if !available() {
            return;
        }
        let before = process().unwrap_or_default();
        spin(Duration::from_millis(120));
        let after = process().unwrap_or_default();
        // Ticks of 10 ms: one may be lost at each end.
        assert!(after >= before + Duration::from_millis(100), "{before:?} → {after:?} over 120 ms of spinning");
    }
}
