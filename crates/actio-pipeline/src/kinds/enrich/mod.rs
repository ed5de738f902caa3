//! `enrich`: an HTTP lookup per transaction — the account's risk, the merchant's
//! category — with the answer's fields written into declared fields of the
//! transaction, for the stages after it.
//!
//! ```toml
//! [[stage]]
//! kind = "enrich"
//! url = "http://risk.internal/accounts/{debtor_account}"  # {field}, {header.<name>}, {env.NAME:-default}
//! method = "get"            # or "post", with `body` (a JSON template)
//! timeout_ms = 250          # per call; a timeout is transient
//! concurrency = 64          # calls in flight per stage instance
//! cache_ttl_ms = 60000      # answers cached per URL (and body); 0: no cache
//! on_failure = "continue"   # or "dead_letter" (the default), see below
//! breaker_failures = 20     # this many transient failures in a row open the breaker
//! breaker_open_ms = 5000    # ...which lets no call through for this long
//! [stage.fields]            # declared field = JSON pointer into the answer
//! debtor_risk = "/risk"
//! ```
//!
//! I/O-bound, so it never holds a worker thread: the handler returns at once with a
//! deferred result (`actio_runtime::Deferred`), the call runs on the process's I/O
//! runtime ([`super::io`]) behind a semaphore of `concurrency` permits, and the key's
//! next transaction waits in its lane until this one completes (per-key order
//! holds). What waits is bounded by the stage's in-flight caps: past
//! `max_in_flight_per_partition` / `max_in_flight` the stage stops fetching, so a
//! burst waits in the topic, not in memory. A cached answer needs no call and no
//! deferral.
//!
//! Failures are classified: a timeout, a refused connection, 5xx and 429 are
//! transient — retried in place with the stage's `retry_attempts` and doubling
//! `retry_backoff_ms` (asynchronously: no thread sleeps), then the stage's retry
//! topic if it has one, else the DLQ; any other 4xx, an answer that is not JSON, or
//! a value of the wrong type for its field is permanent (DLQ at once). A pointer the
//! answer lacks leaves an optional field absent and fails a required one.
//!
//! A lookup is often an aid to the decision, not a condition of it: with
//! `on_failure = "continue"` a transaction whose lookup failed (after its in-place
//! attempts, or at once when permanent) goes on with the stage's fields absent —
//! they must be optional, checked at load — and is counted
//! (`actio_enrich_continued_total`); the rules after it decide without them. A
//! circuit breaker (`breaker_failures`, off by default) keeps a dead API from costing
//! every transaction its timeouts and retries: after that many transient failures in a
//! row no call is made for `breaker_open_ms`, and each transaction fails at once as
//! transient (so, per `on_failure`, it continues or takes the retry topic / DLQ path);
//! then one probe call goes through, and its failure opens it again (its success, or
//! any success, closes it). Why both: with
//! `actio run` on a laptop, or an API outage in production, decisions go on at full
//! rate instead of queueing behind 3 × `timeout_ms` per transaction.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use actio_core::schema::{FieldType, Value};
use actio_core::TxState;
use actio_runtime::{HandlerCounter, HandlerError, RetryPolicy};
use ahash::AHashMap;
use parking_lot::Mutex;
use serde::Deserialize;

use super::template::{Escape, Template};
use super::{Kind, Later, Logic, Produced, ResolveCx, RunCx, StageLogic, Writes};

#[cfg(test)]
mod tests;

/// The kind.
pub static KIND: Kind = Kind { name: "enrich", writes: Writes::Transactions, resolve };

/// Default: per-call timeout, ms.
pub const DEFAULT_TIMEOUT_MS: u64 = 1000;
/// Default: calls in flight per stage instance.
pub const DEFAULT_CONCURRENCY: usize = 64;
/// Default: cache time to live, ms (0: no cache).
pub const DEFAULT_CACHE_TTL_MS: u64 = 0;
/// Default: most cached answers.
pub const DEFAULT_CACHE_MAX_ENTRIES: usize = 100_000;
/// Default: how long an open breaker lets no call through, ms.
pub const DEFAULT_BREAKER_OPEN_MS: u64 = 5000;

