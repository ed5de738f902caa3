//! Pipeline services as runtime [`Handler`]s: decode the input, run each stage's
//! logic, encode the output.
//!
//! One handler runs one [`Service`]: a stage, or consecutive stages fused into one
//! (see [`crate::services`]). It knows no stage kind: each stage is a
//! [`crate::kinds::Logic`], run through its [`Runner`] (which holds the stage's
//! per-partition state, [`crate::kinds::state`]). A fused handler decodes the first
//! stage's input once, runs each stage on the same transaction in memory, and
//! encodes the last stage's output; it times each stage (the trail gets one hop per
//! stage, `/metrics` one service histogram per stage), so reports read the same
//! either way. A stage that produces nothing (a `latest` stage dropping a stale
//! update) ends the service's work on the message: no output, the input is done.
//!
//! Ingress topics carry JSON transactions of the pipeline's schema (decoded straight
//! into its slots, every constraint checked and the derived fields computed here,
//! once); internal topics carry [`TxState`] in the topic's codec, checked against the
//! schema's slots on arrival; a stage that writes decisions writes a
//! [`actio_core::Decision`]. Anything undecodable or invalid is a permanent failure:
//! the runtime dead-letters it at once with the reason. Injected faults
//! ([`crate::faults`]) are checked before each stage's logic.
//!
//! Stateful stages rebuild an assigned partition's state from the service's input
//! when the handler was given the bus ([`StageHandler::with_restore`]); see
//! [`crate::kinds::state`].
//!
//! Rule evaluation errors (a rule whose `when` fails on a transaction: it does not
//! fire, the transaction goes on) are counted per service as `actio_rule_errors_total`.

use std::sync::Arc;

use actio_core::bus::{Bus, BusError, Bytes, ReplayRange};
use actio_core::latency::{latency_histogram, record_ns};
use actio_core::time::now_ns;
use actio_core::{Codec, Decision, KeyExtractor, Record, Schema, TopicPartition, TxState, headers};
use actio_engine::derive::DerivedFields;
use actio_runtime::{Context, Deferred, Handler, HandlerCounter, HandlerError, HandlerHistogram, Hold, Output, StageSpec, StepTime};
use ahash::AHashMap;
use hdrhistogram::Histogram;
use parking_lot::Mutex;

use crate::TopicRole;
use crate::kinds::{History, MessageHolds, Produced, RunCx, Runner};
use crate::resolve::{Pipeline, Stage};
use crate::services::Service;

/// A pipeline service (one stage, or several fused), ready to hand to
/// [`actio_runtime::Stage::spawn`].
#[derive(Debug)]
pub struct StageHandler {
    /// The service's name (its trail hop when it runs one stage, its metrics label).
    name: String,
    /// Its consumer group.
    group: String,
    /// Its input: the first stage's.
    input: String,
    /// Its replicas.
    replicas: u32,
    /// Its stages, in chain order.
    steps: Vec<Step>,
    ingress: bool,
    input_codec: Codec,
    encoder: Arc<Encoder>,
    schema: Arc<Schema>,
    derived: Arc<DerivedFields>,
    key: KeyExtractor,
    /// Reads back an input partition's history (see the module docs).
    restore: Option<Restore>,
    /// Where each decision's and dead letter's evaluation is recorded, if anywhere.
    trail: Option<Arc<actio_trail::TrailWriter>>,
}

/// Encodes what a service's last stage produced, for its output topic: shared with
/// the completions of deferred (I/O) stages.
#[derive(Debug)]
struct Encoder {
    output: Arc<str>,
    /// The output topic's codec and role: looked up once, not per message.
    output_target: Option<(Codec, TopicRole)>,
    /// Every declared topic's codec and role: a route stage's targets are chosen per
    /// message.
    topics: AHashMap<Arc<str>, (Codec, TopicRole)>,
    schema: Arc<Schema>,
}

impl Encoder {
    /// The output topic's codec (JSON for one not declared).
    fn output_codec(&self) -> Codec {
        self.output_target.map_or(Codec::Json, |(codec, _)| codec)
    }

    /// `st` as topic `topic` carries transactions: in its codec between stages; at an
    /// egress topic, as the JSON the schema describes (what consumers outside read).
    fn tx(&self, topic: &str, st: &TxState) -> Result<Bytes, actio_core::CodecError> {
        let target = if *topic == *self.output { self.output_target } else { self.topics.get(topic).copied() };
        match target {
            Some((_, TopicRole::Egress)) => Ok(Bytes::from(self.schema.encode_json(&st.tx))),
            Some((codec, _)) => codec.encode(st).map(Bytes::from),
            None => self.output_codec().encode(st).map(Bytes::from),
        }
    }

