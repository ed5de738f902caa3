//! The Kafka producer: librdkafka's `ThreadedProducer` (its own thread serves delivery
//! reports), with each record's [`AckFn`] carried through librdkafka as the delivery
//! opaque.
//!
//! Guarantee: every record that `send` accepts (`Ok(())`) has its `AckFn` called exactly
//! once — with the partition and offset when the broker acknowledged it (`acks=all` by
//! default), or with an error when librdkafka gave up (message timeout, purge at
//! shutdown, fatal idempotence error). When `send` returns `Err`, the record was not
//! queued and the `AckFn` is dropped uncalled: the caller owns that failure (this is how
//! the runtime uses the trait).

use std::sync::Arc;
use std::time::{Duration, Instant};

use actio_core::bus::{AckFn, BusError, BusErrorKind, Delivered, GroupToken, Offset, OutRecord, Producer, TopicPartition};
use rdkafka::consumer::ConsumerGroupMetadata;
use rdkafka::topic_partition_list::{Offset as RdOffset, TopicPartitionList};
use rdkafka::client::ClientContext;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer as _, ProducerContext, ThreadedProducer};
use rdkafka::ClientConfig;

use crate::error::{bus_error, bus_error_ctx};
use crate::log_to_tracing;

/// How long `send` keeps retrying while librdkafka's local queue is full, before it
/// returns `QueueFull`. Long enough to ride out a burst (deliveries drain the queue),
/// short enough that a stalled broker surfaces as back-pressure.
pub const QUEUE_FULL_WAIT: Duration = Duration::from_secs(1);

/// An [`AckFn`] made `Sync` for librdkafka's opaque (rdkafka requires `Send + Sync`);
/// the lock is taken once, uncontended, when the delivery report arrives.
pub struct AckSlot(parking_lot::Mutex<Option<AckFn>>);

impl std::fmt::Debug for AckSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AckSlot")
    }
}

/// Delivers acks. One per producer, shared with librdkafka's delivery-report thread.
#[derive(Debug, Default)]
pub struct AckContext;

impl ClientContext for AckContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        log_to_tracing("producer", level, fac, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(client = "producer", error = %error, reason, "librdkafka error");
    }
}

impl ProducerContext for AckContext {
    type DeliveryOpaque = Box<AckSlot>;

    fn delivery(&self, result: &DeliveryResult<'_>, slot: Box<AckSlot>) {
        let outcome = match result {
            Ok(m) => Ok(Delivered { partition: m.partition(), offset: m.offset() }),
            Err((e, m)) => {
                let b = bus_error(e);
                Err(BusError::new(b.kind, format!("{} [{}]: {}", m.topic(), m.partition(), b.message)))
            }
        };
        if let Some(ack) = slot.0.lock().take() {
            ack(outcome);
        }
    }
}

/// A Kafka producer; cheap to clone (all clones share one librdkafka handle).
#[derive(Clone)]
pub struct KafkaProducer {
    inner: Arc<ThreadedProducer<AckContext>>,
    transactional: bool,
}

/// How long a transaction's calls (init, offsets, commit) may take before the stage
/// gives up on them.
pub const TRANSACTION_TIMEOUT: Duration = Duration::from_secs(30);

impl std::fmt::Debug for KafkaProducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaProducer").field("in_flight", &self.inner.in_flight_count()).finish()
    }
}

impl KafkaProducer {
    pub(crate) fn create(config: &ClientConfig, transactional: bool) -> Result<Self, BusError> {
        let p: ThreadedProducer<AckContext> =
            config.create_with_context(AckContext).map_err(|e| bus_error_ctx("creating producer", &e))?;
        if transactional {
            // Fences an earlier producer with the same id (its open transaction is
            // aborted), then opens the first transaction.
            p.init_transactions(TRANSACTION_TIMEOUT).map_err(|e| bus_error_ctx("initializing transactions", &e))?;
            p.begin_transaction().map_err(|e| bus_error_ctx("beginning a transaction", &e))?;
        }
        // Connect now rather than on the first send. Best effort: a broker that is
        // down is retried by librdkafka. This does not wait for the idempotent
        // producer id, which in about one start of five comes ~0.5 s late
        // (librdkafka retries its request every 500 ms): sends queue until then. The
        // load generator therefore starts its clock only once its first send is
        // acknowledged (`actio_loadgen::schedule::FIRST_ACK_WAIT`).
        if let Err(e) = p.client().fetch_metadata(None, Duration::from_secs(5)) {
            tracing::debug!(error = %e, "producer warm-up: metadata not fetched yet");
        }
        Ok(KafkaProducer { inner: Arc::new(p), transactional })
    }

