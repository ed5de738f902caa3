//! `actio validate`: load everything a pipeline names, start nothing.

use std::process::ExitCode;

use actio_pipeline::{Pipeline, StageLogic};

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
        let what = match &s.logic {
            StageLogic::Rules(r) => {
                let r = r.current();
                format!("{} rules (version {})", r.len(), r.version())
            }
            StageLogic::Velocity { spec, rules } => format!(
                "{} features{}",
                spec.feature_names().len(),
                rules.as_ref().map(|r| format!(" + {} rules (version {})", r.current().len(), r.current().version())).unwrap_or_default()
            ),
            StageLogic::Score(m) => format!("model version {}", m.version()),
        };
        println!("  stage {:<9} {} → {}  {}  group {}  replicas {}", s.name, s.input, s.output, what, s.group, s.replicas);
        if let StageLogic::Velocity { spec, .. } = &s.logic {
            match spec.restore_window() {
                w if w.is_zero() => println!("    windows start empty on an assigned partition (restore = \"off\")"),
                w => println!(
                    "    an assigned partition's windows are rebuilt from the last {} of its input (at most {} records)",
                    humantime::format_duration(w),
                    spec.restore_max_records()
                ),
            }
        }
        if let Some(t) = &s.limits.retry.topic {
            let wait = if t.max_delay > t.delay {
                format!("{:?} after the failure, doubling each trip up to {:?}", t.delay, t.max_delay)
            } else {
                format!("each {:?} after the failure", t.delay)
            };
            println!("    retries: {} in place, then up to {} trips through {} ({wait}), then {}", s.limits.retry.attempts, t.attempts, t.topic, s.dlq);
        }
    }
    for w in pipeline.warnings.iter().chain(&pipeline.fault_warnings()) {
        println!("  warning: {w}");
    }
    Ok(ExitCode::SUCCESS)
}