    /// The outputs of what the service produced (not [`Produced::Later`]).
    fn outputs(&self, produced: Produced, times: Vec<StepTime>) -> Result<Vec<Output>, HandlerError> {
        let cannot = |e: actio_core::CodecError| HandlerError::permanent(format!("cannot encode output: {e}"));
        match produced {
            Produced::Tx(st) => Ok(vec![Output::new(self.output.clone(), self.tx(&self.output, &st).map_err(cannot)?).with_steps(times)]),
            Produced::Decision(ds) => Ok(vec![Output::new(self.output.clone(), Bytes::from(self.output_codec().encode(&ds.0).map_err(cannot)?)).with_steps(times)]),
            Produced::Routed(to, st) => to
                .into_iter()
                .map(|topic| Ok(Output::new(topic.clone(), self.tx(&topic, &st).map_err(cannot)?).with_steps(times.clone())))
                .collect(),
            Produced::Nothing => Ok(Vec::new()),
            Produced::Later(_) => Err(HandlerError::permanent("a deferred result where none belongs (a bug)")),
        }
    }
}

/// One stage of a service.
#[derive(Debug)]
struct Step {
    stage: Stage,
    /// Its name, shared by every trail hop written for it.
    name: Arc<str>,
    /// Its `output` topic.
    output: Arc<str>,
    /// Its logic with this handler's state.
    runner: Box<dyn Runner>,
    /// Time in its logic per message (µs); kept only in a fused service, where the
    /// runtime's service histogram covers all the steps.
    service: Option<Arc<Mutex<Histogram<u64>>>>,
}

/// `(partition, from_ms, max_records, f)`: calls `f` on the partition's records from
/// `from_ms` up to the service group's committed offset, at most the newest
/// `max_records`; returns how many.
struct Restore(Box<RestoreFn>);

type RestoreFn = dyn Fn(&TopicPartition, i64, u64, &mut dyn FnMut(&Record)) -> Result<u64, BusError> + Send + Sync;

impl std::fmt::Debug for Restore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Restore")
    }
}

/// Per rule, evaluations that failed (the rule did not fire; the transaction went on).
pub const RULE_ERRORS: &str = "actio_rule_errors_total";
/// Per rule and mode (`active` / `shadow`), times it fired.
pub const RULE_HITS: &str = "actio_rule_hits_total";
/// Per reloadable file, versions swapped in since start.
pub const RELOADS: &str = "actio_reloads_total";
/// Per reloadable file, reloads that failed (the version in force stayed).
pub const RELOAD_FAILURES: &str = "actio_reload_failures_total";
/// Per reloadable file, 1 while its last reload failed (the file on disk is not the
/// version in force), else 0.
pub const RELOAD_FAILING: &str = "actio_reload_failing";
/// Per reloadable file, 1, labelled with the version in force.
pub const CONFIG_INFO: &str = "actio_config_info";
/// Decision-trail records, by result (`written`, `dropped`: the queue was full).
pub const TRAIL_RECORDS: &str = "actio_trail_records_total";
/// Decision-trail records queued, not yet written.
pub const TRAIL_QUEUED: &str = "actio_trail_queued";
/// Decision-trail batches the database refused (each written again).
pub const TRAIL_FAILED_BATCHES: &str = "actio_trail_failed_batches_total";

impl StageHandler {
    /// The handler of one stage of `pipeline`, alone.
    pub fn new(pipeline: &Pipeline, stage: &Stage) -> Self {
        let i = pipeline.stages.iter().position(|s| s.name == stage.name).unwrap_or(0);
        Self::of_service(pipeline, &Service::alone(stage, i))
    }

    /// The handler of `service` of `pipeline` (one stage, or several fused).
    pub fn of_service(pipeline: &Pipeline, service: &Service) -> Self {
        let stages = service.stages(pipeline);
        let (first, last) = (&stages[0], &stages[stages.len() - 1]);
        let input = pipeline.topic(&first.input);
        let output = pipeline.topic(&last.output);
        let fused = stages.len() > 1;
        StageHandler {
            name: service.name.clone(),
            group: service.group.clone(),
            input: first.input.clone(),
            replicas: service.replicas,
            steps: stages
                .iter()
                .map(|s| Step {
                    name: Arc::from(s.name.as_str()),
                    output: Arc::from(s.output.as_str()),
                    stage: s.clone(),
                    runner: s.logic.clone().runner(),
                    service: fused.then(|| Arc::new(Mutex::new(latency_histogram()))),
                })
                .collect(),
            ingress: input.is_some_and(|t| t.role == TopicRole::Ingress),
            input_codec: input.map_or(Codec::Json, |t| t.codec),
            encoder: Arc::new(Encoder {
                output: Arc::from(last.output.as_str()),
                output_target: output.map(|t| (t.codec, t.role)),
                topics: pipeline.topics.iter().map(|t| (Arc::from(t.name.as_str()), (t.codec, t.role))).collect(),
                schema: pipeline.schema.clone(),
            }),
            schema: pipeline.schema.clone(),
            derived: pipeline.derived.clone(),
            key: pipeline.key.clone(),
            restore: None,
            trail: None,
        }
    }

