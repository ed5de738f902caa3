//! The `route` kind: CEL routes, targets named from fields and headers, and nothing
//! silently nowhere.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use actio_core::bus::Bytes;
use actio_core::{Codec, Headers, Record, TopicPartition, TxState};
use actio_runtime::{Context, FailureKind, Handler, HandlerError};

use crate::Pipeline;
use crate::kinds::testing::{pipeline_in, topic};
use crate::stages::StageHandler;

const SCHEMA: &str = r#"
[record]
id = "update_id"
time = "observed_at"

[[field]]
name = "update_id"
type = "string"

[[field]]
name = "service"
type = "string"

[[field]]
name = "status"
type = "enum"
values = ["ok", "error"]

[[field]]
name = "observed_at"
type = "timestamp"

[decision]
outcomes = ["ok"]
fields = []
features = []
"#;

/// A pipeline of one `route` stage with `extra` lines after its common fields.
fn routed(extra: &str) -> (tempfile::TempDir, Result<Pipeline, String>) {
    let topics = [
        topic("in", "json", "ingress"),
        topic("errors", "postcard", "internal"),
        topic("unrouted", "postcard", "internal"),
        topic("billing_lastdata", "json", "egress"),
        topic("search_lastdata", "json", "egress"),
        topic("dlq", "json", "dead_letter"),
    ]
    .concat();
    let text = format!(
        "name = \"updates\"\nschema = \"schema.toml\"\n[key]\nfields = [\"service\"]\n{topics}[[stage]]\nname = \"route\"\nkind = \"route\"\ninput = \"in\"\noutput = \"unrouted\"\ndlq = \"dlq\"\n{extra}\n"
    );
    pipeline_in(SCHEMA, &text, &[])
}

const ROUTES: &str = "[[stage.route]]\nwhen = \"tx.status == 'error'\"\nto = \"errors\"\n[[stage.route]]\nto = \"{service}_lastdata\"\n";

fn update(service: &str, status: &str) -> Record {
    let json = format!(r#"{{"update_id":"u-1","service":"{service}","status":"{status}","observed_at":"2026-12-01T10:00:00Z"}}"#);
    Record { tp: TopicPartition::new("in", 0), offset: 0, key: Some(Bytes::from(service.to_string())), payload: Bytes::from(json), headers: Headers::default(), timestamp_ms: None }
}

fn run(h: &StageHandler, r: &Record) -> Result<Vec<(String, Bytes)>, HandlerError> {
    h.handle(r, &Context::first(r)).map(|out| out.into_iter().map(|o| (o.topic.to_string(), o.payload)).collect())
}

fn topics(out: &[(String, Bytes)]) -> Vec<&str> {
    out.iter().map(|(t, _)| t.as_str()).collect()
}

fn counter(h: &StageHandler, name: &str) -> u64 {
    h.counters().into_iter().find(|c| c.name == name).map_or(0, |c| c.value)
}

#[test]
fn the_first_route_that_holds_takes_the_message_to_its_topic() {
    let (_d, p) = routed(ROUTES);
    let p = p.unwrap();
    let h = StageHandler::new(&p, &p.stages[0]);
    let out = run(&h, &update("billing", "error")).unwrap();
    assert_eq!(topics(&out), ["errors"]);
    let st: TxState = Codec::Postcard.decode(&out[0].1).unwrap();
    assert_eq!(p.schema.id_of(&st.tx), "u-1", "between stages: the state in the topic's codec");
    let out = run(&h, &update("billing", "ok")).unwrap();
    assert_eq!(topics(&out), ["billing_lastdata"], "a target named from the message's `service`");
    let json: serde_json::Value = serde_json::from_slice(&out[0].1).unwrap();
    assert_eq!(json["service"], "billing", "at an egress topic: the record as the schema's JSON: {json}");
    assert_eq!(run(&h, &update("search", "ok")).unwrap()[0].0, "search_lastdata");
}

#[test]
fn mode_all_sends_a_copy_to_every_route_that_holds() {
    let (_d, p) = routed(&format!("mode = \"all\"\n{ROUTES}"));
    let p = p.unwrap();
    let h = StageHandler::new(&p, &p.stages[0]);
    assert_eq!(topics(&run(&h, &update("billing", "error")).unwrap()), ["errors", "billing_lastdata"]);
    assert_eq!(topics(&run(&h, &update("billing", "ok")).unwrap()), ["billing_lastdata"]);
}

#[test]
fn a_target_that_does_not_exist_goes_to_the_output_or_the_dlq_never_nowhere() {
    let (_d, p) = routed(ROUTES);
    let p = p.unwrap();
    let h = StageHandler::new(&p, &p.stages[0]);
    assert_eq!(topics(&run(&h, &update("payroll", "ok")).unwrap()), ["unrouted"], "payroll_lastdata is not declared");
    assert_eq!(counter(&h, super::MISSING_TARGET), 1);

    let (_d, p) = routed(&format!("unmatched = \"dlq\"\n{ROUTES}"));
    let p = p.unwrap();
    let h = StageHandler::new(&p, &p.stages[0]);
    let e = run(&h, &update("payroll", "ok")).unwrap_err();
    assert_eq!(e.kind, FailureKind::Permanent, "dead-lettered at once");
    assert!(e.message.contains("\"payroll_lastdata\" is not declared"), "{e}");

    // No route holds: the same.
    let only_errors = "unmatched = \"dlq\"\n[[stage.route]]\nwhen = \"tx.status == 'error'\"\nto = \"errors\"\n";
    let (_d, p) = routed(only_errors);
    let p = p.unwrap();
    let h = StageHandler::new(&p, &p.stages[0]);
    assert!(run(&h, &update("billing", "ok")).unwrap_err().message.contains("no route"));
    assert_eq!(counter(&h, super::UNMATCHED), 1);
}

#[test]
fn through_the_runtime_a_missing_target_is_dead_lettered_with_the_reason() {
    use actio_bus_embedded::{EmbeddedBus, EmbeddedConfig};
    use actio_core::bus::NoRebalanceListener;
    use actio_core::{Bus, Consumer, ConsumerConfig, OutRecord, Producer, ProducerConfig, TopicSpec};
    let (_d, p) = routed(&format!("unmatched = \"dlq\"\n{ROUTES}"));
    let p = p.unwrap();
    let bus = EmbeddedBus::new(EmbeddedConfig::default());
    bus.create_topics(&p.topics.iter().map(|t| TopicSpec { name: t.name.clone(), partitions: t.partitions }).collect::<Vec<_>>()).unwrap();
    let h = std::sync::Arc::new(StageHandler::new(&p, &p.stages[0]));
    let stage = actio_runtime::Stage::spawn(&bus, h.spec(&[]), h.clone()).unwrap();
    let producer = bus.producer(&ProducerConfig::default()).unwrap();
    for service in ["payroll", "billing"] {
        let r = update(service, "ok");
        producer.send(OutRecord { topic: "in".into(), partition: None, key: r.key, payload: r.payload, headers: Headers::default() }, Box::new(|a| assert!(a.is_ok()))).unwrap();
    }
    let read = |topic: &str| {
        let cfg = ConsumerConfig { group: format!("read-{topic}"), topics: vec![topic.into()], client_id: "t".into(), from_earliest: true, properties: vec![] };
        let mut c = bus.consumer(&cfg, std::sync::Arc::new(NoRebalanceListener)).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            if let Some(r) = c.poll(std::time::Duration::from_millis(20)).unwrap() {
                return r;
            }
            assert!(std::time::Instant::now() < deadline, "nothing on {topic}");
        }
    };
    let dead = read("dlq");
    let billed = read("billing_lastdata");
    stage.stop(actio_runtime::StopMode::Graceful);
    stage.join().unwrap();
    let why = String::from_utf8_lossy(dead.headers.get(actio_core::headers::ERROR).unwrap()).into_owned();
    assert!(why.contains("\"payroll_lastdata\" is not declared"), "{why}");
    assert_eq!(dead.key.as_deref(), Some(&b"payroll"[..]), "the original message, dead-lettered");
    assert_eq!(billed.key.as_deref(), Some(&b"billing"[..]), "the next goes on");
}

