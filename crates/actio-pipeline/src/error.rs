//! Configuration errors: each names the file, the field, the line when known, and
//! what was expected.

use std::fmt;

/// A pipeline that cannot be loaded: file, line, the entry at fault, what was
/// expected — the same type as every file error actio reports.
pub use actio_core::FileError as ConfigError;

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
