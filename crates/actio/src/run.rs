//! `actio run` (whole pipeline in one process) and `actio loadgen` (drive stages that
//! run elsewhere): both offer load on schedule, collect, and report.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use actio_bus_embedded::{EmbeddedBus, EmbeddedConfig};
use actio_core::{Bus, ProducerConfig};
use actio_loadgen::broker_pauses::BrokerPauses;
use actio_loadgen::drive::{CollectorConfig, CollectorFailure, Drain, DrainEnd, RunFacts, RunningCollector, run_report};
use actio_loadgen::{Collector, Generator, Scenario, Schedule, Sender, StageHistograms};
use actio_pipeline::Pipeline;
use actio_pipeline::launch::{self, LaunchOptions, Selection};
use actio_pipeline::reload::Reloader;
use actio_trail::{Location, TrailWriter};
use actio_runtime::StopMode;
use anyhow::{Context, bail};

use crate::cli::{BusKind, LoadArgs, LoadgenArgs, RunArgs};

/// Longest wait for the collector to join and read past old records before load starts.
const COLLECTOR_START_TIMEOUT: Duration = Duration::from_secs(60);

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
            drive(&bus, "embedded", &pipeline, &args.load, Some(args.services()), args.threads, &[], None, Extras::of_run(&args))
        }
        BusKind::Kafka => {
            let bus = match crate::kafka::bus_or_exit(&pipeline, &args.kafka) {
                Ok(b) => Arc::new(b),
                Err(code) => return Ok(code),
            };
            drive(&bus, "kafka", &pipeline, &args.load, Some(args.services()), args.threads, &[], None, Extras::of_run(&args))
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
    drive(&bus, "kafka", &pipeline, &args.load, None, None, &[], args.broker_gc_log.as_deref(), Extras { watch: false, trail: None, record_traffic: false, quiet: false })
}

/// Reloads `reloader`'s files on every SIGHUP, on a thread of its own (`actio run`
/// and `actio stage` alike).
pub fn reload_on_sighup(reloader: &Arc<Reloader>) -> std::io::Result<()> {
    let mut signals = signal_hook::iterator::Signals::new([signal_hook::consts::SIGHUP])?;
    let reloader = reloader.clone();
    std::thread::Builder::new().name("sighup".into()).spawn(move || {
        for _ in signals.forever() {
            reloader.reload_all("SIGHUP");
        }
    })?;
    Ok(())
}

/// What a run does beside driving load, for stages it runs in-process.
#[derive(Debug, Clone)]
pub struct Extras {
    /// Reload the stages' rule and model files when they change (and on SIGHUP).
    pub watch: bool,
    /// Record each decision's evaluation: `Some(None)` in a fresh `trail.db` beside
    /// the report, `Some(Some(location))` there; with the queue's capacity.
    pub trail: Option<(Option<Location>, usize)>,
    /// Write each transaction sent to `traffic.jsonl` beside the report.
    pub record_traffic: bool,
    /// Print a line of figures instead of the whole report (the report is written
    /// all the same): for runs made by another command (`actio plan`).
    pub quiet: bool,
}

impl Extras {
    /// What `actio run`'s flags ask for.
    pub fn of_run(args: &RunArgs) -> Self {
        let trail = args.trail.as_deref().map(|t| ((!t.is_empty()).then(|| Location::parse(t)), args.trail_buffer));
        Extras { watch: !args.no_watch, trail, record_traffic: args.record_traffic, quiet: false }
    }
}

