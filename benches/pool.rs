//! The stage runtime's worker pool (`actio_runtime::pool::WorkerPool`, threads blocking
//! on one crossbeam channel) against rayon, for batches of short jobs like a poll
//! batch's lane heads: each job is ~5 µs of real CPU work (a hash loop, calibrated at
//! start). Every variant has 2 worker threads and dispatches a batch, then waits for it:
//!
//! - `inline`: the calling thread runs the batch itself (reference: the work and the caller's
//!   own sleeps between batches);
//! - `channel_per_job`: one `WorkerPool` job per message (the runtime today), the caller
//!   waits on a counter (the last job unparks it);
//! - `channel_per_worker`: the batch split into 2 chunks, one sent to the pool, the last
//!   run on the calling thread (a batch of 1 never leaves the caller);
//! - `rayon_par_iter`: `ThreadPool::install(|| batch.par_iter().for_each(..))`, 2 threads;
//! - `rayon_scope`: `ThreadPool::scope`, one `spawn` per job, 2 threads.
//!
//! Two parts (BENCHMARKS.md, "Worker pool: channel vs rayon"):
//!
//! - time per batch, back to back (criterion):
//!   `cargo bench -p actio-benches --bench pool -- --warm-up-time 1 --measurement-time 3`
//! - CPU of the whole process per job at fixed moderate rates (3,000 batches/s of 1 job,
//!   1,000/s of 4, 300/s of 16), from `/proc/self/task/*/schedstat` (ns on CPU per thread), in
//!   3 interleaved rounds with medians: `cargo bench -p actio-benches --bench pool -- --cpu`
//!   (`--secs S`, `--rounds R` to change the 3 s and 3 rounds; `--only <variant>` and
//!   `--rate <batches/s>` run one row, e.g. under `perf stat -e syscalls:sys_enter_sched_yield`).
//!
//! Back to back, a worker never goes idle, so rayon's idle spinning (`sched_yield` for
//! ~32 rounds before a worker sleeps) costs nothing there; it shows only in the CPU part.

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

use actio_runtime::pool::WorkerPool;
use criterion::{BenchmarkId, Criterion, Throughput};
use mimalloc::MiMalloc;
use rayon::prelude::*;

// As in the `actio` binary.
#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

/// Worker threads of every pool (a stage's default on this 2-core machine).
const THREADS: usize = 2;
/// CPU time of one job.
const WORK_NS: u128 = 5_000;
const SIZES: [usize; 4] = [1, 4, 16, 64];
/// (batches per second, jobs per batch) of the CPU part.
const RATES: [(u32, usize); 3] = [(3_000, 1), (1_000, 4), (300, 16)];

/// `iters` rounds of a multiply-rotate hash; `black_box` keeps every round.
#[inline(never)]
fn work(seed: u64, iters: u32) -> u64 {
    let mut h = seed;
    for i in 0..iters {
        h = black_box((h ^ u64::from(i)).wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(29));
    }
    h
}

/// Iterations of `work` taking `WORK_NS`, from the fastest of 30 timed runs (the one
/// least disturbed by other processes on the machine).
fn calibrate() -> u32 {
    const N: u32 = 200_000;
    black_box(work(1, N));
    let best = (0..30)
        .map(|_| {
            let t = Instant::now();
            black_box(work(1, N));
            t.elapsed().as_nanos()
        })
        .min()
        .unwrap_or(1)
        .max(1);
    (u128::from(N) * WORK_NS / best) as u32
}

/// Counts a batch's jobs down; the one finishing last unparks the waiting thread.
struct Latch {
    left: AtomicUsize,
    waiter: Thread,
}

impl Latch {
    fn new(n: usize) -> Arc<Latch> {
        Arc::new(Latch { left: AtomicUsize::new(n), waiter: thread::current() })
    }