    /// Records each decision's and each dead letter's evaluation in `trail`.
    pub fn with_trail(mut self, trail: Option<Arc<actio_trail::TrailWriter>>) -> Self {
        self.trail = trail;
        self
    }

    /// The trail record of `record`, decided as `decision` from `st`, or
    /// dead-lettered (`decision` `None`, `dead_letter` the reason), at `now_ns`.
    fn trail_record(&self, record: &Record, decided: Option<(&Decision, &TxState)>, dead_letter: Option<String>, started_ns: i64) -> actio_trail::TrailRecord {
        let hdr = |name: &str| record.headers.get(name).map(|v| String::from_utf8_lossy(v).into_owned());
        let mut hops: Vec<actio_trail::Hop> = record
            .headers
            .get(headers::TRAIL)
            .map(headers::parse_trail)
            .unwrap_or_default()
            .into_iter()
            .map(|h| actio_trail::Hop { stage: h.stage, consumed_ns: h.consumed_ns, produced_ns: h.produced_ns })
            .collect();
        let now = now_ns();
        hops.push(actio_trail::Hop { stage: self.name.clone(), consumed_ns: started_ns, produced_ns: now });
        let (outcome, score, rules_version, model_version, key, created) = match decided {
            Some((d, _)) => (Some(d.decision.clone()), Some(d.score), d.rules_version.clone(), d.model_version.clone(), d.key.clone(), d.created_at),
            None => (
                None,
                None,
                String::new(),
                String::new(),
                record.key.as_ref().map(|k| String::from_utf8_lossy(k).into_owned()).unwrap_or_default(),
                hdr(headers::CREATED).and_then(|c| c.parse().ok()).unwrap_or(0),
            ),
        };
        actio_trail::TrailRecord {
            tx_id: decided.map(|(d, _)| d.tx_id.clone()).or_else(|| hdr(headers::ID)).unwrap_or_default(),
            key,
            outcome,
            score,
            rules_version,
            model_version,
            created_at_ns: created,
            recorded_at_ns: now,
            hits: decided.map(|(_, st)| st.hits.iter().map(|h| actio_trail::Hit { rule: h.id.clone(), shadow: h.shadow }).collect()).unwrap_or_default(),
            features: decided.map(|(_, st)| st.features.iter().map(|f| (f.name.to_string(), f.value)).collect()).unwrap_or_default(),
            hops,
            retried: record.headers.get(headers::RETRIED).is_some(),
            dead_letter: dead_letter.map(|error| actio_trail::DeadLetter { stage: self.name.clone(), error }),
        }
    }

    /// The service's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Replicas to deploy.
    pub fn replicas(&self) -> u32 {
        self.replicas
    }

    /// Its stages, in chain order.
    pub fn stages(&self) -> impl Iterator<Item = &Stage> {
        self.steps.iter().map(|s| &s.stage)
    }

    /// Lets stateful stages rebuild a partition's state from `bus` when it is
    /// assigned one (see [`crate::kinds::state`]). For stateless stages this changes
    /// nothing.
    pub fn with_restore<B: Bus>(mut self, bus: Arc<B>) -> Self {
        let group = self.group.clone();
        self.restore = Some(Restore(Box::new(move |tp: &TopicPartition, from_ms: i64, max_records: u64, f: &mut dyn FnMut(&Record)| {
            let committed = bus.committed_offsets(&group, &tp.topic)?;
            match committed.get(tp.partition as usize).copied().flatten() {
                Some(until) => bus.replay(tp, ReplayRange { from_ms, until, max_records }, f),
                None => Ok(0), // the group never committed here: no history to rebuild
            }
        })));
        self
    }

    fn decode(&self, payload: &[u8]) -> Result<TxState, HandlerError> {
        let bad = |e: &dyn std::fmt::Display| HandlerError::permanent(format!("undecodable payload: {e}"));
        // Field "-": not even a JSON object (syntax, trailing bytes, size).
        let invalid = |e: actio_core::InvalidField| {
            if e.field == "-" { HandlerError::permanent(format!("undecodable payload: {}", e.problem)) } else { HandlerError::permanent(format!("invalid transaction: {e}")) }
        };
        if self.ingress {
            // Ingress topics are JSON: the pipeline refuses any other codec at load.
            let mut st = TxState::new(self.schema.decode_json(payload).map_err(invalid)?);
            self.derived.fill(&mut st).map_err(invalid)?;
            Ok(st)
        } else {
            let st: TxState = self.input_codec.decode(payload).map_err(|e| bad(&e))?;
            self.schema.check(&st.tx).map_err(|e| bad(&e))?;
            Ok(st)
        }
    }

