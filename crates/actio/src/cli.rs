//! Command-line arguments. Each command's help says what it does, with an example.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

/// actio — low-latency transaction pipelines on Apache Kafka.
///
/// A pipeline (pipelines/<name>/pipeline.toml) is a graph of stages — rules,
/// velocity features, scoring, lookups, joins — between Kafka topics. Each stage
/// parallelizes work across cores within each partition while keeping per-key
/// order, and commits only offsets whose outputs are acknowledged.
///
/// Start here:
///   actio validate pipelines/fraud              check a pipeline
///   actio run pipelines/fraud                   run it all in one process (no broker needed)
///   actio run pipelines/fraud --rate 20000 --duration 30s
///
/// On Kafka (each stage its own service, in its consumer group):
///   actio topics create pipelines/fraud --brokers 127.0.0.1:9092
///   actio stage --pipeline pipelines/fraud --stage rules --brokers 127.0.0.1:9092
///   actio loadgen --pipeline pipelines/fraud --brokers 127.0.0.1:9092 --rate 3000
///
/// Before and after going live:
///   actio plan pipelines/fraud --rate 3000 --p99 35ms --verify   size a deployment
///   actio run pipelines/fraud --trail --record-traffic           keep decisions and traffic
///   actio replay /tmp/edited --input results/<run>/traffic.jsonl --against results/<run>/trail.db
#[derive(Debug, Parser)]
#[command(
    name = "actio",
    version,
    about,
    long_about,
    verbatim_doc_comment,
    max_term_width = 100
)]
pub struct Cli {
    /// Log as JSON lines (also: ACTIO_LOG_FORMAT=json). Levels via RUST_LOG.
    #[arg(long, global = true)]
    pub log_json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check a pipeline and every file it names, without starting anything.
    ///
    /// Exit code 0 when valid (prints a summary), 2 with every error found, each
    /// naming the file, the field and the line.
    ///
    /// Examples:
    ///   actio validate pipelines/fraud
    ///   actio validate --json pipelines/fraud     # the resolved pipeline, for tools
    #[command(verbatim_doc_comment)]
    Validate(ValidateArgs),
    /// Print a pipeline's graph: which stage reads what, and where its output goes.
    ///
    /// Stages are nodes; topics join them (a stage's output to every stage that
    /// reads it: several readers are a fan-out, a join waits for several writers).
    /// Text by default; --mermaid prints a Mermaid flowchart (paste it into a
    /// Markdown file or https://mermaid.live).
    ///
    /// Examples:
    ///   actio graph pipelines/transfers
    ///   actio graph pipelines/transfers --mermaid > transfers.mmd
    #[command(verbatim_doc_comment)]
    Graph(GraphArgs),
    /// Print the JSON Schemas (2020-12) of a pipeline's ingress and egress records.
    ///
    /// Generated from the pipeline's schema.toml: the transaction producers write
    /// to the ingress topic (tx.schema.json) and the decision consumers read from
    /// the egress topic (decision.schema.json). Without --write, prints the one
    /// --record names; with --write, (re)writes both files in the pipeline's
    /// directory. A test fails when the shipped files drift from schema.toml.
    ///
    /// Examples:
    ///   actio schema pipelines/fraud                     # the ingress record
    ///   actio schema pipelines/fraud --record decision   # the egress record
    ///   actio schema pipelines/transfers --write         # regenerate both files
    #[command(verbatim_doc_comment)]
    Schema(SchemaArgs),
    /// Run a whole pipeline in one process and drive it with the load generator.
    ///
    /// All stages, the load generator and the collector run together on the
    /// embedded bus (an in-process partitioned log with consumer groups; no
    /// broker needed). Prints progress every second, then a latency report per
    /// stage; writes report.json, .hgrm files and report.html under --out.
    /// Exit code 1 if any transaction was lost. Rule and model files reload while
    /// it runs (on a change, or SIGHUP); the report counts decisions per version.
    ///
    /// Examples:
    ///
    ///   actio run pipelines/fraud
    ///   actio run pipelines/fraud --rate 3000 --duration 60s --out results/baseline
    ///   actio run pipelines/fraud --rate 10000 --ramp-to 400000 --duration 60s
    #[command(verbatim_doc_comment)]
    Run(RunArgs),
    /// Run one stage, or consecutive stages fused, as a long-running service on Kafka.
    ///
    /// Joins the consumer group <pipeline>.<stage>, shares the input topic's
    /// partitions with the other replicas, and commits only watermarks (offsets
    /// whose outputs the broker acknowledged). HTTP on --http:
    ///   /metrics  Prometheus text: queue/service/stage latency, counters, in-flight, lag
    ///   /healthz  200 while the stage runs
    ///   /readyz   200 once partitions are assigned and the group has caught up
    ///   POST /admin/reload  reload the rule and model files now (JSON: what changed)
    ///   GET  /admin/reload  the versions in force, reloads and failures per file
    /// Traces: --otlp-endpoint http://collector:4318 (OTEL_EXPORTER_OTLP_ENDPOINT) and
    /// --trace-ratio 0.01 export a span per message per stage over OTLP.
    /// SIGTERM or SIGINT: stop fetching, drain in-flight work, commit, flush, exit 0
    /// (exit 1 if that takes longer than --grace).
    ///
    /// Rules and models reload without a restart: when their files change (watched;
    /// --no-watch turns that off), on SIGHUP, or on POST /admin/reload. The new
    /// version is compiled off the hot path and swapped in between messages; a file
    /// that does not compile keeps the version in force and is logged with its file,
    /// line and field (and counted: actio_reload_failures_total).
    ///
    /// Secrets and any other librdkafka property come from the pipeline's [kafka]
    /// table and from ACTIO_KAFKA_PROPERTY_<NAME> environment variables, NAME being
    /// the property upper-cased with dots as underscores:
    ///   ACTIO_KAFKA_PROPERTY_SASL_PASSWORD=...  →  sasl.password=...
    ///
    /// Fused (one service instead of three, no broker hop between the stages; an
    /// input offset is committed once the last stage's output is acknowledged;
    /// /metrics has each stage's service time; velocity windows restore from the
    /// service's input):
    ///   actio stage --pipeline pipelines/fraud --stage rules,velocity,score
    /// A [[service]] in pipeline.toml names such a group for `actio run` and k8s/.
    ///
    /// Example:
    ///   actio stage --pipeline pipelines/fraud --stage rules --brokers 127.0.0.1:9092
    #[command(verbatim_doc_comment)]
    Stage(StageArgs),
    /// Create or describe a pipeline's topics on Kafka.
    ///
    /// Examples:
    ///   actio topics create pipelines/fraud --brokers 127.0.0.1:9092
    ///   actio topics describe pipelines/fraud --brokers 127.0.0.1:9092
    #[command(verbatim_doc_comment)]
    Topics(TopicsArgs),
    /// Drive a pipeline whose stages run elsewhere (on Kafka) and report.
    ///
    /// Offers transactions to the ingress topic on schedule (open loop), collects
    /// decisions and dead letters, checks loss, duplicates and per-key order, and
    /// writes the same report as `actio run`. Exit code 1 if anything was lost.
    ///
    /// Example:
    ///   actio loadgen --pipeline pipelines/fraud --brokers 127.0.0.1:9092 --rate 3000 --duration 60s
    #[command(verbatim_doc_comment)]
    Loadgen(LoadgenArgs),
    /// Show what a run recorded of each transaction's evaluation (the decision trail).
    ///
    /// `actio run --trail` writes trail.db beside its report (`--trail=postgres://…`
    /// and `actio stage --trail` a database): per transaction the stages it
    /// passed with their times, the rules that fired (shadow ones too), its
    /// features, score, outcome, the rules and model versions, whether it was retried
    /// and its dead-letter event. With a transaction id, that one; otherwise the
    /// newest that match the filters.
    ///
    /// Examples:
    ///   actio trail results/run-1/trail.db run-1-42
    ///   actio trail results/run-1/trail.db --outcome decline --limit 5
    ///   actio trail results/run-1/trail.db --rule micro_ecom --json
    ///   actio trail results/run-1/trail.db --outcome dead_letter
    ///   actio trail postgres://actio@127.0.0.1:54329/postgres --since 2026-12-01T10:00:00Z
    #[command(verbatim_doc_comment)]
    Trail(TrailArgs),
    /// Backtest a change: re-run a pipeline over recorded traffic and diff its
    /// decisions against the recorded ones.
    ///
    /// The transactions of --input (ingress JSON, one per line, as `actio run
    /// --record-traffic` writes traffic.jsonl) go through PIPELINE — typically a copy
    /// with edited rules, thresholds or model — in one process on the embedded log,
    /// never to live topics, as fast as the machine allows. Each key's transactions
    /// are replayed in their recorded order, so velocity windows are rebuilt as the
    /// live pipeline built them. The new decisions are compared with --against (the
    /// recorded trail) or with --baseline (another pipeline replayed over the same
    /// traffic): outcome transitions, per-rule hit deltas, the score's distribution
    /// and the changed transactions with the rules they gained and lost. Writes
    /// diff.json and diff.html to --out.
    ///
    /// Examples:
    ///   actio run pipelines/fraud --trail --record-traffic --out results/live
    ///   actio replay pipelines/fraud --input results/live/traffic.jsonl --against results/live/trail.db
    ///   actio replay /tmp/fraud-edited --input results/live/traffic.jsonl --baseline pipelines/fraud
    ///   actio replay /tmp/fraud-edited --topic tx.in --since 2026-12-01T10:00:00Z --until 2026-12-01T11:00:00Z \
    ///       --brokers kafka:9092 --baseline pipelines/fraud
    #[command(verbatim_doc_comment)]
    Replay(ReplayArgs),
    /// Size a deployment for a target rate and p99, from measurements.
    ///
    /// Calibrates first: two short runs of each shape (every stage its own service,
    /// and all stages fused) at two rates, in one process on --bus — or reads runs you
    /// made (--from: their directories, as `actio run --out` writes them; two rates of
    /// a shape fit its model, one only assumes the wait unit). A queueing model fitted
    /// to them (CPU per thread group as a line in the rate; an M/M/c wait for a core
    /// per thread a transaction visits) predicts, at --rate: each service's CPU, its
    /// replicas and threads on replicas of --cores cores, the topics' partitions,
    /// whether to fuse, and the end-to-end p99. Writes plan.json under --out.
    ///
    /// --verify then runs the chosen shape at --rate in one process and prints the
    /// prediction for that run against what it measured (p99, cores busy).
    /// The model knows what the runs crossed: this machine's cores and scheduler, the
    /// bus's hops, the scenario's keys; not a broker's own limits. How it works and
    /// how well it predicted: BENCHMARKS.md, "Capacity plan".
    ///
    /// Examples:
    ///   actio plan pipelines/fraud --rate 3000 --p99 35ms
    ///   actio plan pipelines/fraud --rate 20000 --p99 10ms --verify
    ///   actio plan pipelines/fraud --rate 3000 --p99 35ms --bus kafka --cores 4
    ///   actio plan pipelines/fraud --rate 10000 --p99 20ms --from results/plan-1/calibration/*
    #[command(verbatim_doc_comment)]
    Plan(PlanArgs),
}