    fn done(&self) {
        if self.left.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.waiter.unpark();
        }
    }

    fn wait(&self) {
        while self.left.load(Ordering::Acquire) != 0 {
            thread::park();
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Variant {
    Inline,
    ChannelPerJob,
    ChannelPerWorker,
    RayonParIter,
    RayonScope,
}

impl Variant {
    const ALL: [Variant; 5] = [
        Variant::Inline,
        Variant::ChannelPerJob,
        Variant::ChannelPerWorker,
        Variant::RayonParIter,
        Variant::RayonScope,
    ];

    fn name(self) -> &'static str {
        match self {
            Variant::Inline => "inline",
            Variant::ChannelPerJob => "channel_per_job",
            Variant::ChannelPerWorker => "channel_per_worker",
            Variant::RayonParIter => "rayon_par_iter",
            Variant::RayonScope => "rayon_scope",
        }
    }
}

/// One variant with the pool it needs (and no other).
struct Runner {
    variant: Variant,
    channel: Option<WorkerPool>,
    rayon: Option<rayon::ThreadPool>,
    iters: u32,
}

impl Runner {
    fn new(variant: Variant, iters: u32) -> Runner {
        let channel = matches!(variant, Variant::ChannelPerJob | Variant::ChannelPerWorker)
            .then(|| WorkerPool::new("bench", THREADS, &Default::default()).unwrap_or_else(|e| panic!("worker pool: {e}")));
        let rayon = matches!(variant, Variant::RayonParIter | Variant::RayonScope).then(|| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(THREADS)
                .thread_name(|i| format!("rayon-{i}"))
                .build()
                .unwrap_or_else(|e| panic!("rayon pool: {e}"))
        });
        Runner { variant, channel, rayon, iters }
    }

    /// Dispatches every job of `batch` and returns when all have run.
    fn run(&self, batch: &Arc<[u64]>) {
        let iters = self.iters;
        match (self.variant, &self.channel, &self.rayon) {
            (Variant::ChannelPerJob, Some(pool), _) => {
                let latch = Latch::new(batch.len());
                for &seed in batch.iter() {
                    let latch = latch.clone();
                    pool.spawn(move || {
                        black_box(work(seed, iters));
                        latch.done();
                    });
                }
                latch.wait();
            }
            (Variant::ChannelPerWorker, Some(pool), _) => {
                let size = batch.len().div_ceil(THREADS).max(1);
                let chunks = batch.len().div_ceil(size).max(1);
                let latch = Latch::new(chunks - 1);
                for c in 0..chunks - 1 {
                    let (batch, latch) = (batch.clone(), latch.clone());
                    pool.spawn(move || {
                        for &seed in &batch[c * size..(c + 1) * size] {
                            black_box(work(seed, iters));
                        }
                        latch.done();
                    });
                }
                for &seed in &batch[(chunks - 1) * size..] {
                    black_box(work(seed, iters));
                }
                latch.wait();
            }
            (Variant::RayonParIter, _, Some(pool)) => pool.install(|| {
                batch.par_iter().for_each(|&seed| {
                    black_box(work(seed, iters));
                })
            }),
            (Variant::RayonScope, _, Some(pool)) => pool.scope(|s| {
                for &seed in batch.iter() {
                    s.spawn(move |_| {
                        black_box(work(seed, iters));
                    });
                }
            }),
            _ => {
                for &seed in batch.iter() {
                    black_box(work(seed, iters));
                }
            }
        }
    }
}

fn batch(n: usize) -> Arc<[u64]> {
    (0..n as u64).map(|i| i.wrapping_mul(0x2545_F491_4F6C_DD1D)).collect()
}

fn time_per_batch(c: &mut Criterion, iters: u32) {
    let mut g = c.benchmark_group("pool");
    for variant in Variant::ALL {
        let runner = Runner::new(variant, iters);
        for n in SIZES {
            g.throughput(Throughput::Elements(n as u64));
            g.bench_with_input(BenchmarkId::new(variant.name(), n), &batch(n), |b, batch| b.iter(|| runner.run(batch)));
        }
    }
    g.finish();
}

