//! Driving a run from the outside: the [`Collector`] reading a pipeline's decisions and
//! dead letters off any [`Bus`] on its own thread, and when to stop waiting for them.
//!
//! [`RunningCollector::spawn`] joins a fresh group on the egress and dead-letter
//! topics from their earliest offsets (nothing the run produces can be skipped) and
//! tells the collector to skip, undecoded, what they held before the run. It is
//! [ready](RunningCollector::is_ready) once it holds every partition of both topics
//! and has read past those old records: load offered before that would be measured
//! against a collector still joining its group, and the run's first decisions would
//! carry that wait in their e2e. It commits what it read every 100 ms so a bus may
//! drop it (the embedded bus keeps records until every group has committed them).
//!
//! [`Drain`] decides when the wait for the last decisions after the load is over, and
//! [`run_report`] puts what the collector and the sender counted into the report, with
//! the e2e per second and, given the broker's GC log, the seconds it stood still
//! ([`per_second`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use actio_core::bus::{BusError, Offset, RebalanceListener, Record};
use actio_core::time::NS_PER_S;
use actio_core::{Bus, Consumer, ConsumerConfig, TopicPartition};
use parking_lot::{Mutex, MutexGuard};

use hdrhistogram::Histogram;

use crate::broker_pauses::{BrokerPauses, DEFAULT_MARK_THRESHOLD, is_marked};
use crate::collect::{E2eBySecond, MAX_SECONDS, MachineSeconds};
use crate::report::{BrokerPauseReport, DecisionCounts, E2E_OUTSIDE_BROKER_PAUSES, RuleHitCount, SecondReport, StageReport, latency_histogram, peak_rss_mib};
use crate::{Collector, LatencySummary, RunReport, Schedule, SenderStats, StageHistograms};

/// Most records the collector reads before it takes the lock and observes them.
const BATCH: usize = 512;

/// How often the collector commits what it read.
const COMMIT_INTERVAL: Duration = Duration::from_millis(100);

/// How long the collector waits for the first record of a batch (then none for the rest).
const POLL_TIMEOUT: Duration = Duration::from_millis(5);

/// How long the collector waits after a retriable poll failure.
const RETRY_PAUSE: Duration = Duration::from_millis(50);

/// How long the collector, holding every partition it reads, may see nothing before
/// it counts the rest of their history as read: the last offsets of a topic written in
/// transactions are commit markers (and aborted records), which a `read_committed`
/// consumer is never given, so the end offset is never reached by a record.
const QUIET_AFTER_HISTORY: Duration = Duration::from_secs(1);

/// The collector's start-up: which partitions of the egress and DLQ topics it must
/// still be assigned or read up to their end offsets from before the run.
struct CollectorStart {
    ready: AtomicBool,
    /// Per partition: its end offset before the run, and whether it is assigned;
    /// and since when every pending partition is assigned and nothing was read.
    pending: Mutex<(Pending, Option<Instant>)>,
}

/// Per partition still to read: its end offset before the run, whether assigned.
type Pending = HashMap<TopicPartition, (Offset, bool)>;

impl CollectorStart {
    fn new(ends: Vec<(TopicPartition, Offset)>) -> Self {
        let pending = ends.into_iter().map(|(tp, end)| (tp, (end, false))).collect();
        CollectorStart { ready: AtomicBool::new(false), pending: Mutex::new((pending, None)) }
    }

    fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// Notes what the collector read; sets `ready` once nothing is pending, or once
    /// it held every pending partition and read nothing for [`QUIET_AFTER_HISTORY`].
    fn read(&self, batch: &[Record]) {
        let mut guard = self.pending.lock();
        let (p, quiet) = &mut *guard;
        for r in batch {
            if let Some((end, _)) = p.get(&r.tp)
                && r.offset + 1 >= *end
            {
                p.remove(&r.tp);
            }
        }
        if !batch.is_empty() || p.values().any(|(_, assigned)| !assigned) {
            *quiet = None;
        } else if quiet.get_or_insert_with(Instant::now).elapsed() >= QUIET_AFTER_HISTORY {
            p.clear();
        }
        self.check(p);
    }

    fn check(&self, p: &mut Pending) {
        // An assigned partition that held nothing has nothing to read.
        p.retain(|_, (end, assigned)| !(*assigned && *end == 0));
        if p.is_empty() {
            self.ready.store(true, Ordering::Relaxed);
        }
    }
}

