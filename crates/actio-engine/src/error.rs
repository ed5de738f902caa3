//! Engine errors: file, field, line and what was expected.

use std::fmt;
use std::path::{Path, PathBuf};

/// What went wrong, for callers that decide on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The file could not be read.
    Io,
    /// Not valid TOML, an unknown field, a wrong type.
    Syntax,
    /// A CEL expression that does not parse.
    Cel,
    /// A name that does not exist (tx field, feature, rule).
    UnknownName,
    /// A value out of range or inconsistent (duplicate id, thresholds out of order).
    Invalid,
}

/// A stage file that cannot be loaded.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub struct EngineError {
    /// What kind of problem.
    pub kind: ErrorKind,
    /// The file.
    pub file: PathBuf,
    /// The field (`rule "small_ecom".when`, `feature[2].window`), when known.
    pub field: Option<String>,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// What was wrong and what was expected.
    pub message: String,
}

impl EngineError {
    pub(crate) fn new(kind: ErrorKind, file: &Path, field: Option<String>, line: Option<usize>, message: impl Into<String>) -> Self {
        EngineError { kind, file: file.to_path_buf(), field, line, message: message.into() }
    }
}

impl fmt::Display for EngineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(l) = self.line {
            write!(f, ":{l}")?;
        }
        if let Some(field) = &self.field {
            write!(f, ": field `{field}`")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// The 1-based line of the first line of `text` that contains `needle` (to point
/// at a table entry by its id when the parser gives no span).
pub(crate) fn line_containing(text: &str, needle: &str) -> Option<usize> {
    text.lines().position(|l| l.contains(needle)).map(|i| i + 1)
}
