//! The PostgreSQL store, for production: several stage replicas write one table.
//!
//! Driver: `postgres` (the synchronous face of `tokio-postgres`, rust-postgres'
//! well-kept driver): the writer is one thread with one connection, so an async
//! pool would buy nothing. A batch is one `INSERT … SELECT FROM unnest(arrays) ON
//! CONFLICT DO UPDATE`: one round trip for up to [`crate::BATCH`] records, not one per
//! record. The connection is made lazily and made again after any error, so a
//! database that is down when a stage starts, or goes away mid-run, costs the
//! stage nothing: batches wait in the writer (and the queue before it) until it
//! answers.

use std::str::FromStr;
use std::time::Duration;

use postgres::{Client, Config, NoTls};

use crate::{Arg, BoxError, Query, ReadStore, Store, TrailRecord, WriteError, decode_json, where_clause};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS trail (
    tx_id text PRIMARY KEY,
    key text NOT NULL,
    outcome text,
    score double precision,
    rules_version text NOT NULL,
    model_version text NOT NULL,
    created_at bigint NOT NULL,
    recorded_at bigint NOT NULL,
    retried boolean NOT NULL,
    dlq_stage text,
    dlq_error text,
    hits jsonb NOT NULL,
    features jsonb NOT NULL,
    hops jsonb NOT NULL
);
CREATE INDEX IF NOT EXISTS trail_by_outcome ON trail (outcome, created_at);
CREATE INDEX IF NOT EXISTS trail_by_key ON trail (key, created_at);
CREATE INDEX IF NOT EXISTS trail_by_time ON trail (created_at);
CREATE INDEX IF NOT EXISTS trail_by_hit ON trail USING gin (hits jsonb_path_ops);
";

const UPSERT: &str = "
INSERT INTO trail (tx_id, key, outcome, score, rules_version, model_version, created_at, recorded_at, retried, dlq_stage, dlq_error, hits, features, hops)
SELECT tx_id, key, outcome, score, rules_version, model_version, created_at, recorded_at, retried, dlq_stage, dlq_error, hits::jsonb, features::jsonb, hops::jsonb
FROM unnest($1::text[], $2::text[], $3::text[], $4::float8[], $5::text[], $6::text[], $7::int8[], $8::int8[], $9::bool[], $10::text[], $11::text[], $12::text[], $13::text[], $14::text[])
  AS u(tx_id, key, outcome, score, rules_version, model_version, created_at, recorded_at, retried, dlq_stage, dlq_error, hits, features, hops)
ON CONFLICT (tx_id) DO UPDATE SET
  key = EXCLUDED.key, outcome = EXCLUDED.outcome, score = EXCLUDED.score,
  rules_version = EXCLUDED.rules_version, model_version = EXCLUDED.model_version,
  created_at = EXCLUDED.created_at, recorded_at = EXCLUDED.recorded_at, retried = EXCLUDED.retried,
  dlq_stage = EXCLUDED.dlq_stage, dlq_error = EXCLUDED.dlq_error,
  hits = EXCLUDED.hits, features = EXCLUDED.features, hops = EXCLUDED.hops
";

/// How long a connection attempt may take: the writer's thread waits it, not a stage.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Parses a `postgres://` URL (or key=value string), so a typo is an error at load.
pub(crate) fn config(url: &str) -> Result<Config, BoxError> {
    let mut c = Config::from_str(url)?;
    if c.get_connect_timeout().is_none() {
        c.connect_timeout(CONNECT_TIMEOUT);
    }
    if c.get_application_name().is_none() {
        c.application_name("actio-trail");
    }
    // A connection that went half-open (failover, partition) fails in seconds, not
    // at the kernel's TCP timeout, and no statement waits longer than a batch may.
    c.keepalives(true).tcp_user_timeout(STATEMENT_TIMEOUT);
    if c.get_options().is_none() {
        c.options(&format!("-c statement_timeout={}", STATEMENT_TIMEOUT.as_millis()));
    }
    Ok(c)
}

/// Longest a statement (a batch's upsert, a read) may run.
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(10);

