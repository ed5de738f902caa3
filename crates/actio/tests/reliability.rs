//! Reliability against a real Apache Kafka broker: bad input is dead-lettered with its
//! provenance while its partition keeps flowing, a rule that fails at evaluation does
//! not stop a decision (and is counted), injected faults — transient ones recovered
//! through the retry topic or given up on, permanent ones, a handler panic — end
//! decided once or in the DLQ with their provenance while the partition keeps flowing,
//! a velocity replica taking over a partition rebuilds its windows from the input
//! (and a latest replica the newest per key, still dropping older updates),
//! SIGTERM under load exits 0 with nothing lost, every stage SIGKILLed once and
//! restarted loses nothing, and each class of bad configuration stops `actio stage`
//! with exit code 2 before it connects.
//!
//! Like `kafka.rs` they read `ACTIO_KAFKA_BROKERS` (set by `scripts/test`) and skip
//! without it unless `ACTIO_REQUIRE_KAFKA=1`. Longer scenarios (overload, rebalance
//! 1→3→1, broker restart) are in `loadtest/reliability.sh`; figures in RELIABILITY.md.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod support;
use support::*;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actio_bus_kafka::KafkaBus;
use actio_core::bus::{
    Bus, Bytes, Consumer, ConsumerConfig, Delivered, Headers, NoRebalanceListener, OutRecord, Producer, ProducerConfig, Record,
};

/// Produces `records` in order (one key: one partition, so offsets follow the
/// order) and waits for every ack.
fn produce(bus: &KafkaBus, records: Vec<OutRecord>) -> Vec<Delivered> {
    let producer = bus.producer(&ProducerConfig { client_id: "reliability-test".into(), properties: Vec::new(), transactional_id: None }).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let count = records.len();
    for (i, r) in records.into_iter().enumerate() {
        let tx = tx.clone();
        producer.send(r, Box::new(move |res| tx.send((i, res)).unwrap())).unwrap();
    }
    producer.flush(Duration::from_secs(30)).unwrap();
    let mut acks = BTreeMap::new();
    for _ in 0..count {
        let (i, res) = rx.recv_timeout(Duration::from_secs(30)).unwrap();
        acks.insert(i, res.unwrap_or_else(|e| panic!("record {i} not delivered: {e}")));
    }
    acks.into_values().collect()
}

/// Reads `topic` from the beginning until `want` records arrived (or `within`).
fn read_topic(bus: &KafkaBus, topic: &str, want: usize, within: Duration) -> Vec<Record> {
    let mut c = bus
        .consumer(
            &ConsumerConfig {
                group: format!("reader-{}", nanos()),
                topics: vec![topic.to_string()],
                client_id: "reliability-reader".into(),
                from_earliest: true,
                properties: Vec::new(),
            },
            Arc::new(NoRebalanceListener),
        )
        .unwrap();
    let deadline = Instant::now() + within;
    let mut out = Vec::new();
    while out.len() < want && Instant::now() < deadline {
        if let Some(r) = c.poll(Duration::from_millis(100)).unwrap() {
            out.push(r);
        }
    }
    out
}

fn record(topic: &str, key: &str, payload: impl Into<Bytes>) -> OutRecord {
    let mut headers = Headers::default();
    headers.set("x-origin", b"reliability-test".to_vec());
    OutRecord { topic: topic.into(), partition: None, key: Some(Bytes::from(key.to_string())), payload: payload.into(), headers }
}

fn valid_tx(id: &str, card: &str, second: u32, attrs: serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "id": id, "card_id": card, "account_id": "acc-1", "device_id": null, "merchant_id": "m-1",
        "amount_minor": 4200, "currency": "EUR", "mcc": 5411, "country": "FR", "card_country": "FR",
        "ip_country": null, "channel": "pos", "card_age_days": 400,
        "created_at": format!("2026-11-24T12:00:{second:02}Z"), "attrs": attrs,
    }))
    .unwrap()
}

/// A rule that reads an attribute without `has()`: on a transaction without it, the
/// comparison `null > 0.5` fails at evaluation.
const FAILING_RULE: &str = r#"
[[rule]]
id = "reads_attr_without_has"
description = "reads tx.attrs.risk_score without has(): fails on every tx that lacks it"
when = "tx.attrs.risk_score > 0.5"
weight = 0.1
"#;

