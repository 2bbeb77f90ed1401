//! OTLP export of the spans.
//!
//! One `tracing-opentelemetry` layer serves the whole process (the global subscriber is installed
//! once, see [`super::init`]); its tracer's only span processor, the router, hands every finished
//! span to the exporters of the [`Application`](crate::app::Application)s running with
//! `telemetry.otlp_endpoint` set. Each such application owns a [`TraceExport`]: a bounded
//! channel the router fills and a tokio task, owned by the application, that batches and posts
//! to `/v1/traces`. With no exporter registered the layer is switched off by a dynamic filter,
//! so a service without an endpoint pays nothing for it. In the binary there is one application;
//! in a test process every running application's spans reach every registered exporter (a test
//! picks its own by trace id).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{PoisonError, RwLock};
use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry::KeyValue;
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig as _};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter as _, SpanProcessor};
use opentelemetry_sdk::Resource;
use tokio::sync::mpsc;
use tracing::warn;
use tracing_subscriber::filter::dynamic_filter_fn;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

use crate::config::TelemetrySettings;

/// Spans waiting for export per exporter; more are dropped (and counted), never waited for.
const QUEUE: usize = 4096;
/// Most spans in one export request.
const MAX_BATCH: usize = 512;
/// How often a partial batch is sent.
const EXPORT_EVERY: Duration = Duration::from_millis(500);
/// How long one export request may take.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

type Sink = (u64, mpsc::Sender<SpanData>);

static SINKS: RwLock<Vec<Sink>> = RwLock::new(Vec::new());
static REGISTERED: AtomicUsize = AtomicUsize::new(0);
static NEXT_SINK: AtomicU64 = AtomicU64::new(1);
static DROPPED: AtomicU64 = AtomicU64::new(0);

/// Whether any application exports spans right now.
fn exporting() -> bool {
    REGISTERED.load(Ordering::Relaxed) > 0
}

/// The span processor of the process-wide tracer: copies each finished, sampled span to every
/// registered exporter's queue.
#[derive(Debug)]
struct Router;

impl SpanProcessor for Router {
    fn on_start(&self, _span: &mut opentelemetry_sdk::trace::Span, _cx: &opentelemetry::Context) {}

    fn on_end(&self, span: SpanData) {
        if !span.span_context.is_sampled() {
            return;
        }
        let sinks = SINKS.read().unwrap_or_else(PoisonError::into_inner);
        for (_, queue) in sinks.iter() {
            if queue.try_send(span.clone()).is_err() {
                DROPPED.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }
}

/// The process's OpenTelemetry layer, active only while an exporter is registered.
pub(super) fn layer<S>() -> impl Layer<S>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
{
    let provider = SdkTracerProvider::builder()
        .with_span_processor(Router)
        .build();
    let tracer = provider.tracer("video-orchestrator");
    tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_threads(false)
        .with_filter(dynamic_filter_fn(|_, _| exporting()))
}

/// Why span export could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("telemetry.otlp_endpoint: {0}")]
pub struct ExportError(String);

/// An application's span exporter: built at start; when the application runs it
/// [`registers`](TraceExport::register) it and runs [`TraceExport::run`] in a task it owns; last
/// when shutting down it drops the [`Registration`] and awaits that task, which sends what is
/// queued and shuts the exporter down.
#[derive(Debug)]
pub struct TraceExport {
    id: u64,
    queue: mpsc::Receiver<SpanData>,
    sender: mpsc::Sender<SpanData>,
    exporter: opentelemetry_otlp::SpanExporter,
}

impl TraceExport {
    /// The exporter `settings` ask for, or `None` when `telemetry.otlp_endpoint` is empty.
    ///
    /// # Errors
    /// When the OTLP exporter refuses the endpoint.
    pub fn from_settings(
        settings: &TelemetrySettings,
        instance_id: &str,
    ) -> Result<Option<Self>, ExportError> {
        let Some(url) = settings.traces_url() else {
            return Ok(None);
        };
        let client = reqwest::Client::builder()
            .timeout(EXPORT_TIMEOUT)
            .build()
            .map_err(|e| ExportError(e.to_string()))?;
        let mut exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(client)
            .with_endpoint(url)
            .with_timeout(EXPORT_TIMEOUT)
            .build()
            .map_err(|e| ExportError(e.to_string()))?;
        exporter.set_resource(
            &Resource::builder_empty()
                .with_service_name(settings.service_name.clone())
                .with_attribute(KeyValue::new("service.instance.id", instance_id.to_owned()))
                .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
                .build(),
        );
        let (sender, queue) = mpsc::channel(QUEUE);
        Ok(Some(Self {
            id: NEXT_SINK.fetch_add(1, Ordering::Relaxed),
            queue,
            sender,
            exporter,
        }))
    }

    /// Starts receiving the process's spans; returns the handle that stops it.
    pub fn register(&self) -> Registration {
        SINKS
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .push((self.id, self.sender.clone()));
        REGISTERED.fetch_add(1, Ordering::Relaxed);
        Registration(self.id)
    }

    /// Exports what the router queues, in batches, until the [`Registration`] is dropped and the
    /// queue is drained; then shuts the exporter down.
    pub async fn run(self) {
        let Self {
            mut queue,
            sender,
            mut exporter,
            ..
        } = self;
        // Only the router's copy keeps the queue open.
        drop(sender);
        let mut batch = Vec::with_capacity(MAX_BATCH);
        let mut tick = tokio::time::interval(EXPORT_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                span = queue.recv() => match span {
                    Some(span) => {
                        batch.push(span);
                        if batch.len() >= MAX_BATCH {
                            export(&exporter, std::mem::take(&mut batch)).await;
                        }
                    }
                    None => break,
                },
                _ = tick.tick() => {
                    if !batch.is_empty() {
                        export(&exporter, std::mem::take(&mut batch)).await;
                    }
                }
            }
        }
        if !batch.is_empty() {
            export(&exporter, batch).await;
        }
        let dropped = DROPPED.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            warn!(dropped, "spans were dropped: the export queue was full");
        }
        if let Err(e) = exporter.shutdown() {
            warn!(error = %e, "span exporter did not shut down cleanly");
        }
    }
}

async fn export(exporter: &opentelemetry_otlp::SpanExporter, batch: Vec<SpanData>) {
    let count = batch.len();
    match exporter.export(batch).await {
        Ok(()) => {}
        Err(e) => {
            warn!(error = %e, spans = count, "span export failed");
        }
    }
}

/// Registered with the router; dropping it unregisters, which lets [`TraceExport::run`] drain
/// its queue and end.
#[derive(Debug)]
pub struct Registration(u64);

impl Drop for Registration {
    fn drop(&mut self) {
        let mut sinks = SINKS.write().unwrap_or_else(PoisonError::into_inner);
        let before = sinks.len();
        sinks.retain(|(id, _)| *id != self.0);
        if sinks.len() < before {
            REGISTERED.fetch_sub(1, Ordering::Relaxed);
        }
    }
}
