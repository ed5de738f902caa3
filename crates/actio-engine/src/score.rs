//! Scoring: a logistic model over features and rule hits, thresholds to one of the
//! outcomes the pipeline's schema declares, rule actions overriding it.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use actio_core::Schema;
use actio_core::tx::{Decision, TxState};
use serde::Deserialize;

use crate::error::{EngineError, ErrorKind, line_containing};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelFile {
    version: String,
    bias: f64,
    /// Per outcome but the first: the score at or above which it applies.
    thresholds: BTreeMap<String, f64>,
    #[serde(rename = "feature", default)]
    features: Vec<FeatureWeight>,
    /// Overrides of rule weights by rule id (default: the rule's own `weight`).
    #[serde(default)]
    rule_weights: BTreeMap<String, f64>,
}

/// How a feature enters the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Transform {
    /// As is.
    #[default]
    None,
    /// ln(1 + x): counts and sums have long tails.
    Log1p,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct FeatureWeight {
    name: String,
    weight: f64,
    #[serde(default)]
    transform: Transform,
    /// Values above are capped (after the transform).
    #[serde(default)]
    cap: Option<f64>,
}

/// A loaded model.
#[derive(Debug, Clone)]
pub struct Model {
    version: String,
    bias: f64,
    /// (outcome index, lowest score), in rising severity.
    thresholds: Vec<(u8, f64)>,
    schema: Arc<Schema>,
    features: Vec<FeatureWeight>,
    rule_weights: BTreeMap<String, f64>,
}

fn sigmoid(z: f64) -> f64 {
    1.0 / (1.0 + (-z).exp())
}

impl crate::reload::Versioned for Model {
    fn version(&self) -> &str {
        &self.version
    }
}

impl Model {
    /// Loads a model file; feature and rule names must be known.
    pub fn load(path: &Path, schema: &Arc<Schema>, known_features: &[String], known_rules: &[String]) -> Result<Model, EngineError> {
        Self::from_toml(&crate::read(path)?, path, schema, known_features, known_rules)
    }

    /// Loads model text; `origin` names it in errors.
    pub fn from_toml(text: &str, origin: &Path, schema: &Arc<Schema>, known_features: &[String], known_rules: &[String]) -> Result<Model, EngineError> {
        let m: ModelFile = crate::parse_toml(text, origin)?;
        let err = |kind, field: String, needle: &str, msg: String| EngineError::new(kind, origin, Some(field), line_containing(text, needle), msg);
        let outcomes = &schema.decision().outcomes;
        let mut thresholds = Vec::new();
        for (name, v) in &m.thresholds {
            let field = format!("thresholds.{name}");
            match outcomes.iter().position(|o| o == name) {
                Some(0) => return Err(err(ErrorKind::Invalid, field, &format!("{name} ="), format!("{name:?} is the default outcome (the first of {}): it needs no threshold", schema.file().display()))),
                Some(i) => thresholds.push((i as u8, *v)),
                None => return Err(err(ErrorKind::UnknownName, field, &format!("{name} ="), format!("unknown outcome {name:?}; {} declares: {}", schema.file().display(), outcomes.join(", ")))),
            }
            if !(0.0..=1.0).contains(v) {
                return Err(err(ErrorKind::Invalid, format!("thresholds.{name}"), &format!("{name} ="), format!("expected a score in 0..=1, got {v}")));
            }
        }
        thresholds.sort_by_key(|(i, _)| *i);
        if let Some(missing) = outcomes.iter().skip(1).find(|o| !m.thresholds.contains_key(*o)) {
            return Err(err(
                ErrorKind::Invalid,
                format!("thresholds.{missing}"),
                "[thresholds]",
                format!("expected a threshold for every outcome but the first ({}): {missing:?} has none", outcomes[1..].join(", ")),
            ));
        }
        if let Some(w) = thresholds.windows(2).find(|w| w[0].1 > w[1].1) {
            let (lo, hi) = (&outcomes[w[0].0 as usize], &outcomes[w[1].0 as usize]);
            return Err(err(
                ErrorKind::Invalid,
                "thresholds".into(),
                &format!("{lo} ="),
                format!("expected thresholds rising with severity: {lo} = {} is above {hi} = {}", w[0].1, w[1].1),
            ));
        }
        if !m.bias.is_finite() {
            return Err(err(ErrorKind::Invalid, "bias".into(), "bias", "expected a finite number".into()));
        }
        for (i, f) in m.features.iter().enumerate() {
            if !known_features.contains(&f.name) {
                return Err(err(
                    ErrorKind::UnknownName,
                    format!("feature[{i}].name"),
                    &format!("\"{}\"", f.name),
                    format!("unknown feature {:?}; computed by earlier stages: {}", f.name, known_features.join(", ")),
                ));
            }
            if !f.weight.is_finite() {
                return Err(err(ErrorKind::Invalid, format!("feature[{i}].weight"), &f.name, "expected a finite number".into()));
            }
        }
        for (id, w) in &m.rule_weights {
            if !known_rules.contains(id) {
                return Err(err(ErrorKind::UnknownName, format!("rule_weights.{id}"), id, format!("unknown rule {id:?}")));
            }
            if !w.is_finite() {
                return Err(err(ErrorKind::Invalid, format!("rule_weights.{id}"), id, "expected a finite number".into()));
            }
        }
        Ok(Model { version: m.version, bias: m.bias, thresholds, schema: schema.clone(), features: m.features, rule_weights: m.rule_weights })
    }

