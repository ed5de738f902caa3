//! The JSON Schemas of the fraud pipeline's edges (`pipelines/fraud/tx.schema.json` for
//! `tx.in`, `decision.schema.json` for `tx.decisions`) say exactly what serde reads and
//! writes: the same properties, required and nullable sets, enum spellings and limits,
//! and examples that decode (and validate) into the Rust types.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use actio_core::tx::{
    AttrValue, Channel, Decision, MAX_ATTR_LEN, MAX_ATTRS, MAX_ID_LEN, Transaction, Verdict,
};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

fn schema(file: &str) -> Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../pipelines/fraud").join(file);
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let s: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    assert_eq!(s["$schema"], "https://json-schema.org/draft/2020-12/schema", "{file}");
    s
}

/// A transaction with every optional field set and one attribute of each kind.
fn full_tx() -> Transaction {
    Transaction {
        id: "tx-1".into(),
        card_id: "card-1".into(),
        account_id: "acc-1".into(),
        device_id: Some("dev-1".into()),
        merchant_id: "m-1".into(),
        amount_minor: 12_345,
        currency: "EUR".into(),
        mcc: 5411,
        country: "FR".into(),
        card_country: "DE".into(),
        ip_country: Some("NG".into()),
        channel: Channel::Ecom,
        card_age_days: 400,
        created_at: 1_795_000_000_123_456_789,
        attrs: BTreeMap::from([
            ("b".to_string(), AttrValue::Bool(true)),
            ("i".to_string(), AttrValue::Int(-7)),
            ("f".to_string(), AttrValue::Float(0.25)),
            ("s".to_string(), AttrValue::Str("x".into())),
        ]),
    }
}

/// A decision with every optional field set.
fn full_decision() -> Decision {
    Decision {
        tx_id: "tx-1".into(),
        key: "card-1".into(),
        decision: Verdict::Decline,
        score: 0.5,
        rule_hits: vec!["a".into(), "b".into()],
        override_rule: Some("b".into()),
        model_version: "m1".into(),
        rules_version: "rules@1+velocity@1".into(),
        created_at: 1_795_000_000_123_456_789,
    }
}

/// Every channel: a new variant breaks the match until it is listed here too.
fn channels() -> Vec<Channel> {
    let all = [Channel::Pos, Channel::Ecom, Channel::Atm, Channel::Moto];
    for c in all {
        match c {
            Channel::Pos | Channel::Ecom | Channel::Atm | Channel::Moto => {}
        }
    }
    all.to_vec()
}

/// Every verdict: a new variant breaks the match until it is listed here too.
fn verdicts() -> Vec<Verdict> {
    let all = [Verdict::Approve, Verdict::Review, Verdict::Decline];
    for v in all {
        match v {
            Verdict::Approve | Verdict::Review | Verdict::Decline => {}
        }
    }
    all.to_vec()
}

fn is_type(v: &Value, t: &str) -> bool {
    match t {
        "null" => v.is_null(),
        "boolean" => v.is_boolean(),
        "integer" => v.is_i64() || v.is_u64(),
        "number" => v.is_number(),
        "string" => v.is_string(),
        "array" => v.is_array(),
        "object" => v.is_object(),
        _ => panic!("unknown schema type {t:?}"),
    }
}

fn keys(m: &serde_json::Map<String, Value>) -> BTreeSet<&str> {
    m.keys().map(String::as_str).collect()
}

/// Checks `value` against the parts of `schema` this test reads (`type`, `enum`,
/// `anyOf`, `properties`, `required`, `additionalProperties`, `items`). Where the
/// schema lists `properties`, the value's keys must be exactly those (serde writes
/// every field), and each property needs a `description`.
fn check(schema: &Value, value: &Value, at: &str) -> Result<(), String> {
    if let Some(branches) = schema.get("anyOf").and_then(Value::as_array)
        && !branches.iter().any(|b| check(b, value, at).is_ok())
    {
        return Err(format!("{at}: {value} matches no anyOf branch"));
    }
    if let Some(t) = schema.get("type") {
        let types: Vec<&str> = match t {
            Value::String(s) => vec![s.as_str()],
            Value::Array(a) => a.iter().map(|t| t.as_str().unwrap()).collect(),
            _ => panic!("{at}: bad type {t}"),
        };
        if !types.iter().any(|t| is_type(value, t)) {
            return Err(format!("{at}: {value} is not of type {t}"));
        }
    }
    if let Some(e) = schema.get("enum").and_then(Value::as_array)
        && !e.contains(value)
    {
        return Err(format!("{at}: {value} is not one of {e:?}"));
    }
    if let Value::Object(obj) = value {
        let props = schema.get("properties").and_then(Value::as_object);
        if let Some(props) = props {
            if keys(props) != keys(obj) {
                return Err(format!("{at}: serde writes {:?}, the schema describes {:?}", keys(obj), keys(props)));
            }
            for (k, sub) in props {
                if sub.get("description").and_then(Value::as_str).is_none_or(str::is_empty) {
                    return Err(format!("{at}.{k}: no description"));
                }
                check(sub, &obj[k], &format!("{at}.{k}"))?;
            }
        }
        for r in schema.get("required").and_then(Value::as_array).into_iter().flatten() {
            if !obj.contains_key(r.as_str().unwrap()) {
                return Err(format!("{at}: required {r} missing"));
            }
        }
        if let Some(extra) = schema.get("additionalProperties").filter(|a| a.is_object()) {
            for (k, v) in obj.iter().filter(|(k, _)| props.is_none_or(|p| !p.contains_key(*k))) {
                check(extra, v, &format!("{at}.{k}"))?;
            }
        }
    }
    if let (Value::Array(items), Some(item)) = (value, schema.get("items")) {
        for (i, v) in items.iter().enumerate() {
            check(item, v, &format!("{at}[{i}]"))?;
        }
    }
    Ok(())
}

