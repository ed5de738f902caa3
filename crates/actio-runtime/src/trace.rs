//! OpenTelemetry traces: one span per stage per message, from consumed to outputs
//! acknowledged, child of the message's incoming W3C `traceparent`; its outputs carry
//! a `traceparent` naming this span, so the next stage's span is its child and a
//! transaction's hops form one trace.
//!
//! The span's ids are chosen when the outputs are made (they must name it before it
//! ends), and the span is recorded when the message is done, from the times the
//! runtime measures anyway: no span object lives through the work. Spans go to an
//! OpenTelemetry SDK [`SpanProcessor`] (the binary's OTLP batch exporter: its own
//! thread, a bounded queue that drops rather than blocks).
//!
//! Sampling is parent-based: a message whose `traceparent` is sampled is traced, one
//! whose `traceparent` is not is not (the flag passes on), and a message without one
//! (a stage reading the ingress) starts a trace with the configured ratio, decided
//! on the trace id as OpenTelemetry's `TraceIdRatioBased` does. With no tracer (the
//! default) none of this runs.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use opentelemetry::trace::{SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator, SpanData, SpanEvents, SpanLinks, SpanProcessor};

/// The W3C trace-context header (the one the runtime already carries over).
pub use actio_core::headers::TRACEPARENT;

/// Where a stage's sampled spans go, and how often a new trace is sampled.
#[derive(Clone)]
pub struct Tracer {
    inner: Arc<Inner>,
}

struct Inner {
    processor: Arc<dyn SpanProcessor>,
    /// A new trace is sampled when the low 63 bits of its id are below this.
    threshold: u64,
    ratio: f64,
    ids: RandomIdGenerator,
    scope: InstrumentationScope,
}

impl fmt::Debug for Tracer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tracer").field("ratio", &self.inner.ratio).finish_non_exhaustive()
    }
}

/// The span of one message at one stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpanIds {
    /// The trace.
    pub trace: TraceId,
    /// This span.
    pub span: SpanId,
    /// The span of the incoming `traceparent` ([`SpanId::INVALID`]: a new trace).
    pub parent: SpanId,
    /// Whether it is recorded.
    pub sampled: bool,
}

impl Tracer {
    /// Spans to `processor`; a new trace is sampled with probability `ratio` (0..=1).
    pub fn new(processor: Arc<dyn SpanProcessor>, ratio: f64) -> Self {
        let ratio = if ratio.is_nan() { 0.0 } else { ratio.clamp(0.0, 1.0) };
        let threshold = if ratio >= 1.0 { u64::MAX } else { (ratio * (1u64 << 63) as f64) as u64 };
        let scope = InstrumentationScope::builder("actio").with_version(env!("CARGO_PKG_VERSION")).build();
        Tracer { inner: Arc::new(Inner { processor, threshold, ratio, ids: RandomIdGenerator::default(), scope }) }
    }

    /// The ids of a message's span at this stage, from its incoming `traceparent`
    /// (absent or malformed: a new trace, sampled by the ratio).
    pub fn ids(&self, incoming: Option<&[u8]>) -> SpanIds {
        let span = self.inner.ids.new_span_id();
        match incoming.and_then(parse_traceparent) {
            Some((trace, parent, sampled)) => SpanIds { trace, span, parent, sampled },
            None => {
                let trace = self.inner.ids.new_trace_id();
                let low = u64::from_be_bytes(trace.to_bytes()[8..].try_into().unwrap_or_default()) >> 1;
                SpanIds { trace, span, parent: SpanId::INVALID, sampled: self.inner.threshold == u64::MAX || low < self.inner.threshold }
            }
        }
    }

    /// Records a sampled span: `stage` consumed it at `start_ns` and was done at
    /// `end_ns` (ns since the epoch); `error` marks it failed (dead-lettered).
    pub fn end(&self, stage: &str, ids: SpanIds, start_ns: i64, end_ns: i64, attributes: Vec<KeyValue>, error: Option<String>) {
        if !ids.sampled {
            return;
        }
        let at = |ns: i64| SystemTime::UNIX_EPOCH + Duration::from_nanos(u64::try_from(ns).unwrap_or(0));
        let status = match error {
            Some(e) => Status::error(e),
            None => Status::Unset,
        };
        self.inner.processor.on_end(SpanData {
            span_context: SpanContext::new(ids.trace, ids.span, TraceFlags::SAMPLED, false, TraceState::default()),
            parent_span_id: ids.parent,
            parent_span_is_remote: ids.parent != SpanId::INVALID,
            span_kind: SpanKind::Consumer,
            name: Cow::Owned(format!("{stage} process")),
            start_time: at(start_ns),
            end_time: at(end_ns.max(start_ns)),
            attributes,
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status,
            instrumentation_scope: self.inner.scope.clone(),
        });
    }
}

