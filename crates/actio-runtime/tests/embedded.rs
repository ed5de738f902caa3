//! The stage runtime on the embedded bus: ordering, watermark commits, back-pressure,
//! rebalance and dead-lettering, end to end through real partitions and groups.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::time::{Duration, Instant};

use actio_bus_embedded::{EmbeddedBus, EmbeddedConfig};
use actio_core::bus::{Bytes, NoRebalanceListener};
use actio_core::{Bus, Consumer, ConsumerConfig, Headers, OutRecord, Producer, ProducerConfig, Record, TopicPartition, TopicSpec, headers};
use actio_runtime::{Context, Handler, HandlerError, Ordering, Output, RetryPolicy, RetryTopic, Stage, StageSpec, StepTime, StopMode};
use rand::{Rng, SeedableRng};

const IN: &str = "in";
const OUT: &str = "out";
const DLQ: &str = "dlq";

fn bus(partitions: i32) -> EmbeddedBus {
    let bus = EmbeddedBus::new(EmbeddedConfig::default());
    bus.create_topics(&[
        TopicSpec { name: IN.into(), partitions },
        TopicSpec { name: OUT.into(), partitions },
        TopicSpec { name: DLQ.into(), partitions: 1 },
    ])
    .unwrap();
    bus
}

fn spec(group: &str) -> StageSpec {
    StageSpec {
        name: "echo".into(),
        group: group.into(),
        input: IN.into(),
        dlq: Arc::from(DLQ),
        ordering: Ordering::Key,
        max_in_flight_per_partition: 1000,
        max_in_flight: 10_000,
        commit_interval: Duration::from_millis(2),
        drain_timeout: Duration::from_secs(5),
        retry: RetryPolicy::default(),
        threads: 4,
        from_earliest: true,
        properties: vec![],
        exactly_once: false,
        instance: actio_runtime::default_instance(),
        tracer: None,
    }
}

/// Echoes `key:seq` payloads after a random delay; `poison` fails, `panic` panics,
/// and while `gate` is closed every call waits.
struct Echo {
    max_delay_us: u64,
    gate: Arc<AtomicBool>,
}

impl Handler for Echo {
    fn handle(&self, rec: &Record, _ctx: &Context) -> Result<Vec<Output>, HandlerError> {
        while !self.gate.load(AtomicOrdering::Acquire) {
            std::thread::sleep(Duration::from_micros(200));
        }
        if self.max_delay_us > 0 {
            let d = rand::rng().random_range(0..self.max_delay_us);
            std::thread::sleep(Duration::from_micros(d));
        }
        match &rec.payload[..] {
            b"poison" => Err(HandlerError::permanent("poison pill")),
            b"panic" => panic!("handler exploded"),
            _ => Ok(vec![Output::new(OUT, rec.payload.clone())]),
        }
    }
}

fn echo(max_delay_us: u64) -> Arc<Echo> {
    Arc::new(Echo { max_delay_us, gate: Arc::new(AtomicBool::new(true)) })
}

/// Produces `n` messages over `keys` skewed keys; payload `key:seq` with a per-key seq.
fn produce(bus: &EmbeddedBus, n: usize, keys: usize, seed: u64, start: usize) -> Vec<(String, usize)> {
    let p = bus.producer(&ProducerConfig::default()).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut seqs: HashMap<String, usize> = HashMap::new();
    let mut sent = Vec::new();
    for _ in 0..n {
        // Skewed: half the traffic on the first 10% of keys.
        let k = if rng.random_bool(0.5) { rng.random_range(0..keys.div_ceil(10)) } else { rng.random_range(0..keys) };
        let key = format!("k{k}");
        let seq = seqs.entry(key.clone()).or_insert(start);
        *seq += 1;
        let payload = format!("{key}:{seq}");
        send(&p, &key, payload.as_bytes());
        sent.push((key, *seq));
    }
    p.flush(Duration::from_secs(5)).unwrap();
    sent
}

fn send<P: Producer>(p: &P, key: &str, payload: &[u8]) {
    let mut h = Headers::default();
    h.set(headers::CREATED, actio_core::time::now_ns().to_string().into_bytes());
    p.send(
        OutRecord { topic: Arc::from(IN), partition: None, key: Some(Bytes::copy_from_slice(key.as_bytes())), payload: Bytes::copy_from_slice(payload), headers: h },
        Box::new(|r| assert!(r.is_ok(), "{r:?}")),
    )
    .unwrap();
}

/// Reads `topic` as its own group until `want` messages arrived or `timeout`.
fn read_all(bus: &EmbeddedBus, topic: &str, want: usize, timeout: Duration) -> Vec<Record> {
    let cfg = ConsumerConfig {
        group: format!("reader-{topic}-{}", rand::random::<u32>()),
        topics: vec![topic.into()],
        client_id: "reader".into(),
        from_earliest: true,
        properties: vec![],
    };
    let mut c = bus.consumer(&cfg, Arc::new(NoRebalanceListener)).unwrap();
    let mut out = Vec::new();
    let deadline = Instant::now() + timeout;
    while out.len() < want && Instant::now() < deadline {
        if let Some(r) = c.poll(Duration::from_millis(20)).unwrap() {
            out.push(r);
        }
    }
    // Linger briefly to catch extras (duplicates).
    let linger = Instant::now() + Duration::from_millis(100);
    while Instant::now() < linger {
        if let Some(r) = c.poll(Duration::from_millis(10)).unwrap() {
            out.push(r);
        }
    }
    out
}

