//! The decision trail: what each transaction's evaluation was — the stages it
//! passed with their times, the rules that fired (shadow ones too), its features,
//! score and outcome, the rule and model versions, whether it went through a retry
//! topic, and its dead-letter event if it had one — stored in a real database and
//! read back by transaction or by query.
//!
//! Never on the latency path: a stage hands a [`TrailRecord`] to a [`TrailWriter`],
//! which only queues it (a bounded channel, a few hundred ns); the writer's own thread
//! writes queued records in batches, one database transaction each. When the queue is
//! full (the database is slow or gone) the record is dropped and counted, never
//! waited for: decisions never slow down, and the shortfall shows in
//! [`TrailStats::dropped`]. A batch the database refuses is kept and written again
//! once it answers, so a database that comes back catches up with what fit the queue.
//!
//! One record per transaction (its id is the key): a redelivered transaction
//! replaces its earlier record, so at-least-once delivery leaves no duplicates here.
//!
//! Stores ([`Location`]): SQLite, a file (the embedded default — `actio run` writes
//! `trail.db` beside its report), and PostgreSQL (`postgres://…`), for production,
//! where every replica of the deciding stage writes one table. Both keep the same
//! columns, hits / features / hops as JSON, and answer the same [`Query`].

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError, bounded};
use serde::{Deserialize, Serialize};

pub mod diff;
mod postgres;
mod sqlite;

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Records queued at most (the rest are dropped and counted).
pub const DEFAULT_CAPACITY: usize = 100_000;
/// Most records per database transaction. Batches are written every
/// [`BATCH_WAIT`]: small and often, since the writer shares the cores with the
/// stages (50 ms batches doubled the embedded p99; 5 ms ones cost a third of that).
pub const BATCH: usize = 2_000;
/// How long a batch may wait to fill.
pub const BATCH_WAIT: Duration = Duration::from_millis(5);
/// Pause before a refused batch is written again.
pub const RETRY_PAUSE: Duration = Duration::from_millis(500);

/// One transaction's evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrailRecord {
    /// The transaction's id.
    pub tx_id: String,
    /// Its message key.
    pub key: String,
    /// Its outcome (`None`: it was dead-lettered before a decision).
    pub outcome: Option<String>,
    /// The model's score.
    pub score: Option<f64>,
    /// The rule sets that evaluated it, `stage@version` joined by `+`.
    pub rules_version: String,
    /// The model that scored it.
    pub model_version: String,
    /// Its event time, ns since the epoch.
    pub created_at_ns: i64,
    /// When the record was made (decided or dead-lettered), ns since the epoch.
    pub recorded_at_ns: i64,
    /// The rules that fired, in evaluation order.
    pub hits: Vec<Hit>,
    /// The features computed for it.
    pub features: Vec<(String, f64)>,
    /// The stages it passed, from its trail header.
    pub hops: Vec<Hop>,
    /// Whether it went through a retry topic.
    pub retried: bool,
    /// Its dead-letter event, if it had one.
    pub dead_letter: Option<DeadLetter>,
}

/// A rule that fired.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hit {
    /// The rule's id.
    pub rule: String,
    /// A shadow rule's hit (it changed nothing).
    pub shadow: bool,
}

/// One stage a transaction passed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hop {
    /// The stage.
    pub stage: String,
    /// Consumed at, ns since the epoch.
    pub consumed_ns: i64,
    /// Its output produced at, ns since the epoch.
    pub produced_ns: i64,
}

/// A transaction sent to the dead-letter topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// The stage that gave up on it.
    pub stage: String,
    /// Why.
    pub error: String,
}

/// Where a trail is kept: a SQLite file, or a PostgreSQL database.
#[derive(Clone, PartialEq, Eq)]
pub enum Location {
    /// A SQLite database file.
    Sqlite(PathBuf),
    /// A PostgreSQL connection URL (`postgres://user@host:port/db`).
    Postgres(String),
    /// This process's memory ([`TrailWriter::collecting`]).
    Memory,
}

impl Location {
    /// `postgres://…` or `postgresql://…` is PostgreSQL; anything else a file path.
    pub fn parse(s: &str) -> Location {
        if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            Location::Postgres(s.to_string())
        } else {
            Location::Sqlite(PathBuf::from(s))
        }
    }
}

