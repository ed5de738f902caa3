//! Per-partition state, for every stateful kind: one mechanism, so that no kind
//! writes its own assignment, restore or revocation handling.
//!
//! A stateful kind's state is per input partition of the service that runs it: a
//! partition is a unit of assignment, so a replica that takes over a partition takes
//! over exactly the keys of it. On assignment ([`PartitionStates::assign`]) each
//! newly held partition gets a new state, rebuilt when the kind's
//! [`StatePolicy::restore`] asks for it by replaying the service's input for that
//! partition, from the restore horizon up to the group's committed offset — the
//! records the partition's previous owner had finished — before any record of it is
//! processed. The input topic is the changelog: nothing is written on the hot path,
//! and after the replay the state is the one the previous owner had (the same
//! records, in the same per-key order). Partitions are rebuilt in parallel, one
//! thread each; a long restore says how far it got every 5 s. On revocation the
//! partition's state is dropped.
//!
//! A copy back from the retry topic was consumed from a retry partition, not an
//! input one; `Context::source` names the input partition it was first consumed
//! from, and it runs against that partition's state if this replica holds it, else
//! against an empty, throw-away one (the retry group assigns retry partitions on its
//! own).

use std::sync::Arc;
use std::time::{Duration, Instant};

use actio_core::TopicPartition;
use actio_core::TxState;
use actio_core::bus::{BusError, BusErrorKind};
use actio_core::time::now_ns;
use actio_runtime::{Context, HandlerError};
use ahash::AHashMap;
use parking_lot::RwLock;

use super::{Produced, RunCx, Runner, StageLogic};

/// How a stateful kind keeps its state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatePolicy {
    /// What the state is, for logs ("velocity windows").
    pub what: &'static str,
    /// How much of an assigned partition's history rebuilds its state.
    pub restore: Restore,
    /// At most this many records (the newest) are replayed per partition.
    pub max_records: u64,
}

/// How much history rebuilds a partition's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restore {
    /// None: the state starts empty.
    Off,
    /// The records of the last this long (plus [`RESTORE_MARGIN`]).
    Last(Duration),
    /// Every record the topic still holds.
    All,
}

/// How far before a [`Restore::Last`] horizon a restore starts reading: record
/// timestamps (when the previous stage produced) trail transactions' event times.
pub const RESTORE_MARGIN: Duration = Duration::from_secs(60);

/// How often a long restore says how far it got.
const RESTORE_PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// Reads back an input partition's history: `(partition, from_ms, max_records, f)`
/// calls `f` on each decodable record from `from_ms` up to the service group's
/// committed offset, at most the newest `max_records`; returns `(applied,
/// undecodable)`.
pub type ReplayFn<'a> = dyn Fn(&TopicPartition, i64, u64, &mut dyn FnMut(&mut TxState)) -> Result<(u64, u64), BusError> + Sync + 'a;

/// What a stateful stage is given on assignment to rebuild state.
#[derive(Clone, Copy)]
pub struct History<'a> {
    /// The service's name (logs).
    pub service: &'a str,
    /// The service's input topic: state exists for its partitions only.
    pub input: &'a str,
    /// Reads back a partition's history; `None` without a bus (tests, tools).
    pub replay: Option<&'a ReplayFn<'a>>,
}

impl std::fmt::Debug for History<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("History").field("service", &self.service).field("input", &self.input).field("replay", &self.replay.is_some()).finish()
    }
}

/// One state per held input partition.
pub struct PartitionStates<S> {
    held: RwLock<AHashMap<i32, Arc<S>>>,
}

impl<S> std::fmt::Debug for PartitionStates<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut held: Vec<i32> = self.held.read().keys().copied().collect();
        held.sort_unstable();
        f.debug_struct("PartitionStates").field("partitions", &held).finish()
    }
}

impl<S> Default for PartitionStates<S> {
    fn default() -> Self {
        PartitionStates { held: RwLock::new(AHashMap::new()) }
    }
}

impl<S: Send + Sync> PartitionStates<S> {
    /// The state the message `ctx` describes runs against (see the module docs).
    pub fn of(&self, ctx: &Context, input: &str, new: impl Fn() -> S) -> Arc<S> {
        let on_input = *ctx.source.topic == *input;
        if on_input && !ctx.from_retry_topic {
            if let Some(s) = self.held.read().get(&ctx.source.partition) {
                return s.clone();
            }
            return self.held.write().entry(ctx.source.partition).or_insert_with(|| Arc::new(new())).clone();
        }
        let held = on_input.then(|| self.held.read().get(&ctx.source.partition).cloned()).flatten();
        held.unwrap_or_else(|| Arc::new(new()))
    }

    /// Whether input partition `partition` has a state.
    pub fn holds(&self, partition: i32) -> bool {
        self.held.read().contains_key(&partition)
    }