/// Per key, first deliveries must come in send order. Returns (violations, duplicates, missing).
fn check(sent: &[(String, usize)], got: &[Record]) -> (usize, usize, usize) {
    let mut last: HashMap<String, usize> = HashMap::new();
    let mut seen: HashMap<(String, usize), usize> = HashMap::new();
    let mut violations = 0;
    for r in got {
        let s = std::str::from_utf8(&r.payload).unwrap();
        let (k, seq) = s.split_once(':').unwrap();
        let seq: usize = seq.parse().unwrap();
        let n = seen.entry((k.to_string(), seq)).or_insert(0);
        *n += 1;
        if *n > 1 {
            continue;
        }
        let l = last.entry(k.to_string()).or_insert(0);
        if seq < *l {
            violations += 1;
        }
        *l = (*l).max(seq);
        assert_eq!(r.key.as_deref(), Some(k.as_bytes()), "the key is kept");
    }
    let dups = seen.values().map(|n| n - 1).sum();
    let missing = sent.iter().filter(|(k, s)| !seen.contains_key(&(k.clone(), *s))).count();
    (violations, dups, missing)
}

#[test]
fn per_key_order_holds_under_parallel_dispatch_with_random_delays() {
    for seed in 0..4 {
        let bus = bus(4);
        let sent = produce(&bus, 3000, 60, seed, 0);
        let stage = Stage::spawn(&bus, spec("order"), echo(300)).unwrap();
        let got = read_all(&bus, OUT, sent.len(), Duration::from_secs(30));
        let m = stage.metrics();
        stage.stop(StopMode::Graceful);
        stage.join().unwrap();
        assert_eq!(check(&sent, &got), (0, 0, 0), "seed {seed}: (order violations, duplicates, missing)");
        assert_eq!(m.processed as usize, sent.len());
    }
}

#[test]
fn the_check_catches_reordering() {
    // The order check above must be able to fail: unordered mode with delays breaks it.
    let bus = bus(1);
    let sent = produce(&bus, 2000, 3, 7, 0);
    let stage = Stage::spawn(&bus, StageSpec { ordering: Ordering::Unordered, ..spec("unordered") }, echo(300)).unwrap();
    let got = read_all(&bus, OUT, sent.len(), Duration::from_secs(30));
    stage.stop(StopMode::Graceful);
    stage.join().unwrap();
    let (violations, _, missing) = check(&sent, &got);
    assert_eq!(missing, 0);
    assert!(violations > 0, "unordered dispatch with random delays should reorder same-key messages");
}

#[test]
fn graceful_stop_commits_exactly_the_end_offsets() {
    let bus = bus(3);
    let sent = produce(&bus, 1500, 40, 1, 0);
    let stage = Stage::spawn(&bus, spec("commits"), echo(100)).unwrap();
    let got = read_all(&bus, OUT, sent.len(), Duration::from_secs(30));
    assert_eq!(got.len(), sent.len());
    stage.stop(StopMode::Graceful);
    stage.join().unwrap();
    let committed = bus.committed_offsets("commits", IN).unwrap();
    let end = bus.end_offsets(IN).unwrap();
    assert_eq!(committed, end.iter().map(|e| Some(*e)).collect::<Vec<_>>());
}

#[test]
fn in_flight_never_exceeds_the_cap() {
    let bus = bus(2);
    let gate = Arc::new(AtomicBool::new(false));
    let handler = Arc::new(Echo { max_delay_us: 0, gate: gate.clone() });
    let sent = produce(&bus, 500, 50, 2, 0);
    let spec = StageSpec { max_in_flight_per_partition: 10, max_in_flight: 15, ..spec("capped") };
    let stage = Stage::spawn(&bus, spec, handler).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let held = stage.metrics();
    assert!(held.in_flight > 0 && held.in_flight <= 15, "in flight while blocked: {}", held.in_flight);
    gate.store(true, AtomicOrdering::Release);
    let got = read_all(&bus, OUT, sent.len(), Duration::from_secs(30));
    let m = stage.metrics();
    stage.stop(StopMode::Graceful);
    stage.join().unwrap();
    assert_eq!(check(&sent, &got), (0, 0, 0));
    assert!(m.in_flight_peak <= 15, "peak {} over the stage cap", m.in_flight_peak);
    assert!(m.pauses > 0, "back-pressure should have paused fetching");
}