#[derive(Debug, Args)]
pub struct PlanArgs {
    /// The pipeline to plan (its directory).
    pub pipeline: PathBuf,
    /// Target rate, transactions per second.
    #[arg(long)]
    pub rate: u64,
    /// Target end-to-end p99 (e.g. 35ms).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub p99: Duration,
    /// Cores of each replica (a pod's CPU) [default: this machine's].
    #[arg(long)]
    pub cores: Option<u32>,
    /// Highest CPU utilization a replica is planned at.
    #[arg(long, default_value_t = 0.7)]
    pub max_utilization: f64,
    /// Runs to calibrate on instead of running them (directories with report.json).
    #[arg(long, num_args = 1.., value_name = "DIR")]
    pub from: Vec<PathBuf>,
    /// The two rates of each shape's calibration runs, tx/s [default: a quarter and
    /// three quarters of --rate, at least 200 and 600].
    #[arg(long, value_delimiter = ',', value_name = "LOW,HIGH")]
    pub calibrate_rates: Vec<u64>,
    /// How long each calibration run offers load.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    pub calibrate_duration: Duration,
    /// Then run the chosen shape at --rate and print predicted against measured.
    #[arg(long)]
    pub verify: bool,
    /// How long the verifying run offers load.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    pub verify_duration: Duration,
    /// Scenario of the runs [default: the pipeline's scenarios/baseline.toml].
    #[arg(long)]
    pub scenario: Option<PathBuf>,
    /// Where the runs and plan.json go [default: results/plan-<time>].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Print the plan as JSON.
    #[arg(long)]
    pub json: bool,
    /// Where the runs run: in-process log, or Kafka (all stages in this process).
    #[arg(long, value_enum, default_value_t = BusKind::Embedded)]
    pub bus: BusKind,
    #[command(flatten)]
    pub kafka: KafkaArgs,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("recorded").required(true).args(["against", "baseline"])))]