#[test]
fn bad_input_is_dead_lettered_with_its_source_and_bytes_while_the_partition_keeps_flowing() {
    let Some(b) = brokers("bad_input") else { return };
    let _serial = serial();
    let p = TestPipeline::new(&b).edit("rules.toml", |t| format!("{t}{FAILING_RULE}"));
    p.create_topics();
    let bus = p.bus();
    let card = "card-poison";
    let ingress = p.topic("in");
    // (payload, expected actio-error substring); None = valid, must be decided.
    let mut oversized = serde_json::from_slice::<serde_json::Value>(&valid_tx("big", card, 5, serde_json::json!({}))).unwrap();
    oversized["attrs"]["blob"] = serde_json::Value::String("x".repeat(800_000));
    let cases: Vec<(Vec<u8>, Option<&str>)> = vec![
        (valid_tx("ok-0", card, 0, serde_json::json!({})), None),
        (br#"{"id": "bad-json", "card_id": "#.to_vec(), Some("undecodable payload")),
        (valid_tx("ok-1", card, 1, serde_json::json!({})), None),
        (edited(valid_tx("bad-currency", card, 2, serde_json::json!({})), "\"EUR\"", "\"usd\""), Some("invalid transaction: field `currency`")),
        (edited(valid_tx("bad-field", card, 3, serde_json::json!({})), "\"mcc\"", "\"colour\":1,\"mcc\""), Some("colour")),
        (serde_json::to_vec(&oversized).unwrap(), Some("invalid transaction: field `attrs.blob`")),
        // Against the declared schema (schema.toml): wrong type, over-long, out of range, missing.
        (edited(valid_tx("bad-type", card, 5, serde_json::json!({})), "\"amount_minor\":4200", "\"amount_minor\":\"lots\""), Some("invalid transaction: field `amount_minor`: expected an integer")),
        (edited(valid_tx("bad-long", card, 5, serde_json::json!({})), "\"m-1\"", &format!("\"{}\"", "m".repeat(129))), Some("invalid transaction: field `merchant_id`: expected at most 128 bytes")),
        (edited(valid_tx("bad-range", card, 5, serde_json::json!({})), "\"mcc\":5411", "\"mcc\":10000"), Some("invalid transaction: field `mcc`: 10000 is above the maximum 9999")),
        (edited(valid_tx("bad-missing", card, 5, serde_json::json!({})), "\"currency\":\"EUR\",", ""), Some("invalid transaction: field `currency`: missing")),
        (valid_tx("ok-2", card, 6, serde_json::json!({"risk_score": 0.9})), None),
        (Vec::new(), Some("undecodable payload")),
        (vec![0xff, 0xfe, 0x00, 0x9f], Some("undecodable payload")),
        (valid_tx("ok-3", card, 9, serde_json::json!({})), None),
    ];
    let acks = produce(&bus, cases.iter().map(|(payload, _)| record(&ingress, card, payload.clone())).collect());
    assert!(acks.windows(2).all(|w| w[0].partition == w[1].partition && w[1].offset == w[0].offset + 1), "one partition, in order: {acks:?}");
    // Garbage on the internal (postcard) topics: the velocity and score stages' decoders.
    let internal = produce(&bus, vec![record(&p.topic("ruled"), card, b"\x05garbage".to_vec()), record(&p.topic("featured"), card, b"\xff\xff\xff\xff\xff\xff".to_vec())]);

    let stages = p.chain();
    let bad = cases.iter().filter(|c| c.1.is_some()).count();
    let dlq = read_topic(&bus, &p.topic("dlq"), bad + 2, Duration::from_secs(60));
    let decisions = read_topic(&bus, &p.topic("decisions"), 4, Duration::from_secs(60));

    // Every bad message is in the DLQ once, with its original bytes and provenance.
    assert_eq!(dlq.len(), bad + 2, "DLQ: {:?}", dlq.iter().map(|r| r.headers.get("actio-error").map(String::from_utf8_lossy)).collect::<Vec<_>>());
    let utf8 = |r: &Record, h: &str| String::from_utf8(r.headers.get(h).unwrap_or_else(|| panic!("no {h} header")).to_vec()).unwrap();
    for ((payload, why), at) in cases.iter().zip(&acks) {
        let Some(why) = why else { continue };
        let source = format!("{ingress}/{}/{}", at.partition, at.offset);
        let copy = dlq.iter().find(|r| r.headers.get("actio-source") == Some(source.as_bytes())).unwrap_or_else(|| panic!("no DLQ copy of {source} ({why})"));
        assert_eq!(&copy.payload[..], &payload[..], "{source}: original bytes kept");
        assert!(utf8(copy, "actio-error").contains(why), "{source}: {}", utf8(copy, "actio-error"));
        assert_eq!(utf8(copy, "actio-stage"), "rules");
        assert_eq!(copy.headers.get("x-origin"), Some(&b"reliability-test"[..]), "the producer's headers are kept");
        assert_eq!(copy.key.as_deref(), Some(card.as_bytes()));
        if why.starts_with("invalid transaction") {
            // Schema-invalid but well-formed: the DLQ copy is readable JSON.
            serde_json::from_slice::<serde_json::Value>(&copy.payload).unwrap();
        }
    }
    for (stage, topic, at) in [("velocity", "ruled", internal[0]), ("score", "featured", internal[1])] {
        let source = format!("{}/{}/{}", p.topic(topic), at.partition, at.offset);
        let copy = dlq.iter().find(|r| r.headers.get("actio-source") == Some(source.as_bytes())).unwrap_or_else(|| panic!("no DLQ copy of {source}"));
        assert_eq!(utf8(copy, "actio-stage"), stage);
        assert!(utf8(copy, "actio-error").contains("undecodable payload: Postcard payload"), "{}", utf8(copy, "actio-error"));
    }

    // The partition kept flowing: every valid transaction, including those behind the
    // poison on the same key and partition, is decided once and in order.
    let ids: Vec<String> = decisions
        .iter()
        .map(|r| serde_json::from_slice::<serde_json::Value>(&r.payload).unwrap()["tx_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, ["ok-0", "ok-1", "ok-2", "ok-3"]);
    // A rule failing at evaluation is counted on the transaction (rule_errors) and the
    // rule set's stats; it is not a handler failure: the tx is decided, the rule does
    // not fire. With the attribute present it evaluates and fires.
    for r in &decisions {
        let d: serde_json::Value = serde_json::from_slice(&r.payload).unwrap();
        let fired = d["rule_hits"].as_array().unwrap().iter().any(|h| h == "reads_attr_without_has");
        assert_eq!(fired, d["tx_id"] == "ok-2", "{d}");
    }
    // The stages count what they dead-lettered (a count lands once the ack is applied).
    for (stage, want) in stages.iter().zip([bad as u64, 1, 1]) {
        wait_for_counter(stage, "actio_stage_dead_lettered_total", want);
    }
    // ...and the rule evaluations that failed: ok-0, ok-1 and ok-3 lack the attribute.
    assert_eq!(stages[0].counter("actio_rule_errors_total"), 3, "{}", stages[0].log());
    assert_eq!(stages[1].counter("actio_rule_errors_total"), 0);
}

/// Waits (up to 10 s) until a stage's counter reads `want`, then asserts it.
fn wait_for_counter(stage: &StageProcess, name: &str, want: u64) {
    let t0 = Instant::now();
    while stage.counter(name) != want && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(stage.counter(name), want, "{name}:\n{}", stage.log());
}

/// `extra` appended to the `n`-th stage (0-based) of the fraud pipeline.toml: each
/// stage ends with its `[stage.limits]` line `budget_ms = 5.0`.
fn in_stage(t: &str, n: usize, extra: &str) -> String {
    let at = t.match_indices("budget_ms = 5.0\n").nth(n).map(|(i, m)| i + m.len()).unwrap();
    format!("{}{extra}{}", &t[..at], &t[at..])
}

/// Faults by merchant: at rules a permanent failure and a panic; at velocity a
/// transient failure of the first 4 attempts (3 in place fail, the first trip through
/// the retry topic fails once more and then succeeds) and one that never recovers.
const FAULTS_RULES: &str = "[[stage.fault]]\nwhen = \"tx.merchant_id == 'chaos-permanent'\"\nfail = \"permanent\"\n\
    [[stage.fault]]\nwhen = \"tx.merchant_id == 'chaos-panic'\"\nfail = \"panic\"\n";
const FAULTS_VELOCITY: &str = "[[stage.fault]]\nwhen = \"tx.merchant_id == 'chaos-transient'\"\nfail = \"transient\"\ntimes = 4\n\
    [[stage.fault]]\nwhen = \"tx.merchant_id == 'chaos-stuck'\"\nfail = \"transient\"\n";

#[test]
fn injected_faults_transient_recovered_via_the_retry_topic_permanent_and_panic_dead_lettered_while_the_partition_flows() {
    let Some(b) = brokers("injected_faults") else { return };
    let _serial = serial();
    let p = TestPipeline::new(&b).edit("pipeline.toml", |t| {
        let t = t.replace("retry_delay_ms = 1000", "retry_delay_ms = 400").replacen("retry_topic_attempts = 3", "retry_topic_attempts = 2", 2);
        in_stage(&in_stage(&t, 1, FAULTS_VELOCITY), 0, FAULTS_RULES)
    });
    p.create_topics();
    let bus = p.bus();
    let card = "card-chaos";
    let merchant = |id: &str, second: u32, m: &str| edited(valid_tx(id, card, second, serde_json::json!({})), "\"m-1\"", &format!("\"{m}\""));
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("ok-0", valid_tx("ok-0", card, 0, serde_json::json!({}))),
        ("transient", merchant("transient", 1, "chaos-transient")),
        ("ok-1", valid_tx("ok-1", card, 2, serde_json::json!({}))),
        ("permanent", merchant("permanent", 3, "chaos-permanent")),
        ("ok-2", valid_tx("ok-2", card, 4, serde_json::json!({}))),
        ("panic", merchant("panic", 5, "chaos-panic")),
        ("stuck", merchant("stuck", 6, "chaos-stuck")),
        ("ok-3", valid_tx("ok-3", card, 7, serde_json::json!({}))),
    ];
    let ingress = p.topic("in");
    let acks = produce(&bus, cases.iter().map(|(_, payload)| record(&ingress, card, payload.clone())).collect());
    assert!(acks.windows(2).all(|w| w[0].partition == w[1].partition), "one partition: {acks:?}");
    let at = |id: &str| acks[cases.iter().position(|c| c.0 == id).unwrap()];

    let stages = p.chain();
    let dlq = read_topic(&bus, &p.topic("dlq"), 3, Duration::from_secs(60));
    // Everything is through once the stuck one gave up (after two delayed trips); read
    // a little longer than needed so a duplicate decision would show.
    let decisions = read_topic(&bus, &p.topic("decisions"), 6, Duration::from_secs(3));
    let utf8 = |r: &Record, h: &str| String::from_utf8(r.headers.get(h).unwrap_or_else(|| panic!("no {h} header")).to_vec()).unwrap();
    let tx_id = |r: &Record| serde_json::from_slice::<serde_json::Value>(&r.payload).unwrap()["tx_id"].as_str().unwrap().to_string();

    // Decided once each; the transient one through the retry topic, behind the later
    // transactions of its card (the retry topic's ordering effect), and saying so.
    // (ok-3 sits behind the panic in the rules lane; a panic's report can take a while.)
    let ids: Vec<String> = decisions.iter().map(tx_id).collect();
    let in_order: Vec<&String> = ids.iter().filter(|id| id.starts_with("ok-")).collect();
    assert_eq!(in_order, ["ok-0", "ok-1", "ok-2", "ok-3"], "{ids:?}");
    let transient = ids.iter().position(|id| id == "transient").unwrap_or_else(|| panic!("transient not decided: {ids:?}"));
    assert_eq!(ids.len(), 5, "each decided once: {ids:?}");
    assert!(transient > ids.iter().position(|id| id == "ok-2").unwrap(), "decided behind ok-1 and ok-2, sent after it: {ids:?}");
    assert_eq!(utf8(&decisions[transient], "actio-retried"), "velocity:1");
    assert_eq!(decisions.iter().filter(|r| r.headers.get("actio-retried").is_some()).count(), 1);
    assert!(decisions[transient].headers.get("actio-retry-due").is_none() && decisions[transient].headers.get("actio-error").is_none(), "retry bookkeeping stays off decisions");

    // The DLQ: the permanent failure and the panic at rules, with the original bytes
    // and provenance; the transient failure that never recovered, at velocity, after
    // 3 in-place attempts × (1 + 2 trips).
    assert_eq!(dlq.len(), 3, "DLQ: {:?}", dlq.iter().map(|r| r.headers.get("actio-error").map(String::from_utf8_lossy)).collect::<Vec<_>>());
    let copy_of = |source: String| dlq.iter().find(|r| r.headers.get("actio-source") == Some(source.as_bytes())).unwrap_or_else(|| panic!("no DLQ copy of {source}"));
    for (id, why) in [("permanent", "injected permanent fault"), ("panic", "handler panicked: injected panic (fault[1] `tx.merchant_id == 'chaos-panic'`, attempt 1)")] {
        let copy = copy_of(format!("{ingress}/{}/{}", at(id).partition, at(id).offset));
        assert_eq!(&copy.payload[..], &cases.iter().find(|c| c.0 == id).unwrap().1[..], "{id}: original bytes");
        assert!(utf8(copy, "actio-error").contains(why), "{id}: {}", utf8(copy, "actio-error"));
        assert_eq!(utf8(copy, "actio-stage"), "rules");
        assert_eq!(copy.headers.get("x-origin"), Some(&b"reliability-test"[..]), "the producer's headers are kept");
        assert_eq!(copy.key.as_deref(), Some(card.as_bytes()));
    }
    let stuck = dlq.iter().find(|r| r.headers.get("actio-stage") == Some(b"velocity")).expect("the stuck one, dead-lettered at velocity");
    assert_eq!(utf8(stuck, "actio-attempts"), "9");
    assert_eq!(utf8(stuck, "actio-retry-count"), "2");
    assert!(utf8(stuck, "actio-error").contains("injected transient fault"), "{}", utf8(stuck, "actio-error"));
    // Its source is the ruled record velocity first consumed, and its bytes are that
    // record's (postcard), not a retry copy's.
    let ruled = read_topic(&bus, &p.topic("ruled"), 6, Duration::from_secs(30));
    let source = utf8(stuck, "actio-source");
    let original = ruled.iter().find(|r| format!("{}/{}", r.tp, r.offset) == source).unwrap_or_else(|| panic!("{source} is not a record of {}", p.topic("ruled")));
    assert_eq!(original.payload, stuck.payload, "original bytes");
    let st: actio_core::TxState = actio_core::Codec::Postcard.decode(&stuck.payload).unwrap();
    assert_eq!(state_id(&st), "stuck");

    // The retry topic holds one copy of the recovered one and two of the stuck one.
    let copies = read_topic(&bus, &p.topic("retry.velocity"), 3, Duration::from_secs(30));
    let mut trips: Vec<(String, String, String)> = copies
        .iter()
        .map(|c| (state_id(&actio_core::Codec::Postcard.decode::<actio_core::TxState>(&c.payload).unwrap()), utf8(c, "actio-retry-count"), utf8(c, "actio-attempts")))
        .collect();
    trips.sort();
    let want = [("stuck", "1", "3"), ("stuck", "2", "6"), ("transient", "1", "3")].map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()));
    assert_eq!(trips, want);

    // The retry counters are visible: velocity sent 3 copies to its retry topic, retried
    // in place 2 + 1 (transient) and 2 × 3 (stuck) times, and dead-lettered one.
    wait_for_counter(&stages[1], "actio_stage_sent_to_retry_total", 3);
    wait_for_counter(&stages[1], "actio_stage_retried_total", 9);
    wait_for_counter(&stages[1], "actio_stage_dead_lettered_total", 1);
    wait_for_counter(&stages[0], "actio_stage_dead_lettered_total", 2);
    wait_for_counter(&stages[0], "actio_stage_sent_to_retry_total", 0);
    // The retry group's lag is measured, and nothing is left on the retry topic.
    wait_for_counter(&stages[1], "actio_stage_retry_lag", 0);
    assert!(stages[0].log().contains("fault injection is ON"), "a stage with faults warns at start:\n{}", stages[0].log());
    assert!(!stages[2].log().contains("fault injection is ON"), "{}", stages[2].log());
}