#[test]
fn a_member_crashing_mid_run_loses_nothing() {
    let bus = bus(6);
    let cap = 50;
    let spec = StageSpec { max_in_flight_per_partition: cap, ..spec("crash") };
    let a = Stage::spawn(&bus, spec.clone(), echo(200)).unwrap();
    let b = Stage::spawn(&bus, spec, echo(200)).unwrap();
    let first = produce(&bus, 1500, 80, 3, 0);
    std::thread::sleep(Duration::from_millis(150));
    a.stop(StopMode::Abort); // no commit, no leave: its partitions go back at the last commit
    a.join().unwrap();
    let second = produce(&bus, 1500, 80, 4, 10_000);
    let sent: Vec<_> = first.into_iter().chain(second).collect();
    let got = read_all(&bus, OUT, sent.len(), Duration::from_secs(60));
    b.stop(StopMode::Graceful);
    b.join().unwrap();
    let (violations, dups, missing) = check(&sent, &got);
    assert_eq!(missing, 0, "nothing lost");
    assert_eq!(violations, 0, "per-key order held on first deliveries");
    assert!(dups <= 6 * cap, "duplicates {dups} bounded by the in-flight caps");
}

#[test]
fn poison_and_panics_are_dead_lettered_and_the_partition_keeps_flowing() {
    let bus = bus(1);
    let p = bus.producer(&ProducerConfig::default()).unwrap();
    send(&p, "a", b"a:1");
    send(&p, "a", b"poison");
    send(&p, "a", b"panic");
    send(&p, "a", b"a:2");
    p.flush(Duration::from_secs(1)).unwrap();
    let stage = Stage::spawn(&bus, spec("dlq"), echo(0)).unwrap();
    let out = read_all(&bus, OUT, 2, Duration::from_secs(10));
    let dlq = read_all(&bus, DLQ, 2, Duration::from_secs(10));
    stage.stop(StopMode::Graceful);
    let m = stage.join().unwrap();
    assert_eq!(out.iter().map(|r| r.payload.clone()).collect::<Vec<_>>(), vec![Bytes::from("a:1"), Bytes::from("a:2")]);
    assert_eq!(dlq.len(), 2);
    assert_eq!(&dlq[0].payload[..], b"poison", "original bytes kept");
    assert_eq!(dlq[0].headers.get(headers::ERROR), Some(&b"poison pill"[..]));
    assert_eq!(dlq[0].headers.get(headers::STAGE), Some(&b"echo"[..]));
    assert_eq!(dlq[0].headers.get(headers::SOURCE), Some(&b"in/0/1"[..]));
    assert!(std::str::from_utf8(dlq[1].headers.get(headers::ERROR).unwrap()).unwrap().contains("handler exploded"));
    assert_eq!(m.dead_lettered, 2);
    assert_eq!(bus.committed_offsets("dlq", IN).unwrap(), vec![Some(4)]);
}

#[test]
fn the_trail_records_this_stage() {
    let bus = bus(1);
    produce(&bus, 10, 2, 5, 0);
    let stage = Stage::spawn(&bus, spec("trail"), echo(0)).unwrap();
    let out = read_all(&bus, OUT, 10, Duration::from_secs(10));
    stage.stop(StopMode::Graceful);
    stage.join().unwrap();
    for r in &out {
        let hops = headers::parse_trail(r.headers.get(headers::TRAIL).unwrap());
        assert_eq!(hops.len(), 1);
        assert_eq!(hops[0].stage, "echo");
        assert!(hops[0].produced_ns >= hops[0].consumed_ns);
        assert!(r.headers.get(headers::CREATED).is_some(), "input headers kept");
    }
}

/// Runs two steps, `a` then `b`, and says so on its output (as a fused service does).
struct TwoSteps;

impl Handler for TwoSteps {
    fn handle(&self, rec: &Record, _ctx: &Context) -> Result<Vec<Output>, HandlerError> {
        let t0 = actio_core::time::now_ns();
        let steps = vec![
            StepTime { stage: "a".into(), started_ns: t0, ended_ns: t0 + 10 },
            StepTime { stage: "b".into(), started_ns: t0 + 20, ended_ns: t0 + 30 },
        ];
        Ok(vec![Output::new(OUT, rec.payload.clone()).with_steps(steps)])
    }
}

#[test]
fn a_handler_of_several_steps_gets_a_trail_hop_per_step_tiling_the_stage() {
    let bus = bus(1);
    produce(&bus, 5, 2, 5, 0);
    let stage = Stage::spawn(&bus, spec("steps"), Arc::new(TwoSteps)).unwrap();
    let out = read_all(&bus, OUT, 5, Duration::from_secs(10));
    stage.stop(StopMode::Graceful);
    stage.join().unwrap();
    for r in &out {
        let hops = headers::parse_trail(r.headers.get(headers::TRAIL).unwrap());
        assert_eq!(hops.iter().map(|h| h.stage.as_str()).collect::<Vec<_>>(), ["a", "b"], "no hop of the stage's own name");
        // The first starts when the stage consumed, the last ends when it produced.
        assert!(hops[0].consumed_ns < hops[0].produced_ns, "from the consume, before the handler started: {hops:?}");
        assert_eq!(hops[1].consumed_ns, hops[0].produced_ns + 10, "the steps' own times between: {hops:?}");
        assert!(hops[1].produced_ns >= hops[1].consumed_ns + 10, "to the produce, after the handler ended: {hops:?}");
    }
}

const RETRY: &str = "retry";

