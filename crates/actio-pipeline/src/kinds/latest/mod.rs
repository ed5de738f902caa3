//! `latest`: the newest record per key, by the record's own timestamp. An update
//! goes on only when it is newer than the newest one seen for its key; an older or
//! equally old one arriving late is dropped and counted, so it can never overwrite a
//! newer one downstream.
//!
//! ```toml
//! [[stage]]
//! kind = "latest"
//! timestamp = "observed_at"  # a timestamp or int field of the schema, required
//! emit = "newer"             # or "changed": only newer updates whose fields differ
//! restore = "all"            # or "off", or a duration ("7d"): history that rebuilds
//! ```
//!
//! The state is, per key, the newest timestamp (and in `emit = "changed"` the raw
//! fields of that record), kept per input partition by [`super::state`]. It is
//! rebuilt on assignment by replaying the partition's input up to the group's
//! committed offset, by default all of it the topic retains: an entity updated once
//! a week ago keeps its newest time. Replaying the input rather than reading the
//! output back is what makes the rebuilt state exactly the previous owner's: the
//! output holds only what was emitted, not what was dropped, and a partition of the
//! output may hold other partitions' keys when partition counts differ.
//!
//! A redelivered or retried copy of the record that set a key's newest time (the
//! same input partition and offset) is not stale: it goes on again, so that a retry
//! of a later stage in a fused service, or a handler retried in place, still emits.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use actio_core::schema::{FieldType, Value};
use actio_core::{KeyExtractor, TxState};
use actio_runtime::{HandlerCounter, HandlerError};
use ahash::AHashMap;
use parking_lot::Mutex;
use serde::Deserialize;

use super::{Kind, Logic, Produced, ResolveCx, Restore, RunCx, StageLogic, StatePolicy, Writes};

#[cfg(test)]
mod tests;

/// The kind.
pub static KIND: Kind = Kind { name: "latest", writes: Writes::Transactions, resolve };

/// Default: what goes on.
pub const DEFAULT_EMIT: Emit = Emit::Newer;
/// Default: how much history rebuilds an assigned partition's state (all of it).
pub const DEFAULT_RESTORE: &str = "all";
/// Default: most records replayed per partition on a restore.
pub const DEFAULT_RESTORE_MAX_RECORDS: u64 = 10_000_000;

/// Updates dropped because they were not newer than their key's newest.
pub const STALE: &str = "actio_latest_stale_total";
/// Newer updates not emitted because their fields equal the newest's (`emit = "changed"`).
pub const UNCHANGED: &str = "actio_latest_unchanged_total";

/// Which newer updates go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Emit {
    /// Every update newer than its key's newest.
    Newer,
    /// Only newer updates whose raw fields (the timestamp and the record id aside)
    /// differ from the newest's: a heartbeat that repeats the state goes no further.
    Changed,
}

/// A `latest` stage's own fields.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LatestConfig {
    /// The field with the update's own time: a `timestamp` or `int` field.
    pub timestamp: String,
    /// Which newer updates go on (default [`DEFAULT_EMIT`]).
    pub emit: Option<Emit>,
    /// History that rebuilds an assigned partition's state: `all`, `off`, or a
    /// duration such as `7d` (default [`DEFAULT_RESTORE`]).
    pub restore: Option<String>,
    /// Most records replayed per partition (default [`DEFAULT_RESTORE_MAX_RECORDS`]).
    pub restore_max_records: Option<u64>,
}

fn resolve(cx: &mut ResolveCx<'_>) -> Option<Arc<dyn Logic>> {
    let c: LatestConfig = cx.config()?;
    let slot = match cx.schema.slot(&c.timestamp) {
        None => {
            let names = cx.schema.names();
            cx.error("timestamp", format!("unknown field {:?}; the schema declares: {names}", c.timestamp));
            return None;
        }
        Some(slot) => slot,
    };
    let field = cx.schema.field(slot);
    if !matches!(field.ty, FieldType::Timestamp | FieldType::Int) || field.derived.is_some() {
        cx.error("timestamp", format!("field {:?} is a {}{}: expected a timestamp or int field as written by the producer", c.timestamp, field.ty.as_str(), if field.derived.is_some() { " (derived)" } else { "" }));
        return None;
    }
    let restore = match c.restore.as_deref().unwrap_or(DEFAULT_RESTORE) {
        "all" => Restore::All,
        "off" => Restore::Off,
        d => match humantime::parse_duration(d) {
            Ok(d) if !d.is_zero() => Restore::Last(d),
            _ => {
                cx.error("restore", format!("expected \"all\", \"off\" or a duration such as \"7d\", not {d:?}"));
                return None;
            }
        },
    };
    let max_records = c.restore_max_records.unwrap_or(DEFAULT_RESTORE_MAX_RECORDS);
    if max_records == 0 {
        cx.error("restore_max_records", "expected at least 1 (restore = \"off\" restores nothing)");
        return None;
    }
    let key = cx.schema.key(cx.key_fields).ok()?; // checked with [key]
    Some(Arc::new(Latest {
        field: c.timestamp,
        slot,
        id_slot: cx.schema.id_slot(),
        raw: cx.schema.raw_fields().len(),
        emit: c.emit.unwrap_or(DEFAULT_EMIT),
        policy: StatePolicy { what: "newest times per key", restore, max_records },
        key,
        stale: AtomicU64::new(0),
        unchanged: AtomicU64::new(0),
    }))
}