    /// The runtime spec of this service: its first stage's limits, but the strictest
    /// ordering and the most worker threads any of its stages asks for. A fused
    /// service uses its first stage's retry topic (which carries the service's input
    /// bytes), read by a group of its own.
    pub fn spec(&self, properties: &[(String, String)]) -> StageSpec {
        let first = &self.steps[0].stage;
        let l = &first.limits;
        let strictness = |o: actio_runtime::Ordering| match o {
            actio_runtime::Ordering::Unordered => 0,
            actio_runtime::Ordering::Key => 1,
            actio_runtime::Ordering::Partition => 2,
        };
        let ordering = self.stages().map(|s| s.limits.ordering).max_by_key(|o| strictness(*o)).unwrap_or(l.ordering);
        let threads = self.stages().map(|s| s.limits.threads).max().unwrap_or(l.threads);
        let mut retry = l.retry.clone();
        if let Some(t) = retry.topic.as_mut() {
            t.group = format!("{}.retry", self.group);
        }
        StageSpec {
            name: self.name.clone(),
            group: self.group.clone(),
            input: self.input.clone(),
            dlq: Arc::from(first.dlq.as_str()),
            ordering,
            max_in_flight_per_partition: l.max_in_flight_per_partition,
            max_in_flight: l.max_in_flight,
            commit_interval: l.commit_interval,
            drain_timeout: l.drain_timeout,
            retry,
            threads,
            from_earliest: true,
            properties: properties.to_vec(),
            // A fused service commits in transactions if any of its stages asks to.
            exactly_once: self.stages().any(|s| s.limits.exactly_once),
            instance: actio_runtime::default_instance(),
            tracer: None,
        }
    }
}

impl StageHandler {
    /// Runs the service's steps on `record`; what the last produced, and the step
    /// times of a fused service.
    fn run_steps(&self, record: &Record, ctx: &Context, holds: &MessageHolds) -> Result<(Produced, Vec<StepTime>), HandlerError> {
        let mut produced = Produced::Tx(self.decode(&record.payload)?);
        let fused = self.steps.len() > 1;
        let mut times = Vec::with_capacity(if fused { self.steps.len() } else { 0 });
        for step in &self.steps {
            // A stage that writes decisions or routes is a service's last (checked when
            // the service is made); one that produced nothing ends the work.
            let Produced::Tx(st) = produced else { break };
            let started_ns = if fused { now_ns() } else { 0 };
            step.stage.faults.check(&st, ctx.attempt)?;
            let cx = RunCx {
                ctx,
                key: &self.key,
                input: &self.input,
                output: &step.output,
                headers: &record.headers,
                schema: &self.schema,
                holds,
                retry: &step.stage.limits.retry,
            };
            produced = step.runner.run(st, &cx)?;
            if let Some(h) = &step.service {
                let ended_ns = now_ns();
                record_ns(&mut h.lock(), ended_ns - started_ns);
                times.push(StepTime { stage: step.name.clone(), started_ns, ended_ns });
            }
        }
        Ok((produced, times))
    }

}

impl StageHandler {
    /// The result of a service whose last stage waits on I/O: completed on the I/O
    /// runtime when `later` resolves (an async stage is a service's last, checked when
    /// the service is made, so nothing runs after it).
    fn deferred(&self, later: crate::kinds::Later, mut times: Vec<StepTime>) -> Output {
        let d = Deferred::new();
        let (done, encoder) = (d.clone(), self.encoder.clone());
        let last = self.steps.last().and_then(|s| s.service.clone().map(|h| (s.name.clone(), h)));
        let started_ns = now_ns();
        crate::kinds::io::spawn(async move {
            let result = later.0.await;
            if let Some((stage, h)) = last {
                let ended_ns = now_ns();
                record_ns(&mut h.lock(), ended_ns - started_ns);
                times.push(StepTime { stage, started_ns, ended_ns });
            }
            done.complete(result.and_then(|st| encoder.outputs(Produced::Tx(st), times)));
        });
        Output::defer(d)
    }
}

impl Handler for StageHandler {
    fn handle(&self, record: &Record, ctx: &Context) -> Result<Vec<Output>, HandlerError> {
        let holds = MessageHolds::default();
        let started_ns = if self.trail.is_some() { now_ns() } else { 0 };
        let result = match self.run_steps(record, ctx, &holds) {
            Ok((Produced::Later(later), times)) => return Ok(vec![self.deferred(later, times)]),
            Ok((produced, times)) => {
                if let (Some(trail), Produced::Decision(ds)) = (&self.trail, &produced) {
                    trail.record(self.trail_record(record, Some((&ds.0, &ds.1)), None, started_ns));
                }
                self.encoder.outputs(produced, times)
            }
            Err(e) => Err(e),
        };
        let (held, releases) = (holds.held.take(), holds.releases.take());
        match result {
            Ok(mut outputs) => {
                match outputs.first_mut() {
                    Some(first) => first.releases = releases,
                    // Nothing to wait for: what it completes is done now.
                    None => releases.iter().for_each(Hold::release),
                }
                outputs.extend(held.map(Output::hold));
                Ok(outputs)
            }
            Err(e) => {
                // The message goes to the DLQ or is tried again: nothing stays held
                // for it (what a join completed goes with it).
                releases.iter().chain(&held).for_each(Hold::release);
                Err(e)
            }
        }
    }

