//! Velocity features: per-key sliding windows over event time.
//!
//! A window is keyed by any declared field, or several (a composite key: a
//! debtor–creditor pair); for each key the state keeps the key's recent events ordered
//! by event time (the schema's `record.time`). A transaction's feature counts the events
//! of its key with time in `(t − window, t]`, itself included. Out-of-order events
//! within the longest window are inserted in place; older ones are **late**: counted
//! as such, not stored, and their features computed from what is there.
//!
//! Memory is bounded three ways: at most `max_events_per_key` events per key (the
//! oldest dropped first, so counts saturate there), idle keys evicted once the event
//! time has moved `key_ttl` past their last event, and at most `max_keys` keys (the
//! least recently seen evicted first). The state is sharded: different keys of one
//! partition are updated concurrently by the stage's workers.

use std::collections::VecDeque;
use std::hash::{BuildHasher, Hash, Hasher};
use std::path::Path;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use actio_core::schema::{FieldType, Schema, Tx, Value};
use actio_core::tx::{Feature, TxState};
use ahash::{AHashMap, RandomState};
use parking_lot::Mutex;
use smallvec::SmallVec;
use serde::Deserialize;

use crate::error::{EngineError, ErrorKind, line_containing};

const SHARDS: usize = 64;
/// Updates between two single-shard TTL sweeps.
const SWEEP_EVERY: u64 = 16;
/// Stands for an absent value (no device, no IP country): never counted as distinct.
const ABSENT: u64 = 0;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VelocityFile {
    /// Evict a key this long (event time) after its last event; default: the longest window.
    #[serde(default)]
    key_ttl: Option<String>,
    /// Most keys held per state (per partition); default [`DEFAULT_MAX_KEYS`].
    #[serde(default = "default_max_keys")]
    max_keys: usize,
    /// Most events kept per key; default [`DEFAULT_MAX_EVENTS_PER_KEY`].
    #[serde(default = "default_max_events")]
    max_events_per_key: usize,
    /// How much of an assigned partition's input to replay to rebuild its windows
    /// (`"off"`: none); default: the longest window.
    #[serde(default)]
    restore: Option<String>,
    /// At most this many records (the newest) per partition in that replay.
    #[serde(default = "default_restore_max_records")]
    restore_max_records: u64,
    #[serde(rename = "feature")]
    features: Vec<FeatureConfig>,
}

/// Default: most keys held per state (per partition).
pub const DEFAULT_MAX_KEYS: usize = 1_000_000;
/// Default: most records (the newest) replayed per partition to rebuild its windows.
pub const DEFAULT_RESTORE_MAX_RECORDS: u64 = 10_000_000;
/// Default: most events kept per key.
pub const DEFAULT_MAX_EVENTS_PER_KEY: usize = 1024;

fn default_max_keys() -> usize {
    DEFAULT_MAX_KEYS
}

fn default_restore_max_records() -> u64 {
    DEFAULT_RESTORE_MAX_RECORDS
}

fn default_max_events() -> usize {
    DEFAULT_MAX_EVENTS_PER_KEY
}

/// What a feature computes over its window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Number of events.
    Count,
    /// Sum of a numeric `field` (absent values count 0).
    Sum,
    /// Smallest value of a numeric `field` (0 when none).
    Min,
    /// Largest value of a numeric `field` (0 when none).
    Max,
    /// Number of distinct values of `field`.
    #[serde(alias = "distinct_count")]
    Distinct,
}

impl Kind {
    fn numeric(self) -> bool {
        matches!(self, Kind::Sum | Kind::Min | Kind::Max)
    }
}

/// One or more field names, as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum Names {
    One(String),
    Many(Vec<String>),
}

impl Names {
    fn list(&self) -> Vec<String> {
        match self {
            Names::One(n) => vec![n.clone()],
            Names::Many(v) => v.clone(),
        }
    }
}

/// The hash of a slot's value; `None` when absent (an absent value is no key and no
/// distinct value).
fn hash_slot(v: &Value, s: &mut impl Hasher) -> Option<()> {
    match v {
        Value::Null => return None,
        Value::Str(x) => x.hash(s),
        Value::Int(x) => x.hash(s),
        Value::Enum(x) => x.hash(s),
        Value::Bool(x) => x.hash(s),
        Value::Float(x) => x.to_bits().hash(s),
        Value::Map(_) => return None,
    }
    Some(())
}

fn hash_of(slots: &[usize], tx: &Tx, h: &RandomState) -> Option<u64> {
    let mut s = h.build_hasher();
    for slot in slots {
        hash_slot(tx.values.get(*slot)?, &mut s)?;
    }
    Some(s.finish())
}

