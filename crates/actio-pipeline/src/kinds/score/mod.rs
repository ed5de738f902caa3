//! `score`: the model. Features and rule hits → a score → the decision, written to
//! the egress topic; a `score` stage ends the chain.
//!
//! ```toml
//! [[stage]]
//! kind = "score"
//! model = "model.toml"   # relative to the pipeline dir
//! ```

use std::sync::Arc;

use actio_core::TxState;
use actio_engine::reload::{Reload, Reloadable};
use actio_engine::score::Model;
use actio_runtime::HandlerError;
use serde::Deserialize;

use super::{Kind, Logic, Produced, ResolveCx, RunCx, StageLogic, Writes};

/// The kind.
pub static KIND: Kind = Kind { name: "score", writes: Writes::Decisions, resolve };

/// A `score` stage's own fields.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScoreConfig {
    /// The model file, relative to the pipeline dir.
    pub model: String,
}

fn resolve(cx: &mut ResolveCx<'_>) -> Option<Arc<dyn Logic>> {
    let c: ScoreConfig = cx.config()?;
    let path = cx.file("model", &c.model)?;
    let (schema, features, rules) = (cx.schema.clone(), cx.features.clone(), cx.rule_ids.to_vec());
    let model = Reloadable::load("model", cx.stage, &path, move |text, path| Model::from_toml(text, path, &schema, &features, &rules))
        .map_err(|e| cx.engine_error(e))
        .ok()?;
    Some(Arc::new(Score { model: Arc::new(model) }))
}

/// A compiled `score` stage.
#[derive(Debug)]
pub struct Score {
    /// Its model (reloads without a restart; rule weights may name only the rules
    /// the pipeline had when it loaded).
    pub model: Arc<Reloadable<Model>>,
}

impl StageLogic for Score {
    type State = ();

    fn describe(&self) -> Vec<String> {
        vec![format!("model version {}", self.model.current().version())]
    }

    fn reloadables(&self) -> Vec<Arc<dyn Reload>> {
        vec![self.model.clone() as Arc<dyn Reload>]
    }

    fn new_state(&self) {}

    fn run(&self, _: &(), st: TxState, cx: &RunCx<'_>) -> Result<Produced, HandlerError> {
        let key = cx.key.key(&st.tx);
        let decision = self.model.for_message().decide(&st, &key, st.rule_sets.join("+"));
        Ok(Produced::Decision(Box::new((decision, st))))
    }
}
