//! Connecting to Kafka: the pipeline's `[kafka]` table, then `ACTIO_KAFKA_PROPERTY_*`
//! environment variables (secrets from a Kubernetes Secret), then `--kafka-property`
//! flags, later wins — all passed to librdkafka unchanged.

use actio_bus_kafka::{KafkaBus, KafkaConfig};
use actio_pipeline::Pipeline;
use std::process::ExitCode;

use anyhow::Context;

use crate::cli::KafkaArgs;

/// Prefix of environment variables that carry librdkafka properties.
pub const PROPERTY_ENV_PREFIX: &str = "ACTIO_KAFKA_PROPERTY_";

/// `ACTIO_KAFKA_PROPERTY_SASL_PASSWORD` → `sasl.password`.
fn property_of_env(name: &str) -> Option<String> {
    let rest = name.strip_prefix(PROPERTY_ENV_PREFIX)?;
    (!rest.is_empty()).then(|| rest.to_ascii_lowercase().replace('_', "."))
}

/// Every librdkafka property for this process's clients, in precedence order.
pub fn properties(pipeline: &Pipeline, args: &KafkaArgs) -> Vec<(String, String)> {
    let mut props = pipeline.kafka.clone();
    let mut from_env: Vec<(String, String)> = std::env::vars()
        .filter_map(|(k, v)| property_of_env(&k).map(|p| (p, v)))
        .collect();
    from_env.sort();
    props.extend(from_env);
    props.extend(args.kafka_properties.iter().cloned());
    props
}

/// Longest time the broker may hold an empty fetch of a retry-topic consumer, ms.
const RETRY_FETCH_WAIT_MAX_MS: u128 = 500;

/// Tunes a stage's retry-topic consumer: the broker may hold its empty fetches as long as
/// the retry delay (at most 500 ms) — a copy cannot run before its delay anyway — where
/// the input consumers use 5 ms, so an idle retry topic costs a few fetch requests a
/// second instead of 200. Overrides a `fetch.wait.max.ms` of the pipeline's `[kafka]`.
pub fn tune_retry_consumer(spec: &mut actio_runtime::StageSpec) {
    if let Some(t) = spec.retry.topic.as_mut() {
        let ms = t.delay.as_millis().clamp(5, RETRY_FETCH_WAIT_MAX_MS);
        t.properties.push(("fetch.wait.max.ms".into(), ms.to_string()));
    }
}

/// The Kafka bus for `pipeline`. A bad property fails here with librdkafka's message.
pub fn bus(pipeline: &Pipeline, args: &KafkaArgs) -> anyhow::Result<KafkaBus> {
    let config = KafkaConfig {
        brokers: args.brokers.clone(),
        properties: properties(pipeline, args),
    };
    KafkaBus::new(config).with_context(|| format!("connecting to Kafka at {}", args.brokers))
}

/// [`bus`] for a command's start: a failure (bad property) is printed and becomes
/// the configuration exit code, before anything is consumed.
pub fn bus_or_exit(pipeline: &Pipeline, args: &KafkaArgs) -> Result<KafkaBus, ExitCode> {
    bus(pipeline, args).map_err(|e| {
        let text = format!("{e:#}");
        match property_source(pipeline, args, &text) {
            Some(at) => eprintln!("error: {at}: {text}"),
            None => eprintln!("error: {text}"),
        }
        ExitCode::from(crate::EXIT_CONFIG)
    })
}

/// Where the property that librdkafka's message names was set — flags, then
/// environment, then the pipeline's `[kafka]` table (the precedence of
/// [`properties`]) — so the error names the file and the field.
fn property_source(pipeline: &Pipeline, args: &KafkaArgs, message: &str) -> Option<String> {
    // rdkafka's text: `... property "queue.buffering.max.ms" linger.ms banana` (the
    // alias librdkafka resolved, then the name as given, then the value).
    let named = |k: &str| message.split(|c: char| c.is_whitespace() || c == '"').any(|w| w == k);
    if let Some((k, _)) = args.kafka_properties.iter().rev().find(|(k, _)| named(k)) {
        return Some(format!("--kafka-property {k}"));
    }
    if let Some(var) = std::env::vars().map(|(v, _)| v).find(|v| property_of_env(v).is_some_and(|k| named(&k))) {
        return Some(format!("environment variable {var}"));
    }
    let (k, _) = pipeline.kafka.iter().rev().find(|(k, _)| named(k))?;
    Some(format!("{}: field kafka.\"{k}\"", pipeline.dir.join("pipeline.toml").display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_names_map_to_librdkafka_properties() {
        assert_eq!(
            property_of_env("ACTIO_KAFKA_PROPERTY_SASL_PASSWORD").as_deref(),
            Some("sasl.password")
        );
        assert_eq!(
            property_of_env("ACTIO_KAFKA_PROPERTY_SECURITY_PROTOCOL").as_deref(),
            Some("security.protocol")
        );
        assert_eq!(property_of_env("ACTIO_KAFKA_PROPERTY_"), None);
        assert_eq!(property_of_env("ACTIO_KAFKA_BROKERS"), None);
    }
}
