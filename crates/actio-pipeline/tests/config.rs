//! The shipped pipeline loads; every class of bad configuration fails with a message
//! naming the file and the field.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use actio_pipeline::Pipeline;
use actio_testkit::{copy_of_fraud, copy_of_fraud_with, fraud};

/// A copy of the shipped pipeline with `file` edited by `edit`, and the error loading it.
fn broken(file: &str, edit: impl Fn(String) -> String) -> (tempfile::TempDir, String) {
    let dir = copy_of_fraud_with(file, edit);
    let err = Pipeline::load(dir.path()).unwrap_err().to_string();
    (dir, err)
}

#[test]
fn the_shipped_fraud_pipeline_loads() {
    let p = Pipeline::load(&fraud()).unwrap();
    assert_eq!(p.name, "fraud");
    assert_eq!(p.stages.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(), ["rules", "velocity", "score"]);
    assert_eq!(p.stages[0].group, "fraud.rules");
    let rules = p.stages[0].logic.rules().expect("a rules stage").current().len();
    let velocity_rules = p.stages[1].logic.rules().expect("a velocity stage with rules").current().len();
    assert!((40..=60).contains(&(rules + velocity_rules)), "{rules} + {velocity_rules} rules");
    assert!(p.warnings.is_empty(), "{:?}", p.warnings);
    let files: Vec<_> = p.reloadables().iter().map(|r| r.path().file_name().unwrap().to_string_lossy().into_owned()).collect();
    assert_eq!(files, ["rules.toml", "velocity_rules.toml", "model.toml"], "the files the stages reload");
}

#[test]
fn unknown_field_names_file_line_and_field() {
    let (_d, e) = broken("pipeline.toml", |t| t.replace("max_in_flight = 30000", "max_in_flight = 30000\nmax_inflight = 5"));
    assert!(e.contains("pipeline.toml:") && e.contains("unknown field `max_inflight`"), "{e}");
}

#[test]
fn wrong_type_names_the_field() {
    let (_d, e) = broken("pipeline.toml", |t| t.replacen("partitions = 3", "partitions = \"three\"", 1));
    assert!(e.contains("pipeline.toml:") && e.contains("invalid type") && e.contains("partitions"), "{e}");
}

#[test]
fn bad_cel_names_the_rule_file_and_rule() {
    let (_d, e) = broken("rules.toml", |t| t.replacen("tx.channel == 'ecom' && tx.amount < 2.0", "tx.channel == 'ecom' &&", 1));
    assert!(e.contains("rules.toml:") && e.contains("rule \"micro_ecom\".when") && e.contains("CEL syntax"), "{e}");
}

#[test]
fn unknown_feature_in_a_rule_is_caught() {
    let (_d, e) = broken("velocity_rules.toml", |t| t.replacen("features.card_tx_1m >= 5.0", "features.card_tx_5m >= 5.0", 1));
    assert!(e.contains("velocity_rules.toml:") && e.contains("unknown feature `features.card_tx_5m`"), "{e}");
}

#[test]
fn a_feature_used_before_it_is_computed_is_caught() {
    let (_d, e) = broken("rules.toml", |t| t.replacen("tx.channel == 'ecom' && tx.amount < 2.0", "features.card_tx_1m > 1.0", 1));
    assert!(e.contains("no features are computed before this rule set"), "{e}");
}

#[test]
fn missing_file_names_the_field() {
    let (_d, e) = broken("pipeline.toml", |t| t.replace("model = \"model.toml\"", "model = \"modle.toml\""));
    assert!(e.contains("pipeline.toml:") && e.contains("stage[2].model") && e.contains("does not exist"), "{e}");
}

