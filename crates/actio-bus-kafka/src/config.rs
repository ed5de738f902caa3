//! librdkafka properties for every client this bus makes, layered in one visible place:
//! our latency-tuned defaults, then the pipeline's `[kafka]` table, then the per-client
//! properties, then the few settings the bus's guarantees depend on.
//!
//! Properties are passed to librdkafka unchanged, so SASL/TLS and anything else
//! librdkafka knows work as documented there; a bad name or value fails when the client
//! is created, with librdkafka's own message.

use rdkafka::ClientConfig;

/// How to reach Kafka, and the pipeline's `[kafka]` table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KafkaConfig {
    /// `bootstrap.servers`, e.g. `127.0.0.1:9092`. A `bootstrap.servers` entry in
    /// `properties` takes precedence.
    pub brokers: String,
    /// librdkafka properties for every client (consumers, producers, admin), passed
    /// through unchanged; they override the defaults below.
    pub properties: Vec<(String, String)>,
}

impl KafkaConfig {
    /// A config with only the brokers set.
    pub fn new(brokers: impl Into<String>) -> Self {
        KafkaConfig { brokers: brokers.into(), properties: Vec::new() }
    }
}

/// Consumer defaults, overridable.
///
/// - `fetch.wait.max.ms=5`: a broker holds an empty fetch at most this long, so a
///   message arriving on an idle partition waits ≤ 5 ms, not the default 500 ms.
/// - `session.timeout.ms=6000` / `heartbeat.interval.ms=1000`: a dead member's
///   partitions move after ~6 s. 6000 is the floor that Kafka brokers accept by default
///   (`group.min.session.timeout.ms=6000`, checked on Kafka 4.4.0). librdkafka
///   heartbeats from its own thread, so a busy poll loop does not cause false expiry.
/// - `auto.commit.interval.ms=100`: see [`crate::consumer`] — the runtime stores a
///   watermark every few ms; librdkafka sends the latest stored offsets every 100 ms.
/// - `partition.assignment.strategy=cooperative-sticky`: a rebalance only moves the
///   partitions that change owner; the others keep flowing.
pub const CONSUMER_DEFAULTS: &[(&str, &str)] = &[
    ("partition.assignment.strategy", "cooperative-sticky"),
    ("fetch.wait.max.ms", "5"),
    ("fetch.min.bytes", "1"),
    ("socket.nagle.disable", "true"),
    ("session.timeout.ms", "6000"),
    ("heartbeat.interval.ms", "1000"),
    ("enable.auto.commit", "true"),
    ("auto.commit.interval.ms", "100"),
    ("enable.partition.eof", "false"),
];

/// Consumer defaults that belong to the classic group protocol: with
/// `group.protocol=consumer` (KIP-848) the broker owns assignment, session and
/// heartbeat, and librdkafka refuses these properties, so they are left out.
pub const CLASSIC_PROTOCOL_ONLY: &[&str] = &["partition.assignment.strategy", "session.timeout.ms", "heartbeat.interval.ms"];

/// The consumer defaults for the group protocol the user's `layers` choose.
pub(crate) fn consumer_defaults(layers: &[&[(String, String)]]) -> Vec<(&'static str, &'static str)> {
    let protocol = layers.iter().flat_map(|l| l.iter()).filter(|(k, _)| k == "group.protocol").map(|(_, v)| v.trim().to_ascii_lowercase()).next_back();
    let kip848 = protocol.as_deref() == Some("consumer");
    CONSUMER_DEFAULTS.iter().copied().filter(|(k, _)| !(kip848 && CLASSIC_PROTOCOL_ONLY.contains(k))).collect()
}