impl std::fmt::Display for Location {
    /// The file, or the URL with its password hidden (it goes into logs).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::Sqlite(p) => write!(f, "{}", p.display()),
            Location::Memory => f.write_str("memory"),
            Location::Postgres(url) => f.write_str(&redact(url)),
        }
    }
}

impl std::fmt::Debug for Location {
    /// As shown, password hidden: a Debug print of a config must not leak it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Location({self})")
    }
}

/// `url` with the password of its user-info and of a `password=` parameter hidden.
fn redact(url: &str) -> String {
    let mut out = match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s && url[s + 3..at].contains(':') => {
            let user_end = s + 3 + url[s + 3..at].find(':').unwrap_or(0);
            format!("{}:***{}", &url[..user_end], &url[at..])
        }
        _ => url.to_string(),
    };
    if let Some(i) = out.find("password=") {
        let end = out[i..].find('&').map_or(out.len(), |e| i + e);
        out.replace_range(i + "password=".len()..end, "***");
    }
    out
}

/// A trail that cannot be opened or read.
#[derive(Debug, thiserror::Error)]
#[error("trail database {location}: {source}")]
pub struct TrailError {
    /// Where (password hidden).
    pub location: String,
    /// What the database said.
    #[source]
    pub source: BoxError,
}

impl TrailError {
    fn at(location: &Location, source: impl Into<BoxError>) -> Self {
        TrailError { location: location.to_string(), source: source.into() }
    }
}

/// What the writer did so far.
#[derive(Debug, Default)]
pub struct TrailStats {
    /// Records written.
    pub written: AtomicU64,
    /// Records dropped because the queue was full.
    pub dropped: AtomicU64,
    /// Batches the database refused (each written again later).
    pub failed_batches: AtomicU64,
    /// Records queued, not yet written.
    pub queued: AtomicU64,
    /// Records the database refused for what they hold (not for being away), each
    /// written alone and then given up on; counted in `dropped` too.
    pub rejected: AtomicU64,
    /// Set when the writer is closing: a database that does not answer then is
    /// waited for [`SHUTDOWN_WAIT`] at most.
    closing: std::sync::atomic::AtomicBool,
}

/// A database the writer's thread writes batches into.
pub(crate) trait Store: Send {
    /// Writes `batch` in one database transaction, replacing earlier records of
    /// the same transactions. On success the store may have taken the records out
    /// (the memory store keeps them without a copy); on an error `batch` is as it
    /// was, to be written again.
    fn write(&mut self, batch: &mut Vec<TrailRecord>) -> Result<(), WriteError>;
}

/// Why a batch was not written.
pub(crate) enum WriteError {
    /// The database is away or busy: keep the batch and try again.
    Unavailable(BoxError),
    /// The database refused what the batch holds (a value it cannot store): trying
    /// the same again fails the same way.
    Refused(BoxError),
}

impl std::fmt::Display for WriteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WriteError::Unavailable(e) | WriteError::Refused(e) => e.fmt(f),
        }
    }
}

impl<E: Into<BoxError>> From<E> for WriteError {
    fn from(e: E) -> Self {
        WriteError::Unavailable(e.into())
    }
}

/// Queues records and writes them on its own thread; see the crate docs.
#[derive(Debug)]
pub struct TrailWriter {
    tx: Option<Sender<TrailRecord>>,
    stats: Arc<TrailStats>,
    thread: Option<JoinHandle<()>>,
    location: Location,
}

impl TrailWriter {
    /// A writer to `location`, queueing at most `capacity` records. A SQLite file is
    /// created with its tables if missing (an error here if it cannot be); a
    /// PostgreSQL URL is checked here and connected to by the writer's thread, which
    /// keeps trying while the database does not answer (the stage starts anyway).
    pub fn open(location: &Location, capacity: usize) -> Result<Self, TrailError> {
        let store: Box<dyn Store> = match location {
            Location::Sqlite(path) => Box::new(sqlite::SqliteStore(sqlite::open(path).map_err(|e| TrailError::at(location, e))?)),
            Location::Postgres(url) => Box::new(postgres::PostgresStore::new(postgres::config(url).map_err(|e| TrailError::at(location, e))?)),
            Location::Memory => return Err(TrailError::at(location, "a memory trail is made by TrailWriter::collecting, which hands back its records")),
        };
        Self::start(store, location, capacity)
    }