#[test]
fn a_target_can_be_named_by_a_header() {
    let (_d, p) = routed("[[stage.route]]\nto = \"{header.tenant}_lastdata\"\n");
    let p = p.unwrap();
    let h = StageHandler::new(&p, &p.stages[0]);
    let mut r = update("billing", "ok");
    r.headers.set("tenant", b"search".to_vec());
    assert_eq!(topics(&run(&h, &r).unwrap()), ["search_lastdata"]);
    assert_eq!(topics(&run(&h, &update("billing", "ok")).unwrap()), ["unrouted"], "without the header");
}

#[test]
fn route_config_errors_name_the_field() {
    for (extra, field, message) in [
        ("[[stage.route]]\nto = \"nowhere\"\n", "stage[0].route[0].to", "\"nowhere\" is not a declared topic"),
        ("[[stage.route]]\nto = \"dlq\"\n", "stage[0].route[0].to", "\"dlq\" is not a declared topic of role internal or egress"),
        ("[[stage.route]]\nto = \"{tenant}_x\"\n", "stage[0].route[0].to", "{tenant}"),
        ("[[stage.route]]\nwhen = \"tx.nope == 1\"\nto = \"errors\"\n", "stage[0].route[0].when", "nope"),
        ("mode = \"some\"\n[[stage.route]]\nto = \"errors\"\n", "stage[0].mode", "unknown variant `some`"),
        ("", "stage[0]", "missing field `route`"),
    ] {
        let (_d, p) = routed(extra);
        let e = p.err().unwrap_or_else(|| panic!("{extra:?} loads"));
        assert!(e.contains(field) && e.contains(message), "{extra:?}: {e}");
    }
}

#[test]
fn a_route_stage_ends_a_fused_service() {
    let next = "[[stage]]\nname = \"newest\"\nkind = \"latest\"\ninput = \"errors\"\noutput = \"search_lastdata\"\ndlq = \"dlq\"\ntimestamp = \"observed_at\"\n";
    let (_d, p) = routed(&format!("{ROUTES}{next}"));
    let p = p.unwrap();
    assert_eq!(p.stages[1].input, "errors", "a stage reads a route's target");
    let e = p.consecutive(&["route", "newest"]).unwrap_err();
    assert!(e.contains("`route` stage") && e.contains("only be a service's last stage"), "{e}");
}
