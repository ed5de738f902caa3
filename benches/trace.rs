//! What OpenTelemetry tracing costs a stage per message, as the worker and the driver
//! run it (`actio_runtime::trace`): off (no tracer: the default), on but the message
//! not sampled (its span ids and the outgoing `traceparent` are made anyway, so the
//! next stage follows the decision), and on and sampled (plus the span handed to the
//! SDK's span processor; a no-op one here, so the export thread is not measured).
//!
//! `baseline_no_tracing_code` is the header copy every variant makes: `off` minus it
//! is what tracing costs when it is off.
//!
//! Run: `cargo bench -p actio-benches --bench trace`

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use actio_core::Headers;
use actio_runtime::trace::{self, Tracer};
use mimalloc::MiMalloc;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SpanData, SpanProcessor};

#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

use criterion::{Criterion, criterion_group, criterion_main};

#[derive(Debug)]
struct Drop;

impl SpanProcessor for Drop {
    fn on_start(&self, _: &mut opentelemetry_sdk::trace::Span, _: &opentelemetry::Context) {}
    fn on_end(&self, span: SpanData) {
        black_box(span);
    }
    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }
    fn shutdown_with_timeout(&self, _: Duration) -> OTelSdkResult {
        Ok(())
    }
}

/// The per-message tracing work of one stage: its span ids from the incoming
/// headers, the outgoing `traceparent`, the span recorded when done.
fn message(tracer: Option<&Tracer>, incoming: &Headers, out: &mut Headers) {
    let span = tracer.map(|t| t.ids(incoming.get(trace::TRACEPARENT)));
    if let Some(ids) = &span {
        out.set(trace::TRACEPARENT, trace::traceparent(ids));
    }
    if let (Some(t), Some(ids)) = (tracer, span.filter(|s| s.sampled)) {
        t.end("rules", ids, 1_000, 2_000, vec![opentelemetry::KeyValue::new("messaging.kafka.message.offset", 7i64)], None);
    }
}

fn tracing(c: &mut Criterion) {
    let mut g = c.benchmark_group("trace");
    let mut incoming = Headers::default();
    incoming.set("actio-id", "run-1-42");
    let unsampled = Tracer::new(Arc::new(Drop), 0.0);
    let sampled = Tracer::new(Arc::new(Drop), 1.0);
    // What every variant does besides tracing: the output's headers, copied from the input's.
    g.bench_function("baseline_no_tracing_code", |b| b.iter(|| black_box(black_box(&incoming).clone())));
    for (name, tracer) in [("off", None), ("on_not_sampled", Some(&unsampled)), ("on_sampled", Some(&sampled))] {
        g.bench_function(name, |b| {
            b.iter(|| {
                let mut out = incoming.clone();
                message(tracer, black_box(&incoming), &mut out);
                black_box(out)
            })
        });
    }
    g.finish();
}

criterion_group!(benches, tracing);
criterion_main!(benches);
