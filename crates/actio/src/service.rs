//! `actio stage`: one stage of a pipeline, or several consecutive ones fused, as a
//! long-running Kafka service.
//!
//! The stage runtime does the work (key lanes, watermark commits, back-pressure,
//! drain on revocation); this module adds what a service needs around it: an HTTP
//! endpoint for Prometheus and Kubernetes probes, the group's lag, hot reload of the
//! stages' rule and model files (watched, SIGHUP, `POST /admin/reload`), and a
//! graceful stop on SIGTERM bounded by `--grace` (Kubernetes'
//! `terminationGracePeriodSeconds`).
//!
//! Readiness: a replica is ready once it holds partitions and its group's lag on the
//! input topic is within the stage's in-flight cap (it has caught up). Once ready it
//! stays ready while it holds partitions, so a burst of lag does not pull every
//! replica out of rotation at once; it turns unready when it stops.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{Duration, Instant};

use actio_bus_kafka::KafkaBus;
use actio_pipeline::launch::{LaunchOptions, StagePlan};
use actio_runtime::{StageMetrics, StopMode};
use anyhow::Context;
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use actio_pipeline::reload::Reloader;
use actio_trail::{Location, TrailReader, TrailWriter};

use crate::cli::StageArgs;

/// Lag value meaning "not measured yet".
const LAG_UNKNOWN: i64 = -1;

/// What the HTTP endpoint reports; written by the service's threads.
struct Health {
    metrics: Arc<dyn Fn() -> StageMetrics + Send + Sync>,
    /// Summed lag of the stage's group on its input topic, or [`LAG_UNKNOWN`].
    lag: AtomicI64,
    /// The same for its retry group on its retry topic (if it has one).
    retry_lag: AtomicI64,
    /// Input partitions with lag and no committed progress ([`crate::stalls`]), or
    /// [`LAG_UNKNOWN`].
    stalled: AtomicI64,
    ready: AtomicBool,
    stopping: AtomicBool,
    reloader: Arc<Reloader>,
    /// Where this service's decision trail goes (`--trail`), read back by `/trail`.
    trail: Option<Location>,
}

impl Health {
    fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed) && !self.stopping.load(Ordering::Relaxed)
    }
}

async fn metrics(State(h): State<Arc<Health>>) -> impl IntoResponse {
    let known = |l: &AtomicI64| Some(l.load(Ordering::Relaxed)).filter(|l| *l != LAG_UNKNOWN);
    let text = (h.metrics)().prometheus_text(known(&h.lag), known(&h.retry_lag), known(&h.stalled));
    ([(header::CONTENT_TYPE, actio_runtime::PROMETHEUS_CONTENT_TYPE)], text)
}

/// `POST /admin/reload`: reloads every rule and model file now; 200 with what each
/// did, 422 if one failed to compile (it keeps its version in force).
async fn reload(State(h): State<Arc<Health>>) -> axum::response::Response {
    let r = h.reloader.clone();
    let Ok(done) = tokio::task::spawn_blocking(move || r.reload_all("POST /admin/reload")).await else {
        return json_response(StatusCode::INTERNAL_SERVER_ERROR, serde_json::json!({ "error": "the reload did not finish; see the log" }));
    };
    let failed = done.iter().any(|f| f.outcome.is_err());
    let body = serde_json::Value::Array(done.iter().map(|f| f.to_json()).collect());
    json_response(if failed { StatusCode::UNPROCESSABLE_ENTITY } else { StatusCode::OK }, body)
}

/// `GET /admin/reload`: the version in force, reloads and failures of each file.
async fn reload_status(State(h): State<Arc<Health>>) -> axum::response::Response {
    json_response(StatusCode::OK, h.reloader.status_json())
}

/// `GET /trail/<tx_id>`: one transaction's evaluation, as `actio trail --json` shows it.
async fn trail_one(State(h): State<Arc<Health>>, Path(tx_id): Path<String>) -> impl IntoResponse {
    trail_answer(&h, move |r| match r.get(&tx_id)? {
        Some(t) => Ok((StatusCode::OK, serde_json::to_value(t).unwrap_or_default())),
        None => Ok((StatusCode::NOT_FOUND, serde_json::json!({ "error": format!("no transaction {tx_id:?} in the trail"), "recorded": r.count()? }))),
    })
    .await
}

/// The filters of `GET /trail?…`, the same as `actio trail`'s flags.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TrailFilter {
    outcome: Option<String>,
    rule: Option<String>,
    key: Option<String>,
    since: Option<String>,
    until: Option<String>,
    limit: Option<usize>,
}

