//! The collector: reads decisions and dead letters, proves nothing was lost,
//! duplicated or reordered, and measures latency from the intended send time, for the
//! run and per wall-clock second ([`E2eBySecond`]).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use actio_core::{Codec, Decision, Record, TopicPartition, headers};
use actio_core::time::NS_PER_S;
use ahash::AHashMap;
use hdrhistogram::Histogram;
use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};

use crate::report::{latency_histogram, record_ns};

/// Counts the collector keeps.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct CollectorStats {
    /// Distinct transactions decided.
    pub decided: u64,
    /// Distinct transactions dead-lettered (and not decided).
    pub dlq: u64,
    /// Deliveries beyond the first of one transaction (decision or DLQ).
    pub duplicates: u64,
    /// First deliveries that came before an earlier-sent transaction of the same key.
    /// A transaction that went through a retry topic (documented to leave its key's
    /// order) is counted in `reordered_by_retry` instead.
    pub order_violations: u64,
    /// Distinct transactions whose first delivery went through a retry topic
    /// (`actio-retried` on a decision, `actio-retry-count` on a DLQ copy).
    pub retried: u64,
    /// First deliveries of retried transactions that came after a later-sent
    /// transaction of the same key: the retry topic's ordering effect, not a violation.
    pub reordered_by_retry: u64,
    /// Records read again at an offset the collector had already read (its own
    /// group rebalanced and it resumed from its last commit), ignored: they are the
    /// collector's re-reads, not duplicates the pipeline produced.
    pub reread: u64,
    /// Messages whose id is not from this run (old data on the topic), ignored.
    pub foreign: u64,
    /// Messages that could not be decoded (counted, never fatal).
    pub undecodable: u64,
    /// Decisions by outcome name (the pipeline's schema declares the names).
    pub outcomes: std::collections::BTreeMap<String, u64>,
    /// First deliveries by egress topic: what each flow delivered.
    pub by_egress: std::collections::BTreeMap<String, u64>,
    /// Decisions made with an older version than an earlier decision of their key
    /// (versions ordered by first sight): a reload must switch each key once.
    pub version_flips_back: u64,
    /// Per egress partition (`topic[p]`), how often the version changed from one
    /// decision to the next as they arrived; partitions with no change are left out.
    pub version_switches: std::collections::BTreeMap<String, u64>,
}

/// Trail-derived latencies of one stage (µs).
#[derive(Debug, Clone)]
pub struct TrailStage {
    /// consumed − previous hop's produced (or created).
    pub queue: Histogram<u64>,
    /// produced − consumed.
    pub process: Histogram<u64>,
}

/// The machine's CPU ticks per wall-clock second (`/proc/stat`): how much the
/// hypervisor stole in each second of a run, beside that second's e2e.
#[derive(Debug, Clone, Default)]
pub struct MachineSeconds {
    last: Option<(i64, actio_core::cpu::MachineTicks)>,
    by_second: BTreeMap<i64, actio_core::cpu::MachineTicks>,
}

impl MachineSeconds {
    /// Takes a reading in second `unix_s`. The first reading of a second closes the
    /// seconds since the last one: their ticks are spread evenly over them.
    pub fn sample(&mut self, unix_s: i64, now: actio_core::cpu::MachineTicks) {
        if let Some((s, then)) = self.last {
            if unix_s <= s {
                return;
            }
            let d = now.since(&then);
            let n = (unix_s - s) as u64;
            for (i, second) in (s..unix_s).enumerate().take(MAX_SECONDS) {
                let share = |v: u64| v / n + u64::from((i as u64) < v % n);
                self.by_second.insert(second, actio_core::cpu::MachineTicks { total: share(d.total), steal: share(d.steal) });
            }
            while self.by_second.len() > MAX_SECONDS {
                self.by_second.pop_first();
            }
        }
        self.last = Some((unix_s, now));
    }

    /// The ticks of one second, if it was sampled on both sides.
    pub fn second(&self, unix_s: i64) -> Option<&actio_core::cpu::MachineTicks> {
        self.by_second.get(&unix_s)
    }