#[test]
fn a_broken_chain_is_caught() {
    let (_d, e) = broken("pipeline.toml", |t| t.replace("input = \"tx.featured\"", "input = \"tx.decisions\""));
    assert!(e.contains("stage[2].input") && e.contains("chain is broken"), "{e}");
    let (_d, e) = broken("pipeline.toml", |t| t.replace("input = \"tx.ruled\"", "input = \"tx.rules\""));
    assert!(e.contains("stage[1].input") && e.contains("unknown topic \"tx.rules\""), "{e}");
}

#[test]
fn more_replicas_than_partitions_is_caught() {
    let (_d, e) = broken("pipeline.toml", |t| t.replacen("replicas = 2", "replicas = 20", 1));
    assert!(e.contains("stage[0].replicas") && e.contains("1..=3"), "{e}");
}

#[test]
fn bad_model_and_velocity_files_are_caught() {
    let (_d, e) = broken("model.toml", |t| t.replace("review = 0.55", "review = 0.95"));
    assert!(e.contains("model.toml:") && e.contains("thresholds"), "{e}");
    let (_d, e) = broken("velocity.toml", |t| t.replacen("window = \"1m\"", "window = \"a while\"", 1));
    assert!(e.contains("velocity.toml:") && e.contains("feature[0].window"), "{e}");
}

#[test]
fn a_non_scalar_kafka_property_is_caught() {
    let (_d, e) = broken("pipeline.toml", |t| t.replace("\"linger.ms\" = \"2\"", "\"linger.ms\" = [1]"));
    assert!(e.contains("kafka.\"linger.ms\""), "{e}");
}

#[test]
fn all_errors_are_reported_at_once() {
    let (_d, e) = broken("pipeline.toml", |t| t.replace("input = \"tx.ruled\"", "input = \"nope\"").replace("dlq = \"tx.dlq\"\nmodel", "dlq = \"tx.in\"\nmodel"));
    assert!(e.contains("stage[1].input") && e.contains("stage[2].dlq"), "{e}");
}

/// `extra` appended to the `n`-th stage (0-based) of the shipped pipeline.toml: each
/// stage ends with its `[stage.limits]` line `budget_ms = 5.0`.
fn in_stage(t: &str, n: usize, extra: &str) -> String {
    let at = t.match_indices("budget_ms = 5.0\n").nth(n).map(|(i, m)| i + m.len()).unwrap();
    format!("{}{extra}{}", &t[..at], &t[at..])
}

const RETRY_TOPIC: &str = "[[topic]]\nname = \"tx.retry.extra\"\npartitions = 3\ncodec = \"json\"\nrole = \"retry\"\n";

#[test]
fn a_retry_topic_resolves_into_the_stage_retry_policy() {
    let dir = copy_of_fraud();
    let p = dir.path().join("pipeline.toml");
    let text = std::fs::read_to_string(&p).unwrap().replace("retry_topic = \"tx.retry.rules\"", "retry_topic = \"tx.retry.extra\"");
    std::fs::write(&p, text.replacen("[[stage]]", &format!("{RETRY_TOPIC}\n[[stage]]"), 1)).unwrap();
    let pl = Pipeline::load(dir.path()).unwrap();
    let t = pl.stages[0].limits.retry.topic.as_ref().unwrap();
    assert_eq!(&*t.topic, "tx.retry.extra");
    // The shipped pipeline's retry topic of the rules stage is now unused: a warning.
    assert!(pl.warnings.iter().any(|w| w.contains("tx.retry.rules") && w.contains("no stage")), "{:?}", pl.warnings);
}

#[test]
fn the_shipped_pipeline_gives_each_stage_a_retry_topic_in_its_input_codec() {
    let p = Pipeline::load(&fraud()).unwrap();
    for s in &p.stages {
        let t = s.limits.retry.topic.as_ref().unwrap_or_else(|| panic!("stage {} has no retry topic", s.name));
        assert_eq!(&*t.topic, format!("tx.retry.{}", s.name));
        assert_eq!(p.topic(&t.topic).unwrap().codec, p.topic(&s.input).unwrap().codec);
        assert!(s.faults.is_empty(), "no faults in the shipped pipeline");
    }
}