/// `flaky<N>` fails transiently on its first N attempts (as the runtime counts them,
/// across in-place and retry-topic runs), `poison` fails permanently; anything else is
/// echoed. Every attempt number, and the partition it was consumed from with its
/// context, is recorded per payload.
#[derive(Default)]
struct Flaky {
    attempts: parking_lot::Mutex<HashMap<Vec<u8>, Vec<u32>>>,
    contexts: parking_lot::Mutex<HashMap<Vec<u8>, Vec<Seen>>>,
}

/// Where an attempt's record was consumed from, and what the runtime told the handler.
type Seen = (TopicPartition, Context);

impl Handler for Flaky {
    fn handle(&self, rec: &Record, ctx: &Context) -> Result<Vec<Output>, HandlerError> {
        let attempt = ctx.attempt;
        self.attempts.lock().entry(rec.payload.to_vec()).or_default().push(attempt);
        self.contexts.lock().entry(rec.payload.to_vec()).or_default().push((rec.tp.clone(), ctx.clone()));
        let text = std::str::from_utf8(&rec.payload).unwrap();
        if text == "poison" {
            return Err(HandlerError::permanent("poison pill"));
        }
        if let Some(n) = text.strip_prefix("flaky").and_then(|n| n.parse::<u32>().ok())
            && attempt <= n
        {
            return Err(HandlerError::transient(format!("lookup timed out (attempt {attempt})")));
        }
        Ok(vec![Output::new(OUT, rec.payload.clone())])
    }
}

/// A bus with a one-partition input and a retry topic, and a stage spec using it:
/// `in_place` attempts per run, then up to `trips` trips delayed by `delay`.
fn retry_setup(group: &str, in_place: u32, trips: u32, delay: Duration) -> (EmbeddedBus, StageSpec) {
    let bus = bus(1);
    bus.create_topics(&[TopicSpec { name: RETRY.into(), partitions: 2 }]).unwrap();
    let retry = RetryPolicy {
        attempts: in_place,
        topic: Some(RetryTopic { topic: Arc::from(RETRY), group: format!("{group}.retry"), properties: vec![], attempts: trips, delay, max_delay: delay }),
        ..RetryPolicy::default()
    };
    (bus, StageSpec { retry, ..spec(group) })
}

fn header(r: &Record, name: &str) -> Option<String> {
    r.headers.get(name).map(|v| String::from_utf8_lossy(v).into_owned())
}

#[test]
fn a_transient_failure_outlasting_its_in_place_attempts_succeeds_via_the_retry_topic_while_its_partition_flows() {
    let delay = Duration::from_millis(1000);
    let (bus, spec) = retry_setup("retry-ok", 2, 2, delay);
    let p = bus.producer(&ProducerConfig::default()).unwrap();
    for (key, payload) in [("a", "a1"), ("a", "flaky2"), ("a", "a2"), ("b", "b1"), ("a", "a3")] {
        send(&p, key, payload.as_bytes());
    }
    let flaky = Arc::new(Flaky::default());
    let stage = Stage::spawn(&bus, spec, flaky.clone()).unwrap();
    let out = read_all(&bus, OUT, 5, Duration::from_secs(20));
    let copies = read_all(&bus, RETRY, 1, Duration::from_secs(5));
    let live = stage.metrics();
    stage.stop(StopMode::Graceful);
    let m = stage.join().unwrap();
    // The retry topic is read by a consumer of its own group: the input partition count
    // is the input's.
    assert_eq!((live.partitions, live.retry_partitions), (1, 2));

    // Decided once; the same key's later messages went first (the ordering effect).
    let of_a: Vec<&[u8]> = out.iter().filter(|r| r.key.as_deref() == Some(b"a")).map(|r| &r.payload[..]).collect();
    assert_eq!(of_a, [&b"a1"[..], b"a2", b"a3", b"flaky2"]);
    assert_eq!(out.len(), 5);
    let a3 = out.iter().position(|r| &r.payload[..] == b"a3").unwrap();
    // Attempts 1 and 2 in place, the third from the retry topic.
    assert_eq!(flaky.attempts.lock()[&b"flaky2"[..]], vec![1, 2, 3]);
    // One retry copy: original bytes, key and headers, plus the bookkeeping.
    assert_eq!(copies.len(), 1);
    let c = &copies[0];
    assert_eq!(&c.payload[..], b"flaky2");
    assert_eq!(c.key.as_deref(), Some(&b"a"[..]));
    assert!(header(c, headers::CREATED).is_some(), "the producer's headers are kept");
    assert_eq!(header(c, headers::ATTEMPTS).as_deref(), Some("2"));
    assert_eq!(header(c, headers::RETRY_COUNT).as_deref(), Some("1"));
    assert_eq!(header(c, headers::SOURCE).as_deref(), Some("in/0/1"));
    assert_eq!(header(c, headers::STAGE).as_deref(), Some("echo"));
    assert_eq!(header(c, headers::ERROR).as_deref(), Some("lookup timed out (attempt 2)"));
    let due: i64 = header(c, headers::RETRY_DUE).unwrap().parse().unwrap();
    // The partition kept flowing: a3, behind the failure on the same partition and
    // key, was done before the retry copy was even due.
    let produced = |r: &Record| headers::parse_trail(r.headers.get(headers::TRAIL).unwrap())[0].produced_ns;
    assert!(produced(&out[a3]) < due, "a3 waited for the retry");
    assert!(produced(&out[4]) >= due, "the retry ran before it was due");
    // The retried output says so, without the retry bookkeeping.
    let retried = &out[4];
    assert_eq!(header(retried, headers::RETRIED).as_deref(), Some("echo:1"));
    for h in [headers::ATTEMPTS, headers::RETRY_COUNT, headers::RETRY_DUE, headers::ERROR, headers::SOURCE] {
        assert_eq!(header(retried, h), None, "{h} on the output");
    }
    assert_eq!(header(&out[0], headers::RETRIED), None);
    assert_eq!((m.processed, m.sent_to_retry, m.retried, m.dead_lettered, m.retry_waiting), (6, 1, 1, 0, 0));
    assert_eq!(bus.committed_offsets("retry-ok", IN).unwrap(), vec![Some(5)]);
    let retry_committed: i64 = bus.committed_offsets("retry-ok.retry", RETRY).unwrap().into_iter().flatten().sum();
    assert_eq!(retry_committed, 1);
}

