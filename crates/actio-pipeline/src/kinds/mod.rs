//! Stage kinds: an open set, each in its own folder, registered in [`KINDS`].
//!
//! A kind is three things side by side in `kinds/<kind>/`: its config (the fields a
//! `[[stage]]` of the kind takes beyond the common ones: a serde struct with
//! `deny_unknown_fields`, read by [`ResolveCx::config`]), its resolve step (load its
//! files, compile, check them against the schema: at load, so a pipeline that loads
//! runs) and its per-message logic (a [`StageLogic`]), with their tests. Then one
//! line in [`KINDS`]. Nothing else in the crates names a kind: the resolver checks
//! the common fields and the chain, the service handler runs any [`StageLogic`],
//! `actio validate` prints [`StageLogic::describe`].
//!
//! A kind that keeps state per key (velocity windows, the newest record of each
//! entity) declares a [`StatePolicy`]; the shared mechanism in [`state`] then keeps
//! one state per input partition of the service, creates it when the partition is
//! assigned, rebuilds it by replaying the partition's input up to the group's
//! committed offset (through [`StageLogic::replay`]), and drops it on revocation. A
//! kind writes none of that itself.

use std::any::Any;
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use actio_core::{Decision, Headers, KeyExtractor, Schema, TopicPartition, TxState};
use actio_engine::reload::Reload;
use actio_engine::rules::ReloadableRuleSet;
use actio_runtime::{Context, HandlerCounter, HandlerError, Hold};
use serde::de::DeserializeOwned;
use toml::Spanned;

use crate::error::ConfigError;

pub mod enrich;
pub mod io;
pub mod join;
pub mod latest;
pub mod route;
pub mod rules;
pub mod score;
pub mod state;
pub mod template;
#[cfg(test)]
mod testing;
pub mod velocity;

pub use state::{History, PartitionStates, Restore, StatePolicy};

/// Every stage kind, by its `kind = "…"` name: the one place a kind is registered.
pub static KINDS: &[&Kind] = &[&rules::KIND, &velocity::KIND, &score::KIND, &latest::KIND, &route::KIND, &join::KIND, &enrich::KIND];

/// The registered kind called `name`.
pub fn kind(name: &str) -> Option<&'static Kind> {
    KINDS.iter().copied().find(|k| k.name == name)
}

/// A stage kind: its name, what its stages write, and how one is resolved.
#[derive(Debug)]
pub struct Kind {
    /// Its `kind = "…"` name.
    pub name: &'static str,
    /// What its stages write.
    pub writes: Writes,
    /// Reads the stage's own fields, loads and compiles what they name; `None` after
    /// reporting what is wrong through the context.
    pub resolve: fn(&mut ResolveCx<'_>) -> Option<Arc<dyn Logic>>,
}

/// What a kind's stages write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Writes {
    /// Transactions (with what the stage added) to an internal topic, for the next
    /// stage.
    Transactions,
    /// Decisions, to the egress topic: such a stage ends the chain (and any service it
    /// is fused in).
    Decisions,
    /// Transactions, each to topics chosen per message ([`Produced::Routed`]): such a
    /// stage ends any service it is fused in (what follows reads its targets).
    Routes,
}

/// What one stage's logic made of a transaction.
#[derive(Debug)]
pub enum Produced {
    /// The transaction goes on to the stage's output.
    Tx(TxState),
    /// The transaction, to each of these topics (declared ones: a kind that routes
    /// checks its targets against the pipeline's topics).
    Routed(Vec<Arc<str>>, TxState),
    /// The decision, to the egress topic, with the transaction it decided (for the
    /// decision trail: its shadow hits and every feature). Boxed: the largest variant.
    Decision(Box<(Decision, TxState)>),
    /// Nothing goes on (e.g. an update older than the state's); the input is done.
    Nothing,
    /// The transaction, once this future resolves (an I/O-bound stage's call). Only
    /// a service's last stage produces it ([`StageLogic::is_async`]).
    Later(Later),
}

/// A transaction to come: what an I/O-bound stage's call resolves to.
pub struct Later(pub std::pin::Pin<Box<dyn std::future::Future<Output = Result<TxState, HandlerError>> + Send>>);

impl fmt::Debug for Later {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Later")
    }
}

