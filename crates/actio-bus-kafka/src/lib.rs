//! actio's Kafka bus: the [`actio_core::bus`] traits on librdkafka (through `rdkafka`).
//!
//! Stages use it exactly like the embedded bus; what differs is only where the log
//! lives. The delivery guarantees are stated where they are implemented:
//! [`consumer`] (when offsets are committed: at-least-once, exact hand-over on graceful
//! rebalance) and [`producer`] (every accepted record's ack is called exactly once).
//!
//! Configuration is librdkafka's own: [`KafkaConfig::properties`] (the pipeline's
//! `[kafka]` table) and the per-client `properties` are passed through unchanged on
//! top of the latency-tuned defaults in [`config`].

#![deny(missing_docs)]

pub mod admin;
pub mod config;
pub mod consumer;
mod error;
pub mod producer;

use std::sync::Arc;

use actio_core::bus::{
    Bus, BusError, ConsumerConfig, Offset, ProducerConfig, RebalanceListener, Record, ReplayRange, TopicPartition, TopicSpec,
};
use rdkafka::config::RDKafkaLogLevel;

pub use admin::{PartitionInfo, PartitionLag, TopicInfo};
pub use config::KafkaConfig;
pub use consumer::KafkaConsumer;
pub use producer::KafkaProducer;

/// The Kafka transport: makes consumers and producers, manages topics.
pub struct KafkaBus {
    config: KafkaConfig,
    admin: admin::Admin,
}

impl std::fmt::Debug for KafkaBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaBus").field("brokers", &self.config.brokers).finish_non_exhaustive()
    }
}

impl KafkaBus {
    /// Connects lazily (librdkafka connects in the background) and checks the
    /// properties: a bad property name or value fails here, with librdkafka's message
    /// (`BusErrorKind::Config`).
    pub fn new(config: KafkaConfig) -> Result<Self, BusError> {
        let base = config::layered(&config.brokers, &[], &[&config.properties], &[]);
        let admin = admin::Admin::create(&base)?;
        Ok(KafkaBus { config, admin })
    }

    /// The configuration it was made with.
    pub fn config(&self) -> &KafkaConfig {
        &self.config
    }

    /// A topic's partitions with leaders and replicas.
    pub fn describe_topic(&self, topic: &str) -> Result<TopicInfo, BusError> {
        self.admin.describe_topic(topic)
    }

    /// Per partition of `topic`: the group's committed offset, the end offset and the lag.
    pub fn group_lag(&self, group: &str, topic: &str) -> Result<Vec<PartitionLag>, BusError> {
        self.admin.group_lag(group, topic)
    }

    /// The group's lag on `topic`, summed over its partitions.
    pub fn group_lag_total(&self, group: &str, topic: &str) -> Result<i64, BusError> {
        Ok(total_lag(&self.group_lag(group, topic)?))
    }
}

/// Lag summed over partitions.
pub fn total_lag(parts: &[PartitionLag]) -> i64 {
    parts.iter().map(|p| p.lag.max(0)).sum()
}

impl Bus for KafkaBus {
    type Consumer = KafkaConsumer;
    type Producer = KafkaProducer;

    fn consumer(
        &self,
        config: &ConsumerConfig,
        listener: Arc<dyn RebalanceListener>,
    ) -> Result<KafkaConsumer, BusError> {
        let reset = if config.from_earliest { "earliest" } else { "latest" };
        let mut defaults: Vec<(&str, &str)> = config::consumer_defaults(&[&self.config.properties, &config.properties]);
        defaults.push(("auto.offset.reset", reset));
        if !config.client_id.is_empty() {
            defaults.push(("client.id", &config.client_id));
        }
        let c = config::layered(
            &self.config.brokers,
            &defaults,
            &[&self.config.properties, &config.properties],
            // The runtime's guarantee depends on these: offsets are stored only when
            // the runtime says so, and the group is the stage's.
            &[("enable.auto.offset.store", "false"), ("group.id", &config.group)],
        );
        KafkaConsumer::create(&c, &config.topics, listener)
    }

    fn producer(&self, config: &ProducerConfig) -> Result<KafkaProducer, BusError> {
        let mut defaults: Vec<(&str, &str)> = config::PRODUCER_DEFAULTS.to_vec();
        if !config.client_id.is_empty() {
            defaults.push(("client.id", &config.client_id));
        }
        // A transactional producer: its id, and a short transaction timeout, so a
        // member that died with a transaction open holds back `read_committed`
        // readers of its outputs for 10 s at most (librdkafka's default is 60 s; a
        // member restarted under the same id fences and aborts it at once).
        let fixed: Vec<(&str, &str)> = config.transactional_id.as_deref().map(|id| vec![("transactional.id", id)]).unwrap_or_default();
        if config.transactional_id.is_some() {
            defaults.push(("transaction.timeout.ms", "10000"));
            // A transaction's first AddOffsetsToTxn often meets the previous one still
            // completing (CONCURRENT_TRANSACTIONS) and is retried after
            // retry.backoff.ms: 100 ms by default, 5 ms here. Measured on the test
            // broker: send_offsets 65 ms → 3.4 ms per commit.
            defaults.push(("retry.backoff.ms", "5"));
        }
        let c = config::layered(&self.config.brokers, &defaults, &[&self.config.properties, &config.properties], &fixed);
        KafkaProducer::create(&c, config.transactional_id.is_some())
    }

