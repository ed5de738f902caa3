//! The fraud pipeline's scenarios (`pipelines/fraud/scenarios/`) through the
//! schema-driven generator: deterministic, valid against the schema, skewed keys,
//! episodes as declared, stable per-entity values. The generator's own tests (neutral
//! schemas) are beside it in `src/generate.rs`.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use actio_core::schema::{Scalar, Value};
use actio_core::{Schema, Tx};
use actio_loadgen::{Generator, Scenario};

fn fraud_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../pipelines/fraud")
}

fn fraud_schema() -> Arc<Schema> {
    Arc::new(Schema::load(&fraud_dir().join("schema.toml")).unwrap())
}

fn fraud(scenario: &str) -> (Arc<Schema>, Generator) {
    let schema = fraud_schema();
    let sc = Scenario::load(&fraud_dir().join("scenarios").join(scenario)).unwrap_or_else(|e| panic!("{e}"));
    let g = Generator::new(schema.clone(), &sc, "r").unwrap_or_else(|e| panic!("{e}"));
    (schema, g)
}

fn str_of<'a>(schema: &Schema, tx: &'a Tx, name: &str) -> &'a str {
    match &tx.values[schema.slot(name).unwrap()] {
        Value::Str(s) => s,
        v => panic!("{name}: {v:?}"),
    }
}

fn episode_of(schema: &Schema, tx: &Tx) -> Option<String> {
    match tx.values[schema.slot("attrs").unwrap()].map_get("synthetic_fraud") {
        Some(Scalar::Str(s)) => Some(s.clone()),
        None => None,
        other => panic!("{other:?}"),
    }
}

/// The card number of `card-<n>`.
fn card_no(schema: &Schema, tx: &Tx) -> u64 {
    str_of(schema, tx, "card_id").strip_prefix("card-").unwrap().parse().unwrap()
}

#[test]
fn same_seed_same_transactions_other_seed_others() {
    let (_, mut a) = fraud("baseline.toml");
    let (_, mut b) = fraud("baseline.toml");
    let schema = fraud_schema();
    let sc = Scenario::load(&fraud_dir().join("scenarios/baseline.toml")).unwrap().with_seed(7);
    assert_eq!(sc.seed(), 7);
    let mut c = Generator::new(schema, &sc, "r").unwrap();
    let mut differ = 0;
    for i in 0..5000 {
        let ta = a.next(i, 1_000 + i as i64);
        assert_eq!(ta, b.next(i, 1_000 + i as i64));
        differ += (ta != c.next(i, 1_000 + i as i64)) as u32;
    }
    assert!(differ > 4900, "another seed, other transactions: {differ}");
}

#[test]
fn every_transaction_round_trips_through_the_schema() {
    for scenario in ["baseline.toml", "hot-keys.toml", "fraud-wave.toml"] {
        let (schema, mut g) = fraud(scenario);
        let t0 = 1_795_000_000_000_000_000;
        for i in 0..5000 {
            let tx = g.next(i, t0 + i as i64 * 333_333);
            assert_eq!(tx.values.len(), schema.fields().len());
            let json = schema.encode_json(&tx);
            let back = schema.decode_json(&json).unwrap_or_else(|e| panic!("{scenario}: {e}: {}", String::from_utf8_lossy(&json)));
            assert_eq!(back, tx, "{scenario}: {}", String::from_utf8_lossy(&json));
            assert_eq!(schema.id_of(&tx), g.id_of(i));
            assert_eq!(schema.time_of(&tx), t0 + i as i64 * 333_333);
            let derived = schema.raw_fields().len();
            assert!(tx.values[derived..].iter().all(|v| *v == Value::Null), "derived slots are the pipeline's");
        }
    }
}