/// Offers load to `pipeline` on `bus`, running its stages in-process when
/// `in_process`, and reports; with `broker_gc_log`, the seconds the broker stood still
/// are marked; with `watch`, the stages' rule and model files reload when they change
/// (and on SIGHUP, whenever stages run here). Exit code 1 if anything was lost.
#[allow(clippy::too_many_arguments)]
pub fn drive<B: Bus>(
    bus: &Arc<B>,
    bus_name: &str,
    pipeline: &Pipeline,
    load: &LoadArgs,
    in_process: Option<Selection<'_>>,
    threads: Option<usize>,
    properties: &[(String, String)],
    broker_gc_log: Option<&std::path::Path>,
    extras: Extras,
) -> anyhow::Result<ExitCode> {
    let watch = extras.watch;
    // Every flow: each ingress topic is driven, each egress topic collected.
    let of_role = |role| -> Vec<String> { pipeline.topics.iter().filter(|t| t.role == role).map(|t| t.name.clone()).collect() };
    let (ingresses, egresses) = (of_role(actio_pipeline::TopicRole::Ingress), of_role(actio_pipeline::TopicRole::Egress));
    let (Some(dlq), false, false) = (pipeline.dead_letter().cloned(), ingresses.is_empty(), egresses.is_empty()) else {
        bail!("the pipeline needs ingress, egress and dead-letter topics");
    };
    launch::create_topics(&**bus, pipeline).context("creating the pipeline's topics")?;

    let started_unix = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    // The pid keeps two load generators started in the same second apart (their
    // collector groups and transaction ids are named after the run).
    let run_id = format!("run-{started_unix}-{}", std::process::id());
    let out = load.out.clone().unwrap_or_else(|| PathBuf::from("results").join(&run_id));

    // The scenario first: a bad one stops the run before anything is written.
    let scenario = scenario(load, pipeline)?;
    // What goes beside the report before it is written: a trail.db, traffic.jsonl.
    if matches!(extras.trail, Some((None, _))) && in_process.is_some() || extras.record_traffic {
        std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    }
    // The decision trail, beside the report: a fresh database per run.
    let trail = match (extras.trail, in_process.is_some()) {
        (Some((location, buffer)), true) => {
            let location = match location {
                Some(l) => l,
                None => {
                    for f in ["trail.db", "trail.db-wal", "trail.db-shm"] {
                        let _ = std::fs::remove_file(out.join(f));
                    }
                    Location::Sqlite(out.join("trail.db"))
                }
            };
            Some(Arc::new(TrailWriter::open(&location, buffer).context("opening the decision trail (run without --trail to skip it)")?))
        }
        _ => None,
    };
    // Stages first, so they are consuming when load starts.
    let stages = if let Some(selection) = in_process {
        let options = LaunchOptions { properties: properties.to_vec(), threads, tune: Some(crate::kafka::tune_retry_consumer), instance: None, tracer: None, trail: trail.clone() };
        launch::start(bus, pipeline, selection, &options)?
    } else {
        Vec::new()
    };

    let schedule = Schedule { start_rate: load.rate as f64, end_rate: load.ramp_to.unwrap_or(load.rate) as f64, duration: load.duration };
    if schedule.start_rate <= 0.0 || schedule.end_rate <= 0.0 || load.duration.is_zero() {
        bail!("--rate, --ramp-to and --duration must be positive");
    }
    let sender = Arc::new(Sender::new(&schedule));
    let collector = Collector::new(&run_id, sender.key_seq.clone());
    let decisions: Vec<String> = pipeline.stages.iter().filter(|s| s.kind.writes == actio_pipeline::Writes::Decisions).map(|s| s.output.clone()).collect();
    let config = CollectorConfig { run_id: run_id.clone(), egress: egresses.clone(), decisions, dlq: dlq.name.clone(), properties: properties.to_vec() };
    let mut collector = RunningCollector::spawn(&**bus, collector, &config)?;
    if !collector.wait_ready(COLLECTOR_START_TIMEOUT) {
        eprintln!("actio: the collector has not caught up with {} within {COLLECTOR_START_TIMEOUT:?}; starting anyway (early decisions may show a longer e2e)", egresses.join(", "));
    }
    let producer = bus.producer(&ProducerConfig { client_id: "actio-loadgen".into(), properties: properties.to_vec(), transactional_id: None }).context("creating the load generator's producer")?;
    let mut generator = Generator::new(pipeline.schema.clone(), &scenario, &run_id)?;
    let stop_sending = Arc::new(AtomicBool::new(false));
    let traffic_path = out.join("traffic.jsonl");
    let mut traffic = match extras.record_traffic {
        true => {
            Some(std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&traffic_path).with_context(|| format!("creating {}", traffic_path.display()))?))
        }
        false => None,
    };
    let loadgen_cpu = actio_core::cpu::CpuMeter::new();
    let sender_thread = {
        let loadgen_cpu = loadgen_cpu.clone();
        let sender = sender.clone();
        let stop = stop_sending.clone();
        let topics = ingresses.clone();
        let key = pipeline.key.clone();
        let schema = pipeline.schema.clone();
        std::thread::Builder::new().name("loadgen".into()).spawn(move || {
            let _counted = loadgen_cpu.enter();
            let mut failed = None;
            let record = |payload: &[u8]| {
                if let (Some(w), None) = (traffic.as_mut(), &failed)
                    && let Err(e) = w.write_all(payload).and_then(|()| w.write_all(b"\n"))
                {
                    failed = Some(e);
                }
            };
            sender.run(&producer, &topics, &mut generator, &schema, &schedule, |tx| key.key(tx), &stop, |_| {}, record);
            let _ = actio_core::Producer::flush(&producer, Duration::from_secs(30));
            if let Some(e) = failed.or_else(|| traffic.as_mut().and_then(|w| w.flush().err())) {
                eprintln!("actio: writing traffic.jsonl failed: {e}; the recorded traffic is incomplete");
            }
        })?
    };

    let term = Arc::new(AtomicBool::new(false));
    let _ = signal_hook::flag::register(signal_hook::consts::SIGINT, term.clone());
    let _ = signal_hook::flag::register(signal_hook::consts::SIGTERM, term.clone());
    let reloader = Reloader::new(if stages.is_empty() { Vec::new() } else { pipeline.reloadables() });
    if let Err(e) = reload_on_sighup(&reloader) {
        eprintln!("actio: SIGHUP will not reload the rule and model files: {e}");
    }
    let _watch = match watch && !stages.is_empty() {
        true => reloader.watch().map_err(|e| eprintln!("actio: not watching the rule and model files ({e}); SIGHUP reloads them")).ok(),
        false => None,
    };

    let tty = std::io::stderr().is_terminal();
    eprintln!(
        "actio: {} → {} stage(s){} on the {bus_name} bus; offering {} tx/s{} for {:?}; run {run_id}",
        pipeline.name,
        pipeline.stages.len(),
        match stages.len() {
            n if n > 0 && n < pipeline.stages.len() => format!(" as {n} service(s): {}", stages.iter().map(|s| s.name()).collect::<Vec<_>>().join(", ")),
            _ => String::new(),
        },
        load.rate,
        load.ramp_to.map(|r| format!(" ramping to {r}")).unwrap_or_default(),
        load.duration
    );
    let t0 = Instant::now();
    let load_started_ns = actio_core::time::now_ns();
    let cpu_at_start = CpuReading::take(&snapshots(&stages), &collector, &loadgen_cpu);
    let mut last = (Instant::now(), 0u64);
    let mut drain = Drain::new(load.drain);
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
        // Read after `done`, `sent` is final.
        let load_done = sender.stats.done.load(Ordering::Acquire);
        let sent = sender.stats.sent.load(Ordering::Relaxed);
        match drain.check(seen, sent, load_done, term.load(Ordering::Relaxed)) {
            None => {}
            Some(DrainEnd::Idle) => {
                eprintln!("\nactio: no decision for {:?}; counting the {} missing as lost", load.drain, sent - seen);
                break;
            }
            Some(_) => break,
        }
    }
    if tty {
        eprintln!();
    }
    // One snapshot per stage for both (each clones the stage's histograms).
    let at_end = snapshots(&stages);
    let cpu_at_end = CpuReading::take(&at_end, &collector, &loadgen_cpu);
    let counters = kind_counters(at_end);
    let load_secs = load.duration.as_secs_f64().min(t0.elapsed().as_secs_f64());
    // The schedule starts once the first send is acknowledged: its seconds count from there.
    let load_started_ns = match sender.stats.started_ns.load(Ordering::Relaxed) {
        0 => load_started_ns,
        started => started,
    };
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
    // Every handler is gone with its stage: the trail writes what is queued.
    let trail_summary = trail.map(|t| (t.location().to_string(), TrailWriter::close_shared(t, Duration::from_secs(5))));
    match collector.stop() {
        Err(CollectorFailure::Panicked) => eprintln!("actio: collector panicked"),
        Err(e) => eprintln!("actio: collector failed: {e}"),
        Ok(()) => {}
    }
    // Read after the drain: the broker has logged every pause of the run by now.
    let broker_pauses = broker_gc_log.and_then(|path| {
        BrokerPauses::read(path).map_err(|e| eprintln!("actio: {e}: {}; no second is marked as a broker pause", e.source)).ok()
    });

    let c = collector.lock();
    if c.stats.reread > 0 {
        eprintln!("actio: the collector's group rebalanced; {} records it read again were ignored (not duplicates)", c.stats.reread);
    }
    let stage_budgets: Vec<(&str, Option<f64>)> = pipeline.stages.iter().map(|s| (s.name.as_str(), s.limits.budget_ms)).collect();
    let graph = report_graph(pipeline);
    let facts = RunFacts {
        pipeline: &pipeline.name,
        bus: bus_name,
        run_id: &run_id,
        outcomes: &pipeline.schema.decision().outcomes,
        stages: &stage_budgets,
        schedule: &schedule,
        load_secs,
        load_started_ns,
        broker_pauses: broker_pauses.as_ref(),
        graph: Some(&graph),
    };
    let (mut report, histograms) = run_report(&facts, &c, &sender.stats, &runtime_hists);
    report.cpu = cpu_at_end.since(&cpu_at_start, c.stats.decided + c.stats.dlq);
    report.counters = counters;
    report.write(&out, &histograms).with_context(|| format!("writing the report under {}", out.display()))?;
    if extras.quiet {
        let cores = report.cpu.as_ref().map(|c| format!(", {:.2} cores busy", c.cores())).unwrap_or_default();
        eprintln!("actio: {} decided, e2e p50 {:.2} ms, p99 {:.2} ms{cores}; report in {}", report.decided, report.e2e.p50_us as f64 / 1000.0, report.e2e.p99_us as f64 / 1000.0, out.display());
    } else {
        print!("{}", report.render_text());
        println!("report: {}/report.html (also report.json and *.hgrm)", out.display());
    }
    if extras.record_traffic {
        println!("traffic: {} transactions in {} (actio replay {} --input {})", sender.stats.sent.load(Ordering::Relaxed), traffic_path.display(), pipeline.dir.display(), traffic_path.display());
    }
    match trail_summary {
        Some((path, Some((written, 0)))) => println!("trail: {written} records in {path} (see them: actio trail {path} --limit 5)"),
        Some((path, Some((written, dropped)))) => println!("trail: {written} records in {path}; {dropped} DROPPED (the queue was full: the database was slow or away; decisions were not slowed)"),
        Some((path, None)) => eprintln!("actio: the trail in {path} was still in use at the end; its count is unknown"),
        None => {}
    }
    Ok(if report.lost > 0 || stage_failed || report.send_failures > 0 {
        eprintln!("actio: FAILED — {} lost, {} send failures{}", report.lost, report.send_failures, if stage_failed { ", a stage failed" } else { "" });
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// Each stage's metrics now, by name.
fn snapshots(stages: &[actio_runtime::StageHandle]) -> Vec<(String, actio_runtime::StageMetrics)> {
    stages.iter().map(|s| (s.name().to_string(), s.metrics())).collect()
}

/// Each service's stage-kind counters that are not zero (gauges left out: a level at
/// the end says less than `/metrics` over time).
fn kind_counters(snapshots: Vec<(String, actio_runtime::StageMetrics)>) -> std::collections::BTreeMap<String, Vec<actio_loadgen::report::KindCounter>> {
    snapshots
        .into_iter()
        .map(|(name, m)| {
            let counted = m
                .handler
                .into_iter()
                .filter(|c| !c.gauge && c.value > 0)
                .map(|c| actio_loadgen::report::KindCounter { name: c.name.to_string(), labels: c.labels.into_iter().map(|(k, v)| (k.to_string(), v)).collect(), value: c.value })
                .collect();
            (name, counted)
        })
        .collect()
}

/// The CPU the run's threads had used at one moment ([`actio_core::cpu`]).
struct CpuReading {
    at: Instant,
    process: Duration,
    services: Vec<(String, Duration)>,
    loadgen: Duration,
    collector: Duration,
}

impl CpuReading {
    fn take(stages: &[(String, actio_runtime::StageMetrics)], collector: &RunningCollector, loadgen: &actio_core::cpu::CpuMeter) -> Self {
        CpuReading {
            at: Instant::now(),
            process: actio_core::cpu::process().unwrap_or_default(),
            services: stages.iter().map(|(name, m)| (name.clone(), m.cpu)).collect(),
            loadgen: loadgen.total(),
            collector: collector.cpu(),
        }
    }

    /// What was used since `start`, over `transactions`; `None` where per-thread CPU
    /// cannot be read.
    fn since(&self, start: &CpuReading, transactions: u64) -> Option<actio_loadgen::report::CpuReport> {
        if !actio_core::cpu::available() {
            return None;
        }
        let d = |a: Duration, b: Duration| a.saturating_sub(b).as_secs_f64();
        let services: Vec<(String, f64)> = self.services.iter().zip(&start.services).map(|((n, a), (_, b))| (n.clone(), d(*a, *b))).collect();
        let (process_s, loadgen_s, collector_s) = (d(self.process, start.process), d(self.loadgen, start.loadgen), d(self.collector, start.collector));
        let other_s = (process_s - loadgen_s - collector_s - services.iter().map(|s| s.1).sum::<f64>()).max(0.0);
        Some(actio_loadgen::report::CpuReport { wall_s: (self.at - start.at).as_secs_f64(), process_s, services, loadgen_s, collector_s, other_s, transactions })
    }
}

/// The pipeline's graph as the report draws it.
fn report_graph(pipeline: &actio_pipeline::Pipeline) -> actio_loadgen::report::StageGraph {
    let g = pipeline.graph();
    actio_loadgen::report::StageGraph {
        stages: g.stages.into_iter().map(|(n, k, _)| (n, k.to_string())).collect(),
        edges: g.edges.into_iter().map(|e| (e.from, e.to, e.topic)).collect(),
        sources: g.sources,
        sinks: g.sinks,
    }
}
