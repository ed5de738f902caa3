//! The `latest` kind on a small sensor pipeline: an older update never overwrites a
//! newer one, whatever the arrival order; state rebuilt from history decides as the
//! state it replaces; config errors name file, field and line.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use actio_core::bus::Bytes;
use actio_core::{Codec, Headers, Record, TopicPartition, TxState};
use actio_runtime::{Context, Handler};
use proptest::prelude::*;

use crate::Pipeline;
use crate::kinds::History;
use crate::stages::StageHandler;

const SCHEMA: &str = r#"
[record]
id = "update_id"
time = "observed_at"

[[field]]
name = "update_id"
type = "string"

[[field]]
name = "sensor_id"
type = "string"

[[field]]
name = "observed_at"
type = "timestamp"

[[field]]
name = "reading"
type = "float"

[[derived]]
name = "hot"
type = "bool"
cel = "tx.reading > 50.0"

[decision]
outcomes = ["ok"]
fields = []
features = []
"#;

/// A pipeline of one `latest` stage with `extra` lines in its `[[stage]]`, and
/// `timestamp = "observed_at"` unless `extra` sets it (`"-"`: no timestamp).
fn sensors(extra: &str) -> (tempfile::TempDir, Result<Pipeline, String>) {
    let extra = match extra {
        "-" => String::new(),
        e if e.starts_with("timestamp") => e.to_string(),
        e => format!("timestamp = \"observed_at\"\n{e}"),
    };
    let pipeline = format!(
        r#"name = "sensors"
schema = "schema.toml"
[key]
fields = ["sensor_id"]
[[topic]]
name = "in"
partitions = 2
codec = "json"
role = "ingress"
[[topic]]
name = "newest"
partitions = 2
codec = "postcard"
role = "internal"
[[topic]]
name = "out"
partitions = 2
codec = "json"
role = "egress"
[[topic]]
name = "dlq"
partitions = 2
codec = "json"
role = "dead_letter"
[[stage]]
name = "newest"
kind = "latest"
input = "in"
output = "newest"
dlq = "dlq"
{extra}
"#
    );
    crate::kinds::testing::pipeline_in(SCHEMA, &pipeline, &[])
}