fn number(tx: &Tx, slot: usize) -> f64 {
    match tx.values.get(slot) {
        Some(Value::Int(i)) => *i as f64,
        Some(Value::Float(f)) => *f,
        _ => f64::NAN,
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct FeatureConfig {
    name: String,
    kind: Kind,
    key: Names,
    window: String,
    #[serde(default)]
    field: Option<String>,
}

#[derive(Debug, Clone)]
struct FeatureSpec {
    name: std::sync::Arc<str>,
    kind: Kind,
    window_ns: i64,
    /// Index into the group's distinct fields.
    distinct: Option<usize>,
    /// Index into the group's numeric fields (sum, min, max).
    num: Option<usize>,
}

/// Features sharing a key field share one state map.
#[derive(Debug, Clone)]
struct Group {
    /// The key's slots (several: a composite key).
    key: Vec<usize>,
    distinct_fields: Vec<usize>,
    numeric_fields: Vec<usize>,
    features: Vec<FeatureSpec>,
}

/// A loaded velocity configuration.
#[derive(Debug, Clone)]
pub struct VelocitySpec {
    groups: Vec<Group>,
    /// The event time's slot.
    time: usize,
    longest_ns: i64,
    restore_ns: i64,
    restore_max_records: u64,
    ttl_ns: i64,
    max_keys: usize,
    max_events: usize,
    names: Vec<String>,
    /// Keys with at least this many events keep running aggregates.
    agg_min_events: usize,
}

#[derive(Debug, Clone)]
struct Event {
    t: i64,
    /// Values of the group's numeric fields (NaN: absent).
    nums: SmallVec<[f64; 2]>,
    /// Hashes of the group's distinct fields, inline for up to four fields: a
    /// distinct count walks every event of a window (up to `max_events_per_key`),
    /// and a pointer per event made that walk a cache miss per event (measured: 7.4 →
    /// see BENCHMARKS.md).
    distinct: SmallVec<[u64; 4]>,
}

#[derive(Debug, Default)]
struct KeyState {
    events: VecDeque<Event>,
    /// Latest event time seen for the key.
    latest: i64,
    /// Events dropped from the front so far: `events[i]` has the absolute index
    /// `dropped + i`.
    dropped: u64,
    /// Running aggregates, one per feature of the group, as of `latest`. Kept while
    /// events arrive in order and the key holds at least `agg_min_events` events
    /// (below that a scan is cheaper); dropped by an out-of-order insert and rebuilt by
    /// the next in-order one.
    aggs: Option<Box<[Agg]>>,
}

/// One feature's window over a key's events, maintained as events enter and leave
/// it, so a busy key costs O(1) per update instead of a walk over its window
/// (a busy key at the `max_events_per_key` cap has 1,024 events to walk).
#[derive(Debug, Default)]
struct Agg {
    /// Absolute index of the first event inside the window.
    start: u64,
    count: u64,
    sum: f64,
    /// Distinct features: value hash → events in the window that carry it.
    values: AHashMap<u64, u32>,
}

impl Agg {
    fn add(&mut self, f: &FeatureSpec, e: &Event) {
        self.count += 1;
        self.sum += f.num.map_or(0.0, |n| finite_or_zero(e.nums[n]));
        if let Some(d) = f.distinct
            && e.distinct[d] != ABSENT
        {
            *self.values.entry(e.distinct[d]).or_insert(0) += 1;
        }
    }

    fn remove(&mut self, f: &FeatureSpec, e: &Event) {
        self.count -= 1;
        self.sum -= f.num.map_or(0.0, |n| finite_or_zero(e.nums[n]));
        if let Some(d) = f.distinct
            && let Some(n) = self.values.get_mut(&e.distinct[d])
        {
            *n -= 1;
            if *n == 0 {
                self.values.remove(&e.distinct[d]);
            }
        }
    }

    /// The value of a count, sum or distinct feature (min and max are scanned).
    fn value(&self, kind: Kind) -> f64 {
        match kind {
            Kind::Count => self.count as f64,
            // Exact zero once the window is empty (no rounding residue).
            Kind::Sum if self.count == 0 => 0.0,
            Kind::Sum => self.sum,
            Kind::Distinct => self.values.len() as f64,
            Kind::Min | Kind::Max => f64::NAN,
        }
    }
}

fn finite_or_zero(x: f64) -> f64 {
    if x.is_finite() { x } else { 0.0 }
}

/// The min or max of numeric field `n` over `events` (`None` when none has a value).
fn extreme<'a>(kind: Kind, n: usize, events: impl Iterator<Item = &'a Event>) -> Option<f64> {
    let vals = events.map(|e| e.nums[n]).filter(|x| x.is_finite());
    let v = if kind == Kind::Min { vals.fold(f64::INFINITY, f64::min) } else { vals.fold(f64::NEG_INFINITY, f64::max) };
    v.is_finite().then_some(v)
}

/// Keys with fewer events are scanned rather than aggregated.
const AGG_MIN_EVENTS: usize = 16;

type Shard = Mutex<AHashMap<u64, KeyState>>;

/// Counters of a velocity state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VelocityStats {
    /// Keys held now.
    pub keys: usize,
    /// Keys evicted (TTL or cap).
    pub evictions: u64,
    /// Events older than the longest window behind their key's latest event.
    pub late: u64,
    /// Events updated.
    pub updates: u64,
}