/// Producer defaults, overridable.
///
/// - `partitioner=murmur2_random`: Java's default partitioner for keyed messages
///   (librdkafka's own default, `consistent_random`, is CRC32 and would put a key on
///   another partition than Java clients and the embedded bus do).
/// - `enable.idempotence=true`, `acks=all`: no duplicates or reordering from retries,
///   and an ack means the write is on every in-sync replica.
/// - `linger.ms=1`: as in Kafka's published latency benchmarks; batches form under load
///   and cost at most 1 ms when idle. Worth measuring 0, 1 and 5 under the fraud chain's
///   load: e2e p99 vs. requests per second at the broker.
pub const PRODUCER_DEFAULTS: &[(&str, &str)] = &[
    ("partitioner", "murmur2_random"),
    ("enable.idempotence", "true"),
    ("acks", "all"),
    ("linger.ms", "1"),
    ("socket.nagle.disable", "true"),
];

/// Builds a client config: `defaults`, then `brokers`, then each layer of user
/// properties in order (later wins), then `forced`.
pub(crate) fn layered(
    brokers: &str,
    defaults: &[(&str, &str)],
    layers: &[&[(String, String)]],
    forced: &[(&str, &str)],
) -> ClientConfig {
    let mut c = ClientConfig::new();
    for (k, v) in defaults {
        c.set(*k, *v);
    }
    if !brokers.is_empty() {
        c.set("bootstrap.servers", brokers);
    }
    for layer in layers {
        for (k, v) in layer.iter() {
            c.set(k.as_str(), v.as_str());
        }
    }
    for (k, v) in forced {
        c.set(*k, *v);
    }
    c
}

/// Whether a boolean librdkafka property is on (librdkafka accepts true/false/1/0).
pub(crate) fn is_true(c: &ClientConfig, key: &str) -> bool {
    c.get(key).is_some_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "true" | "1" | "yes" | "on"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(k: &str, v: &str) -> (String, String) {
        (k.to_string(), v.to_string())
    }

    #[test]
    fn later_layers_override_defaults_and_forced_wins() {
        let pipeline = vec![kv("linger.ms", "7"), kv("security.protocol", "SASL_SSL")];
        let client = vec![kv("linger.ms", "9")];
        let c = layered(
            "h:1",
            PRODUCER_DEFAULTS,
            &[&pipeline, &client],
            &[("enable.auto.offset.store", "false")],
        );
        assert_eq!(c.get("linger.ms"), Some("9"));
        assert_eq!(c.get("security.protocol"), Some("SASL_SSL"));
        assert_eq!(c.get("partitioner"), Some("murmur2_random"));
        assert_eq!(c.get("bootstrap.servers"), Some("h:1"));
        assert_eq!(c.get("enable.auto.offset.store"), Some("false"));
    }

    #[test]
    fn the_kip_848_protocol_drops_the_classic_group_settings() {
        let classic = consumer_defaults(&[&[kv("linger.ms", "1")]]);
        assert!(classic.iter().any(|(k, _)| *k == "session.timeout.ms"));
        let kip848 = consumer_defaults(&[&[], &[kv("group.protocol", "consumer")]]);
        assert!(kip848.iter().all(|(k, _)| !CLASSIC_PROTOCOL_ONLY.contains(k)), "{kip848:?}");
        assert!(kip848.iter().any(|(k, _)| *k == "fetch.wait.max.ms"));
        let back = consumer_defaults(&[&[kv("group.protocol", "consumer")], &[kv("group.protocol", "classic")]]);
        assert!(back.iter().any(|(k, _)| *k == "session.timeout.ms"), "the later layer wins");
    }

    #[test]
    fn bootstrap_servers_in_properties_beats_brokers() {
        let c = layered("h:1", &[], &[&[kv("bootstrap.servers", "other:2")]], &[]);
        assert_eq!(c.get("bootstrap.servers"), Some("other:2"));
    }

    #[test]
    fn booleans_are_read_like_librdkafka() {
        let mut c = ClientConfig::new();
        c.set("a", "TRUE").set("b", "0").set("c", "false");
        assert!(is_true(&c, "a"));
        assert!(!is_true(&c, "b"));
        assert!(!is_true(&c, "c"));
        assert!(!is_true(&c, "missing"));
    }
}