/// A compiled `latest` stage.
#[derive(Debug)]
pub struct Latest {
    field: String,
    slot: usize,
    /// The record id's slot: every update has its own, so it is no change.
    id_slot: usize,
    /// The raw fields are the first `raw` slots.
    raw: usize,
    emit: Emit,
    policy: StatePolicy,
    key: KeyExtractor,
    stale: AtomicU64,
    unchanged: AtomicU64,
}

/// One input partition's newest record per key.
#[derive(Debug, Default)]
pub struct Newest {
    by_key: Mutex<AHashMap<Box<str>, Entry>>,
}

impl Newest {
    /// Keys held.
    pub fn len(&self) -> usize {
        self.by_key.lock().len()
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Debug)]
struct Entry {
    time: i64,
    /// The input record that set it, `(partition, offset)`: `None` when replayed.
    set_by: Option<(i32, i64)>,
    /// Its raw fields, the timestamp's and the id's slots nulled (`emit = "changed"`
    /// only).
    fields: Option<Vec<Value>>,
}

/// What an update does to its key's state.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Emit,
    Stale,
    Unchanged,
}

impl Latest {
    fn fields(&self, st: &TxState) -> Option<Vec<Value>> {
        (self.emit == Emit::Changed).then(|| {
            let mut v = st.tx.values[..self.raw.min(st.tx.values.len())].to_vec();
            for slot in [self.slot, self.id_slot] {
                if let Some(t) = v.get_mut(slot) {
                    *t = Value::Null;
                }
            }
            v
        })
    }

    fn time(&self, st: &TxState) -> Option<i64> {
        match st.tx.values.get(self.slot) {
            Some(Value::Int(t)) => Some(*t),
            _ => None,
        }
    }

    /// Applies an update of `time` to the state; `set_by`: the input record it is.
    fn offer(&self, state: &Newest, st: &TxState, time: i64, set_by: Option<(i32, i64)>) -> Verdict {
        let key = self.key.key(&st.tx);
        let mut by_key = state.by_key.lock();
        match by_key.get_mut(key.as_str()) {
            Some(e) if set_by.is_some() && e.set_by == set_by => Verdict::Emit, // the same record again
            Some(e) if time <= e.time => Verdict::Stale,
            Some(e) => {
                let fields = self.fields(st);
                let same = fields.is_some() && fields == e.fields;
                *e = Entry { time, set_by, fields };
                if same { Verdict::Unchanged } else { Verdict::Emit }
            }
            None => {
                by_key.insert(key.into_boxed_str(), Entry { time, set_by, fields: self.fields(st) });
                Verdict::Emit
            }
        }
    }
}

impl StageLogic for Latest {
    type State = Newest;

    fn describe(&self) -> Vec<String> {
        let emit = match self.emit {
            Emit::Newer => "every newer update goes on",
            Emit::Changed => "a newer update goes on if its fields changed",
        };
        let restore = match self.policy.restore {
            Restore::Off => "the state starts empty on an assigned partition (restore = \"off\")".to_string(),
            Restore::All => format!("an assigned partition's state is rebuilt from all of its input the topic retains (at most {} records)", self.policy.max_records),
            Restore::Last(w) => format!("an assigned partition's state is rebuilt from the last {} of its input (at most {} records)", humantime::format_duration(w), self.policy.max_records),
        };
        vec![format!("newest per key by {:?}; {emit}; older updates are dropped", self.field), restore]
    }

    fn state_policy(&self) -> Option<StatePolicy> {
        Some(self.policy)
    }

    fn new_state(&self) -> Newest {
        Newest::default()
    }

    fn replay(&self, state: &Newest, st: &mut TxState) {
        if let Some(time) = self.time(st) {
            self.offer(state, st, time, None);
        }
    }

    fn run(&self, state: &Newest, st: TxState, cx: &RunCx<'_>) -> Result<Produced, HandlerError> {
        let Some(time) = self.time(&st) else {
            return Err(HandlerError::permanent(format!("field {:?} (the latest stage's timestamp) is absent", self.field)));
        };
        match self.offer(state, &st, time, Some((cx.ctx.source.partition, cx.ctx.source_offset))) {
            Verdict::Emit => Ok(Produced::Tx(st)),
            Verdict::Stale => {
                self.stale.fetch_add(1, Ordering::Relaxed);
                Ok(Produced::Nothing)
            }
            Verdict::Unchanged => {
                self.unchanged.fetch_add(1, Ordering::Relaxed);
                Ok(Produced::Nothing)
            }
        }
    }

    fn counters(&self) -> Vec<HandlerCounter> {
        vec![
            HandlerCounter::new(STALE, "Updates dropped by a latest stage: not newer than their key's newest.", self.stale.load(Ordering::Relaxed)),
            HandlerCounter::new(UNCHANGED, "Newer updates a latest stage did not emit: their fields equal the newest's (emit = \"changed\").", self.unchanged.load(Ordering::Relaxed)),
        ]
    }
}
