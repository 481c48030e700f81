//! A bounded, counted path from ended spans to the OTLP exporter.
//!
//! The SDK's batch processor already exports from its own thread with a
//! bounded queue, so a slow or dead collector never blocks a request. What it
//! does not do is tell anyone how many spans it dropped. The [`Gate`] here
//! counts spans between "ended" and "export finished"; past its limit a span
//! is dropped and counted in [`super::SPANS_DROPPED`] (exposed as a metric)
//! before it reaches the processor, whose own queue is larger and so never
//! drops uncounted.

use std::{
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use opentelemetry::Context;
use opentelemetry_sdk::{
    Resource,
    error::OTelSdkResult,
    trace::{Span, SpanData, SpanExporter, SpanProcessor},
};

/// Spans admitted and not yet through an export attempt.
#[derive(Debug, Clone)]
pub struct Gate {
    in_pipeline: Arc<AtomicUsize>,
    limit: usize,
}

impl Gate {
    pub fn new(limit: usize) -> Self {
        Self {
            in_pipeline: Arc::new(AtomicUsize::new(0)),
            limit,
        }
    }

    fn admit(&self) -> bool {
        if self.in_pipeline.fetch_add(1, Ordering::Relaxed) < self.limit {
            return true;
        }
        self.in_pipeline.fetch_sub(1, Ordering::Relaxed);
        super::SPANS_DROPPED.fetch_add(1, Ordering::Relaxed);
        false
    }
}

/// Releases its spans from the gate when the export attempt ends, also when
/// the SDK abandons the export future on timeout.
struct Release {
    gate: Gate,
    spans: usize,
}

impl Drop for Release {
    fn drop(&mut self) {
        self.gate.in_pipeline.fetch_sub(self.spans, Ordering::Relaxed);
    }
}

/// The exporter, releasing each batch from the gate once sent (or failed).
#[derive(Debug)]
pub struct CountingExporter<E> {
    inner: E,
    gate: Gate,
}

impl<E> CountingExporter<E> {
    pub fn new(inner: E, gate: Gate) -> Self {
        Self { inner, gate }
    }
}

impl<E: SpanExporter> SpanExporter for CountingExporter<E> {
    fn export(&self, batch: Vec<SpanData>) -> impl Future<Output = OTelSdkResult> + Send {
        let release = Release {
            gate: self.gate.clone(),
            spans: batch.len(),
        };
        let export = self.inner.export(batch);
        async move {
            let result = export.await;
            drop(release);
            result
        }
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// The processor, behind the gate.
#[derive(Debug)]
pub struct DropCountingProcessor<P> {
    inner: P,
    gate: Gate,
}

impl<P> DropCountingProcessor<P> {
    pub fn new(inner: P, gate: Gate) -> Self {
        Self { inner, gate }
    }
}

impl<P: SpanProcessor> SpanProcessor for DropCountingProcessor<P> {
    fn on_start(&self, span: &mut Span, cx: &Context) {
        self.inner.on_start(span, cx);
    }

    fn on_end(&self, span: SpanData) {
        if self.gate.admit() {
            self.inner.on_end(span);
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}