/// What a stage's logic is told about the message beyond the transaction.
#[derive(Debug)]
pub struct RunCx<'a> {
    /// Where the message was first consumed from, which attempt this is.
    pub ctx: &'a Context,
    /// Builds the message key from the transaction.
    pub key: &'a KeyExtractor,
    /// The service's input topic (a stateful stage's state is per partition of it).
    pub input: &'a str,
    /// The stage's `output` topic.
    pub output: &'a Arc<str>,
    /// The consumed message's headers.
    pub headers: &'a Headers,
    /// The declared records.
    pub schema: &'a Schema,
    /// What the stage holds and releases for this message ([`RunCx::hold`]).
    pub holds: &'a MessageHolds,
    /// The stage's in-place retry policy (an async stage retries its calls itself).
    pub retry: &'a actio_runtime::RetryPolicy,
}

/// The holds of one message as its stages run: the message's own (it is not done
/// when the handler returns) and those to release once its output is delivered.
#[derive(Debug, Default)]
pub struct MessageHolds {
    pub(crate) held: std::cell::RefCell<Option<Hold>>,
    pub(crate) releases: std::cell::RefCell<Vec<Hold>>,
}

impl RunCx<'_> {
    /// Holds this message: it is done (its offset committable) only when the hold is
    /// released. The stage keeps the hold and returns [`Produced::Nothing`]; see
    /// [`actio_runtime::Hold`].
    pub fn hold(&self) -> Hold {
        self.holds.held.borrow_mut().get_or_insert_with(Hold::new).clone()
    }

    /// Releases `holds` once this message's output is delivered (at once if it has
    /// none).
    pub fn release_on_output(&self, holds: Vec<Hold>) {
        self.holds.releases.borrow_mut().extend(holds);
    }
}

/// What a kind computes, compiled at load: immutable, shared by every handler that
/// runs the stage. The state it keeps per partition (if any) is a handler's, in a
/// [`PartitionStates`].
pub trait StageLogic: Send + Sync + fmt::Debug + 'static {
    /// State of one input partition; `()` for a kind that keeps none.
    type State: Send + Sync + 'static;
    /// What `actio validate` says about the stage: a summary, then details.
    fn describe(&self) -> Vec<String>;
    /// The rule set the stage evaluates, if any (rule versions and ids, tests).
    fn rules(&self) -> Option<&Arc<ReloadableRuleSet>> {
        None
    }
    /// The files the stage reloads while it runs (its rule set by default, if it
    /// has one): the service watches them and swaps each in when it compiles.
    fn reloadables(&self) -> Vec<Arc<dyn Reload>> {
        self.rules().map(|r| vec![r.clone() as Arc<dyn Reload>]).unwrap_or_default()
    }
    /// How the kind keeps state per partition; `None` (the default): it keeps none,
    /// and one `State` serves every message.
    fn state_policy(&self) -> Option<StatePolicy> {
        None
    }
    /// A new, empty state.
    fn new_state(&self) -> Self::State;
    /// Applies one record of a partition's history to its state while it is
    /// rebuilt ([`StatePolicy::restore`]): the transaction as the service's input
    /// carries it (stages before this one in a fused service have not run on it).
    fn replay(&self, _state: &Self::State, _st: &mut TxState) {}
    /// Runs the stage on one transaction, with its input partition's state.
    fn run(&self, state: &Self::State, st: TxState, cx: &RunCx<'_>) -> Result<Produced, HandlerError>;
    /// Counters of its own, since start (exposed on `/metrics`).
    fn counters(&self) -> Vec<HandlerCounter> {
        Vec::new()
    }
    /// Topics it may write besides its `output` (a route's declared targets): the
    /// resolver counts them as written by this stage when it checks the chain.
    fn outputs(&self) -> Vec<String> {
        Vec::new()
    }
    /// Topic names it makes per message (a route's `{site}_lastdata`), as written:
    /// the graph draws an edge to every declared topic one can name.
    fn output_templates(&self) -> Vec<String> {
        Vec::new()
    }
    /// The stages whose outputs it joins: they may all write its input topic.
    fn waits_for(&self) -> &[String] {
        &[]
    }
    /// Whether it may produce [`Produced::Later`] (its calls wait on I/O): such a
    /// stage is the last of its service.
    fn is_async(&self) -> bool {
        false
    }
    /// How often [`StageLogic::tick`] runs; `None` (the default): never.
    fn tick_interval(&self) -> Option<std::time::Duration> {
        None
    }
    /// Transactions it emits on its own from a partition's state (a join that timed
    /// out), with the holds their delivery releases.
    fn tick(&self, _state: &Self::State) -> Vec<Ticked> {
        Vec::new()
    }
}