/// `GET /trail?outcome=&rule=&key=&since=&until=&limit=`: the newest matching
/// transactions (limit 20, at most 1,000), as a JSON array.
async fn trail_query(State(h): State<Arc<Health>>, filter: Result<Query<TrailFilter>, axum::extract::rejection::QueryRejection>) -> axum::response::Response {
    let Query(f) = match filter {
        Ok(f) => f,
        Err(e) => return json_response(StatusCode::BAD_REQUEST, serde_json::json!({ "error": e.body_text(), "fields": ["outcome", "rule", "key", "since", "until", "limit"] })),
    };
    let (since_ns, until_ns) = match crate::trail::time_range(f.since.as_deref(), f.until.as_deref(), |name| format!("{name}=")) {
        Ok(range) => range,
        Err(e) => return json_response(StatusCode::BAD_REQUEST, serde_json::json!({ "error": e })),
    };
    let q = actio_trail::Query { outcome: f.outcome, rule: f.rule, key: f.key, since_ns, until_ns, limit: f.limit.unwrap_or(20).min(1000) };
    trail_answer(&h, move |r| Ok((StatusCode::OK, serde_json::to_value(r.query(&q)?).unwrap_or_default()))).await
}

fn json_response(status: StatusCode, body: serde_json::Value) -> axum::response::Response {
    (status, [(header::CONTENT_TYPE, "application/json")], format!("{body:#}\n")).into_response()
}

/// Opens the trail (a connection per request: reads are rare, and a database that
/// was away answers the next one) and runs `read` off the async thread.
async fn trail_answer(
    h: &Health,
    read: impl FnOnce(&mut TrailReader) -> Result<(StatusCode, serde_json::Value), actio_trail::TrailError> + Send + 'static,
) -> axum::response::Response {
    let Some(location) = h.trail.clone() else {
        return json_response(StatusCode::NOT_FOUND, serde_json::json!({ "error": "this service records no decision trail (start it with --trail)" }));
    };
    let answer = tokio::task::spawn_blocking(move || TrailReader::open(&location).and_then(|mut r| read(&mut r))).await;
    match answer {
        Ok(Ok((status, body))) => json_response(status, body),
        Ok(Err(e)) => json_response(StatusCode::SERVICE_UNAVAILABLE, serde_json::json!({ "error": e.to_string() })),
        Err(_) => json_response(StatusCode::INTERNAL_SERVER_ERROR, serde_json::json!({ "error": "the trail read did not finish; see the log" })),
    }
}

async fn healthz() -> impl IntoResponse {
    (StatusCode::OK, "ok\n")
}

async fn readyz(State(h): State<Arc<Health>>) -> impl IntoResponse {
    if h.is_ready() {
        (StatusCode::OK, "ready\n".to_string())
    } else {
        let m = (h.metrics)();
        let lag = h.lag.load(Ordering::Relaxed);
        let why = if h.stopping.load(Ordering::Relaxed) {
            "stopping".to_string()
        } else if m.partitions == 0 {
            "no partitions assigned yet".to_string()
        } else {
            format!(
                "catching up: group lag {}",
                if lag == LAG_UNKNOWN {
                    "unknown".into()
                } else {
                    lag.to_string()
                }
            )
        };
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        )
    }
}

/// Serves the endpoint on its own thread (a one-thread tokio runtime): scrapes never
/// touch the stage's driver or workers beyond a metrics snapshot.
fn serve_http(addr: SocketAddr, health: Arc<Health>) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the HTTP runtime")?;
    let listener = rt
        .block_on(tokio::net::TcpListener::bind(addr))
        .with_context(|| format!("binding the HTTP endpoint to {addr} (--http / ACTIO_HTTP)"))?;
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/admin/reload", get(reload_status).post(reload))
        .route("/trail", get(trail_query))
        .route("/trail/{tx_id}", get(trail_one))
        .with_state(health);
    std::thread::Builder::new()
        .name("http".into())
        .spawn(move || {
            if let Err(e) = rt.block_on(async { axum::serve(listener, app).await }) {
                tracing::error!(error = %e, "HTTP endpoint stopped");
            }
        })?;
    Ok(())
}