/// Calls made (each attempt).
pub const CALLS: &str = "actio_enrich_calls_total";
/// Answers taken from the cache.
pub const CACHE_HITS: &str = "actio_enrich_cache_hits_total";
/// Calls retried in place after a transient failure.
pub const RETRIES: &str = "actio_enrich_retries_total";
/// Transactions that failed after their attempts (to the retry topic or the DLQ).
pub const FAILED: &str = "actio_enrich_failed_total";
/// Transactions passed on without their answer (`on_failure = "continue"`).
pub const CONTINUED: &str = "actio_enrich_continued_total";
/// Times the breaker opened.
pub const BREAKER_OPENED: &str = "actio_enrich_breaker_opened_total";
/// Transactions failed at once, with no call, because the breaker was open.
pub const SHORT_CIRCUITED: &str = "actio_enrich_short_circuited_total";

/// The HTTP method.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// GET (the default).
    #[default]
    Get,
    /// POST, with `body`.
    Post,
}

/// What a transaction whose lookup failed does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFailure {
    /// Fail it: transient failures take the retry topic (if any), then the DLQ.
    #[default]
    DeadLetter,
    /// Pass it on without the answer (the stage's fields absent).
    Continue,
}

/// An `enrich` stage's own fields.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrichConfig {
    /// The URL, a template: `{field}`, `{header.<name>}` (percent-encoded).
    pub url: String,
    /// GET or POST.
    #[serde(default)]
    pub method: Method,
    /// POST only: the JSON body, a template (values JSON-escaped).
    pub body: Option<String>,
    /// Per-call timeout, ms (default [`DEFAULT_TIMEOUT_MS`]).
    pub timeout_ms: Option<u64>,
    /// Calls in flight per stage instance (default [`DEFAULT_CONCURRENCY`]).
    pub concurrency: Option<usize>,
    /// Cache time to live, ms (default [`DEFAULT_CACHE_TTL_MS`]: none).
    pub cache_ttl_ms: Option<u64>,
    /// Most cached answers (default [`DEFAULT_CACHE_MAX_ENTRIES`]).
    pub cache_max_entries: Option<usize>,
    /// What a failed lookup does (default: dead-letter it).
    #[serde(default)]
    pub on_failure: OnFailure,
    /// Transient failures in a row that open the breaker (default: no breaker).
    pub breaker_failures: Option<u32>,
    /// How long an open breaker lets no call through, ms (default
    /// [`DEFAULT_BREAKER_OPEN_MS`]).
    pub breaker_open_ms: Option<u64>,
    /// Declared field ← JSON pointer into the answer (`[stage.fields]`).
    pub fields: BTreeMap<String, String>,
}

/// Where an answer's value goes.
#[derive(Debug, Clone)]
struct Target {
    field: String,
    slot: usize,
    ty: FieldType,
    optional: bool,
    pointer: String,
    values: Arc<[String]>,
}