#[test]
fn bad_retry_topics_are_caught() {
    let (_d, e) = broken("pipeline.toml", |t| t.replace("retry_topic = \"tx.retry.rules\"", "retry_topic = \"tx.retry.nope\""));
    assert!(e.contains("pipeline.toml:") && e.contains("stage[0].retry_topic") && e.contains("unknown topic \"tx.retry.nope\""), "{e}");
    let (_d, e) = broken("pipeline.toml", |t| t.replace("retry_topic = \"tx.retry.rules\"", "retry_topic = \"tx.dlq\""));
    assert!(e.contains("stage[0].retry_topic") && e.contains("expected retry"), "{e}");
    let (_d, e) = broken("pipeline.toml", |t| t.replace("retry_topic = \"tx.retry.velocity\"", "retry_topic = \"tx.retry.rules\""));
    assert!(e.contains("stage[1].retry_topic") && e.contains("already the retry topic of stage \"rules\""), "{e}");
    // The velocity stage reads postcard; its retry topic carries those bytes.
    let (_d, e) = broken("pipeline.toml", |t| t.replace("retry_topic = \"tx.retry.velocity\"", "retry_topic = \"tx.retry.extra\"").replacen("[[stage]]", &format!("{RETRY_TOPIC}\n[[stage]]"), 1));
    assert!(e.contains("stage[1].retry_topic") && e.contains("expected Postcard"), "{e}");
    let (_d, e) = broken("pipeline.toml", |t| t.replace("input = \"tx.ruled\"", "input = \"tx.retry.rules\""));
    assert!(e.contains("stage[1].input") && e.contains("is a retry topic"), "{e}");
    let (_d, e) = broken("pipeline.toml", |t| t.replace("output = \"tx.ruled\"", "output = \"tx.retry.rules\""));
    assert!(e.contains("stage[0].output") && e.contains("Retry"), "{e}");
    let (_d, e) = broken("pipeline.toml", |t| t.replacen("retry_topic_attempts = 3", "retry_topic_attempts = 0", 1));
    assert!(e.contains("pipeline.toml:") && e.contains("stage[0].retry_topic_attempts") && e.contains("1..=100"), "{e}");
    let (_d, e) = broken("pipeline.toml", |t| t.replacen("retry_delay_ms = 1000", "retry_delay_ms = 86400000", 1));
    assert!(e.contains("stage[0].retry_delay_ms") && e.contains("one hour"), "{e}");
    let (_d, e) = broken("pipeline.toml", |t| t.replacen("retry_delay_ms = 1000", "retry_delay_ms = 1000\nretry_delay_max_ms = 500", 1));
    assert!(e.contains("pipeline.toml:") && e.contains("stage[0].retry_delay_max_ms") && e.contains("at least `retry_delay_ms`"), "{e}");
    let (_d, e) = broken("pipeline.toml", |t| t.replace("retry_topic = \"tx.retry.rules\"\n", "retry_delay_max_ms = 5000\n"));
    assert!(e.contains("stage[0].retry_delay_max_ms") && e.contains("only with `retry_topic`"), "{e}");
    // Accepted, and resolved into the stage's retry policy.
    let ok = actio_testkit::copy_of_fraud_with("pipeline.toml", |t| t.replacen("retry_delay_ms = 1000", "retry_delay_ms = 1000\nretry_delay_max_ms = 30000", 1));
    let p = Pipeline::load(ok.path()).unwrap_or_else(|e| panic!("{e}"));
    let t = p.stages[0].limits.retry.topic.as_ref().unwrap();
    assert_eq!((t.delay_of_trip(1).as_millis(), t.delay_of_trip(3).as_millis(), t.delay_of_trip(9).as_millis()), (1000, 4000, 30000));
    let (_d, e) = broken("pipeline.toml", |t| t.replace("retry_topic = \"tx.retry.rules\"\n", ""));
    assert!(e.contains("stage[0].retry_topic_attempts") && e.contains("only with `retry_topic`"), "{e}");
    let (_d, e) = broken("pipeline.toml", |t| t.replace("role = \"retry\"", "role = \"retries\""));
    assert!(e.contains("pipeline.toml:") && e.contains("unknown variant `retries`"), "{e}");
}

