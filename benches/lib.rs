//! Shared fixtures of actio's micro-benchmarks: the shipped fraud pipeline and
//! realistic transactions from the load generator (its baseline scenario: Zipf cards,
//! fraud episodes), so rules fire as often as they would in production.
#![deny(missing_docs)]

use std::path::{Path, PathBuf};

use actio_core::{Tx, TxState};
use actio_loadgen::{Generator, Scenario};
use actio_pipeline::Pipeline;

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../pipelines/fraud")
}

/// The shipped fraud pipeline, loaded and compiled.
pub fn fraud() -> Pipeline {
    match Pipeline::load(&dir()) {
        Ok(p) => p,
        Err(e) => panic!("pipelines/fraud does not load: {e:?}"),
    }
}

/// `n` transactions of `p` from the seeded baseline scenario, created 10 ms apart, as
/// producers send them (derived fields not computed).
pub fn transactions(p: &Pipeline, n: usize) -> Vec<Tx> {
    let scenario = Scenario::load(&dir().join("scenarios/baseline.toml")).unwrap_or_else(|e| panic!("scenario: {e}"));
    let mut g = Generator::new(p.schema.clone(), &scenario, "bench").unwrap_or_else(|e| panic!("generator: {e}"));
    let t0 = 1_800_000_000_000_000_000i64;
    (0..n as u64).map(|i| g.next(i, t0 + i as i64 * 10_000_000)).collect()
}

/// The states as they enter the first stage (derived fields computed at ingress).
pub fn states(p: &Pipeline, n: usize) -> Vec<TxState> {
    transactions(p, n)
        .into_iter()
        .map(|tx| {
            let mut st = TxState::new(tx);
            p.derived.fill(&mut st).unwrap_or_else(|e| panic!("derived: {e}"));
            st
        })
        .collect()
}