    /// The ticks of the seconds `from..=to` that were sampled, added up.
    pub fn over(&self, from: i64, to: i64) -> actio_core::cpu::MachineTicks {
        self.by_second.range(from..=to).fold(Default::default(), |a, (_, t)| actio_core::cpu::MachineTicks { total: a.total + t.total, steal: a.steal + t.steal })
    }
}

/// Most seconds [`E2eBySecond`] keeps: a day (a run is at most a few hours). Later
/// samples still count in the run's e2e, not per second.
pub const MAX_SECONDS: usize = 86_400;


/// The run's e2e per wall-clock second in which the collector saw the message (unix
/// second of its `now_ns`), from the first second seen: slot `i` is second
/// `first + i`, seconds without a message included.
///
/// Only the current second's histogram is full size: the crate's histogram spans 1 µs
/// to an hour at 3 digits, ~190 KB, and a few hours of those would take GB. Each
/// second before it is kept in HdrHistogram's V2 encoding (zero runs compressed:
/// 4.5 KB for 30,000 samples spread over 2–42 ms, encoded in ~10 µs once a second)
/// and decoded only for the report ([`E2eBySecond::seconds`]).
#[derive(Debug)]
pub struct E2eBySecond {
    /// Unix second of slot 0; `None` before the first message.
    first_s: Option<i64>,
    /// The second being recorded.
    live_s: i64,
    live: Histogram<u64>,
    live_decided: u64,
    /// The seconds from `first_s` before `live_s`.
    done: Vec<EncodedSecond>,
    /// Messages seen past [`MAX_SECONDS`], not kept per second.
    pub beyond: u64,
}

#[derive(Debug, Clone, Default)]
struct EncodedSecond {
    decided: u64,
    /// V2-encoded histogram; empty when the second had no sample.
    e2e: Vec<u8>,
}

/// One second of [`E2eBySecond`].
#[derive(Debug, Clone)]
pub struct E2eSecond {
    /// Unix second.
    pub unix_s: i64,
    /// Decisions first seen in it.
    pub decided: u64,
    /// e2e of the decisions and dead letters first seen in it (µs).
    pub e2e: Histogram<u64>,
}

impl Default for E2eBySecond {
    fn default() -> Self {
        E2eBySecond { first_s: None, live_s: 0, live: latency_histogram(), live_decided: 0, done: Vec::new(), beyond: 0 }
    }
}

impl E2eBySecond {
    /// Notes a message first seen at `now_ns`: a decision when `decided`, with its e2e
    /// (ns) when known. A `now_ns` before the current second (the clock stepped back)
    /// counts in the current second.
    pub fn observe(&mut self, now_ns: i64, decided: bool, e2e_ns: Option<i64>) {
        let s = now_ns.div_euclid(NS_PER_S);
        let first = *self.first_s.get_or_insert_with(|| {
            self.live_s = s;
            s
        });
        if s > self.live_s {
            if s - first >= MAX_SECONDS as i64 {
                self.beyond += 1;
                return;
            }
            self.advance_to(s);
        }
        self.live_decided += decided as u64;
        if let Some(ns) = e2e_ns {
            record_ns(&mut self.live, ns);
        }
    }

    /// Closes the current second and any empty ones up to second `s`, which becomes current.
    fn advance_to(&mut self, s: i64) {
        let mut e2e = Vec::new();
        if !self.live.is_empty() {
            // Writing into a Vec cannot fail, and no count comes near i64::MAX.
            if let Err(err) = V2Serializer::new().serialize(&self.live, &mut e2e) {
                tracing::warn!(error = %err, second = self.live_s, "per-second e2e not encoded; that second reads as empty");
                e2e.clear();
            }
            self.live.reset();
        }
        self.done.push(EncodedSecond { decided: std::mem::take(&mut self.live_decided), e2e });
        for _ in self.live_s + 1..s {
            self.done.push(EncodedSecond::default());
        }
        self.live_s = s;
    }

    /// The first and the last second seen, if any.
    pub fn span(&self) -> Option<(i64, i64)> {
        self.first_s.map(|f| (f, self.live_s))
    }

