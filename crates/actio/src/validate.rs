//! `actio validate`: load everything a pipeline names, start nothing.

use std::process::ExitCode;

use std::time::Duration;

use actio_pipeline::{Pipeline, TopicRole};
use serde_json::{json, Value};

use crate::cli::ValidateArgs;

/// The pipeline's load scenarios (`scenarios/*.toml`), each checked against its
/// schema: `(file, error)` for those that do not fit.
fn scenario_errors(pipeline: &Pipeline) -> (usize, Vec<String>) {
    let Ok(dir) = std::fs::read_dir(pipeline.dir.join("scenarios")) else { return (0, Vec::new()) };
    let mut files: Vec<_> = dir.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.extension().is_some_and(|x| x == "toml")).collect();
    files.sort();
    let errors = files
        .iter()
        .filter_map(|f| actio_loadgen::Scenario::load(f).and_then(|s| actio_loadgen::Generator::new(pipeline.schema.clone(), &s, "validate")).err())
        .map(|e| e.to_string())
        .collect();
    (files.len(), errors)
}

pub fn main(args: ValidateArgs) -> anyhow::Result<ExitCode> {
    let loaded = Pipeline::load(&args.pipeline).map_err(|e| e.0.iter().map(|e| e.to_string()).collect::<Vec<_>>()).and_then(|p| {
        let (n, errors) = scenario_errors(&p);
        if errors.is_empty() { Ok((p, n)) } else { Err(errors) }
    });
    let (pipeline, scenarios) = match loaded {
        Ok(p) => p,
        Err(errors) => {
            eprintln!("{} is not valid ({} error{}):", args.pipeline.display(), errors.len(), if errors.len() == 1 { "" } else { "s" });
            for e in &errors {
                eprintln!("  {e}");
            }
            return Ok(ExitCode::from(crate::EXIT_CONFIG));
        }
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&resolved(&pipeline))?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("pipeline {:?} ({}) is valid", pipeline.name, pipeline.dir.display());
    let sch = &pipeline.schema;
    println!(
        "  schema: {} fields + {} derived, id {}, time {}; outcomes {}",
        sch.raw_fields().len(),
        sch.fields().len() - sch.raw_fields().len(),
        sch.field(sch.id_slot()).name,
        sch.field(sch.time_slot()).name,
        sch.decision().outcomes.join(" < ")
    );
    println!("  key: {}", pipeline.key_fields.join(" + "));
    println!("  load scenarios: {scenarios} in scenarios/, each fits the schema");
    for t in &pipeline.topics {
        println!("  topic {:<18} {:>3} partitions  {:?}  {:?}", t.name, t.partitions, t.codec, t.role);
    }
    for s in &pipeline.stages {
        let mut what = s.logic.describe().into_iter();
        println!("  stage {:<9} {} → {}  {}: {}  group {}  replicas {}", s.name, s.input, s.output, s.kind.name, what.next().unwrap_or_default(), s.group, s.replicas);
        for line in what {
            println!("    {line}");
        }
        if let Some(t) = &s.limits.retry.topic {
            let wait = if t.max_delay > t.delay {
                format!("{:?} after the failure, doubling each trip up to {:?}", t.delay, t.max_delay)
            } else {
                format!("each {:?} after the failure", t.delay)
            };
            println!("    retries: {} in place, then up to {} trips through {} ({wait}), then {}", s.limits.retry.attempts, t.attempts, t.topic, s.dlq);
        }
        if s.limits.exactly_once {
            println!("    exactly-once: outputs and input offsets commit in a Kafka transaction every {:?}", s.limits.commit_interval);
        }
    }
    for f in &pipeline.fused {
        let names: Vec<&str> = f.stages(&pipeline).iter().map(|s| s.name.as_str()).collect();
        println!("  service {:<9} {} fused in one process, no topic between them  group {}  replicas {}", f.name, names.join(" → "), f.group, f.replicas);
    }
    for w in pipeline.warnings.iter().chain(&pipeline.fault_warnings()) {
        println!("  warning: {w}");
    }
    Ok(ExitCode::SUCCESS)
}

