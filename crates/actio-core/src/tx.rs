//! The transaction model: what enters the pipeline ([`Transaction`]), what travels
//! between stages ([`TxState`]) and what leaves it ([`Decision`]).
//!
//! Ingress and egress are JSON so that any Kafka client can produce and read them;
//! between stages the same types go through a compact binary codec (see
//! [`crate::codec`]). Types whose JSON and binary forms differ (timestamps as RFC
//! 3339 strings vs integers) branch on `is_human_readable()`. No field uses
//! `skip_serializing_if`: postcard is not self-describing, so every field is always
//! written (absent optional ones as `null` in JSON).

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Longest accepted identifier (ids, card/account/device/merchant ids), in bytes.
pub const MAX_ID_LEN: usize = 128;
/// Most extra attributes a transaction may carry.
pub const MAX_ATTRS: usize = 64;
/// Longest accepted attribute string value, in bytes.
pub const MAX_ATTR_LEN: usize = 1024;

/// One business event: a card payment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Transaction {
    /// Unique transaction id.
    pub id: String,
    /// Card (PAN token) id; the default message key.
    pub card_id: String,
    /// Account the card belongs to.
    pub account_id: String,
    /// Device fingerprint, when the channel has one.
    #[serde(default)]
    pub device_id: Option<String>,
    /// Merchant id.
    pub merchant_id: String,
    /// Amount in minor units of `currency` (cents for USD).
    pub amount_minor: i64,
    /// ISO 4217 currency code, three upper-case letters.
    pub currency: String,
    /// ISO 18245 merchant category code (0..=9999).
    pub mcc: u16,
    /// Merchant country, ISO 3166-1 alpha-2.
    pub country: String,
    /// Card issuing country, ISO 3166-1 alpha-2.
    pub card_country: String,
    /// Country of the buyer's IP address, when known (e-commerce).
    #[serde(default)]
    pub ip_country: Option<String>,
    /// How the card was presented.
    pub channel: Channel,
    /// Days since the card was issued.
    pub card_age_days: u32,
    /// Creation time, ns since the Unix epoch (RFC 3339 string in JSON).
    #[serde(with = "timestamp")]
    pub created_at: i64,
    /// Open map of extra attributes, readable by rules as `tx.attrs.<name>`.
    #[serde(default)]
    pub attrs: BTreeMap<String, AttrValue>,
}

/// A validation failure of a decoded transaction: which field, and what was wrong.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("field `{field}`: {problem}")]
pub struct InvalidField {
    /// The field at fault.
    pub field: String,
    /// What was expected.
    pub problem: String,
}

impl Transaction {
    /// Checks the invariants serde cannot express (lengths, code formats, ranges).
    pub fn validate(&self) -> Result<(), InvalidField> {
        fn bad(field: &str, problem: impl Into<String>) -> Result<(), InvalidField> {
            Err(InvalidField { field: field.to_string(), problem: problem.into() })
        }
        for (field, v) in [
            ("id", &self.id),
            ("card_id", &self.card_id),
            ("account_id", &self.account_id),
            ("merchant_id", &self.merchant_id),
        ] {
            if v.is_empty() || v.len() > MAX_ID_LEN {
                return bad(field, format!("expected 1..={MAX_ID_LEN} bytes, got {}", v.len()));
            }
        }
        if let Some(d) = &self.device_id
            && (d.is_empty() || d.len() > MAX_ID_LEN)
        {
            return bad("device_id", format!("expected 1..={MAX_ID_LEN} bytes, got {}", d.len()));
        }
        if self.amount_minor < 0 {
            return bad("amount_minor", "expected a non-negative amount in minor units");
        }
        if !is_code(&self.currency, 3) {
            return bad("currency", "expected an ISO 4217 code of three upper-case letters");
        }
        if self.mcc > 9999 {
            return bad("mcc", "expected a merchant category code in 0..=9999");
        }
        for (field, v) in [("country", Some(&self.country)), ("card_country", Some(&self.card_country)), ("ip_country", self.ip_country.as_ref())] {
            if let Some(v) = v
                && !is_code(v, 2)
            {
                return bad(field, "expected an ISO 3166-1 alpha-2 code of two upper-case letters");
            }
        }
        if self.attrs.len() > MAX_ATTRS {
            return bad("attrs", format!("expected at most {MAX_ATTRS} attributes"));
        }
        for (k, v) in &self.attrs {
            if k.len() > MAX_ID_LEN {
                return bad("attrs", format!("attribute name longer than {MAX_ID_LEN} bytes"));
            }
            if let AttrValue::Str(s) = v
                && s.len() > MAX_ATTR_LEN
            {
                return bad(&format!("attrs.{k}"), format!("expected at most {MAX_ATTR_LEN} bytes"));
            }
        }
        Ok(())
    }

    /// The amount in major units (e.g. dollars), as rules see it (`tx.amount`).
    pub fn amount(&self) -> f64 {
        self.amount_minor as f64 / 100.0
    }
}

fn is_code(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_uppercase())
}

/// How the card was presented.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Channel {
    /// Card present at a terminal (chip, swipe, contactless).
    Pos,
    /// Card not present, online.
    Ecom,
    /// Cash withdrawal.
    Atm,
    /// Mail or telephone order.
    Moto,
}

impl Channel {
    /// The channel's name as written in JSON and seen by rules.
    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Pos => "pos",
            Channel::Ecom => "ecom",
            Channel::Atm => "atm",
            Channel::Moto => "moto",
        }
    }
}