fn update(sensor: u32, time: i64, reading: f64, partition: i32, offset: i64) -> Record {
    let json = format!(r#"{{"update_id":"u-{offset}","sensor_id":"s-{sensor}","observed_at":{time},"reading":{reading}}}"#);
    Record { tp: TopicPartition::new("in", partition), offset, key: Some(Bytes::from(format!("s-{sensor}"))), payload: Bytes::from(json), headers: Headers::default(), timestamp_ms: None }
}

/// The observed_at of what `h` emitted for `r`, if anything.
fn emitted(h: &StageHandler, r: &Record) -> Option<i64> {
    let out = h.handle(r, &Context::first(r)).unwrap();
    assert!(out.len() <= 1);
    out.first().map(|o| {
        let st: TxState = Codec::Postcard.decode(&o.payload).unwrap();
        match st.tx.values[2] {
            actio_core::schema::Value::Int(t) => t,
            ref v => panic!("{v:?}"),
        }
    })
}

fn counter(h: &StageHandler, name: &str) -> u64 {
    h.counters().into_iter().find(|c| c.name == name).map_or(0, |c| c.value)
}

proptest! {
    /// Updates of 4 sensors with times 0..40, in any arrival order: an update goes on
    /// iff it is newer than every earlier arrival of its sensor, so what goes on per
    /// sensor rises strictly and ends at the sensor's newest; the rest are counted.
    #[test]
    fn an_older_update_never_overwrites_a_newer_one(updates in prop::collection::vec((0u32..4, 0i64..40), 1..200)) {
        let (_d, p) = sensors("");
        let p = p.unwrap();
        let h = StageHandler::new(&p, &p.stages[0]);
        let mut newest = std::collections::HashMap::new();
        let mut dropped = 0;
        for (i, (sensor, time)) in updates.iter().enumerate() {
            let out = emitted(&h, &update(*sensor, *time, 1.0, (*sensor % 2) as i32, i as i64));
            let before = newest.get(sensor).copied();
            if before.is_none_or(|b| *time > b) {
                prop_assert_eq!(out, Some(*time), "update {} of sensor {} at {} (newest {:?})", i, sensor, time, before);
                newest.insert(*sensor, *time);
            } else {
                prop_assert_eq!(out, None, "update {} of sensor {} at {} is not newer than {:?}", i, sensor, time, before);
                dropped += 1;
            }
        }
        prop_assert_eq!(counter(&h, super::STALE), dropped);
    }

    /// A replica that takes a partition over rebuilds its state from the partition's
    /// history and then decides every later update as the first owner would have.
    #[test]
    fn a_rebuilt_state_decides_as_the_state_it_replaces(updates in prop::collection::vec((0u32..4, 0i64..40), 2..120), cut in 0usize..120) {
        let (_d, p) = sensors("");
        let p = p.unwrap();
        let cut = cut % updates.len();
        let records: Vec<Record> = updates.iter().enumerate().map(|(i, (s, t))| update(*s * 2, *t, 1.0, 0, i as i64)).collect();
        let first = StageHandler::new(&p, &p.stages[0]);
        for r in &records[..cut] {
            emitted(&first, r);
        }
        // The takeover: a new runner of the stage, assigned partition 0, replays it.
        let taker = p.stages[0].logic.clone().runner();
        let history: Vec<Record> = records[..cut].to_vec();
        let replay = |_: &TopicPartition, _: i64, _: u64, f: &mut dyn FnMut(&mut TxState)| {
            let mut n = 0;
            for r in &history {
                let mut st = TxState::new(p.schema.decode_json(&r.payload).unwrap());
                p.derived.fill(&mut st).unwrap();
                f(&mut st);
                n += 1;
            }
            Ok((n, 0))
        };
        taker.assigned(&[TopicPartition::new("in", 0)], &History { service: "newest", input: "in", replay: Some(&replay) });
        let output: std::sync::Arc<str> = std::sync::Arc::from("newest");
        for r in &records[cut..] {
            let ctx = Context::first(r);
            let mut st = TxState::new(p.schema.decode_json(&r.payload).unwrap());
            p.derived.fill(&mut st).unwrap();
            let cx = crate::kinds::RunCx { ctx: &ctx, key: &p.key, input: "in", output: &output, headers: &r.headers, schema: &p.schema, holds: &Default::default(), retry: &p.stages[0].limits.retry };
            let took = matches!(taker.run(st, &cx).unwrap(), crate::kinds::Produced::Tx(_));
            prop_assert_eq!(took, emitted(&first, r).is_some(), "record {}", r.offset);
        }
    }
}

#[test]
fn emit_changed_drops_newer_updates_that_repeat_the_state() {
    let (_d, p) = sensors("emit = \"changed\"");
    let p = p.unwrap();
    let h = StageHandler::new(&p, &p.stages[0]);
    assert_eq!(emitted(&h, &update(1, 10, 20.0, 0, 0)), Some(10));
    assert_eq!(emitted(&h, &update(1, 11, 20.0, 0, 1)), None, "a heartbeat: same reading, later time");
    assert_eq!(emitted(&h, &update(1, 12, 21.5, 0, 2)), Some(12));
    assert_eq!(emitted(&h, &update(1, 11, 99.0, 0, 3)), None, "older than 12, though different");
    assert_eq!((counter(&h, super::UNCHANGED), counter(&h, super::STALE)), (1, 1));
    // Time moved on with the heartbeat: an update at 11 was stale even before 12.
}

#[test]
fn the_record_that_set_the_newest_time_goes_on_again_when_retried() {
    let (_d, p) = sensors("");
    let p = p.unwrap();
    let h = StageHandler::new(&p, &p.stages[0]);
    let r = update(1, 10, 20.0, 0, 7);
    assert_eq!(emitted(&h, &r), Some(10));
    let again = h.handle(&r, &Context::first(&r).with_attempt(2)).unwrap();
    assert_eq!(again.len(), 1, "a retry of the same input record is not stale");
    let copy = update(1, 10, 20.0, 0, 8);
    assert_eq!(emitted(&h, &copy), None, "another record with the same time is");
}

#[test]
fn the_newest_is_kept_per_input_partition_and_dropped_with_it() {
    let (_d, p) = sensors("");
    let p = p.unwrap();
    let h = StageHandler::new(&p, &p.stages[0]);
    h.partitions_assigned(&[TopicPartition::new("in", 0), TopicPartition::new("in", 1)]);
    assert_eq!(emitted(&h, &update(1, 10, 1.0, 1, 0)), Some(10));
    assert_eq!(emitted(&h, &update(1, 5, 1.0, 1, 1)), None);
    h.partitions_revoked(&[TopicPartition::new("in", 1)]);
    assert_eq!(emitted(&h, &update(1, 5, 1.0, 1, 2)), Some(5), "a revoked partition's state is gone (a new owner rebuilds it)");
}

#[test]
fn a_missing_timestamp_is_a_permanent_failure() {
    let (_d, p) = sensors("");
    let p = p.unwrap();
    let h = StageHandler::new(&p, &p.stages[0]);
    let mut r = update(1, 10, 1.0, 0, 0);
    r.payload = Bytes::from_static(br#"{"update_id":"u","sensor_id":"s-1","reading":1.0}"#);
    let e = h.handle(&r, &Context::first(&r)).unwrap_err();
    assert_eq!(e.kind, actio_runtime::FailureKind::Permanent, "{e}");
}

#[test]
fn config_errors_name_the_field_and_line() {
    let cases = [
        ("timestamp = \"seen_at\"", "stage[0].timestamp", "unknown field \"seen_at\""),
        ("timestamp = \"reading\"", "stage[0].timestamp", "is a float"),
        ("restore = \"sometimes\"", "stage[0].restore", "expected \"all\", \"off\" or a duration"),
        ("restore_max_records = 0", "stage[0].restore_max_records", "expected at least 1"),
        ("emit = \"always\"", "stage[0].emit", "unknown variant `always`"),
        ("window = \"1h\"", "stage[0].window", "unknown field `window`"),
        ("-", "stage[0]", "missing field `timestamp`"),
    ];
    for (extra, field, message) in cases {
        let (_d, p) = sensors(extra);
        let e = p.err().unwrap_or_else(|| panic!("{extra:?} loads"));
        assert!(e.contains(field) && e.contains(message) && e.contains("pipeline.toml:"), "{extra:?}: {e}");
    }
}

#[test]
fn a_kind_unknown_to_the_registry_lists_the_kinds() {
    let (d, p) = sensors("");
    p.unwrap();
    let file = d.path().join("pipeline.toml");
    std::fs::write(&file, std::fs::read_to_string(&file).unwrap().replace("kind = \"latest\"", "kind = \"lastest\"")).unwrap();
    let e = Pipeline::load(d.path()).unwrap_err().to_string();
    assert!(e.contains("stage[0].kind") && e.contains("unknown stage kind \"lastest\"") && e.contains("rules, velocity, score, latest"), "{e}");
}
