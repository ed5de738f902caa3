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
//! Backend: SQLite (`rusqlite`, with the library bundled: nothing to install), the
//! embedded default — `actio run` writes `trail.db` beside its report.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError, bounded};
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};

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

/// A trail that cannot be opened or read.
#[derive(Debug, thiserror::Error)]
#[error("trail database {path}: {source}")]
pub struct TrailError {
    /// The database file.
    pub path: PathBuf,
    /// What SQLite said.
    #[source]
    pub source: rusqlite::Error,
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
}

/// Queues records and writes them on its own thread; see the crate docs.
#[derive(Debug)]
pub struct TrailWriter {
    tx: Option<Sender<TrailRecord>>,
    stats: Arc<TrailStats>,
    thread: Option<JoinHandle<()>>,
    path: PathBuf,
}

const SCHEMA: &str = "
PRAGMA journal_mode = WAL;
PRAGMA synchronous = NORMAL;
CREATE TABLE IF NOT EXISTS trail (
    tx_id TEXT PRIMARY KEY,
    key TEXT NOT NULL,
    outcome TEXT,
    score REAL,
    rules_version TEXT NOT NULL,
    model_version TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    recorded_at INTEGER NOT NULL,
    retried INTEGER NOT NULL,
    dlq_stage TEXT,
    dlq_error TEXT,
    hits TEXT NOT NULL,
    features TEXT NOT NULL,
    hops TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS trail_by_outcome ON trail (outcome, created_at);
CREATE INDEX IF NOT EXISTS trail_by_key ON trail (key, created_at);
CREATE INDEX IF NOT EXISTS trail_by_time ON trail (created_at);
";

fn open(path: &Path) -> Result<Connection, TrailError> {
    let err = |source| TrailError { path: path.to_path_buf(), source };
    let c = Connection::open(path).map_err(err)?;
    c.busy_timeout(Duration::from_secs(5)).map_err(err)?;
    c.execute_batch(SCHEMA).map_err(err)?;
    Ok(c)
}

impl TrailWriter {
    /// A writer to the SQLite database at `path` (created with its tables if
    /// missing), queueing at most `capacity` records.
    pub fn sqlite(path: &Path, capacity: usize) -> Result<Self, TrailError> {
        let conn = open(path)?;
        let (tx, rx) = bounded(capacity.max(1));
        let stats = Arc::new(TrailStats::default());
        let thread = {
            let stats = stats.clone();
            std::thread::Builder::new()
                .name("trail-writer".into())
                .spawn(move || write_loop(conn, &rx, &stats))
                .map_err(|e| TrailError { path: path.to_path_buf(), source: rusqlite::Error::ToSqlConversionFailure(Box::new(e)) })?
        };
        Ok(TrailWriter { tx: Some(tx), stats, thread: Some(thread), path: path.to_path_buf() })
    }

    /// Queues `record`; drops it (counted) if the queue is full. Never blocks.
    pub fn record(&self, record: TrailRecord) {
        let Some(tx) = &self.tx else { return };
        match tx.try_send(record) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// What it did so far.
    pub fn stats(&self) -> &TrailStats {
        &self.stats
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes what is queued and stops; returns (written, dropped). Of a shared
    /// writer, call it once the last other holder has let go (`Arc::try_unwrap`).
    pub fn close(mut self) -> (u64, u64) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        (self.stats.written.load(Ordering::Relaxed), self.stats.dropped.load(Ordering::Relaxed))
    }
}

impl Drop for TrailWriter {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn write_loop(mut conn: Connection, rx: &Receiver<TrailRecord>, stats: &TrailStats) {
    let mut batch: Vec<TrailRecord> = Vec::with_capacity(BATCH);
    let mut open = true;
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
        match write_batch(&mut conn, &batch) {
            Ok(()) => {
                stats.written.fetch_add(batch.len() as u64, Ordering::Relaxed);
                batch.clear();
            }
            Err(e) => {
                // Kept and written again: a database that is back catches up.
                stats.failed_batches.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, records = batch.len(), "trail: writing a batch failed; retrying");
                std::thread::sleep(RETRY_PAUSE);
                if !open && stats.failed_batches.load(Ordering::Relaxed) > 20 {
                    tracing::error!(records = batch.len(), "trail: giving up on the last batch at shutdown");
                    stats.dropped.fetch_add(batch.len() as u64, Ordering::Relaxed);
                    batch.clear();
                }
            }
        }
    }
}

fn write_batch(conn: &mut Connection, batch: &[TrailRecord]) -> rusqlite::Result<()> {
    let t = conn.transaction()?;
    {
        // One statement per transaction (hits, features and hops as JSON columns):
        // a row per hit cost the writer's thread twice the CPU, which the stages on
        // the same cores felt in their tail.
        let mut put = t.prepare_cached(
            "INSERT OR REPLACE INTO trail (tx_id, key, outcome, score, rules_version, model_version, created_at, recorded_at, retried, dlq_stage, dlq_error, hits, features, hops)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
        )?;
        for r in batch {
            let hits = serde_json::to_string(&r.hits).unwrap_or_default();
            let features = serde_json::to_string(&r.features).unwrap_or_default();
            let hops = serde_json::to_string(&r.hops).unwrap_or_default();
            let (dlq_stage, dlq_error) = r.dead_letter.as_ref().map_or((None, None), |d| (Some(&d.stage), Some(&d.error)));
            put.execute(params![
                r.tx_id,
                r.key,
                r.outcome,
                r.score,
                r.rules_version,
                r.model_version,
                r.created_at_ns,
                r.recorded_at_ns,
                r.retried,
                dlq_stage,
                dlq_error,
                hits,
                features,
                hops
            ])?;
        }
    }
    t.commit()
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

/// Reads a trail database.
#[derive(Debug)]
pub struct TrailReader {
    conn: Connection,
    path: PathBuf,
}

impl TrailReader {
    /// Opens the SQLite trail at `path` (which must exist).
    pub fn sqlite(path: &Path) -> Result<Self, TrailError> {
        if !path.is_file() {
            return Err(TrailError { path: path.to_path_buf(), source: rusqlite::Error::InvalidPath(path.to_path_buf()) });
        }
        Ok(TrailReader { conn: open(path)?, path: path.to_path_buf() })
    }

    fn err(&self, source: rusqlite::Error) -> TrailError {
        TrailError { path: self.path.clone(), source }
    }

    /// How many transactions it holds.
    pub fn count(&self) -> Result<u64, TrailError> {
        self.conn.query_row("SELECT COUNT(*) FROM trail", [], |r| r.get::<_, i64>(0)).map(|n| n as u64).map_err(|e| self.err(e))
    }

    /// One transaction's evaluation.
    pub fn get(&self, tx_id: &str) -> Result<Option<TrailRecord>, TrailError> {
        self.conn.query_row(&format!("{SELECT} WHERE tx_id = ?1"), params![tx_id], row).optional().map_err(|e| self.err(e))
    }

    /// The transactions `q` selects, newest event time first.
    pub fn query(&self, q: &Query) -> Result<Vec<TrailRecord>, TrailError> {
        let mut sql = format!("{SELECT} WHERE 1 = 1");
        let mut args: Vec<rusqlite::types::Value> = Vec::new();
        match q.outcome.as_deref() {
            Some("dead_letter") => sql.push_str(" AND dlq_stage IS NOT NULL"),
            Some(o) => {
                args.push(o.to_string().into());
                sql.push_str(&format!(" AND outcome = ?{}", args.len()));
            }
            None => {}
        }
        if let Some(rule) = &q.rule {
            args.push(rule.clone().into());
            sql.push_str(&format!(" AND EXISTS (SELECT 1 FROM json_each(trail.hits) WHERE json_extract(json_each.value, '$.rule') = ?{})", args.len()));
        }
        if let Some(k) = &q.key {
            args.push(k.clone().into());
            sql.push_str(&format!(" AND key = ?{}", args.len()));
        }
        if let Some(t) = q.since_ns {
            args.push(t.into());
            sql.push_str(&format!(" AND created_at >= ?{}", args.len()));
        }
        if let Some(t) = q.until_ns {
            args.push(t.into());
            sql.push_str(&format!(" AND created_at < ?{}", args.len()));
        }
        sql.push_str(&format!(" ORDER BY created_at DESC LIMIT {}", q.limit.max(1)));
        let mut stmt = self.conn.prepare(&sql).map_err(|e| self.err(e))?;
        stmt.query_map(rusqlite::params_from_iter(args), row).map_err(|e| self.err(e))?.collect::<Result<_, _>>().map_err(|e| self.err(e))
    }
}

const SELECT: &str = "SELECT tx_id, key, outcome, score, rules_version, model_version, created_at, recorded_at, retried, dlq_stage, dlq_error, hits, features, hops FROM trail";

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<TrailRecord> {
    let json = |i: usize| -> rusqlite::Result<String> { r.get(i) };
    let hits: String = json(11)?;
    let features: String = json(12)?;
    let hops: String = json(13)?;
    let dlq_stage: Option<String> = r.get(9)?;
    let dlq_error: Option<String> = r.get(10)?;
    Ok(TrailRecord {
        tx_id: r.get(0)?,
        key: r.get(1)?,
        outcome: r.get(2)?,
        score: r.get(3)?,
        rules_version: r.get(4)?,
        model_version: r.get(5)?,
        created_at_ns: r.get(6)?,
        recorded_at_ns: r.get(7)?,
        retried: r.get(8)?,
        dead_letter: dlq_stage.map(|stage| DeadLetter { stage, error: dlq_error.unwrap_or_default() }),
        features: serde_json::from_str(&features).unwrap_or_default(),
        hops: serde_json::from_str(&hops).unwrap_or_default(),
        hits: serde_json::from_str(&hits).unwrap_or_default(),
    })
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
    fn records_are_written_in_batches_read_back_and_queried() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trail.db");
        let w = TrailWriter::sqlite(&path, 100).unwrap();
        w.record(rec("t1", Some("approve"), &[], 100));
        w.record(rec("t2", Some("decline"), &[("big", false), ("trial", true)], 200));
        w.record(rec("t3", None, &[], 300));
        w.record(rec("t2", Some("decline"), &[("big", false), ("trial", true)], 200)); // redelivered
        assert_eq!(w.close(), (4, 0));
        let r = TrailReader::sqlite(&path).unwrap();
        assert_eq!(r.count().unwrap(), 3, "one record per transaction");
        assert_eq!(r.get("t2").unwrap().unwrap(), rec("t2", Some("decline"), &[("big", false), ("trial", true)], 200));
        assert_eq!(r.get("nope").unwrap(), None);
        let ids = |q: Query| r.query(&Query { limit: 10, ..q }).unwrap().into_iter().map(|t| t.tx_id).collect::<Vec<_>>();
        assert_eq!(ids(Query::default()), ["t3", "t2", "t1"], "newest first");
        assert_eq!(ids(Query { outcome: Some("decline".into()), ..Default::default() }), ["t2"]);
        assert_eq!(ids(Query { outcome: Some("dead_letter".into()), ..Default::default() }), ["t3"]);
        assert_eq!(ids(Query { rule: Some("trial".into()), ..Default::default() }), ["t2"], "shadow hits are queryable");
        assert_eq!(ids(Query { since_ns: Some(150), until_ns: Some(300), ..Default::default() }), ["t2"]);
        assert_eq!(ids(Query { key: Some("k-1".into()), ..Default::default() }), ["t1"]);
    }

    #[test]
    fn a_full_queue_drops_and_counts_and_never_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trail.db");
        let blocker = open(&path).unwrap();
        let w = TrailWriter::sqlite(&path, 10).unwrap();
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
        assert_eq!(TrailReader::sqlite(&path).unwrap().count().unwrap(), 11);
    }
}