/// Every `pipelines/*/scenarios/*.toml` compiles against its pipeline's schema and
/// makes transactions the schema takes: adding a scenario file adds a case.
#[test]
fn every_shipped_scenario_fits_its_pipeline() {
    let root = fraud_dir().join("..");
    let mut checked = Vec::new();
    for p in std::fs::read_dir(&root).unwrap() {
        let dir = p.unwrap().path();
        let Ok(files) = std::fs::read_dir(dir.join("scenarios")) else { continue };
        let schema = Arc::new(Schema::load(&dir.join("schema.toml")).unwrap_or_else(|e| panic!("{e}")));
        for f in files {
            let f = f.unwrap().path();
            if f.extension().is_none_or(|e| e != "toml") {
                continue;
            }
            let sc = Scenario::load(&f).unwrap_or_else(|e| panic!("{e}"));
            let mut g = Generator::new(schema.clone(), &sc, "r").unwrap_or_else(|e| panic!("{e}"));
            for i in 0..2000 {
                let tx = g.next(i, 1_795_000_000_000_000_000 + i as i64);
                let json = schema.encode_json(&tx);
                let back = schema.decode_json(&json).unwrap_or_else(|e| panic!("{}: {e}: {}", f.display(), String::from_utf8_lossy(&json)));
                assert_eq!(back, tx, "{}", f.display());
            }
            checked.push(f);
        }
    }
    assert!(checked.len() >= 3, "{checked:?}");
}

#[test]
fn keys_are_skewed_and_episodes_are_two_percent() {
    let (schema, mut g) = fraud("baseline.toml");
    let mut per_card: HashMap<String, u32> = HashMap::new();
    let mut episodes: HashMap<String, u32> = HashMap::new();
    let n = 100_000;
    for i in 0..n {
        let t = g.next(i, 0);
        if let Some(e) = episode_of(&schema, &t) {
            *episodes.entry(e).or_default() += 1;
            assert!(card_no(&schema, &t) > 1_000_000, "episode cards are fresh: {t:?}");
        } else {
            assert!(card_no(&schema, &t) <= 1_000_000);
        }
        *per_card.entry(str_of(&schema, &t, "card_id").to_string()).or_default() += 1;
    }
    let mut counts: Vec<u32> = per_card.values().copied().collect();
    counts.sort_unstable_by(|a, b| b.cmp(a));
    // The top 1% of the card population (10,000 of 1,000,000 cards).
    let top_1pct: u32 = counts.iter().take(10_000).sum();
    assert!(top_1pct as f64 > 0.15 * n as f64, "the top 1% of cards should carry >15% of traffic, got {top_1pct}");
    assert!(counts[0] as f64 > 0.002 * n as f64, "the hottest card is hot: {}", counts[0]);
    let total: u32 = episodes.values().sum();
    assert!((1700..2300).contains(&total), "about 2% episodes, got {total}");
    // Kinds start equally often, so their traffic goes by their length (12, 5, 1, 1, 3
    // of 22): ~1090, ~450, ~90, ~90, ~270.
    for (name, len) in [("card_testing", 12.0), ("geo_hopping", 5.0), ("risky_merchant", 1.0), ("new_card_big_spend", 1.0), ("atm_abroad", 3.0)] {
        let want = total as f64 * len / 22.0;
        let got = episodes.get(name).copied().unwrap_or(0) as f64;
        assert!((got - want).abs() < 0.35 * want + 10.0, "{name}: {got} not ~{want}: {episodes:?}");
    }
}

#[test]
fn episodes_share_their_key_and_apply_their_overrides() {
    let (schema, mut g) = fraud("fraud-wave.toml");
    let mut by_card: HashMap<String, Vec<Tx>> = HashMap::new();
    let mut n_episode = 0;
    for i in 0..20_000 {
        let t = g.next(i, 0);
        if episode_of(&schema, &t).is_some() {
            n_episode += 1;
            by_card.entry(str_of(&schema, &t, "card_id").to_string()).or_default().push(t);
        }
    }
    assert!((3600..4400).contains(&n_episode), "fraud-wave: ~20% episodes, got {n_episode}");
    let channel = |t: &Tx| schema.json_value(t, schema.slot("channel").unwrap());
    let (mut hops, mut too_long) = (0, 0);
    for txs in by_card.values() {
        let name = episode_of(&schema, &txs[0]).unwrap();
        if txs.iter().any(|t| episode_of(&schema, t).as_deref() != Some(name.as_str())) {
            too_long += 1; // two kinds drew the same fresh card
            continue;
        }
        let len = match name.as_str() {
            "card_testing" => 12,
            "geo_hopping" => 5,
            "atm_abroad" => 3,
            _ => 1,
        };
        // Two episodes may draw the same fresh card (a birthday collision, rare).
        too_long += (txs.len() > len) as u32;
        match name.as_str() {
            "card_testing" => {
                for t in txs {
                    assert_eq!(channel(t), "ecom");
                    assert_eq!(t.values[schema.slot("mcc").unwrap()], Value::Int(5999));
                    assert!(t.values[schema.slot("device_id").unwrap()] != Value::Null);
                }
            }
            "atm_abroad" => {
                for t in txs {
                    assert_eq!(channel(t), "atm");
                    assert_eq!(t.values[schema.slot("device_id").unwrap()], Value::Null);
                    assert_ne!(str_of(&schema, t, "country"), str_of(&schema, t, "card_country"));
                }
            }
            "geo_hopping" => {
                let countries: std::collections::HashSet<&str> = txs.iter().map(|t| str_of(&schema, t, "country")).collect();
                hops += (countries.len() > 1) as u32;
                // The home country follows the fresh card (`per`), the merchant country hops.
                assert!(txs.iter().all(|t| str_of(&schema, t, "card_country") == str_of(&schema, &txs[0], "card_country")));
            }
            _ => {}
        }
    }
    assert!(hops > 10, "geo hopping hops: {hops}");
    assert!(too_long * 100 < by_card.len() as u32, "{too_long} of {} episode cards ran longer than their episode", by_card.len());
}

