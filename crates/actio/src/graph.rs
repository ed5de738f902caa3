//! `actio graph`: the pipeline's stages and the topics between them.

use std::process::ExitCode;

use actio_pipeline::Pipeline;

use crate::cli::GraphArgs;

pub fn main(args: GraphArgs) -> anyhow::Result<ExitCode> {
    let pipeline = match Pipeline::load(&args.pipeline) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("{} is not valid ({} error{}):", args.pipeline.display(), e.0.len(), if e.0.len() == 1 { "" } else { "s" });
            for e in &e.0 {
                eprintln!("  {e}");
            }
            return Ok(ExitCode::from(crate::EXIT_CONFIG));
        }
    };
    let g = pipeline.graph();
    if args.mermaid {
        print!("{}", g.mermaid(&|_| None));
    } else {
        println!("pipeline {:?}: {} stages; in: {}; out: {}", pipeline.name, g.stages.len(), g.sources.join(", "), g.sinks.join(", "));
        print!("{}", g.text());
    }
    Ok(ExitCode::SUCCESS)
}