    /// A writer that keeps its records in memory, by transaction id (a
    /// transaction's last record wins, as in the databases): what `actio replay`
    /// compares with the recorded trail.
    pub fn collecting(capacity: usize) -> Result<(Self, Collected), TrailError> {
        let collected = Collected::default();
        Ok((Self::start(Box::new(MemoryStore(collected.clone())), &Location::Memory, capacity)?, collected))
    }

    fn start(store: Box<dyn Store>, location: &Location, capacity: usize) -> Result<Self, TrailError> {
        let (tx, rx) = bounded(capacity.max(1));
        let stats = Arc::new(TrailStats::default());
        let thread = {
            let stats = stats.clone();
            let shown = location.to_string();
            std::thread::Builder::new()
                .name("trail-writer".into())
                .spawn(move || write_loop(store, &rx, &stats, &shown))
                .map_err(|e| TrailError::at(location, e))?
        };
        Ok(TrailWriter { tx: Some(tx), stats, thread: Some(thread), location: location.clone() })
    }

    /// Queues `record`; drops it (counted) if the queue is full. Never blocks.
    pub fn record(&self, record: TrailRecord) {
        let Some(tx) = &self.tx else { return };
        // Counted before the send: the writer may take and write it at once.
        self.stats.queued.fetch_add(1, Ordering::Relaxed);
        match tx.try_send(record) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.stats.queued.fetch_sub(1, Ordering::Relaxed);
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// What it did so far.
    pub fn stats(&self) -> &TrailStats {
        &self.stats
    }

    /// Where it writes.
    pub fn location(&self) -> &Location {
        &self.location
    }

    /// Writes what is queued and stops; returns (written, dropped). Of a shared
    /// writer, call it once the last other holder has let go (`Arc::try_unwrap`).
    pub fn close(mut self) -> (u64, u64) {
        self.stats.closing.store(true, Ordering::Relaxed);
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        (self.stats.written.load(Ordering::Relaxed), self.stats.dropped.load(Ordering::Relaxed))
    }
}

impl TrailWriter {
    /// Closes a shared writer once every other holder has let go (a stage's
    /// handlers, after it stopped), waiting at most `within` for them; `None` if one
    /// still holds it then (its records are written when that one drops it).
    pub fn close_shared(mut shared: Arc<Self>, within: Duration) -> Option<(u64, u64)> {
        let t0 = Instant::now();
        loop {
            match Arc::try_unwrap(shared) {
                Ok(w) => return Some(w.close()),
                Err(still) if t0.elapsed() < within => {
                    shared = still;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(_) => return None,
            }
        }
    }
}

impl Drop for TrailWriter {
    fn drop(&mut self) {
        self.stats.closing.store(true, Ordering::Relaxed);
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Records a [`TrailWriter::collecting`] kept, by transaction id.
pub type Collected = Arc<std::sync::Mutex<std::collections::HashMap<String, TrailRecord>>>;

struct MemoryStore(Collected);

impl Store for MemoryStore {
    fn write(&mut self, batch: &mut Vec<TrailRecord>) -> Result<(), WriteError> {
        let mut kept = self.0.lock().map_err(|_| "the collected records' lock was poisoned")?;
        kept.reserve(batch.len());
        for r in batch.drain(..) {
            kept.insert(r.tx_id.clone(), r);
        }
        Ok(())
    }
}

/// Once closing, how long a database that does not answer is waited for before
/// what is left is dropped and counted (within k8s' default grace period).
pub const SHUTDOWN_WAIT: Duration = Duration::from_secs(10);

fn write_loop(mut store: Box<dyn Store>, rx: &Receiver<TrailRecord>, stats: &TrailStats, location: &str) {
    let mut batch: Vec<TrailRecord> = Vec::with_capacity(BATCH);
    let mut open = true;
    let mut failing_since: Option<Instant> = None;
    let mut closing_since: Option<Instant> = None;
    let done = |n: usize, written: bool| {
        stats.queued.fetch_sub(n as u64, Ordering::Relaxed);
        let c = if written { &stats.written } else { &stats.dropped };
        c.fetch_add(n as u64, Ordering::Relaxed);
    };
    while open || !batch.is_empty() {
        if open && batch.len() < BATCH {
            let deadline = Instant::now() + BATCH_WAIT;
            while batch.len() < BATCH {
                match rx.recv_deadline(deadline) {
                    Ok(r) => batch.push(r),
                    Err(RecvTimeoutError::Timeout) => break,
                    Err(RecvTimeoutError::Disconnected) => {
                        open = false;
                        break;
                    }
                }
            }
        }
        if batch.is_empty() {
            continue;
        }
        let n = batch.len();
        match store.write(&mut batch) {
            Ok(()) => {
                done(n, true);
                batch.clear();
                if let Some(t) = failing_since.take() {
                    tracing::info!(trail = location, after = ?t.elapsed(), "trail: the database answers again; catching up");
                }
            }
            Err(WriteError::Refused(e)) => {
                // Something in the batch cannot be stored: write each record alone,
                // so one bad record costs only itself.
                tracing::warn!(trail = location, error = %e, records = batch.len(), "trail: the database refused a batch; writing its records one by one");
                for r in std::mem::take(&mut batch) {
                    let mut one = vec![r];
                    match store.write(&mut one) {
                        Ok(()) => done(1, true),
                        Err(e) => {
                            stats.rejected.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(trail = location, tx_id = %one[0].tx_id, error = %e, "trail: record dropped, the database refused it");
                            done(1, false);
                        }
                    }
                }
            }
            Err(WriteError::Unavailable(e)) => {
                // Kept and written again: a database that is back catches up.
                stats.failed_batches.fetch_add(1, Ordering::Relaxed);
                if failing_since.is_none() {
                    failing_since = Some(Instant::now());
                    tracing::warn!(trail = location, error = %e, records = batch.len(), "trail: writing a batch failed; keeping it and retrying (decisions are not slowed; records past the queue are dropped and counted)");
                }
                if stats.closing.load(Ordering::Relaxed) {
                    let since = *closing_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= SHUTDOWN_WAIT {
                        // Closing, and the database is still away: what is left goes
                        // uncounted as written, counted as dropped.
                        let left = batch.len() + rx.try_iter().count();
                        tracing::error!(trail = location, records = left, "trail: the database did not answer at shutdown; dropping what was left");
                        done(left, false);
                        return;
                    }
                }
                std::thread::sleep(RETRY_PAUSE);
            }
        }
    }
}

/// The JSON columns of a record.
pub(crate) struct JsonColumns {
    pub hits: String,
    pub features: String,
    pub hops: String,
}

impl TrailRecord {
    pub(crate) fn json_columns(&self) -> JsonColumns {
        JsonColumns {
            hits: serde_json::to_string(&self.hits).unwrap_or_default(),
            features: serde_json::to_string(&self.features).unwrap_or_default(),
            hops: serde_json::to_string(&self.hops).unwrap_or_default(),
        }
    }
}

/// A JSON column back (a column some other program mangled reads as empty).
pub(crate) fn decode_json<T: serde::de::DeserializeOwned + Default>(s: &str) -> T {
    serde_json::from_str(s).unwrap_or_default()
}

/// What to look for in a trail ([`TrailReader::query`]); every field narrows.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Query {
    /// This outcome (`"dead_letter"`: the dead-lettered ones).
    pub outcome: Option<String>,
    /// A rule that fired (active or shadow).
    pub rule: Option<String>,
    /// This message key.
    pub key: Option<String>,
    /// Event time at or after, ns since the epoch.
    pub since_ns: Option<i64>,
    /// Event time before, ns since the epoch.
    pub until_ns: Option<i64>,
    /// At most this many, newest first.
    pub limit: usize,
}

/// A bound argument of a query.
pub(crate) enum Arg {
    Text(String),
    Int(i64),
}

/// The `WHERE` clause of `q` and its arguments, with `placeholder(n)` for the n-th
/// (1-based) argument and `rule_hit` the store's test of a hit (`{}`: the rule's
/// placeholder): the one place both stores' filters are spelled.
pub(crate) fn where_clause(q: &Query, placeholder: impl Fn(usize) -> String, rule_hit: &str) -> (String, Vec<Arg>) {
    let mut sql = String::from("WHERE 1 = 1");
    let mut args = Vec::new();
    let bind = |a: Arg, args: &mut Vec<Arg>| {
        args.push(a);
        placeholder(args.len())
    };
    match q.outcome.as_deref() {
        Some("dead_letter") => sql.push_str(" AND dlq_stage IS NOT NULL"),
        Some(o) => sql.push_str(&format!(" AND outcome = {}", bind(Arg::Text(o.into()), &mut args))),
        None => {}
    }
    if let Some(rule) = &q.rule {
        let p = bind(Arg::Text(rule.clone()), &mut args);
        sql.push_str(" AND ");
        sql.push_str(&rule_hit.replace("{}", &p));
    }
    if let Some(k) = &q.key {
        sql.push_str(&format!(" AND key = {}", bind(Arg::Text(k.clone()), &mut args)));
    }
    if let Some(t) = q.since_ns {
        sql.push_str(&format!(" AND created_at >= {}", bind(Arg::Int(t), &mut args)));
    }
    if let Some(t) = q.until_ns {
        sql.push_str(&format!(" AND created_at < {}", bind(Arg::Int(t), &mut args)));
    }
    (sql, args)
}

/// A store a [`TrailReader`] reads.
pub(crate) trait ReadStore: Send {
    fn count(&mut self, q: &Query) -> Result<u64, BoxError>;
    fn get(&mut self, tx_id: &str) -> Result<Option<TrailRecord>, BoxError>;
    fn query(&mut self, q: &Query) -> Result<Vec<TrailRecord>, BoxError>;
}

/// Reads a trail.
pub struct TrailReader {
    store: Box<dyn ReadStore>,
    location: Location,
}

impl std::fmt::Debug for TrailReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrailReader").field("location", &self.location.to_string()).finish()
    }
}

impl TrailReader {
    /// Opens the trail at `location` (a SQLite file must exist; a PostgreSQL
    /// database must answer; its table is created if missing).
    pub fn open(location: &Location) -> Result<Self, TrailError> {
        let store: Box<dyn ReadStore> = match location {
            Location::Memory => return Err(TrailError::at(location, "a collected trail is read through its Collected map")),
            Location::Sqlite(path) => Box::new(sqlite::SqliteReader::open(path).map_err(|e| TrailError::at(location, e))?),
            Location::Postgres(url) => {
                let config = postgres::config(url).map_err(|e| TrailError::at(location, e))?;
                Box::new(postgres::PostgresReader::open(&config).map_err(|e| TrailError::at(location, e))?)
            }
        };
        Ok(TrailReader { store, location: location.clone() })
    }