impl RebalanceListener for CollectorStart {
    fn assigned(&self, partitions: &[TopicPartition]) {
        let mut guard = self.pending.lock();
        let p = &mut guard.0;
        for tp in partitions {
            if let Some(e) = p.get_mut(tp) {
                e.1 = true;
            }
        }
        self.check(p);
    }

    fn revoking(&self, _: &[TopicPartition], _: Option<actio_core::GroupToken>) -> Vec<(TopicPartition, Offset)> {
        Vec::new()
    }

    fn lost(&self, _: &[TopicPartition]) {}
}

/// Where the collector reads and how it joins.
#[derive(Debug, Clone)]
pub struct CollectorConfig {
    /// Names its group, `actio-collector-<run_id>`: a fresh group per run.
    pub run_id: String,
    /// The egress topics: decisions, or transactions a flow ends with (one per flow,
    /// or several a route stage writes).
    pub egress: Vec<String>,
    /// Those of them that carry decisions (the rest carry transactions, known by
    /// their `actio-id` header).
    pub decisions: Vec<String>,
    /// The dead-letter topic.
    pub dlq: String,
    /// Transport properties of its consumer, passed through unchanged.
    pub properties: Vec<(String, String)>,
}

/// The collector could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CollectorError {
    /// The end offsets of a topic it reads could not be had.
    #[error("end offsets of {topic}")]
    EndOffsets {
        /// The topic.
        topic: String,
        /// What the bus said.
        #[source]
        source: BusError,
    },
    /// Its consumer could not join its group.
    #[error("joining the collector group")]
    Join(#[source] BusError),
    /// Its thread could not be started.
    #[error("starting the collector thread")]
    Thread(#[source] std::io::Error),
}

/// Why the collector's thread ended before it was stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CollectorFailure {
    /// A poll failed in a way retrying will not fix.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// The thread panicked.
    #[error("the collector thread panicked")]
    Panicked,
}

/// A [`Collector`] reading a pipeline's decisions and dead letters on its own thread.
#[derive(Debug)]
pub struct RunningCollector {
    collector: Arc<Mutex<Collector>>,
    start: Arc<CollectorStart>,
    stop: Arc<AtomicBool>,
    /// `None` once stopped.
    thread: Option<JoinHandle<Result<(), BusError>>>,
    /// The collecting thread's CPU.
    cpu: actio_core::cpu::CpuMeter,
}

impl std::fmt::Debug for CollectorStart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CollectorStart").field("ready", &self.is_ready()).finish_non_exhaustive()
    }
}

impl RunningCollector {
    /// Starts `collector` on `bus` as `config` says (see the module docs).
    pub fn spawn<B: Bus>(bus: &B, mut collector: Collector, config: &CollectorConfig) -> Result<Self, CollectorError> {
        let mut ends = Vec::new();
        for topic in config.egress.iter().chain([&config.dlq]) {
            let e = bus.end_offsets(topic).map_err(|source| CollectorError::EndOffsets { topic: topic.clone(), source })?;
            ends.extend(e.into_iter().enumerate().map(|(p, end)| (TopicPartition::new(topic.as_str(), p as i32), end)));
        }
        // What the topics held before this run is never this run's: not even decoded.
        collector.skip_before(&ends);
        let start = Arc::new(CollectorStart::new(ends));
        let consumer = bus
            .consumer(
                &ConsumerConfig {
                    group: format!("actio-collector-{}", config.run_id),
                    topics: config.egress.iter().chain([&config.dlq]).cloned().collect(),
                    client_id: "actio-collector".into(),
                    from_earliest: true,
                    properties: config.properties.clone(),
                },
                start.clone(),
            )
            .map_err(CollectorError::Join)?;
        let collector = Arc::new(Mutex::new(collector));
        let stop = Arc::new(AtomicBool::new(false));
        let cpu = actio_core::cpu::CpuMeter::new();
        let thread = {
            let (collector, start, stop, cpu) = (collector.clone(), start.clone(), stop.clone(), cpu.clone());
            let (egress, decisions, dlq) = (config.egress.clone(), config.decisions.clone(), config.dlq.clone());
            std::thread::Builder::new()
                .name("collector".into())
                .spawn(move || {
                    let _counted = cpu.enter();
                    collect(consumer, &collector, &start, &stop, (&egress, &decisions), &dlq)
                })
                .map_err(CollectorError::Thread)?
        };
        Ok(RunningCollector { collector, start, stop, thread: Some(thread), cpu })
    }

