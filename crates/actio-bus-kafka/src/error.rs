//! librdkafka's errors mapped to [`BusErrorKind`], so the runtime can decide between
//! retry, dead-letter and stop without knowing about Kafka.

use actio_core::bus::{BusError, BusErrorKind};
use rdkafka::error::{KafkaError, RDKafkaErrorCode as Code};

/// The kind of a librdkafka error code.
pub(crate) fn kind_of_code(code: Code) -> BusErrorKind {
    match code {
        Code::QueueFull => BusErrorKind::QueueFull,
        Code::UnknownTopicOrPartition | Code::UnknownTopic | Code::UnknownPartition | Code::InvalidTopic => {
            BusErrorKind::UnknownTopic
        }
        Code::InvalidArgument
        | Code::InvalidConfig
        | Code::InvalidPartitions
        | Code::InvalidReplicationFactor
        | Code::InvalidRequiredAcks
        | Code::PolicyViolation
        | Code::MessageSizeTooLarge
        | Code::InvalidRecord
        | Code::InvalidGroupId
        | Code::UnsupportedFeature
        | Code::NotImplemented => BusErrorKind::Config,
        Code::Fatal
        | Code::Fenced
        | Code::ProducerFenced
        | Code::FencedInstanceId
        | Code::InvalidProducerEpoch
        | Code::Authentication
        | Code::SaslAuthenticationFailed
        | Code::TopicAuthorizationFailed
        | Code::GroupAuthorizationFailed
        | Code::ClusterAuthorizationFailed
        | Code::PurgeQueue
        | Code::PurgeInflight
        | Code::State => BusErrorKind::Fatal,
        // Network, leader change, timeouts, rebalance in progress, coordinator moves:
        // librdkafka recovers from these on its own; trying again later may succeed.
        _ => BusErrorKind::Transient,
    }
}

/// Maps an rdkafka error, keeping librdkafka's own message.
pub(crate) fn bus_error(e: &KafkaError) -> BusError {
    let kind = match e {
        KafkaError::ClientConfig(..) | KafkaError::ClientCreation(_) | KafkaError::Nul(_) => BusErrorKind::Config,
        KafkaError::Subscription(_) => BusErrorKind::Config,
        KafkaError::MessageConsumptionFatal(_) => BusErrorKind::Fatal,
        KafkaError::Transaction(t) if t.is_fatal() => BusErrorKind::Fatal,
        KafkaError::Transaction(t) if t.is_retriable() => BusErrorKind::Transient,
        KafkaError::Canceled => BusErrorKind::Fatal,
        // rdkafka reports no code for admin errors through rdkafka_error_code().
        KafkaError::AdminOp(code) => kind_of_code(*code),
        other => match other.rdkafka_error_code() {
            Some(code) => kind_of_code(code),
            None => BusErrorKind::Transient,
        },
    };
    BusError::new(kind, e.to_string())
}

/// Maps an rdkafka error, prefixed with what we were doing.
pub(crate) fn bus_error_ctx(what: &str, e: &KafkaError) -> BusError {
    let b = bus_error(e);
    BusError::new(b.kind, format!("{what}: {}", b.message))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_full_is_retriable_and_fencing_is_fatal() {
        let q = bus_error(&KafkaError::MessageProduction(Code::QueueFull));
        assert_eq!(q.kind, BusErrorKind::QueueFull);
        assert!(q.is_retriable());
        let f = bus_error(&KafkaError::MessageProduction(Code::ProducerFenced));
        assert_eq!(f.kind, BusErrorKind::Fatal);
        assert!(!f.is_retriable());
    }

    #[test]
    fn network_errors_are_transient_and_unknown_topics_are_not() {
        assert_eq!(bus_error(&KafkaError::MessageConsumption(Code::AllBrokersDown)).kind, BusErrorKind::Transient);
        assert_eq!(bus_error(&KafkaError::MessageProduction(Code::MessageTimedOut)).kind, BusErrorKind::Transient);
        let u = bus_error(&KafkaError::MessageConsumption(Code::UnknownTopicOrPartition));
        assert_eq!(u.kind, BusErrorKind::UnknownTopic);
        assert!(!u.is_retriable());
    }

    #[test]
    fn config_errors_keep_the_message() {
        let e = bus_error(&KafkaError::ClientCreation("boom: no brokers".into()));
        assert_eq!(e.kind, BusErrorKind::Config);
        assert!(e.message.contains("boom: no brokers"), "{}", e.message);
        let c = bus_error_ctx("create topics", &KafkaError::AdminOp(Code::PolicyViolation));
        assert!(c.message.starts_with("create topics: "), "{}", c.message);
        assert_eq!(c.kind, BusErrorKind::Config);
    }
}
