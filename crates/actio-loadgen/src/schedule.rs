//! The open-loop schedule and the sender that follows it.
//!
//! The i-th transaction's send time is fixed by the schedule before the run starts,
//! never by when the previous send finished. The sender sleeps until that time (the
//! last ~100 µs by spinning, so the schedule is kept to a few µs) or, when behind,
//! sends at once; either way the transaction's `created_at` and `actio-created`
//! header carry the *intended* time, and latency is measured from it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use actio_core::bus::Bytes;
use actio_core::{Headers, OutRecord, Producer, Schema, Tx, headers};

use crate::generate::Generator;

/// Offered load over time: a constant rate, or a linear ramp between two rates.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    /// Rate at the start, tx/s.
    pub start_rate: f64,
    /// Rate at the end, tx/s (= `start_rate` for a constant rate).
    pub end_rate: f64,
    /// How long load is offered.
    pub duration: Duration,
}

impl Schedule {
    /// A constant rate.
    pub fn constant(rate: f64, duration: Duration) -> Self {
        Schedule { start_rate: rate, end_rate: rate, duration }
    }

    /// The offset from the start (s) at which transaction `i` (from 0) is due, or
    /// `None` past the end. With rate r(t) = r0 + (r1−r0)·t/D, the count sent by t is
    /// N(t) = r0·t + (r1−r0)·t²/(2D); solve N(t) = i.
    pub fn due(&self, i: u64) -> Option<f64> {
        let d = self.duration.as_secs_f64();
        let (r0, r1, n) = (self.start_rate, self.end_rate, i as f64);
        let t = if (r1 - r0).abs() < 1e-9 {
            n / r0
        } else {
            let a = (r1 - r0) / (2.0 * d);
            (-r0 + (r0 * r0 + 4.0 * a * n).max(0.0).sqrt()) / (2.0 * a)
        };
        (t.is_finite() && t < d).then_some(t)
    }

    /// Transactions the schedule offers in total.
    pub fn total(&self) -> u64 {
        ((self.start_rate + self.end_rate) / 2.0 * self.duration.as_secs_f64()).ceil() as u64
    }

    /// The offered rate at offset `t` seconds.
    pub fn rate_at(&self, t: f64) -> f64 {
        let d = self.duration.as_secs_f64().max(1e-9);
        self.start_rate + (self.end_rate - self.start_rate) * (t / d).clamp(0.0, 1.0)
    }
}

/// What the sender did, readable while it runs.
#[derive(Debug, Default)]
pub struct SenderStats {
    /// Transactions handed to the producer.
    pub sent: AtomicU64,
    /// Sends acknowledged by the bus.
    pub acked: AtomicU64,
    /// Sends the bus failed.
    pub failed: AtomicU64,
    /// Largest lag behind the schedule seen, µs (how far the sender fell behind).
    pub max_behind_us: AtomicU64,
    /// Set when the schedule is done.
    pub done: AtomicBool,
    /// When the schedule's clock started (after the first send was acknowledged),
    /// ns since the epoch; 0 until then.
    pub started_ns: std::sync::atomic::AtomicI64,
}

/// Sends generated transactions on schedule.
#[derive(Debug)]
pub struct Sender {
    /// Per-key sequence number of each transaction, by its global sequence: the
    /// collector checks per-key order with it.
    pub key_seq: Arc<[AtomicU32]>,
    /// The sender's counters.
    pub stats: Arc<SenderStats>,
}

/// Most keys the sender's and the collector's per-key maps are sized for up front.
pub(crate) const MAX_PRESIZED_KEYS: usize = 4_000_000;

impl Sender {
    /// A sender for `schedule`.
    pub fn new(schedule: &Schedule) -> Self {
        let n = schedule.total() as usize + 16;
        Sender { key_seq: (0..n).map(|_| AtomicU32::new(0)).collect(), stats: Arc::new(SenderStats::default()) }
    }