    /// The model's version.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The score in [0, 1] of a transaction state.
    pub fn score(&self, st: &TxState) -> f64 {
        let mut z = self.bias;
        for f in &self.features {
            let Some(mut x) = st.feature(&f.name) else { continue };
            if f.transform == Transform::Log1p {
                x = x.max(0.0).ln_1p();
            }
            if let Some(c) = f.cap {
                x = x.min(c);
            }
            z += f.weight * x;
        }
        for h in st.hits.iter().filter(|h| !h.shadow) {
            z += self.rule_weights.get(&h.id).copied().unwrap_or(h.weight);
        }
        let s = sigmoid(z);
        if s.is_finite() { s } else { 0.0 }
    }

    /// Decides: the most severe outcome whose threshold the score reaches (the
    /// default outcome below every threshold), then the most severe action of an
    /// active rule that fired overrides a milder outcome (shadow rules never act).
    pub fn decide(&self, st: &TxState, key: &str, rules_version: impl Into<String>) -> Decision {
        let score = self.score(st);
        let mut outcome = self.thresholds.iter().rev().find(|(_, t)| score >= *t).map_or(0, |(i, _)| *i);
        let outcomes = self.schema.decision().outcomes.len();
        // An action index this schema does not have (a payload of another outcome list)
        // forces nothing.
        let strongest = st.hits.iter().filter(|h| !h.shadow).filter_map(|h| h.action.filter(|a| (*a as usize) < outcomes).map(|a| (a, h))).max_by_key(|(a, _)| *a);
        let mut override_rule = None;
        if let Some((action, hit)) = strongest
            && action > outcome
        {
            outcome = action;
            override_rule = Some(hit.id.clone());
        }
        let schema = &self.schema;
        let d = schema.decision();
        Decision {
            tx_id: schema.id_of(&st.tx).to_string(),
            key: key.to_string(),
            decision: d.outcomes.get(outcome as usize).cloned().unwrap_or_default(),
            score: (score * 1e6).round() / 1e6,
            rule_hits: st.hits.iter().filter(|h| !h.shadow).map(|h| h.id.clone()).collect(),
            override_rule,
            model_version: self.version.clone(),
            rules_version: rules_version.into(),
            created_at: schema.time_of(&st.tx),
            fields: d.fields.iter().map(|slot| (schema.field(*slot).name.clone(), schema.json_value(&st.tx, *slot))).collect(),
            features: d.features.iter().filter_map(|(name, _)| st.feature(name).map(|v| (name.clone(), v))).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actio_core::tx::{Feature, RuleHit};

    const MODEL: &str = r#"
version = "m1"
bias = -3.0
[thresholds]
review = 0.5
decline = 0.9
[[feature]]
name = "user_tx_1m"
weight = 1.0
transform = "log1p"
[rule_weights]
ip_mismatch = 2.0
"#;

    fn model() -> Model {
        Model::from_toml(MODEL, Path::new("model.toml"), &crate::tests::schema(), &["user_tx_1m".into()], &["ip_mismatch".into(), "hard".into()]).unwrap()
    }

    fn st(features: f64, hits: Vec<RuleHit>) -> TxState {
        let mut st = crate::rules::tests::tx();
        st.features.push(Feature { name: "user_tx_1m".into(), value: features });
        st.hits = hits;
        st
    }

    const REVIEW: Option<u8> = Some(1);
    const DECLINE: Option<u8> = Some(2);

    fn hit(id: &str, w: f64, action: Option<u8>, shadow: bool) -> RuleHit {
        RuleHit { id: id.into(), weight: w, action, shadow }
    }

    #[test]
    fn thresholds_map_scores_to_verdicts() {
        let m = model();
        let d = m.decide(&st(0.0, vec![]), "k", "r");
        assert_eq!(d.decision, "approve");
        assert!((d.score - sigmoid(-3.0)).abs() < 1e-6);
        // -3 + 2 (override weight) + ln(1+e^1.2)... pick values that cross each threshold.
        let d = m.decide(&st(0.0, vec![hit("ip_mismatch", 0.1, None, false), hit("x", 1.2, None, false)]), "k", "r");
        assert_eq!(d.decision, "review", "score {}", d.score);
        let d = m.decide(&st(100.0, vec![hit("ip_mismatch", 0.1, None, false), hit("x", 1.2, None, false)]), "k", "r");
        assert_eq!(d.decision, "decline", "score {}", d.score);
    }

    #[test]
    fn hard_actions_override_and_shadow_never_does() {
        let m = model();
        let d = m.decide(&st(0.0, vec![hit("hard", 0.0, REVIEW, false), hit("harder", 0.0, DECLINE, false)]), "k", "r");
        assert_eq!((d.decision.as_str(), d.override_rule.as_deref()), ("decline", Some("harder")));
        let d = m.decide(&st(100.0, vec![hit("ip_mismatch", 0.1, None, false), hit("x", 1.2, None, false), hit("hard", 0.0, REVIEW, false)]), "k", "r");
        assert_eq!((d.decision.as_str(), d.override_rule), ("decline", None), "a milder action does not override");
        let d = m.decide(&st(0.0, vec![hit("shadowy", 50.0, DECLINE, true)]), "k", "r");
        assert_eq!(d.decision, "approve", "shadow hits neither score nor act");
        assert!(d.rule_hits.is_empty());
    }

    #[test]
    fn decisions_carry_the_declared_fields_and_features() {
        let d = model().decide(&st(3.0, vec![]), "k", "r");
        assert_eq!(d.tx_id, "t1");
        assert_eq!(d.fields["user"], serde_json::json!("u1"));
        assert_eq!(d.fields["amount"], serde_json::json!(1.5));
        assert_eq!(d.features["user_tx_1m"], 3.0);
        assert_eq!(d.created_at, 10_800_000_000_000);
    }

    #[test]
    fn model_errors_name_the_field() {
        let schema = crate::tests::schema();
        let load = |text: &str, features: &[String], rules: &[String]| Model::from_toml(text, Path::new("model.toml"), &schema, features, rules);
        let bad = MODEL.replace("review = 0.5", "review = 0.95");
        let e = load(&bad, &["user_tx_1m".into()], &["ip_mismatch".into()]).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("thresholds"), "{e}");
        let e = load(&MODEL.replace("review = 0.5", "escalate = 0.5"), &["user_tx_1m".into()], &["ip_mismatch".into()]).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("thresholds.escalate"), "{e}");
        assert!(e.to_string().contains("unknown outcome"), "{e}");
        assert!(e.to_string().starts_with("model.toml:5:"), "the line of the threshold: {e}");
        let e = load(&MODEL.replace("review = 0.5\n", ""), &["user_tx_1m".into()], &["ip_mismatch".into()]).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("thresholds.review"), "every outcome but the first needs one: {e}");
        let e = Model::from_toml(MODEL, Path::new("model.toml"), &schema, &[], &["ip_mismatch".into()]).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("feature[0].name"), "{e}");
        assert!(e.to_string().starts_with("model.toml:8"), "{e}");
        let e = Model::from_toml(MODEL, Path::new("model.toml"), &schema, &["user_tx_1m".into()], &[]).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("rule_weights.ip_mismatch"), "{e}");
    }
}
