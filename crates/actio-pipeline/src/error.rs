//! Configuration errors: each names the file, the field, the line when known, and
//! what was expected.

use std::fmt;
use std::path::PathBuf;

/// A pipeline that cannot be loaded.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    /// The file at fault.
    pub file: PathBuf,
    /// The field at fault (`stage[1].input`, `topic "tx.in".partitions`), when known.
    pub field: Option<String>,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// What was wrong and what was expected.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if let Some(field) = &self.field {
            write!(f, ": field `{field}`")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl ConfigError {
    /// An error at a byte span of a file's text.
    pub fn at(file: &std::path::Path, text: &str, span: std::ops::Range<usize>, field: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError { file: file.to_path_buf(), field: Some(field.into()), line: line_of(text, span.start), message: message.into() }
    }
}

/// 1-based line of a byte offset (`None` for an empty span at 0, i.e. a default value).
pub fn line_of(text: &str, offset: usize) -> Option<usize> {
    if offset == 0 && text.is_empty() {
        return None;
    }
    Some(text.get(..offset.min(text.len()))?.bytes().filter(|&b| b == b'\n').count() + 1)
}

/// Several errors at once: `actio validate` reports them all.
#[derive(Debug, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}
