//! `pipeline.toml` as written: parsed without I/O beyond reading the file, every
//! unknown field an error. [`crate::Pipeline::load`] resolves it.
//!
//! Defaults live here, in one place, as `DEFAULT_*` constants with their unit in the
//! name; the doc comments link them rather than repeat their values, and a test holds
//! the README's figures to them. (Velocity files' own defaults sit beside their parser,
//! `actio_engine::velocity::DEFAULT_*`; the worker-thread default is the machine's
//! cores.)

use std::collections::BTreeMap;

use actio_core::Codec;
use serde::Deserialize;
use toml::Spanned;

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineFile {
    /// Pipeline name; consumer groups are `<name>.<stage>`.
    pub name: Spanned<String>,
    /// The schema file (the transaction's fields, derived fields, the decision),
    /// relative to the pipeline dir.
    pub schema: Spanned<String>,
    /// Which transaction field(s) make the message key along the chain.
    pub key: KeyConfig,
    /// Defaults for every stage; a stage may override each.
    #[serde(default)]
    pub defaults: StageLimits,
    /// The topics.
    #[serde(rename = "topic")]
    pub topics: Vec<TopicConfig>,
    /// The stages, in chain order.
    #[serde(rename = "stage")]
    pub stages: Vec<StageConfig>,
    /// Consecutive stages deployed as one service (`[[service]]`); a stage in none
    /// is a service of its own.
    #[serde(default, rename = "service")]
    pub services: Vec<ServiceConfig>,
    /// librdkafka properties, passed through unchanged to every Kafka client.
    #[serde(default)]
    pub kafka: BTreeMap<String, toml::Value>,
}

/// The message key.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    /// Declared field(s) whose values, joined by `|`, are the key; required fields only.
    pub fields: Spanned<Vec<String>>,
}

/// What a topic is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TopicRole {
    /// Written from outside (the load generator, upstream systems): JSON transactions.
    Ingress,
    /// Between two stages.
    Internal,
    /// Read from outside: decisions.
    Egress,
    /// Dead letters: original bytes plus error headers.
    DeadLetter,
    /// One stage's retry topic (its `retry_topic`): transient failures wait there, in
    /// the codec of that stage's input (original bytes plus retry headers).
    Retry,
}

/// One topic.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicConfig {
    /// Topic name.
    pub name: Spanned<String>,
    /// Partition count (≥ 1).
    pub partitions: Spanned<i32>,
    /// Payload codec.
    pub codec: Codec,
    /// What the topic is for.
    pub role: TopicRole,
}

/// Ordering of messages within a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OrderingConfig {
    /// Same key in order, keys in parallel.
    Key,
    /// One at a time per partition.
    Partition,
    /// Any order.
    Unordered,
}

/// Limits and tuning that every stage has; `None` = inherit.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageLimits {
    /// Ordering mode (default [`DEFAULT_ORDERING`]).
    pub ordering: Option<OrderingConfig>,
    /// Most messages held per partition between watermark and consumed head (default
    /// [`DEFAULT_MAX_IN_FLIGHT_PER_PARTITION`]).
    pub max_in_flight_per_partition: Option<Spanned<usize>>,
    /// Most messages held by one stage instance (default [`DEFAULT_MAX_IN_FLIGHT`]).
    pub max_in_flight: Option<Spanned<usize>>,
    /// Watermark commit interval, ms (default [`DEFAULT_COMMIT_INTERVAL_MS`]).
    pub commit_interval_ms: Option<Spanned<u64>>,
    /// Time allowed to drain in-flight work on revocation and shutdown, ms (default
    /// [`DEFAULT_DRAIN_TIMEOUT_MS`]).
    pub drain_timeout_ms: Option<Spanned<u64>>,
    /// Worker threads per stage instance (default: the machine's cores).
    pub threads: Option<Spanned<usize>>,
    /// In-place attempts for transient failures (default [`DEFAULT_RETRY_ATTEMPTS`]).
    pub retry_attempts: Option<Spanned<u32>>,
    /// First retry backoff, ms (default [`DEFAULT_RETRY_BACKOFF_MS`]; doubles each attempt,
    /// up to [`DEFAULT_RETRY_MAX_BACKOFF_MS`]).
    pub retry_backoff_ms: Option<Spanned<u64>>,
    /// The stage's latency budget, ms: reports flag a p99 above it.
    pub budget_ms: Option<Spanned<f64>>,
    /// Commit outputs and input offsets in one Kafka transaction every
    /// `commit_interval_ms`, so a crash repeats nothing `read_committed` readers
    /// see (default [`DEFAULT_EXACTLY_ONCE`]).
    pub exactly_once: Option<Spanned<bool>>,
}