/// Mutable window state (one per partition).
#[derive(Debug)]
pub struct VelocityState {
    /// One sharded map per key group.
    maps: Vec<Box<[Shard]>>,
    hasher: RandomState,
    watermark: AtomicI64,
    evictions: AtomicU64,
    late: AtomicU64,
    updates: AtomicU64,
}

/// The line of the first `needle` at or after the `i`-th `[[feature]]` of `text`.
fn feature_line(text: &str, i: usize, needle: &str) -> Option<usize> {
    let start = text.match_indices("[[feature]]").nth(i).map_or(0, |(o, _)| o);
    let rel = text[start..].lines().position(|l| l.contains(needle))?;
    Some(text[..start].matches('\n').count() + 1 + rel)
}

fn parse_window(s: &str) -> Result<i64, String> {
    let d: Duration = humantime::parse_duration(s).map_err(|e| format!("expected a duration like \"1m\", \"1h\", \"24h\": {e}"))?;
    if d.is_zero() || d > Duration::from_secs(31 * 24 * 3600) {
        return Err("expected a duration between 1ns and 31 days".into());
    }
    Ok(d.as_nanos() as i64)
}

impl VelocitySpec {
    /// Loads a velocity file.
    pub fn load(path: &Path, schema: &Schema) -> Result<VelocitySpec, EngineError> {
        Self::from_toml(&crate::read(path)?, path, schema)
    }

