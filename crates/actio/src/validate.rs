//! `actio validate`: load everything a pipeline names, start nothing.

use std::process::ExitCode;

use actio_pipeline::{Pipeline, StageLogic};

use crate::cli::ValidateArgs;

pub fn main(args: ValidateArgs) -> anyhow::Result<ExitCode> {
    let pipeline = match Pipeline::load(&args.pipeline) {
        Ok(p) => p,
        Err(errors) => {
            eprintln!("{} is not valid ({} error{}):", args.pipeline.display(), errors.0.len(), if errors.0.len() == 1 { "" } else { "s" });
            for e in &errors.0 {
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