/// Measures the lag of the stage's `group` on `input` every 500 ms (and of its retry
/// group on its retry topic, if it has one) and sets readiness from it: caught up
/// within `cap`, the stage's in-flight cap; partitions with lag and no commit for
/// `stall_after` are counted and logged as stalled. Its own thread, as admin calls
/// may block. Group lag is a Kafka capability; the other buses have none.
fn watch_lag(bus: Arc<KafkaBus>, health: Arc<Health>, group: String, input: String, cap: usize, retry: Option<(String, String)>, stall_after: Duration) -> std::io::Result<()> {
    let mut stalls = crate::stalls::StallWatch::new(stall_after);
    std::thread::Builder::new().name("lag".into()).spawn(move || {
        while !health.stopping.load(Ordering::Relaxed) {
            match bus.group_lag(&group, &input) {
                Ok(parts) => {
                    let lag = actio_bus_kafka::total_lag(&parts);
                    let changes = stalls.observe(&parts, Instant::now());
                    for p in &changes.stalled {
                        tracing::warn!(group = %group, partition = %format!("{input}/{p}"), lag = parts.iter().find(|x| x.partition == *p).map(|x| x.lag).unwrap_or(0), after = ?stall_after, "partition stalled: lag and no committed progress (a replica holding it may hang)");
                    }
                    for p in &changes.recovered {
                        tracing::info!(group = %group, partition = %format!("{input}/{p}"), "partition progresses again");
                    }
                    health.stalled.store(stalls.stalled().len() as i64, Ordering::Relaxed);
                    health.lag.store(lag, Ordering::Relaxed);
                    let assigned = (health.metrics)().partitions > 0;
                    if assigned && lag <= cap as i64 {
                        health.ready.store(true, Ordering::Relaxed);
                    } else if !assigned {
                        health.ready.store(false, Ordering::Relaxed);
                    }
                }
                Err(e) => tracing::debug!(error = %e, "measuring the group's lag"),
            }
            // Watched, not part of readiness: retry copies wait there on purpose.
            if let Some((g, t)) = &retry {
                match bus.group_lag_total(g, t) {
                    Ok(lag) => health.retry_lag.store(lag, Ordering::Relaxed),
                    Err(e) => tracing::debug!(error = %e, "measuring the retry group's lag"),
                }
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    })?;
    Ok(())
}

pub fn main(args: StageArgs) -> anyhow::Result<ExitCode> {
    let pipeline = match crate::run::load_pipeline(&args.pipeline) {
        Ok(p) => p,
        Err(code) => return Ok(code),
    };
    let service = match pipeline.service(&args.stage) {
        Ok(s) => s,
        Err(why) => {
            eprintln!("error: {}: --stage {:?}: {why}", args.pipeline.display(), args.stage);
            return Ok(ExitCode::from(crate::EXIT_CONFIG));
        }
    };
    // Traces, if asked for: one exporter for the service's stages.
    let export = match &args.otlp_endpoint {
        Some(endpoint) if !args.dry_run => Some(crate::otel::Export::start(endpoint, args.trace_ratio, format!("{}.{}", pipeline.name, service.name))?),
        _ => None,
    };
    // The decision trail, if asked for: a bad URL is an error now; a database that
    // does not answer yet is the writer's to wait for (the stage starts anyway).
    let trail_location = args.trail.as_deref().map(Location::parse);
    let trail = match &trail_location {
        Some(l) if !args.dry_run => Some(Arc::new(TrailWriter::open(l, args.trail_buffer).context("opening the decision trail (--trail / ACTIO_TRAIL)")?)),
        _ => None,
    };
    let options = LaunchOptions {
        properties: crate::kafka::properties(&pipeline, &args.kafka),
        threads: args.threads,
        tune: Some(crate::kafka::tune_retry_consumer),
        instance: args.instance_id.clone(),
        tracer: export.as_ref().map(|(t, _)| t.clone()),
        trail: trail.clone(),
    };
    let plan = StagePlan::new(&pipeline, &service, &options);
    let stages = service.stages(&pipeline);
    let (first, last) = (&stages[0], &stages[stages.len() - 1]);
    let what = if service.is_fused() {
        format!("service {} ({} stages fused: {})", service.name, stages.len(), stages.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(" → "))
    } else {
        format!("stage {}", service.name)
    };
    let spec = &plan.spec;
    let (group, input, cap) = (spec.group.clone(), spec.input.clone(), spec.max_in_flight);
    let retry_group = spec.retry.topic.as_ref().map(|t| (t.group.clone(), t.topic.to_string()));
    let retry = match &spec.retry.topic {
        Some(t) if t.max_delay > t.delay => format!(", then {} × {:?} doubling to {:?} via {}", t.attempts, t.delay, t.max_delay, t.topic),
        Some(t) => format!(", then {} × {:?} via {}", t.attempts, t.delay, t.topic),
        None => String::new(),
    };
    let traces = match &args.otlp_endpoint {
        Some(e) => format!("; traces to {e} (ratio {})", args.trace_ratio),
        None => String::new(),
    } + &trail_location.as_ref().map(|l| format!("; decision trail to {l} (buffer {})", args.trail_buffer)).unwrap_or_default();
    let eos = if spec.exactly_once { format!("; exactly-once, transactional id {}.{}, a transaction per {:?}", spec.group, spec.instance, spec.commit_interval) } else { String::new() };
    let summary = format!(
        "{what} of {}: {} → {} in group {group}, {} threads, in flight ≤ {}/partition and {cap}/stage; retries {} in place{retry}{eos}{traces}; brokers {}; http {}; grace {:?}",
        pipeline.name,
        first.input,
        last.output,
        spec.threads,
        spec.max_in_flight_per_partition,
        spec.retry.attempts,
        args.kafka.brokers,
        args.http,
        args.grace
    );
    if args.dry_run {
        println!("{summary}");
        println!("dry run: configuration is valid; not connecting");
        return Ok(ExitCode::SUCCESS);
    }
    let bus = match crate::kafka::bus_or_exit(&pipeline, &args.kafka) {
        Ok(b) => Arc::new(b),
        Err(code) => return Ok(code),
    };
    let term = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGTERM, term.clone())
        .context("installing the SIGTERM handler")?;
    signal_hook::flag::register(signal_hook::consts::SIGINT, term.clone())
        .context("installing the SIGINT handler")?;
    // Only this service's stages' files: another service's are not in force here.
    let reloader = Reloader::new(stages.iter().flat_map(|s| s.logic.reloadables()).collect());
    crate::run::reload_on_sighup(&reloader).context("installing the SIGHUP handler")?;
    let _watch = if args.no_watch {
        None
    } else {
        Some(reloader.watch().context("watching the rule and model files (--no-watch turns that off)")?)
    };

    // The velocity stage rebuilds an assigned partition's windows from its input.
    let handle = plan.start(&bus)?;
    let health = Arc::new(Health {
        metrics: handle.metrics_source(),
        lag: AtomicI64::new(LAG_UNKNOWN),
        retry_lag: AtomicI64::new(LAG_UNKNOWN),
        stalled: AtomicI64::new(LAG_UNKNOWN),
        ready: AtomicBool::new(false),
        stopping: AtomicBool::new(false),
        reloader: reloader.clone(),
        trail: trail_location.clone(),
    });
    serve_http(args.http, health.clone())?;
    tracing::info!("{summary}");

    watch_lag(bus, health.clone(), group, input, cap, retry_group, args.stall_after)?;

    while !term.load(Ordering::Relaxed) && !handle.is_finished() {
        std::thread::sleep(Duration::from_millis(50));
    }
    health.stopping.store(true, Ordering::Relaxed);
    let failed_on_its_own = handle.is_finished();
    if !failed_on_its_own {
        tracing::info!(grace = ?args.grace, "stopping: draining in-flight work, committing, flushing");
    }
    let t0 = Instant::now();
    handle.stop(StopMode::Graceful);
    while !handle.is_finished() && t0.elapsed() < args.grace {
        std::thread::sleep(Duration::from_millis(10));
    }
    if !handle.is_finished() {
        eprintln!(
            "error: stage {} did not stop within the grace period of {:?}",
            args.stage, args.grace
        );
        return Ok(ExitCode::from(1));
    }
    let joined = handle.join();
    if let Some((_, e)) = export {
        e.shutdown();
    }
    // The handlers are gone with the stage: the trail writes what is queued.
    if let Some(t) = trail {
        let location = t.location().to_string();
        if let Some((written, dropped)) = TrailWriter::close_shared(t, Duration::from_secs(5)) {
            tracing::info!(trail = %location, written, dropped, "decision trail closed");
        }
    }
    match joined {
        Ok(m) => {
            tracing::info!(processed = m.processed, dead_lettered = m.dead_lettered, commits = m.commits, took = ?t0.elapsed(), "stopped");
            Ok(if failed_on_its_own {
                eprintln!("error: stage {} stopped on its own", args.stage);
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            })
        }
        Err(e) => {
            eprintln!("error: {e}");
            Ok(ExitCode::from(1))
        }
    }
}