/// A transaction a stage emits on a tick, not for a message.
#[derive(Debug)]
pub struct Ticked {
    /// The transaction.
    pub st: TxState,
    /// Its message key.
    pub key: Option<actio_core::bus::Bytes>,
    /// Headers to carry on (a held message's).
    pub headers: Headers,
    /// Released once it is delivered.
    pub releases: Vec<Hold>,
}

/// A compiled stage as the rest of the crate sees it: any [`StageLogic`], its state
/// type erased.
pub trait Logic: Send + Sync + fmt::Debug {
    /// See [`StageLogic::describe`].
    fn describe(&self) -> Vec<String>;
    /// See [`StageLogic::rules`].
    fn rules(&self) -> Option<&Arc<ReloadableRuleSet>>;
    /// See [`StageLogic::reloadables`].
    fn reloadables(&self) -> Vec<Arc<dyn Reload>>;
    /// See [`StageLogic::state_policy`].
    fn state_policy(&self) -> Option<StatePolicy>;
    /// See [`StageLogic::counters`].
    fn counters(&self) -> Vec<HandlerCounter>;
    /// See [`StageLogic::outputs`].
    fn outputs(&self) -> Vec<String>;
    /// See [`StageLogic::output_templates`].
    fn output_templates(&self) -> Vec<String>;
    /// See [`StageLogic::waits_for`].
    fn waits_for(&self) -> &[String];
    /// See [`StageLogic::is_async`].
    fn is_async(&self) -> bool;
    /// See [`StageLogic::tick_interval`].
    fn tick_interval(&self) -> Option<std::time::Duration>;
    /// A runner for one handler, with state of its own.
    fn runner(self: Arc<Self>) -> Box<dyn Runner>;
    /// The concrete logic, for tests and tools that know the kind.
    fn as_any(&self) -> &dyn Any;
}