    /// Loads velocity-file text; `origin` names it in errors. Keys and fields must be
    /// fields `schema` declares, of a type that fits the feature's kind.
    pub fn from_toml(text: &str, origin: &Path, schema: &Schema) -> Result<VelocitySpec, EngineError> {
        let f: VelocityFile = crate::parse_toml(text, origin)?;
        let err = |field: String, needle: &str, msg: String| EngineError::new(ErrorKind::Invalid, origin, Some(field), line_containing(text, needle), msg);
        let mut groups: Vec<Group> = Vec::new();
        let mut names: Vec<String> = Vec::new();
        let mut longest = 0;
        // Errors inside a feature point at its own lines, not the first match in the file.
        let ferr = |i: usize, field: String, needle: &str, msg: String| EngineError::new(ErrorKind::Invalid, origin, Some(field), feature_line(text, i, needle), msg);
        for (i, c) in f.features.iter().enumerate() {
            let at = format!("feature[{i}]");
            if c.name.is_empty() || !c.name.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '_') || c.name.starts_with(|ch: char| ch.is_ascii_digit()) {
                return Err(ferr(i, format!("{at}.name"), &c.name, format!("expected an identifier of [A-Za-z0-9_], got {:?}", c.name)));
            }
            if names.contains(&c.name) {
                return Err(ferr(i, format!("{at}.name"), &c.name, format!("feature {:?} is defined twice", c.name)));
            }
            let window_ns = parse_window(&c.window).map_err(|m| ferr(i, format!("{at}.window"), &format!("\"{}\"", c.window), m))?;
            longest = longest.max(window_ns);
            let slot_of = |field: String, name: &str| -> Result<usize, EngineError> {
                let s = schema.slot(name).ok_or_else(|| {
                    EngineError::new(ErrorKind::UnknownName, origin, Some(field.clone()), feature_line(text, i, &format!("\"{name}\"")), format!("unknown field {name:?}; {} declares: {}", schema.file().display(), schema.names()))
                })?;
                if schema.field(s).ty == FieldType::Map {
                    return Err(EngineError::new(ErrorKind::Invalid, origin, Some(field), feature_line(text, i, &format!("\"{name}\"")), format!("{name:?} is a map field: windows key on and count scalar fields")));
                }
                Ok(s)
            };
            let key_names = c.key.list();
            if key_names.is_empty() {
                return Err(ferr(i, format!("{at}.key"), &c.name, "expected a field name or a list of them".into()));
            }
            let key = key_names.iter().map(|n| slot_of(format!("{at}.key"), n)).collect::<Result<Vec<_>, _>>()?;
            let field = match (c.kind, &c.field) {
                (Kind::Count, Some(_)) => return Err(ferr(i, format!("{at}.field"), &c.name, "a `count` feature counts events: it takes no `field`".into())),
                (Kind::Count, None) => None,
                (k, None) => return Err(ferr(i, format!("{at}.field"), &c.name, format!("a `{}` feature needs `field` (the field it {})", format!("{k:?}").to_lowercase(), if k == Kind::Distinct { "counts distinct values of" } else { "aggregates" }))),
                (k, Some(name)) => {
                    let s = slot_of(format!("{at}.field"), name)?;
                    if k.numeric() && !matches!(schema.field(s).ty, FieldType::Int | FieldType::Float) {
                        return Err(ferr(i, format!("{at}.field"), &format!("\"{name}\""), format!("a `{}` feature needs a numeric field (int or float); {name:?} is a {} field", format!("{k:?}").to_lowercase(), schema.field(s).ty.as_str())));
                    }
                    Some(s)
                }
            };
            let g = match groups.iter().position(|g| g.key == key) {
                Some(g) => g,
                None => {
                    groups.push(Group { key, distinct_fields: Vec::new(), numeric_fields: Vec::new(), features: Vec::new() });
                    groups.len() - 1
                }
            };
            let group = &mut groups[g];
            let index_in = |list: &mut Vec<usize>, s: usize| match list.iter().position(|x| *x == s) {
                Some(i) => i,
                None => {
                    list.push(s);
                    list.len() - 1
                }
            };
            let distinct = field.filter(|_| c.kind == Kind::Distinct).map(|s| index_in(&mut group.distinct_fields, s));
            let num = field.filter(|_| c.kind.numeric()).map(|s| index_in(&mut group.numeric_fields, s));
            group.features.push(FeatureSpec { name: c.name.as_str().into(), kind: c.kind, window_ns, distinct, num });
            names.push(c.name.clone());
        }
        if names.is_empty() {
            return Err(EngineError::new(ErrorKind::Invalid, origin, Some("feature".into()), None, "expected at least one [[feature]]"));
        }
        let ttl_ns = match &f.key_ttl {
            Some(s) => parse_window(s).map_err(|m| err("key_ttl".into(), "key_ttl", m))?.max(longest),
            None => longest,
        };
        let restore_ns = match f.restore.as_deref() {
            None => longest,
            Some("off") => 0,
            Some(s) => parse_window(s).map_err(|m| err("restore".into(), "restore", format!("{m}, or \"off\"")))?,
        };
        if f.max_keys == 0 || f.max_events_per_key == 0 {
            return Err(err("max_keys".into(), "max_", "`max_keys` and `max_events_per_key` must be ≥ 1".into()));
        }
        Ok(VelocitySpec { groups, time: schema.time_slot(), longest_ns: longest, restore_ns, restore_max_records: f.restore_max_records, ttl_ns, max_keys: f.max_keys, max_events: f.max_events_per_key, names, agg_min_events: AGG_MIN_EVENTS })
    }

    /// The features' names, in file order.
    pub fn feature_names(&self) -> Vec<String> {
        self.names.clone()
    }

    /// How far back an assigned partition's input is replayed to rebuild its windows
    /// (`restore`; zero: not at all). Shorter than the longest window, the longer
    /// windows under-count after a hand-over until they refill.
    pub fn restore_window(&self) -> Duration {
        Duration::from_nanos(self.restore_ns.max(0) as u64)
    }

    /// The most records (the newest) replayed per partition to rebuild its windows
    /// (`restore_max_records`, default [`DEFAULT_RESTORE_MAX_RECORDS`]): a bound on how long a replica
    /// takes to start on a partition, which must stay under the consumer's
    /// `max.poll.interval.ms` (the replay runs inside the rebalance callback).
    pub fn restore_max_records(&self) -> u64 {
        self.restore_max_records
    }

    /// A fresh, empty state.
    pub fn new_state(&self) -> VelocityState {
        VelocityState {
            maps: self.groups.iter().map(|_| (0..SHARDS).map(|_| Mutex::new(AHashMap::new())).collect()).collect(),
            hasher: RandomState::with_seeds(7, 11, 13, 17),
            watermark: AtomicI64::new(i64::MIN),
            evictions: AtomicU64::new(0),
            late: AtomicU64::new(0),
            updates: AtomicU64::new(0),
        }
    }

    /// Records the transaction and pushes its features onto `st.features`.
    pub fn update(&self, state: &VelocityState, st: &mut TxState) {
        let t = match st.tx.values.get(self.time) {
            Some(Value::Int(t)) => *t,
            _ => 0,
        };
        state.updates.fetch_add(1, Ordering::Relaxed);
        let wm = state.watermark.fetch_max(t, Ordering::Relaxed).max(t);
        let per_shard_cap = self.max_keys.div_ceil(SHARDS);
        let n = state.updates.load(Ordering::Relaxed);
        if n.is_multiple_of(SWEEP_EVERY) {
            // Expire idle keys of one shard per tick, round robin: every shard is swept
            // every SWEEP_EVERY × SHARDS updates, and no update pays for all of them.
            let i = (n / SWEEP_EVERY) as usize % SHARDS;
            for m in &state.maps {
                let mut map = m[i].lock();
                let before = map.len();
                map.retain(|_, k| wm.saturating_sub(k.latest) <= self.ttl_ns);
                state.evictions.fetch_add((before - map.len()) as u64, Ordering::Relaxed);
            }
        }
        let out = &mut st.features;
        out.reserve(self.names.len());
        // Reused by every distinct-count feature of this update.
        let mut seen: Vec<u64> = Vec::new();
        for (gi, g) in self.groups.iter().enumerate() {
            let tx = &st.tx;
            let Some(key) = hash_of(&g.key, tx, &state.hasher) else {
                // No key (an optional key field absent): the features are 0.
                out.extend(g.features.iter().map(|f| Feature { name: f.name.clone(), value: 0.0 }));
                continue;
            };
            let distinct: SmallVec<[u64; 4]> = g.distinct_fields.iter().map(|f| hash_of(std::slice::from_ref(f), tx, &state.hasher).unwrap_or(ABSENT)).collect();
            let mut nums: SmallVec<[f64; 2]> = g.numeric_fields.iter().map(|f| number(tx, *f)).collect();
            let shard = &state.maps[gi][(key as usize) % SHARDS];
            let mut map = shard.lock();
            // Over the cap: expire idle keys, then the least recently seen eighth.
            if map.len() >= per_shard_cap {
                let before = map.len();
                map.retain(|_, k| wm.saturating_sub(k.latest) <= self.ttl_ns);
                if map.len() >= per_shard_cap {
                    let mut ages: Vec<i64> = map.values().map(|k| k.latest).collect();
                    let cut_at = (ages.len() / 8).max(1).min(ages.len() - 1);
                    ages.select_nth_unstable(cut_at);
                    let cut = ages[cut_at];
                    map.retain(|_, k| k.latest > cut);
                    while map.len() >= per_shard_cap {
                        let Some(oldest) = map.iter().min_by_key(|(_, k)| k.latest).map(|(k, _)| *k) else { break };
                        map.remove(&oldest);
                    }
                }
                state.evictions.fetch_add((before - map.len()) as u64, Ordering::Relaxed);
            }
            let ks = map.entry(key).or_default();
            let late = ks.latest != 0 && t < ks.latest.saturating_sub(self.longest_ns);
            if late {
                state.late.fetch_add(1, Ordering::Relaxed);
            } else {
                let at = ks.events.partition_point(|e| e.t <= t);
                let in_order = at == ks.events.len();
                ks.events.insert(at, Event { t, nums: std::mem::take(&mut nums), distinct });
                ks.latest = ks.latest.max(t);
                if !in_order {
                    ks.aggs = None;
                } else if let Some(aggs) = &mut ks.aggs {
                    if let Some(e) = ks.events.back() {
                        for (a, f) in aggs.iter_mut().zip(&g.features) {
                            a.add(f, e);
                        }
                    }
                } else if ks.events.len() >= self.agg_min_events {
                    let mut aggs: Box<[Agg]> = g.features.iter().map(|_| Agg { start: ks.dropped, ..Agg::default() }).collect();
                    for e in &ks.events {
                        for (a, f) in aggs.iter_mut().zip(&g.features) {
                            a.add(f, e);
                        }
                    }
                    ks.aggs = Some(aggs);
                }
                // Slide each window's start past what left it (as of t = latest).
                if let Some(aggs) = &mut ks.aggs {
                    for (a, f) in aggs.iter_mut().zip(&g.features) {
                        let from = t.saturating_sub(f.window_ns);
                        while let Some(e) = ks.events.get((a.start - ks.dropped) as usize).filter(|e| e.t <= from) {
                            a.remove(f, e);
                            a.start += 1;
                        }
                    }
                }
                let horizon = ks.latest.saturating_sub(self.longest_ns);
                while ks.events.front().is_some_and(|e| e.t <= horizon) || ks.events.len() > self.max_events {
                    if let (Some(e), Some(aggs)) = (ks.events.front(), &mut ks.aggs) {
                        // Still inside a window only when the cap pushes it out.
                        for (a, f) in aggs.iter_mut().zip(&g.features) {
                            if a.start == ks.dropped {
                                a.remove(f, e);
                                a.start += 1;
                            }
                        }
                    }
                    ks.events.pop_front();
                    ks.dropped += 1;
                }
            }
            for (fi, f) in g.features.iter().enumerate() {
                if !late
                    && let Some(aggs) = &ks.aggs
                    && !matches!(f.kind, Kind::Min | Kind::Max)
                {
                    out.push(Feature { name: f.name.clone(), value: aggs[fi].value(f.kind) });
                    continue;
                }
                let from = t.saturating_sub(f.window_ns);
                let lo = ks.events.partition_point(|e| e.t <= from);
                let hi = ks.events.partition_point(|e| e.t <= t);
                let window = ks.events.range(lo..hi);
                let mut value = match f.kind {
                    Kind::Count => (hi - lo) as f64,
                    Kind::Sum => window.map(|e| f.num.map_or(0.0, |n| finite_or_zero(e.nums[n]))).sum(),
                    Kind::Min | Kind::Max => {
                        let own = if late { f.num.map_or(f64::NAN, |n| nums[n]) } else { f64::NAN };
                        // A late event is not stored: it takes part in its own window.
                        let stored = extreme(f.kind, f.num.unwrap_or(0), window);
                        match (stored, own.is_finite()) {
                            (Some(v), true) if f.kind == Kind::Min => v.min(own),
                            (Some(v), true) => v.max(own),
                            (Some(v), false) => v,
                            (None, true) => own,
                            (None, false) => 0.0,
                        }
                    }
                    Kind::Distinct => {
                        let d = f.distinct.unwrap_or(0);
                        seen.clear();
                        seen.extend(window.map(|e| e.distinct[d]).filter(|h| *h != ABSENT));
                        seen.sort_unstable();
                        seen.dedup();
                        seen.len() as f64
                    }
                };
                if late {
                    // A late event is not stored; count it in its own features anyway.
                    let own = f.num.map_or(f64::NAN, |n| nums[n]);
                    value = match f.kind {
                        Kind::Count => value + 1.0,
                        Kind::Sum => value + finite_or_zero(own),
                        Kind::Min | Kind::Max => value, // with its own value above
                        Kind::Distinct => value.max(1.0),
                    };
                }
                out.push(Feature { name: f.name.clone(), value });
            }
        }
    }
}