    fn tick_interval(&self) -> Option<std::time::Duration> {
        self.steps
            .iter().filter_map(|s| s.stage.logic.tick_interval()).min()
    }

    fn dead_lettered(&self, record: &Record, error: &HandlerError) {
        if let Some(trail) = &self.trail {
            trail.record(self.trail_record(record, None, Some(error.message.clone()), now_ns()));
        }
    }

    fn tick(&self) -> Vec<Output> {
        // A stage that ticks (a join) runs alone (checked when the service is made),
        // so what it emits goes to its output as it is.
        let mut out = Vec::new();
        for step in self.steps.iter().filter(|s| s.stage.logic.tick_interval().is_some()) {
            for t in step.runner.tick() {
                match self.encoder.tx(&step.output, &t.st) {
                    Ok(payload) => {
                        let mut o = Output::new(step.output.clone(), payload).with_headers(t.headers).releasing(t.releases);
                        o.key = t.key;
                        out.push(o);
                    }
                    Err(e) => {
                        tracing::error!(stage = %self.name, error = %e, "cannot encode a timed-out join: its branch results stay uncommitted");
                        t.releases.iter().for_each(|h| h.fail(format!("cannot encode output: {e}")));
                    }
                }
            }
        }
        out
    }

    fn counters(&self) -> Vec<HandlerCounter> {
        let mut out: Vec<HandlerCounter> = Vec::new();
        for step in &self.steps {
            let logic = &step.stage.logic;
            if let Some(rules) = logic.rules() {
                for r in rules.current().stats() {
                    let mode = match r.mode {
                        actio_engine::rules::Mode::Active => "active",
                        actio_engine::rules::Mode::Shadow => "shadow",
                    };
                    out.push(HandlerCounter::new(RULE_HITS, "Times a rule fired, by rule and mode (a shadow rule's hits never change a decision).", r.hits).label("rule", r.id.clone()).label("mode", mode));
                    out.push(HandlerCounter::new(RULE_ERRORS, "Rule evaluations that failed (type error, missing value): the rule did not fire, the transaction went on.", r.errors).label("rule", r.id));
                }
            }
            for f in logic.reloadables() {
                let st = f.status();
                let file = st.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                out.push(HandlerCounter::new(RELOADS, "New versions of a rule or model file swapped in since start.", st.swaps).label("file", file.clone()));
                out.push(HandlerCounter::new(RELOAD_FAILURES, "Reloads of a rule or model file that failed to compile (the version in force stayed).", st.failures).label("file", file.clone()));
                out.push(HandlerCounter::gauge(RELOAD_FAILING, "1 while a rule or model file's last reload failed: the file on disk is not what runs.", u64::from(st.last_error.is_some())).label("file", file.clone()));
                out.push(HandlerCounter::gauge(CONFIG_INFO, "The version in force of each rule or model file (always 1).", 1).label("file", file).label("what", st.what).label("version", st.version));
            }
            for c in logic.counters() {
                match out.iter_mut().find(|o| o.name == c.name && o.labels == c.labels) {
                    Some(o) => o.value += c.value,
                    None => out.push(c),
                }
            }
        }
        if let Some(t) = &self.trail {
            use std::sync::atomic::Ordering::Relaxed;
            let st = t.stats();
            out.push(HandlerCounter::new(TRAIL_RECORDS, "Decision-trail records, by result: written to the database, or dropped because its queue was full (the database was slow or gone; decisions were not slowed).", st.written.load(Relaxed)).label("result", "written"));
            out.push(HandlerCounter::new(TRAIL_RECORDS, "Decision-trail records, by result: written to the database, or dropped because its queue was full (the database was slow or gone; decisions were not slowed).", st.dropped.load(Relaxed)).label("result", "dropped"));
            out.push(HandlerCounter::gauge(TRAIL_QUEUED, "Decision-trail records queued for the database, not yet written.", st.queued.load(Relaxed)));
            out.push(HandlerCounter::new(TRAIL_FAILED_BATCHES, "Decision-trail batches the database refused; each is kept and written again.", st.failed_batches.load(Relaxed)));
        }
        out
    }

    fn histograms(&self) -> Vec<HandlerHistogram> {
        self.steps
            .iter()
            .filter_map(|s| s.service.as_ref().map(|h| HandlerHistogram { stage: s.stage.name.clone(), service: h.lock().clone() }))
            .collect()
    }

