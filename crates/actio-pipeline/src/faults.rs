//! Fault injection for resilience drills: `[[stage.fault]]` entries make a stage fail on
//! the transactions a CEL condition picks — transiently for the first N attempts,
//! permanently, or by panicking — so that in-place retries, the retry topic, the DLQ
//! and panic handling can be exercised on stages that otherwise never fail (the shipped
//! ones are pure CPU). None unless configured; a stage with faults warns at start.
//!
//! Conditions are compiled once at load by the rule engine's compiler
//! ([`actio_engine::expr`]), with the features computed before the stage. They are
//! checked after the input decodes and before the stage's logic runs, so a failed
//! attempt leaves nothing behind (a velocity window is not updated twice).

use std::sync::Arc;

use actio_core::{Schema, TxState};
use actio_engine::expr::{self, Node, Scope};
use actio_runtime::HandlerError;

use crate::config::FaultKind;

/// One compiled fault.
#[derive(Debug, Clone)]
pub struct Fault {
    /// The condition as written.
    pub when: String,
    /// What it does.
    pub kind: FaultKind,
    /// Fails only attempts `1..=times` (`None`: every attempt).
    pub times: Option<u32>,
    node: Node,
}

/// A stage's faults, in declaration order.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// The features known before the stage, in feature-table order.
    features: Vec<String>,
    faults: Vec<Fault>,
}

impl Faults {
    /// Compiles `(when, kind, times)` entries; an error names the entry's index and
    /// says what is wrong with its condition.
    pub fn compile(entries: &[(String, FaultKind, Option<u32>)], schema: &Arc<Schema>, features: &[String]) -> Result<Faults, (usize, String)> {
        let scope = Scope::new(schema, features);
        let faults = entries
            .iter()
            .enumerate()
            .map(|(i, (when, kind, times))| {
                let node = expr::compile(when, &scope).map_err(|e| (i, e))?;
                Ok(Fault { when: when.clone(), kind: *kind, times: *times, node })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Faults { features: scope.features, faults })
    }

    /// Whether there are none (the default).
    pub fn is_empty(&self) -> bool {
        self.faults.is_empty()
    }

    /// The faults.
    pub fn faults(&self) -> &[Fault] {
        &self.faults
    }

    /// Fails `attempt` (1-based, as the runtime counts it) of `st` if a fault says so:
    /// the first fault whose condition holds and whose `times` covers the attempt. A
    /// condition that fails to evaluate does not hold. Panics for a `panic` fault.
    pub fn check(&self, st: &TxState, attempt: u32) -> Result<(), HandlerError> {
        if self.faults.is_empty() {
            return Ok(());
        }
        let table = expr::feature_table(&self.features, st);
        for (i, f) in self.faults.iter().enumerate() {
            if f.times.is_some_and(|n| attempt > n) || !f.node.eval_bool(st, &table).unwrap_or(false) {
                continue;
            }
            let what = format!("fault[{i}] `{}`, attempt {attempt}", f.when);
            return match f.kind {
                FaultKind::Transient => Err(HandlerError::transient(format!("injected transient fault ({what})"))),
                FaultKind::Permanent => Err(HandlerError::permanent(format!("injected permanent fault ({what})"))),
                FaultKind::Panic => panic!("injected panic ({what})"),
            };
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actio_runtime::FailureKind;

    fn schema() -> Arc<Schema> {
        let text = "[record]\nid = \"id\"\ntime = \"at\"\n[[field]]\nname = \"id\"\ntype = \"string\"\n[[field]]\nname = \"shop\"\ntype = \"string\"\n\
                    [[field]]\nname = \"at\"\ntype = \"timestamp\"\n[[field]]\nname = \"attrs\"\ntype = \"map\"\n[[derived]]\nname = \"amount\"\ntype = \"float\"\ncel = \"1.0\"\n\
                    [decision]\noutcomes = [\"ok\"]\n";
        Arc::new(Schema::from_toml(text, std::path::Path::new("schema.toml")).unwrap())
    }

    fn tx(shop: &str) -> TxState {
        TxState::new(schema().decode_json(format!(r#"{{"id":"t1","shop":"{shop}","at":0}}"#).as_bytes()).unwrap())
    }

    fn faults() -> Faults {
        Faults::compile(
            &[
                ("tx.shop == 'flaky'".into(), FaultKind::Transient, Some(2)),
                ("tx.shop == 'flaky'".into(), FaultKind::Permanent, None),
                ("tx.shop == 'bad'".into(), FaultKind::Permanent, None),
                ("tx.shop == 'boom'".into(), FaultKind::Panic, None),
                ("tx.attrs.missing > 1".into(), FaultKind::Permanent, None),
            ],
            &schema(),
            &[],
        )
        .unwrap()
    }

    #[test]
    fn a_transient_fault_fails_the_first_n_attempts_then_later_faults_apply() {
        let f = faults();
        for attempt in [1, 2] {
            let e = f.check(&tx("flaky"), attempt).unwrap_err();
            assert_eq!(e.kind, FailureKind::Transient);
            assert_eq!(e.message, format!("injected transient fault (fault[0] `tx.shop == 'flaky'`, attempt {attempt})"));
        }
        // Past `times`, the next matching fault (permanent, every attempt) applies.
        assert_eq!(f.check(&tx("flaky"), 3).unwrap_err().kind, FailureKind::Permanent);
        assert_eq!(f.check(&tx("bad"), 1).unwrap_err().kind, FailureKind::Permanent);
        // No match, or a condition that fails to evaluate: no fault.
        assert!(f.check(&tx("m-1"), 1).is_ok());
        assert!(Faults::default().check(&tx("bad"), 1).is_ok());
    }

    #[test]
    fn a_panic_fault_panics_with_its_condition() {
        let f = faults();
        let p = std::panic::catch_unwind(|| f.check(&tx("boom"), 1)).unwrap_err();
        let msg = p.downcast_ref::<String>().unwrap();
        assert_eq!(msg, "injected panic (fault[3] `tx.shop == 'boom'`, attempt 1)");
    }

    #[test]
    fn a_bad_condition_names_its_entry() {
        let e = Faults::compile(&[("tx.amount > 1.0".into(), FaultKind::Panic, None), ("tx.nope == 1".into(), FaultKind::Panic, None)], &schema(), &[]).unwrap_err();
        assert_eq!(e.0, 1);
        assert!(e.1.contains("nope"), "{}", e.1);
    }
}
