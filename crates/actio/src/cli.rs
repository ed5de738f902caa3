//! Command-line arguments. Each command's help says what it does, with an example.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

/// actio — low-latency transaction pipelines on Apache Kafka.
///
/// A pipeline (pipelines/<name>/pipeline.toml) is a chain of stages — rules,
/// velocity features, scoring — between Kafka topics. Each stage parallelizes
/// work across cores within each partition while keeping per-key order, and
/// commits only offsets whose outputs are acknowledged.
///
/// Start here:
///   actio validate pipelines/fraud              check a pipeline
///   actio run pipelines/fraud                   run it all in one process (no broker needed)
///   actio run pipelines/fraud --rate 20000 --duration 30s
#[derive(Debug, Parser)]
#[command(name = "actio", version, about, long_about, verbatim_doc_comment, max_term_width = 100)]
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
    /// Example: actio validate pipelines/fraud
    #[command(verbatim_doc_comment)]
    Validate(ValidateArgs),
    /// Run a whole pipeline in one process and drive it with the load generator.
    ///
    /// All stages, the load generator and the collector run together on the
    /// embedded bus (an in-process partitioned log with consumer groups; no
    /// broker needed). Prints progress every second, then a latency report per
    /// stage; writes report.json, .hgrm files and report.html under --out.
    /// Exit code 1 if any transaction was lost.
    ///
    /// Examples:
    ///
    ///   actio run pipelines/fraud
    ///   actio run pipelines/fraud --rate 3000 --duration 60s --out results/baseline
    ///   actio run pipelines/fraud --rate 10000 --ramp-to 400000 --duration 60s
    #[command(verbatim_doc_comment)]
    Run(RunArgs),
}

#[derive(Debug, Args)]
pub struct ValidateArgs {
    /// Pipeline directory (holding pipeline.toml) or the file itself.
    pub pipeline: PathBuf,
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
    /// Seed of the transaction generator (same seed, same transactions).
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Distinct cards (keys are Zipf-distributed over them).
    #[arg(long)]
    pub cards: Option<u64>,
    /// Scenario file (loadtest/*.toml) with generator settings.
    #[arg(long)]
    pub scenario: Option<PathBuf>,
    /// Where to write report.json, *.hgrm and report.html [default: results/<run>].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// How long to wait for the last decisions after the load ends.
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
}