#[test]
fn faults_compile_with_the_features_known_before_the_stage() {
    let fault = |when: &str| format!("[[stage.fault]]\nwhen = \"{when}\"\nfail = \"transient\"\ntimes = 2\n");
    // At the score stage every feature is known.
    let (_d, e) = broken("pipeline.toml", |t| in_stage(&t, 2, &fault("features.nope > 1.0")));
    assert!(e.contains("stage[2].fault[0].when") && e.contains("features.nope"), "{e}");
    // At the rules stage no feature is computed yet.
    let (_d, e) = broken("pipeline.toml", |t| in_stage(&t, 0, &fault("features.card_tx_1m > 1.0")));
    assert!(e.contains("pipeline.toml:") && e.contains("stage[0].fault[0].when"), "{e}");
    let (_d, e) = broken("pipeline.toml", |t| in_stage(&t, 0, &fault("tx.merchant_id == ")));
    assert!(e.contains("stage[0].fault[0].when") && e.contains("CEL syntax"), "{e}");
    let (_d, e) = broken("pipeline.toml", |t| in_stage(&t, 0, "[[stage.fault]]\nwhen = \"true\"\nfail = \"transient\"\ntimes = 0\n"));
    assert!(e.contains("stage[0].fault[0].times") && e.contains("at least 1"), "{e}");
    let (_d, e) = broken("pipeline.toml", |t| in_stage(&t, 0, "[[stage.fault]]\nwhen = \"true\"\nfail = \"sometimes\"\n"));
    assert!(e.contains("unknown variant `sometimes`"), "{e}");
    let (_d, e) = broken("pipeline.toml", |t| in_stage(&t, 0, "[[stage.fault]]\nwhen = \"true\"\nfail = \"panic\"\nrate = 0.1\n"));
    assert!(e.contains("unknown field `rate`"), "{e}");
}

// ── the declared schema: every name the other files use is checked against it ────

/// `e` names `file` with a line and mentions each of `words`.
fn names(e: &str, file: &str, words: &[&str]) {
    assert!(e.contains(&format!("{file}:")), "no {file}:<line> in: {e}");
    for w in words {
        assert!(e.contains(w), "{w:?} not in: {e}");
    }
}

#[test]
fn an_unknown_field_type_in_the_schema_names_file_line_and_field() {
    let (_d, e) = broken("schema.toml", |t| t.replacen("type = \"int\"", "type = \"decimal\"", 1));
    names(&e, "schema.toml", &["field \"amount_minor\".type", "unknown type \"decimal\""]);
}

#[test]
fn a_derived_field_that_does_not_compile_or_has_the_wrong_type_is_named() {
    let (_d, e) = broken("schema.toml", |t| t.replace("cel = \"double(tx.amount_minor) / 100.0\"", "cel = \"double(tx.amount_minor) /\""));
    names(&e, "schema.toml", &["derived \"amount\".cel", "CEL syntax"]);
    let (_d, e) = broken("schema.toml", |t| t.replace("cel = \"double(tx.amount_minor) / 100.0\"", "cel = \"tx.amount_minor / 100\""));
    names(&e, "schema.toml", &["derived \"amount\".cel", "declared float but the expression gives int"]);
}