pub struct ReplayArgs {
    /// The pipeline to replay (its directory).
    pub pipeline: PathBuf,
    /// The recorded traffic: ingress JSON, one transaction per line.
    #[arg(long, value_name = "FILE.jsonl", required_unless_present = "topic", conflicts_with = "topic")]
    pub input: Option<PathBuf>,
    /// Instead of --input: the records of this Kafka topic (the ingress topic, as the
    /// producers wrote it) from --since to --until, read at --brokers without a
    /// consumer group (nothing is committed). They are kept in --out as
    /// traffic.jsonl, merged across partitions by their timestamps.
    #[arg(long)]
    pub topic: Option<String>,
    /// With --topic: from the first record at or after this time (RFC 3339, e.g.
    /// 2026-12-01T10:00:00Z) [default: the topic's oldest].
    #[arg(long, requires = "topic")]
    pub since: Option<String>,
    /// With --topic: up to the records before this time [default: the topic's end
    /// when the replay starts].
    #[arg(long, requires = "topic")]
    pub until: Option<String>,
    #[command(flatten)]
    pub kafka: KafkaArgs,
    /// The recorded decisions: a trail (SQLite file or postgres:// URL).
    #[arg(long, value_name = "FILE|URL")]
    pub against: Option<String>,
    /// Instead of a trail: replay this pipeline too, and compare with it.
    #[arg(long, value_name = "PIPELINE")]
    pub baseline: Option<PathBuf>,
    /// Where to write diff.json and diff.html [default: results/replay-<time>].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// How many changed transactions to list.
    #[arg(long, default_value_t = 20)]
    pub top: usize,
    /// Worker threads per stage [default: the pipeline's, else all cores].
    #[arg(long)]
    pub threads: Option<usize>,
    /// Print the diff as JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// Run the stages fused into one service (no topic between them; a chain only):
    /// faster, and the same decisions.
    #[arg(long)]
    pub fuse: bool,
}