    /// Every second from the first to the last seen, decoded one at a time.
    pub fn seconds(&self) -> impl Iterator<Item = E2eSecond> + '_ {
        let first = self.first_s.unwrap_or(0);
        let mut decoder = Deserializer::new();
        let done = self.done.iter().enumerate().map(move |(i, d)| {
            // Our own encoding: decoding fails only if the encoder did (warned above).
            let e2e = if d.e2e.is_empty() { latency_histogram() } else { decoder.deserialize(&mut d.e2e.as_slice()).unwrap_or_else(|_| latency_histogram()) };
            E2eSecond { unix_s: first + i as i64, decided: d.decided, e2e }
        });
        let live = self.first_s.map(|_| E2eSecond { unix_s: self.live_s, decided: self.live_decided, e2e: self.live.clone() });
        done.chain(live)
    }
}

/// Checks and measures what comes out of a pipeline.
#[derive(Debug)]
pub struct Collector {
    prefix: String,
    key_seq: Arc<[AtomicU32]>,
    seen: Vec<u8>,
    last_of_key: AHashMap<String, u32>,
    /// Per partition read, the offset after the last record read.
    read_upto: AHashMap<TopicPartition, i64>,
    /// Per partition, the end offset before the run: what lies below is not this
    /// run's and is skipped undecoded (see [`Collector::skip_before`]).
    history_end: AHashMap<TopicPartition, i64>,
    /// Counts.
    pub stats: CollectorStats,
    /// Rule ids seen in decisions, with counts.
    pub rule_hits: AHashMap<String, u64>,
    /// End to end: seen by the collector − intended send time (µs).
    pub e2e: Histogram<u64>,
    /// e2e since the last [`Collector::take_interval`] (for progress lines).
    interval: Histogram<u64>,
    /// e2e per second in which the message was seen.
    pub e2e_by_second: E2eBySecond,
    /// The machine's CPU ticks per second (its steal), sampled by the collector's thread.
    pub machine: MachineSeconds,
    /// Per stage, from the trail header, by stage name.
    pub stages: BTreeMap<String, TrailStage>,
    /// Versions (rules, model) in the order first seen, with their decisions.
    versions: Vec<(String, String, u64)>,
    /// Per key, the newest version (index in `versions`) its decisions carried.
    version_of_key: AHashMap<String, u16>,
    /// Per egress partition, the version of its last decision.
    version_of_partition: AHashMap<TopicPartition, u16>,
}

impl Collector {
    /// A collector for run `run_id`; `key_seq` comes from the sender.
    pub fn new(run_id: &str, key_seq: Arc<[AtomicU32]>) -> Self {
        Collector {
            prefix: format!("{run_id}-"),
            seen: vec![0; key_seq.len()],
            // Sized up front, as the sender's: a rehash of ~10^5 keys stalls the collector.
            last_of_key: AHashMap::with_capacity(key_seq.len().min(crate::schedule::MAX_PRESIZED_KEYS)),
            key_seq,
            read_upto: AHashMap::new(),
            history_end: AHashMap::new(),
            stats: CollectorStats::default(),
            rule_hits: AHashMap::new(),
            e2e: latency_histogram(),
            interval: latency_histogram(),
            e2e_by_second: E2eBySecond::default(),
            machine: MachineSeconds::default(),
            stages: BTreeMap::new(),
            versions: Vec::new(),
            version_of_key: AHashMap::new(),
            version_of_partition: AHashMap::new(),
        }
    }

    /// Decisions by the versions they were made with (`rules <…> model <…>`): rule
    /// files and models reload while the stages run.
    pub fn by_version(&self) -> std::collections::BTreeMap<String, u64> {
        self.versions.iter().map(|(r, m, n)| (format!("rules {r} model {m}"), *n)).collect()
    }