    /// CPU time of the collecting thread so far.
    pub fn cpu(&self) -> Duration {
        self.cpu.total()
    }

    /// Whether it holds every partition it reads and has read past the records from
    /// before the run.
    pub fn is_ready(&self) -> bool {
        self.start.is_ready()
    }

    /// Waits until it [is ready](Self::is_ready), at most `timeout`; returns whether it is.
    pub fn wait_ready(&self, timeout: Duration) -> bool {
        let waiting = Instant::now();
        while !self.is_ready() {
            if waiting.elapsed() > timeout {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        true
    }

    /// The collector, locked (its thread waits meanwhile).
    pub fn lock(&self) -> MutexGuard<'_, Collector> {
        self.collector.lock()
    }

    /// Stops reading and waits for its thread; says why it ended early if it did.
    /// The collector stays readable through [`Self::lock`].
    pub fn stop(&mut self) -> Result<(), CollectorFailure> {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(r)) => r.map_err(CollectorFailure::from),
            Some(Err(_)) => Err(CollectorFailure::Panicked),
            None => Ok(()),
        }
    }
}

/// The collector's thread: reads batches, notes the start-up, observes, commits.
fn collect<C: Consumer>(
    mut consumer: C,
    collector: &Mutex<Collector>,
    start: &CollectorStart,
    stop: &AtomicBool,
    (egress, decisions): (&[String], &[String]),
    dlq: &str,
) -> Result<(), BusError> {
    let mut batch = Vec::with_capacity(BATCH);
    let mut positions: HashMap<TopicPartition, Offset> = HashMap::new();
    let mut last_commit = Instant::now();
    let mut sampled_s = i64::MIN;
    while !stop.load(Ordering::Relaxed) {
        let unix_s = actio_core::time::now_ns().div_euclid(NS_PER_S);
        if unix_s != sampled_s {
            sampled_s = unix_s;
            if let Some(t) = actio_core::cpu::MachineTicks::read() {
                collector.lock().machine.sample(unix_s, t);
            }
        }
        if last_commit.elapsed() >= COMMIT_INTERVAL && !positions.is_empty() {
            let offsets: Vec<_> = positions.drain().collect();
            if let Err(e) = consumer.commit(&offsets) {
                tracing::warn!(error = %e, "collector commit failed");
            }
            last_commit = Instant::now();
        }
        batch.clear();
        let mut timeout = POLL_TIMEOUT;
        while batch.len() < BATCH {
            match consumer.poll(timeout) {
                Ok(Some(r)) => batch.push(r),
                Ok(None) => break,
                // A broker restart or a network blip: librdkafka reconnects on its
                // own (ending here reported every later decision as lost).
                Err(e) if e.is_retriable() => {
                    tracing::warn!(error = %e, "collector poll failed; retrying");
                    std::thread::sleep(RETRY_PAUSE);
                    break;
                }
                Err(e) => return Err(e),
            }
            timeout = Duration::ZERO;
        }
        if !start.is_ready() {
            start.read(&batch);
        }
        if batch.is_empty() {
            continue;
        }
        let now = actio_core::time::now_ns();
        for r in &batch {
            positions.insert(r.tp.clone(), r.offset + 1);
        }
        let mut c = collector.lock();
        for r in &batch {
            if decisions.iter().any(|e| *r.tp.topic == **e) {
                c.observe_decision(r, now);
            } else if egress.iter().any(|e| *r.tp.topic == **e) {
                c.observe_transaction(r, now);
            } else if *r.tp.topic == *dlq {
                c.observe_dead_letter(r, now);
            }
        }
    }
    Ok(())
}

/// Why the wait for the last decisions ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainEnd {
    /// Every transaction sent was decided.
    AllDecided,
    /// `--drain` passed without a new decision.
    Idle,
    /// Interrupted, and `--drain` passed since the load ended.
    Interrupted,
}

