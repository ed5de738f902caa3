//! Rule sets: CEL rules compiled once at load, evaluated per transaction.
//!
//! A rule that fails at evaluation (type error, missing value) counts an error for
//! that rule and the transaction's `rule_errors`; it never stops the stage.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use actio_core::Schema;
use actio_core::tx::{RuleHit, TxState};
use serde::Deserialize;

use crate::error::{EngineError, ErrorKind, line_containing};
use crate::expr::{self, Node, Scope};
use crate::reload::{Reloadable, Versioned};

/// A rule file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    /// Version of the rule set, carried into decisions.
    version: String,
    #[serde(rename = "rule", default)]
    rules: Vec<RuleConfig>,
}

/// Whether a rule may influence decisions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Hits count toward the score and actions apply.
    #[default]
    Active,
    /// Hits are recorded only (to trial a rule on live traffic).
    Shadow,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleConfig {
    id: String,
    description: String,
    when: String,
    weight: f64,
    #[serde(default)]
    action: Option<String>,
    #[serde(default)]
    tags: Vec<String>,
    #[serde(default)]
    mode: Mode,
}

/// One compiled rule.
#[derive(Debug)]
pub struct Rule {
    /// Unique id.
    pub id: String,
    /// What it catches.
    pub description: String,
    /// The CEL source.
    pub when: String,
    /// Score weight.
    pub weight: f64,
    /// The outcome it forces when it fires: its index in the schema's outcomes.
    pub action: Option<u8>,
    /// Tags.
    pub tags: Vec<String>,
    /// Active or shadow.
    pub mode: Mode,
    node: Node,
    /// Shared with the rule of the same id in the set this one replaced on reload,
    /// so counts never go back.
    counts: Arc<RuleCounts>,
}

#[derive(Debug, Default)]
struct RuleCounts {
    hits: AtomicU64,
    errors: AtomicU64,
}

/// Hit and error counts of one rule, since start (across reloads).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleStats {
    /// Rule id.
    pub id: String,
    /// Active or shadow.
    pub mode: Mode,
    /// Times it fired.
    pub hits: u64,
    /// Times it failed to evaluate.
    pub errors: u64,
}

/// A compiled rule set.
#[derive(Debug)]
pub struct RuleSet {
    version: String,
    /// `<stage>@<version>`, what each transaction it evaluates records
    /// ([`TxState::rule_sets`]); the version alone until [`RuleSet::labelled`].
    label: Arc<str>,
    scope: Scope,
    rules: Vec<Rule>,
}

/// A rule set that reloads from its file without a restart ([`crate::reload`]).
pub type ReloadableRuleSet = Reloadable<RuleSet>;

impl Versioned for RuleSet {
    fn version(&self) -> &str {
        &self.version
    }

    fn carry_from(&mut self, old: &Self) {
        for r in &mut self.rules {
            if let Some(o) = old.rules.iter().find(|o| o.id == r.id) {
                r.counts = o.counts.clone();
            }
        }
    }
}

impl ReloadableRuleSet {
    /// Loads the rule file of `stage`, compiled against `schema` and the features
    /// computed before it ([`RuleSet::load`]); its reloads compile the same way.
    pub fn rules(stage: &str, path: &Path, schema: &Arc<Schema>, known_features: &[String]) -> Result<Self, EngineError> {
        let (schema, features, label) = (schema.clone(), known_features.to_vec(), stage.to_string());
        Reloadable::load("rules", stage, path, move |text, path| Ok(RuleSet::from_toml(text, path, &schema, &features)?.labelled(&label)))
    }
}

impl RuleSet {
    /// Loads and compiles a rule file. `known_features` are the feature names
    /// computed before these rules run; any other `features.x` is an error.
    pub fn load(path: &Path, schema: &Arc<Schema>, known_features: &[String]) -> Result<RuleSet, EngineError> {
        Self::from_toml(&crate::read(path)?, path, schema, known_features)
    }

