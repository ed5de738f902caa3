//! `join`: waits, per transaction, for the results of parallel branches, then sends
//! one transaction on with everything they found — or, after `timeout_ms`, what
//! arrived, flagged partial. Fan-out is plain topics: several stages read the same
//! topic (each its own consumer group, in parallel), and every branch writes the
//! join's input topic.
//!
//! ```toml
//! [[stage]]
//! kind = "join"
//! input = "transfers.results"     # every branch writes it
//! branches = ["sanctions", "amounts", "velocity"]
//! timeout_ms = 200
//! [[stage.typology]]              # optional: a weighted sum of rule hits → a feature
//! name = "mule_typology"
//! weights = { mule_fan_out = 0.6, new_payee_large = 0.4 }
//! ```
//!
//! A branch's result is told apart by the trail hop its stage wrote last. The merged
//! transaction carries the union of the branches' rule hits and features, plus
//! `<join>_branches` (how many arrived) and `<join>_partial` (1 when it timed out);
//! a typology's feature is the sum of its weights over the rules that fired. What
//! weighs them against thresholds is the model of a `score` stage after the join.
//!
//! Nothing is ever stuck and nothing is lost: each waiting branch result is held
//! ([`actio_runtime::Hold`]) — its offset is not committed — until the joined
//! transaction that contains it is delivered. A crash or a rebalance therefore hands
//! the waiting results to the partition's next owner, which joins them again; the
//! join keeps no changelog. A branch result for a transaction already emitted (late,
//! after a timeout) is dropped and counted; so is a second result of one branch.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use actio_core::bus::Bytes;
use actio_core::tx::Feature;
use actio_core::{Headers, TxState, headers};
use actio_runtime::{HandlerCounter, HandlerError, Hold};
use ahash::{AHashMap, AHashSet};
use parking_lot::Mutex;
use serde::Deserialize;

use super::{Kind, Logic, Produced, ResolveCx, Restore, RunCx, StageLogic, StatePolicy, Ticked, Writes};

#[cfg(test)]
mod tests;

/// The kind.
pub static KIND: Kind = Kind { name: "join", writes: Writes::Transactions, resolve };

/// Default: how long a transaction waits for its branches, ms.
pub const DEFAULT_TIMEOUT_MS: u64 = 500;
/// Longest timeout, ms.
pub const MAX_TIMEOUT_MS: u64 = 600_000;
/// How long an emitted transaction's id is remembered to drop late results, in
/// timeouts (at least [`MIN_LATE_WINDOW`]).
pub const LATE_WINDOW_TIMEOUTS: u32 = 10;
/// The shortest late window.
pub const MIN_LATE_WINDOW: Duration = Duration::from_secs(10);

/// Transactions emitted partial: some branch did not arrive in time.
pub const PARTIAL: &str = "actio_join_partial_total";
/// Branch results dropped: late (their transaction was emitted) or a branch's second.
pub const DROPPED: &str = "actio_join_dropped_total";

/// A `join` stage's own fields.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinConfig {
    /// The stages it waits for: each writes the join's input.
    pub branches: Vec<String>,
    /// How long a transaction waits for its branches, ms (default [`DEFAULT_TIMEOUT_MS`]).
    pub timeout_ms: Option<u64>,
    /// Weighted sums of rule hits, each a feature (`[[stage.typology]]`).
    #[serde(default, rename = "typology")]
    pub typologies: Vec<TypologyConfig>,
}

/// One typology: a feature that sums the weights of the rules that fired.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TypologyConfig {
    /// The feature's name (`features.<name>` to rules and the model).
    pub name: String,
    /// Rule id → weight.
    pub weights: std::collections::BTreeMap<String, f64>,
}