#[test]
fn a_copy_back_from_the_retry_topic_is_told_the_input_it_was_first_consumed_from() {
    let (bus, spec) = retry_setup("retry-ctx", 1, 2, Duration::from_millis(20));
    let p = bus.producer(&ProducerConfig::default()).unwrap();
    send(&p, "a", b"a1");
    send(&p, "a", b"flaky2");
    let flaky = Arc::new(Flaky::default());
    let stage = Stage::spawn(&bus, spec, flaky.clone()).unwrap();
    let _ = read_all(&bus, OUT, 2, Duration::from_secs(20));
    stage.stop(StopMode::Graceful);
    stage.join().unwrap();
    let input = TopicPartition::new(IN, 0);
    let seen = flaky.contexts.lock()[&b"flaky2"[..]].clone();
    let told: Vec<_> = seen.iter().map(|(_, c)| (c.source.clone(), c.source_offset, c.attempt, c.from_retry_topic)).collect();
    assert_eq!(told, [(input.clone(), 1, 1, false), (input.clone(), 1, 2, true), (input, 1, 3, true)]);
    assert!(seen[1..].iter().all(|(tp, _)| *tp.topic == *RETRY), "the copies were consumed from the retry topic: {seen:?}");
    let first = &flaky.contexts.lock()[&b"a1"[..]][0].1;
    assert_eq!((first.source_offset, first.attempt, first.from_retry_topic), (0, 1, false));
}

/// Writes each payload under the key `re-<payload>` instead of the input's.
struct Rekey;

impl Handler for Rekey {
    fn handle(&self, rec: &Record, _ctx: &Context) -> Result<Vec<Output>, HandlerError> {
        let key = [&b"re-"[..], &rec.payload].concat();
        let keep = Output::new(OUT, rec.payload.clone());
        Ok(if &rec.payload[..] == b"keep" { vec![keep] } else { vec![keep.with_key(key)] })
    }
}

#[test]
fn an_output_with_a_key_of_its_own_is_produced_under_it_and_partitioned_by_it() {
    let bus = bus(4);
    let p = bus.producer(&ProducerConfig::default()).unwrap();
    for payload in ["x1", "x2", "x3", "keep"] {
        send(&p, "k", payload.as_bytes());
    }
    let stage = Stage::spawn(&bus, spec("rekey"), Arc::new(Rekey)).unwrap();
    let out = read_all(&bus, OUT, 4, Duration::from_secs(20));
    stage.stop(StopMode::Graceful);
    stage.join().unwrap();
    assert_eq!(out.len(), 4);
    for r in &out {
        let want: &[u8] = if &r.payload[..] == b"keep" { b"k" } else { &[&b"re-"[..], &r.payload].concat() };
        assert_eq!(r.key.as_deref(), Some(want), "{:?}", r.payload);
        assert_eq!(r.tp.partition, actio_core::bus::kafka_partition(want, 4), "partitioned by the output's key");
    }
}

