//! Shared fixtures of actio's micro-benchmarks: the shipped fraud pipeline and
//! realistic transactions from the load generator (Zipf cards, fraud episodes), so
//! rules fire as often as they would in production.
#![deny(missing_docs)]

use std::path::Path;

use actio_core::{Transaction, TxState};
use actio_loadgen::{GenConfig, Generator};
use actio_pipeline::Pipeline;

/// The shipped fraud pipeline, loaded and compiled.
pub fn fraud() -> Pipeline {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../pipelines/fraud");
    match Pipeline::load(&dir) {
        Ok(p) => p,
        Err(e) => panic!("pipelines/fraud does not load: {e:?}"),
    }
}

/// `n` transactions from the seeded generator, created 10 ms apart.
pub fn transactions(n: usize) -> Vec<Transaction> {
    let mut g = match Generator::new(GenConfig::default(), "bench") {
        Ok(g) => g,
        Err(e) => panic!("generator: {e}"),
    };
    let t0 = 1_800_000_000_000_000_000i64;
    (0..n as u64).map(|i| g.next(i, t0 + i as i64 * 10_000_000)).collect()
}

/// The states as they enter the first stage.
pub fn states(n: usize) -> Vec<TxState> {
    transactions(n).into_iter().map(TxState::new).collect()
}