/// Per live thread of this process: (ns on CPU, voluntary context switches).
fn threads_now() -> HashMap<String, (u64, u64)> {
    let mut out = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else { return out };
    for t in dir.flatten() {
        let tid = t.file_name().to_string_lossy().into_owned();
        let path = t.path();
        let ns = std::fs::read_to_string(path.join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()));
        let vcsw = std::fs::read_to_string(path.join("status")).ok().and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("voluntary_ctxt_switches:").and_then(|v| v.trim().parse().ok()))
        });
        if let (Some(ns), Some(vcsw)) = (ns, vcsw) {
            out.insert(tid, (ns, vcsw));
        }
    }
    out
}

/// CPU ns and voluntary switches of the process between two snapshots (threads that
/// exited in between are left out; none do while a variant is measured).
fn delta(before: &HashMap<String, (u64, u64)>, after: &HashMap<String, (u64, u64)>) -> (u64, u64) {
    after.iter().fold((0, 0), |(ns, cs), (tid, &(a_ns, a_cs))| {
        let (b_ns, b_cs) = before.get(tid).copied().unwrap_or((0, 0));
        (ns + a_ns.saturating_sub(b_ns), cs + a_cs.saturating_sub(b_cs))
    })
}

/// utime + stime of the whole process in clock ticks (`/proc/self/stat`), a cross-check.
fn stat_ticks() -> u64 {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = s.rsplit_once(')').map_or("", |(_, a)| a);
    let f: Vec<&str> = after.split_whitespace().collect();
    let field = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    field(11) + field(12) // fields 14 and 15 of proc(5); `after` starts at field 3
}

/// Busy ticks of the whole machine (`/proc/stat`: user, nice, system, irq, softirq; not
/// idle, iowait or steal), to tell how much else ran during a measurement.
fn machine_busy_ticks() -> u64 {
    let s = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<u64> =
        s.lines().next().unwrap_or("").split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
    [0, 1, 2, 5, 6].iter().filter_map(|&i| f.get(i)).sum()
}

/// Runs `runner` at `rate` batches per second for `length`, open loop (a late batch
/// starts at once; none is skipped). Returns batches run and their latencies.
fn paced(runner: &Runner, batch: &Arc<[u64]>, rate: u32, length: Duration) -> (u32, Vec<Duration>) {
    let period = Duration::from_secs(1) / rate;
    let start = Instant::now();
    let mut latencies = Vec::with_capacity((length.as_secs_f64() * f64::from(rate)) as usize + 1);
    let mut k = 0u32;
    loop {
        let due = start + period * k;
        if due >= start + length {
            return (k, latencies);
        }
        let now = Instant::now();
        if due > now {
            thread::sleep(due - now);
        }
        let t = Instant::now();
        runner.run(batch);
        latencies.push(t.elapsed());
        k += 1;
    }
}

struct Sample {
    cpu_pct: f64,
    us_per_job: f64,
    vcsw_per_batch: f64,
    p50_us: f64,
    p99_us: f64,
    stat_pct: f64,
    others_pct: f64,
    achieved: f64,
}