fn resolve(cx: &mut ResolveCx<'_>) -> Option<Arc<dyn Logic>> {
    let c: EnrichConfig = cx.config()?;
    let mut ok = true;
    let url = Template::parse(&c.url, cx.schema, cx.env).map_err(|e| cx.error("url", e)).ok();
    if let Some(u) = &url {
        let head = u.head();
        if !(head.starts_with("http://") || head.starts_with("https://")) || head.len() <= "https://".len() {
            let read = if head == u.source().split('{').next().unwrap_or("") { String::new() } else { format!(" (it begins {head:?} once its {{env.…}} are read)") };
            cx.error("url", format!("expected an http:// or https:// URL with a host before any {{field}} or {{header.…}}, not {:?}{read}", u.source()));
            ok = false;
        }
    }
    let body = match (&c.body, c.method) {
        (Some(_), Method::Get) => {
            cx.error("body", "only with method = \"post\"");
            ok = false;
            None
        }
        (Some(b), Method::Post) => Template::parse(b, cx.schema, cx.env).map_err(|e| cx.error("body", e)).ok(),
        (None, _) => None,
    };
    let timeout_ms = c.timeout_ms.unwrap_or(DEFAULT_TIMEOUT_MS);
    if !(1..=60_000).contains(&timeout_ms) {
        cx.error("timeout_ms", "expected 1..=60000 ms");
        ok = false;
    }
    let concurrency = c.concurrency.unwrap_or(DEFAULT_CONCURRENCY);
    if !(1..=10_000).contains(&concurrency) {
        cx.error("concurrency", "expected 1..=10000 calls in flight");
        ok = false;
    }
    if c.fields.is_empty() {
        cx.error("fields", "expected at least one `field = \"/json/pointer\"` in [stage.fields]: what the answer gives the transaction");
        ok = false;
    }
    let mut targets = Vec::new();
    for (field, pointer) in &c.fields {
        let Some(slot) = cx.schema.slot(field) else {
            cx.error(&format!("fields.{field}"), format!("unknown field {field:?}; declare it in schema.toml (the schema declares: {})", cx.schema.names()));
            ok = false;
            continue;
        };
        let f = cx.schema.field(slot);
        if f.derived.is_some() || matches!(f.ty, FieldType::Map | FieldType::Timestamp) {
            cx.error(&format!("fields.{field}"), format!("field {field:?} is a {}{}: enrich writes raw string, int, float, bool or enum fields", f.ty.as_str(), if f.derived.is_some() { " (derived)" } else { "" }));
            ok = false;
        }
        if !(pointer.is_empty() || pointer.starts_with('/')) {
            cx.error(&format!("fields.{field}"), format!("expected a JSON pointer (\"/risk\", \"/account/segment\"), not {pointer:?}"));
            ok = false;
        }
        if c.on_failure == OnFailure::Continue && !f.optional {
            cx.error(&format!("fields.{field}"), format!("on_failure = \"continue\" passes a transaction on without the answer, so {field:?} must be optional (optional = true in schema.toml)"));
            ok = false;
        }
        targets.push(Target { field: field.clone(), slot, ty: f.ty, optional: f.optional, pointer: pointer.clone(), values: f.values.clone() });
    }
    let breaker_failures = c.breaker_failures.unwrap_or(0);
    let breaker_open_ms = c.breaker_open_ms.unwrap_or(DEFAULT_BREAKER_OPEN_MS);
    if c.breaker_open_ms.is_some() && breaker_failures == 0 {
        cx.error("breaker_open_ms", "only with breaker_failures (the transient failures in a row that open the breaker)");
        ok = false;
    }
    if c.breaker_failures == Some(0) {
        cx.error("breaker_failures", "expected 1 or more transient failures in a row (leave it out for no breaker)");
        ok = false;
    }
    if !(1..=600_000).contains(&breaker_open_ms) {
        cx.error("breaker_open_ms", "expected 1..=600000 ms");
        ok = false;
    }
    let (Some(url), true) = (url, ok) else { return None };
    let client = match reqwest::Client::builder().timeout(Duration::from_millis(timeout_ms)).pool_max_idle_per_host(concurrency).build() {
        Ok(c) => c,
        Err(e) => {
            cx.error("url", format!("cannot build the HTTP client: {e}"));
            return None;
        }
    };
    Some(Arc::new(Enrich {
        url,
        method: c.method,
        body,
        timeout: Duration::from_millis(timeout_ms),
        permits: Arc::new(tokio::sync::Semaphore::new(concurrency)),
        concurrency,
        cache: Arc::new(Cache::new(Duration::from_millis(c.cache_ttl_ms.unwrap_or(DEFAULT_CACHE_TTL_MS)), c.cache_max_entries.unwrap_or(DEFAULT_CACHE_MAX_ENTRIES))),
        targets: Arc::new(targets),
        client,
        counts: Arc::new(Counts::default()),
        on_failure: c.on_failure,
        breaker: Arc::new(Breaker::new(breaker_failures, Duration::from_millis(breaker_open_ms))),
    }))
}

