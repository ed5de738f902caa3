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
    let model = Model::load(&path, cx.schema, cx.features, cx.rule_ids).map_err(|e| cx.engine_error(e)).ok()?;
    Some(Arc::new(Score { model: Arc::new(model) }))
}

/// A compiled `score` stage.
#[derive(Debug)]
pub struct Score {
    /// Its model.
    pub model: Arc<Model>,
}

impl StageLogic for Score {
    type State = ();

    fn describe(&self) -> Vec<String> {
        vec![format!("model version {}", self.model.version())]
    }

    fn new_state(&self) {}

    fn run(&self, _: &(), st: TxState, cx: &RunCx<'_>) -> Result<Produced, HandlerError> {
        let key = cx.key.key(&st.tx);
        Ok(Produced::Decision(self.model.decide(&st, &key, cx.rules_version)))
    }
}
