//! Tests against a real Apache Kafka broker (never a mock). They read
//! `ACTIO_KAFKA_BROKERS`; without it they say so and pass, so a plain `cargo test`
//! works anywhere. `scripts/test` starts a broker and sets it, so CI runs them (and
//! sets `ACTIO_REQUIRE_KAFKA=1`, so a missing broker there fails instead).
//! Every test uses its own random topic and group names.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use actio_bus_kafka::{KafkaBus, KafkaConfig, KafkaConsumer};
use actio_core::bus::{
    Bus, BusErrorKind, Bytes, Consumer, ConsumerConfig, Delivered, Headers, NoRebalanceListener, Offset,
    OutRecord, Producer, ProducerConfig, RebalanceListener, Record, ReplayRange, TopicPartition, TopicSpec, kafka_partition,
};
use actio_testkit::brokers;
use parking_lot::Mutex;
use rand::Rng;

fn rand_name(prefix: &str) -> String {
    let n: u64 = rand::rng().random();
    format!("{prefix}-{n:016x}")
}

fn bus_with_topic(brokers: &str, partitions: i32) -> (KafkaBus, String) {
    let bus = KafkaBus::new(KafkaConfig::new(brokers)).expect("bus");
    let topic = rand_name("actio-test");
    bus.create_topics(&[TopicSpec { name: topic.clone(), partitions }]).expect("create topic");
    // Creating again is not an error.
    bus.create_topics(&[TopicSpec { name: topic.clone(), partitions }]).expect("create topic again");
    (bus, topic)
}

fn consumer_config(group: &str, topic: &str) -> ConsumerConfig {
    ConsumerConfig {
        group: group.to_string(),
        topics: vec![topic.to_string()],
        client_id: rand_name("client"),
        from_earliest: true,
        properties: Vec::new(),
    }
}

/// Produces `ids` as keyed records (`key-<id>`, payload `<id>`, two headers) and waits
/// for every ack; returns where each landed.
fn produce(bus: &KafkaBus, topic: &str, ids: std::ops::Range<u32>) -> BTreeMap<u32, Delivered> {
    let producer = bus.producer(&ProducerConfig { client_id: rand_name("producer"), properties: Vec::new(), transactional_id: None }).expect("producer");
    let (tx, rx) = mpsc::channel();
    let n = ids.len();
    for id in ids {
        let mut headers = Headers::default();
        headers.set("actio-id", id.to_string().into_bytes());
        headers.0.push(("repeat".to_string(), Bytes::from_static(b"a")));
        headers.0.push(("repeat".to_string(), Bytes::from_static(b"b")));
        let rec = OutRecord {
            topic: topic.into(),
            partition: None,
            key: Some(Bytes::from(format!("key-{id}"))),
            payload: Bytes::from(id.to_string()),
            headers,
        };
        let tx = tx.clone();
        producer.send(rec, Box::new(move |r| {
            let _ = tx.send((id, r));
        }))
        .expect("send");
    }
    producer.flush(Duration::from_secs(30)).expect("flush");
    let mut acks = BTreeMap::new();
    for _ in 0..n {
        let (id, r) = rx.recv_timeout(Duration::from_secs(30)).expect("an ack for every send");
        let d = r.unwrap_or_else(|e| panic!("delivery of {id} failed: {e}"));
        assert!(acks.insert(id, d).is_none(), "two acks for {id}");
    }
    drop(producer);
    // Exactly once: no ack may arrive after the n expected ones.
    assert!(rx.recv_timeout(Duration::from_millis(100)).is_err(), "an extra ack arrived");
    acks
}

fn id_of(r: &Record) -> u32 {
    std::str::from_utf8(&r.payload).ok().and_then(|s| s.parse().ok()).expect("payload is an id")
}

/// Records every rebalance event; `revoking` returns one past the last offset the
/// test marked as processed on each revoked partition (what the runtime does).
#[derive(Default)]
struct Recorder {
    processed: Mutex<HashMap<TopicPartition, Offset>>,
    assigned: Mutex<Vec<TopicPartition>>,
    revoked: Mutex<Vec<TopicPartition>>,
    lost: Mutex<Vec<TopicPartition>>,
}

impl Recorder {
    fn processed(&self, r: &Record) {
        self.processed.lock().insert(r.tp.clone(), r.offset + 1);
    }
}