/// Default: ordering.
pub const DEFAULT_ORDERING: OrderingConfig = OrderingConfig::Key;
/// Default: at-least-once (commit watermarks; a crash may repeat the outputs of up
/// to ~100 ms of work). `exactly_once = true` costs a transaction commit per
/// `commit_interval_ms` (BENCHMARKS.md, "Exactly-once").
pub const DEFAULT_EXACTLY_ONCE: bool = false;
/// Default: per-partition in-flight cap.
pub const DEFAULT_MAX_IN_FLIGHT_PER_PARTITION: usize = 10_000;
/// Default: per-stage in-flight cap.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 30_000;
/// Default: commit interval, ms.
pub const DEFAULT_COMMIT_INTERVAL_MS: u64 = 5;
/// Default: drain timeout, ms.
pub const DEFAULT_DRAIN_TIMEOUT_MS: u64 = 10_000;
/// Default: retry attempts.
pub const DEFAULT_RETRY_ATTEMPTS: u32 = 3;
/// Default: first retry backoff, ms.
pub const DEFAULT_RETRY_BACKOFF_MS: u64 = 1;
/// Largest in-place retry backoff, ms (the backoff doubles up to it).
pub const DEFAULT_RETRY_MAX_BACKOFF_MS: u64 = 50;
/// Default: replicas of a stage to deploy.
pub const DEFAULT_REPLICAS: u32 = 1;
/// The velocity file's defaults (`max_keys`, `max_events_per_key`,
/// `restore_max_records`), defined beside its parser, listed here with the rest.
pub use actio_engine::velocity::{DEFAULT_MAX_EVENTS_PER_KEY, DEFAULT_MAX_KEYS, DEFAULT_RESTORE_MAX_RECORDS};
/// The `latest` kind's defaults (`emit`, `restore`, `restore_max_records`), defined
/// beside it, listed here with the rest.
pub use crate::kinds::latest::{DEFAULT_EMIT as DEFAULT_LATEST_EMIT, DEFAULT_RESTORE as DEFAULT_LATEST_RESTORE, DEFAULT_RESTORE_MAX_RECORDS as DEFAULT_LATEST_RESTORE_MAX_RECORDS};
/// Default: trips through a stage's retry topic before the DLQ.
pub const DEFAULT_RETRY_TOPIC_ATTEMPTS: u32 = 3;
/// Most trips through a retry topic.
pub const MAX_RETRY_TOPIC_ATTEMPTS: u32 = 100;
/// Default: delay before a message from the retry topic runs again, ms.
pub const DEFAULT_RETRY_DELAY_MS: u64 = 1000;
/// Longest retry delay, ms (one hour: longer waits belong to a scheduler).
pub const MAX_RETRY_DELAY_MS: u64 = 3_600_000;

/// One stage: the fields every stage has, and the fields of its kind.
///
/// `kind` names one of [`crate::kinds::KINDS`]; the fields this struct does not
/// know are the kind's own (a `rules` file, a `features` file, a `timestamp` field
/// …): they are kept as written, with their place in the file, and the kind reads
/// them into its own config struct at resolve, where an unknown one is an error that
/// names the kind. (Deserialized by hand for that reason: `#[serde(flatten)]` would
/// lose the places.)
#[derive(Debug, Clone)]
pub struct StageConfig {
    /// Stage name (unique; `[a-z0-9_-]`).
    pub name: Spanned<String>,
    /// What it does: a registered kind's name.
    pub kind: Spanned<String>,
    /// Input topic.
    pub input: Spanned<String>,
    /// Output topic.
    pub output: Spanned<String>,
    /// Dead-letter topic.
    pub dlq: Spanned<String>,
    /// Replicas to deploy (≤ the input topic's partitions; default [`DEFAULT_REPLICAS`]).
    pub replicas: Option<Spanned<u32>>,
    /// Overrides of `[defaults]` for this stage (`[stage.limits]`).
    pub limits: StageLimits,
    /// Retry topic (a `[[topic]]` of role `retry`, this stage's alone): a transient
    /// failure that outlasts the in-place attempts goes there and comes back to this
    /// stage after `retry_delay_ms`. Without it, such a failure is dead-lettered.
    pub retry_topic: Option<Spanned<String>>,
    /// Trips through the retry topic before the DLQ (default
    /// [`DEFAULT_RETRY_TOPIC_ATTEMPTS`]; each trip gets the
    /// in-place attempts again). Only with `retry_topic`.
    pub retry_topic_attempts: Option<Spanned<u32>>,
    /// Delay between sending a message to the retry topic and running it again, ms
    /// (default [`DEFAULT_RETRY_DELAY_MS`]). Only with `retry_topic`.
    pub retry_delay_ms: Option<Spanned<u64>>,
    /// With it, the delay doubles with each trip after the first, up to this, ms
    /// (≥ `retry_delay_ms`); without it every trip waits `retry_delay_ms`.
    pub retry_delay_max_ms: Option<Spanned<u64>>,
    /// Fault injection for resilience drills (`[[stage.fault]]`); none by default.
    pub faults: Vec<FaultConfig>,
    /// The kind's own fields, as written (see the type's docs).
    pub fields: BTreeMap<String, Spanned<toml::Value>>,
}