fn edited(json: Vec<u8>, from: &str, to: &str) -> Vec<u8> {
    let text = String::from_utf8(json).unwrap();
    assert!(text.contains(from), "{from} in {text}");
    text.replace(from, to).into_bytes()
}

/// Sum of the committed offsets of `group` on `topic` (fresh topics start at 0).
fn committed(bus: &KafkaBus, group: &str, topic: &str) -> i64 {
    bus.committed_offsets(group, topic).unwrap().into_iter().map(|o| o.unwrap_or(0)).sum()
}

/// `processed=N` from the stage's "stopped" log line (ANSI colours removed).
fn processed_in_log(log: &str) -> Option<i64> {
    let mut plain = String::with_capacity(log.len());
    let mut chars = log.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            chars.by_ref().find(|c| c.is_ascii_alphabetic());
        } else {
            plain.push(c);
        }
    }
    let line = plain.lines().rev().find(|l| l.contains("stopped") && l.contains("processed="))?;
    line.split("processed=").nth(1)?.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

/// `card_tx_24h` of each transaction on `featured` (velocity's output), by tx id.
fn card_tx_24h(records: &[Record]) -> BTreeMap<String, f64> {
    records
        .iter()
        .map(|r| {
            let st: actio_core::TxState = actio_core::Codec::Postcard.decode(&r.payload).unwrap();
            let f = st.features.iter().find(|f| &*f.name == "card_tx_24h").unwrap().value;
            (state_id(&st), f)
        })
        .collect()
}