impl RebalanceListener for Recorder {
    fn assigned(&self, partitions: &[TopicPartition]) {
        self.assigned.lock().extend_from_slice(partitions);
    }
    fn revoking(&self, partitions: &[TopicPartition], _: Option<actio_core::GroupToken>) -> Vec<(TopicPartition, Offset)> {
        self.revoked.lock().extend_from_slice(partitions);
        let p = self.processed.lock();
        partitions.iter().filter_map(|tp| p.get(tp).map(|o| (tp.clone(), *o))).collect()
    }
    fn lost(&self, partitions: &[TopicPartition]) {
        self.lost.lock().extend_from_slice(partitions);
    }
}

/// Polls until `want` records arrived or `timeout` passed.
fn poll_n(c: &mut KafkaConsumer, want: usize, timeout: Duration, rec: Option<&Recorder>) -> Vec<Record> {
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    while out.len() < want && Instant::now() < deadline {
        if let Some(r) = c.poll(Duration::from_millis(50)).expect("poll") {
            if let Some(l) = rec {
                l.processed(&r);
            }
            out.push(r);
        }
    }
    out
}

#[test]
fn replay_reads_a_partition_from_a_time_up_to_an_offset_outside_any_group() {
    let Some(b) = brokers("replay") else { return };
    let (bus, topic) = bus_with_topic(&b, 1);
    let now_ms = || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    let early = produce(&bus, &topic, 0..10);
    std::thread::sleep(Duration::from_millis(50));
    let mid = now_ms();
    std::thread::sleep(Duration::from_millis(50));
    let late = produce(&bus, &topic, 10..30);
    let tp = TopicPartition::new(topic.as_str(), 0);
    let replay_at_most = |from_ms: i64, until: Offset, max_records: u64| {
        let mut ids = Vec::new();
        let n = bus.replay(&tp, ReplayRange { from_ms, until, max_records }, &mut |r| ids.push(id_of(r))).expect("replay");
        assert_eq!(n as usize, ids.len());
        ids
    };
    let replay = |from_ms: i64, until: Offset| replay_at_most(from_ms, until, u64::MAX);
    // From a time: the first record at or after it; up to an offset, not including it.
    assert_eq!(replay(mid, late[&25].offset), (10..25).collect::<Vec<_>>());
    assert_eq!(replay(0, early[&5].offset), (0..5).collect::<Vec<_>>());
    assert_eq!(replay(0, late[&29].offset + 1), (0..30).collect::<Vec<_>>());
    assert!(replay(mid, early[&9].offset + 1).is_empty(), "nothing after `from` below `until`");
    assert!(replay(now_ms() + 3_600_000, late[&29].offset + 1).is_empty(), "nothing that recent");
    assert!(replay(0, 0).is_empty());
    // At most the newest `max_records` of the range.
    assert_eq!(replay_at_most(0, late[&29].offset + 1, 4), (26..30).collect::<Vec<_>>());
    assert_eq!(replay_at_most(mid, late[&25].offset, 100), (10..25).collect::<Vec<_>>());
    assert!(replay_at_most(0, late[&29].offset + 1, 0).is_empty());
    // Nothing was committed for anyone.
    assert_eq!(bus.committed_offsets("actio-replay", &topic).expect("committed"), vec![None]);
}

#[test]
fn keyed_records_keep_key_headers_and_land_on_kafkas_murmur2_partition() {
    let Some(b) = brokers("keyed_records") else { return };
    let (bus, topic) = bus_with_topic(&b, 6);
    let acks = produce(&bus, &topic, 0..120);
    assert_eq!(acks.len(), 120, "an ack for every send");
    for (id, d) in &acks {
        assert_eq!(d.partition, kafka_partition(format!("key-{id}").as_bytes(), 6), "producer placed {id}");
    }
    let end = bus.end_offsets(&topic).expect("end offsets");
    assert_eq!(end.iter().sum::<i64>(), 120);
    assert!(end.iter().filter(|e| **e > 0).count() >= 4, "keys spread over partitions: {end:?}");

    let mut c = bus.consumer(&consumer_config(&rand_name("g"), &topic), Arc::new(NoRebalanceListener)).expect("consumer");
    let got = poll_n(&mut c, 120, Duration::from_secs(30), None);
    assert_eq!(got.len(), 120);
    let mut seen = BTreeSet::new();
    for r in &got {
        let id = id_of(r);
        assert!(seen.insert(id), "{id} twice");
        assert_eq!(r.key.as_deref(), Some(format!("key-{id}").as_bytes()));
        assert_eq!(r.tp.partition, kafka_partition(format!("key-{id}").as_bytes(), 6));
        assert_eq!((r.tp.partition, r.offset), (acks[&id].partition, acks[&id].offset), "ack said where {id} is");
        assert_eq!(r.headers.get("actio-id"), Some(id.to_string().as_bytes()));
        let repeats: Vec<&[u8]> = r.headers.iter().filter(|(k, _)| *k == "repeat").map(|(_, v)| v).collect();
        assert_eq!(repeats, vec![&b"a"[..], &b"b"[..]], "repeated headers keep order");
        assert!(r.timestamp_ms.is_some_and(|t| t > 1_600_000_000_000));
    }
    c.close().expect("close");
}