/// A compiled `enrich` stage.
#[derive(Debug)]
pub struct Enrich {
    url: Template,
    method: Method,
    body: Option<Template>,
    timeout: Duration,
    permits: Arc<tokio::sync::Semaphore>,
    concurrency: usize,
    cache: Arc<Cache>,
    targets: Arc<Vec<Target>>,
    client: reqwest::Client,
    counts: Arc<Counts>,
    on_failure: OnFailure,
    breaker: Arc<Breaker>,
}

#[derive(Debug, Default)]
struct Counts {
    calls: AtomicU64,
    hits: AtomicU64,
    retries: AtomicU64,
    failed: AtomicU64,
    continued: AtomicU64,
    short_circuited: AtomicU64,
}

/// Trips after `threshold` transient failures in a row (0: never), then lets no call
/// through for `open_for`. After that one call goes through as a probe while the
/// others still fail at once: its success closes the breaker, its failure opens it
/// for another `open_for`. Any success closes it (the API answered). Times are from a
/// monotonic clock.
#[derive(Debug)]
struct Breaker {
    threshold: u32,
    open_for: Duration,
    base: Instant,
    failures: AtomicU32,
    /// Until when it is open, ns since `base`.
    open_until_ns: AtomicI64,
    /// When the probe call started, ns since `base` (0: none). A probe older than
    /// `open_for` is taken as abandoned (its transaction went away with a revoked
    /// partition, say), so a lost probe cannot hold the breaker half open.
    probe_ns: AtomicI64,
    opened: AtomicU64,
}

/// What the breaker says to a call about to be made.
enum Gate {
    /// Make it (the breaker is closed, or this is the probe).
    Call,
    /// Do not: fail at once, with this reason.
    Refused(String),
}

impl Breaker {
    fn new(threshold: u32, open_for: Duration) -> Self {
        Breaker { threshold, open_for, base: Instant::now(), failures: AtomicU32::new(0), open_until_ns: AtomicI64::new(0), probe_ns: AtomicI64::new(0), opened: AtomicU64::new(0) }
    }

    fn now_ns(&self) -> i64 {
        self.base.elapsed().as_nanos() as i64
    }

    /// Whether it is open (not half open): a transaction can be refused before it
    /// waits for a permit. Claims nothing.
    fn open(&self) -> bool {
        self.threshold > 0 && self.failures.load(Ordering::Relaxed) >= self.threshold && self.open_until_ns.load(Ordering::Relaxed) > self.now_ns()
    }

    /// Before each call, with its permit held: whether to make it. Half open, the
    /// first caller becomes the probe.
    fn gate(&self, url: &str) -> Gate {
        if self.threshold == 0 || self.failures.load(Ordering::Relaxed) < self.threshold {
            return Gate::Call;
        }
        let now = self.now_ns().max(1);
        let left = self.open_until_ns.load(Ordering::Relaxed) - now;
        if left > 0 {
            return Gate::Refused(format!("enrich: {url}: not called, the breaker is open for {} ms more (after {} transient failures in a row)", left / 1_000_000, self.threshold));
        }
        let probe = self.probe_ns.load(Ordering::Relaxed);
        let abandoned = probe != 0 && now - probe > self.open_for.as_nanos() as i64;
        if (probe == 0 || abandoned) && self.probe_ns.compare_exchange(probe, now, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
            return Gate::Call;
        }
        Gate::Refused(format!("enrich: {url}: not called, the breaker is half open and one probe call is under way"))
    }

    fn succeeded(&self) {
        if self.threshold > 0 {
            self.failures.store(0, Ordering::Relaxed);
            self.probe_ns.store(0, Ordering::Release);
        }
    }