fn example(schema: &Value) -> Value {
    schema["examples"][0].clone()
}

fn decodes<T: DeserializeOwned>(v: &Value) -> bool {
    serde_json::from_value::<T>(v.clone()).is_ok()
}

/// A field of a decoded-and-validated transaction at fault, or `"decode"` when serde refused it.
fn tx_fault(v: &Value) -> Option<String> {
    match serde_json::from_value::<Transaction>(v.clone()) {
        Err(_) => Some("decode".into()),
        Ok(tx) => tx.validate().err().map(|e| e.field),
    }
}

fn with(base: &Value, field: &str, v: Value) -> Value {
    let mut out = base.clone();
    out[field] = v;
    out
}

#[test]
fn what_serde_writes_matches_the_schemas() {
    let tx = schema("tx.schema.json");
    let full = serde_json::to_value(full_tx()).unwrap();
    assert!(full.as_object().unwrap().values().all(|v| !v.is_null()), "{full}");
    check(&tx, &full, "tx").unwrap();
    let sparse = Transaction { device_id: None, ip_country: None, attrs: BTreeMap::new(), ..full_tx() };
    check(&tx, &serde_json::to_value(sparse).unwrap(), "tx").unwrap();

    let decision = schema("decision.schema.json");
    let full = serde_json::to_value(full_decision()).unwrap();
    assert!(full.as_object().unwrap().values().all(|v| !v.is_null()), "{full}");
    check(&decision, &full, "decision").unwrap();
    let sparse = Decision { override_rule: None, rule_hits: vec![], ..full_decision() };
    check(&decision, &serde_json::to_value(sparse).unwrap(), "decision").unwrap();
}

/// Dropping a property, or setting it to null, is accepted by the schema exactly when
/// serde accepts it; unknown properties are refused by both.
fn required_and_nullable_agree<T: DeserializeOwned>(file: &str) {
    let s = schema(file);
    let ex = example(&s);
    let required: BTreeSet<&str> = s["required"].as_array().unwrap().iter().map(|r| r.as_str().unwrap()).collect();
    for (k, sub) in s["properties"].as_object().unwrap() {
        let mut dropped = ex.clone();
        dropped.as_object_mut().unwrap().remove(k);
        assert_eq!(decodes::<T>(&dropped), !required.contains(k.as_str()), "{file}: dropping {k}");
        let nulled = with(&ex, k, Value::Null);
        assert_eq!(decodes::<T>(&nulled), check(sub, &Value::Null, k).is_ok(), "{file}: {k} = null");
    }
    assert_eq!(s["additionalProperties"], false, "{file}: deny_unknown_fields");
    let e = serde_json::from_value::<T>(with(&ex, "colour", json!(1))).err().unwrap();
    assert!(e.to_string().contains("unknown field `colour`"), "{file}: {e}");
}

#[test]
fn required_and_nullable_properties_agree_with_serde() {
    required_and_nullable_agree::<Transaction>("tx.schema.json");
    required_and_nullable_agree::<Decision>("decision.schema.json");
}

#[test]
fn enums_are_what_serde_writes_for_every_variant() {
    let tx = schema("tx.schema.json");
    let want: Vec<Value> = channels().into_iter().map(|c| serde_json::to_value(c).unwrap()).collect();
    assert_eq!(tx["properties"]["channel"]["enum"].as_array().unwrap(), &want);
    for c in channels() {
        assert_eq!(serde_json::to_value(c).unwrap(), c.as_str());
    }
    let decision = schema("decision.schema.json");
    let want: Vec<Value> = verdicts().into_iter().map(|v| serde_json::to_value(v).unwrap()).collect();
    assert_eq!(decision["properties"]["decision"]["enum"].as_array().unwrap(), &want);
}