    /// Counts a decision's versions: per version, flips back per key, switches per
    /// partition in arrival order.
    fn versions(&mut self, d: &Decision, tp: &TopicPartition) {
        let at = match self.versions.iter().position(|(r, m, _)| *r == d.rules_version && *m == d.model_version) {
            Some(i) => i,
            None => {
                self.versions.push((d.rules_version.clone(), d.model_version.clone(), 0));
                self.versions.len() - 1
            }
        };
        self.versions[at].2 += 1;
        let at = at as u16;
        match self.version_of_key.get_mut(&d.key) {
            Some(v) if at < *v => self.stats.version_flips_back += 1,
            Some(v) => *v = at,
            None => {
                self.version_of_key.insert(d.key.clone(), at);
            }
        }
        if let Some(last) = self.version_of_partition.insert(tp.clone(), at)
            && last != at
        {
            *self.stats.version_switches.entry(format!("{}[{}]", tp.topic, tp.partition)).or_default() += 1;
        }
    }

    fn seq_of(&self, id: &str) -> Option<usize> {
        id.strip_prefix(&self.prefix)?.parse::<usize>().ok().filter(|s| *s < self.seen.len())
    }

    /// Records one delivery of `seq` (`retried`: it went through a retry topic);
    /// returns whether it was the first. Per-key order is checked among decisions
    /// only (`in_order_stream`): a dead-letter copy travels on another topic, whose
    /// partitions reach the collector in no fixed order relative to the decisions',
    /// so a poison message seen after a later decision of its key is not a
    /// violation (the retry scenario counted 11 such out of 360 dead letters).
    fn first_delivery(&mut self, seq: usize, key: &str, retried: bool, in_order_stream: bool) -> bool {
        let n = &mut self.seen[seq];
        *n = n.saturating_add(1);
        if *n > 1 {
            self.stats.duplicates += 1;
            return false;
        }
        self.stats.retried += retried as u64;
        if !in_order_stream {
            return true;
        }
        let ks = self.key_seq[seq].load(Ordering::Relaxed);
        let last = self.last_of_key.entry(key.to_string()).or_insert(0);
        if ks < *last && retried {
            self.stats.reordered_by_retry += 1;
        } else if ks < *last {
            self.stats.order_violations += 1;
        } else {
            *last = ks;
        }
        true
    }

    /// Skips, undecoded and uncounted, the records below `ends` (the topics' end
    /// offsets before the run): a collector reading from the start of its topics would
    /// otherwise decode their whole history as the load begins.
    pub fn skip_before(&mut self, ends: &[(TopicPartition, i64)]) {
        self.history_end.extend(ends.iter().cloned());
    }

    /// Whether `rec` is this run's and read for the first time (see
    /// [`Collector::skip_before`] and [`CollectorStats::reread`]).
    fn first_read(&mut self, rec: &Record) -> bool {
        if self.history_end.get(&rec.tp).is_some_and(|end| rec.offset < *end) {
            return false;
        }
        match self.read_upto.get_mut(&rec.tp) {
            Some(upto) if rec.offset < *upto => {
                self.stats.reread += 1;
                false
            }
            Some(upto) => {
                *upto = rec.offset + 1;
                true
            }
            None => {
                self.read_upto.insert(rec.tp.clone(), rec.offset + 1);
                true
            }
        }
    }

    fn timing(&mut self, rec: &Record, now_ns: i64, decided: bool) {
        let created = rec.headers.get(headers::CREATED).and_then(headers::parse_i64);
        if let Some(c) = created {
            record_ns(&mut self.e2e, now_ns - c);
            record_ns(&mut self.interval, now_ns - c);
        }
        self.e2e_by_second.observe(now_ns, decided, created.map(|c| now_ns - c));
        let mut prev = created;
        for hop in headers::parse_trail(rec.headers.get(headers::TRAIL).unwrap_or_default()) {
            let s = self.stages.entry(hop.stage.clone()).or_insert_with(|| TrailStage { queue: latency_histogram(), process: latency_histogram() });
            if let Some(p) = prev {
                record_ns(&mut s.queue, hop.consumed_ns - p);
            }
            record_ns(&mut s.process, hop.produced_ns - hop.consumed_ns);
            prev = Some(hop.produced_ns);
        }
    }

    /// The run's sequence number of a record known by its `actio-id` header (a DLQ
    /// copy, a transaction at an egress topic); `None`, counted as foreign, if it is
    /// not this run's.
    fn seq_by_header(&mut self, rec: &Record) -> Option<usize> {
        let seq = rec.headers.get(headers::ID).and_then(|v| std::str::from_utf8(v).ok()).and_then(|id| self.seq_of(id));
        if seq.is_none() {
            self.stats.foreign += 1;
        }
        seq
    }