#[test]
fn a_send_that_cannot_be_delivered_still_gets_its_ack() {
    let Some(b) = brokers("undeliverable_ack") else { return };
    let bus = KafkaBus::new(KafkaConfig::new(&b)).expect("bus");
    // The broker does not auto-create topics: this one never exists.
    let props = vec![("message.timeout.ms".to_string(), "1500".to_string())];
    let producer = bus.producer(&ProducerConfig { client_id: "undeliverable".into(), properties: props, transactional_id: None }).expect("producer");
    let (tx, rx) = mpsc::channel();
    let rec = OutRecord {
        topic: rand_name("missing").into(),
        partition: None,
        key: Some(Bytes::from_static(b"k")),
        payload: Bytes::from_static(b"v"),
        headers: Headers::default(),
    };
    producer.send(rec, Box::new(move |r| {
        let _ = tx.send(r);
    }))
    .expect("queued");
    let r = rx.recv_timeout(Duration::from_secs(20)).expect("the ack must be called");
    let e = r.expect_err("delivery must fail");
    assert!(matches!(e.kind, BusErrorKind::UnknownTopic | BusErrorKind::Transient), "{e:?}");
}

#[test]
fn committed_offsets_survive_close_and_are_seen_from_outside() {
    let Some(b) = brokers("committed_offsets") else { return };
    let (bus, topic) = bus_with_topic(&b, 3);
    let acks = produce(&bus, &topic, 0..60);
    let group = rand_name("g");
    let rec = Arc::new(Recorder::default());
    let mut c = bus.consumer(&consumer_config(&group, &topic), rec.clone()).expect("consumer");
    let got = poll_n(&mut c, 60, Duration::from_secs(30), None);
    assert_eq!(got.len(), 60);

    // "Process" all but the last message of each partition, and commit that.
    let mut want: Vec<Option<Offset>> = vec![None; 3];
    let mut last: BTreeMap<i32, Offset> = BTreeMap::new();
    for d in acks.values() {
        let l = last.entry(d.partition).or_insert(d.offset);
        *l = (*l).max(d.offset);
    }
    let mut offsets = Vec::new();
    for (p, l) in &last {
        offsets.push((TopicPartition::new(topic.as_str(), *p), *l)); // next = last: last is unprocessed
        want[*p as usize] = Some(*l);
        rec.processed.lock().insert(TopicPartition::new(topic.as_str(), *p), *l);
    }
    c.commit(&offsets).expect("commit");

    // The stored offsets reach the broker through auto-commit, without close.
    let deadline = Instant::now() + Duration::from_secs(5);
    while bus.committed_offsets(&group, &topic).expect("committed") != want {
        assert!(Instant::now() < deadline, "auto-commit did not send stored offsets within 5 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    c.close().expect("close");
    let revoked: BTreeSet<_> = rec.revoked.lock().iter().cloned().collect();
    assert_eq!(revoked.len(), 3, "close revokes every partition through the listener");
    assert_eq!(bus.committed_offsets(&group, &topic).expect("committed"), want);
    let lag = bus.group_lag(&group, &topic).expect("lag");
    assert_eq!(lag.iter().map(|l| l.lag).sum::<i64>(), last.len() as i64, "one unprocessed message per partition");

    // An independent client (plain rdkafka, not our code) sees the same offsets.
    use rdkafka::consumer::{BaseConsumer, Consumer as _};
    let other: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &b)
        .set("group.id", &group)
        .create()
        .expect("rdkafka client");
    let mut tpl = rdkafka::TopicPartitionList::new();
    tpl.add_partition_range(&topic, 0, 2);
    let seen = other.committed_offsets(tpl, Duration::from_secs(10)).expect("committed_offsets");
    for el in seen.elements() {
        assert_eq!(el.offset().to_raw(), want[el.partition() as usize], "partition {}", el.partition());
    }

    // And so does Kafka's own ConsumerGroupCommand, when its jars are at hand.
    match std::env::var("ACTIO_KAFKA_LIBS") {
        Ok(libs) if std::path::Path::new(&libs).is_dir() => {
            let out = std::process::Command::new("java")
                .args(["-cp", &format!("{libs}/*"), "org.apache.kafka.tools.consumer.group.ConsumerGroupCommand"])
                .args(["--bootstrap-server", &b, "--describe", "--group", &group])
                .output()
                .expect("run java");
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(out.status.success(), "ConsumerGroupCommand failed: {}{}", text, String::from_utf8_lossy(&out.stderr));
            let mut rows = 0;
            for line in text.lines() {
                let f: Vec<&str> = line.split_whitespace().collect();
                // GROUP TOPIC PARTITION CURRENT-OFFSET LOG-END-OFFSET LAG ...
                if f.len() >= 6 && f[1] == topic {
                    let p: usize = f[2].parse().expect("partition");
                    assert_eq!(Some(f[3].parse::<i64>().expect("offset")), want[p], "java: {line}");
                    rows += 1;
                }
            }
            assert_eq!(rows, 3, "java saw every partition:\n{text}");
        }
        _ => eprintln!("committed_offsets: Java check skipped: ACTIO_KAFKA_LIBS not set"),
    }
}

#[test]
fn two_members_split_partitions_and_the_survivor_resumes_at_the_committed_offsets() {
    let Some(b) = brokers("two_members") else { return };
    let (bus, topic) = bus_with_topic(&b, 4);
    produce(&bus, &topic, 0..80);
    let group = rand_name("g");
    let (ra, rb) = (Arc::new(Recorder::default()), Arc::new(Recorder::default()));
    let mut a = bus.consumer(&consumer_config(&group, &topic), ra.clone()).expect("a");
    let mut seen: Vec<u32> = Vec::new();

    // A alone: owns everything; it reads part of the backlog.
    seen.extend(poll_n(&mut a, 20, Duration::from_secs(30), Some(&ra)).iter().map(id_of));
    assert_eq!(a.assignment().len(), 4);

    // B joins: cooperative-sticky moves two partitions, A commits them on revocation.
    let mut b_ = bus.consumer(&consumer_config(&group, &topic), rb.clone()).expect("b");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        for (c, r) in [(&mut a, &ra), (&mut b_, &rb)] {
            if let Some(rec) = c.poll(Duration::from_millis(20)).expect("poll") {
                r.processed(&rec);
                seen.push(id_of(&rec));
            }
        }
        let (sa, sb) = (a.assignment(), b_.assignment());
        if sa.len() == 2 && sb.len() == 2 {
            let all: BTreeSet<_> = sa.iter().chain(sb.iter()).collect();
            assert_eq!(all.len(), 4, "no partition owned twice: {sa:?} {sb:?}");
            break;
        }
        assert!(Instant::now() < deadline, "no split within 30 s: {sa:?} {sb:?}");
    }
    assert_eq!(ra.revoked.lock().len(), 2, "A gave up exactly two partitions");
    assert!(ra.lost.lock().is_empty() && rb.lost.lock().is_empty());

    // Both read a little more, then A leaves.
    for _ in 0..20 {
        for (c, r) in [(&mut a, &ra), (&mut b_, &rb)] {
            if let Some(rec) = c.poll(Duration::from_millis(20)).expect("poll") {
                r.processed(&rec);
                seen.push(id_of(&rec));
            }
        }
    }
    let a_owned = a.assignment();
    a.close().expect("close a");
    let revoked_a: BTreeSet<_> = ra.revoked.lock().iter().cloned().collect();
    assert!(a_owned.iter().all(|tp| revoked_a.contains(tp)), "close revoked A's partitions through the listener");

    produce(&bus, &topic, 80..120);
    let deadline = Instant::now() + Duration::from_secs(40);
    while BTreeSet::from_iter(seen.iter().copied()).len() < 120 {
        assert!(Instant::now() < deadline, "survivor did not get everything: {} of 120", seen.len());
        if let Some(rec) = b_.poll(Duration::from_millis(50)).expect("poll") {
            rb.processed(&rec);
            seen.push(id_of(&rec));
        }
    }
    assert_eq!(b_.assignment().len(), 4, "the survivor owns everything");
    let unique: BTreeSet<u32> = seen.iter().copied().collect();
    assert_eq!(unique, (0..120).collect(), "no message lost");
    assert_eq!(seen.len(), 120, "graceful hand-overs repeat nothing");
    b_.close().expect("close b");
    assert_eq!(bus.group_lag(&group, &topic).expect("lag").iter().map(|l| l.lag).sum::<i64>(), 0);
}