fn measure(variant: Variant, rate: u32, n: usize, length: Duration, iters: u32) -> Sample {
    let runner = Runner::new(variant, iters);
    let batch = batch(n);
    // Threads started, caches and rayon's workers past their first spin.
    paced(&runner, &batch, rate, Duration::from_millis(300));
    let (t0, ticks0, busy0, wall0) = (threads_now(), stat_ticks(), machine_busy_ticks(), Instant::now());
    let (batches, mut lat) = paced(&runner, &batch, rate, length);
    let (t1, ticks1, busy1, wall) = (threads_now(), stat_ticks(), machine_busy_ticks(), wall0.elapsed());
    drop(runner);
    thread::sleep(Duration::from_millis(100)); // let rayon's threads exit before the next variant
    let (ns, vcsw) = delta(&t0, &t1);
    lat.sort_unstable();
    let pct = |q: f64| {
        lat.get(((lat.len() as f64 * q) as usize).min(lat.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1e6)
    };
    let wall_ns = wall.as_nanos() as f64;
    Sample {
        cpu_pct: ns as f64 / wall_ns * 100.0,
        us_per_job: ns as f64 / 1e3 / (f64::from(batches) * n as f64),
        vcsw_per_batch: vcsw as f64 / f64::from(batches),
        p50_us: pct(0.5),
        p99_us: pct(0.99),
        stat_pct: (ticks1 - ticks0) as f64 * 1e7 / wall_ns * 100.0, // 100 ticks/s
        others_pct: (busy1.saturating_sub(busy0).saturating_sub(ticks1 - ticks0)) as f64 * 1e7 / wall_ns * 100.0,
        achieved: f64::from(batches) / wall.as_secs_f64(),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn cpu(iters: u32, length: Duration, rounds: usize, only: Option<&str>, rate_only: Option<u32>) {
    let mut samples: Vec<(usize, Variant, Sample)> = Vec::new();
    println!(
        "round | batches/s × jobs | variant | CPU % of a core | CPU µs/job | vol. ctx sw/batch | p50 / p99 µs/batch | stat % | other processes % | achieved/s"
    );
    for round in 1..=rounds {
        for (r, &(rate, n)) in RATES.iter().enumerate().filter(|(_, (rate, _))| rate_only.is_none_or(|o| o == *rate)) {
            for variant in Variant::ALL.into_iter().filter(|v| only.is_none_or(|o| o == v.name())) {
                let s = measure(variant, rate, n, length, iters);
                println!(
                    "{round} | {rate} × {n} | {} | {:.1} | {:.2} | {:.2} | {:.0} / {:.0} | {:.1} | {:.0} | {:.0}",
                    variant.name(),
                    s.cpu_pct,
                    s.us_per_job,
                    s.vcsw_per_batch,
                    s.p50_us,
                    s.p99_us,
                    s.stat_pct,
                    s.others_pct,
                    s.achieved
                );
                samples.push((r, variant, s));
            }
        }
    }
    println!("\nmedians of {rounds} rounds of {:.1} s:\n", length.as_secs_f64());
    println!(
        "| batches/s × jobs | variant | CPU % of a core | CPU µs per job | overhead µs per job (− inline) | voluntary ctx switches per batch | batch p50 / p99 µs |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (r, &(rate, n)) in RATES.iter().enumerate() {
        let med = |v: Variant, f: fn(&Sample) -> f64| {
            median(samples.iter().filter(|(sr, sv, _)| *sr == r && *sv == v).map(|(_, _, s)| f(s)).collect())
        };
        let inline = med(Variant::Inline, |s| s.us_per_job);
        for variant in Variant::ALL {
            if !samples.iter().any(|(sr, sv, _)| *sr == r && *sv == variant) {
                continue;
            }
            let per_job = med(variant, |s| s.us_per_job);
            println!(
                "| {rate} × {n} | `{}` | {:.1} | {:.2} | {:+.2} | {:.2} | {:.0} / {:.0} |",
                variant.name(),
                med(variant, |s| s.cpu_pct),
                per_job,
                per_job - inline,
                med(variant, |s| s.vcsw_per_batch),
                med(variant, |s| s.p50_us),
                med(variant, |s| s.p99_us),
            );
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let iters = calibrate();
    eprintln!("work: {iters} hash rounds per job ≈ {} µs (fastest of 30 timings)", WORK_NS / 1000);
    if args.iter().any(|a| a == "--cpu") {
        let arg = |name: &str| {
            args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse::<f64>().ok())
        };
        let length = Duration::from_secs_f64(arg("--secs").unwrap_or(3.0));
        let only = args.iter().position(|a| a == "--only").and_then(|i| args.get(i + 1)).map(String::as_str);
        cpu(iters, length, arg("--rounds").map_or(3, |r| r as usize), only, arg("--rate").map(|r| r as u32));
    } else {
        let (ticks0, busy0, wall0) = (stat_ticks(), machine_busy_ticks(), Instant::now());
        let mut c = Criterion::default().configure_from_args();
        time_per_batch(&mut c, iters);
        c.final_summary();
        let (ours, all) = (stat_ticks() - ticks0, machine_busy_ticks().saturating_sub(busy0));
        let secs = wall0.elapsed().as_secs_f64();
        eprintln!(
            "CPU during the run ({secs:.0} s): this process {:.0} %, other processes {:.0} % of a core",
            ours as f64 / secs,
            all.saturating_sub(ours) as f64 / secs
        );
    }
}
