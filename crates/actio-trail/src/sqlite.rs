//! The SQLite store: a file, nothing to install (`rusqlite` with the library
//! bundled) — the embedded default, `trail.db` beside a run's report.

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, params};

use crate::{BoxError, Query, ReadStore, Store, TrailRecord, WriteError, decode_json, where_clause};

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

pub(crate) fn open(path: &Path) -> rusqlite::Result<Connection> {
    let c = Connection::open(path)?;
    c.busy_timeout(Duration::from_secs(5))?;
    c.execute_batch(SCHEMA)?;
    Ok(c)
}

/// Writes batches into one SQLite file.
pub(crate) struct SqliteStore(pub(crate) Connection);

impl Store for SqliteStore {
    fn write(&mut self, batch: &mut Vec<TrailRecord>) -> Result<(), WriteError> {
        let t = self.0.transaction()?;
        {
            // One statement per transaction (hits, features and hops as JSON columns):
            // a row per hit cost the writer's thread twice the CPU, which the stages on
            // the same cores felt in their tail.
            let mut put = t.prepare_cached(
                "INSERT OR REPLACE INTO trail (tx_id, key, outcome, score, rules_version, model_version, created_at, recorded_at, retried, dlq_stage, dlq_error, hits, features, hops)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
            )?;
            for r in batch {
                let j = r.json_columns();
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
                    j.hits,
                    j.features,
                    j.hops
                ])?;
            }
        }
        Ok(t.commit()?)
    }
}

/// Reads one SQLite file.
pub(crate) struct SqliteReader {
    conn: Connection,
}

impl SqliteReader {
    pub(crate) fn open(path: &Path) -> Result<Self, BoxError> {
        if !path.is_file() {
            return Err("no such file".into());
        }
        Ok(SqliteReader { conn: open(path)? })
    }
}

const SELECT: &str = "SELECT tx_id, key, outcome, score, rules_version, model_version, created_at, recorded_at, retried, dlq_stage, dlq_error, hits, features, hops FROM trail";
const RULE_HIT: &str = "EXISTS (SELECT 1 FROM json_each(trail.hits) WHERE json_extract(json_each.value, '$.rule') = {})";

impl ReadStore for SqliteReader {
    fn count(&mut self, q: &Query) -> Result<u64, BoxError> {
        let (clause, args) = where_clause(q, |i| format!("?{i}"), RULE_HIT);
        Ok(self.conn.query_row(&format!("SELECT COUNT(*) FROM trail {clause}"), rusqlite::params_from_iter(values(args)), |r| r.get::<_, i64>(0))? as u64)
    }

    fn get(&mut self, tx_id: &str) -> Result<Option<TrailRecord>, BoxError> {
        Ok(self.conn.query_row(&format!("{SELECT} WHERE tx_id = ?1"), params![tx_id], row).optional()?)
    }

    fn query(&mut self, q: &Query) -> Result<Vec<TrailRecord>, BoxError> {
        let (clause, args) = where_clause(q, |i| format!("?{i}"), RULE_HIT);
        let sql = format!("{SELECT} {clause} ORDER BY created_at DESC LIMIT {}", q.limit.max(1));
        let mut stmt = self.conn.prepare(&sql)?;
        let rows = stmt.query_map(rusqlite::params_from_iter(values(args)), row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

fn values(args: Vec<crate::Arg>) -> Vec<rusqlite::types::Value> {
    args.into_iter()
        .map(|a| match a {
            crate::Arg::Text(s) => s.into(),
            crate::Arg::Int(i) => i.into(),
        })
        .collect()
}

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<TrailRecord> {
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
        dead_letter: dlq_stage.map(|stage| crate::DeadLetter { stage, error: dlq_error.unwrap_or_default() }),
        hits: decode_json(&r.get::<_, String>(11)?),
        features: decode_json(&r.get::<_, String>(12)?),
        hops: decode_json(&r.get::<_, String>(13)?),
    })
}