/// Connects; a writer creates the table if it is missing (only then, so a role
/// that may write rows but not create tables works), a reader never does.
fn connect(config: &Config, create: bool) -> Result<Client, BoxError> {
    let mut client = config.connect(NoTls)?;
    let exists: bool = client.query_one("SELECT to_regclass('trail') IS NOT NULL", &[])?.try_get(0)?;
    if !exists {
        if !create {
            return Err("no trail table in this database (a service started with --trail creates it)".into());
        }
        // Replicas starting together race on CREATE … IF NOT EXISTS (a unique
        // violation in the catalogue); the loser's retry finds the table.
        if let Err(e) = client.batch_execute(SCHEMA) {
            tracing::debug!(error = %e, "trail: creating the schema raced another writer; retrying once");
            client.batch_execute(SCHEMA)?;
        }
    }
    Ok(client)
}

/// PostgreSQL stores no NUL in text or jsonb: without this, one record holding
/// one would make its batch fail forever.
fn no_nul(s: &str) -> std::borrow::Cow<'_, str> {
    if s.contains('\0') || s.contains("\\u0000") { s.replace('\0', "").replace("\\u0000", "").into() } else { s.into() }
}

/// A refusal of the data itself (SQLSTATE class 22, data exception; 23, integrity;
/// 42, syntax or access) fails the same on every retry; anything else (connection,
/// shutdown, timeout) may pass later.
fn classify(e: postgres::Error) -> WriteError {
    let refused = e.code().map(|c| matches!(&c.code()[..2], "22" | "23" | "42")).unwrap_or(false);
    if refused { WriteError::Refused(e.into()) } else { WriteError::Unavailable(e.into()) }
}

/// Writes batches into PostgreSQL, connecting when it must.
pub(crate) struct PostgresStore {
    config: Config,
    client: Option<Client>,
}

impl PostgresStore {
    pub(crate) fn new(config: Config) -> Self {
        PostgresStore { config, client: None }
    }
}

impl Store for PostgresStore {
    fn write(&mut self, batch: &mut Vec<TrailRecord>) -> Result<(), WriteError> {
        if self.client.is_none() {
            self.client = Some(connect(&self.config, true)?);
        }
        let Some(client) = self.client.as_mut() else { return Err("not connected".into()) };
        // ON CONFLICT may not touch a row twice in one statement: keep each
        // transaction's last record of the batch (a redelivery replaces the first).
        let mut last = std::collections::HashMap::with_capacity(batch.len());
        for (i, r) in batch.iter().enumerate() {
            last.insert(r.tx_id.as_str(), i);
        }
        let mut keep: Vec<usize> = last.into_values().collect();
        keep.sort_unstable();
        let rows: Vec<&TrailRecord> = keep.into_iter().map(|i| &batch[i]).collect();
        let json: Vec<_> = rows.iter().map(|r| r.json_columns()).collect();
        let col = |f: fn(&TrailRecord) -> &str| rows.iter().map(|r| no_nul(f(r))).collect::<Vec<_>>();
        let tx_id = col(|r| &r.tx_id);
        let key = col(|r| &r.key);
        let outcome: Vec<Option<std::borrow::Cow<'_, str>>> = rows.iter().map(|r| r.outcome.as_deref().map(no_nul)).collect();
        let score: Vec<Option<f64>> = rows.iter().map(|r| r.score).collect();
        let rules = col(|r| &r.rules_version);
        let model = col(|r| &r.model_version);
        let created: Vec<i64> = rows.iter().map(|r| r.created_at_ns).collect();
        let recorded: Vec<i64> = rows.iter().map(|r| r.recorded_at_ns).collect();
        let retried: Vec<bool> = rows.iter().map(|r| r.retried).collect();
        let dlq_stage: Vec<Option<std::borrow::Cow<'_, str>>> = rows.iter().map(|r| r.dead_letter.as_ref().map(|d| no_nul(&d.stage))).collect();
        let dlq_error: Vec<Option<std::borrow::Cow<'_, str>>> = rows.iter().map(|r| r.dead_letter.as_ref().map(|d| no_nul(&d.error))).collect();
        let hits: Vec<_> = json.iter().map(|j| no_nul(&j.hits)).collect();
        let features: Vec<_> = json.iter().map(|j| no_nul(&j.features)).collect();
        let hops: Vec<_> = json.iter().map(|j| no_nul(&j.hops)).collect();
        let result = client.execute(
            UPSERT,
            &[&tx_id, &key, &outcome, &score, &rules, &model, &created, &recorded, &retried, &dlq_stage, &dlq_error, &hits, &features, &hops],
        );
        if let Err(e) = result {
            let e = classify(e);
            if matches!(e, WriteError::Unavailable(_)) {
                // The connection may be what broke: the next try starts on a fresh one.
                self.client = None;
            }
            return Err(e);
        }
        Ok(())
    }
}

