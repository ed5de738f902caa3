//! Scoring: a logistic model over features and rule hits, thresholds to a verdict,
//! hard rule actions overriding it.

use std::collections::BTreeMap;
use std::path::Path;

use actio_core::tx::{Action, Decision, TxState, Verdict};
use serde::Deserialize;

use crate::error::{EngineError, ErrorKind, line_containing};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelFile {
    version: String,
    bias: f64,
    thresholds: Thresholds,
    #[serde(rename = "feature", default)]
    features: Vec<FeatureWeight>,
    /// Overrides of rule weights by rule id (default: the rule's own `weight`).
    #[serde(default)]
    rule_weights: BTreeMap<String, f64>,
}

/// Score thresholds, 0 ≤ review ≤ decline ≤ 1.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Thresholds {
    /// Scores at or above go to review.
    pub review: f64,
    /// Scores at or above are declined.
    pub decline: f64,
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
    thresholds: Thresholds,
    features: Vec<FeatureWeight>,
    rule_weights: BTreeMap<String, f64>,
}

fn sigmoid(z: f64) -> f64 {
    1.0 / (1.0 + (-z).exp())
}

impl Model {
    /// Loads a model file; feature and rule names must be known.
    pub fn load(path: &Path, known_features: &[String], known_rules: &[String]) -> Result<Model, EngineError> {
        Self::from_toml(&crate::read(path)?, path, known_features, known_rules)
    }

    /// Loads model text; `origin` names it in errors.
    pub fn from_toml(text: &str, origin: &Path, known_features: &[String], known_rules: &[String]) -> Result<Model, EngineError> {
        let m: ModelFile = crate::parse_toml(text, origin)?;
        let err = |kind, field: String, needle: &str, msg: String| EngineError::new(kind, origin, Some(field), line_containing(text, needle), msg);
        let t = m.thresholds;
        if !(0.0..=1.0).contains(&t.review) || !(0.0..=1.0).contains(&t.decline) || t.review > t.decline {
            return Err(err(ErrorKind::Invalid, "thresholds".into(), "review", format!("expected 0 ≤ review ≤ decline ≤ 1, got review {} and decline {}", t.review, t.decline)));
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
        Ok(Model { version: m.version, bias: m.bias, thresholds: t, features: m.features, rule_weights: m.rule_weights })
    }

    /// The model's version.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Its thresholds.
    pub fn thresholds(&self) -> Thresholds {
        self.thresholds
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

    /// Decides: thresholds on the score, then the strongest hard action of an active
    /// rule overrides (decline beats review; shadow rules never act).
    pub fn decide(&self, st: &TxState, key: &str, rules_version: &str) -> Decision {
        let score = self.score(st);
        let mut decision = if score >= self.thresholds.decline {
            Verdict::Decline
        } else if score >= self.thresholds.review {
            Verdict::Review
        } else {
            Verdict::Approve
        };
        let strongest = st.hits.iter().filter(|h| !h.shadow).filter_map(|h| h.action.map(|a| (a, h))).max_by_key(|(a, _)| *a);
        let mut override_rule = None;
        if let Some((action, hit)) = strongest {
            let forced = match action {
                Action::Decline => Verdict::Decline,
                Action::Review => Verdict::Review,
            };
            let rank = |v: Verdict| match v {
                Verdict::Approve => 0,
                Verdict::Review => 1,
                Verdict::Decline => 2,
            };
            if rank(forced) > rank(decision) {
                decision = forced;
                override_rule = Some(hit.id.clone());
            }
        }
        Decision {
            tx_id: st.tx.id.clone(),
            key: key.to_string(),
            decision,
            score: (score * 1e6).round() / 1e6,
            rule_hits: st.hits.iter().filter(|h| !h.shadow).map(|h| h.id.clone()).collect(),
            override_rule,
            model_version: self.version.clone(),
            rules_version: rules_version.to_string(),
            created_at: st.tx.created_at,
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
name = "card_tx_1m"
weight = 1.0
transform = "log1p"
[rule_weights]
ip_mismatch = 2.0
"#;

    fn model() -> Model {
        Model::from_toml(MODEL, Path::new("model.toml"), &["card_tx_1m".into()], &["ip_mismatch".into(), "hard".into()]).unwrap()
    }

    fn st(features: f64, hits: Vec<RuleHit>) -> TxState {
        let mut st = crate::rules::tests::tx();
        st.features.push(Feature { name: "card_tx_1m".into(), value: features });
        st.hits = hits;
        st
    }

    fn hit(id: &str, w: f64, action: Option<Action>, shadow: bool) -> RuleHit {
        RuleHit { id: id.into(), weight: w, action, shadow }
    }

    #[test]
    fn thresholds_map_scores_to_verdicts() {
        let m = model();
        let d = m.decide(&st(0.0, vec![]), "k", "r");
        assert_eq!(d.decision, Verdict::Approve);
        assert!((d.score - sigmoid(-3.0)).abs() < 1e-6);
        // -3 + 2 (override weight) + ln(1+e^1.2)... pick values that cross each threshold.
        let d = m.decide(&st(0.0, vec![hit("ip_mismatch", 0.1, None, false), hit("x", 1.2, None, false)]), "k", "r");
        assert_eq!(d.decision, Verdict::Review, "score {}", d.score);
        let d = m.decide(&st(100.0, vec![hit("ip_mismatch", 0.1, None, false), hit("x", 1.2, None, false)]), "k", "r");
        assert_eq!(d.decision, Verdict::Decline, "score {}", d.score);
    }

    #[test]
    fn hard_actions_override_and_shadow_never_does() {
        let m = model();
        let d = m.decide(&st(0.0, vec![hit("hard", 0.0, Some(Action::Review), false), hit("harder", 0.0, Some(Action::Decline), false)]), "k", "r");
        assert_eq!((d.decision, d.override_rule.as_deref()), (Verdict::Decline, Some("harder")));
        let d = m.decide(&st(0.0, vec![hit("shadowy", 50.0, Some(Action::Decline), true)]), "k", "r");
        assert_eq!(d.decision, Verdict::Approve, "shadow hits neither score nor act");
        assert!(d.rule_hits.is_empty());
    }

    #[test]
    fn model_errors_name_the_field() {
        let bad = MODEL.replace("review = 0.5", "review = 0.95");
        let e = Model::from_toml(&bad, Path::new("model.toml"), &["card_tx_1m".into()], &["ip_mismatch".into()]).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("thresholds"), "{e}");
        let e = Model::from_toml(MODEL, Path::new("model.toml"), &[], &["ip_mismatch".into()]).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("feature[0].name"), "{e}");
        assert!(e.to_string().starts_with("model.toml:8"), "{e}");
        let e = Model::from_toml(MODEL, Path::new("model.toml"), &["card_tx_1m".into()], &[]).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("rule_weights.ip_mismatch"), "{e}");
    }
}