#[test]
fn a_transient_failure_that_never_recovers_is_dead_lettered_after_the_last_trip_and_a_permanent_one_at_once() {
    let (bus, spec) = retry_setup("retry-dlq", 2, 2, Duration::from_millis(50));
    let p = bus.producer(&ProducerConfig::default()).unwrap();
    send(&p, "a", b"a1");
    send(&p, "a", b"flaky99");
    send(&p, "a", b"poison");
    send(&p, "a", b"a2");
    let flaky = Arc::new(Flaky::default());
    let stage = Stage::spawn(&bus, spec, flaky.clone()).unwrap();
    let dlq = read_all(&bus, DLQ, 2, Duration::from_secs(20));
    let out = read_all(&bus, OUT, 2, Duration::from_secs(5));
    let copies = read_all(&bus, RETRY, 2, Duration::from_secs(5));
    stage.stop(StopMode::Graceful);
    let m = stage.join().unwrap();

    assert_eq!(out.iter().map(|r| &r.payload[..]).collect::<Vec<_>>(), [&b"a1"[..], b"a2"]);
    assert_eq!(flaky.attempts.lock()[&b"flaky99"[..]], vec![1, 2, 3, 4, 5, 6], "2 in place × (1 + 2 trips)");
    assert_eq!(flaky.attempts.lock()[&b"poison"[..]], vec![1], "a permanent failure is not retried");
    let trips: Vec<_> = copies.iter().map(|c| (header(c, headers::RETRY_COUNT).unwrap(), header(c, headers::ATTEMPTS).unwrap())).collect();
    assert_eq!(trips, [("1".to_string(), "2".to_string()), ("2".into(), "4".into())]);
    assert_eq!(dlq.len(), 2);
    let poison = dlq.iter().find(|r| &r.payload[..] == b"poison").unwrap();
    assert_eq!(header(poison, headers::SOURCE).as_deref(), Some("in/0/2"));
    assert_eq!(header(poison, headers::ATTEMPTS), None);
    let gave_up = dlq.iter().find(|r| &r.payload[..] == b"flaky99").unwrap();
    assert_eq!(header(gave_up, headers::SOURCE).as_deref(), Some("in/0/1"), "the input it came from, not the retry topic");
    assert_eq!(header(gave_up, headers::STAGE).as_deref(), Some("echo"));
    assert_eq!(header(gave_up, headers::ERROR).as_deref(), Some("lookup timed out (attempt 6)"));
    assert_eq!(header(gave_up, headers::ATTEMPTS).as_deref(), Some("6"));
    assert_eq!(header(gave_up, headers::RETRY_COUNT).as_deref(), Some("2"));
    assert_eq!(header(gave_up, headers::RETRY_DUE), None);
    assert!(header(gave_up, headers::CREATED).is_some(), "the producer's headers are kept");
    assert_eq!((m.sent_to_retry, m.dead_lettered), (2, 2));
}

#[test]
fn with_a_max_delay_each_trip_waits_twice_as_long_as_the_one_before() {
    let delay = Duration::from_millis(40);
    let (bus, mut spec) = retry_setup("retry-backoff", 1, 3, delay);
    if let Some(t) = spec.retry.topic.as_mut() {
        t.max_delay = Duration::from_secs(1);
    }
    let p = bus.producer(&ProducerConfig::default()).unwrap();
    send(&p, "a", b"flaky99");
    let stage = Stage::spawn(&bus, spec, Arc::new(Flaky::default())).unwrap();
    let copies = read_all(&bus, RETRY, 3, Duration::from_secs(20));
    let _ = read_all(&bus, DLQ, 1, Duration::from_secs(20));
    stage.stop(StopMode::Graceful);
    stage.join().unwrap();
    let due: Vec<i64> = copies.iter().map(|c| header(c, headers::RETRY_DUE).unwrap().parse().unwrap()).collect();
    assert_eq!(due.len(), 3);
    // Trip n+1's copy is made once trip n's has run (at or after its due time), and
    // waits 40 ms × 2^n: the due times are at least 80 and 160 ms apart.
    let ms = |ns: i64| ns / 1_000_000;
    assert!(ms(due[1] - due[0]) >= 80, "trip 2 waited {} ms after trip 1 was due", ms(due[1] - due[0]));
    assert!(ms(due[2] - due[1]) >= 160, "trip 3 waited {} ms after trip 2 was due", ms(due[2] - due[1]));
}

#[test]
fn without_a_retry_topic_a_transient_failure_is_dead_lettered_after_its_in_place_attempts() {
    let bus = bus(1);
    let p = bus.producer(&ProducerConfig::default()).unwrap();
    send(&p, "a", b"flaky99");
    send(&p, "a", b"flaky1");
    let flaky = Arc::new(Flaky::default());
    let stage = Stage::spawn(&bus, StageSpec { retry: RetryPolicy { attempts: 3, ..RetryPolicy::default() }, ..spec("in-place") }, flaky.clone()).unwrap();
    let dlq = read_all(&bus, DLQ, 1, Duration::from_secs(10));
    let out = read_all(&bus, OUT, 1, Duration::from_secs(10));
    stage.stop(StopMode::Graceful);
    let m = stage.join().unwrap();
    assert_eq!(flaky.attempts.lock()[&b"flaky99"[..]], vec![1, 2, 3]);
    assert_eq!(flaky.attempts.lock()[&b"flaky1"[..]], vec![1, 2], "succeeds on its second attempt, in place");
    assert_eq!(dlq.len(), 1);
    assert_eq!(header(&dlq[0], headers::ATTEMPTS).as_deref(), Some("3"));
    assert_eq!(&out[0].payload[..], b"flaky1");
    assert_eq!(header(&out[0], headers::RETRIED), None, "retried in place only: still in order");
    assert_eq!((m.retried, m.sent_to_retry, m.dead_lettered), (3, 0, 1));
}