#[test]
fn per_draws_are_stable_for_an_entity() {
    let (schema, mut g) = fraud("baseline.toml");
    let mut cards: HashMap<String, (String, Value, String)> = HashMap::new();
    let mut mccs: HashMap<String, Value> = HashMap::new();
    let mut countries = std::collections::HashSet::new();
    let (mut ecom, mut usual_device) = (0, 0);
    let mut devices: HashMap<String, HashMap<String, u32>> = HashMap::new();
    let mut cross_border = 0;
    for i in 0..50_000 {
        let t = g.next(i, 0);
        let card = str_of(&schema, &t, "card_id").to_string();
        let home = str_of(&schema, &t, "card_country").to_string();
        let this = (home.clone(), t.values[schema.slot("card_age_days").unwrap()].clone(), str_of(&schema, &t, "account_id").to_string());
        countries.insert(home.clone());
        if let Some(seen) = cards.insert(card.clone(), this.clone()) {
            assert_eq!(seen, this, "card {card} keeps its home country, age and account");
        }
        let merchant = str_of(&schema, &t, "merchant_id").to_string();
        let mcc = t.values[schema.slot("mcc").unwrap()].clone();
        if episode_of(&schema, &t).is_none() {
            if let Some(seen) = mccs.insert(merchant.clone(), mcc.clone()) {
                assert_eq!(seen, mcc, "merchant {merchant} keeps its category");
            }
            cross_border += (str_of(&schema, &t, "country") != home) as u32;
            if let Value::Str(d) = &t.values[schema.slot("device_id").unwrap()] {
                ecom += 1;
                *devices.entry(card).or_default().entry(d.clone()).or_default() += 1;
            }
        }
    }
    assert!(countries.len() >= 5, "{countries:?}");
    // 5% cross-border, of which ~4 in 5 land on another country than home.
    assert!((1000..2500).contains(&cross_border), "cross-border: {cross_border}");
    // ~38% ecom; on cards seen several times, one device dominates.
    assert!((17_000..21_000).contains(&ecom), "ecom: {ecom}");
    for d in devices.values() {
        let n: u32 = d.values().sum();
        usual_device += d.values().max().copied().unwrap_or(0) * (n >= 10) as u32;
    }
    let on_busy: u32 = devices.values().map(|d| d.values().sum::<u32>()).filter(|n| *n >= 10).sum();
    assert!(usual_device as f64 > 0.93 * on_busy as f64, "{usual_device} of {on_busy}");
}

#[test]
fn base_entries_are_replaced_by_name() {
    let (schema, mut g) = fraud("hot-keys.toml");
    for i in 0..20_000 {
        let t = g.next(i, 0);
        let card = card_no(&schema, &t);
        let merchant: u64 = str_of(&schema, &t, "merchant_id").strip_prefix("m-").unwrap().parse().unwrap();
        if episode_of(&schema, &t).is_none() {
            assert!(card <= 10_000 && merchant <= 5_000, "{card} {merchant}");
        } else {
            assert!((10_001..=20_000).contains(&card), "fresh keys follow the new population: {card}");
        }
    }
}