    /// Makes a state for each newly assigned input partition, rebuilt per `policy`
    /// from `history` with `replay` (see the module docs).
    pub fn assign(
        &self,
        partitions: &[TopicPartition],
        history: &History<'_>,
        policy: &StatePolicy,
        new: impl Fn() -> S + Sync,
        replay: impl Fn(&S, &mut TxState) + Sync,
    ) {
        let fresh: Vec<&TopicPartition> = partitions.iter().filter(|tp| *tp.topic == *history.input && !self.holds(tp.partition)).collect();
        let states: Vec<(i32, S)> = std::thread::scope(|scope| {
            let running: Vec<_> = fresh.iter().map(|tp| scope.spawn(|| (tp.partition, rebuilt(tp, history, policy, &new, &replay)))).collect();
            running.into_iter().filter_map(|h| h.join().ok()).collect()
        });
        let mut held = self.held.write();
        for (partition, state) in states {
            held.entry(partition).or_insert_with(|| Arc::new(state));
        }
        // A restore that panicked left its partition without state; it starts empty.
        for tp in fresh {
            held.entry(tp.partition).or_insert_with(|| Arc::new(new()));
        }
    }

    /// Every held partition's state.
    pub fn all(&self) -> Vec<Arc<S>> {
        self.held.read().values().cloned().collect()
    }

    /// Drops the state of the revoked input partitions.
    pub fn revoke(&self, partitions: &[TopicPartition], input: &str) {
        let mut held = self.held.write();
        for tp in partitions.iter().filter(|tp| *tp.topic == *input) {
            held.remove(&tp.partition);
        }
    }
}

/// A new state for `tp`, rebuilt from its history when the policy and the bus allow.
/// A failed restore is logged and the state keeps what was read.
fn rebuilt<S>(tp: &TopicPartition, history: &History<'_>, policy: &StatePolicy, new: &impl Fn() -> S, replay: &impl Fn(&S, &mut TxState)) -> S {
    let state = new();
    let Some(read) = history.replay else { return state };
    let from_ms = match policy.restore {
        Restore::Off => return state,
        Restore::All => 0,
        Restore::Last(w) => now_ns() / 1_000_000 - w.as_millis() as i64 - RESTORE_MARGIN.as_millis() as i64,
    };
    let (t0, what, service) = (Instant::now(), policy.what, history.service);
    let mut last_said = t0;
    let mut applied = 0u64;
    let result = read(tp, from_ms, policy.max_records, &mut |st: &mut TxState| {
        replay(&state, st);
        applied += 1;
        if applied.is_multiple_of(65_536) && last_said.elapsed() >= RESTORE_PROGRESS_EVERY {
            last_said = Instant::now();
            tracing::info!(stage = %service, partition = %tp, records = applied, s = t0.elapsed().as_secs(), "restoring {what}");
        }
    });
    let ms = t0.elapsed().as_millis() as u64;
    match result {
        Ok((applied, undecodable)) => tracing::info!(stage = %service, partition = %tp, records = applied, undecodable, ms, "{what} restored"),
        // A bus without history (the embedded one): there is nothing to rebuild from.
        Err(e) if e.kind == BusErrorKind::Unsupported => {
            tracing::debug!(stage = %service, partition = %tp, error = %e, "no history to rebuild {what} from");
        }
        Err(e) => tracing::warn!(
            stage = %service, partition = %tp, records = applied, ms, error = %e,
            "{what} only partly restored: this partition's keys see less history until it refills"
        ),
    }
    state
}

/// Any [`StageLogic`] with its partitions' state: what a handler runs.
pub(crate) struct Keyed<L: StageLogic> {
    logic: Arc<L>,
    policy: Option<StatePolicy>,
    states: PartitionStates<L::State>,
    /// A stateless kind's one state.
    shared: Option<L::State>,
}

impl<L: StageLogic> std::fmt::Debug for Keyed<L> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyed").field("logic", &self.logic).field("policy", &self.policy).finish_non_exhaustive()
    }
}

impl<L: StageLogic> Keyed<L> {
    pub(crate) fn new(logic: Arc<L>) -> Self {
        let policy = logic.state_policy();
        let shared = policy.is_none().then(|| logic.new_state());
        Keyed { logic, policy, states: PartitionStates::default(), shared }
    }
}

impl<L: StageLogic> Runner for Keyed<L> {
    fn run(&self, st: TxState, cx: &RunCx<'_>) -> Result<Produced, HandlerError> {
        match &self.shared {
            Some(s) => self.logic.run(s, st, cx),
            None => {
                let s = self.states.of(cx.ctx, cx.input, || self.logic.new_state());
                self.logic.run(&s, st, cx)
            }
        }
    }

    fn assigned(&self, partitions: &[TopicPartition], history: &History<'_>) {
        if let Some(policy) = &self.policy {
            self.states.assign(partitions, history, policy, || self.logic.new_state(), |s, st| self.logic.replay(s, st));
        }
    }

    fn revoked(&self, partitions: &[TopicPartition], input: &str) {
        self.states.revoke(partitions, input);
    }

    fn tick(&self) -> Vec<super::Ticked> {
        match &self.shared {
            Some(s) => self.logic.tick(s),
            None => self.states.all().iter().flat_map(|s| self.logic.tick(s)).collect(),
        }
    }
}