    /// Messages queued or in flight (not yet acknowledged).
    pub fn in_flight(&self) -> i32 {
        self.inner.in_flight_count()
    }

    /// Waits, until `deadline` at most, for every message sent to be acknowledged.
    /// rdkafka's flush (and commit_transaction, which flushes first) polls in steps
    /// of 100 ms while anything is in flight, though this producer's own thread
    /// serves the delivery reports: a commit cost ≥ 100 ms, and so did a flush at
    /// stop. Waiting here (a few ms) leaves them nothing to wait for: ~2 ms.
    fn wait_acknowledged(&self, deadline: Instant) {
        while self.inner.in_flight_count() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}

impl Producer for KafkaProducer {
    fn send(&self, record: OutRecord, ack: AckFn) -> Result<(), BusError> {
        let headers = if record.headers.0.is_empty() {
            None
        } else {
            let mut h = OwnedHeaders::new_with_capacity(record.headers.0.len());
            for (k, v) in record.headers.iter() {
                h = h.insert(Header { key: k, value: Some(v) });
            }
            Some(h)
        };
        let mut rec: BaseRecord<'_, [u8], [u8], Box<AckSlot>> =
            BaseRecord::with_opaque_to(&record.topic, Box::new(AckSlot(parking_lot::Mutex::new(Some(ack))))).payload(record.payload.as_ref());
        if let Some(k) = &record.key {
            rec = rec.key(k.as_ref());
        }
        if let Some(p) = record.partition {
            rec = rec.partition(p);
        }
        if let Some(h) = headers {
            rec = rec.headers(h);
        }
        let mut deadline: Option<Instant> = None;
        loop {
            match self.inner.send(rec) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull), back)) => {
                    let d = *deadline.get_or_insert_with(|| Instant::now() + QUEUE_FULL_WAIT);
                    if Instant::now() >= d {
                        return Err(BusError::new(
                            BusErrorKind::QueueFull,
                            format!(
                                "{}: local queue full for {} ms (queue.buffering.max.messages/kbytes)",
                                record.topic,
                                QUEUE_FULL_WAIT.as_millis()
                            ),
                        ));
                    }
                    // The producer's own thread serves delivery reports; give it a moment.
                    std::thread::sleep(Duration::from_millis(1));
                    rec = back;
                }
                Err((e, _)) => return Err(bus_error_ctx(&format!("producing to {}", record.topic), &e)),
            }
        }
    }

    fn flush(&self, timeout: Duration) -> Result<(), BusError> {
        let deadline = Instant::now() + timeout;
        self.wait_acknowledged(deadline);
        self.inner.flush(deadline.saturating_duration_since(Instant::now())).map_err(|e| {
            let b = bus_error(&e);
            BusError::new(b.kind, format!("flush: {} message(s) still in flight: {}", self.inner.in_flight_count(), b.message))
        })
    }

    fn is_transactional(&self) -> bool {
        self.transactional
    }

    /// `send_offsets_to_transaction` per group (with its consumer group metadata,
    /// which carries the generation: a zombie member's offsets are refused, KIP-447),
    /// `commit_transaction` (flushes first), `begin_transaction`. Any failure is
    /// fatal for the stage: the open transaction is aborted by the broker when the
    /// producer goes, or fenced by the member that replaces it.
    fn commit_transaction(&self, offsets: &[(GroupToken, Vec<(TopicPartition, Offset)>)]) -> Result<(), BusError> {
        let fatal = |what: &str, e: &KafkaError| BusError::new(BusErrorKind::Fatal, bus_error_ctx(what, e).message);
        for (token, tps) in offsets {
            let Some(meta) = token.downcast_ref::<ConsumerGroupMetadata>() else {
                return Err(BusError::new(BusErrorKind::Fatal, "a group token that is not a Kafka consumer's"));
            };
            let mut tpl = TopicPartitionList::with_capacity(tps.len());
            for (tp, o) in tps {
                tpl.add_partition_offset(&tp.topic, tp.partition, RdOffset::Offset(*o)).map_err(|e| fatal("offsets for the transaction", &e))?;
            }
            self.inner.send_offsets_to_transaction(&tpl, meta, TRANSACTION_TIMEOUT).map_err(|e| fatal("sending offsets to the transaction", &e))?;
        }
        // commit_transaction flushes first: wait for the acknowledgements here.
        self.wait_acknowledged(Instant::now() + TRANSACTION_TIMEOUT);
        self.inner.commit_transaction(TRANSACTION_TIMEOUT).map_err(|e| fatal("committing the transaction", &e))?;
        self.inner.begin_transaction().map_err(|e| fatal("beginning a transaction", &e))
    }
}
