//! OpenTelemetry export for `actio stage`: the runtime's spans (one per stage per
//! message, see `actio_runtime::trace`) go to an OTLP/HTTP endpoint through the SDK's
//! batch span processor (its own thread; a bounded queue that drops spans rather
//! than slow a stage when the collector is slow or gone).

use std::sync::Arc;

use actio_runtime::trace::Tracer;
use anyhow::Context;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{BatchSpanProcessor, SpanProcessor};

/// A running exporter; [`Export::shutdown`] sends what is queued.
pub struct Export {
    processor: Arc<BatchSpanProcessor>,
}

impl Export {
    /// Exports to `endpoint` (the collector's OTLP/HTTP base URL, e.g.
    /// `http://127.0.0.1:4318`; traces go to `<endpoint>/v1/traces`), as service
    /// `service`; a new trace is sampled with probability `ratio`.
    pub fn start(endpoint: &str, ratio: f64, service: String) -> anyhow::Result<(Tracer, Export)> {
        let url = format!("{}/v1/traces", endpoint.trim_end_matches('/'));
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(&url)
            .build()
            .with_context(|| format!("the OTLP exporter to {url} (--otlp-endpoint)"))?;
        let mut processor = BatchSpanProcessor::builder(exporter).build();
        processor.set_resource(&Resource::builder().with_service_name(service).build());
        let processor = Arc::new(processor);
        Ok((Tracer::new(processor.clone(), ratio), Export { processor }))
    }

    /// Flushes the queued spans (bounded by the SDK's export timeout).
    pub fn shutdown(self) {
        if let Err(e) = self.processor.shutdown() {
            tracing::warn!(error = %e, "flushing the spans at shutdown");
        }
    }
}
