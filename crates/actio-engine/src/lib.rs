//! actio's per-transaction logic, as pure libraries the stages call.
//!
//! - [`rules`]: CEL rules over the transaction and its features, parsed with the
//!   `cel` crate and compiled **once** at load into a typed expression tree that
//!   reads fields straight from the transaction — no per-transaction context, no
//!   copying (building a CEL context per transaction costs ~35 µs, a hundred
//!   rules' worth).
//! - [`derive`]: the schema's derived fields, computed once at ingress.
//! - [`velocity`]: per-key sliding windows over event time (count, sum, min, max,
//!   distinct) keyed by any declared field(s),
//!   memory bounded by TTL and a key cap.
//! - [`reload`]: rule sets and models that reload from their files while stages
//!   run, swapped atomically between messages; a bad edit keeps what is in force.
//! - [`score`]: a logistic model over features and rule hits, thresholds to a
//!   verdict, hard rule actions overriding it.
//!
//! Every file error names the file, the field, the line where known, and what was
//! expected ([`EngineError`]).
#![deny(missing_docs)]

pub mod derive;
mod error;
pub mod expr;
pub mod rules;
pub mod reload;
pub mod score;
pub mod velocity;

pub use error::{EngineError, ErrorKind};

/// Parses a TOML file into `T`, mapping parse errors to [`EngineError`] with line.
pub(crate) fn parse_toml<T: serde::de::DeserializeOwned>(text: &str, origin: &std::path::Path) -> Result<T, EngineError> {
    toml::from_str(text).map_err(|e| {
        let (line, message) = actio_core::schema::toml_error(text, &e);
        EngineError::new(ErrorKind::Syntax, origin, None, line, message)
    })
}

/// Reads a file, naming it on failure.
pub(crate) fn read(path: &std::path::Path) -> Result<String, EngineError> {
    std::fs::read_to_string(path).map_err(|e| EngineError::new(ErrorKind::Io, path, None, None, format!("cannot read: {e}")))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test
pub(crate) mod tests {
    use std::path::Path;
    use std::sync::Arc;

    use actio_core::{Schema, TxState};

    /// A neutral schema for the engine's own tests (no pipeline's fields).
    pub(crate) const SCHEMA_FIELDS: &str = r#"
[record]
id = "id"
time = "at"

[[field]]
name = "id"
type = "string"

[[field]]
name = "user"
type = "string"

[[field]]
name = "device"
type = "string"
optional = true

[[field]]
name = "shop"
type = "string"

[[field]]
name = "amount_minor"
type = "int"
min = 0

[[field]]
name = "region"
type = "string"
optional = true

[[field]]
name = "kind"
type = "enum"
values = ["a", "b", "c"]

[[field]]
name = "code"
type = "int"
optional = true

[[field]]
name = "at"
type = "timestamp"

[[field]]
name = "attrs"
type = "map"

[[derived]]
name = "amount"
type = "float"
cel = "double(tx.amount_minor) / 100.0"

[[derived]]
name = "hour"
type = "int"
cel = "(tx.at / 3600000000000) % 24"
"#;

    /// Its decision.
    pub(crate) const DECISION: &str = "\n[decision]\noutcomes = [\"approve\", \"review\", \"decline\"]\nfields = [\"user\", \"amount\"]\nfeatures = [\"user_tx_1m\"]\n";

    pub(crate) fn schema() -> Arc<Schema> {
        Arc::new(Schema::from_toml(&format!("{SCHEMA_FIELDS}{DECISION}"), Path::new("schema.toml")).unwrap())
    }

    /// A transaction of `schema` from ingress JSON, derived fields computed.
    pub(crate) fn state(schema: &Arc<Schema>, json: &str) -> TxState {
        let mut st = TxState::new(schema.decode_json(json.as_bytes()).unwrap());
        crate::derive::DerivedFields::compile(schema).unwrap().fill(&mut st).unwrap();
        st
    }
}