fn resolve(cx: &mut ResolveCx<'_>) -> Option<Arc<dyn Logic>> {
    let c: JoinConfig = cx.config()?;
    let mut ok = true;
    if c.branches.len() < 2 {
        cx.error("branches", "expected two or more stages: a join waits for parallel branches");
        ok = false;
    }
    let mut seen = AHashSet::new();
    for b in &c.branches {
        if !seen.insert(b.as_str()) {
            cx.error("branches", format!("stage {b:?} is listed twice"));
            ok = false;
        }
    }
    let timeout_ms = c.timeout_ms.unwrap_or(DEFAULT_TIMEOUT_MS);
    if !(1..=MAX_TIMEOUT_MS).contains(&timeout_ms) {
        cx.error("timeout_ms", format!("expected 1..={MAX_TIMEOUT_MS} ms"));
        ok = false;
    }
    let base = cx.stage.replace('-', "_");
    let (branches_feature, partial_feature) = (format!("{base}_branches"), format!("{base}_partial"));
    let mut typologies = Vec::new();
    for (i, t) in c.typologies.iter().enumerate() {
        if !actio_core::schema::is_identifier(&t.name) || cx.features.contains(&t.name) || typologies.iter().any(|(n, _): &(Arc<str>, _)| **n == *t.name) {
            cx.error(&format!("typology[{i}].name"), format!("expected an identifier unlike any feature so far, not {:?}", t.name));
            ok = false;
        }
        for id in t.weights.keys().filter(|id| !cx.rule_ids.contains(id)) {
            cx.error(&format!("typology[{i}].weights"), format!("unknown rule {id:?}: the stages before the join evaluate {}", cx.rule_ids.join(", ")));
            ok = false;
        }
        if t.weights.values().any(|w| !w.is_finite()) {
            cx.error(&format!("typology[{i}].weights"), "expected finite weights");
            ok = false;
        }
        typologies.push((Arc::from(t.name.as_str()), t.weights.iter().map(|(k, v)| (k.clone(), *v)).collect::<Vec<_>>()));
    }
    if !ok {
        return None;
    }
    cx.features.extend([branches_feature.clone(), partial_feature.clone()]);
    cx.features.extend(typologies.iter().map(|(n, _)| n.to_string()));
    let timeout = Duration::from_millis(timeout_ms);
    Some(Arc::new(Join {
        branches: c.branches,
        timeout,
        late_window: (timeout * LATE_WINDOW_TIMEOUTS).max(MIN_LATE_WINDOW),
        branches_feature: Arc::from(branches_feature),
        partial_feature: Arc::from(partial_feature),
        typologies,
        partial: AtomicU64::new(0),
        dropped: AtomicU64::new(0),
    }))
}

/// A compiled `join` stage.
#[derive(Debug)]
pub struct Join {
    branches: Vec<String>,
    timeout: Duration,
    late_window: Duration,
    branches_feature: Arc<str>,
    partial_feature: Arc<str>,
    typologies: Vec<Typology>,
    partial: AtomicU64,
    dropped: AtomicU64,
}

/// A typology's feature name and its rule weights.
type Typology = (Arc<str>, Vec<(String, f64)>);

/// One input partition's transactions waiting for branches, and those emitted lately.
#[derive(Debug, Default)]
pub struct Waiting {
    inner: Mutex<WaitingInner>,
}

#[derive(Debug, Default)]
struct WaitingInner {
    pending: AHashMap<String, Pending>,
    emitted: AHashMap<String, Instant>,
}

impl Waiting {
    /// Transactions waiting.
    pub fn len(&self) -> usize {
        self.inner.lock().pending.len()
    }

    /// Whether none waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Debug)]
struct Pending {
    arrived: Vec<Option<TxState>>,
    holds: Vec<Hold>,
    since: Instant,
    key: Option<Bytes>,
    headers: Headers,
}

impl Join {
    /// The branch results merged: the first's transaction with every branch's rule
    /// hits, features and rule-set versions, then the join's own features.
    fn merge(&self, arrived: Vec<Option<TxState>>, partial: bool) -> TxState {
        let n = arrived.iter().filter(|a| a.is_some()).count();
        let mut parts = arrived.into_iter().flatten();
        let mut st = parts.next().unwrap_or_else(|| TxState::new(actio_core::Tx { values: Vec::new() }));
        for other in parts {
            for h in other.hits {
                if !st.hits.iter().any(|x| x.id == h.id) {
                    st.hits.push(h);
                }
            }
            for f in other.features {
                if !st.features.iter().any(|x| x.name == f.name) {
                    st.features.push(f);
                }
            }
            st.rule_errors += other.rule_errors;
            for r in other.rule_sets {
                if !st.rule_sets.contains(&r) {
                    st.rule_sets.push(r);
                }
            }
        }
        st.features.push(Feature { name: self.branches_feature.clone(), value: n as f64 });
        st.features.push(Feature { name: self.partial_feature.clone(), value: f64::from(u8::from(partial)) });
        for (name, weights) in &self.typologies {
            let value = weights.iter().filter(|(id, _)| st.hits.iter().any(|h| h.id == *id && !h.shadow)).map(|(_, w)| w).sum();
            st.features.push(Feature { name: name.clone(), value });
        }
        st
    }

