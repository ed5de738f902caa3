//! From [`PipelineFile`] to a runnable [`Pipeline`]: chain checks, stage files
//! loaded and compiled, defaults applied.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use actio_core::{Codec, KeyExtractor, Schema, FileError};
use actio_engine::derive::DerivedFields;
use toml::Spanned;

use crate::config::*;
use crate::error::{ConfigError, ConfigErrors};
use crate::faults::Faults;
use crate::kinds::template::Env;
use crate::kinds::{self, Kind, Logic, ResolveCx, Writes};
use crate::services::Service;

/// A topic of the pipeline.
#[derive(Debug, Clone, PartialEq)]
pub struct Topic {
    /// Name.
    pub name: String,
    /// Partitions.
    pub partitions: i32,
    /// Payload codec.
    pub codec: Codec,
    /// Role.
    pub role: TopicRole,
}

/// A stage's resolved limits (defaults applied).
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Ordering mode.
    pub ordering: actio_runtime::Ordering,
    /// Per-partition in-flight cap.
    pub max_in_flight_per_partition: usize,
    /// Per-stage in-flight cap.
    pub max_in_flight: usize,
    /// Commit interval.
    pub commit_interval: Duration,
    /// Drain timeout.
    pub drain_timeout: Duration,
    /// Worker threads.
    pub threads: usize,
    /// Retry policy for transient failures (in place, then the stage's retry topic).
    pub retry: actio_runtime::RetryPolicy,
    /// Latency budget (ms), if any.
    pub budget_ms: Option<f64>,
    /// Outputs and input offsets committed in transactions.
    pub exactly_once: bool,
}

/// A stage of the pipeline.
#[derive(Debug, Clone)]
pub struct Stage {
    /// Name.
    pub name: String,
    /// Its kind (one of [`crate::kinds::KINDS`]).
    pub kind: &'static Kind,
    /// Consumer group: `<pipeline>.<stage>`.
    pub group: String,
    /// Input topic.
    pub input: String,
    /// Output topic.
    pub output: String,
    /// Dead-letter topic.
    pub dlq: String,
    /// Limits.
    pub limits: Limits,
    /// Replicas to deploy.
    pub replicas: u32,
    /// What it computes, compiled.
    pub logic: Arc<dyn Logic>,
    /// Injected faults (`[[stage.fault]]`), for drills; empty by default.
    pub faults: Arc<Faults>,
}

/// A loaded, checked pipeline.
#[derive(Debug, Clone)]
pub struct Pipeline {
    /// Name.
    pub name: String,
    /// Directory it was loaded from.
    pub dir: PathBuf,
    /// The declared records (`schema.toml`).
    pub schema: Arc<Schema>,
    /// The schema's derived fields, compiled: computed once at ingress.
    pub derived: Arc<DerivedFields>,
    /// The key's fields, as declared.
    pub key_fields: Vec<String>,
    /// Builds a transaction's message key.
    pub key: KeyExtractor,
    /// Topics, as declared.
    pub topics: Vec<Topic>,
    /// Stages, in chain order.
    pub stages: Vec<Stage>,
    /// The `[[service]]`s: consecutive stages deployed as one ([`Pipeline::services`]
    /// lists every deployment unit).
    pub fused: Vec<Service>,
    /// librdkafka properties from `[kafka]`, unchanged (values as strings).
    pub kafka: Vec<(String, String)>,
    /// Things that work but are probably not meant (e.g. partition counts that differ
    /// along the chain, so keys change partition index).
    pub warnings: Vec<String>,
    /// The environment variables its templates read (`{env.NAME}`), sorted: what a
    /// deployment sets (`scripts/k8s-gen` takes them from the ConfigMap `actio-env`).
    pub env: Vec<String>,
}

impl Pipeline {
    /// Loads `<dir>/pipeline.toml` (or the file itself if `path` is a file).
    pub fn load(path: &Path) -> Result<Pipeline, ConfigErrors> {
        Self::load_with_env(path, &Env::process())
    }