impl<'de> serde::Deserialize<'de> for StageConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::{Error, MapAccess, Visitor};
        struct Fields;
        impl<'de> Visitor<'de> for Fields {
            type Value = StageConfig;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a [[stage]] table")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<StageConfig, A::Error> {
                let (mut name, mut kind, mut input, mut output, mut dlq) = (None, None, None, None, None);
                let mut s = StageConfig {
                    name: Spanned::new(0..0, String::new()),
                    kind: Spanned::new(0..0, String::new()),
                    input: Spanned::new(0..0, String::new()),
                    output: Spanned::new(0..0, String::new()),
                    dlq: Spanned::new(0..0, String::new()),
                    replicas: None,
                    limits: StageLimits::default(),
                    retry_topic: None,
                    retry_topic_attempts: None,
                    retry_delay_ms: None,
                    retry_delay_max_ms: None,
                    faults: Vec::new(),
                    fields: BTreeMap::new(),
                };
                while let Some(key) = map.next_key::<String>()? {
                    match key.as_str() {
                        "name" => name = Some(map.next_value()?),
                        "kind" => kind = Some(map.next_value()?),
                        "input" => input = Some(map.next_value()?),
                        "output" => output = Some(map.next_value()?),
                        "dlq" => dlq = Some(map.next_value()?),
                        "replicas" => s.replicas = Some(map.next_value()?),
                        "limits" => s.limits = map.next_value()?,
                        "retry_topic" => s.retry_topic = Some(map.next_value()?),
                        "retry_topic_attempts" => s.retry_topic_attempts = Some(map.next_value()?),
                        "retry_delay_ms" => s.retry_delay_ms = Some(map.next_value()?),
                        "retry_delay_max_ms" => s.retry_delay_max_ms = Some(map.next_value()?),
                        "fault" => s.faults = map.next_value()?,
                        _ => {
                            let value = map.next_value()?;
                            s.fields.insert(key, value);
                        }
                    }
                }
                s.name = name.ok_or_else(|| A::Error::missing_field("name"))?;
                s.kind = kind.ok_or_else(|| A::Error::missing_field("kind"))?;
                s.input = input.ok_or_else(|| A::Error::missing_field("input"))?;
                s.output = output.ok_or_else(|| A::Error::missing_field("output"))?;
                s.dlq = dlq.ok_or_else(|| A::Error::missing_field("dlq"))?;
                Ok(s)
            }
        }
        d.deserialize_map(Fields)
    }
}

/// The fields every `[[stage]]` has (the rest are its kind's).
pub const COMMON_STAGE_FIELDS: &[&str] = &[
    "name", "kind", "input", "output", "dlq", "replicas", "limits", "retry_topic", "retry_topic_attempts", "retry_delay_ms", "retry_delay_max_ms", "fault",
];

/// Consecutive stages run as one service (`[[service]]`): one process, one consumer
/// group on the first stage's input, each message handed from stage to stage in
/// memory (no topic and no broker hop between them). The service commits an input
/// offset once the last stage's outputs are acknowledged, as a single stage does.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// Service name (`[a-z0-9_-]`, unlike any stage's): its consumer group is
    /// `<pipeline>.<name>`, its Kubernetes Deployment `<pipeline>-<name>`.
    pub name: Spanned<String>,
    /// Two or more stage names, consecutive in the chain, in chain order.
    pub stages: Spanned<Vec<String>>,
    /// Replicas to deploy (default: the most any of its stages asks for).
    pub replicas: Option<Spanned<u32>>,
}

/// What an injected fault does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// A transient handler error: retried in place, then through the retry topic.
    Transient,
    /// A permanent handler error: dead-lettered at once.
    Permanent,
    /// A handler panic: caught, dead-lettered at once with the panic's message.
    Panic,
}

/// One injected fault (`[[stage.fault]]`): the stage fails on the transactions `when`
/// picks. For drills only; a stage with faults warns at start.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultConfig {
    /// CEL condition over the transaction (`tx.*`, and `features.*` computed by
    /// earlier stages), as in rule files.
    pub when: Spanned<String>,
    /// What happens: `transient`, `permanent` or `panic`.
    pub fail: FaultKind,
    /// Fail only the first N attempts of a matching transaction at this stage, counted
    /// across in-place and retry-topic attempts (default: every attempt).
    pub times: Option<Spanned<u32>>,
}