    fn partitions_assigned(&self, partitions: &[TopicPartition]) {
        let replay = |tp: &TopicPartition, from_ms: i64, max: u64, f: &mut dyn FnMut(&mut TxState)| -> Result<(u64, u64), BusError> {
            let Some(restore) = &self.restore else { return Ok((0, 0)) };
            let (mut applied, mut undecodable) = (0u64, 0u64);
            (restore.0)(tp, from_ms, max, &mut |r: &Record| match self.decode(&r.payload) {
                Ok(mut st) => {
                    f(&mut st);
                    applied += 1;
                }
                Err(_) => undecodable += 1, // dead-lettered when it was first consumed
            })?;
            Ok((applied, undecodable))
        };
        let history = History { service: &self.name, input: &self.input, replay: self.restore.is_some().then_some(&replay) };
        for step in &self.steps {
            step.runner.assigned(partitions, &history);
        }
    }

    fn partitions_revoked(&self, partitions: &[TopicPartition]) {
        for step in &self.steps {
            step.runner.revoked(partitions, &self.input);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test
mod tests {
    use super::*;
    use actio_core::{Headers, TopicPartition};
    use actio_runtime::FailureKind;

    /// The shipped fraud pipeline with `edit` applied to its pipeline.toml.
    fn fraud_with(edit: impl Fn(String) -> String) -> (tempfile::TempDir, Pipeline) {
        let dir = actio_testkit::copy_of_fraud();
        let p = dir.path().join("pipeline.toml");
        std::fs::write(&p, edit(std::fs::read_to_string(&p).unwrap())).unwrap();
        let pipeline = Pipeline::load(dir.path()).unwrap_or_else(|e| panic!("{e}"));
        (dir, pipeline)
    }

    /// An ordinary transaction of the fraud pipeline (a golden case's), with the
    /// map entries `attrs` and, for `chaos-<fault>`, `attrs.chaos = "<fault>"`.
    fn record(marker: &str, attrs: &str) -> Record {
        let case = actio_testkit::fraud().join("golden/approve-grocery-pos.json");
        let case: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(case).unwrap()).unwrap();
        let mut tx = case["tx"].clone();
        let mut entries: serde_json::Map<String, serde_json::Value> = serde_json::from_str(attrs).unwrap();
        if let Some(fault) = marker.strip_prefix("chaos-") {
            entries.insert("chaos".into(), fault.into());
        }
        tx["attrs"] = entries.into();
        let json = tx.to_string();
        Record { tp: TopicPartition::new("tx.in", 0), offset: 0, key: Some(Bytes::from_static(b"c-1")), payload: Bytes::from(json), headers: Headers::default(), timestamp_ms: None }
    }

    /// `h` on `r` as the runtime runs a message first consumed from its input, at
    /// attempt `attempt`.
    fn on_attempt(h: &StageHandler, r: &Record, attempt: u32) -> Result<Vec<Output>, HandlerError> {
        h.handle(r, &Context::first(r).with_attempt(attempt))
    }

    /// `h` on `r`, a first attempt.
    fn first(h: &StageHandler, r: &Record) -> Result<Vec<Output>, HandlerError> {
        h.handle(r, &Context::first(r))
    }

    const FAULTS: &str = "budget_ms = 5.0\n[[stage.fault]]\nwhen = \"tx.attrs.chaos == 'transient'\"\nfail = \"transient\"\ntimes = 2\n\
        [[stage.fault]]\nwhen = \"tx.attrs.chaos == 'permanent'\"\nfail = \"permanent\"\n\
        [[stage.fault]]\nwhen = \"tx.attrs.chaos == 'panic'\"\nfail = \"panic\"\n";

    #[test]
    fn injected_faults_fail_the_attempts_they_name_and_nothing_else() {
        let (_d, p) = fraud_with(|t| t.replacen("budget_ms = 5.0\n", FAULTS, 1));
        let h = StageHandler::new(&p, &p.stages[0]);
        for attempt in [1, 2] {
            let e = on_attempt(&h, &record("chaos-transient", "{}"), attempt).unwrap_err();
            assert_eq!(e.kind, FailureKind::Transient, "attempt {attempt}");
        }
        assert_eq!(on_attempt(&h, &record("chaos-transient", "{}"), 3).unwrap().len(), 1, "the third attempt succeeds");
        assert_eq!(on_attempt(&h, &record("chaos-permanent", "{}"), 7).unwrap_err().kind, FailureKind::Permanent);
        let panic = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| on_attempt(&h, &record("chaos-panic", "{}"), 1))).unwrap_err();
        assert!(panic.downcast_ref::<String>().unwrap().contains("injected panic"));
        assert_eq!(first(&h, &record("m-1", "{}")).unwrap().len(), 1, "other transactions are untouched");
        // Undecodable input is still a permanent failure, before any fault.
        let mut bad = record("chaos-transient", "{}");
        bad.payload = Bytes::from_static(b"{");
        assert!(on_attempt(&h, &bad, 1).unwrap_err().message.contains("undecodable"));
        // Faults only where configured.
        let v = StageHandler::new(&p, &p.stages[1]);
        assert!(p.stages[1].faults.is_empty());
        let ruled = on_attempt(&h, &record("chaos-transient", "{}"), 3).unwrap();
        let mut r = record("x", "{}");
        r.payload = ruled[0].payload.clone();
        assert!(on_attempt(&v, &r, 1).is_ok());
    }