    fn failed(&self, url: &str) {
        if self.threshold == 0 {
            return;
        }
        let n = self.failures.fetch_add(1, Ordering::Relaxed).saturating_add(1);
        let probe_failed = self.probe_ns.swap(0, Ordering::AcqRel) != 0;
        // Open on the trip itself or on a failed probe; calls that were already in
        // flight when it opened do not stretch the window.
        if n == self.threshold || probe_failed {
            self.open_until_ns.store(self.now_ns() + self.open_for.as_nanos() as i64, Ordering::Relaxed);
            self.opened.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(url, failures = n, open_ms = self.open_for.as_millis() as u64, "enrich: breaker open, no calls until it closes");
        }
    }
}

/// Answers by request, for a while: `(when, the values for the targets)`.
#[derive(Debug)]
struct Cache {
    ttl: Duration,
    max: usize,
    entries: Mutex<AHashMap<String, (Instant, Vec<Value>)>>,
}

impl Cache {
    fn new(ttl: Duration, max: usize) -> Self {
        Cache { ttl, max: max.max(1), entries: Mutex::new(AHashMap::new()) }
    }

    fn get(&self, key: &str) -> Option<Vec<Value>> {
        if self.ttl.is_zero() {
            return None;
        }
        let e = self.entries.lock();
        e.get(key).filter(|(at, _)| at.elapsed() < self.ttl).map(|(_, v)| v.clone())
    }

    fn put(&self, key: String, values: Vec<Value>) {
        if self.ttl.is_zero() {
            return;
        }
        let mut e = self.entries.lock();
        if e.len() >= self.max {
            let ttl = self.ttl;
            e.retain(|_, (at, _)| at.elapsed() < ttl);
            if e.len() >= self.max {
                e.clear(); // all fresh and full: start over rather than grow
            }
        }
        e.insert(key, (Instant::now(), values));
    }
}

impl Enrich {
    /// The values of the targets in `answer`.
    fn values(targets: &[Target], answer: &serde_json::Value) -> Result<Vec<Value>, HandlerError> {
        targets
            .iter()
            .map(|t| {
                let v = answer.pointer(&t.pointer);
                let wrong = |v: &serde_json::Value| HandlerError::permanent(format!("enrich: the answer's {} ({v}) does not fit field {:?}, a {}", t.pointer, t.field, t.ty.as_str()));
                Ok(match (v, t.ty) {
                    (None | Some(serde_json::Value::Null), _) if t.optional => Value::Null,
                    (None | Some(serde_json::Value::Null), _) => {
                        return Err(HandlerError::permanent(format!("enrich: the answer has no {} for the required field {:?}", t.pointer, t.field)));
                    }
                    (Some(serde_json::Value::String(s)), FieldType::String) => Value::Str(s.clone()),
                    (Some(serde_json::Value::String(s)), FieldType::Enum) => match t.values.iter().position(|x| x == s) {
                        Some(i) => Value::Enum(i as u32),
                        None => return Err(wrong(v.unwrap_or(&serde_json::Value::Null))),
                    },
                    (Some(serde_json::Value::Bool(b)), FieldType::Bool) => Value::Bool(*b),
                    (Some(n @ serde_json::Value::Number(_)), FieldType::Float) => Value::Float(n.as_f64().ok_or_else(|| wrong(n))?),
                    (Some(n @ serde_json::Value::Number(_)), FieldType::Int) => Value::Int(n.as_i64().ok_or_else(|| wrong(n))?),
                    (Some(other), _) => return Err(wrong(other)),
                })
            })
            .collect()
    }

    /// A call the breaker refused (`why`): counted, then failed as transient.
    fn refused(on_failure: OnFailure, counts: &Counts, targets: &[Target], st: TxState, why: String) -> Result<TxState, HandlerError> {
        counts.short_circuited.fetch_add(1, Ordering::Relaxed);
        Self::failed(on_failure, counts, targets, st, HandlerError::transient(why))
    }