/// Reads the PostgreSQL trail.
pub(crate) struct PostgresReader(Client);

impl PostgresReader {
    pub(crate) fn open(config: &Config) -> Result<Self, BoxError> {
        Ok(PostgresReader(connect(config, false)?))
    }
}

const SELECT: &str = "SELECT tx_id, key, outcome, score, rules_version, model_version, created_at, recorded_at, retried, dlq_stage, dlq_error, hits::text, features::text, hops::text FROM trail";
const RULE_HIT: &str = "hits @> jsonb_build_array(jsonb_build_object('rule', {}::text))";

impl ReadStore for PostgresReader {
    fn count(&mut self, q: &Query) -> Result<u64, BoxError> {
        let (clause, args) = where_clause(q, |i| format!("${i}"), RULE_HIT);
        let params = params(args);
        let refs: Vec<&(dyn postgres::types::ToSql + Sync)> = params.iter().map(|p| p.as_ref()).collect();
        Ok(self.0.query_one(&format!("SELECT COUNT(*) FROM trail {clause}"), &refs)?.try_get::<_, i64>(0)? as u64)
    }

    fn get(&mut self, tx_id: &str) -> Result<Option<TrailRecord>, BoxError> {
        Ok(self.0.query_opt(&format!("{SELECT} WHERE tx_id = $1"), &[&tx_id])?.map(|r| row(&r)).transpose()?)
    }

    fn query(&mut self, q: &Query) -> Result<Vec<TrailRecord>, BoxError> {
        let (clause, args) = where_clause(q, |i| format!("${i}"), RULE_HIT);
        let sql = format!("{SELECT} {clause} ORDER BY created_at DESC LIMIT {}", q.limit.max(1));
        let params = params(args);
        let refs: Vec<&(dyn postgres::types::ToSql + Sync)> = params.iter().map(|p| p.as_ref()).collect();
        Ok(self.0.query(&sql, &refs)?.iter().map(row).collect::<Result<_, _>>()?)
    }
}

fn params(args: Vec<Arg>) -> Vec<Box<dyn postgres::types::ToSql + Sync>> {
    args.into_iter()
        .map(|a| -> Box<dyn postgres::types::ToSql + Sync> {
            match a {
                Arg::Text(s) => Box::new(s),
                Arg::Int(i) => Box::new(i),
            }
        })
        .collect()
}

fn row(r: &postgres::Row) -> Result<TrailRecord, postgres::Error> {
    let dlq_stage: Option<String> = r.try_get(9)?;
    let dlq_error: Option<String> = r.try_get(10)?;
    Ok(TrailRecord {
        tx_id: r.try_get(0)?,
        key: r.try_get(1)?,
        outcome: r.try_get(2)?,
        score: r.try_get(3)?,
        rules_version: r.try_get(4)?,
        model_version: r.try_get(5)?,
        created_at_ns: r.try_get(6)?,
        recorded_at_ns: r.try_get(7)?,
        retried: r.try_get(8)?,
        dead_letter: dlq_stage.map(|stage| crate::DeadLetter { stage, error: dlq_error.unwrap_or_default() }),
        hits: decode_json(r.try_get::<_, &str>(11)?),
        features: decode_json(r.try_get::<_, &str>(12)?),
        hops: decode_json(r.try_get::<_, &str>(13)?),
    })
}