    /// Compiles rule-file text; `origin` names it in errors.
    pub fn from_toml(text: &str, origin: &Path, schema: &Arc<Schema>, known_features: &[String]) -> Result<RuleSet, EngineError> {
        let file: RuleFile = crate::parse_toml(text, origin)?;
        let scope = Scope::new(schema, known_features);
        let outcomes = &schema.decision().outcomes;
        let mut rules: Vec<Rule> = Vec::with_capacity(file.rules.len());
        let err = |kind, field: String, id: &str, msg: String| EngineError::new(kind, origin, Some(field), line_containing(text, &format!("\"{id}\"")), msg);
        for (i, r) in file.rules.into_iter().enumerate() {
            let at = format!("rule[{i}]");
            if r.id.is_empty() || !r.id.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
                return Err(err(ErrorKind::Invalid, format!("{at}.id"), &r.id, format!("expected an id of [A-Za-z0-9_-], got {:?}", r.id)));
            }
            if rules.iter().any(|o| o.id == r.id) {
                return Err(err(ErrorKind::Invalid, format!("rule \"{}\".id", r.id), &r.id, "duplicate rule id".into()));
            }
            if !r.weight.is_finite() {
                return Err(err(ErrorKind::Invalid, format!("rule \"{}\".weight", r.id), &r.id, "expected a finite number".into()));
            }
            let action = match &r.action {
                None => None,
                Some(a) => match outcomes.iter().position(|o| o == a) {
                    Some(i) if i > 0 => Some(i as u8),
                    Some(_) => return Err(err(ErrorKind::Invalid, format!("rule \"{}\".action", r.id), &r.id, format!("{a:?} is the default outcome: an action forces a more severe one ({})", outcomes[1..].join(", ")))),
                    None => return Err(err(ErrorKind::UnknownName, format!("rule \"{}\".action", r.id), &r.id, format!("unknown outcome {a:?}; {} declares: {}", schema.file().display(), outcomes.join(", ")))),
                },
            };
            let node = expr::compile(&r.when, &scope).map_err(|m| {
                let kind = if m.starts_with("CEL syntax") { ErrorKind::Cel } else { ErrorKind::UnknownName };
                err(kind, format!("rule \"{}\".when", r.id), &r.id, m)
            })?;
            rules.push(Rule {
                id: r.id,
                description: r.description,
                when: r.when,
                weight: r.weight,
                action,
                tags: r.tags,
                mode: r.mode,
                node,
                counts: Arc::default(),
            });
        }
        Ok(RuleSet { label: Arc::from(file.version.as_str()), version: file.version, scope, rules })
    }

    /// The set as `stage`'s: transactions record `<stage>@<version>`.
    pub fn labelled(mut self, stage: &str) -> Self {
        self.label = Arc::from(format!("{stage}@{}", self.version));
        self
    }

    /// Evaluates every rule; pushes hits onto `st.hits` and the set's label onto
    /// `st.rule_sets`.
    pub fn eval(&self, st: &mut TxState) {
        st.rule_sets.push(self.label.clone());
        let table = expr::feature_table(&self.scope.features, st);
        let mut hits = Vec::new();
        let mut errors = 0;
        for r in &self.rules {
            match r.node.eval_bool(st, &table) {
                Ok(true) => {
                    r.counts.hits.fetch_add(1, Ordering::Relaxed);
                    hits.push(RuleHit { id: r.id.clone(), weight: r.weight, action: r.action, shadow: r.mode == Mode::Shadow });
                }
                Ok(false) => {}
                Err(_) => {
                    r.counts.errors.fetch_add(1, Ordering::Relaxed);
                    errors += 1;
                }
            }
        }
        st.hits.extend(hits);
        st.rule_errors += errors;
    }

    /// Why a rule fails on a transaction, if it does (for tests and `actio` tooling).
    pub fn explain(&self, id: &str, st: &TxState) -> Option<Result<bool, String>> {
        let r = self.rules.iter().find(|r| r.id == id)?;
        let table = expr::feature_table(&self.scope.features, st);
        Some(r.node.eval_bool(st, &table).map_err(|e| e.0))
    }

    /// The rule set's version.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Number of rules.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// Whether there are no rules.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The rules.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Hit and error counts per rule.
    pub fn stats(&self) -> Vec<RuleStats> {
        self.rules
            .iter()
            .map(|r| RuleStats { id: r.id.clone(), mode: r.mode, hits: r.counts.hits.load(Ordering::Relaxed), errors: r.counts.errors.load(Ordering::Relaxed) })
            .collect()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use actio_core::tx::Feature;

    /// A transaction of the engine's neutral test schema: a small "ecom"-like kind
    /// "b" payment of 1.50 at 03:00 UTC in region "US", device absent.
    pub(crate) fn tx() -> TxState {
        crate::tests::state(
            &crate::tests::schema(),
            r#"{"id":"t1","user":"u1","shop":"s1","amount_minor":150,"region":"US","kind":"b","code":5999,"at":10800000000000,"attrs":{"three_ds":false,"label":"x"}}"#,
        )
    }

    fn set(rules: &str, features: &[&str]) -> Result<RuleSet, EngineError> {
        let f: Vec<String> = features.iter().map(|s| s.to_string()).collect();
        RuleSet::from_toml(&format!("version = \"t1\"\n{rules}"), Path::new("rules.toml"), &crate::tests::schema(), &f)
    }

    #[test]
    fn rules_fire_on_the_paths_they_describe() {
        let s = set(
            r#"
[[rule]]
id = "small_ecom"
description = "tiny kind-b payment"
when = "tx.kind == 'b' && tx.amount < 2.0"
weight = 1.0
[[rule]]
id = "ip_mismatch"
description = "geo"
when = "tx.region != null && tx.region != 'FR'"
weight = 0.5
action = "review"
[[rule]]
id = "night"
description = "night"
when = "tx.hour >= 1 && tx.hour < 5"
weight = 0.2
mode = "shadow"
[[rule]]
id = "burst"
description = "burst"
when = "features.user_tx_1m >= 5.0"
weight = 2.0
[[rule]]
id = "no_3ds"
description = "attrs"
when = "has(tx.attrs.three_ds) && !tx.attrs.three_ds && tx.code in [5999, 7995]"
weight = 0.3
[[rule]]
id = "never"
description = "not this one"
when = "tx.amount_minor > 100000 || tx.kind.startsWith('c')"
weight = 9.0
"#,
            &["user_tx_1m"],
        )
        .unwrap();
        let mut st = tx();
        st.features.push(Feature { name: "user_tx_1m".into(), value: 7.0 });
        s.eval(&mut st);
        let ids: Vec<&str> = st.hits.iter().map(|h| h.id.as_str()).collect();
        assert_eq!(ids, ["small_ecom", "ip_mismatch", "night", "burst", "no_3ds"]);
        assert!(st.hits[2].shadow);
        assert_eq!(st.hits[1].action, Some(1), "review: the schema's second outcome");
        assert_eq!(st.rule_errors, 0);
        assert_eq!(s.stats()[0].hits, 1);
    }

    #[test]
    fn a_failing_rule_counts_an_error_and_others_still_run() {
        let s = set(
            r#"
[[rule]]
id = "bad_types"
description = "compares a string entry with a number"
when = "tx.attrs.label > 5"
weight = 1.0
[[rule]]
id = "missing_feature_value"
description = "feature known but absent on this tx"
when = "features.user_tx_1m > 1.0"
weight = 1.0
[[rule]]
id = "good"
description = "fine"
when = "tx.amount > 1.0"
weight = 1.0
"#,
            &["user_tx_1m"],
        )
        .unwrap();
        let mut st = tx();
        s.eval(&mut st);
        assert_eq!(st.rule_errors, 2);
        assert_eq!(st.hits.len(), 1);
        assert_eq!(s.stats().iter().map(|r| r.errors).sum::<u64>(), 2);
        assert!(s.explain("bad_types", &st).unwrap().unwrap_err().contains("cannot compare string with int"));
    }

    #[test]
    fn load_errors_name_file_field_and_line() {
        let cases = [
            ("[[rule]]\nid = \"x\"\ndescription = \"d\"\nwhen = \"tx.amount >\"\nweight = 1.0\n", "rule \"x\".when", "CEL syntax"),
            ("[[rule]]\nid = \"x\"\ndescription = \"d\"\nwhen = \"tx.amout > 1.0\"\nweight = 1.0\n", "rule \"x\".when", "unknown transaction field `tx.amout`"),
            ("[[rule]]\nid = \"x\"\ndescription = \"d\"\nwhen = \"features.nope > 1.0\"\nweight = 1.0\n", "rule \"x\".when", "unknown feature `features.nope`"),
            ("[[rule]]\nid = \"x\"\ndescription = \"d\"\nwhen = \"true\"\nweight = 1.0\n[[rule]]\nid = \"x\"\ndescription = \"d\"\nwhen = \"true\"\nweight = 1.0\n", "rule \"x\".id", "duplicate"),
            ("[[rule]]\nid = \"x\"\ndescription = \"d\"\nwhen = \"[1,2].all(v, v > 0)\"\nweight = 1.0\n", "rule \"x\".when", "not supported"),
            ("[[rule]]\nid = \"x\"\ndescription = \"d\"\nwhen = \"tx.user > 5\"\nweight = 1.0\n", "rule \"x\".when", "cannot compare string (field `tx.user`) with int"),
            ("[[rule]]\nid = \"x\"\ndescription = \"d\"\nwhen = \"tx.attrs > 5\"\nweight = 1.0\n", "rule \"x\".when", "is a map"),
            ("[[rule]]\nid = \"x\"\ndescription = \"d\"\nwhen = \"true\"\nweight = 1.0\naction = \"escalate\"\n", "rule \"x\".action", "unknown outcome \"escalate\""),
        ];
        for (text, field, msg) in cases {
            let e = set(text, &["user_tx_1m"]).unwrap_err();
            let s = e.to_string();
            assert_eq!(e.field.as_deref(), Some(field), "{s}");
            assert!(s.contains(msg), "{s}");
            assert!(s.starts_with("rules.toml:"), "{s}");
            assert!(e.line.is_some(), "{s}");
        }
        let e = set("[[rule]]\nid = \"x\"\ncolour = \"red\"\n", &[]).unwrap_err();
        assert!(e.to_string().contains("unknown field `colour`") && e.line == Some(4), "{e}");
        let e = set("[[rule]]\nid = \"x\"\ndescription = \"d\"\nwhen = \"true\"\nweight = \"heavy\"\n", &[]).unwrap_err();
        assert!(e.to_string().contains("rules.toml:6") && e.to_string().contains("expected f64") && e.to_string().contains("weight = \"heavy\""), "{e}");
    }

    #[test]
    fn reload_keeps_old_rules_on_a_bad_edit_and_counts_across_reloads() {
        use crate::reload::Reload;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.toml");
        let rule = |v: &str, when: &str| format!("version = \"{v}\"\n[[rule]]\nid = \"a\"\ndescription = \"d\"\nwhen = \"{when}\"\nweight = 1.0\n");
        std::fs::write(&p, rule("v1", "tx.amount > 1.0")).unwrap();
        let r = ReloadableRuleSet::rules("screen", &p, &crate::tests::schema(), &[]).unwrap();
        let mut st = tx(); // amount 1.50
        r.current().eval(&mut st);
        assert_eq!(st.rule_sets.iter().map(|l| l.to_string()).collect::<Vec<_>>(), ["screen@v1"], "a transaction records the set it ran");
        std::fs::write(&p, rule("v2", "tx.amount >")).unwrap();
        assert!(r.reload().is_err());
        assert_eq!(r.current().rules()[0].when, "tx.amount > 1.0");
        std::fs::write(&p, rule("v3", "tx.amount > 1.2")).unwrap();
        r.reload().unwrap();
        assert_eq!(r.current().rules()[0].when, "tx.amount > 1.2");
        r.current().eval(&mut st);
        assert_eq!(st.rule_sets.last().map(|l| l.to_string()).as_deref(), Some("screen@v3"));
        assert_eq!(r.current().stats()[0].hits, 2, "a rule's hits carry over a reload");
    }
}