/// Whether the wait for the last decisions is over, `draining` after the load ended
/// and `idle` since the last new decision (or the end of the load, if later).
pub fn drain_end(seen: u64, sent: u64, draining: Duration, idle: Duration, interrupted: bool, drain: Duration) -> Option<DrainEnd> {
    if seen >= sent {
        Some(DrainEnd::AllDecided)
    } else if idle >= drain {
        Some(DrainEnd::Idle)
    } else if interrupted && draining >= drain {
        Some(DrainEnd::Interrupted)
    } else {
        None
    }
}

/// The wait for a run's last decisions. It ends when everything sent is decided, or
/// when `drain` has passed without a new decision (a pipeline still working through a
/// backlog is waited for; what is missing then counts as lost). An interrupt caps the
/// wait at `drain` from the end of the load.
#[derive(Debug, Clone)]
pub struct Drain {
    drain: Duration,
    /// When the load ended (first seen ended).
    from: Option<Instant>,
    last_seen: u64,
    last_progress: Instant,
}

impl Drain {
    /// A wait of at most `drain` without a new decision.
    pub fn new(drain: Duration) -> Self {
        Drain { drain, from: None, last_seen: 0, last_progress: Instant::now() }
    }

    /// Notes that `seen` transactions are out so far; once `load_done` (and `sent` is
    /// final), whether the wait is over.
    pub fn check(&mut self, seen: u64, sent: u64, load_done: bool, interrupted: bool) -> Option<DrainEnd> {
        if seen > self.last_seen {
            self.last_seen = seen;
            self.last_progress = Instant::now();
        }
        if !load_done {
            return None;
        }
        let since = *self.from.get_or_insert_with(Instant::now);
        drain_end(seen, sent, since.elapsed(), self.last_progress.max(since).elapsed(), interrupted, self.drain)
    }
}

/// Rule ids the report lists, most hits first.
const TOP_RULE_HITS: usize = 15;

/// What a run's report says beyond what the collector and the sender counted.
#[derive(Debug, Clone, Copy)]
pub struct RunFacts<'a> {
    /// The pipeline's name.
    pub pipeline: &'a str,
    /// The bus's name (`embedded`, `kafka`).
    pub bus: &'a str,
    /// The run's id.
    pub run_id: &'a str,
    /// The decision outcomes the schema declares, in its order.
    pub outcomes: &'a [String],
    /// The pipeline's stages in order, each with its p99 budget in ms if declared.
    pub stages: &'a [(&'a str, Option<f64>)],
    /// The load offered.
    pub schedule: &'a Schedule,
    /// How long the load ran, s (shorter than the schedule when interrupted).
    pub load_secs: f64,
    /// When the load started, ns since the epoch: the per-second series starts in
    /// its second.
    pub load_started_ns: i64,
    /// The broker's pauses, from its GC log read after the run (Kafka runs given one).
    pub broker_pauses: Option<&'a BrokerPauses>,
    /// The pipeline's graph, for the HTML report.
    pub graph: Option<&'a crate::report::StageGraph>,
}


/// The per-second part of a report.
#[derive(Debug, Clone)]
pub struct PerSecond {
    /// Every second, in order.
    pub seconds: Vec<SecondReport>,
    /// The e2e of the seconds not marked, merged (`None` without the broker's pauses).
    pub outside: Option<Histogram<u64>>,
    /// The broker's pauses within those seconds.
    pub broker: Option<BrokerPauseReport>,
    /// Median of the p99s of the seconds with a sample, µs.
    pub median_p99_us: Option<u64>,
    /// The machine's steal over the load's seconds, percent (`None`: not sampled).
    pub steal_pct: Option<f64>,
}

/// A percentage to one decimal, as the report shows it.
fn tenths(pct: f64) -> f64 {
    (pct * 10.0).round() / 10.0
}

fn ms_of_ns(ns: i64) -> f64 {
    (ns as f64 / 1000.0).round() / 1000.0
}

