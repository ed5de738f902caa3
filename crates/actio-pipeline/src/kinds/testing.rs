//! What the kinds' tests share: a small pipeline written to a temporary directory.
#![allow(clippy::unwrap_used)] // tests' helper: a failure is a failed test

use crate::Pipeline;

/// A `[[topic]]` table of 2 partitions.
pub(crate) fn topic(name: &str, codec: &str, role: &str) -> String {
    format!("[[topic]]\nname = \"{name}\"\npartitions = 2\ncodec = \"{codec}\"\nrole = \"{role}\"\n")
}

/// `schema.toml`, `pipeline.toml` and `files` (name, text) in a new directory, and
/// the pipeline loaded from it (or its errors, as text).
pub(crate) fn pipeline_in(schema: &str, pipeline: &str, files: &[(&str, &str)]) -> (tempfile::TempDir, Result<Pipeline, String>) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("schema.toml"), schema).unwrap();
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    std::fs::write(dir.path().join("pipeline.toml"), pipeline).unwrap();
    let p = Pipeline::load(dir.path()).map_err(|e| e.to_string());
    (dir, p)
}
