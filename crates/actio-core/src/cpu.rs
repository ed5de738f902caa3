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

/// The machine's processor and how many it has, e.g. "2 × AMD EPYC 7B13" (from
/// `/proc/cpuinfo`; `None` elsewhere): a run's figures compare only with runs on the
/// same hardware, and a VM's can change under the same name.
pub fn machine_model() -> Option<String> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let models: Vec<&str> = info.lines().filter_map(|l| l.strip_prefix("model name")).filter_map(|l| l.split_once(':')).map(|(_, m)| m.trim()).collect();
    let first = models.first()?;
    Some(format!("{} × {first}", models.len()))
}

/// The whole machine's CPU time so far, from the first line of `/proc/stat`, in clock
/// ticks: how much of it went to this VM's work and how much the hypervisor gave to
/// other guests while this one had work (steal). A run reports the steal per second:
/// on a shared VM a tail that moves from day to day with the same build is often the
/// hypervisor's, and the report should say so rather than leave it to guesswork.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MachineTicks {
    /// Every state's ticks (user, nice, system, idle, iowait, irq, softirq, steal).
    pub total: u64,
    /// Ticks stolen by the hypervisor.
    pub steal: u64,
}

impl MachineTicks {
    /// Reads `/proc/stat` (`None` elsewhere).
    pub fn read() -> Option<MachineTicks> {
        Self::parse(&std::fs::read_to_string("/proc/stat").ok()?)
    }

    /// The first (`cpu `) line of a `/proc/stat` text.
    pub fn parse(stat: &str) -> Option<MachineTicks> {
        let line = stat.lines().find(|l| l.starts_with("cpu "))?;
        let f: Vec<u64> = line.split_whitespace().skip(1).take(8).map(|v| v.parse().ok()).collect::<Option<_>>()?;
        if f.len() < 8 {
            return None;
        }
        // user nice system idle iowait irq softirq steal (guest time is inside user).
        Some(MachineTicks { total: f.iter().sum(), steal: f[7] })
    }

    /// What passed from `earlier` to `self`.
    pub fn since(&self, earlier: &MachineTicks) -> MachineTicks {
        MachineTicks { total: self.total.saturating_sub(earlier.total), steal: self.steal.saturating_sub(earlier.steal) }
    }

    /// Steal as a share of all ticks, percent (`None` for no ticks).
    pub fn steal_pct(&self) -> Option<f64> {
        (self.total > 0).then(|| 100.0 * self.steal as f64 / self.total as f64)
    }
}

#[cfg(test)]
mod machine_tests {
    use super::*;

    #[test]
    fn proc_stat_is_read_as_total_and_steal() {
        let a = MachineTicks::parse("cpu  100 0 50 800 10 0 5 35 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\n").unwrap();
        assert_eq!(a, MachineTicks { total: 1000, steal: 35 });
        let b = MachineTicks::parse("cpu  150 0 60 880 10 0 5 95 0 0\n").unwrap();
        let d = b.since(&a);
        assert_eq!(d, MachineTicks { total: 200, steal: 60 });
        assert_eq!(d.steal_pct(), Some(30.0));
        assert_eq!(MachineTicks::default().steal_pct(), None);
        assert_eq!(MachineTicks::parse("cpu  1 2 3\n"), None, "a short line is no reading");
        if std::path::Path::new("/proc/stat").exists() {
            assert!(MachineTicks::read().is_some_and(|t| t.total > 0));
        }
        if std::path::Path::new("/proc/cpuinfo").exists() && cfg!(target_arch = "x86_64") {
            let m = machine_model().unwrap();
            let (n, model) = m.split_once(" × ").unwrap();
            assert!(n.parse::<usize>().unwrap() >= 1 && !model.is_empty(), "{m}");
        }
    }
}