/// The per-second series: from the second the load started in (or the first seen, if
/// earlier) to the last second seen (or the load's last, if later), seconds without a
/// sample included. With `broker`, each second gets the time the broker was stopped in
/// it, is marked from `threshold` up, and the unmarked seconds' e2e is merged. Each
/// second gets the machine's steal in it, where it was sampled.
pub fn per_second(by: &E2eBySecond, machine: &MachineSeconds, load_started_ns: i64, load_secs: f64, broker: Option<&BrokerPauses>, threshold: Duration) -> PerSecond {
    let load_s = load_started_ns.div_euclid(NS_PER_S);
    let load_end_s = load_started_ns.saturating_add((load_secs.max(0.0) * 1e9) as i64).div_euclid(NS_PER_S);
    let (first, last) = by.span().unwrap_or((load_s, load_end_s));
    let to = last.max(load_end_s);
    let from = first.min(load_s).max(to - MAX_SECONDS as i64 + 1);
    let n = (to - from + 1) as usize;
    let stopped = broker.map(|b| b.stopped_ns_by_second(from, n));
    let mut outside = broker.map(|_| latency_histogram());
    let mut seen = by.seconds().skip_while(|s| s.unix_s < from).peekable();
    let mut seconds = Vec::with_capacity(n);
    for (i, unix_s) in (from..=to).enumerate() {
        let stopped_ns = stopped.as_ref().map(|v| v[i]);
        let marked = stopped_ns.is_some_and(|ns| is_marked(ns, threshold));
        let mut sec = SecondReport { unix_s, t_s: unix_s - load_s, decided: 0, p50_us: 0, p99_us: 0, max_us: 0, broker_paused_ms: stopped_ns.map(|ns| ms_of_ns(ns as i64)), broker_paused: marked, steal_pct: machine.second(unix_s).and_then(|t| t.steal_pct()).map(tenths) };
        if let Some(s) = seen.next_if(|s| s.unix_s == unix_s) {
            sec.decided = s.decided;
            if !s.e2e.is_empty() {
                (sec.p50_us, sec.p99_us, sec.max_us) = (s.e2e.value_at_quantile(0.5), s.e2e.value_at_quantile(0.99), s.e2e.max());
            }
            if let Some(out) = outside.as_mut().filter(|_| !marked)
                && out.add(&s.e2e).is_err()
            {
                tracing::warn!(second = unix_s, "a second's e2e could not be merged");
            }
        }
        seconds.push(sec);
    }
    let broker = broker.map(|b| {
        let (lo, hi) = (from.saturating_mul(NS_PER_S), (to + 1).saturating_mul(NS_PER_S));
        let within: Vec<_> = b.pauses.iter().filter(|p| p.end_ns > lo && p.start_ns < hi).collect();
        BrokerPauseReport {
            gc_log: b.files.first().map(|f| f.display().to_string()).unwrap_or_default(),
            log_covers_load_start: b.span_ns.is_some_and(|(a, z)| a <= load_started_ns && load_started_ns <= z),
            mark_threshold_ms: threshold.as_secs_f64() * 1000.0,
            pauses: within.len() as u64,
            paused_ms: ms_of_ns(stopped.iter().flatten().sum::<u64>() as i64),
            longest_ms: ms_of_ns(within.iter().map(|p| p.end_ns - p.start_ns).max().unwrap_or(0)),
            marked_seconds: seconds.iter().filter(|s| s.broker_paused).count() as u64,
        }
    });
    let mut p99s: Vec<u64> = seconds.iter().map(|s| s.p99_us).filter(|p| *p > 0).collect();
    p99s.sort_unstable();
    let median_p99_us = p99s.get(p99s.len() / 2).copied();
    let steal_pct = machine.over(load_s, load_end_s).steal_pct().map(tenths);
    PerSecond { seconds, outside, broker, median_p99_us, steal_pct }
}