/// `validate --json`: the pipeline as resolved, defaults applied, so that tools
/// (scripts/k8s-gen) read these values instead of parsing pipeline.toml again with
/// their own copy of the defaults.
fn resolved(pipeline: &Pipeline) -> Value {
    let topics: Vec<Value> = pipeline
        .topics
        .iter()
        .map(|t| {
            let role = match t.role {
                TopicRole::Ingress => "ingress",
                TopicRole::Internal => "internal",
                TopicRole::Egress => "egress",
                TopicRole::DeadLetter => "dead_letter",
                TopicRole::Retry => "retry",
            };
            json!({ "name": t.name, "partitions": t.partitions, "codec": t.codec, "role": role })
        })
        .collect();
    let stages: Vec<Value> = pipeline
        .stages
        .iter()
        .map(|s| {
            let kind = s.kind.name;
            let l = &s.limits;
            let retry = l.retry.topic.as_ref();
            json!({
                "name": s.name,
                "kind": kind,
                "input": s.input,
                "output": s.output,
                "dlq": s.dlq,
                "group": s.group,
                "replicas": s.replicas,
                "drain_timeout_ms": millis(l.drain_timeout),
                "max_in_flight_per_partition": l.max_in_flight_per_partition,
                "max_in_flight": l.max_in_flight,
                "commit_interval_ms": millis(l.commit_interval),
                "threads": l.threads,
                "budget_ms": l.budget_ms,
                "exactly_once": l.exactly_once,
                "retry_topic": retry.map(|t| &*t.topic),
                "retry_group": retry.map(|t| &t.group),
            })
        })
        .collect();
    // What is deployed: each `[[service]]` and every other stage alone, with the
    // runtime spec it runs with (a fused service's group, input and limits).
    let plans = actio_pipeline::launch::plan(pipeline, actio_pipeline::launch::Selection::All, &Default::default()).unwrap_or_default();
    let services: Vec<Value> = plans
        .iter()
        .map(|p| {
            let s = &p.spec;
            let retry = s.retry.topic.as_ref();
            json!({
                "name": s.name,
                "stages": p.handler.stages().map(|st| st.name.as_str()).collect::<Vec<_>>(),
                "input": s.input,
                "output": p.handler.stages().last().map(|st| st.output.as_str()),
                "group": s.group,
                "replicas": p.handler.replicas(),
                "drain_timeout_ms": millis(s.drain_timeout),
                "max_in_flight_per_partition": s.max_in_flight_per_partition,
                "max_in_flight": s.max_in_flight,
                "threads": s.threads,
                "retry_topic": retry.map(|t| &*t.topic),
                "retry_group": retry.map(|t| &t.group),
                "metrics": served_metrics(&s.name, &p.handler),
            })
        })
        .collect();
    json!({
        "name": pipeline.name,
        "dir": pipeline.dir,
        "key_fields": pipeline.key_fields,
        "topics": topics,
        "stages": stages,
        "services": services,
        "outcomes": pipeline.schema.decision().outcomes,
        "env": pipeline.env,
        "warnings": pipeline.warnings.iter().cloned().chain(pipeline.fault_warnings()).collect::<Vec<_>>(),
    })
}

/// The names of the series a service serves on `/metrics` (`_bucket`, `_sum` and
/// `_count` for a histogram), from the exposition itself: what k8s/'s alerts and
/// dashboard may query (scripts/k8s-validate checks them against this).
fn served_metrics(service: &str, handler: &actio_pipeline::stages::StageHandler) -> Vec<String> {
    use actio_runtime::Handler as _;
    let mut m = actio_runtime::StageMetrics::new(service);
    m.handler = handler.counters();
    let text = m.prometheus_text(Some(0), Some(0), Some(0));
    let mut names: Vec<String> = Vec::new();
    for line in text.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
        let mut parts = line.split_whitespace();
        let (Some(name), Some(kind)) = (parts.next(), parts.next()) else { continue };
        match kind {
            "histogram" => names.extend(["_bucket", "_sum", "_count"].map(|s| format!("{name}{s}"))),
            _ => names.push(name.to_string()),
        }
    }
    names
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