    /// [`Pipeline::load`], with templates' `{env.NAME}` read from `env` instead of the
    /// process's environment (a test pointing a stage at its own server).
    pub fn load_with_env(path: &Path, env: &Env) -> Result<Pipeline, ConfigErrors> {
        let (dir, file) = if path.is_dir() {
            (path.to_path_buf(), path.join("pipeline.toml"))
        } else {
            (path.parent().map(Path::to_path_buf).unwrap_or_default(), path.to_path_buf())
        };
        let text = std::fs::read_to_string(&file).map_err(|e| {
            ConfigErrors(vec![ConfigError { file: file.clone(), field: "-".into(), line: None, message: format!("cannot read: {e}") }])
        })?;
        let raw: PipelineFile = toml::from_str(&text).map_err(|e| {
            let (line, message) = actio_core::schema::toml_error(&text, &e);
            ConfigErrors(vec![ConfigError { file: file.clone(), field: "-".into(), line, message }])
        })?;
        Resolver { dir: &dir, file: &file, text: &text, env, errors: Vec::new() }.resolve(raw)
    }

    /// A topic by name.
    pub fn topic(&self, name: &str) -> Option<&Topic> {
        self.topics.iter().find(|t| t.name == name)
    }

    /// A stage by name.
    pub fn stage(&self, name: &str) -> Option<&Stage> {
        self.stages.iter().find(|s| s.name == name)
    }

    /// Every file the pipeline's stages reload while they run (rule sets, models),
    /// in stage order.
    pub fn reloadables(&self) -> Vec<Arc<dyn actio_engine::reload::Reload>> {
        self.stages.iter().flat_map(|s| s.logic.reloadables()).collect()
    }

    /// The ingress topic (first one declared with role `ingress`).
    pub fn ingress(&self) -> Option<&Topic> {
        self.topics.iter().find(|t| t.role == TopicRole::Ingress)
    }

    /// The egress topic (decisions).
    pub fn egress(&self) -> Option<&Topic> {
        self.topics.iter().find(|t| t.role == TopicRole::Egress)
    }

    /// Warnings to log when stages start: one per stage with injected faults.
    pub fn fault_warnings(&self) -> Vec<String> {
        self.stages
            .iter()
            .filter(|s| !s.faults.is_empty())
            .map(|s| {
                let whens: Vec<String> = s.faults.faults().iter().map(|f| format!("{} when `{}`", format!("{:?}", f.kind).to_lowercase(), f.when)).collect();
                format!("stage {}: fault injection is ON ([[stage.fault]] in pipeline.toml, for drills only): it fails on purpose: {}", s.name, whens.join("; "))
            })
            .collect()
    }

    /// The dead-letter topic.
    pub fn dead_letter(&self) -> Option<&Topic> {
        self.topics.iter().find(|t| t.role == TopicRole::DeadLetter)
    }
}

/// Topic → the stages that write it: `(stage, span, field)` of where each says so.
type Written = HashMap<String, Vec<(String, Option<std::ops::Range<usize>>, String)>>;

struct Resolver<'a> {
    dir: &'a Path,
    file: &'a Path,
    text: &'a str,
    env: &'a Env<'a>,
    errors: Vec<ConfigError>,
}