    /// A lookup that failed with `e`: the transaction goes on without the answer
    /// (`on_failure = "continue"`), or fails.
    fn failed(on_failure: OnFailure, counts: &Counts, targets: &[Target], mut st: TxState, e: HandlerError) -> Result<TxState, HandlerError> {
        match on_failure {
            OnFailure::Continue => {
                counts.continued.fetch_add(1, Ordering::Relaxed);
                Self::apply(targets, &mut st, vec![Value::Null; targets.len()]);
                Ok(st)
            }
            OnFailure::DeadLetter => {
                counts.failed.fetch_add(1, Ordering::Relaxed);
                Err(e)
            }
        }
    }

    fn apply(targets: &[Target], st: &mut TxState, values: Vec<Value>) {
        for (t, v) in targets.iter().zip(values) {
            if let Some(slot) = st.tx.values.get_mut(t.slot) {
                *slot = v;
            }
        }
    }
}

/// One call: the answer as JSON, or a classified failure.
async fn call(client: &reqwest::Client, method: Method, url: &str, body: Option<&str>, timeout: Duration) -> Result<serde_json::Value, HandlerError> {
    let req = match (method, body) {
        (Method::Get, _) => client.get(url),
        (Method::Post, b) => client.post(url).header("content-type", "application/json").body(b.unwrap_or("{}").to_string()),
    };
    // A timeout, a refused connection, a reset: another attempt may get through.
    let failed = |e: reqwest::Error| {
        if e.is_timeout() {
            HandlerError::transient(format!("enrich: {url}: no answer within {} ms", timeout.as_millis()))
        } else {
            HandlerError::transient(format!("enrich: {url}: {e}"))
        }
    };
    let resp = req.send().await.map_err(failed)?;
    let status = resp.status();
    if status.is_server_error() || status.as_u16() == 429 {
        return Err(HandlerError::transient(format!("enrich: {url}: HTTP {status}")));
    }
    if !status.is_success() {
        return Err(HandlerError::permanent(format!("enrich: {url}: HTTP {status}")));
    }
    let bytes = resp.bytes().await.map_err(failed)?;
    serde_json::from_slice(&bytes).map_err(|e| HandlerError::permanent(format!("enrich: {url}: the answer is not JSON: {e}")))
}

impl StageLogic for Enrich {
    type State = ();

    fn describe(&self) -> Vec<String> {
        let fields: Vec<String> = self.targets.iter().map(|t| format!("{} ← {}", t.field, t.pointer)).collect();
        let cache = if self.cache.ttl.is_zero() { "no cache".to_string() } else { format!("answers cached {} ms", self.cache.ttl.as_millis()) };
        vec![
            format!("{} {}: {}", if self.method == Method::Get { "GET" } else { "POST" }, self.url.source(), fields.join(", ")),
            format!(
                "timeout {} ms, {} calls in flight, {cache}; timeouts and 5xx retried, 4xx {}{}",
                self.timeout.as_millis(),
                self.concurrency,
                match self.on_failure {
                    OnFailure::DeadLetter => "dead-lettered",
                    OnFailure::Continue => "and exhausted retries pass the transaction on without the answer",
                },
                match self.breaker.threshold {
                    0 => String::new(),
                    n => format!("; breaker opens after {n} transient failures in a row, for {} ms", self.breaker.open_for.as_millis()),
                }
            ),
        ]
    }

    fn is_async(&self) -> bool {
        true
    }

    fn new_state(&self) {}

