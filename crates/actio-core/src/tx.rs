//! What travels through a pipeline: the state of a transaction between stages
//! ([`TxState`]) and what leaves it ([`Decision`]).
//!
//! The transaction itself is a [`Tx`] of its pipeline's declared schema
//! ([`crate::schema`]): this crate knows no business field by name. Ingress and
//! egress are JSON so that any Kafka client can produce and read them; between
//! stages [`TxState`] goes through a compact binary codec (see [`crate::codec`]).
//! No field uses `skip_serializing_if`: postcard is not self-describing, so every
//! field is always written.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

pub use crate::schema::Tx;

/// A scalar value of a map field: a JSON boolean, number or string.
#[derive(Debug, Clone, PartialEq)]
pub enum Scalar {
    /// `true` / `false`.
    Bool(bool),
    /// An integer.
    Int(i64),
    /// A floating-point number.
    Float(f64),
    /// A string.
    Str(String),
}

#[derive(Serialize, Deserialize)]
enum ScalarTagged {
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum ScalarUntagged {
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
}

impl Serialize for Scalar {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            match self {
                Scalar::Bool(b) => s.serialize_bool(*b),
                Scalar::Int(i) => s.serialize_i64(*i),
                Scalar::Float(f) => s.serialize_f64(*f),
                Scalar::Str(v) => s.serialize_str(v),
            }
        } else {
            match self.clone() {
                Scalar::Bool(b) => ScalarTagged::Bool(b),
                Scalar::Int(i) => ScalarTagged::Int(i),
                Scalar::Float(f) => ScalarTagged::Float(f),
                Scalar::Str(v) => ScalarTagged::Str(v),
            }
            .serialize(s)
        }
    }
}

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(if d.is_human_readable() {
            match ScalarUntagged::deserialize(d).map_err(|_| {
                serde::de::Error::custom("expected a boolean, number or string")
            })? {
                ScalarUntagged::Bool(b) => Scalar::Bool(b),
                ScalarUntagged::Int(i) => Scalar::Int(i),
                ScalarUntagged::Float(f) => Scalar::Float(f),
                ScalarUntagged::Str(v) => Scalar::Str(v),
            }
        } else {
            match ScalarTagged::deserialize(d)? {
                ScalarTagged::Bool(b) => Scalar::Bool(b),
                ScalarTagged::Int(i) => Scalar::Int(i),
                ScalarTagged::Float(f) => Scalar::Float(f),
                ScalarTagged::Str(v) => Scalar::Str(v),
            }
        })
    }
}

/// Timestamps: RFC 3339 strings in JSON (integers of ns also accepted), i64 ns in binary.
pub mod timestamp {
    use serde::{Deserialize, Deserializer, Serializer, de};

    /// Serializes ns since the epoch.
    pub fn serialize<S: Serializer>(ns: &i64, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.serialize_str(&crate::time::format_rfc3339_ns(*ns))
        } else {
            s.serialize_i64(*ns)
        }
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Human {
        Text(String),
        Nanos(i64),
    }

    /// Deserializes ns since the epoch.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
        if d.is_human_readable() {
            match Human::deserialize(d).map_err(|_| {
                de::Error::custom("expected an RFC 3339 timestamp string or integer ns since the Unix epoch")
            })? {
                // Negative ns have no RFC 3339 form here: reject rather than let a
                // re-encoded copy say 1970 (found by the fuzzer).
                Human::Nanos(n) if n >= 0 => Ok(n),
                Human::Nanos(n) => Err(de::Error::custom(format!("expected ns since the Unix epoch (≥ 0), got {n}"))),
                Human::Text(t) => crate::time::parse_rfc3339_ns(&t).ok_or_else(|| {
                    de::Error::custom(format!("expected an RFC 3339 timestamp, got {t:?}"))
                }),
            }
        } else {
            i64::deserialize(d)
        }
    }
}

/// A rule that fired on a transaction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RuleHit {
    /// The rule's id.
    pub id: String,
    /// The rule's score weight.
    pub weight: f64,
    /// The outcome the rule forces, as its index in the schema's `[decision]
    /// outcomes` (rising severity), if any.
    #[serde(default)]
    pub action: Option<u8>,
    /// Shadow rules are recorded but never influence the decision.
    #[serde(default)]
    pub shadow: bool,
}

/// A named numeric feature computed by a stage (velocity counts, sums…).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Feature {
    /// Feature name, as rules and the model see it (`features.<name>`). Shared with
    /// the spec that computes it: no allocation per transaction.
    pub name: std::sync::Arc<str>,
    /// Its value.
    pub value: f64,
}

/// What travels between stages: the transaction and everything learned so far.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TxState {
    /// The transaction as it entered (derived fields computed).
    pub tx: Tx,
    /// Rules that fired so far, in evaluation order.
    #[serde(default)]
    pub hits: Vec<RuleHit>,
    /// Features computed so far.
    #[serde(default)]
    pub features: Vec<Feature>,
    /// Rules that failed to evaluate (type errors, missing fields) so far.
    #[serde(default)]
    pub rule_errors: u32,
    /// The rule sets that ran so far, `<stage>@<version>` each: the versions in
    /// force when this transaction met them (rule files reload while stages run).
    #[serde(default)]
    pub rule_sets: Vec<std::sync::Arc<str>>,
}

impl TxState {
    /// A fresh state for a transaction that just entered.
    pub fn new(tx: Tx) -> Self {
        TxState { tx, hits: Vec::new(), features: Vec::new(), rule_errors: 0, rule_sets: Vec::new() }
    }

    /// The value of a feature by name.
    pub fn feature(&self, name: &str) -> Option<f64> {
        self.features.iter().find(|f| *f.name == *name).map(|f| f.value)
    }
}

/// The decision written to the output topic (JSON); its shape beyond the engine's
/// own fields (the outcome names, the echoed fields and features) is declared by the
/// pipeline's schema.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Decision {
    /// The transaction's id.
    pub tx_id: String,
    /// The message key the transaction travelled under.
    pub key: String,
    /// The outcome: one of the schema's `[decision] outcomes`.
    pub decision: String,
    /// The model's score in [0, 1].
    pub score: f64,
    /// Ids of the (non-shadow) rules that fired.
    pub rule_hits: Vec<String>,
    /// The rule whose action overrode the score's outcome, if any.
    #[serde(default)]
    pub override_rule: Option<String>,
    /// Version of the model that scored.
    pub model_version: String,
    /// The rule sets that evaluated the transaction, `<stage>@<version>` joined by
    /// `+`, as they were when it met each stage.
    pub rules_version: String,
    /// The transaction's event time (echoed for latency measurement).
    #[serde(with = "timestamp")]
    pub created_at: i64,
    /// Transaction fields echoed (`[decision] fields`), by name.
    #[serde(default)]
    pub fields: serde_json::Map<String, serde_json::Value>,
    /// Computed features echoed (`[decision] features`), by name; absent ones left out.
    #[serde(default)]
    pub features: BTreeMap<String, f64>,
}