impl Resolver<'_> {
    fn err<T>(&mut self, spanned: &Spanned<T>, field: impl Into<String>, message: impl Into<String>) {
        self.errors.push(ConfigError::at(self.file, self.text, spanned.span(), field, message));
    }

    fn resolve(mut self, raw: PipelineFile) -> Result<Pipeline, ConfigErrors> {
        if !is_name(raw.name.get_ref()) {
            self.err(&raw.name, "name", "expected a name of [a-z0-9_-] characters");
        }
        // The schema first: every other file names its fields.
        let schema_path = self.dir.join(raw.schema.get_ref());
        let loaded = if schema_path.is_file() {
            Schema::load(&schema_path).map(Arc::new).map_err(|e| self.schema_error(e)).ok()
        } else {
            self.err(&raw.schema, "schema", format!("file {} does not exist", schema_path.display()));
            None
        };
        let Some(schema) = loaded else { return Err(ConfigErrors(self.errors)) };
        let derived = match DerivedFields::compile(&schema) {
            Ok(d) => Arc::new(d),
            Err(e) => {
                self.schema_error(e);
                return Err(ConfigErrors(self.errors));
            }
        };
        let key = match schema.key(raw.key.fields.get_ref()) {
            Ok(k) => Some(k),
            Err(m) => {
                self.err(&raw.key.fields, "key.fields", m);
                None
            }
        };
        let mut topics: Vec<Topic> = Vec::new();
        for (i, t) in raw.topics.iter().enumerate() {
            let name = t.name.get_ref();
            if name.is_empty() || name.len() > 249 || !name.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)) {
                self.err(&t.name, format!("topic[{i}].name"), "expected a Kafka topic name ([a-zA-Z0-9._-], 1..=249 chars)");
            }
            if topics.iter().any(|o| &o.name == name) {
                self.err(&t.name, format!("topic[{i}].name"), format!("topic {name:?} is declared twice"));
            }
            if *t.partitions.get_ref() < 1 {
                self.err(&t.partitions, format!("topic \"{name}\".partitions"), "expected at least 1 partition");
            }
            if t.role == TopicRole::Ingress && t.codec != Codec::Json {
                self.err(&t.name, format!("topic \"{name}\".codec"), "an ingress topic carries what producers write: JSON, checked against schema.toml (postcard is for topics between stages)");
            }
            topics.push(Topic { name: name.clone(), partitions: *t.partitions.get_ref(), codec: t.codec, role: t.role });
        }
        for role in [TopicRole::Ingress, TopicRole::Egress, TopicRole::DeadLetter] {
            if !topics.iter().any(|t| t.role == role) {
                self.errors.push(ConfigError {
                    file: self.file.to_path_buf(),
                    field: "topic".into(),
                    line: None,
                    message: format!("expected a topic with role {role:?}"),
                });
            }
        }
        if raw.stages.is_empty() {
            self.errors.push(ConfigError { file: self.file.to_path_buf(), field: "stage".into(), line: None, message: "expected at least one [[stage]]".into() });
        }

        let mut stages: Vec<Stage> = Vec::new();
        let mut features: Vec<String> = Vec::new();
        let mut rule_ids: Vec<String> = Vec::new();
        // Topic → the stages that write it, with where each says so. Several writers
        // are allowed only into a join's input (checked after the stages).
        let mut written: Written = HashMap::new();
        let mut retry_of: HashMap<String, String> = HashMap::new();
        let mut warnings = Vec::new();
        for (i, s) in raw.stages.iter().enumerate() {
            let name = s.name.get_ref().clone();
            let at = format!("stage[{i}]");
            let features_before = features.clone();
            let kind = kinds::kind(s.kind.get_ref());
            if kind.is_none() {
                let known: Vec<&str> = kinds::KINDS.iter().map(|k| k.name).collect();
                self.err(&s.kind, format!("{at}.kind"), format!("unknown stage kind {:?}; the kinds are: {}", s.kind.get_ref(), known.join(", ")));
            }
            if !is_name(&name) {
                self.err(&s.name, format!("{at}.name"), "expected a name of [a-z0-9_-] characters");
            }
            if stages.iter().any(|o| o.name == name) {
                self.err(&s.name, format!("{at}.name"), format!("stage {name:?} is declared twice"));
            }
            let input = topics.iter().find(|t| &t.name == s.input.get_ref()).cloned();
            match &input {
                None => self.err(&s.input, format!("{at}.input"), format!("unknown topic {:?}; declare it in a [[topic]]", s.input.get_ref())),
                Some(t) if t.role == TopicRole::Ingress => {}
                Some(t) if t.role == TopicRole::Retry => self.err(
                    &s.input,
                    format!("{at}.input"),
                    format!("topic {:?} is a retry topic: the stage that names it in `retry_topic` consumes it, it is no stage's input", t.name),
                ),
                Some(t) if written.contains_key(&t.name) => {}
                Some(t) => self.err(
                    &s.input,
                    format!("{at}.input"),
                    format!("topic {:?} is neither an ingress topic nor the output of an earlier stage: the chain is broken", t.name),
                ),
            }
            let output = topics.iter().find(|t| &t.name == s.output.get_ref()).cloned();
            match &output {
                None => self.err(&s.output, format!("{at}.output"), format!("unknown topic {:?}; declare it in a [[topic]]", s.output.get_ref())),
                Some(t) if matches!(t.role, TopicRole::Ingress | TopicRole::DeadLetter | TopicRole::Retry) => {
                    self.err(&s.output, format!("{at}.output"), format!("a stage may not write to {:?}, a topic of role {:?}", t.name, t.role))
                }
                Some(t) => {
                    written.entry(t.name.clone()).or_default().push((name.clone(), Some(s.output.span()), format!("{at}.output")));
                    match kind.map(|k| (k, k.writes)) {
                        Some((k, Writes::Decisions)) if t.role != TopicRole::Egress => {
                            self.err(&s.output, format!("{at}.output"), format!("a `{}` stage writes decisions: expected a topic of role egress", k.name))
                        }
                        _ => {}
                    }
                }
            }
            if let (Some(i), Some(o)) = (&input, &output)
                && i.partitions != o.partitions
            {
                warnings.push(format!(
                    "stage {name:?}: {:?} has {} partitions but {:?} has {}: keys change partition index along the chain",
                    i.name, i.partitions, o.name, o.partitions
                ));
            }
            match topics.iter().find(|t| &t.name == s.dlq.get_ref()) {
                Some(t) if t.role == TopicRole::DeadLetter => {}
                Some(t) => self.err(&s.dlq, format!("{at}.dlq"), format!("topic {:?} has role {:?}; expected dead_letter", t.name, t.role)),
                None => self.err(&s.dlq, format!("{at}.dlq"), format!("unknown topic {:?}; declare it in a [[topic]]", s.dlq.get_ref())),
            }
            let mut limits = self.limits(&raw.defaults, &s.limits, &at);
            let group = format!("{}.{}", raw.name.get_ref(), name);
            limits.retry.topic = self.retry_topic(s, &at, &topics, input.as_ref(), &group, &mut retry_of);
            let faults = self.faults(s, &at, &schema, &features_before);
            let replicas = s.replicas.as_ref().map_or(DEFAULT_REPLICAS, |r| *r.get_ref());
            if let (Some(r), Some(t)) = (&s.replicas, &input)
                && (*r.get_ref() < 1 || *r.get_ref() as i64 > t.partitions as i64)
            {
                self.err(r, format!("{at}.replicas"), format!("expected 1..={} (the partitions of {:?}): more replicas than partitions sit idle", t.partitions, t.name));
            }

            let logic = kind.and_then(|k| {
                let mut cx = ResolveCx {
                    stage: &name,
                    dir: self.dir,
                    schema: &schema,
                    key_fields: raw.key.fields.get_ref(),
                    features: &mut features,
                    rule_ids: &rule_ids,
                    topics: &topics,
                    env: self.env,
                    kind: k.name,
                    at: &at,
                    fields: &s.fields,
                    name_span: s.name.span(),
                    file: self.file,
                    text: self.text,
                    errors: &mut self.errors,
                };
                (k.resolve)(&mut cx)
            });
            for t in logic.as_ref().map(|l| l.outputs()).unwrap_or_default() {
                let writers = written.entry(t).or_default();
                if !writers.iter().any(|(w, _, _)| *w == name) {
                    writers.push((name.clone(), s.fields.get("route").map(|r| r.span()), format!("{at}.route")));
                }
            }
            if let Some(l) = logic.as_ref().filter(|l| limits.exactly_once && !l.waits_for().is_empty()) {
                let span = s.limits.exactly_once.as_ref().or(raw.defaults.exactly_once.as_ref());
                let message = format!(
                    "stage {name:?} waits for {} and holds their results uncommitted, which a transaction cannot commit: set exactly_once = false in its [stage.limits]",
                    l.waits_for().join(", ")
                );
                match span {
                    Some(v) => self.err(v, format!("{at}.limits.exactly_once"), message),
                    None => self.err(&s.name, format!("{at}.limits.exactly_once"), message),
                }
            }
            if let Some(r) = logic.as_ref().and_then(|l| l.rules()) {
                let r = r.current();
                rule_ids.extend(r.stats().into_iter().map(|s| s.id));
            }
            if let (Some(kind), Some(logic), Some(input), Some(output)) = (kind, logic, input, output) {
                stages.push(Stage {
                    group: format!("{}.{}", raw.name.get_ref(), name),
                    name,
                    kind,
                    input: input.name,
                    output: output.name,
                    dlq: s.dlq.get_ref().clone(),
                    limits,
                    replicas,
                    logic,
                    faults: Arc::new(faults),
                });
            }
        }
        self.graph(&raw.stages, &stages, &written);
        for t in topics.iter().filter(|t| t.role == TopicRole::Retry && !retry_of.contains_key(&t.name)) {
            warnings.push(format!("topic {:?} has role retry but no stage names it in `retry_topic`", t.name));
        }
        let dup: BTreeSet<_> = rule_ids.iter().filter(|id| rule_ids.iter().filter(|o| o == id).count() > 1).collect();
        if !dup.is_empty() {
            self.errors.push(ConfigError {
                file: self.file.to_path_buf(),
                field: "stage.rules".into(),
                line: None,
                message: format!("rule ids must be unique across the pipeline; repeated: {dup:?}"),
            });
        }
        let kafka = raw
            .kafka
            .iter()
            .filter_map(|(k, v)| match v {
                toml::Value::String(s) => Some((k.clone(), s.clone())),
                toml::Value::Integer(i) => Some((k.clone(), i.to_string())),
                toml::Value::Float(f) => Some((k.clone(), f.to_string())),
                toml::Value::Boolean(b) => Some((k.clone(), b.to_string())),
                _ => {
                    self.errors.push(ConfigError {
                        file: self.file.to_path_buf(),
                        field: format!("kafka.\"{k}\""),
                        line: None,
                        message: "expected a string, number or boolean (librdkafka properties are scalars)".into(),
                    });
                    None
                }
            })
            .collect();
        for (name, line) in &schema.decision().features {
            if !features.contains(name) {
                self.errors.push(ConfigError {
                    file: schema.file().to_path_buf(),
                    field: "decision.features".into(),
                    line: *line,
                    message: format!("unknown feature {name:?}; the stages compute: {}", features.join(", ")),
                });
            }
        }
        let (Some(key), true) = (key, self.errors.is_empty()) else {
            return Err(ConfigErrors(self.errors));
        };
        let mut pipeline = Pipeline {
            name: raw.name.into_inner(),
            dir: self.dir.to_path_buf(),
            schema,
            derived,
            key_fields: raw.key.fields.into_inner(),
            key,
            topics,
            stages,
            fused: Vec::new(),
            kafka,
            warnings,
            env: self.env.read(),
        };
        pipeline.fused = self.services(&raw.services, &pipeline);
        if !self.errors.is_empty() {
            return Err(ConfigErrors(self.errors));
        }
        Ok(pipeline)
    }

    /// The graph's joins: a topic several stages write may be read only by joins
    /// that wait for all of them, and each join's branches are stages that write its
    /// input. (The graph is acyclic and every stage reachable from an ingress topic
    /// by construction: a stage reads only an ingress topic or what an earlier stage
    /// writes.)
    fn graph(&mut self, raw: &[StageConfig], stages: &[Stage], written: &Written) {
        let span_of = |name: &str, field: &str| {
            raw.iter().enumerate().find(|(_, s)| s.name.get_ref() == name).map(|(i, s)| (i, s.fields.get(field).map_or(s.name.span(), |v| v.span())))
        };
        let mut topics: Vec<(&String, &Vec<_>)> = written.iter().filter(|(_, w)| w.len() > 1).collect();
        topics.sort_by_key(|(t, _)| t.as_str());
        for (topic, writers) in topics {
            let names: Vec<&str> = writers.iter().map(|(w, _, _)| w.as_str()).collect();
            let readers: Vec<&Stage> = stages.iter().filter(|s| s.input == **topic).collect();
            // Read by no stage (an egress topic several flows end on): no reader to
            // confuse. Read by stages: only joins that wait for every writer.
            let joined = readers.is_empty() || readers.iter().all(|r| names.iter().all(|w| r.logic.waits_for().iter().any(|b| b == w)));
            if !joined {
                let (_, span, field) = &writers[1];
                let message = format!(
                    "topic {topic:?} is written by stages {}: several stages may write a topic that stages read only if it is the input of a join that waits for all of them (`kind = \"join\"`, `branches`)",
                    names.join(", ")
                );
                match span {
                    Some(span) => self.errors.push(ConfigError::at(self.file, self.text, span.clone(), field.clone(), message)),
                    None => self.errors.push(ConfigError { file: self.file.to_path_buf(), field: field.clone(), line: None, message }),
                }
            }
        }
        for j in stages.iter().filter(|s| !s.logic.waits_for().is_empty()) {
            let Some((i, span)) = span_of(&j.name, "branches") else { continue };
            let writers: Vec<&str> = written.get(&j.input).map(|w| w.iter().map(|(n, _, _)| n.as_str()).collect()).unwrap_or_default();
            for b in j.logic.waits_for() {
                let message = match stages.iter().position(|s| s.name == *b) {
                    None => Some(format!("unknown stage {b:?}: a branch is a stage declared before the join")),
                    Some(_) if !writers.contains(&b.as_str()) => Some(format!("stage {b:?} does not write {:?}, the join's input: a branch writes its result there", j.input)),
                    Some(_) => None,
                };
                if let Some(m) = message {
                    self.errors.push(ConfigError::at(self.file, self.text, span.clone(), format!("stage[{i}].branches"), m));
                }
            }
            for w in writers.iter().filter(|w| !j.logic.waits_for().iter().any(|b| b == *w)) {
                self.errors.push(ConfigError::at(
                    self.file,
                    self.text,
                    span.clone(),
                    format!("stage[{i}].branches"),
                    format!("stage {w:?} writes {:?}, the join's input, but is not one of its branches: its results would be dead-lettered", j.input),
                ));
            }
        }
    }

    /// The `[[service]]`s, checked against the resolved stages: named unlike any
    /// stage or other service, two or more consecutive stages each in one service.
    fn services(&mut self, raw: &[ServiceConfig], pipeline: &Pipeline) -> Vec<Service> {
        let mut out: Vec<Service> = Vec::new();
        for (i, s) in raw.iter().enumerate() {
            let at = format!("service[{i}]");
            let name = s.name.get_ref();
            if !is_name(name) {
                self.err(&s.name, format!("{at}.name"), "expected a name of [a-z0-9_-] characters");
            }
            if pipeline.stage(name).is_some() || out.iter().any(|o| &o.name == name) {
                self.err(&s.name, format!("{at}.name"), format!("{name:?} already names a stage or a service: a service's consumer group and Deployment are named after it"));
            }
            let names: Vec<&str> = s.stages.get_ref().iter().map(String::as_str).collect();
            if names.len() < 2 {
                self.err(&s.stages, format!("{at}.stages"), "expected two or more stages: a stage alone is already a service");
                continue;
            }
            let range = match pipeline.consecutive(&names) {
                Ok(r) => r,
                Err(m) => {
                    self.err(&s.stages, format!("{at}.stages"), m);
                    continue;
                }
            };
            if let Some(o) = out.iter().find(|o| o.stages.start < range.end && range.start < o.stages.end) {
                self.err(&s.stages, format!("{at}.stages"), format!("a stage can be in one service only; service {:?} already runs some of these", o.name));
                continue;
            }
            let first_input = pipeline.topic(&pipeline.stages[range.start].input).map_or(1, |t| t.partitions);
            let replicas = match &s.replicas {
                Some(r) if !(1..=first_input as i64).contains(&(*r.get_ref() as i64)) => {
                    self.err(r, format!("{at}.replicas"), format!("expected 1..={first_input} (the partitions of the service's input): more replicas than partitions sit idle"));
                    1
                }
                Some(r) => *r.get_ref(),
                None => pipeline.stages[range.clone()].iter().map(|s| s.replicas).max().unwrap_or(DEFAULT_REPLICAS),
            };
            out.push(Service { name: name.clone(), group: format!("{}.{name}", pipeline.name), stages: range, replicas });
        }
        out
    }

    fn schema_error(&mut self, e: FileError) {
        self.errors.push(e);
    }

    /// The stage's retry topic, checked: declared with role `retry`, this stage's alone
    /// (its group consumes all of it), in the input's codec (it carries the input's
    /// bytes); attempts and delay in range, and only given with a topic.
    fn retry_topic(
        &mut self,
        s: &StageConfig,
        at: &str,
        topics: &[Topic],
        input: Option<&Topic>,
        group: &str,
        retry_of: &mut HashMap<String, String>,
    ) -> Option<actio_runtime::RetryTopic> {
        let Some(name) = &s.retry_topic else {
            if let Some(v) = &s.retry_topic_attempts {
                self.err(v, format!("{at}.retry_topic_attempts"), "only with `retry_topic`: without one, nothing goes to a retry topic");
            }
            if let Some(v) = &s.retry_delay_ms {
                self.err(v, format!("{at}.retry_delay_ms"), "only with `retry_topic`: without one, nothing goes to a retry topic");
            }
            if let Some(v) = &s.retry_delay_max_ms {
                self.err(v, format!("{at}.retry_delay_max_ms"), "only with `retry_topic`: without one, nothing goes to a retry topic");
            }
            return None;
        };
        let field = format!("{at}.retry_topic");
        let topic = match topics.iter().find(|t| &t.name == name.get_ref()) {
            None => {
                self.err(name, field, format!("unknown topic {:?}; declare it in a [[topic]] with role = \"retry\"", name.get_ref()));
                None
            }
            Some(t) if t.role != TopicRole::Retry => {
                self.err(name, field, format!("topic {:?} has role {:?}; expected retry", t.name, t.role));
                None
            }
            Some(t) => {
                if let Some(other) = retry_of.insert(t.name.clone(), s.name.get_ref().clone()) {
                    self.err(name, field.clone(), format!("topic {:?} is already the retry topic of stage {other:?}; each stage needs its own", t.name));
                }
                if let Some(i) = input.filter(|i| i.codec != t.codec) {
                    self.err(name, field, format!("topic {:?} has codec {:?}, but a retry topic carries its stage's input bytes: expected {:?}, the codec of {:?}", t.name, t.codec, i.codec, i.name));
                }
                Some(t)
            }
        };
        let attempts = s.retry_topic_attempts.as_ref().map_or(DEFAULT_RETRY_TOPIC_ATTEMPTS, |v| {
            if !(1..=MAX_RETRY_TOPIC_ATTEMPTS).contains(v.get_ref()) {
                self.err(v, format!("{at}.retry_topic_attempts"), format!("expected 1..={MAX_RETRY_TOPIC_ATTEMPTS} trips through the retry topic"));
            }
            *v.get_ref()
        });
        let delay_ms = s.retry_delay_ms.as_ref().map_or(DEFAULT_RETRY_DELAY_MS, |v| {
            if *v.get_ref() > MAX_RETRY_DELAY_MS {
                self.err(v, format!("{at}.retry_delay_ms"), format!("expected at most {MAX_RETRY_DELAY_MS} ms (one hour)"));
            }
            *v.get_ref()
        });
        let max_delay_ms = s.retry_delay_max_ms.as_ref().map_or(delay_ms, |v| {
            if !(delay_ms..=MAX_RETRY_DELAY_MS).contains(v.get_ref()) {
                self.err(v, format!("{at}.retry_delay_max_ms"), format!("expected {delay_ms}..={MAX_RETRY_DELAY_MS} ms: at least `retry_delay_ms`, at most one hour"));
            }
            *v.get_ref()
        });
        // Its own group: stage names have no dots, so `<pipeline>.<stage>.retry` is no
        // stage's group.
        topic.map(|t| actio_runtime::RetryTopic {
            topic: Arc::from(t.name.as_str()),
            group: format!("{group}.retry"),
            properties: Vec::new(),
            attempts,
            delay: Duration::from_millis(delay_ms),
            max_delay: Duration::from_millis(max_delay_ms.max(delay_ms)),
        })
    }

    /// The stage's `[[stage.fault]]` entries, compiled with the features computed
    /// before the stage (faults run before its logic).
    fn faults(&mut self, s: &StageConfig, at: &str, schema: &Arc<Schema>, features: &[String]) -> Faults {
        for (j, f) in s.faults.iter().enumerate() {
            if let Some(t) = f.times.as_ref().filter(|t| *t.get_ref() == 0) {
                self.err(t, format!("{at}.fault[{j}].times"), "expected at least 1 (leave it out to fail every attempt)");
            }
        }
        let entries: Vec<_> = s.faults.iter().map(|f| (f.when.get_ref().clone(), f.fail, f.times.as_ref().map(|t| *t.get_ref()))).collect();
        match Faults::compile(&entries, schema, features) {
            Ok(f) => f,
            Err((j, message)) => {
                self.err(&s.faults[j].when, format!("{at}.fault[{j}].when"), message);
                Faults::default()
            }
        }
    }

    fn limits(&mut self, d: &StageLimits, s: &StageLimits, at: &str) -> Limits {
        fn pick<T: Clone>(s: &Option<Spanned<T>>, d: &Option<Spanned<T>>) -> Option<Spanned<T>> {
            s.clone().or_else(|| d.clone())
        }
        let mut positive = |v: Option<Spanned<usize>>, field: &str, default: usize| match v {
            Some(v) if *v.get_ref() == 0 => {
                self.err(&v, format!("{at}.limits.{field}"), "expected a value ≥ 1");
                default
            }
            Some(v) => *v.get_ref(),
            None => default,
        };
        let per = positive(pick(&s.max_in_flight_per_partition, &d.max_in_flight_per_partition), "max_in_flight_per_partition", DEFAULT_MAX_IN_FLIGHT_PER_PARTITION);
        let total = positive(pick(&s.max_in_flight, &d.max_in_flight), "max_in_flight", DEFAULT_MAX_IN_FLIGHT);
        let threads = positive(pick(&s.threads, &d.threads), "threads", std::thread::available_parallelism().map_or(2, |n| n.get()));
        let attempts = pick(&s.retry_attempts, &d.retry_attempts).map_or(DEFAULT_RETRY_ATTEMPTS, |v| *v.get_ref()).max(1);
        let budget = pick(&s.budget_ms, &d.budget_ms);
        if let Some(b) = &budget
            && (b.get_ref().is_nan() || *b.get_ref() <= 0.0)
        {
            self.err(b, format!("{at}.limits.budget_ms"), "expected a positive number of milliseconds");
        }
        Limits {
            ordering: match s.ordering.or(d.ordering).unwrap_or(DEFAULT_ORDERING) {
                OrderingConfig::Key => actio_runtime::Ordering::Key,
                OrderingConfig::Partition => actio_runtime::Ordering::Partition,
                OrderingConfig::Unordered => actio_runtime::Ordering::Unordered,
            },
            max_in_flight_per_partition: per,
            max_in_flight: total,
            commit_interval: Duration::from_millis(pick(&s.commit_interval_ms, &d.commit_interval_ms).map_or(DEFAULT_COMMIT_INTERVAL_MS, |v| *v.get_ref())),
            drain_timeout: Duration::from_millis(pick(&s.drain_timeout_ms, &d.drain_timeout_ms).map_or(DEFAULT_DRAIN_TIMEOUT_MS, |v| *v.get_ref())),
            threads,
            retry: actio_runtime::RetryPolicy {
                attempts,
                backoff: Duration::from_millis(pick(&s.retry_backoff_ms, &d.retry_backoff_ms).map_or(DEFAULT_RETRY_BACKOFF_MS, |v| *v.get_ref())),
                max_backoff: Duration::from_millis(DEFAULT_RETRY_MAX_BACKOFF_MS),
                topic: None,
            },
            budget_ms: budget.map(|b| *b.get_ref()),
            exactly_once: pick(&s.exactly_once, &d.exactly_once).map_or(DEFAULT_EXACTLY_ONCE, |v| *v.get_ref()),
        }
    }
}

fn is_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
}