#[test]
fn a_rule_on_an_undeclared_or_mistyped_field_is_named() {
    let (_d, e) = broken("rules.toml", |t| t.replacen("tx.channel == 'ecom' && tx.amount < 2.0", "tx.chanel == 'ecom'", 1));
    names(&e, "rules.toml", &["rule \"micro_ecom\".when", "unknown transaction field `tx.chanel`"]);
    let (_d, e) = broken("rules.toml", |t| t.replacen("tx.channel == 'ecom' && tx.amount < 2.0", "tx.currency > 2.0", 1));
    names(&e, "rules.toml", &["rule \"micro_ecom\".when", "cannot compare string (field `tx.currency`) with double"]);
}

#[test]
fn a_window_on_an_undeclared_field_is_named() {
    let (_d, e) = broken("velocity.toml", |t| t.replacen("key = \"card_id\"", "key = \"card\"", 1));
    names(&e, "velocity.toml", &["feature[0].key", "unknown field \"card\""]);
    let (_d, e) = broken("velocity.toml", |t| t.replacen("field = \"amount\"", "field = \"currency\"", 1));
    names(&e, "velocity.toml", &[".field", "needs a numeric field"]);
}

#[test]
fn an_undeclared_key_is_named() {
    let (_d, e) = broken("pipeline.toml", |t| t.replace("fields = [\"card_id\"]", "fields = [\"card\"]"));
    names(&e, "pipeline.toml", &["key.fields", "unknown field \"card\""]);
    let (_d, e) = broken("pipeline.toml", |t| t.replace("fields = [\"card_id\"]", "fields = [\"device_id\"]"));
    names(&e, "pipeline.toml", &["key.fields", "must be required"]);
}

#[test]
fn a_decision_field_or_feature_that_does_not_exist_is_named() {
    let (_d, e) = broken("schema.toml", |t| t.replace("outcomes = [\"approve\", \"review\", \"decline\"]", "outcomes = [\"approve\", \"review\", \"decline\"]\nfields = [\"card_id\", \"cvv\"]"));
    names(&e, "schema.toml", &["decision.fields[1]", "unknown field \"cvv\""]);
    let (_d, e) = broken("schema.toml", |t| t.replace("outcomes = [\"approve\", \"review\", \"decline\"]", "outcomes = [\"approve\", \"review\", \"decline\"]\nfeatures = [\"card_tx_1y\"]"));
    names(&e, "schema.toml", &["decision.features", "unknown feature \"card_tx_1y\""]);
}

#[test]
fn a_rule_action_or_threshold_naming_an_undeclared_outcome_is_named() {
    let (_d, e) = broken("rules.toml", |t| t.replacen("action = \"decline\"", "action = \"block\"", 1));
    names(&e, "rules.toml", &[".action", "unknown outcome \"block\""]);
    let (_d, e) = broken("model.toml", |t| t.replacen("review = 0.55", "hold = 0.55", 1));
    names(&e, "model.toml", &["thresholds.hold", "unknown outcome \"hold\""]);
}

#[test]
fn an_ingress_topic_must_be_json() {
    let (_d, e) = broken("pipeline.toml", |t| t.replacen("codec = \"json\"          # any Kafka client can produce it", "codec = \"postcard\"", 1));
    names(&e, "pipeline.toml", &["topic \"tx.in\".codec", "JSON, checked against schema.toml"]);
}

/// The README states some defaults in words; they are the constants' values.
#[test]
fn the_readme_states_the_defaults_the_code_has() {
    use actio_pipeline::config::*;
    let readme = std::fs::read_to_string(actio_testkit::repo().join("README.md")).unwrap();
    let thousands = |n: u64| {
        let s = n.to_string();
        let mut out = String::new();
        for (i, c) in s.chars().enumerate() {
            if i > 0 && (s.len() - i).is_multiple_of(3) {
                out.push(',');
            }
            out.push(c);
        }
        out
    };
    let want = [
        format!("`retry_delay_ms` ({}", DEFAULT_RETRY_DELAY_MS),
        format!("`retry_topic_attempts` ({})", DEFAULT_RETRY_TOPIC_ATTEMPTS),
        format!("`max_in_flight_per_partition` ({})", thousands(DEFAULT_MAX_IN_FLIGHT_PER_PARTITION as u64)),
        format!("`restore_max_records` ({} M)", actio_engine::velocity::DEFAULT_RESTORE_MAX_RECORDS / 1_000_000),
    ];
    for w in want {
        assert!(readme.contains(&w), "README.md should say {w:?} (the default in the code)");
    }
}