/// An extra attribute value: a JSON scalar.
#[derive(Debug, Clone, PartialEq)]
pub enum AttrValue {
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
enum AttrValueTagged {
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum AttrValueUntagged {
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
}

impl Serialize for AttrValue {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            match self {
                AttrValue::Bool(b) => s.serialize_bool(*b),
                AttrValue::Int(i) => s.serialize_i64(*i),
                AttrValue::Float(f) => s.serialize_f64(*f),
                AttrValue::Str(v) => s.serialize_str(v),
            }
        } else {
            match self.clone() {
                AttrValue::Bool(b) => AttrValueTagged::Bool(b),
                AttrValue::Int(i) => AttrValueTagged::Int(i),
                AttrValue::Float(f) => AttrValueTagged::Float(f),
                AttrValue::Str(v) => AttrValueTagged::Str(v),
            }
            .serialize(s)
        }
    }
}

impl<'de> Deserialize<'de> for AttrValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(if d.is_human_readable() {
            match AttrValueUntagged::deserialize(d).map_err(|_| {
                serde::de::Error::custom("expected a boolean, number or string")
            })? {
                AttrValueUntagged::Bool(b) => AttrValue::Bool(b),
                AttrValueUntagged::Int(i) => AttrValue::Int(i),
                AttrValueUntagged::Float(f) => AttrValue::Float(f),
                AttrValueUntagged::Str(v) => AttrValue::Str(v),
            }
        } else {
            match AttrValueTagged::deserialize(d)? {
                AttrValueTagged::Bool(b) => AttrValue::Bool(b),
                AttrValueTagged::Int(i) => AttrValue::Int(i),
                AttrValueTagged::Float(f) => AttrValue::Float(f),
                AttrValueTagged::Str(v) => AttrValue::Str(v),
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

/// What a rule asks for when it fires, overriding the model's decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Send to manual review.
    Review,
    /// Decline outright.
    Decline,
}

/// A rule that fired on a transaction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RuleHit {
    /// The rule's id.
    pub id: String,
    /// The rule's score weight.
    pub weight: f64,
    /// The rule's hard action, if any.
    #[serde(default)]
    pub action: Option<Action>,
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
    /// The transaction as it entered.
    pub tx: Transaction,
    /// Rules that fired so far, in evaluation order.
    #[serde(default)]
    pub hits: Vec<RuleHit>,
    /// Features computed so far.
    #[serde(default)]
    pub features: Vec<Feature>,
    /// Rules that failed to evaluate (type errors, missing fields) so far.
    #[serde(default)]
    pub rule_errors: u32,
}

impl TxState {
    /// A fresh state for a transaction that just entered.
    pub fn new(tx: Transaction) -> Self {
        TxState { tx, hits: Vec::new(), features: Vec::new(), rule_errors: 0 }
    }

    /// The value of a feature by name.
    pub fn feature(&self, name: &str) -> Option<f64> {
        self.features.iter().find(|f| *f.name == *name).map(|f| f.value)
    }
}

/// The final word on a transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Let it through.
    Approve,
    /// Hold for a human.
    Review,
    /// Refuse.
    Decline,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Verdict::Approve => "approve",
            Verdict::Review => "review",
            Verdict::Decline => "decline",
        })
    }
}

/// The decision written to the output topic (JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Decision {
    /// The transaction's id.
    pub tx_id: String,
    /// The message key the transaction travelled under.
    pub key: String,
    /// approve / review / decline.
    pub decision: Verdict,
    /// The model's score in [0, 1].
    pub score: f64,
    /// Ids of the (non-shadow) rules that fired.
    pub rule_hits: Vec<String>,
    /// The rule whose hard action overrode the model, if any.
    #[serde(default)]
    pub override_rule: Option<String>,
    /// Version of the model that scored.
    pub model_version: String,
    /// Version of the rule set(s) that ran.
    pub rules_version: String,
    /// The transaction's creation time (echoed for latency measurement).
    #[serde(with = "timestamp")]
    pub created_at: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> Transaction {
        Transaction {
            id: "tx-1".into(),
            card_id: "card-1".into(),
            account_id: "acc-1".into(),
            device_id: Some("dev-1".into()),
            merchant_id: "m-1".into(),
            amount_minor: 12_345,
            currency: "USD".into(),
            mcc: 5411,
            country: "US".into(),
            card_country: "US".into(),
            ip_country: None,
            channel: Channel::Ecom,
            card_age_days: 400,
            created_at: 1_795_000_000_000_000_000,
            attrs: BTreeMap::from([("3ds".to_string(), AttrValue::Bool(true))]),
        }
    }

    #[test]
    fn validate_names_the_field() {
        let mut tx = sample();
        tx.currency = "usd".into();
        assert_eq!(tx.validate().unwrap_err().field, "currency");
        let mut tx = sample();
        tx.card_id = "x".repeat(MAX_ID_LEN + 1);
        assert_eq!(tx.validate().unwrap_err().field, "card_id");
        let mut tx = sample();
        tx.ip_country = Some("Germany".into());
        assert_eq!(tx.validate().unwrap_err().field, "ip_country");
        assert!(sample().validate().is_ok());
    }

    // Found by the fuzzer: a negative integer created_at decoded, and re-encoded as
    // 1970-01-01T00:00:00Z.
    #[test]
    fn created_at_before_the_epoch_is_rejected() {
        let mut json = serde_json::to_value(sample()).unwrap();
        json["created_at"] = serde_json::json!(-1);
        let e = crate::Codec::Json.decode::<Transaction>(json.to_string().as_bytes()).unwrap_err();
        assert_eq!(e.path.as_deref(), Some("created_at"), "{e}");
        json["created_at"] = serde_json::json!(5);
        assert_eq!(crate::Codec::Json.decode::<Transaction>(json.to_string().as_bytes()).unwrap().created_at, 5);
    }

    #[test]
    fn amount_is_in_major_units() {
        assert_eq!(sample().amount(), 123.45);
    }
}