#[test]
fn pause_stops_delivery_and_resume_restarts_it() {
    let Some(b) = brokers("pause_resume") else { return };
    let (bus, topic) = bus_with_topic(&b, 1);
    let rec = Arc::new(Recorder::default());
    let mut c = bus.consumer(&consumer_config(&rand_name("g"), &topic), rec.clone()).expect("consumer");
    let deadline = Instant::now() + Duration::from_secs(30);
    while c.assignment().is_empty() {
        assert!(Instant::now() < deadline, "no assignment");
        assert!(c.poll(Duration::from_millis(50)).expect("poll").is_none());
    }
    assert_eq!(rec.assigned.lock().len(), 1, "the listener heard of the assignment");
    let tp = TopicPartition::new(topic.as_str(), 0);
    c.pause(std::slice::from_ref(&tp)).expect("pause");
    produce(&bus, &topic, 0..10);
    let got = poll_n(&mut c, 1, Duration::from_millis(1500), None);
    assert!(got.is_empty(), "paused partition delivered {} record(s)", got.len());
    c.resume(std::slice::from_ref(&tp)).expect("resume");
    let got = poll_n(&mut c, 10, Duration::from_secs(15), None);
    assert_eq!(got.iter().map(id_of).collect::<Vec<_>>(), (0..10).collect::<Vec<_>>(), "in order after resume");
    c.close().expect("close");
}

