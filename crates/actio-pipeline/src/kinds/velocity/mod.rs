//! `velocity`: features over sliding event-time windows per key (counts, sums,
//! distinct values …, defined in a features file), optionally followed by rules
//! over them.
//!
//! ```toml
//! [[stage]]
//! kind = "velocity"
//! features = "velocity.toml"        # relative to the pipeline dir
//! rules = "velocity_rules.toml"     # optional
//! ```
//!
//! The windows are per input partition ([`super::state`]): an assigned partition's
//! are rebuilt from the last `restore` of its input (default: the longest window),
//! so a replica that takes a partition over counts what its previous owner counted.

use std::sync::Arc;

use actio_core::TxState;
use actio_engine::rules::ReloadableRuleSet;
use actio_engine::velocity::{VelocitySpec, VelocityState};
use actio_runtime::HandlerError;
use serde::Deserialize;

use super::{Kind, Logic, Produced, Restore, ResolveCx, RunCx, StageLogic, StatePolicy, Writes};

/// The kind.
pub static KIND: Kind = Kind { name: "velocity", writes: Writes::Transactions, resolve };

/// A `velocity` stage's own fields.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VelocityConfig {
    /// The features file, relative to the pipeline dir.
    pub features: String,
    /// A rule file evaluated after the features (they may read them).
    pub rules: Option<String>,
}

fn resolve(cx: &mut ResolveCx<'_>) -> Option<Arc<dyn Logic>> {
    let c: VelocityConfig = cx.config()?;
    let path = cx.file("features", &c.features)?;
    let spec = VelocitySpec::load(&path, cx.schema).map_err(|e| cx.engine_error(e)).ok()?;
    cx.features.extend(spec.feature_names());
    let rules = match &c.rules {
        Some(r) => Some(cx.rules("rules", r)?),
        None => None,
    };
    Some(Arc::new(Velocity { spec: Arc::new(spec), rules }))
}

/// A compiled `velocity` stage.
#[derive(Debug)]
pub struct Velocity {
    /// The features.
    pub spec: Arc<VelocitySpec>,
    /// Rules evaluated after the features.
    pub rules: Option<Arc<ReloadableRuleSet>>,
}

impl StageLogic for Velocity {
    type State = VelocityState;

    fn describe(&self) -> Vec<String> {
        let rules = self.rules.as_ref().map(|r| format!(" + {} rules (version {})", r.current().len(), r.current().version())).unwrap_or_default();
        let restore = match self.spec.restore_window() {
            w if w.is_zero() => "windows start empty on an assigned partition (restore = \"off\")".to_string(),
            w => format!(
                "an assigned partition's windows are rebuilt from the last {} of its input (at most {} records)",
                humantime::format_duration(w),
                self.spec.restore_max_records()
            ),
        };
        vec![format!("{} features{rules}", self.spec.feature_names().len()), restore]
    }

    fn rules(&self) -> Option<&Arc<ReloadableRuleSet>> {
        self.rules.as_ref()
    }

    fn state_policy(&self) -> Option<StatePolicy> {
        let w = self.spec.restore_window();
        Some(StatePolicy {
            what: "velocity windows",
            restore: if w.is_zero() { Restore::Off } else { Restore::Last(w) },
            max_records: self.spec.restore_max_records(),
        })
    }

    fn new_state(&self) -> VelocityState {
        self.spec.new_state()
    }

    fn replay(&self, state: &VelocityState, st: &mut TxState) {
        self.spec.update(state, st);
    }

    fn run(&self, state: &VelocityState, mut st: TxState, _: &RunCx<'_>) -> Result<Produced, HandlerError> {
        self.spec.update(state, &mut st);
        if let Some(rules) = &self.rules {
            rules.for_message().eval(&mut st);
        }
        Ok(Produced::Tx(st))
    }
}