#[test]
fn a_velocity_replica_that_takes_over_a_partition_rebuilds_its_windows_from_the_input() {
    let Some(b) = brokers("velocity_takeover") else { return };
    let _serial = serial();
    let p = TestPipeline::new(&b);
    p.create_topics();
    let bus = p.bus();
    let card = "card-history";
    let (mut rules, mut first) = (p.stage("rules"), p.stage("velocity"));
    rules.wait_ready(Duration::from_secs(60));
    first.wait_ready(Duration::from_secs(60));
    produce(&bus, (0..5).map(|i| record(&p.topic("in"), card, valid_tx(&format!("h-{i}"), card, i, serde_json::json!({})))).collect());
    let before = card_tx_24h(&read_topic(&bus, &p.topic("featured"), 5, Duration::from_secs(60)));
    assert_eq!(before.get("h-4"), Some(&5.0), "{before:?}");

    // The first replica hands its partitions over (graceful stop: drained, committed);
    // the next one must start from the card's history, not from empty windows.
    first.signal("-TERM");
    assert!(first.wait_exit(Duration::from_secs(25)).success(), "{}", first.log());
    let mut next = p.stage("velocity");
    next.wait_ready(Duration::from_secs(60));
    produce(&bus, vec![record(&p.topic("in"), card, valid_tx("h-5", card, 5, serde_json::json!({})))]);
    let after = card_tx_24h(&read_topic(&bus, &p.topic("featured"), 6, Duration::from_secs(60)));
    assert_eq!(after.get("h-5"), Some(&6.0), "the five before it and itself: {after:?}\n{}", next.log());
    let log = next.log();
    assert!(log.contains("velocity windows restored") && log.contains("records=5"), "{log}");
    drop(rules);
}