    #[test]
    fn a_retry_copy_uses_the_velocity_state_of_its_input_partition_and_retry_partitions_hold_none() {
        let (_d, p) = fraud_with(|t| t);
        let rules = StageHandler::new(&p, &p.stages[0]);
        let velocity = StageHandler::new(&p, &p.stages[1]);
        let ruled = first(&rules, &record("m-1", "{}")).unwrap()[0].payload.clone();
        // A record consumed from `topic`/`partition` and the context the runtime gives
        // it; `retried_from`: it came back from the retry topic, first consumed from
        // that partition (the runtime's `actio-source`).
        let on = |topic: &str, partition: i32, retried_from: Option<(&str, i32)>| {
            let r = Record { tp: TopicPartition::new(topic, partition), offset: 0, key: Some(Bytes::from_static(b"c-1")), payload: ruled.clone(), headers: Headers::default(), timestamp_ms: None };
            let ctx = match retried_from {
                None => Context::first(&r),
                Some((t, p)) => Context::first(&r).retried_from(TopicPartition::new(t, p), 0),
            };
            (r, ctx)
        };
        let card_tx_1m = |(r, ctx): (Record, Context)| {
            let out = velocity.handle(&r, &ctx).unwrap();
            let st: TxState = Codec::Postcard.decode(&out[0].payload).unwrap();
            st.features.iter().find(|f| &*f.name == "card_tx_1m").unwrap().value
        };
        velocity.partitions_assigned(&[TopicPartition::new("tx.ruled", 5), TopicPartition::new("tx.retry.velocity", 1)]);
        assert_eq!(card_tx_1m(on("tx.ruled", 5, None)), 1.0);
        // From the retry topic's partition 1, first consumed from tx.ruled/5: partition 5's windows.
        assert_eq!(card_tx_1m(on("tx.retry.velocity", 1, Some(("tx.ruled", 5)))), 2.0);
        // Losing a retry partition drops no input partition's state...
        velocity.partitions_revoked(&[TopicPartition::new("tx.retry.velocity", 5)]);
        assert_eq!(card_tx_1m(on("tx.ruled", 5, None)), 3.0);
        // ...and a copy of an input partition this replica does not hold sees no history.
        assert_eq!(card_tx_1m(on("tx.retry.velocity", 1, Some(("tx.ruled", 7)))), 1.0);
        // A copy without a readable `actio-source`: the runtime names the retry partition.
        assert_eq!(card_tx_1m(on("tx.retry.velocity", 1, Some(("tx.retry.velocity", 1)))), 1.0);
        assert_eq!(card_tx_1m(on("tx.ruled", 5, None)), 4.0, "throw-away states are not remembered");
        velocity.partitions_revoked(&[TopicPartition::new("tx.ruled", 5)]);
        assert_eq!(card_tx_1m(on("tx.ruled", 5, None)), 1.0, "revoking the input partition drops its state");
    }

    #[test]
    fn an_assigned_input_partition_gets_its_windows_back_from_its_history() {
        let (_d, p) = fraud_with(|t| t);
        let rules = StageHandler::new(&p, &p.stages[0]);
        let mut velocity = StageHandler::new(&p, &p.stages[1]);
        let ruled = first(&rules, &record("m-1", "{}")).unwrap()[0].payload.clone();
        let history: Vec<Record> = (0..3)
            .map(|i| Record { tp: TopicPartition::new("tx.ruled", 5), offset: i, key: None, payload: ruled.clone(), headers: Headers::default(), timestamp_ms: None })
            .chain([Record { tp: TopicPartition::new("tx.ruled", 5), offset: 3, key: None, payload: Bytes::from_static(b"garbage"), headers: Headers::default(), timestamp_ms: None }])
            .collect();
        let calls = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let seen = calls.clone();
        velocity.restore = Some(Restore(Box::new(move |tp: &TopicPartition, from_ms: i64, max: u64, f: &mut dyn FnMut(&Record)| {
            seen.lock().push((tp.clone(), from_ms, max));
            for r in &history {
                f(r);
            }
            Ok(history.len() as u64)
        })));
        let card_tx_24h = |partition: i32| {
            let r = Record { tp: TopicPartition::new("tx.ruled", partition), offset: 9, key: None, payload: ruled.clone(), headers: Headers::default(), timestamp_ms: None };
            let st: TxState = Codec::Postcard.decode(&first(&velocity, &r).unwrap()[0].payload).unwrap();
            st.features.iter().find(|f| &*f.name == "card_tx_24h").unwrap().value
        };
        velocity.partitions_assigned(&[TopicPartition::new("tx.ruled", 5), TopicPartition::new("tx.retry.velocity", 5)]);
        assert_eq!(card_tx_24h(5), 4.0, "the 3 decodable records of its history, then this one");
        {
            let calls = calls.lock();
            assert_eq!(calls.len(), 1, "input partitions only: {calls:?}");
            let day_and_a_minute = 24 * 3_600_000 + crate::kinds::state::RESTORE_MARGIN.as_millis() as i64;
            let now_ms = actio_core::time::now_ns() / 1_000_000;
            assert!((now_ms - day_and_a_minute - calls[0].1).abs() < 60_000, "from one longest window (24h) and a minute ago");
            assert_eq!(calls[0].2, 10_000_000, "restore_max_records' default");
        }
        // A partition still held is not rebuilt again.
        velocity.partitions_assigned(&[TopicPartition::new("tx.ruled", 5)]);
        assert_eq!(calls.lock().len(), 1);
        assert_eq!(card_tx_24h(5), 5.0);
    }

