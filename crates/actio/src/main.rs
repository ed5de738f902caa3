//! The `actio` command line: validate a pipeline, print its records' JSON Schemas, run it whole in one process (on
//! the embedded bus or Kafka) with the load generator, run one stage as a Kafka
//! service, manage the pipeline's topics, drive stages that run elsewhere.
//!
//! Libraries return typed errors; this binary adds context and turns them into
//! exit codes: 0 success, 1 a run that lost messages or failed, 2 bad configuration
//! or usage.

use std::process::ExitCode;

use clap::Parser;
use mimalloc::MiMalloc;

mod cli;
mod graph;
mod kafka;
mod otel;
mod plan;
mod replay;
mod run;
mod schema;
mod service;
mod stalls;
mod topics;
mod trail;
mod validate;

#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

/// Exit code for bad configuration or usage.
pub const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    // `actio plan` makes runs of its own and prints their figures; their stages' info
    // lines (assignments, restores) would bury them.
    let default_filter = match args.command {
        cli::Command::Plan(_) => "warn",
        _ => "warn,actio=info,actio_pipeline::reload=info,actio_trail=info",
    };
    init_logging(args.log_json, default_filter);
    let result = match args.command {
        cli::Command::Validate(a) => validate::main(a),
        cli::Command::Graph(a) => graph::main(a),
        cli::Command::Schema(a) => schema::main(a),
        cli::Command::Run(a) => run::main(a),
        cli::Command::Stage(a) => service::main(a),
        cli::Command::Topics(a) => topics::main(a),
        cli::Command::Loadgen(a) => run::loadgen(a),
        cli::Command::Trail(a) => trail::main(a),
        cli::Command::Replay(a) => replay::main(a),
        cli::Command::Plan(a) => plan::main(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn init_logging(json: bool, default_filter: &str) {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    use tracing_subscriber::{EnvFilter, Layer as _};
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let json =
        json || std::env::var("ACTIO_LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("json"));
    // rdkafka's `BaseConsumer` closes its queue again when dropped and logs the
    // refusal ("Failed to close consumer queue on drop: BrokerDestroy") as an error,
    // although our `close` already left the group cleanly. Its only error-level line.
    let not_double_close = tracing_subscriber::filter::filter_fn(|m| {
        !(m.target() == "rdkafka::consumer::base_consumer" && *m.level() == tracing::Level::ERROR)
    });
    // Colours only on a terminal: a log file or `kubectl logs` gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(ansi);
    let fmt = if json { fmt.json().boxed() } else { fmt.boxed() };
    tracing_subscriber::registry().with(fmt.with_filter(not_double_close).with_filter(filter)).init();
}