#[derive(Debug, Args)]
pub struct TrailArgs {
    /// The trail: a SQLite file (trail.db beside a run's report) or a postgres:// URL.
    #[arg(value_name = "FILE|URL")]
    pub db: String,
    /// A transaction id: show its evaluation.
    pub tx_id: Option<String>,
    /// Only this outcome (one of the schema's, or dead_letter).
    #[arg(long)]
    pub outcome: Option<String>,
    /// Only transactions on which this rule fired (active or shadow).
    #[arg(long)]
    pub rule: Option<String>,
    /// Only this message key.
    #[arg(long)]
    pub key: Option<String>,
    /// Only transactions created at or after (RFC 3339, e.g. 2026-12-01T10:00:00Z).
    #[arg(long)]
    pub since: Option<String>,
    /// Only transactions created before (RFC 3339).
    #[arg(long)]
    pub until: Option<String>,
    /// At most this many, newest first.
    #[arg(long, default_value_t = 20)]
    pub limit: usize,
    /// JSON lines instead of text.
    #[arg(long)]
    pub json: bool,
    /// Print only how many transactions match the filters (--limit aside).
    #[arg(long, conflicts_with = "tx_id")]
    pub count: bool,
}

/// Which bus `actio run` uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BusKind {
    /// In-process partitioned log (no broker).
    Embedded,
    /// Apache Kafka at --brokers.
    Kafka,
}

