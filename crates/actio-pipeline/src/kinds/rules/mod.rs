//! `rules`: CEL rules over the transaction and the features computed so far; each
//! rule that fires adds its hit (id, weight, outcome) to the transaction.
//!
//! ```toml
//! [[stage]]
//! kind = "rules"
//! rules = "rules.toml"   # relative to the pipeline dir
//! ```

use std::sync::Arc;

use actio_core::TxState;
use actio_engine::rules::ReloadableRuleSet;
use actio_runtime::HandlerError;
use serde::Deserialize;

use super::{Kind, Logic, Produced, ResolveCx, RunCx, StageLogic, Writes};

/// The kind.
pub static KIND: Kind = Kind { name: "rules", writes: Writes::Transactions, resolve };

/// A `rules` stage's own fields.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RulesConfig {
    /// The rule file, relative to the pipeline dir.
    pub rules: String,
}

fn resolve(cx: &mut ResolveCx<'_>) -> Option<Arc<dyn Logic>> {
    let c: RulesConfig = cx.config()?;
    let rules = cx.rules("rules", &c.rules)?;
    Some(Arc::new(Rules { rules }))
}

/// A compiled `rules` stage.
#[derive(Debug)]
pub struct Rules {
    /// Its rule set (reloadable).
    pub rules: Arc<ReloadableRuleSet>,
}

impl StageLogic for Rules {
    type State = ();

    fn describe(&self) -> Vec<String> {
        let r = self.rules.current();
        vec![format!("{} rules (version {})", r.len(), r.version())]
    }

    fn rules(&self) -> Option<&Arc<ReloadableRuleSet>> {
        Some(&self.rules)
    }

    fn new_state(&self) {}

    fn run(&self, _: &(), mut st: TxState, _: &RunCx<'_>) -> Result<Produced, HandlerError> {
        self.rules.for_message().eval(&mut st);
        Ok(Produced::Tx(st))
    }
}