#[test]
fn examples_decode_validate_and_are_what_serde_writes() {
    let s = schema("tx.schema.json");
    let ex = example(&s);
    check(&s, &ex, "tx example").unwrap();
    let tx: Transaction = serde_json::from_value(ex.clone()).unwrap();
    tx.validate().unwrap();
    assert_eq!(serde_json::to_value(&tx).unwrap(), ex);
    // The other timestamp form: integer ns since the epoch.
    let ns = with(&ex, "created_at", json!(tx.created_at));
    check(&s, &ns, "tx example, ns").unwrap();
    assert_eq!(serde_json::from_value::<Transaction>(ns).unwrap(), tx);

    let s = schema("decision.schema.json");
    let ex = example(&s);
    check(&s, &ex, "decision example").unwrap();
    let d: Decision = serde_json::from_value(ex.clone()).unwrap();
    assert_eq!(serde_json::to_value(&d).unwrap(), ex);
    assert_eq!(d.created_at, tx.created_at);
}

#[test]
fn limits_are_those_of_validate() {
    let s = schema("tx.schema.json");
    let p = &s["properties"];
    let ex = example(&s);
    let num = |field: &str, kw: &str| p[field][kw].as_i64().unwrap();

    for field in ["id", "card_id", "account_id", "merchant_id", "device_id"] {
        let max = num(field, "maxLength");
        assert_eq!(max, MAX_ID_LEN as i64, "{field}");
        assert_eq!(num(field, "minLength"), 1, "{field}");
        assert_eq!(tx_fault(&with(&ex, field, json!("x".repeat(max as usize)))), None, "{field}");
        assert_eq!(tx_fault(&with(&ex, field, json!("x".repeat(max as usize + 1)))).as_deref(), Some(field));
        assert_eq!(tx_fault(&with(&ex, field, json!(""))).as_deref(), Some(field));
    }

    assert_eq!(num("amount_minor", "minimum"), 0);
    assert_eq!(tx_fault(&with(&ex, "amount_minor", json!(0))), None);
    assert_eq!(tx_fault(&with(&ex, "amount_minor", json!(-1))).as_deref(), Some("amount_minor"));
    for (field, fault) in [("amount_minor", "decode"), ("mcc", "mcc"), ("card_age_days", "decode")] {
        let max = p[field]["maximum"].as_u64().unwrap();
        assert_eq!(tx_fault(&with(&ex, field, json!(max))), None, "{field}");
        assert_eq!(tx_fault(&with(&ex, field, json!(max + 1))).as_deref(), Some(fault), "{field}");
    }
    assert_eq!(tx_fault(&with(&ex, "mcc", json!(num("mcc", "minimum") - 1))).as_deref(), Some("decode"));

    for field in ["currency", "country", "card_country", "ip_country"] {
        let pattern = p[field]["pattern"].as_str().unwrap();
        let n: usize = pattern.strip_prefix("^[A-Z]{").and_then(|r| r.strip_suffix("}$")).unwrap().parse().unwrap();
        assert_eq!(tx_fault(&with(&ex, field, json!("Q".repeat(n)))), None, "{field}");
        for bad in ["Q".repeat(n - 1), "Q".repeat(n + 1), "q".repeat(n), format!("{}1", "Q".repeat(n - 1))] {
            assert_eq!(tx_fault(&with(&ex, field, json!(bad))).as_deref(), Some(field), "{field} = {bad:?}");
        }
    }

    let attrs = &p["attrs"];
    assert_eq!(attrs["maxProperties"], MAX_ATTRS);
    assert_eq!(attrs["propertyNames"]["maxLength"], MAX_ID_LEN);
    assert_eq!(attrs["additionalProperties"]["maxLength"], MAX_ATTR_LEN);
    let many = |n: usize| json!((0..n).map(|i| (format!("a{i}"), json!(i))).collect::<serde_json::Map<_, _>>());
    assert_eq!(tx_fault(&with(&ex, "attrs", many(MAX_ATTRS))), None);
    assert_eq!(tx_fault(&with(&ex, "attrs", many(MAX_ATTRS + 1))).as_deref(), Some("attrs"));
    let named = |len: usize| json!({ ("n".repeat(len)): 1 });
    assert_eq!(tx_fault(&with(&ex, "attrs", named(MAX_ID_LEN))), None);
    assert_eq!(tx_fault(&with(&ex, "attrs", named(MAX_ID_LEN + 1))).as_deref(), Some("attrs"));
    let long = |len: usize| json!({ "s": "v".repeat(len) });
    assert_eq!(tx_fault(&with(&ex, "attrs", long(MAX_ATTR_LEN))), None);
    assert_eq!(tx_fault(&with(&ex, "attrs", long(MAX_ATTR_LEN + 1))).as_deref(), Some("attrs.s"));
    // Attribute values are JSON scalars: what the schema's value types refuse, serde refuses.
    for v in [json!(null), json!([1]), json!({ "x": 1 })] {
        assert!(check(&attrs["additionalProperties"], &v, "attrs.v").is_err(), "{v}");
        assert_eq!(tx_fault(&with(&ex, "attrs", json!({ "v": v }))).as_deref(), Some("decode"), "{v}");
    }

    let d = schema("decision.schema.json");
    for field in ["tx_id", "key"] {
        assert_eq!(d["properties"][field]["maxLength"], MAX_ID_LEN, "{field}");
    }
}