    #[test]
    fn a_fused_service_decides_as_the_chain_of_its_stages_and_times_each() {
        let (_d, p) = fraud_with(|t| t);
        let chain: Vec<StageHandler> = p.stages.iter().map(|s| StageHandler::new(&p, s)).collect();
        let fused = StageHandler::of_service(&p, &p.service("rules,velocity,score").unwrap());
        assert_eq!(fused.name(), "rules+velocity+score");
        for s in &chain {
            s.partitions_assigned(&[TopicPartition::new(s.input.as_str(), 0)]);
            assert!(s.histograms().is_empty(), "a lone stage's service time is the runtime's");
        }
        fused.partitions_assigned(&[TopicPartition::new("tx.in", 0)]);
        // The same card again and again: velocity windows grow, and so the decisions
        // can only agree if the fused service keeps the same windows.
        for (i, attrs) in ["{}", "{}", r#"{"risk_score": 0.9}"#, "{}", "{}"].into_iter().enumerate() {
            let input = record("m-1", attrs);
            let mut payload = input.payload.clone();
            for h in &chain {
                let r = Record { tp: TopicPartition::new(h.input.as_str(), 0), payload, ..input.clone() };
                let out = first(h, &r).unwrap();
                assert!(out[0].steps.is_empty());
                payload = out[0].payload.clone();
            }
            let out = first(&fused, &input).unwrap();
            assert_eq!(out.len(), 1);
            assert_eq!(&*out[0].topic, "tx.decisions");
            assert_eq!(out[0].payload, payload, "transaction {i}: fused and chained decisions differ");
            let steps: Vec<&str> = out[0].steps.iter().map(|s| &*s.stage).collect();
            assert_eq!(steps, ["rules", "velocity", "score"]);
            for w in out[0].steps.windows(2) {
                assert!(w[0].started_ns <= w[0].ended_ns && w[0].ended_ns <= w[1].started_ns, "{:?}", out[0].steps);
            }
        }
        let h = fused.histograms();
        assert_eq!(h.iter().map(|h| (h.stage.as_str(), h.service.len())).collect::<Vec<_>>(), [("rules", 5), ("velocity", 5), ("score", 5)]);
        // Bad input is refused once, by the first stage's decoding.
        let mut bad = record("m-1", "{}");
        bad.payload = Bytes::from_static(b"{");
        assert!(first(&fused, &bad).unwrap_err().message.contains("undecodable"));
    }

    #[test]
    fn rule_evaluation_errors_are_counted_per_stage() {
        let (d, p) = fraud_with(|t| t);
        let rules = d.path().join("rules.toml");
        let text = std::fs::read_to_string(&rules).unwrap();
        std::fs::write(&rules, format!("{text}\n[[rule]]\nid = \"reads_attr_without_has\"\ndescription = \"fails without the attribute\"\nwhen = \"tx.attrs.risk_score > 0.5\"\nweight = 0.1\n")).unwrap();
        let p2 = Pipeline::load(d.path()).unwrap();
        let h = StageHandler::new(&p2, &p2.stages[0]);
        let errors = || h.counters().into_iter().filter(|c| c.name == RULE_ERRORS).map(|c| c.value).sum::<u64>();
        let of_rule = || h.counters().into_iter().find(|c| c.name == RULE_ERRORS && c.labels == [("rule", "reads_attr_without_has".to_string())]).unwrap().value;
        assert_eq!(errors(), 0);
        first(&h, &record("m-1", "{}")).unwrap();
        first(&h, &record("m-1", "{}")).unwrap();
        first(&h, &record("m-1", r#"{"risk_score": 0.9}"#)).unwrap();
        assert_eq!((errors(), of_rule()), (2, 2), "the rule fails on the transactions without the attribute, and only it");
        // The shipped rules evaluate cleanly on an ordinary transaction.
        let shipped = StageHandler::new(&p, &p.stages[0]);
        first(&shipped, &record("m-1", "{}")).unwrap();
        assert_eq!(shipped.counters().iter().filter(|c| c.name == RULE_ERRORS).map(|c| c.value).sum::<u64>(), 0);
    }
}