    /// Where it reads.
    pub fn location(&self) -> &Location {
        &self.location
    }

    /// How many transactions it holds.
    pub fn count(&mut self) -> Result<u64, TrailError> {
        self.count_matching(&Query::default())
    }

    /// How many transactions `q` selects (its limit aside).
    pub fn count_matching(&mut self, q: &Query) -> Result<u64, TrailError> {
        self.store.count(q).map_err(|e| TrailError::at(&self.location, e))
    }

    /// One transaction's evaluation.
    pub fn get(&mut self, tx_id: &str) -> Result<Option<TrailRecord>, TrailError> {
        self.store.get(tx_id).map_err(|e| TrailError::at(&self.location, e))
    }

    /// The transactions `q` selects, newest event time first.
    pub fn query(&mut self, q: &Query) -> Result<Vec<TrailRecord>, TrailError> {
        self.store.query(q).map_err(|e| TrailError::at(&self.location, e))
    }

    /// Every transaction created in `[since_ns, until_ns)`, by id.
    pub fn between(&mut self, since_ns: i64, until_ns: i64) -> Result<std::collections::HashMap<String, TrailRecord>, TrailError> {
        let q = Query { since_ns: Some(since_ns), until_ns: Some(until_ns), limit: i64::MAX as usize, ..Query::default() };
        Ok(self.query(&q)?.into_iter().map(|r| (r.tx_id.clone(), r)).collect())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test
mod tests {
    use super::*;

    fn rec(id: &str, outcome: Option<&str>, rules: &[(&str, bool)], t: i64) -> TrailRecord {
        TrailRecord {
            tx_id: id.into(),
            key: format!("k-{}", &id[id.len() - 1..]),
            outcome: outcome.map(str::to_string),
            score: outcome.map(|_| 0.5),
            rules_version: "rules@1".into(),
            model_version: "m1".into(),
            created_at_ns: t,
            recorded_at_ns: t + 10,
            hits: rules.iter().map(|(r, s)| Hit { rule: r.to_string(), shadow: *s }).collect(),
            features: vec![("n".into(), 2.0)],
            hops: vec![Hop { stage: "rules".into(), consumed_ns: t + 1, produced_ns: t + 2 }],
            retried: false,
            dead_letter: outcome.is_none().then(|| DeadLetter { stage: "score".into(), error: "bad".into() }),
        }
    }

    #[test]
    fn passwords_never_show() {
        for url in ["postgres://u:secret@h:5432/db", "postgres://u@h/db?password=secret&sslmode=disable", "postgresql://u:secret@h/db?password=secret"] {
            let l = Location::parse(url);
            assert!(!l.to_string().contains("secret") && !format!("{l:?}").contains("secret"), "{l}");
        }
        assert_eq!(Location::parse("postgres://u:p@h/db").to_string(), "postgres://u:***@h/db");
    }

    #[test]
    fn records_are_written_in_batches_read_back_and_queried() {
        let dir = tempfile::tempdir().unwrap();
        written_read_back_and_queried(&Location::Sqlite(dir.path().join("trail.db")));
    }

    #[test]
    fn postgres_records_are_written_in_batches_read_back_and_queried() {
        let Some(db) = postgres_database("trail_roundtrip") else { return };
        written_read_back_and_queried(&db);
    }

    /// A fresh database on the test server (`scripts/postgres`, whose URL
    /// `scripts/test` exports as ACTIO_POSTGRES_URL).
    pub(crate) fn postgres_database(name: &str) -> Option<Location> {
        let url = actio_testkit::postgres(name)?;
        Some(Location::Postgres(actio_testkit::fresh_database(&url, &format!("{name}_{}", std::process::id()))))
    }

    fn written_read_back_and_queried(location: &Location) {
        let path = location;
        let w = TrailWriter::open(path, 100).unwrap();
        w.record(rec("t1", Some("approve"), &[], 100));
        w.record(rec("t2", Some("decline"), &[("big", false), ("trial", true)], 200));
        w.record(rec("t3", None, &[], 300));
        w.record(rec("t2", Some("decline"), &[("big", false), ("trial", true)], 200)); // redelivered
        assert_eq!(w.close(), (4, 0));
        let mut r = TrailReader::open(path).unwrap();
        assert_eq!(r.count().unwrap(), 3, "one record per transaction");
        assert_eq!(r.get("t2").unwrap().unwrap(), rec("t2", Some("decline"), &[("big", false), ("trial", true)], 200));
        assert_eq!(r.get("nope").unwrap(), None);
        let mut ids = |q: Query| r.query(&Query { limit: 10, ..q }).unwrap().into_iter().map(|t| t.tx_id).collect::<Vec<_>>();
        assert_eq!(ids(Query::default()), ["t3", "t2", "t1"], "newest first");
        assert_eq!(ids(Query { outcome: Some("decline".into()), ..Default::default() }), ["t2"]);
        assert_eq!(ids(Query { outcome: Some("dead_letter".into()), ..Default::default() }), ["t3"]);
        assert_eq!(ids(Query { rule: Some("trial".into()), ..Default::default() }), ["t2"], "shadow hits are queryable");
        assert_eq!(ids(Query { since_ns: Some(150), until_ns: Some(300), ..Default::default() }), ["t2"]);
        assert_eq!(ids(Query { key: Some("k-1".into()), ..Default::default() }), ["t1"]);
        assert_eq!(r.count_matching(&Query { rule: Some("big".into()), ..Default::default() }).unwrap(), 1);
        assert_eq!(r.count_matching(&Query { outcome: Some("approve".into()), ..Default::default() }).unwrap(), 1);
    }

    #[test]
    fn a_full_queue_drops_and_counts_and_never_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trail.db");
        let blocker = sqlite::open(&path).unwrap();
        let w = TrailWriter::open(&Location::Sqlite(path.clone()), 10).unwrap();
        // Another connection holds the write lock: the writer's first batch waits on it.
        blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
        w.record(rec("t-first", Some("approve"), &[], 0));
        std::thread::sleep(BATCH_WAIT * 3);
        let t0 = Instant::now();
        for i in 0..1000 {
            w.record(rec(&format!("t{i}"), Some("approve"), &[], i));
        }
        assert!(t0.elapsed() < Duration::from_millis(500), "recording never waits: {:?}", t0.elapsed());
        assert_eq!(w.stats().dropped.load(Ordering::Relaxed), 990, "the queue holds 10; the rest are counted");
        blocker.execute_batch("COMMIT").unwrap();
        assert_eq!(w.close(), (11, 990), "what fit the queue is written once the database answers");
        assert_eq!(TrailReader::open(&Location::Sqlite(path)).unwrap().count().unwrap(), 11);
    }
}