    fn run(&self, _: &(), mut st: TxState, cx: &RunCx<'_>) -> Result<Produced, HandlerError> {
        let bad = |e: String| HandlerError::permanent(format!("enrich: {e}"));
        let url = self.url.render(&st, cx.schema, cx.headers, Escape::Url).map_err(bad)?;
        let body = match &self.body {
            Some(b) => Some(b.render(&st, cx.schema, cx.headers, Escape::Json).map_err(bad)?),
            None => None,
        };
        let key = match &body {
            Some(b) => format!("{url}\n{b}"),
            None => url.clone(),
        };
        if let Some(values) = self.cache.get(&key) {
            self.counts.hits.fetch_add(1, Ordering::Relaxed);
            Self::apply(&self.targets, &mut st, values);
            return Ok(Produced::Tx(st));
        }
        if self.breaker.open()
            && let Gate::Refused(why) = self.breaker.gate(&url)
        {
            return Ok(match Self::refused(self.on_failure, &self.counts, &self.targets, st, why) {
                // Passed on: no call, no deferral.
                Ok(st) => Produced::Tx(st),
                // Failed: as a completed deferral, so the runtime does not retry it in
                // place (with a thread's sleep) but sends it on to the retry topic or
                // the DLQ, once.
                Err(e) => Produced::Later(Later(Box::pin(std::future::ready(Err(e))))),
            });
        }
        let (client, permits, cache, targets, counts, breaker) = (self.client.clone(), self.permits.clone(), self.cache.clone(), self.targets.clone(), self.counts.clone(), self.breaker.clone());
        let (method, timeout, policy, on_failure): (Method, Duration, RetryPolicy, OnFailure) = (self.method, self.timeout, cx.retry.clone(), self.on_failure);
        Ok(Produced::Later(Later(Box::pin(async move {
            let _permit = permits.acquire_owned().await.map_err(|_| HandlerError::permanent("enrich: the stage is shutting down"))?;
            let mut backoff = policy.backoff;
            let mut attempt = 1;
            let answer = loop {
                // Checked with the permit held: a burst waits for permits while the
                // first calls fail, and what waited is refused once the breaker opens.
                if let Gate::Refused(why) = breaker.gate(&url) {
                    return Self::refused(on_failure, &counts, &targets, st, why);
                }
                counts.calls.fetch_add(1, Ordering::Relaxed);
                match call(&client, method, &url, body.as_deref(), timeout).await {
                    Ok(a) => {
                        breaker.succeeded();
                        break a;
                    }
                    Err(e) if e.kind == actio_runtime::FailureKind::Transient => {
                        breaker.failed(&url);
                        if attempt >= policy.attempts {
                            return Self::failed(on_failure, &counts, &targets, st, e);
                        }
                        counts.retries.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(policy.max_backoff);
                        attempt += 1;
                    }
                    Err(e) => {
                        breaker.succeeded(); // the API answered: it is up
                        return Self::failed(on_failure, &counts, &targets, st, e);
                    }
                }
            };
            match Self::values(&targets, &answer) {
                Ok(values) => {
                    cache.put(key, values.clone());
                    Self::apply(&targets, &mut st, values);
                    Ok(st)
                }
                Err(e) => Self::failed(on_failure, &counts, &targets, st, e),
            }
        }))))
    }

    fn counters(&self) -> Vec<HandlerCounter> {
        let c = &self.counts;
        vec![
            HandlerCounter::new(CALLS, "HTTP calls an enrich stage made (each attempt).", c.calls.load(Ordering::Relaxed)),
            HandlerCounter::new(CACHE_HITS, "Transactions an enrich stage answered from its cache.", c.hits.load(Ordering::Relaxed)),
            HandlerCounter::new(RETRIES, "Calls an enrich stage retried in place after a transient failure.", c.retries.load(Ordering::Relaxed)),
            HandlerCounter::new(FAILED, "Transactions an enrich stage failed after their attempts (to the retry topic or the DLQ).", c.failed.load(Ordering::Relaxed)),
            HandlerCounter::new(CONTINUED, "Transactions an enrich stage passed on without their answer (on_failure = continue).", c.continued.load(Ordering::Relaxed)),
            HandlerCounter::new(BREAKER_OPENED, "Times an enrich stage's breaker opened after transient failures in a row.", self.breaker.opened.load(Ordering::Relaxed)),
            HandlerCounter::new(SHORT_CIRCUITED, "Transactions an enrich stage failed at once, with no call, while its breaker was open.", c.short_circuited.load(Ordering::Relaxed)),
        ]
    }
}