    /// The branch that wrote the message: the stage of its trail's last hop.
    fn branch_of(&self, hdrs: &Headers) -> Result<usize, HandlerError> {
        let last = hdrs.get(headers::TRAIL).map(headers::parse_trail).and_then(|t| t.into_iter().last()).map(|h| h.stage);
        match last {
            Some(stage) => self.branches.iter().position(|b| *b == stage).ok_or_else(|| {
                HandlerError::permanent(format!("join: a result of stage {stage:?}, which is none of its branches ({})", self.branches.join(", ")))
            }),
            None => Err(HandlerError::permanent("join: the message has no trail, so its branch is unknown")),
        }
    }
}

impl StageLogic for Join {
    type State = Waiting;

    fn describe(&self) -> Vec<String> {
        let mut lines = vec![format!(
            "waits for {} (timeout {} ms, then partial); adds {}, {}",
            self.branches.join(" + "),
            self.timeout.as_millis(),
            self.branches_feature,
            self.partial_feature
        )];
        lines.extend(self.typologies.iter().map(|(n, w)| format!("typology {n} = {}", w.iter().map(|(id, w)| format!("{w}·{id}")).collect::<Vec<_>>().join(" + "))));
        lines.push("waiting branch results are held uncommitted: a crash or rebalance hands them to the next owner".into());
        lines
    }

    fn state_policy(&self) -> Option<StatePolicy> {
        Some(StatePolicy { what: "waiting joins", restore: Restore::Off, max_records: 0 })
    }

    fn new_state(&self) -> Waiting {
        Waiting::default()
    }

    fn waits_for(&self) -> &[String] {
        &self.branches
    }

    fn tick_interval(&self) -> Option<Duration> {
        Some((self.timeout / 4).clamp(Duration::from_millis(1), Duration::from_millis(50)))
    }

    fn run(&self, state: &Waiting, st: TxState, cx: &RunCx<'_>) -> Result<Produced, HandlerError> {
        let branch = self.branch_of(cx.headers)?;
        let id = cx.schema.id_of(&st.tx).to_string();
        let mut w = state.inner.lock();
        if w.emitted.contains_key(&id) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return Ok(Produced::Nothing);
        }
        let n = self.branches.len();
        let entry = w.pending.entry(id.clone()).or_insert_with(|| Pending {
            arrived: (0..n).map(|_| None).collect(),
            holds: Vec::new(),
            since: Instant::now(),
            key: Some(Bytes::from(cx.key.key(&st.tx))),
            headers: Headers::default(),
        });
        if entry.arrived[branch].is_some() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return Ok(Produced::Nothing);
        }
        entry.arrived[branch] = Some(st);
        if entry.arrived.iter().all(Option::is_some) {
            let done = w.pending.remove(&id).map(|p| (p.arrived, p.holds)).unwrap_or_default();
            w.emitted.insert(id, Instant::now());
            drop(w);
            cx.release_on_output(done.1);
            return Ok(Produced::Tx(self.merge(done.0, false)));
        }
        entry.headers = cx.headers.clone();
        entry.holds.push(cx.hold());
        Ok(Produced::Nothing)
    }

    fn tick(&self, state: &Waiting) -> Vec<Ticked> {
        let mut w = state.inner.lock();
        let late = self.late_window;
        w.emitted.retain(|_, at| at.elapsed() < late);
        // Oldest first: a key's transactions are first seen in their order (each
        // branch hands them on in key order), so emitting by first arrival keeps a
        // key's partial joins in order when several fall due in one tick.
        let mut due: Vec<(Instant, String)> = w.pending.iter().filter(|(_, p)| p.since.elapsed() >= self.timeout).map(|(id, p)| (p.since, id.clone())).collect();
        due.sort_unstable();
        let due: Vec<String> = due.into_iter().map(|(_, id)| id).collect();
        let mut out = Vec::with_capacity(due.len());
        for id in due {
            let Some(p) = w.pending.remove(&id) else { continue };
            w.emitted.insert(id, Instant::now());
            self.partial.fetch_add(1, Ordering::Relaxed);
            out.push(Ticked { st: self.merge(p.arrived, true), key: p.key, headers: p.headers, releases: p.holds });
        }
        out
    }

    fn counters(&self) -> Vec<HandlerCounter> {
        vec![
            HandlerCounter::new(PARTIAL, "Transactions a join emitted partial: some branch did not arrive within timeout_ms.", self.partial.load(Ordering::Relaxed)),
            HandlerCounter::new(DROPPED, "Branch results a join dropped: late (their transaction was emitted) or a branch's second.", self.dropped.load(Ordering::Relaxed)),
        ]
    }
}
