//! `actio run` (whole pipeline in one process) and `actio loadgen` (drive stages that
//! run elsewhere): both offer load on schedule, collect, and report.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use actio_bus_embedded::{EmbeddedBus, EmbeddedConfig};
use actio_core::bus::{Offset, RebalanceListener, Record};
use actio_core::{Bus, Consumer, ConsumerConfig, ProducerConfig, TopicPartition, TopicSpec};
use actio_loadgen::report::{DecisionCounts, RuleHitCount, StageReport, peak_rss_mib};
use actio_loadgen::{Collector, Generator, LatencySummary, RunReport, Scenario, Schedule, Sender, StageHistograms};
use actio_pipeline::Pipeline;
use actio_pipeline::stages::StageHandler;
use actio_runtime::{Stage, StageHandle, StopMode};
use anyhow::{Context, bail};
use parking_lot::Mutex;

use crate::cli::{BusKind, LoadArgs, LoadgenArgs, RunArgs};

/// Longest wait for the collector to join and read past old records before load starts.
const COLLECTOR_START_TIMEOUT: Duration = Duration::from_secs(60);

/// When the collector may be trusted to see every decision at once: it holds every
/// partition of the egress and DLQ topics and has read past the end offsets they had
/// before the run. Until then, load would be measured against a collector still
/// joining its group or skipping old records — the run's first decisions would carry
/// that wait in their e2e.
struct CollectorStart {
    ready: AtomicBool,
    pending: Mutex<std::collections::HashMap<TopicPartition, (Offset, bool)>>,
}

impl CollectorStart {
    fn new(ends: Vec<(TopicPartition, Offset)>) -> Self {
        let pending = ends.into_iter().map(|(tp, end)| (tp, (end, false))).collect();
        CollectorStart { ready: AtomicBool::new(false), pending: Mutex::new(pending) }
    }

    /// Notes what the collector read; sets `ready` once nothing is pending.
    fn read(&self, batch: &[Record]) {
        let mut p = self.pending.lock();
        for r in batch {
            if let Some((end, _)) = p.get(&r.tp)
                && r.offset + 1 >= *end
            {
                p.remove(&r.tp);
            }
        }
        self.check(&mut p);
    }

    fn check(&self, p: &mut std::collections::HashMap<TopicPartition, (Offset, bool)>) {
        // An assigned partition that held nothing has nothing to read.
        p.retain(|_, (end, assigned)| !(*assigned && *end == 0));
        if p.is_empty() {
            self.ready.store(true, Ordering::Relaxed);
        }
    }
}

impl RebalanceListener for CollectorStart {
    fn assigned(&self, partitions: &[TopicPartition]) {
        let mut p = self.pending.lock();
        for tp in partitions {
            if let Some(e) = p.get_mut(tp) {
                e.1 = true;
            }
        }
        self.check(&mut p);
    }

    fn revoking(&self, _: &[TopicPartition]) -> Vec<(TopicPartition, Offset)> {
        Vec::new()
    }

    fn lost(&self, _: &[TopicPartition]) {}
}

pub fn load_pipeline(path: &std::path::Path) -> Result<Pipeline, ExitCode> {
    Pipeline::load(path).map_err(|errors| {
        eprintln!("{} is not valid:", path.display());
        for e in &errors.0 {
            eprintln!("  {e}");
        }
        ExitCode::from(crate::EXIT_CONFIG)
    })
}

/// The scenario the load generator follows: `--scenario`, else the pipeline's own
/// `scenarios/baseline.toml`; `--seed` overrides its seed.
fn scenario(load: &LoadArgs, pipeline: &Pipeline) -> anyhow::Result<Scenario> {
    let path = match &load.scenario {
        Some(p) => p.clone(),
        None => {
            let p = pipeline.dir.join("scenarios/baseline.toml");
            if !p.is_file() {
                bail!("{} has no scenarios/baseline.toml: give the load generator a scenario with --scenario FILE (format: docs/pipeline-model.md)", pipeline.dir.display());
            }
            p
        }
    };
    let s = Scenario::load(&path)?;
    Ok(match load.seed {
        Some(seed) => s.with_seed(seed),
        None => s,
    })
}