#[test]
fn a_declared_service_fuses_consecutive_stages_and_bad_ones_are_named() {
    fn service(body: &str) -> impl Fn(String) -> String + '_ {
        move |t: String| format!("{t}\n[[service]]\n{body}\n")
    }
    let dir = copy_of_fraud_with("pipeline.toml", service("name = \"decide\"\nstages = [\"rules\", \"velocity\", \"score\"]"));
    let p = Pipeline::load(dir.path()).unwrap();
    let services = p.services();
    assert_eq!(services.len(), 1);
    assert_eq!((services[0].name.as_str(), services[0].group.as_str(), services[0].replicas), ("decide", "fraud.decide", 2));
    assert_eq!(p.service("decide").unwrap(), services[0]);
    assert_eq!(p.service("velocity").unwrap().stages, 1..2, "a stage can still run alone");

    let dir = copy_of_fraud_with("pipeline.toml", service("name = \"tail\"\nstages = [\"velocity\", \"score\"]\nreplicas = 1"));
    let p = Pipeline::load(dir.path()).unwrap();
    assert_eq!(p.services().iter().map(|s| s.name.as_str()).collect::<Vec<_>>(), ["rules", "tail"]);

    for (body, field, says) in [
        ("name = \"decide\"\nstages = [\"rules\", \"score\"]", "service[0].stages", "not consecutive"),
        ("name = \"decide\"\nstages = [\"rules\"]", "service[0].stages", "two or more stages"),
        ("name = \"decide\"\nstages = [\"rules\", \"nope\"]", "service[0].stages", "no stage named \"nope\""),
        ("name = \"rules\"\nstages = [\"rules\", \"velocity\"]", "service[0].name", "already names a stage"),
        ("name = \"decide\"\nstages = [\"rules\", \"velocity\"]\nreplicas = 9", "service[0].replicas", "expected 1..=3"),
        ("name = \"a\"\nstages = [\"rules\", \"velocity\"]\n[[service]]\nname = \"b\"\nstages = [\"velocity\", \"score\"]", "service[1].stages", "one service only"),
        ("name = \"decide\"\nstages = [\"rules\", \"velocity\"]\nthreads = 2", "threads = 2", "unknown field `threads`"),
    ] {
        let (_d, e) = broken("pipeline.toml", service(body));
        assert!(e.contains("pipeline.toml:") && e.contains(field) && e.contains(says), "{body}: {e}");
    }
}

#[test]
fn exactly_once_resolves_per_stage_and_is_refused_for_a_join() {
    let dir = copy_of_fraud_with("pipeline.toml", |t| t.replacen("[defaults]\n", "[defaults]\nexactly_once = true\n", 1));
    let p = Pipeline::load(dir.path()).unwrap();
    assert!(p.stages.iter().all(|s| s.limits.exactly_once));
    assert!(Pipeline::load(&fraud()).unwrap().stages.iter().all(|s| !s.limits.exactly_once), "off by default");
    // A join holds its branches' results uncommitted: no transaction can commit that.
    let transfers = actio_testkit::copy_of("transfers");
    let path = transfers.path().join("pipeline.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replacen("[defaults]\n", "[defaults]\nexactly_once = true\n", 1)).unwrap();
    let err = Pipeline::load(transfers.path()).unwrap_err().to_string();
    assert!(err.contains("pipeline.toml:") && err.contains(".limits.exactly_once") && err.contains("waits for"), "{err}");
}
