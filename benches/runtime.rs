//! The stage runtime's per-message bookkeeping: key lanes (admit → run → next) and the
//! watermark (consumed → done out of order → committable), at the in-flight cap of
//! the fraud pipeline (1,000 per partition), with Zipf-skewed keys.
//!
//! Run: `cargo bench -p actio-benches --bench runtime`

use std::hint::black_box;

use actio_benches::{fraud, transactions};
use actio_runtime::{KeyLanes, Ordering, Watermark};
use mimalloc::MiMalloc;

// As in the `actio` binary: allocation costs are measured as they are in production.
#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};

const WINDOW: usize = 1000;

fn runtime(c: &mut Criterion) {
    let p = fraud();
    let keys: Vec<Vec<u8>> = transactions(&p, WINDOW).iter().map(|t| p.key.key(t).into_bytes()).collect();
    let mut g = c.benchmark_group("runtime");
    g.throughput(Throughput::Elements(WINDOW as u64));

    g.bench_function("key_lanes_admit_then_drain_1000", |b| {
        b.iter(|| {
            let mut lanes: KeyLanes<usize> = KeyLanes::new(Ordering::Key);
            let mut running = Vec::with_capacity(WINDOW);
            for (i, k) in keys.iter().enumerate() {
                let lane = lanes.lane_of(Some(k));
                if let Some(item) = lanes.admit(lane, i) {
                    running.push((lane, item));
                }
            }
            // Finish heads; each finished head may hand over the next of its lane.
            while let Some((lane, item)) = running.pop() {
                black_box(item);
                if let Some(next) = lanes.next(lane) {
                    running.push((lane, next));
                }
            }
            black_box(lanes.busy())
        })
    });

    // Completion order: every other offset first, then the rest (worst case for a
    // contiguous watermark short of reverse order).
    let mut order: Vec<i64> = (0..WINDOW as i64).step_by(2).collect();
    order.reverse();
    order.extend((1..WINDOW as i64).step_by(2));
    g.bench_function("watermark_out_of_order_1000", |b| {
        b.iter(|| {
            let mut w = Watermark::new(Some(0));
            for o in 0..WINDOW as i64 {
                w.consumed(o);
            }
            for &o in &order {
                w.done(o);
            }
            black_box(w.committable())
        })
    });
    g.finish();
}

criterion_group!(benches, runtime);
criterion_main!(benches);