pub fn main(args: RunArgs) -> anyhow::Result<ExitCode> {
    let pipeline = match load_pipeline(&args.pipeline) {
        Ok(p) => p,
        Err(code) => return Ok(code),
    };
    match args.bus {
        BusKind::Embedded => {
            let bus = Arc::new(EmbeddedBus::new(EmbeddedConfig::default()));
            drive(&bus, "embedded", &pipeline, &args.load, true, args.threads, &[])
        }
        BusKind::Kafka => {
            let bus = match crate::kafka::bus_or_exit(&pipeline, &args.kafka) {
                Ok(b) => Arc::new(b),
                Err(code) => return Ok(code),
            };
            drive(&bus, "kafka", &pipeline, &args.load, true, args.threads, &[])
        }
    }
}

/// `actio loadgen`: offer load to a pipeline whose stages run as Kafka services.
pub fn loadgen(args: LoadgenArgs) -> anyhow::Result<ExitCode> {
    let pipeline = match load_pipeline(&args.pipeline) {
        Ok(p) => p,
        Err(code) => return Ok(code),
    };
    let bus = match crate::kafka::bus_or_exit(&pipeline, &args.kafka) {
        Ok(b) => Arc::new(b),
        Err(code) => return Ok(code),
    };
    drive(&bus, "kafka", &pipeline, &args.load, false, None, &[])
}

/// Why the wait for the last decisions ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DrainEnd {
    /// Every transaction sent was decided.
    AllDecided,
    /// `--drain` passed without a new decision.
    Idle,
    /// Interrupted, and `--drain` passed since the load ended.
    Interrupted,
}