/// librdkafka keeps a partition's pause flag when the partition is revoked and later
/// assigned again; the bus must hand it back unpaused (the runtime's state for it
/// starts afresh). Without that, a stage that lost its partitions while back-pressure
/// had paused them never fetched them again.
#[test]
fn a_partition_paused_then_revoked_comes_back_unpaused() {
    let Some(b) = brokers("paused_reassigned") else { return };
    let (bus, topic) = bus_with_topic(&b, 2);
    let group = rand_name("g");
    let ra = Arc::new(Recorder::default());
    let mut a = bus.consumer(&consumer_config(&group, &topic), ra.clone()).expect("a");
    let deadline = Instant::now() + Duration::from_secs(30);
    while a.assignment().len() < 2 {
        assert!(Instant::now() < deadline, "A got no assignment");
        assert!(a.poll(Duration::from_millis(50)).expect("poll").is_none());
    }
    let all = a.assignment();
    a.pause(&all).expect("pause");

    // B joins and takes one partition from A, then leaves: A gets it back.
    let mut b_ = bus.consumer(&consumer_config(&group, &topic), Arc::new(NoRebalanceListener)).expect("b");
    let deadline = Instant::now() + Duration::from_secs(30);
    while b_.assignment().len() != 1 || a.assignment().len() != 1 {
        assert!(Instant::now() < deadline, "no split within 30 s");
        assert!(a.poll(Duration::from_millis(20)).expect("poll").is_none(), "A is paused");
        let _ = b_.poll(Duration::from_millis(20)).expect("poll");
    }
    let moved = b_.assignment().remove(0);
    let kept = a.assignment().remove(0);
    b_.close().expect("close b");
    let deadline = Instant::now() + Duration::from_secs(30);
    while a.assignment().len() < 2 {
        assert!(Instant::now() < deadline, "A did not get the partition back");
        assert!(a.poll(Duration::from_millis(50)).expect("poll").is_none(), "the kept partition is still paused");
    }

    let sent = produce(&bus, &topic, 0..40);
    let on_moved = sent.values().filter(|d| d.partition == moved.partition).count();
    assert!(on_moved > 0 && on_moved < 40, "both partitions got records");
    let got = poll_n(&mut a, on_moved, Duration::from_secs(15), None);
    assert_eq!(got.len(), on_moved, "the re-assigned partition is fetched again");
    assert!(got.iter().all(|r| r.tp == moved), "the partition A kept (and paused) stays paused");
    assert!(poll_n(&mut a, 1, Duration::from_millis(1500), None).is_empty(), "nothing from {kept}");
    a.close().expect("close a");
}

#[test]
fn bad_librdkafka_property_fails_with_librdkafkas_message() {
    // Needs no broker, but runs here too so the broker suite shows it.
    let props = vec![("linger.ms".to_string(), "banana".to_string())];
    let e = KafkaBus::new(KafkaConfig { brokers: "127.0.0.1:1".into(), properties: props }).expect_err("must fail");
    assert_eq!(e.kind, BusErrorKind::Config);
    // librdkafka names the canonical property (linger.ms is an alias of
    // queue.buffering.max.ms); rdkafka appends the key and value we passed.
    assert!(e.message.contains("Invalid value for configuration property"), "{}", e.message);
    assert!(e.message.contains("linger.ms banana"), "{}", e.message);
}