/// The `traceparent` value naming `ids`' span.
pub fn traceparent(ids: &SpanIds) -> String {
    format!("00-{}-{}-{:02x}", ids.trace, ids.span, u8::from(ids.sampled))
}

/// (trace, parent span, sampled) of a W3C `traceparent` (version 00, or a later one
/// read as 00 would be).
fn parse_traceparent(v: &[u8]) -> Option<(TraceId, SpanId, bool)> {
    let s = std::str::from_utf8(v).ok()?.trim();
    let mut parts = s.split('-');
    let (version, trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if version.len() != 2 || version == "ff" || trace.len() != 32 || span.len() != 16 || flags.len() != 2 {
        return None;
    }
    let trace = TraceId::from_hex(trace).ok().filter(|t| *t != TraceId::INVALID)?;
    let span = SpanId::from_hex(span).ok().filter(|s| *s != SpanId::INVALID)?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    Some((trace, span, flags & 1 == 1))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test
mod tests {
    use super::*;
    use opentelemetry_sdk::error::OTelSdkResult;
    use parking_lot::Mutex;

    #[derive(Debug, Default)]
    struct Kept(Mutex<Vec<SpanData>>);

    impl SpanProcessor for Kept {
        fn on_start(&self, _: &mut opentelemetry_sdk::trace::Span, _: &opentelemetry::Context) {}
        fn on_end(&self, span: SpanData) {
            self.0.lock().push(span);
        }
        fn force_flush(&self) -> OTelSdkResult {
            Ok(())
        }
        fn shutdown_with_timeout(&self, _: Duration) -> OTelSdkResult {
            Ok(())
        }
    }

    #[test]
    fn a_child_of_the_incoming_traceparent_is_named_by_the_outgoing_one() {
        let kept = Arc::new(Kept::default());
        let t = Tracer::new(kept.clone(), 0.0);
        let incoming = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let ids = t.ids(Some(incoming));
        assert_eq!(ids.trace.to_string(), "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(ids.parent.to_string(), "b7ad6b7169203331");
        assert!(ids.sampled, "the parent's decision wins over the ratio");
        let out = traceparent(&ids);
        assert_eq!(parse_traceparent(out.as_bytes()), Some((ids.trace, ids.span, true)));
        t.end("rules", ids, 1_000, 3_000, vec![KeyValue::new("k", 1)], None);
        let spans = kept.0.lock();
        assert_eq!(spans.len(), 1);
        assert_eq!((spans[0].parent_span_id, spans[0].span_context.span_id(), &*spans[0].name), (ids.parent, ids.span, "rules process"));
        assert_eq!(spans[0].end_time.duration_since(spans[0].start_time).unwrap(), Duration::from_nanos(2_000));
    }

    #[test]
    fn new_traces_are_sampled_by_the_ratio_and_an_unsampled_parent_is_not() {
        let kept = Arc::new(Kept::default());
        let never = Tracer::new(kept.clone(), 0.0);
        let always = Tracer::new(kept.clone(), 1.0);
        let half = Tracer::new(kept.clone(), 0.5);
        assert!((0..100).all(|_| !never.ids(None).sampled && always.ids(None).sampled));
        let n = (0..10_000).filter(|_| half.ids(None).sampled).count();
        assert!((4_500..5_500).contains(&n), "{n} of 10,000 at 0.5");
        let unsampled = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00";
        let ids = always.ids(Some(unsampled));
        assert!(!ids.sampled);
        always.end("rules", ids, 0, 1, Vec::new(), None);
        assert!(kept.0.lock().is_empty(), "an unsampled span is not recorded");
        for bad in [&b"garbage"[..], b"00-00000000000000000000000000000000-b7ad6b7169203331-01", b"ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"] {
            assert_eq!(always.ids(Some(bad)).parent, SpanId::INVALID, "{}", String::from_utf8_lossy(bad));
        }
    }
}