    /// A transaction at an egress topic (a flow that ends without a decision).
    pub fn observe_transaction(&mut self, rec: &Record, now_ns: i64) {
        if !self.first_read(rec) {
            return;
        }
        let Some(seq) = self.seq_by_header(rec) else { return };
        // Per-key order holds within a topic: a route that sends a key's transactions
        // to two topics (faults to one, the rest to another) lets the collector read
        // them in either order, so order is checked per topic and key.
        let key = format!("{}\u{0}{}", rec.tp.topic, rec.key.as_deref().map(String::from_utf8_lossy).unwrap_or_default());
        let retried = rec.headers.get(headers::RETRIED).is_some();
        if !self.first_delivery(seq, &key, retried, true) {
            return;
        }
        self.stats.decided += 1;
        *self.stats.by_egress.entry(rec.tp.topic.to_string()).or_default() += 1;
        self.timing(rec, now_ns, true);
    }

    /// A message from the decisions topic, seen at `now_ns`.
    pub fn observe_decision(&mut self, rec: &Record, now_ns: i64) {
        if !self.first_read(rec) {
            return;
        }
        let d: Decision = match Codec::Json.decode(&rec.payload) {
            Ok(d) => d,
            Err(_) => {
                self.stats.undecodable += 1;
                return;
            }
        };
        let Some(seq) = self.seq_of(&d.tx_id) else {
            self.stats.foreign += 1;
            return;
        };
        let retried = rec.headers.get(headers::RETRIED).is_some();
        if !self.first_delivery(seq, &d.key, retried, true) {
            return;
        }
        self.stats.decided += 1;
        *self.stats.by_egress.entry(rec.tp.topic.to_string()).or_default() += 1;
        self.versions(&d, &rec.tp);
        match self.stats.outcomes.get_mut(&d.decision) {
            Some(n) => *n += 1,
            None => {
                self.stats.outcomes.insert(d.decision, 1);
            }
        }
        for r in d.rule_hits {
            *self.rule_hits.entry(r).or_default() += 1;
        }
        self.timing(rec, now_ns, true);
    }

    /// A message from the dead-letter topic (original bytes; `actio-id` header).
    pub fn observe_dead_letter(&mut self, rec: &Record, now_ns: i64) {
        if !self.first_read(rec) {
            return;
        }
        let Some(seq) = self.seq_by_header(rec) else { return };
        let key = rec.key.as_deref().map(String::from_utf8_lossy).unwrap_or_default().into_owned();
        let retried = rec.headers.get(headers::RETRIED).is_some() || rec.headers.get(headers::RETRY_COUNT).is_some();
        if self.first_delivery(seq, &key, retried, false) {
            self.stats.dlq += 1;
            self.timing(rec, now_ns, false);
        }
    }

    /// Transactions among the first `sent` that never came out.
    pub fn lost(&self, sent: u64) -> u64 {
        self.seen.iter().take(sent as usize).filter(|n| **n == 0).count() as u64
    }

    /// Distinct transactions seen (decided or dead-lettered).
    pub fn seen(&self) -> u64 {
        self.stats.decided + self.stats.dlq
    }

    /// The e2e histogram since the last call, then resets it.
    pub fn take_interval(&mut self) -> Histogram<u64> {
        let fresh = latency_histogram();
        std::mem::replace(&mut self.interval, fresh)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actio_core::bus::Bytes;
    use actio_core::{Headers, TopicPartition};

    /// Offsets for test records: each record is a new one on the decisions topic
    /// (increasing, as a partition's are; shared by the tests, which only need that).
    static NEXT_OFFSET: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);