/// How to reach Kafka.
#[derive(Debug, Clone, Args)]
pub struct KafkaArgs {
    /// Kafka bootstrap servers (host:port,...). A bootstrap.servers entry in the
    /// pipeline's [kafka] table or in ACTIO_KAFKA_PROPERTY_BOOTSTRAP_SERVERS wins.
    #[arg(long, env = "ACTIO_KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    pub brokers: String,
    /// Extra librdkafka property NAME=VALUE for every client (repeatable).
    #[arg(long = "kafka-property", value_name = "NAME=VALUE", value_parser = parse_property)]
    pub kafka_properties: Vec<(String, String)>,
}

fn parse_property(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.to_string())),
        _ => Err(format!(
            "expected NAME=VALUE (a librdkafka property), got {s:?}"
        )),
    }
}

#[derive(Debug, Args)]
pub struct StageArgs {
    /// Pipeline directory.
    #[arg(long, env = "ACTIO_PIPELINE")]
    pub pipeline: PathBuf,
    /// What to run: a [[stage]] name, a [[service]] name, or consecutive stages
    /// separated by commas (e.g. rules,velocity,score), fused into one service that
    /// hands each message from stage to stage in memory (group
    /// <pipeline>.rules+velocity+score).
    #[arg(long, env = "ACTIO_STAGE", value_name = "STAGE|SERVICE|A,B,..")]
    pub stage: String,
    #[command(flatten)]
    pub kafka: KafkaArgs,
    /// Address of the HTTP endpoint (/metrics, /healthz, /readyz).
    #[arg(long, env = "ACTIO_HTTP", default_value = "0.0.0.0:9400")]
    pub http: std::net::SocketAddr,
    /// Worker threads [default: the pipeline's, else all cores].
    #[arg(long)]
    pub threads: Option<usize>,
    /// An input partition with lag whose group's committed offset has not moved for
    /// this long counts as stalled (actio_stage_stalled_partitions, and a warning in
    /// the log): a replica holding it hangs. Every replica watches the whole group.
    #[arg(long, env = "ACTIO_STALL_AFTER", default_value = "60s", value_parser = humantime::parse_duration)]
    pub stall_after: Duration,
    /// Longest a graceful stop (drain, commit, flush) may take before exit code 1.
    #[arg(long, env = "ACTIO_GRACE", default_value = "30s", value_parser = humantime::parse_duration)]
    pub grace: Duration,
    /// Check the pipeline, the stage and the flags, print what would run, and exit
    /// without connecting.
    #[arg(long)]
    pub dry_run: bool,
    /// Do not watch the rule and model files for changes (SIGHUP and
    /// POST /admin/reload still reload them).
    #[arg(long, env = "ACTIO_NO_WATCH")]
    pub no_watch: bool,
    /// This replica's name, unique among the live replicas of the stage; an
    /// exactly-once stage's transactional id is <group>.<instance-id>, and a replica
    /// restarted under the same name aborts its predecessor's open transaction at
    /// once (k8s/: the pod's name) [default: host-pid; a replica that died then holds
    /// back its outputs' readers until its transaction times out, 10 s].
    #[arg(long, env = "ACTIO_INSTANCE_ID")]
    pub instance_id: Option<String>,
    /// Send OpenTelemetry traces to this OTLP/HTTP endpoint (a collector's base URL,
    /// e.g. http://127.0.0.1:4318): a span per message per stage, consumed → outputs
    /// acknowledged, child of its traceparent header. Off when unset.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT", value_name = "URL")]
    pub otlp_endpoint: Option<String>,
    /// With --otlp-endpoint: the share of new traces sampled (a message with a
    /// traceparent follows its sampled flag).
    #[arg(long, env = "ACTIO_TRACE_RATIO", default_value_t = 0.01, value_parser = parse_ratio)]
    pub trace_ratio: f64,
    /// Record the evaluation of each transaction this service decides or
    /// dead-letters (the decision trail) in this database: a postgres:// URL, where
    /// every replica writes one table, or a SQLite file. Written in batches off the
    /// latency path; GET /trail/<tx_id> and GET /trail?outcome=… on --http read it
    /// back. Off when unset.
    #[arg(long, env = "ACTIO_TRAIL", value_name = "LOCATION")]
    pub trail: Option<String>,
    /// With --trail: records queued at most while the database is slow or away; past
    /// that they are dropped and counted (actio_trail_records_total{result="dropped"}).
    #[arg(long, env = "ACTIO_TRAIL_BUFFER", default_value_t = actio_trail::DEFAULT_CAPACITY, value_name = "RECORDS")]
    pub trail_buffer: usize,
}