#[test]
fn retry_copies_waiting_for_their_due_time_do_not_hold_up_a_graceful_stop_and_run_after_a_restart() {
    let delay = Duration::from_millis(1500);
    let (bus, spec) = retry_setup("retry-restart", 1, 1, delay);
    let p = bus.producer(&ProducerConfig::default()).unwrap();
    send(&p, "a", b"flaky1");
    let flaky = Arc::new(Flaky::default());
    let stage = Stage::spawn(&bus, spec.clone(), flaky.clone()).unwrap();
    let t0 = Instant::now();
    while stage.metrics().retry_waiting == 0 {
        assert!(t0.elapsed() < Duration::from_secs(10), "the retry copy never came back");
        std::thread::sleep(Duration::from_millis(5));
    }
    let stopping = Instant::now();
    stage.stop(StopMode::Graceful);
    stage.join().unwrap();
    assert!(stopping.elapsed() < delay / 2, "the stop waited {:?} for a retry copy", stopping.elapsed());
    // The input is done (its copy acknowledged); the copy itself is not.
    assert_eq!(bus.committed_offsets("retry-restart", IN).unwrap(), vec![Some(1)]);
    assert!(bus.committed_offsets("retry-restart.retry", RETRY).unwrap().iter().all(|o| o.is_none_or(|o| o == 0)));
    assert_eq!(flaky.attempts.lock()[&b"flaky1"[..]], vec![1]);
    // The next run reads it again and runs it when due.
    let again = Stage::spawn(&bus, spec, flaky.clone()).unwrap();
    let out = read_all(&bus, OUT, 1, Duration::from_secs(10));
    again.stop(StopMode::Graceful);
    again.join().unwrap();
    assert_eq!(out.len(), 1);
    assert_eq!(&out[0].payload[..], b"flaky1");
    assert_eq!(flaky.attempts.lock()[&b"flaky1"[..]], vec![1, 2]);
    assert!(t0.elapsed() >= delay, "ran before its due time");
}

/// Pairs up the messages of each key: the first of a pair is held; the second emits
/// `first+second`, releasing the first once delivered. A message alone longer than
/// `timeout` is emitted as `first+timeout` by the tick.
struct Pairs {
    timeout: Duration,
    pending: parking_lot::Mutex<HashMap<Vec<u8>, (actio_runtime::Hold, Bytes, Instant)>>,
}

impl Handler for Pairs {
    fn handle(&self, rec: &Record, _ctx: &Context) -> Result<Vec<Output>, HandlerError> {
        let key = rec.key.as_deref().unwrap_or_default().to_vec();
        let mut pending = self.pending.lock();
        match pending.remove(&key) {
            Some((hold, first, _)) => {
                let joined = [&first[..], b"+", &rec.payload[..]].concat();
                Ok(vec![Output::new(OUT, joined).releasing(vec![hold])])
            }
            None => {
                let hold = actio_runtime::Hold::new();
                pending.insert(key, (hold.clone(), rec.payload.clone(), Instant::now()));
                Ok(vec![Output::hold(hold)])
            }
        }
    }

    fn tick_interval(&self) -> Option<Duration> {
        Some(Duration::from_millis(10))
    }

    fn tick(&self) -> Vec<Output> {
        let mut pending = self.pending.lock();
        let due: Vec<Vec<u8>> = pending.iter().filter(|(_, (_, _, at))| at.elapsed() >= self.timeout).map(|(k, _)| k.clone()).collect();
        due.into_iter()
            .filter_map(|k| pending.remove(&k).map(|(hold, first, _)| (k, hold, first)))
            .map(|(k, hold, first)| Output::new(OUT, [&first[..], b"+timeout"].concat()).with_key(k).releasing(vec![hold]))
            .collect()
    }

    fn partitions_revoked(&self, _: &[TopicPartition]) {
        self.pending.lock().clear(); // their messages come back to the next owner
    }
}

fn pairs(timeout: Duration) -> Arc<Pairs> {
    Arc::new(Pairs { timeout, pending: parking_lot::Mutex::new(HashMap::new()) })
}

#[test]
fn a_held_message_is_committed_only_once_the_output_that_releases_it_is_delivered() {
    let bus = bus(2);
    let p = bus.producer(&ProducerConfig::default()).unwrap();
    for k in 0..20 {
        send(&p, &format!("k{k}"), format!("k{k}:a").as_bytes());
    }
    send(&p, "lonely", b"lonely:a");
    for k in 0..20 {
        send(&p, &format!("k{k}"), format!("k{k}:b").as_bytes());
    }
    let stage = Stage::spawn(&bus, spec("holds"), pairs(Duration::from_millis(600))).unwrap();
    let got = read_all(&bus, OUT, 20, Duration::from_secs(10));
    let mut joined: Vec<String> = got.iter().map(|r| String::from_utf8_lossy(&r.payload).into_owned()).collect();
    joined.sort();
    assert_eq!(joined.len(), 20, "{joined:?}");
    assert!(joined.iter().all(|j| j.ends_with(":b") && j.contains(":a+")), "{joined:?}");
    // The lonely message is held: its partition's commit stays before it.
    std::thread::sleep(Duration::from_millis(50));
    let end = bus.end_offsets(IN).unwrap();
    let committed = bus.committed_offsets("holds", IN).unwrap();
    assert_ne!(committed, end.iter().map(|e| Some(*e)).collect::<Vec<_>>(), "a held message must not be committed");
    // The tick times it out and emits it; then everything is committed.
    let got = read_all(&bus, OUT, 21, Duration::from_secs(10));
    assert!(got.iter().any(|r| &r.payload[..] == b"lonely:a+timeout"));
    let trail = got.iter().find(|r| &r.payload[..] == b"lonely:a+timeout").and_then(|r| r.headers.get(headers::TRAIL).map(headers::parse_trail)).unwrap();
    assert_eq!(trail.last().map(|h| h.stage.as_str()), Some("echo"), "a tick output carries the stage's trail hop");
    stage.stop(StopMode::Graceful);
    stage.join().unwrap();
    assert_eq!(bus.committed_offsets("holds", IN).unwrap(), end.iter().map(|e| Some(*e)).collect::<Vec<_>>());
}