impl VelocityState {
    /// Counters.
    pub fn stats(&self) -> VelocityStats {
        VelocityStats {
            keys: self.maps.iter().flat_map(|m| m.iter()).map(|s| s.lock().len()).sum(),
            evictions: self.evictions.load(Ordering::Relaxed),
            late: self.late.load(Ordering::Relaxed),
            updates: self.updates.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: i64 = 1_000_000_000;

    fn spec(extra: &str) -> VelocitySpec {
        VelocitySpec::from_toml(
            &format!(
                r#"{extra}
[[feature]]
name = "user_tx_1m"
kind = "count"
key = "user"
window = "1m"
[[feature]]
name = "user_amount_1h"
kind = "sum"
key = "user"
field = "amount"
window = "1h"
[[feature]]
name = "user_shops_1h"
kind = "distinct"
key = "user"
field = "shop"
window = "1h"
[[feature]]
name = "device_tx_1h"
kind = "count"
key = "device"
window = "1h"
[[feature]]
name = "user_max_1h"
kind = "max"
key = "user"
field = "amount_minor"
window = "1h"
[[feature]]
name = "user_min_1h"
kind = "min"
key = "user"
field = "amount"
window = "1h"
[[feature]]
name = "pair_tx_1h"
kind = "count"
key = ["user", "shop"]
window = "1h"
"#
            ),
            Path::new("velocity.toml"),
            &crate::tests::schema(),
        )
        .unwrap()
    }

    fn tx(user: &str, shop: &str, t: i64, amount_minor: i64) -> TxState {
        let schema = crate::tests::schema();
        let mut st = crate::rules::tests::tx();
        let mut set = |name: &str, v: Value| st.tx.values[schema.slot(name).unwrap()] = v;
        set("user", Value::Str(user.into()));
        set("shop", Value::Str(shop.into()));
        set("at", Value::Int(t));
        set("amount_minor", Value::Int(amount_minor));
        set("amount", Value::Float(amount_minor as f64 / 100.0));
        st
    }

    fn set_device(st: &mut TxState, device: &str) {
        let slot = crate::tests::schema().slot("device").unwrap();
        st.tx.values[slot] = Value::Str(device.into());
    }

    fn run(spec: &VelocitySpec, state: &VelocityState, st: TxState) -> TxState {
        let mut st = st;
        spec.update(state, &mut st);
        st
    }

    #[test]
    fn windows_include_the_tx_and_exclude_the_boundary() {
        let s = spec("");
        let state = s.new_state();
        let base = 1_000_000 * S;
        run(&s, &state, tx("c", "m1", base, 100));
        run(&s, &state, tx("c", "m2", base + 30 * S, 200));
        let st = run(&s, &state, tx("c", "m1", base + 60 * S, 300));
        // (t − 1m, t]: the first event is exactly 60 s before, so outside the 1m window.
        assert_eq!(st.feature("user_tx_1m"), Some(2.0));
        assert_eq!(st.feature("user_amount_1h"), Some(6.0));
        assert_eq!(st.feature("user_shops_1h"), Some(2.0));
        assert_eq!(st.feature("device_tx_1h"), Some(0.0), "no device: 0");
        assert_eq!(st.feature("user_max_1h"), Some(300.0), "max of amount_minor");
        assert_eq!(st.feature("user_min_1h"), Some(1.0), "min of amount");
        assert_eq!(st.feature("pair_tx_1h"), Some(2.0), "user c at shop m1: this one and the first");
        let other = run(&s, &state, tx("d", "m1", base + 61 * S, 100));
        assert_eq!(other.feature("user_tx_1m"), Some(1.0), "keys are separate");
    }

    #[test]
    fn a_late_event_takes_part_in_its_own_min_and_max() {
        let s = spec("");
        let state = s.new_state();
        let base = 10 * 3600 * S;
        run(&s, &state, tx("c", "m", base, 500));
        let late = run(&s, &state, tx("c", "m", base - 2 * 3600 * S, 20));
        assert_eq!(state.stats().late, 2);
        assert_eq!(late.feature("user_max_1h"), Some(20.0), "its window holds only itself");
        assert_eq!(late.feature("user_min_1h"), Some(0.2));
    }

    #[test]
    fn events_expire_out_of_the_window() {
        let s = spec("");
        let state = s.new_state();
        run(&s, &state, tx("c", "m", 0, 100));
        let st = run(&s, &state, tx("c", "m", 2 * 3600 * S, 100));
        assert_eq!(st.feature("user_amount_1h"), Some(1.0));
        assert_eq!(st.feature("user_tx_1m"), Some(1.0));
    }

    #[test]
    fn out_of_order_events_are_counted_and_late_ones_flagged() {
        let s = spec("");
        let state = s.new_state();
        let base = 10 * 3600 * S;
        run(&s, &state, tx("c", "m", base, 100));
        let st = run(&s, &state, tx("c", "m", base - 10 * S, 100)); // 10 s out of order
        assert_eq!(st.feature("user_tx_1m"), Some(1.0), "counts events ≤ its own time: itself");
        let st = run(&s, &state, tx("c", "m", base + 5 * S, 100));
        assert_eq!(st.feature("user_tx_1m"), Some(3.0), "the out-of-order one was stored");
        let late = run(&s, &state, tx("c", "m", base - 2 * 3600 * S, 100));
        assert_eq!(state.stats().late, 2, "late in each group it is windowed in: user, user–shop");
        assert_eq!(late.feature("user_tx_1m"), Some(1.0), "a late event counts itself only");
        let st = run(&s, &state, tx("c", "m", base + 6 * S, 100));
        assert_eq!(st.feature("user_tx_1m"), Some(4.0), "the late one was not stored");
    }

    #[test]
    fn key_count_is_bounded() {
        let s = spec("max_keys = 640");
        let state = s.new_state();
        for i in 0..20_000 {
            run(&s, &state, tx(&format!("user-{i}"), "m", i * S / 1000, 100));
            assert!(state.stats().keys <= 2 * 640 + 64, "{:?}", state.stats());
        }
        assert!(state.stats().evictions > 0);
        // The device group holds no keys (no device ids); the user and the user–shop
        // groups each ≤ their cap.
        assert!(state.stats().keys <= 2 * (640 + 64), "{:?}", state.stats());
    }

    #[test]
    fn idle_keys_expire_after_the_ttl() {
        let s = spec("key_ttl = \"1h\"");
        let state = s.new_state();
        for i in 0..100 {
            run(&s, &state, tx(&format!("user-{i}"), "m", 0, 100));
        }
        for i in 0..2048 {
            run(&s, &state, tx("busy", "m", 3 * 3600 * S + i, 100));
        }
        assert_eq!(state.stats().keys, 2, "the busy user, in the user and the user–shop groups: {:?}", state.stats());
    }

    #[test]
    fn per_key_events_are_capped() {
        let s = spec("max_events_per_key = 10");
        let state = s.new_state();
        let mut last = tx("c", "m", 0, 1);
        for i in 0..100 {
            last = run(&s, &state, tx("c", "m", i * S / 100, 1));
        }
        assert_eq!(last.feature("user_tx_1m"), Some(10.0), "saturates at the cap");
    }

    #[test]
    fn config_errors_name_the_field() {
        let bad = |text: &str| VelocitySpec::from_toml(text, Path::new("velocity.toml"), &crate::tests::schema()).unwrap_err();
        let e = bad("[[feature]]\nname = \"x\"\nkind = \"count\"\nkey = \"user\"\nwindow = \"soon\"\n");
        assert_eq!(e.field.as_deref(), Some("feature[0].window"), "{e}");
        assert!(e.to_string().contains("velocity.toml:5"), "{e}");
        let e = bad("[[feature]]\nname = \"x\"\nkind = \"distinct\"\nkey = \"user\"\nwindow = \"1m\"\n");
        assert_eq!(e.field.as_deref(), Some("feature[0].field"), "{e}");
        let e = bad("[[feature]]\nname = \"x\"\nkind = \"count\"\nkey = \"user\"\nwindow = \"1m\"\n[[feature]]\nname = \"x\"\nkind = \"count\"\nkey = \"user\"\nwindow = \"1h\"\n");
        assert!(e.to_string().contains("defined twice"), "{e}");
        let e = bad("[[feature]]\nname = \"x\"\nkind = \"average\"\nkey = \"user\"\nwindow = \"1m\"\n");
        assert!(e.to_string().contains("unknown variant `average`"), "{e}");
        let e = bad("[[feature]]\nname = \"x\"\nkind = \"count\"\nkey = [\"user\", \"nobody\"]\nwindow = \"1m\"\n");
        assert!(e.to_string().contains("velocity.toml:4") && e.to_string().contains("unknown field \"nobody\"") && e.field.as_deref() == Some("feature[0].key"), "{e}");
        let e = bad("[[feature]]\nname = \"x\"\nkind = \"sum\"\nkey = \"user\"\nfield = \"shop\"\nwindow = \"1m\"\n");
        assert!(e.to_string().contains("needs a numeric field") && e.field.as_deref() == Some("feature[0].field"), "{e}");
        let e = bad("[[feature]]\nname = \"a\"\nkind = \"sum\"\nkey = \"user\"\nfield = \"amount\"\nwindow = \"1m\"\n[[feature]]\nname = \"b\"\nkind = \"sum\"\nkey = \"user\"\nfield = \"shop\"\nwindow = \"1m\"\n");
        assert!(e.to_string().contains("velocity.toml:11:") && e.field.as_deref() == Some("feature[1].field"), "the second feature's own line: {e}");
        let e = bad("[[feature]]\nname = \"x\"\nkind = \"max\"\nkey = \"user\"\nwindow = \"1m\"\n");
        assert_eq!(e.field.as_deref(), Some("feature[0].field"), "{e}");
        let e = bad("[[feature]]\nname = \"x\"\nkind = \"count\"\nkey = \"attrs\"\nwindow = \"1m\"\n");
        assert!(e.to_string().contains("map field"), "{e}");
        let e = VelocitySpec::from_toml("restore = \"a while\"\n[[feature]]\nname = \"x\"\nkind = \"count\"\nkey = \"user\"\nwindow = \"1m\"\n", Path::new("velocity.toml"), &crate::tests::schema()).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("restore"), "{e}");
        assert!(e.to_string().contains("velocity.toml:1") && e.to_string().contains("\"off\""), "{e}");
    }

    #[test]
    fn the_restore_window_defaults_to_the_longest_window_and_can_be_shortened_or_turned_off() {
        assert_eq!(spec("").restore_window(), Duration::from_secs(3600));
        assert_eq!(spec("restore = \"10m\"").restore_window(), Duration::from_secs(600));
        assert_eq!(spec("restore = \"off\"").restore_window(), Duration::ZERO);
        assert_eq!(spec("").restore_max_records(), 10_000_000);
        assert_eq!(spec("restore_max_records = 5").restore_max_records(), 5);
    }

    proptest::proptest! {
        /// The running aggregates give exactly what a scan of the window gives, under
        /// in-order, out-of-order, late and capped sequences (small cap, short windows,
        /// a few keys and merchants so that windows fill, slide and overflow).
        #[test]
        fn running_aggregates_equal_a_scan_of_the_window(
            steps in proptest::collection::vec((0u8..3, 0u8..5, -90i64..120, 1i64..5000, proptest::bool::ANY), 1..300)
        ) {
            let mut scan = spec("max_events_per_key = 24");
            let mut agg = scan.clone();
            scan.agg_min_events = usize::MAX;
            agg.agg_min_events = 1;
            let (s1, s2) = (scan.new_state(), agg.new_state());
            let mut t = 1_000_000 * S;
            for (card, merchant, dt, amount, device) in steps {
                // Mostly forward in time; negative steps are out-of-order events, and
                // every ~tenth step jumps far back (late) or far ahead (expiry).
                let jump = match dt {
                    -90..=-86 => -2 * 3600 * S,
                    115.. => 3600 * S,
                    _ => dt * S,
                };
                let mut x = tx(&format!("c{card}"), &format!("m{merchant}"), t + jump, amount);
                if jump > 0 {
                    t += jump;
                }
                if device {
                    set_device(&mut x, &format!("d{merchant}"));
                }
                let a = run(&scan, &s1, x.clone());
                let b = run(&agg, &s2, x);
                proptest::prop_assert_eq!(a.features.len(), b.features.len());
                for (fa, fb) in a.features.iter().zip(&b.features) {
                    proptest::prop_assert_eq!(&fa.name, &fb.name);
                    proptest::prop_assert!((fa.value - fb.value).abs() < 1e-6, "{}: scan {} vs aggregate {}", fa.name, fa.value, fb.value);
                }
            }
        }
    }
}