fn parse_ratio(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err(format!("expected a ratio between 0 and 1 (0.01 = one trace in a hundred), got {s:?}")),
    }
}

#[derive(Debug, Args)]
pub struct TopicsArgs {
    #[command(subcommand)]
    pub action: TopicsAction,
}

#[derive(Debug, Subcommand)]
pub enum TopicsAction {
    /// Create the pipeline's topics with their configured partitions (existing ones
    /// are kept; a partition count that differs is reported).
    Create(TopicsTarget),
    /// Show each topic's partitions, end offsets and every stage group's lag.
    Describe(TopicsTarget),
}

#[derive(Debug, Args)]
pub struct TopicsTarget {
    /// Pipeline directory.
    pub pipeline: PathBuf,
    #[command(flatten)]
    pub kafka: KafkaArgs,
}

#[derive(Debug, Args)]
pub struct LoadgenArgs {
    /// Pipeline directory.
    #[arg(long, env = "ACTIO_PIPELINE")]
    pub pipeline: PathBuf,
    #[command(flatten)]
    pub kafka: KafkaArgs,
    #[command(flatten)]
    pub load: LoadArgs,
    /// The broker JVM's GC log (unified logging with `safepoint` lines and the `time`
    /// decorator, as scripts/kafka writes it; `scripts/kafka gc-log` prints its path),
    /// read after the run with its rotated copies. Each second of the report then shows
    /// how long the broker was stopped in it; seconds with 10 ms or more are marked, and
    /// the e2e outside them is reported beside the overall e2e. The broker must share
    /// this machine's clock. Without it the per-second series has no marks.
    #[arg(long, env = "ACTIO_BROKER_GC_LOG", value_name = "PATH")]
    pub broker_gc_log: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ValidateArgs {
    /// Pipeline directory (holding pipeline.toml) or the file itself.
    pub pipeline: PathBuf,
    /// Print the pipeline as actio resolves it, defaults applied, as one JSON object
    /// instead of the summary: topics, and per stage its topics, consumer groups,
    /// replicas and limits. For tools such as scripts/k8s-gen, so they need no TOML
    /// parser and no copy of the defaults. Nothing else goes to stdout; errors go to
    /// stderr, exit code 2, as without --json.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct GraphArgs {
    /// Pipeline directory (holding pipeline.toml) or the file itself.
    pub pipeline: PathBuf,
    /// Print a Mermaid flowchart instead of text.
    #[arg(long)]
    pub mermaid: bool,
}

#[derive(Debug, Args)]
pub struct SchemaArgs {
    /// Pipeline directory (holding pipeline.toml).
    pub pipeline: PathBuf,
    /// Which record to print.
    #[arg(long, value_enum, default_value_t = RecordKind::Tx)]
    pub record: RecordKind,
    /// Write tx.schema.json and decision.schema.json into the pipeline's directory.
    #[arg(long)]
    pub write: bool,
}

/// A record of a pipeline's edges.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RecordKind {
    /// The transaction on the ingress topic.
    Tx,
    /// The decision on the egress topic.
    Decision,
}