    /// Runs the schedule to the end (or until `stop`), sending transactions as
    /// `schema`'s ingress JSON, keyed by `key_of(tx)`, to one of `topics` (a pipeline
    /// with several flows has an ingress topic each): the topic is chosen by the key,
    /// so one key's transactions stay in one flow, in order. The intended time of
    /// transaction `i` is the schedule's start + `due(i)` ([`SenderStats::started_ns`]
    /// has the start). `record` sees each transaction's payload as it goes out (`actio run
    /// --record-traffic` writes them to a file, for `actio replay`). The first
    /// transaction goes out alone: the clock starts once the bus acknowledged it
    /// ([`FIRST_ACK_WAIT`] at most), so a producer's start-up is not charged to the load.
    #[allow(clippy::too_many_arguments)]
    pub fn run<P: Producer>(
        &self,
        producer: &P,
        topics: &[String],
        generator: &mut Generator,
        schema: &Schema,
        schedule: &Schedule,
        key_of: impl Fn(&Tx) -> String,
        stop: &AtomicBool,
        progress: impl Fn(u64),
        mut record: impl FnMut(&[u8]),
    ) {
        let topics: Vec<Arc<str>> = topics.iter().map(|t| Arc::from(t.as_str())).collect();
        let flow_of = |key: &str| flow_of(key, topics.len());
        let mut start = Instant::now();
        let mut start_ns = actio_core::time::now_ns();
        // Sized for the run up front: growing a map of ~10^5 keys rehashes it at once,
        // a pause of milliseconds in the sender that every later send carries in its
        // e2e (seen as 2-4 ms per-second p99 spikes with mostly distinct keys).
        let mut per_key: ahash::AHashMap<String, u32> = ahash::AHashMap::with_capacity(self.key_seq.len().min(MAX_PRESIZED_KEYS));
        let mut i: u64 = 0;
        while let Some(due) = schedule.due(i) {
            if stop.load(Ordering::Relaxed) || i as usize >= self.key_seq.len() {
                break;
            }
            let due_at = start + Duration::from_secs_f64(due);
            let now = Instant::now();
            if due_at > now {
                // Sleep, never spin: spinning burnt up to a core of the two that the
                // pipeline (and, on Kafka, the broker) runs on. A sleep overshoots by
                // ~50-80 µs; what falls due meanwhile goes out back to back, and latency
                // is counted from the intended time either way (no coordinated omission).
                std::thread::sleep(due_at - now);
            } else {
                let behind = (now - due_at).as_micros() as u64;
                self.stats.max_behind_us.fetch_max(behind, Ordering::Relaxed);
            }
            let intended_ns = start_ns + (due * 1e9) as i64;
            let tx = generator.next(i, intended_ns);
            let key = key_of(&tx);
            let ks = per_key.entry(key.clone()).or_insert(0);
            *ks += 1;
            self.key_seq[i as usize].store(*ks, Ordering::Relaxed);
            let payload = schema.encode_json(&tx);
            record(&payload);
            let mut h = Headers::default();
            h.set(headers::ID, schema.id_of(&tx).as_bytes().to_vec());
            h.set(headers::CREATED, intended_ns.to_string().into_bytes());
            let stats = self.stats.clone();
            let topic = topics[flow_of(&key)].clone();
            let rec = OutRecord { topic, partition: None, key: Some(Bytes::from(key.into_bytes())), payload: Bytes::from(payload), headers: h };
            let sent = producer.send(
                rec,
                Box::new(move |r| {
                    let c = if r.is_ok() { &stats.acked } else { &stats.failed };
                    c.fetch_add(1, Ordering::Relaxed);
                }),
            );
            if let Err(e) = sent {
                tracing::warn!(error = %e, "send failed");
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
            }
            self.stats.sent.fetch_add(1, Ordering::Relaxed);
            if i == 0 {
                // The schedule's clock starts once the bus has the first transaction.
                self.await_first_ack(stop);
                (start, start_ns) = (Instant::now(), actio_core::time::now_ns());
                self.stats.started_ns.store(start_ns, Ordering::Relaxed);
            }
            i += 1;
            if i.is_multiple_of(4096) {
                progress(i);
            }
        }
        self.stats.done.store(true, Ordering::Release);
    }