/// A sensors reading of `device` observed at second `second`.
fn reading(id: &str, device: &str, second: u32) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "reading_id": id, "device_id": device, "site": "north", "metric": "temperature", "value": 21.5,
        "status": "ok", "observed_at": format!("2026-12-01T10:00:{second:02}Z"),
    }))
    .unwrap()
}

#[test]
fn a_latest_replica_that_takes_over_rebuilds_the_newest_per_key_and_still_drops_older_updates() {
    let Some(b) = brokers("latest_takeover") else { return };
    let _serial = serial();
    let p = TestPipeline::of("sensors", "sensors", &b);
    p.create_topics();
    let bus = p.bus();
    let schema = actio_pipeline::Pipeline::load(p.path()).unwrap().schema;
    let ids = |records: &[Record]| -> Vec<String> {
        records.iter().map(|r| schema.id_of(&actio_core::Codec::Postcard.decode::<actio_core::TxState>(&r.payload).unwrap().tx).to_string()).collect()
    };
    let device = "dev-takeover";
    let mut first = p.stage("newest");
    first.wait_ready(Duration::from_secs(60));
    // Newest at 30 s; the update at 20 s came late and is dropped.
    produce(&bus, [("u-10", 10), ("u-30", 30), ("u-20", 20)].iter().map(|(id, s)| record(&p.topic("updates"), device, reading(id, device, *s))).collect());
    let seen = read_topic(&bus, &p.topic("newest"), 2, Duration::from_secs(60));
    assert_eq!(ids(&seen), ["u-10", "u-30"]);
    assert_eq!(first.counter("actio_latest_stale_total"), 1);

    // The next replica must know the device's newest is 30 s: restored from the
    // partition's input (up to the committed offset), not started empty.
    first.signal("-TERM");
    assert!(first.wait_exit(Duration::from_secs(25)).success(), "{}", first.log());
    let mut next = p.stage("newest");
    next.wait_ready(Duration::from_secs(60));
    produce(&bus, [("u-25", 25), ("u-40", 40)].iter().map(|(id, s)| record(&p.topic("updates"), device, reading(id, device, *s))).collect());
    let seen = read_topic(&bus, &p.topic("newest"), 3, Duration::from_secs(60));
    assert_eq!(ids(&seen), ["u-10", "u-30", "u-40"], "25 s is older than the restored newest (30 s)\n{}", next.log());
    assert_eq!(next.counter("actio_latest_stale_total"), 1);
    let log = next.log();
    assert!(log.contains("newest times per key restored") && log.contains("records=3"), "{log}");
}