    fn decision(seq: usize, key: &str) -> Record {
        let d = Decision {
            tx_id: format!("run-{seq}"),
            key: key.into(),
            decision: "approve".into(),
            score: 0.1,
            rule_hits: vec!["r1".into()],
            override_rule: None,
            model_version: "m".into(),
            rules_version: "r".into(),
            created_at: 0,
            fields: Default::default(),
            features: Default::default(),
        };
        let mut h = Headers::default();
        h.set(headers::CREATED, b"1000".to_vec());
        h.set(headers::TRAIL, b"rules@2000@3000;score@5000@9000".to_vec());
        let offset = NEXT_OFFSET.fetch_add(1, Ordering::Relaxed);
        Record { tp: TopicPartition::new("d", 0), offset, key: Some(Bytes::from(key.to_string())), payload: Bytes::from(Codec::Json.encode(&d).unwrap()), headers: h, timestamp_ms: None }
    }

    /// Sends 6 tx over keys a,b (per-key seqs 1,2,3) and returns a collector.
    fn setup() -> (Collector, Vec<(usize, &'static str)>) {
        let keys = ["a", "b", "a", "b", "a", "b"];
        let key_seq: Arc<[AtomicU32]> = (0..6).map(|i| AtomicU32::new(i as u32 / 2 + 1)).collect();
        (Collector::new("run", key_seq), keys.iter().enumerate().map(|(i, k)| (i, *k)).collect())
    }

    #[test]
    fn a_clean_stream_reports_nothing_wrong() {
        let (mut c, sent) = setup();
        for (s, k) in &sent {
            c.observe_decision(&decision(*s, k), 10_000_000);
        }
        assert_eq!((c.lost(6), c.stats.duplicates, c.stats.order_violations), (0, 0, 0));
        assert_eq!(c.stats.decided, 6);
        assert_eq!(c.stats.outcomes["approve"], 6);
        assert_eq!(c.rule_hits["r1"], 6);
        assert_eq!(c.stages["score"].queue.max(), 2, "5000 − 3000 ns = 2 µs");
        assert_eq!(c.e2e.len(), 6);
    }

    #[test]
    fn a_dropped_one_is_lost() {
        let (mut c, sent) = setup();
        for (s, k) in sent.iter().filter(|(s, _)| *s != 3) {
            c.observe_decision(&decision(*s, k), 0);
        }
        assert_eq!(c.lost(6), 1);
    }

    #[test]
    fn a_repeated_one_is_a_duplicate_not_a_violation() {
        let (mut c, sent) = setup();
        for (s, k) in &sent {
            c.observe_decision(&decision(*s, k), 0);
        }
        c.observe_decision(&decision(0, "a"), 0);
        assert_eq!((c.lost(6), c.stats.duplicates, c.stats.order_violations), (0, 1, 0));
    }

    #[test]
    fn a_record_read_again_at_its_offset_is_a_reread_not_a_duplicate() {
        let (mut c, sent) = setup();
        let records: Vec<Record> = sent.iter().map(|(s, k)| decision(*s, k)).collect();
        for r in &records {
            c.observe_decision(r, 0);
        }
        // The collector's group rebalanced and it resumed from its last commit.
        for r in &records[3..] {
            c.observe_decision(r, 0);
        }
        assert_eq!((c.stats.reread, c.stats.duplicates, c.stats.decided, c.stats.order_violations), (3, 0, 6, 0));
        // The same transaction at a new offset is a duplicate the pipeline produced.
        c.observe_decision(&decision(5, "b"), 0);
        assert_eq!((c.stats.reread, c.stats.duplicates), (3, 1));
    }

    #[test]
    fn records_from_before_the_run_are_skipped_and_counted_nowhere() {
        let (mut c, sent) = setup();
        let old: Vec<Record> = sent.iter().map(|(s, k)| decision(*s, k)).collect();
        let end = old.last().unwrap().offset + 1;
        c.skip_before(&[(TopicPartition::new("d", 0), end)]);
        for r in &old {
            c.observe_decision(r, 0);
        }
        assert_eq!((c.seen(), c.stats.reread, c.stats.duplicates, c.stats.foreign), (0, 0, 0, 0));
        for (s, k) in &sent {
            c.observe_decision(&decision(*s, k), 0);
        }
        assert_eq!((c.seen(), c.lost(6)), (6, 0), "what comes after the end is read");
    }

    #[test]
    fn swapped_same_key_decisions_are_an_order_violation() {
        let (mut c, _) = setup();
        for (s, k) in [(0, "a"), (1, "b"), (4, "a"), (3, "b"), (2, "a"), (5, "b")] {
            c.observe_decision(&decision(s, k), 0);
        }
        assert_eq!(c.stats.order_violations, 1);
        assert_eq!(c.lost(6), 0);
    }

    #[test]
    fn a_retried_one_behind_its_key_is_counted_as_such_not_as_a_violation() {
        let (mut c, _) = setup();
        let retried = |mut r: Record| {
            r.headers.set(headers::RETRIED, b"rules:1".to_vec());
            r
        };
        for r in [decision(0, "a"), decision(1, "b"), decision(4, "a"), decision(3, "b"), retried(decision(2, "a")), decision(5, "b")] {
            c.observe_decision(&r, 0);
        }
        assert_eq!((c.stats.order_violations, c.stats.reordered_by_retry, c.stats.retried), (0, 1, 1));
        // A dead letter after retry-topic trips counts as retried; being on another
        // topic, it takes no part in the order check.
        let (mut c, _) = setup();
        let mut dead = decision(2, "a");
        dead.tp = TopicPartition::new("dlq", 0);
        dead.headers.set(headers::ID, b"run-2".to_vec());
        dead.headers.set(headers::RETRY_COUNT, b"3".to_vec());
        for (s, k) in [(0, "a"), (4, "a")] {
            c.observe_decision(&decision(s, k), 0);
        }
        c.observe_dead_letter(&dead, 0);
        assert_eq!((c.stats.order_violations, c.stats.reordered_by_retry, c.stats.retried, c.stats.dlq), (0, 0, 1, 1));
    }

    #[test]
    fn a_dead_letter_seen_after_a_later_decision_of_its_key_is_not_a_violation() {
        let (mut c, _) = setup();
        let mut dead = decision(1, "a");
        dead.tp = TopicPartition::new("dlq", 0);
        dead.headers.set(headers::ID, b"run-1".to_vec());
        c.observe_decision(&decision(0, "a"), 0);
        c.observe_decision(&decision(2, "a"), 0);
        c.observe_dead_letter(&dead, 0);
        c.observe_decision(&decision(3, "a"), 0);
        assert_eq!((c.stats.order_violations, c.stats.dlq, c.stats.decided, c.lost(4)), (0, 1, 3, 0));
        // Decisions themselves are still checked.
        let (mut c2, _) = setup();
        for s in [0, 2, 1] {
            c2.observe_decision(&decision(s, "a"), 0);
        }
        assert_eq!(c2.stats.order_violations, 1);
    }

    const S: i64 = 1_000_000_000;

    #[test]
    fn e2e_is_kept_per_second_in_which_it_was_seen() {
        let (mut c, _) = setup();
        let t = 1_796_000_000 * S;
        let sent_before = |mut r: Record, now: i64, ms: i64| {
            r.headers.set(headers::CREATED, (now - ms * 1_000_000).to_string().into_bytes());
            (r, now)
        };
        // Seconds 0, 0, (none in 1), 2; the clock steps back into 1: counted in 2.
        for (r, now) in [
            sent_before(decision(0, "a"), t + S / 5, 3),
            sent_before(decision(1, "b"), t + 9 * S / 10, 7),
            sent_before(decision(2, "a"), t + 2 * S + 1, 2),
            sent_before(decision(3, "b"), t + S + 1, 2),
        ] {
            c.observe_decision(&r, now);
        }
        let mut dead = decision(4, "a");
        dead.tp = TopicPartition::new("dlq", 0);
        dead.headers.set(headers::ID, b"run-4".to_vec());
        c.observe_dead_letter(&dead, t + 2 * S + 5);
        let seconds: Vec<E2eSecond> = c.e2e_by_second.seconds().collect();
        let got: Vec<(i64, u64, u64)> = seconds.iter().map(|s| (s.unix_s - t / S, s.decided, s.e2e.len())).collect();
        assert_eq!(got, [(0, 2, 2), (1, 0, 0), (2, 2, 3)], "(second, decided, e2e samples); the dead letter has an e2e, not a decision");
        assert_eq!(c.e2e_by_second.span(), Some((t / S, t / S + 2)));
        let mut merged = latency_histogram();
        for s in &seconds {
            merged.add(&s.e2e).unwrap();
        }
        assert_eq!(merged, c.e2e, "the seconds add up to the run's e2e");
        assert_eq!((seconds[0].e2e.min(), seconds[0].e2e.max()), (3_000, seconds[0].e2e.highest_equivalent(7_000)), "decoded as recorded");
    }

    #[test]
    fn machine_ticks_go_to_the_seconds_they_passed_in() {
        use actio_core::cpu::MachineTicks;
        let t = |total, steal| MachineTicks { total, steal };
        let mut m = MachineSeconds::default();
        m.sample(100, t(0, 0));
        m.sample(100, t(50, 5));
        m.sample(101, t(200, 20));
        m.sample(104, t(500, 50));
        assert_eq!(m.second(100), Some(&t(200, 20)), "a second closes at the next second's first reading");
        assert_eq!([m.second(101), m.second(102), m.second(103)], [Some(&t(100, 10)); 3], "a gap is spread over its seconds");
        assert_eq!(m.second(104), None, "not closed yet");
        assert_eq!(m.over(101, 104), t(300, 30));
        assert_eq!(m.over(100, 104).steal_pct(), Some(10.0));
    }

    #[test]
    fn per_second_e2e_stops_at_its_cap_and_says_so() {
        let mut by = E2eBySecond::default();
        assert_eq!((by.span(), by.seconds().count()), (None, 0));
        by.observe(5 * S, true, Some(1_000_000));
        by.observe((5 + MAX_SECONDS as i64) * S, true, Some(1_000_000));
        assert_eq!((by.beyond, by.span(), by.seconds().count()), (1, Some((5, 5)), 1));
    }

    /// A transaction (not a decision) on egress topic `topic`: known by its header.
    fn transaction(seq: usize, key: &str, topic: &str) -> Record {
        let mut h = Headers::default();
        h.set(headers::ID, format!("run-{seq}").into_bytes());
        h.set(headers::CREATED, b"1000".to_vec());
        let offset = NEXT_OFFSET.fetch_add(1, Ordering::Relaxed);
        Record { tp: TopicPartition::new(topic, 0), offset, key: Some(Bytes::from(key.to_string())), payload: Bytes::from_static(b"{}"), headers: h, timestamp_ms: None }
    }

    #[test]
    fn transactions_are_collected_per_egress_topic_and_ordered_per_topic_and_key() {
        let (mut c, _) = setup();
        // Key a's 1st and 3rd go to one topic, its 2nd to another, read first: no
        // violation (two topics reach the collector in no fixed order).
        c.observe_transaction(&transaction(2, "a", "errors"), 0);
        c.observe_transaction(&transaction(0, "a", "history"), 0);
        c.observe_transaction(&transaction(4, "a", "history"), 0);
        assert_eq!((c.stats.decided, c.stats.order_violations, c.stats.duplicates), (3, 0, 0));
        assert_eq!(c.stats.by_egress.get("history"), Some(&2));
        // Within one topic a swap is a violation, and a repeat a duplicate.
        c.observe_transaction(&transaction(3, "b", "history"), 0);
        c.observe_transaction(&transaction(1, "b", "history"), 0);
        c.observe_transaction(&transaction(1, "b", "history"), 0);
        assert_eq!((c.stats.order_violations, c.stats.duplicates), (1, 1));
        assert_eq!(c.lost(6), 1, "seq 5 never came");
    }

    #[test]
    fn foreign_and_garbage_are_counted_not_fatal() {
        let (mut c, _) = setup();
        let mut r = decision(0, "a");
        r.payload = Bytes::from_static(b"{not json");
        c.observe_decision(&r, 0);
        let mut other = decision(0, "a");
                let d = Decision { tx_id: "other-run-1".into(), ..Codec::Json.decode(&other.payload).unwrap() };
        other.payload = Bytes::from(Codec::Json.encode(&d).unwrap());
        c.observe_decision(&other, 0);
        assert_eq!((c.stats.undecodable, c.stats.foreign, c.stats.decided), (1, 1, 0));
    }
}