/// Whether the wait for the last decisions is over, `draining` after the load ended
/// and `idle` since the last new decision (or the end of the load, if later).
fn drain_end(seen: u64, sent: u64, draining: Duration, idle: Duration, interrupted: bool, drain: Duration) -> Option<DrainEnd> {
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

/// Offers load to `pipeline` on `bus`, running its stages in-process when
/// `in_process`, and reports. Exit code 1 if anything was lost.
pub fn drive<B: Bus>(
    bus: &Arc<B>,
    bus_name: &str,
    pipeline: &Pipeline,
    load: &LoadArgs,
    in_process: bool,
    threads: Option<usize>,
    properties: &[(String, String)],
) -> anyhow::Result<ExitCode> {
    let (ingress, egress, dlq) = match (pipeline.ingress(), pipeline.egress(), pipeline.dead_letter()) {
        (Some(i), Some(e), Some(d)) => (i.clone(), e.clone(), d.clone()),
        _ => bail!("the pipeline needs ingress, egress and dead-letter topics"),
    };
    let specs: Vec<TopicSpec> = pipeline.topics.iter().map(|t| TopicSpec { name: t.name.clone(), partitions: t.partitions }).collect();
    bus.create_topics(&specs).context("creating the pipeline's topics")?;

    let started_unix = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    // The pid keeps two load generators started in the same second apart (their
    // collector groups and transaction ids are named after the run).
    let run_id = format!("run-{started_unix}-{}", std::process::id());
    let out = load.out.clone().unwrap_or_else(|| PathBuf::from("results").join(&run_id));

    // Stages first, so they are consuming when load starts.
    let mut stages: Vec<StageHandle> = Vec::new();
    if in_process {
        for w in pipeline.fault_warnings() {
            tracing::warn!("{w}");
        }
        for s in &pipeline.stages {
            let handler = StageHandler::new(pipeline, s).with_restore(bus.clone());
            let mut spec = handler.spec(properties);
            crate::kafka::tune_retry_consumer(&mut spec); // ignored by the embedded bus
            if let Some(t) = threads {
                spec.threads = t.max(1);
            }
            stages.push(Stage::spawn(&**bus, spec, Arc::new(handler)).with_context(|| format!("starting stage {}", s.name))?);
        }
    }

    let schedule = Schedule { start_rate: load.rate as f64, end_rate: load.ramp_to.unwrap_or(load.rate) as f64, duration: load.duration };
    if schedule.start_rate <= 0.0 || schedule.end_rate <= 0.0 || load.duration.is_zero() {
        bail!("--rate, --ramp-to and --duration must be positive");
    }
    let sender = Arc::new(Sender::new(&schedule));
    let collector = Arc::new(Mutex::new(Collector::new(&run_id, sender.key_seq.clone())));
    let stop_collecting = Arc::new(AtomicBool::new(false));

    // The collector reads from the earliest offset (nothing this run produces can be
    // skipped) and load starts once it has read past what the topics held before.
    let mut ends = Vec::new();
    for topic in [&egress.name, &dlq.name] {
        let e = bus.end_offsets(topic).with_context(|| format!("end offsets of {topic}"))?;
        ends.extend(e.into_iter().enumerate().map(|(p, end)| (TopicPartition::new(topic.as_str(), p as i32), end)));
    }
    // What the topics held before this run is never this run's: not even decoded.
    collector.lock().skip_before(&ends);
    let start = Arc::new(CollectorStart::new(ends));
    let mut consumer = bus
        .consumer(
            &ConsumerConfig {
                group: format!("actio-collector-{run_id}"),
                topics: vec![egress.name.clone(), dlq.name.clone()],
                client_id: "actio-collector".into(),
                from_earliest: true,
                properties: properties.to_vec(),
            },
            start.clone(),
        )
        .context("joining the collector group")?;
    let collector_thread = {
        let collector = collector.clone();
        let stop = stop_collecting.clone();
        let (egress, dlq) = (egress.name.clone(), dlq.name.clone());
        let start = start.clone();
        std::thread::Builder::new().name("collector".into()).spawn(move || -> anyhow::Result<()> {
            let mut batch = Vec::with_capacity(512);
            // The collector commits its position so the bus can drop what it read
            // (the embedded bus keeps records until every group has committed them).
            let mut positions: std::collections::HashMap<actio_core::TopicPartition, i64> = std::collections::HashMap::new();
            let mut last_commit = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                if last_commit.elapsed() >= Duration::from_millis(100) && !positions.is_empty() {
                    let offsets: Vec<_> = positions.drain().collect();
                    if let Err(e) = consumer.commit(&offsets) {
                        tracing::warn!(error = %e, "collector commit failed");
                    }
                    last_commit = Instant::now();
                }
                batch.clear();
                let mut timeout = Duration::from_millis(5);
                while batch.len() < 512 {
                    match consumer.poll(timeout) {
                        Ok(Some(r)) => batch.push(r),
                        Ok(None) => break,
                        // A broker restart or a network blip: librdkafka reconnects on
                        // its own (ending here reported every later decision as lost).
                        Err(e) if e.is_retriable() => {
                            tracing::warn!(error = %e, "collector poll failed; retrying");
                            std::thread::sleep(Duration::from_millis(50));
                            break;
                        }
                        Err(e) => return Err(e.into()),
                    }
                    timeout = Duration::ZERO;
                }
                if !start.ready.load(Ordering::Relaxed) {
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
                    if *r.tp.topic == *egress {
                        c.observe_decision(r, now);
                    } else if *r.tp.topic == *dlq {
                        c.observe_dead_letter(r, now);
                    }
                }
            }
            Ok(())
        })?
    };

    let waiting = Instant::now();
    while !start.ready.load(Ordering::Relaxed) {
        if waiting.elapsed() > COLLECTOR_START_TIMEOUT {
            eprintln!("actio: the collector has not caught up with {} within {COLLECTOR_START_TIMEOUT:?}; starting anyway (early decisions may show a longer e2e)", egress.name);
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let producer = bus.producer(&ProducerConfig { client_id: "actio-loadgen".into(), properties: properties.to_vec() }).context("creating the load generator's producer")?;
    let mut generator = Generator::new(pipeline.schema.clone(), &scenario(load, pipeline)?, &run_id)?;
    let stop_sending = Arc::new(AtomicBool::new(false));
    let sender_thread = {
        let sender = sender.clone();
        let stop = stop_sending.clone();
        let topic = ingress.name.clone();
        let key = pipeline.key.clone();
        let schema = pipeline.schema.clone();
        std::thread::Builder::new().name("loadgen".into()).spawn(move || {
            sender.run(&producer, &topic, &mut generator, &schema, &schedule, |tx| key.key(tx), &stop, |_| {});
            let _ = actio_core::Producer::flush(&producer, Duration::from_secs(30));
        })?
    };

    let term = Arc::new(AtomicBool::new(false));
    let _ = signal_hook::flag::register(signal_hook::consts::SIGINT, term.clone());
    let _ = signal_hook::flag::register(signal_hook::consts::SIGTERM, term.clone());

    let tty = std::io::stderr().is_terminal();
    eprintln!(
        "actio: {} → {} stage(s) on the {bus_name} bus; offering {} tx/s{} for {:?}; run {run_id}",
        pipeline.name,
        pipeline.stages.len(),
        load.rate,
        load.ramp_to.map(|r| format!(" ramping to {r}")).unwrap_or_default(),
        load.duration
    );
    let t0 = Instant::now();
    let mut last = (Instant::now(), 0u64);
    let mut drain_from: Option<Instant> = None;
    let (mut last_seen, mut last_progress) = (0u64, Instant::now());
    loop {
        std::thread::sleep(Duration::from_millis(if tty { 250 } else { 1000 }));
        let sent = sender.stats.sent.load(Ordering::Relaxed);
        let (seen, p99) = {
            let mut c = collector.lock();
            let h = c.take_interval();
            (c.seen(), if h.is_empty() { None } else { Some(h.value_at_quantile(0.99)) })
        };
        let dt = last.0.elapsed().as_secs_f64().max(1e-3);
        let rate = (seen.saturating_sub(last.1)) as f64 / dt;
        last = (Instant::now(), seen);
        let line = format!(
            "{:>6.1}s  sent {sent:>9}  decided {seen:>9}  {rate:>9.0} tx/s  in flight {:>7}  p99 {}",
            t0.elapsed().as_secs_f64(),
            sent.saturating_sub(seen),
            p99.map(|us| format!("{:.2} ms", us as f64 / 1000.0)).unwrap_or_else(|| "-".into())
        );
        if tty {
            eprint!("\r{line}   ");
            let _ = std::io::stderr().flush();
        } else {
            eprintln!("{line}");
        }
        if term.load(Ordering::Relaxed) && !stop_sending.swap(true, Ordering::Relaxed) {
            eprintln!("\nactio: interrupted; draining");
        }
        if let Some(dead) = stages.iter().find(|s| s.is_finished()) {
            eprintln!("\nactio: stage {} stopped unexpectedly; ending the run", dead.name());
            stop_sending.store(true, Ordering::Relaxed);
            break;
        }
        if seen > last_seen {
            last_seen = seen;
            last_progress = Instant::now();
        }
        if sender.stats.done.load(Ordering::Acquire) {
            // The drain ends when everything is decided, or when `--drain` has passed
            // without a new decision (a pipeline still working through a backlog is
            // waited for; what is missing then counts as lost). An interrupt caps the
            // wait at `--drain` from the interrupt.
            let since = *drain_from.get_or_insert_with(Instant::now);
            let sent = sender.stats.sent.load(Ordering::Relaxed);
            match drain_end(seen, sent, since.elapsed(), last_progress.max(since).elapsed(), term.load(Ordering::Relaxed), load.drain) {
                None => {}
                Some(DrainEnd::Idle) => {
                    eprintln!("\nactio: no decision for {:?}; counting the {} missing as lost", load.drain, sent - seen);
                    break;
                }
                Some(_) => break,
            }
        }
    }
    if tty {
        eprintln!();
    }
    let load_secs = load.duration.as_secs_f64().min(t0.elapsed().as_secs_f64());
    let _ = sender_thread.join();

    let mut runtime_hists = Vec::new();
    let mut stage_failed = false;
    for s in stages {
        let name = s.name().to_string();
        s.stop(StopMode::Graceful);
        match s.join() {
            Ok(m) => runtime_hists.push(StageHistograms {
                name: name.clone(),
                queue: m.queue,
                service: m.service,
                stage: m.stage_latency,
                budget_ms: pipeline.stage(&name).and_then(|s| s.limits.budget_ms),
            }),
            Err(e) => {
                eprintln!("actio: stage {name} failed: {e}");
                stage_failed = true;
            }
        }
    }
    stop_collecting.store(true, Ordering::Relaxed);
    match collector_thread.join() {
        Ok(Err(e)) => eprintln!("actio: collector failed: {e:#}"),
        Err(_) => eprintln!("actio: collector panicked"),
        Ok(Ok(())) => {}
    }

    let c = collector.lock();
    if c.stats.reread > 0 {
        eprintln!("actio: the collector's group rebalanced; {} records it read again were ignored (not duplicates)", c.stats.reread);
    }
    let sent = sender.stats.sent.load(Ordering::Relaxed);
    let mut histograms = vec![("e2e".to_string(), c.e2e.clone())];
    let mut stage_reports = Vec::new();
    for s in &pipeline.stages {
        let rt = runtime_hists.iter().find(|h| h.name == s.name);
        let trail = c.stages.get(&s.name).map(|t| (&t.queue, &t.process));
        stage_reports.push(StageReport::new(&s.name, rt, trail, s.limits.budget_ms));
        if let Some(rt) = rt {
            histograms.push((format!("{}.queue", s.name), rt.queue.clone()));
            histograms.push((format!("{}.service", s.name), rt.service.clone()));
            histograms.push((format!("{}.stage", s.name), rt.stage.clone()));
        } else if let Some(t) = c.stages.get(&s.name) {
            histograms.push((format!("{}.queue", s.name), t.queue.clone()));
        }
        if let Some(t) = c.stages.get(&s.name) {
            histograms.push((format!("{}.process", s.name), t.process.clone()));
        }
    }
    let mut top: Vec<RuleHitCount> = c.rule_hits.iter().map(|(k, v)| RuleHitCount { rule: k.clone(), count: *v }).collect();
    top.sort_by(|a, b| b.count.cmp(&a.count).then(a.rule.cmp(&b.rule)));
    top.truncate(15);
    let report = RunReport {
        pipeline: pipeline.name.clone(),
        bus: bus_name.to_string(),
        run_id: run_id.clone(),
        rate_target: schedule.total() as f64 / load.duration.as_secs_f64(),
        rate_achieved: c.seen() as f64 / load_secs.max(1e-3),
        duration_s: load_secs,
        sent,
        decided: c.stats.decided,
        dlq: c.stats.dlq,
        lost: c.lost(sent),
        duplicates: c.stats.duplicates,
        order_violations: c.stats.order_violations,
        retried: c.stats.retried,
        reordered_by_retry: c.stats.reordered_by_retry,
        decisions: DecisionCounts::new(&pipeline.schema.decision().outcomes, &c.stats.outcomes),
        top_rule_hits: top,
        e2e: LatencySummary::of(&c.e2e),
        stages: stage_reports,
        sender_max_behind_ms: sender.stats.max_behind_us.load(Ordering::Relaxed) as f64 / 1000.0,
        peak_rss_mib: peak_rss_mib(),
        send_failures: sender.stats.failed.load(Ordering::Relaxed),
    };
    report.write(&out, &histograms).with_context(|| format!("writing the report under {}", out.display()))?;
    print!("{}", report.render_text());
    println!("report: {}/report.html (also report.json and *.hgrm)", out.display());
    Ok(if report.lost > 0 || stage_failed || report.send_failures > 0 {
        eprintln!("actio: FAILED — {} lost, {} send failures{}", report.lost, report.send_failures, if stage_failed { ", a stage failed" } else { "" });
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
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
}