#[test]
fn sigterm_under_load_exits_0_commits_what_it_processed_and_a_restart_loses_nothing() {
    let Some(b) = brokers("sigterm_under_load") else { return };
    let _serial = serial();
    let p = TestPipeline::new(&b);
    p.create_topics();
    let mut stages = p.chain();
    let out = p.path().join("report");
    let load = p.loadgen(1000, "10s", &out).spawn().unwrap();
    std::thread::sleep(Duration::from_secs(4));
    // Stop the middle stage while transactions stream through it.
    let t0 = Instant::now();
    stages[1].signal("-TERM");
    let status = stages[1].wait_exit(Duration::from_secs(25));
    let took = t0.elapsed();
    assert!(status.success(), "velocity exited {status}:\n{}", stages[1].log());
    let log = stages[1].log();
    let processed = processed_in_log(&log).unwrap_or_else(|| panic!("no stopped line:\n{log}"));
    let done = committed(&p.bus(), &format!("{}.velocity", p.name), &p.topic("ruled"));
    // Committed = processed, but for messages done out of offset order behind a lane
    // cleared at revocation: those are redelivered, never skipped.
    assert!(done <= processed && processed - done <= 1000, "committed {done}, processed {processed}");
    std::thread::sleep(Duration::from_secs(1));
    stages[1] = p.stage("velocity");
    let r = finished_report(load, &out, String::new);
    assert_eq!(n(&r, "lost"), 0, "{r}");
    assert_eq!(n(&r, "order_violations"), 0, "{r}");
    // Duplicates: processed − committed of the stopped stage (0 when the drain finished
    // every lane), plus any redelivery after a session expired elsewhere in the chain
    // (seen when the machine was starved by a parallel build: at-least-once).
    eprintln!("sigterm under load: stopped in {took:?}, processed {processed}, committed {done}, sent {} duplicates {}", n(&r, "sent"), n(&r, "duplicates"));
}