    fn create_topics(&self, topics: &[TopicSpec]) -> Result<(), BusError> {
        self.admin.create_topics(topics)
    }

    fn committed_offsets(&self, group: &str, topic: &str) -> Result<Vec<Option<Offset>>, BusError> {
        self.admin.committed_offsets(group, topic)
    }

    fn end_offsets(&self, topic: &str) -> Result<Vec<Offset>, BusError> {
        self.admin.end_offsets(topic)
    }

    fn replay(&self, tp: &TopicPartition, range: ReplayRange, f: &mut dyn FnMut(&Record)) -> Result<u64, BusError> {
        self.admin.replay(tp, range, f)
    }
}

/// librdkafka's log lines into `tracing`, at matching levels.
pub(crate) fn log_to_tracing(client: &str, level: RDKafkaLogLevel, fac: &str, message: &str) {
    // Every client gets the pipeline's whole `[kafka]` table, so a producer property
    // (e.g. `linger.ms`) reaches the consumers too, and librdkafka warns that it ignores
    // it — at every client creation. Expected, so not a warning.
    if fac == "CONFWARN" && message.contains("will be ignored by this") {
        tracing::debug!(client, fac, "librdkafka: {message}");
        return;
    }
    match level {
        RDKafkaLogLevel::Emerg | RDKafkaLogLevel::Alert | RDKafkaLogLevel::Critical | RDKafkaLogLevel::Error => {
            tracing::error!(client, fac, "librdkafka: {message}")
        }
        RDKafkaLogLevel::Warning => tracing::warn!(client, fac, "librdkafka: {message}"),
        RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => tracing::info!(client, fac, "librdkafka: {message}"),
        RDKafkaLogLevel::Debug => tracing::debug!(client, fac, "librdkafka: {message}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actio_core::bus::{BusErrorKind, NoRebalanceListener};

    fn kv(k: &str, v: &str) -> (String, String) {
        (k.to_string(), v.to_string())
    }

    // No broker needed: librdkafka validates properties when the client is created.
    #[test]
    fn bad_property_value_fails_with_librdkafkas_message() {
        let e = KafkaBus::new(KafkaConfig { brokers: "127.0.0.1:1".into(), properties: vec![kv("linger.ms", "banana")] })
            .err()
            .map(|e| (e.kind, e.message));
        let (kind, msg) = e.unwrap_or((BusErrorKind::Fatal, "no error".into()));
        assert_eq!(kind, BusErrorKind::Config);
        assert!(msg.contains("linger.ms"), "{msg}");
        assert!(msg.contains("Invalid value"), "{msg}");
    }

    // Production clusters use TLS and SASL/SCRAM; librdkafka built without OpenSSL
    // rejects these values when the client is created.
    #[test]
    fn tls_and_scram_are_built_in() {
        let props = vec![
            kv("security.protocol", "SASL_SSL"),
            kv("sasl.mechanism", "SCRAM-SHA-512"),
            kv("sasl.username", "u"),
            kv("sasl.password", "p"),
        ];
        let bus = KafkaBus::new(KafkaConfig { brokers: "127.0.0.1:1".into(), properties: props });
        assert!(bus.is_ok(), "{:?}", bus.err());
    }

    #[test]
    fn unknown_property_fails_in_consumer_and_producer() {
        let bus = KafkaBus::new(KafkaConfig::new("127.0.0.1:1"));
        let Ok(bus) = bus else { panic!("bus creation should not fail: {:?}", bus.err()) };
        let cc = ConsumerConfig {
            group: "g".into(),
            topics: vec!["t".into()],
            client_id: "c".into(),
            from_earliest: true,
            properties: vec![kv("no.such.property", "1")],
        };
        let e = bus.consumer(&cc, Arc::new(NoRebalanceListener)).err();
        assert!(e.as_ref().is_some_and(|e| e.kind == BusErrorKind::Config && e.message.contains("no.such.property")), "{e:?}");
        let pc = ProducerConfig { client_id: "p".into(), properties: vec![kv("acks", "sometimes")], transactional_id: None };
        let e = bus.producer(&pc).err();
        assert!(e.as_ref().is_some_and(|e| e.kind == BusErrorKind::Config && e.message.contains("acks")), "{e:?}");
    }
}
