//! actio's per-transaction logic, as pure libraries the stages call.
//!
//! - [`rules`]: CEL rules over the transaction and its features, parsed with the
//!   `cel` crate and compiled **once** at load into a typed expression tree that
//!   reads fields straight from the transaction — no per-transaction context, no
//!   copying (building a CEL context per transaction costs ~35 µs, a hundred
//!   rules' worth).
//! - [`velocity`]: per-key sliding windows over event time (count, sum, distinct),
//!   memory bounded by TTL and a key cap.
//! - [`score`]: a logistic model over features and rule hits, thresholds to a
//!   verdict, hard rule actions overriding it.
//!
//! Every file error names the file, the field, the line where known, and what was
//! expected ([`EngineError`]).
#![deny(missing_docs)]

mod error;
pub mod expr;
pub mod rules;
pub mod score;
pub mod velocity;

pub use error::{EngineError, ErrorKind};

/// Parses a TOML file into `T`, mapping parse errors to [`EngineError`] with line.
pub(crate) fn parse_toml<T: serde::de::DeserializeOwned>(text: &str, origin: &std::path::Path) -> Result<T, EngineError> {
    toml::from_str(text).map_err(|e| {
        let line = e.span().map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
        // Quote the offending line: it names the field where the message does not.
        let at = line.and_then(|l| text.lines().nth(l - 1)).map(|l| format!(" (at `{}`)", l.trim())).unwrap_or_default();
        EngineError::new(ErrorKind::Syntax, origin, None, line, format!("{}{at}", e.message().trim()))
    })
}

/// Reads a file, naming it on failure.
pub(crate) fn read(path: &std::path::Path) -> Result<String, EngineError> {
    std::fs::read_to_string(path).map_err(|e| EngineError::new(ErrorKind::Io, path, None, None, format!("cannot read: {e}")))
}