/// One handler's instance of a stage: its logic and its partitions' state.
pub trait Runner: Send + Sync + fmt::Debug {
    /// Runs the stage on one transaction.
    fn run(&self, st: TxState, cx: &RunCx<'_>) -> Result<Produced, HandlerError>;
    /// Input partitions were assigned: make (and rebuild) their state.
    fn assigned(&self, partitions: &[TopicPartition], history: &History<'_>);
    /// Partitions were revoked or lost: drop their state.
    fn revoked(&self, partitions: &[TopicPartition], input: &str);
    /// What the stage emits on its own now, from every partition's state.
    fn tick(&self) -> Vec<Ticked>;
}

impl<L: StageLogic> Logic for L {
    fn describe(&self) -> Vec<String> {
        StageLogic::describe(self)
    }
    fn rules(&self) -> Option<&Arc<ReloadableRuleSet>> {
        StageLogic::rules(self)
    }
    fn reloadables(&self) -> Vec<Arc<dyn Reload>> {
        StageLogic::reloadables(self)
    }
    fn state_policy(&self) -> Option<StatePolicy> {
        StageLogic::state_policy(self)
    }
    fn counters(&self) -> Vec<HandlerCounter> {
        StageLogic::counters(self)
    }
    fn outputs(&self) -> Vec<String> {
        StageLogic::outputs(self)
    }
    fn output_templates(&self) -> Vec<String> {
        StageLogic::output_templates(self)
    }
    fn waits_for(&self) -> &[String] {
        StageLogic::waits_for(self)
    }
    fn is_async(&self) -> bool {
        StageLogic::is_async(self)
    }
    fn tick_interval(&self) -> Option<std::time::Duration> {
        StageLogic::tick_interval(self)
    }
    fn runner(self: Arc<Self>) -> Box<dyn Runner> {
        Box::new(state::Keyed::new(self))
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// What a kind's resolve step is given: the stage's own fields, the pipeline so far,
/// and a place to report errors (with file, field and line).
#[derive(Debug)]
pub struct ResolveCx<'a> {
    /// The stage's name.
    pub stage: &'a str,
    /// The pipeline directory (files are named relative to it).
    pub dir: &'a Path,
    /// The declared records.
    pub schema: &'a Arc<Schema>,
    /// The message key's fields.
    pub key_fields: &'a [String],
    /// Features the stages before this one compute; a kind that computes features
    /// adds its own.
    pub features: &'a mut Vec<String>,
    /// Ids of the rules the stages before this one evaluate.
    pub rule_ids: &'a [String],
    /// The declared topics.
    pub topics: &'a [crate::Topic],
    /// Where templates read `{env.NAME}` (the process's environment unless the
    /// pipeline was loaded with another).
    pub env: &'a template::Env<'a>,
    pub(crate) kind: &'static str,
    pub(crate) at: &'a str,
    pub(crate) fields: &'a BTreeMap<String, Spanned<toml::Value>>,
    pub(crate) name_span: std::ops::Range<usize>,
    pub(crate) file: &'a Path,
    pub(crate) text: &'a str,
    pub(crate) errors: &'a mut Vec<ConfigError>,
}

impl ResolveCx<'_> {
    /// The stage's own fields read into the kind's config `C` (a serde struct with
    /// `deny_unknown_fields`): an unknown, missing or mistyped field is reported at
    /// its line, as `stage[i].<field>`.
    pub fn config<C: DeserializeOwned>(&mut self) -> Option<C> {
        let table: toml::Table = self.fields.iter().map(|(k, v)| (k.clone(), v.get_ref().clone())).collect();
        match serde_path_to_error::deserialize::<_, C>(toml::Value::Table(table)) {
            Ok(c) => Some(c),
            Err(e) => {
                let message = e.inner().message().trim().to_string();
                let path = e.path().to_string();
                // An unknown field: serde names it in the message, not the path.
                let key = message
                    .strip_prefix("unknown field `")
                    .and_then(|m| m.split('`').next())
                    .map(str::to_string)
                    .unwrap_or_else(|| path.split(['.', '[']).next().unwrap_or("").to_string());
                let kind = self.kind;
                let message = if message.starts_with("unknown field") {
                    format!("{message} (the fields of a `{kind}` stage, beyond those every stage has)")
                } else {
                    message
                };
                match self.fields.get(&key) {
                    Some(v) if !key.is_empty() => {
                        let field = if path.is_empty() || path == "." { key.clone() } else { path };
                        self.errors.push(ConfigError::at(self.file, self.text, v.span(), format!("{}.{field}", self.at), message));
                    }
                    _ => self.errors.push(ConfigError::at(self.file, self.text, self.name_span.clone(), self.at.to_string(), format!("a `{kind}` stage: {message}"))),
                }
                None
            }
        }
    }

    /// Reports `message` at the stage's field `key` (`route[1].to`: the line of
    /// `route`, if it was written; the stage's otherwise).
    pub fn error(&mut self, key: &str, message: impl Into<String>) {
        let top = key.split(['.', '[']).next().unwrap_or(key);
        let span = self.fields.get(top).map_or(self.name_span.clone(), |v| v.span());
        self.errors.push(ConfigError::at(self.file, self.text, span, format!("{}.{key}", self.at), message));
    }

    /// Reports an error of a file the stage names (its own file, field and line).
    pub fn engine_error(&mut self, e: actio_engine::EngineError) {
        self.errors.push(ConfigError { file: e.file, field: e.field.unwrap_or_else(|| "-".into()), line: e.line, message: e.message });
    }

    /// The file named by field `key` (`relative` to the pipeline dir), if it exists.
    pub fn file(&mut self, key: &str, relative: &str) -> Option<PathBuf> {
        let path = self.dir.join(relative);
        if path.is_file() {
            Some(path)
        } else {
            self.error(key, format!("file {} does not exist", path.display()));
            None
        }
    }

    /// The rule file named by field `key`, compiled against the schema and the
    /// features so far (and so on each reload).
    pub fn rules(&mut self, key: &str, relative: &str) -> Option<Arc<ReloadableRuleSet>> {
        let path = self.file(key, relative)?;
        ReloadableRuleSet::rules(self.stage, &path, self.schema, self.features).map_err(|e| self.engine_error(e)).ok().map(Arc::new)
    }
}