#[test]
fn a_revoked_partitions_held_messages_go_to_its_next_owner_uncommitted() {
    let bus = bus(2);
    let p = bus.producer(&ProducerConfig::default()).unwrap();
    send(&p, "lonely", b"lonely:a");
    // The first owner would wait a minute for the second of the pair.
    let first = Stage::spawn(&bus, spec("moves"), pairs(Duration::from_secs(60))).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while first.metrics().in_flight == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(first.metrics().in_flight, 1, "the lonely message is held");
    let t0 = Instant::now();
    first.stop(StopMode::Graceful);
    first.join().unwrap();
    assert!(t0.elapsed() < Duration::from_secs(2), "a hold does not wait out the drain timeout: {:?}", t0.elapsed());
    assert!(read_all(&bus, OUT, 1, Duration::from_millis(200)).is_empty(), "nothing emitted yet");
    // Not committed: the next owner gets it, and its own timeout emits it.
    let second = Stage::spawn(&bus, spec("moves"), pairs(Duration::from_millis(50))).unwrap();
    let got = read_all(&bus, OUT, 1, Duration::from_secs(10));
    assert_eq!(got.iter().map(|r| &r.payload[..]).collect::<Vec<_>>(), [&b"lonely:a+timeout"[..]]);
    second.stop(StopMode::Graceful);
    second.join().unwrap();
    let end = bus.end_offsets(IN).unwrap();
    let committed: Vec<i64> = bus.committed_offsets("moves", IN).unwrap().into_iter().map(|o| o.unwrap_or(0)).collect();
    assert_eq!(committed, end, "committed once emitted (an empty partition has nothing to commit)");
}

/// Echoes each message later, from a thread of its own after `delay`: a handler
/// whose work goes on elsewhere (an HTTP call). Counts how many wait at once.
struct Later {
    delay: Duration,
    waiting: Arc<std::sync::atomic::AtomicUsize>,
    most: Arc<std::sync::atomic::AtomicUsize>,
}

impl Handler for Later {
    fn handle(&self, rec: &Record, _ctx: &Context) -> Result<Vec<Output>, HandlerError> {
        let d = actio_runtime::Deferred::new();
        // Random delays: were the key's next message run before this one completed,
        // the key's order would break.
        let delay = self.delay.mul_f64(rand::rng().random_range(0.2..1.6));
        let (d2, payload) = (d.clone(), rec.payload.clone());
        let (waiting, most) = (self.waiting.clone(), self.most.clone());
        let now = waiting.fetch_add(1, AtomicOrdering::SeqCst) + 1;
        most.fetch_max(now, AtomicOrdering::SeqCst);
        std::thread::spawn(move || {
            std::thread::sleep(delay);
            waiting.fetch_sub(1, AtomicOrdering::SeqCst);
            if &payload[..] == b"poison" {
                d2.complete(Err(HandlerError::permanent("poison pill, found late")));
            } else {
                d2.complete(Ok(vec![Output::new(OUT, payload)]));
            }
        });
        Ok(vec![Output::defer(d)])
    }
}

#[test]
fn deferred_results_keep_key_order_free_the_workers_and_are_committed_when_delivered() {
    let bus = bus(2);
    let sent = produce(&bus, 400, 40, 9, 0);
    let p = bus.producer(&ProducerConfig::default()).unwrap();
    send(&p, "k-poison", b"poison");
    let (waiting, most) = (Arc::new(std::sync::atomic::AtomicUsize::new(0)), Arc::new(std::sync::atomic::AtomicUsize::new(0)));
    let handler = Arc::new(Later { delay: Duration::from_millis(5), waiting, most: most.clone() });
    // One worker thread: only deferral lets several messages wait at once.
    let stage = Stage::spawn(&bus, StageSpec { threads: 1, ..spec("later") }, handler).unwrap();
    let got = read_all(&bus, OUT, sent.len(), Duration::from_secs(30));
    let dead = read_all(&bus, DLQ, 1, Duration::from_secs(10));
    stage.stop(StopMode::Graceful);
    stage.join().unwrap();
    assert_eq!(check(&sent, &got), (0, 0, 0), "per key in order, none lost, none twice");
    assert_eq!(dead.len(), 1, "a deferred permanent error is dead-lettered");
    assert!(most.load(AtomicOrdering::SeqCst) > 1, "one worker had several messages waiting at once");
    let committed = bus.committed_offsets("later", IN).unwrap();
    assert_eq!(committed, bus.end_offsets(IN).unwrap().iter().map(|e| Some(*e)).collect::<Vec<_>>());
}