    /// Waits until the first send is acknowledged (or failed), at most
    /// [`FIRST_ACK_WAIT`]. A fresh Kafka producer holds its sends until it has an
    /// idempotent producer id, and librdkafka retries that request every 500 ms: in
    /// about one start of five the id comes half a second late (measured: 2 of 10
    /// starts, the rest ~50 ms). An open-loop clock started before it would charge that
    /// wait to the first ~0.5 s of transactions, as a pipeline stall that is not there.
    /// So the first transaction goes out alone (its own e2e keeps the wait) and the
    /// schedule starts when the bus has it.
    fn await_first_ack(&self, stop: &AtomicBool) {
        let waited = Instant::now();
        while self.stats.acked.load(Ordering::Relaxed) + self.stats.failed.load(Ordering::Relaxed) == 0 {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            if waited.elapsed() >= FIRST_ACK_WAIT {
                tracing::warn!(waited = ?FIRST_ACK_WAIT, "the bus has not acknowledged the first transaction; starting the schedule anyway");
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        tracing::debug!(waited = ?waited.elapsed(), "first transaction acknowledged; the schedule starts");
    }
}

/// How long the sender waits for its first send's acknowledgement before it starts the
/// schedule anyway (see [`Sender::run`]).
pub const FIRST_ACK_WAIT: Duration = Duration::from_secs(10);

/// Which of `flows` ingress topics a key's transactions go to: FNV-1a, stable across
/// runs and processes (unlike the std hasher), so one key stays in one flow — the
/// load generator and `actio replay` agree.
pub fn flow_of(key: &str, flows: usize) -> usize {
    let h = key.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
    (h % flows.max(1) as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_rate_spaces_sends_evenly() {
        let s = Schedule::constant(1000.0, Duration::from_secs(2));
        assert_eq!(s.due(0), Some(0.0));
        assert!((s.due(500).unwrap() - 0.5).abs() < 1e-9);
        assert_eq!(s.due(2000), None);
        assert_eq!(s.total(), 2000);
    }

    /// A bus that acknowledges the first send only after `first_ack_after` (as a fresh
    /// Kafka producer does while it waits for its producer id) and every later send at
    /// once; it keeps each send's intended time (the `actio-created` header).
    #[derive(Clone)]
    struct SlowToStart {
        first_ack_after: Duration,
        created_ns: Arc<std::sync::Mutex<Vec<i64>>>,
    }

    impl Producer for SlowToStart {
        fn send(&self, record: OutRecord, ack: actio_core::bus::AckFn) -> Result<(), actio_core::bus::BusError> {
            let created = std::str::from_utf8(record.headers.get(headers::CREATED).unwrap()).unwrap().parse().unwrap();
            let mut all = self.created_ns.lock().unwrap();
            all.push(created);
            let delivered = actio_core::bus::Delivered { partition: 0, offset: all.len() as i64 - 1 };
            match all.len() {
                1 => {
                    let wait = self.first_ack_after;
                    std::thread::spawn(move || {
                        std::thread::sleep(wait);
                        ack(Ok(delivered));
                    });
                }
                _ => ack(Ok(delivered)),
            }
            Ok(())
        }

        fn flush(&self, _: Duration) -> Result<(), actio_core::bus::BusError> {
            Ok(())
        }
    }

    #[test]
    fn the_clock_starts_when_the_bus_has_the_first_transaction() {
        let dir = tempfile::tempdir().unwrap();
        let schema = "[record]\nid = \"id\"\ntime = \"at\"\n[[field]]\nname = \"id\"\ntype = \"string\"\n[[field]]\nname = \"at\"\ntype = \"timestamp\"\n[decision]\noutcomes = [\"ok\"]\n";
        let schema = Arc::new(Schema::from_toml(schema, std::path::Path::new("schema.toml")).unwrap());
        let scenario = dir.path().join("s.toml");
        std::fs::write(&scenario, "[[field]]\nname = \"id\"\ngen = \"id\"\n[[field]]\nname = \"at\"\ngen = \"send_time\"\n").unwrap();
        let mut generator = Generator::new(schema.clone(), &crate::Scenario::load(&scenario).unwrap(), "run").unwrap();
        let schedule = Schedule::constant(1000.0, Duration::from_millis(50));
        let bus = SlowToStart { first_ack_after: Duration::from_millis(300), created_ns: Arc::default() };
        let sender = Sender::new(&schedule);
        sender.run(&bus, &["in".to_string()], &mut generator, &schema, &schedule, |tx| schema.id_of(tx).to_string(), &AtomicBool::new(false), |_| {}, |_| {});
        let created = bus.created_ns.lock().unwrap().clone();
        assert_eq!(created.len(), 50, "the whole schedule is sent");
        let gap_ms = |a: usize, b: usize| (created[b] - created[a]) as f64 / 1e6;
        assert!(gap_ms(0, 1) >= 300.0, "the second transaction is due only after the first was acknowledged: {} ms", gap_ms(0, 1));
        assert!((gap_ms(1, 49) - 48.0).abs() < 0.01, "the rest keep the schedule from the new start: {} ms", gap_ms(1, 49));
    }

    #[test]
    fn ramp_offers_the_area_under_the_rate() {
        let s = Schedule { start_rate: 100.0, end_rate: 300.0, duration: Duration::from_secs(10) };
        assert_eq!(s.total(), 2000);
        // Half way in time, (100 + 200)/2 · 5 = 750 sent.
        assert!((s.due(750).unwrap() - 5.0).abs() < 1e-6);
        let last = (0..).take_while(|i| s.due(*i).is_some()).count();
        assert!((1995..=2000).contains(&last), "{last}");
        // Monotone.
        let mut prev = -1.0;
        for i in 0..2000 {
            if let Some(t) = s.due(i) {
                assert!(t > prev);
                prev = t;
            }
        }
    }
}
