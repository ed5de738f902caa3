//! actio's core vocabulary, shared by every other crate.
//!
//! This crate depends on almost nothing so that the engine, the buses, the runtime
//! and the load generator can all point down at it: the declared records ([`schema`]), the state between stages
//! ([`tx`]), the wire codecs ([`codec`]), the timing/tracing headers ([`headers`])
//! and the transport abstraction ([`bus`]).
#![deny(missing_docs)]

pub mod bus;
pub mod codec;
pub mod cpu;
pub mod headers;
pub mod latency;
pub mod schema;
pub mod time;
pub mod tx;

pub use bus::{
    AckFn, Bus, BusError, BusErrorKind, Consumer, ConsumerConfig, GroupToken, Headers, Offset, OutRecord,
    Producer, ProducerConfig, RebalanceListener, Record, TopicPartition, TopicSpec,
};
pub use codec::{Codec, CodecError};
pub use schema::{FileError, InvalidField, KeyExtractor, Schema, Tx};
pub use tx::{Decision, RuleHit, TxState};