#[test]
fn every_stage_sigkilled_once_and_restarted_loses_nothing() {
    let Some(b) = brokers("sigkill_each_stage") else { return };
    let _serial = serial();
    let p = TestPipeline::new(&b);
    p.create_topics();
    let mut stages = p.chain();
    let out = p.path().join("report");
    let load = p.loadgen(500, "24s", &out).spawn().unwrap();
    for (i, name) in ["rules", "velocity", "score"].into_iter().enumerate() {
        std::thread::sleep(Duration::from_secs(4));
        stages[i].signal("-KILL");
        let _ = stages[i].wait_exit(Duration::from_secs(5));
        stages[i] = p.stage(name);
    }
    let r = finished_report(load, &out, String::new);
    assert_eq!(n(&r, "lost"), 0, "{r}");
    assert_eq!(n(&r, "order_violations"), 0, "{r}");
    assert_eq!(n(&r, "decided") + n(&r, "dlq"), n(&r, "sent"), "{r}");
    eprintln!("sigkill each stage: sent {} duplicates {} e2e max {} µs", n(&r, "sent"), n(&r, "duplicates"), r["e2e"]["max_us"]);
}

/// Every class of bad configuration stops `actio stage` with exit code 2 and one
/// message naming the file and the field — before it connects: the broker address is
/// unreachable, so nothing can have been consumed.
#[test]
fn bad_configuration_stops_a_stage_with_exit_code_2_naming_file_and_field_before_connecting() {
    type Edit = Box<dyn Fn(String) -> String>;
    let cases: Vec<(&str, &str, Edit, Vec<&str>)> = vec![
        ("unknown field", "pipeline.toml", Box::new(|t| t.replace("max_in_flight = 30000", "max_in_flight = 30000\nmax_inflight = 5")), vec!["pipeline.toml:", "max_inflight"]),
        ("wrong type", "pipeline.toml", Box::new(|t| t.replacen("partitions = 3", "partitions = \"three\"", 1)), vec!["pipeline.toml:", "partitions = \"three\""]),
        ("bad CEL", "rules.toml", Box::new(|t| t.replacen("tx.channel == 'ecom' && tx.amount < 2.0", "tx.channel == 'ecom' &&", 1)), vec!["rules.toml:", "rule \"micro_ecom\".when"]),
        ("missing file", "pipeline.toml", Box::new(|t| t.replace("model = \"model.toml\"", "model = \"modle.toml\"")), vec!["pipeline.toml:", "stage[2].model"]),
        ("broken chain", "pipeline.toml", Box::new(|t| t.replace("input = \"tx.featured\"", "input = \"tx.decisions\"")), vec!["pipeline.toml:", "stage[2].input"]),
        ("replicas > partitions", "pipeline.toml", Box::new(|t| t.replacen("replicas = 2", "replicas = 20", 1)), vec!["pipeline.toml:", "stage[0].replicas"]),
        ("bad librdkafka property", "pipeline.toml", Box::new(|t| t.replace("\"linger.ms\" = \"2\"", "\"linger.ms\" = \"banana\"")), vec!["pipeline.toml", "kafka.\"linger.ms\"", "Invalid value"]),
        ("unknown librdkafka property", "pipeline.toml", Box::new(|t| t.replace("\"linger.ms\" = \"2\"", "\"linger.mss\" = \"2\"")), vec!["pipeline.toml", "kafka.\"linger.mss\""]),
    ];
    for (class, file, edit, want) in cases {
        let dir = copy_of_fraud_with(file, edit);
        let t0 = Instant::now();
        let out = actio()
            .args(["stage", "--stage", "rules", "--brokers", "127.0.0.1:1", "--http", "127.0.0.1:0"])
            .arg("--pipeline")
            .arg(dir.path())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{class}: {stderr}");
        for w in want {
            assert!(stderr.contains(w), "{class}: expected {w:?} in:\n{stderr}");
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "{class}: took {:?}", t0.elapsed());
    }
}

/// The transaction id of a state of the fraud pipeline (its schema's `record.id`).
fn state_id(st: &actio_core::TxState) -> String {
    static SCHEMA: std::sync::OnceLock<actio_core::Schema> = std::sync::OnceLock::new();
    let schema = SCHEMA.get_or_init(|| actio_core::Schema::load(&actio_testkit::fraud().join("schema.toml")).unwrap());
    schema.id_of(&st.tx).to_string()
}