#[derive(Debug, Clone, Args)]
pub struct LoadArgs {
    /// Transactions per second to offer.
    #[arg(long, default_value_t = 3000)]
    pub rate: u64,
    /// How long to offer load (e.g. 30s, 2m).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Ramp linearly from --rate to this rate over --duration (find the maximum).
    #[arg(long)]
    pub ramp_to: Option<u64>,
    /// Seed of the transaction generator (same seed, same transactions) [default:
    /// the scenario's].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Scenario file: how each field of the pipeline's schema is generated (key
    /// popularity, amounts, episodes such as bursts per key) [default: the pipeline's
    /// scenarios/baseline.toml]. Format: docs/pipeline-model.md.
    #[arg(long)]
    pub scenario: Option<PathBuf>,
    /// Where to write report.json, *.hgrm and report.html [default: results/<run>].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// After the load ends, how long to wait without a new decision before the
    /// transactions still missing count as lost. A pipeline working through a
    /// backlog is waited for as long as decisions keep arriving.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub drain: Duration,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Pipeline directory.
    pub pipeline: PathBuf,
    #[command(flatten)]
    pub load: LoadArgs,
    /// Worker threads per stage [default: the pipeline's, else all cores].
    #[arg(long)]
    pub threads: Option<usize>,
    /// Where the stages run: in-process log, or Kafka (all stages in this process).
    #[arg(long, value_enum, default_value_t = BusKind::Embedded)]
    pub bus: BusKind,
    /// Run every stage as one fused service (no topic between the stages), whatever
    /// the pipeline's [[service]]s say.
    #[arg(long, conflicts_with = "each_stage")]
    pub fuse: bool,
    /// Run every stage as its own service, ignoring the pipeline's [[service]]s.
    #[arg(long)]
    pub each_stage: bool,
    /// Do not watch the rule and model files for changes (SIGHUP still reloads them).
    #[arg(long)]
    pub no_watch: bool,
    /// Record each transaction's evaluation, the decision trail (`actio trail` reads
    /// it): `--trail` alone writes a fresh trail.db beside the report;
    /// `--trail=postgres://user@host:port/db` writes to PostgreSQL (kept across runs;
    /// a transaction's record is replaced if it is decided again). Off by default: on
    /// two cores its writer costs the stages' tail (BENCHMARKS.md, "Decision trail").
    #[arg(long, value_name = "LOCATION", num_args = 0..=1, require_equals = true, default_missing_value = "")]
    pub trail: Option<String>,
    /// With --trail: records queued at most while the database is slow or away; past
    /// that they are dropped and counted (decisions never wait for the trail).
    #[arg(long, default_value_t = actio_trail::DEFAULT_CAPACITY, value_name = "RECORDS")]
    pub trail_buffer: usize,
    /// Write every transaction sent, as its ingress JSON, one per line, to
    /// traffic.jsonl beside the report: the recorded traffic `actio replay` re-runs.
    #[arg(long)]
    pub record_traffic: bool,
    #[command(flatten)]
    pub kafka: KafkaArgs,
}

impl RunArgs {
    /// The services to start: as `pipeline.toml` groups them, unless a flag says.
    pub fn services(&self) -> actio_pipeline::launch::Selection<'static> {
        use actio_pipeline::launch::Selection;
        match (self.fuse, self.each_stage) {
            (true, _) => Selection::Fused,
            (_, true) => Selection::EachStage,
            _ => Selection::All,
        }
    }
}
