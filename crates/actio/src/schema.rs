//! `actio schema`: the JSON Schemas of a pipeline's ingress and egress records,
//! generated from its `schema.toml` (the shipped `*.schema.json` files are this
//! command's output).

use std::process::ExitCode;

use actio_core::Schema;
use anyhow::Context;

use crate::cli::{RecordKind, SchemaArgs};

/// The two files `--write` produces, as (file name, record).
pub const FILES: [(&str, RecordKind); 2] = [("tx.schema.json", RecordKind::Tx), ("decision.schema.json", RecordKind::Decision)];

/// The JSON text of `record`'s schema for the pipeline `name`.
pub fn render(schema: &Schema, name: &str, record: RecordKind) -> String {
    let value = match record {
        RecordKind::Tx => schema.ingress_json_schema(&format!("{name}: transaction (ingress)")),
        RecordKind::Decision => schema.egress_json_schema(&format!("{name}: decision (egress)")),
    };
    // A serde_json::Value always serializes.
    serde_json::to_string_pretty(&value).unwrap_or_default() + "\n"
}

pub fn main(args: SchemaArgs) -> anyhow::Result<ExitCode> {
    let pipeline = match crate::run::load_pipeline(&args.pipeline) {
        Ok(p) => p,
        Err(code) => return Ok(code),
    };
    if args.write {
        for (file, record) in FILES {
            let path = pipeline.dir.join(file);
            std::fs::write(&path, render(&pipeline.schema, &pipeline.name, record)).with_context(|| format!("writing {}", path.display()))?;
            println!("wrote {}", path.display());
        }
    } else {
        print!("{}", render(&pipeline.schema, &pipeline.name, args.record));
    }
    Ok(ExitCode::SUCCESS)
}