/// The run's report, and the histograms written beside it (`e2e`, then the e2e
/// outside broker pauses when the broker's GC log was read, then per stage its
/// runtime `queue`, `service`, `stage` when measured in-process, else the trail's
/// `queue`; then the trail's `process`). `runtime` holds the stages that ran
/// in-process and stopped cleanly.
pub fn run_report(facts: &RunFacts<'_>, c: &Collector, sender: &SenderStats, runtime: &[StageHistograms]) -> (RunReport, Vec<(String, Histogram<u64>)>) {
    let sent = sender.sent.load(Ordering::Relaxed);
    let mut histograms = vec![("e2e".to_string(), c.e2e.clone())];
    let seconds = per_second(&c.e2e_by_second, &c.machine, facts.load_started_ns, facts.load_secs, facts.broker_pauses, DEFAULT_MARK_THRESHOLD);
    if let Some(h) = &seconds.outside {
        histograms.push((E2E_OUTSIDE_BROKER_PAUSES.to_string(), h.clone()));
    }
    let mut stage_reports = Vec::new();
    for &(name, budget_ms) in facts.stages {
        let rt = runtime.iter().find(|h| h.name == name);
        let trail = c.stages.get(name);
        stage_reports.push(StageReport::new(name, rt, trail.map(|t| (&t.queue, &t.process)), budget_ms));
        if let Some(rt) = rt {
            histograms.push((format!("{name}.queue"), rt.queue.clone()));
            histograms.push((format!("{name}.service"), rt.service.clone()));
            histograms.push((format!("{name}.stage"), rt.stage.clone()));
        } else if let Some(t) = trail {
            histograms.push((format!("{name}.queue"), t.queue.clone()));
        }
        if let Some(t) = trail {
            histograms.push((format!("{name}.process"), t.process.clone()));
        }
    }
    let mut top: Vec<RuleHitCount> = c.rule_hits.iter().map(|(k, v)| RuleHitCount { rule: k.clone(), count: *v }).collect();
    top.sort_by(|a, b| b.count.cmp(&a.count).then(a.rule.cmp(&b.rule)));
    top.truncate(TOP_RULE_HITS);
    let report = RunReport {
        pipeline: facts.pipeline.to_string(),
        bus: facts.bus.to_string(),
        run_id: facts.run_id.to_string(),
        rate_target: facts.schedule.total() as f64 / facts.schedule.duration.as_secs_f64(),
        rate_achieved: c.seen() as f64 / facts.load_secs.max(1e-3),
        duration_s: facts.load_secs,
        sent,
        decided: c.stats.decided,
        dlq: c.stats.dlq,
        lost: c.lost(sent),
        duplicates: c.stats.duplicates,
        order_violations: c.stats.order_violations,
        retried: c.stats.retried,
        reordered_by_retry: c.stats.reordered_by_retry,
        decisions: DecisionCounts::new(facts.outcomes, &c.stats.outcomes),
        top_rule_hits: top,
        e2e: LatencySummary::of(&c.e2e),
        stages: stage_reports,
        sender_max_behind_ms: sender.max_behind_us.load(Ordering::Relaxed) as f64 / 1000.0,
        peak_rss_mib: peak_rss_mib(),
        send_failures: sender.failed.load(Ordering::Relaxed),
        e2e_outside_broker_pauses: seconds.outside.as_ref().map(LatencySummary::of),
        second_p99_median_us: seconds.median_p99_us,
        machine_steal_pct: seconds.steal_pct,
        machine_cpu: actio_core::cpu::machine_model(),
        broker_pauses: seconds.broker,
        seconds: seconds.seconds,
        graph: facts.graph.cloned(),
        by_egress: c.stats.by_egress.clone(),
        by_version: c.by_version(),
        version_flips_back: c.stats.version_flips_back,
        version_switches: c.stats.version_switches.clone(),
        cpu: None,
        counters: Default::default(),
    };
    (report, histograms)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn the_drain_waits_while_decisions_arrive_and_ends_when_they_stop() {
        let drain = 10 * S;
        assert_eq!(drain_end(100, 100, Duration::ZERO, Duration::ZERO, false, drain), Some(DrainEnd::AllDecided));
        // A backlog still being worked through, long after --drain: keep waiting.
        assert_eq!(drain_end(50, 100, 300 * S, S, false, drain), None);
        assert_eq!(drain_end(50, 100, 300 * S, 10 * S, false, drain), Some(DrainEnd::Idle));
        // Interrupted: at most --drain from the end of the load, progress or not.
        assert_eq!(drain_end(50, 100, 9 * S, Duration::ZERO, true, drain), None);
        assert_eq!(drain_end(50, 100, 10 * S, Duration::ZERO, true, drain), Some(DrainEnd::Interrupted));
    }

    const NS: i64 = 1_000_000_000;
    const T0: i64 = 1_796_000_000;

    /// Seconds T0..T0+2 with 100 e2e samples each (5, 80, 6 ms), none in T0+3.
    fn three_seconds() -> E2eBySecond {
        let mut by = E2eBySecond::default();
        for (s, e2e_ms) in [(0, 5), (1, 80), (2, 6)] {
            for i in 0..100 {
                by.observe((T0 + s) * NS + i * 1_000_000, true, Some(e2e_ms * 1_000_000));
            }
        }
        by
    }

    fn pauses(p: &[(i64, i64)]) -> BrokerPauses {
        let pauses = p.iter().map(|&(start_ns, end_ns)| crate::broker_pauses::Pause { start_ns, end_ns }).collect();
        BrokerPauses { files: vec!["gc.log".into()], pauses, span_ns: Some((T0 * NS - NS, (T0 + 9) * NS)), unreadable: 0 }
    }

    #[test]
    fn the_seconds_span_the_load_and_marked_ones_are_kept_out_of_the_unpaused_e2e() {
        let by = three_seconds();
        // 60 ms stopped in T0+1, 5 ms in T0+2 (under the threshold).
        let broker = pauses(&[((T0 + 1) * NS + 500_000_000, (T0 + 1) * NS + 560_000_000), ((T0 + 2) * NS, (T0 + 2) * NS + 5_000_000)]);
        let p = per_second(&by, &MachineSeconds::default(), T0 * NS + NS / 2, 3.0, Some(&broker), DEFAULT_MARK_THRESHOLD);
        let rows: Vec<(i64, u64, bool, Option<f64>)> = p.seconds.iter().map(|s| (s.t_s, s.decided, s.broker_paused, s.broker_paused_ms)).collect();
        assert_eq!(rows, [(0, 100, false, Some(0.0)), (1, 100, true, Some(60.0)), (2, 100, false, Some(5.0)), (3, 0, false, Some(0.0))], "T0+3: in the load, nothing seen");
        let outside = p.outside.as_ref().unwrap();
        assert_eq!(outside.len(), 200);
        assert!(outside.max() < 6_100, "the 80 ms second is out: {}", outside.max());
        assert!(p.seconds[1].p99_us >= 79_000 && p.seconds[0].p99_us < 5_100, "{:?}", p.seconds);
        assert_eq!(p.median_p99_us, Some(p.seconds[2].p99_us), "median of 5, 6, 80 ms");
        let b = p.broker.unwrap();
        assert_eq!((b.pauses, b.paused_ms, b.longest_ms, b.marked_seconds, b.log_covers_load_start), (2, 65.0, 60.0, 1, true));
        // A higher threshold marks nothing: the unpaused e2e is then all of it.
        let p = per_second(&by, &MachineSeconds::default(), T0 * NS + NS / 2, 3.0, Some(&broker), Duration::from_millis(61));
        assert_eq!((p.outside.unwrap().len(), p.broker.unwrap().marked_seconds), (300, 0));
    }

    #[test]
    fn without_a_gc_log_the_series_is_there_and_nothing_is_marked() {
        let p = per_second(&three_seconds(), &MachineSeconds::default(), T0 * NS, 1.0, None, DEFAULT_MARK_THRESHOLD);
        assert_eq!(p.seconds.len(), 3, "to the last second seen, past the load's end");
        assert!(p.seconds.iter().all(|s| !s.broker_paused && s.broker_paused_ms.is_none()));
        assert!(p.outside.is_none() && p.broker.is_none());
        // Nothing seen at all: the load's seconds, empty.
        let p = per_second(&E2eBySecond::default(), &MachineSeconds::default(), T0 * NS, 2.0, None, DEFAULT_MARK_THRESHOLD);
        assert_eq!((p.seconds.len(), p.median_p99_us), (3, None));
    }

    #[test]
    fn a_log_of_another_broker_run_is_flagged() {
        let mut broker = pauses(&[]);
        broker.span_ns = Some(((T0 - 100) * NS, (T0 - 50) * NS));
        let p = per_second(&three_seconds(), &MachineSeconds::default(), T0 * NS, 3.0, Some(&broker), DEFAULT_MARK_THRESHOLD);
        assert!(!p.broker.unwrap().log_covers_load_start);
    }

    #[test]
    fn the_drain_starts_when_the_load_ends() {
        let mut d = Drain::new(Duration::ZERO);
        assert_eq!(d.check(5, 10, false, false), None, "still sending");
        assert_eq!(d.check(5, 10, true, false), Some(DrainEnd::Idle));
        assert_eq!(Drain::new(S).check(10, 10, true, false), Some(DrainEnd::AllDecided));
    }
}
