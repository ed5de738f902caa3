//! The copies of a failed message: to the DLQ, or to the stage's retry topic, each
//! with the original bytes, key and headers plus why, where and how often it failed.
//! The `actio-source` header is written and read here only, so its format has one
//! writer and one parser.

use std::sync::Arc;

use actio_core::time::now_ns;
use actio_core::{Headers, Offset, OutRecord, Producer, Record, TopicPartition, headers};

use super::retry_topic::RetryTopic;
use super::state::Shared;
use super::{Context, HandlerError};

/// An `actio-source` value: `topic/partition/offset`.
fn source_value(tp: &TopicPartition, offset: Offset) -> Vec<u8> {
    format!("{}/{}/{offset}", tp.topic, tp.partition).into_bytes()
}

/// The input partition and offset that a retry copy's `actio-source` names, if it has
/// a readable one (the topic may itself contain `/`).
pub(super) fn source_of(rec: &Record) -> Option<(TopicPartition, Offset)> {
    parse_source(rec.headers.get(headers::SOURCE)?)
}

fn parse_source(value: &[u8]) -> Option<(TopicPartition, Offset)> {
    let mut it = std::str::from_utf8(value).ok()?.rsplitn(3, '/');
    let offset = it.next()?.parse().ok()?;
    let partition = it.next()?.parse().ok()?;
    Some((TopicPartition { topic: Arc::from(it.next()?), partition }, offset))
}

impl<P: Producer> Shared<P> {
    /// The input's headers plus why (`actio-error`) and where (`actio-stage`,
    /// `actio-source`) it failed; `actio-source` keeps naming the input the message was
    /// first consumed from when it comes back from the retry topic.
    fn failure_headers(&self, rec: &Record, e: &HandlerError, ctx: &Context) -> Headers {
        let mut hdrs = rec.headers.clone();
        hdrs.set(headers::ERROR, e.message.clone().into_bytes());
        hdrs.set(headers::STAGE, self.spec.name.clone().into_bytes());
        if !(ctx.from_retry_topic && hdrs.get(headers::SOURCE).is_some()) {
            hdrs.set(headers::SOURCE, source_value(&ctx.source, ctx.source_offset));
        }
        hdrs
    }

    /// The DLQ copy: original bytes, key and headers, plus why, where and (after
    /// retries) how many attempts. `actio-source` names the input the message was first
    /// consumed from, also when it comes back from the retry topic.
    pub(super) fn dead_letter(&self, rec: &Record, e: &HandlerError, ctx: &Context) -> OutRecord {
        tracing::debug!(stage = %self.spec.name, tp = %rec.tp, offset = rec.offset, error = %e, "dead-lettering");
        let mut hdrs = self.failure_headers(rec, e, ctx);
        if ctx.attempt > 1 {
            hdrs.set(headers::ATTEMPTS, ctx.attempt.to_string().into_bytes());
        }
        hdrs.remove(headers::RETRY_DUE);
        OutRecord { topic: self.spec.dlq.clone(), partition: None, key: rec.key.clone(), payload: rec.payload.clone(), headers: hdrs }
    }

    /// The retry-topic copy: original bytes, key and headers, plus the attempts so far,
    /// this trip's number, when it is due, the last error and where it came from. Keyed
    /// like the input, so one key's retries share a retry partition and stay in order
    /// among themselves.
    pub(super) fn retry_copy(&self, rec: &Record, e: &HandlerError, t: &RetryTopic, ctx: &Context, trip: u32) -> OutRecord {
        tracing::debug!(stage = %self.spec.name, tp = %rec.tp, offset = rec.offset, error = %e, trip, "to the retry topic");
        let mut hdrs = self.failure_headers(rec, e, ctx);
        let due = now_ns().saturating_add(t.delay_of_trip(trip).as_nanos().min(i64::MAX as u128) as i64);
        hdrs.set(headers::ATTEMPTS, ctx.attempt.to_string().into_bytes());
        hdrs.set(headers::RETRY_COUNT, trip.to_string().into_bytes());
        hdrs.set(headers::RETRY_DUE, due.to_string().into_bytes());
        OutRecord { topic: t.topic.clone(), partition: None, key: rec.key.clone(), payload: rec.payload.clone(), headers: hdrs }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_round_trips_also_with_slashes_in_the_topic() {
        let tp = |t: &str, p| TopicPartition::new(t, p);
        assert_eq!(parse_source(&source_value(&tp("tx.in", 3), 42)), Some((tp("tx.in", 3), 42)));
        assert_eq!(parse_source(&source_value(&tp("a/b", 0), 7)), Some((tp("a/b", 0), 7)));
        assert_eq!(parse_source(b"tx.in/x/1"), None);
        assert_eq!(parse_source(b"nothing"), None);
    }
}
