//! Logging setup: JSON lines by default, `APP__LOG__FORMAT=pretty` for humans, `RUST_LOG` filters;
//! and span export over OTLP when `telemetry.otlp_endpoint` is set (`otlp.rs`).

use tracing_subscriber::{fmt, prelude::*, EnvFilter};

use crate::config::LogFormat;

mod otlp;

pub use otlp::{ExportError, Registration, TraceExport};

/// Installs the global subscriber. Calling it twice is harmless (the second call is ignored),
/// which lets tests and the demo share one process. The OpenTelemetry layer is always part of
/// it and idle until an application registers a [`TraceExport`].
pub fn init(format: LogFormat, default_filter: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let registry = tracing_subscriber::registry()
        .with(filter)
        .with(otlp::layer());
    let result = match format {
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_span_list(true)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
        LogFormat::Pretty => registry
            .with(fmt::layer().compact().with_writer(std::io::stderr))
            .try_init(),
    };
    // Already initialised (tests, demo): keep the first subscriber.
    let _ = result;
}

/// For tests: logs only when `TEST_LOG` is set, so test output stays readable; the
/// OpenTelemetry layer is installed either way, so a test can export spans.
pub fn init_for_tests() {
    if std::env::var_os("TEST_LOG").is_some() {
        init(LogFormat::Pretty, "info,video_orchestrator=debug");
    } else {
        let _ = tracing_subscriber::registry()
            .with(EnvFilter::new("info,lapin=off"))
            .with(otlp::layer())
            .try_init();
    }
}

/// Default `RUST_LOG`: our info, and lapin's channel errors off (passive probes close channels by
/// design; real failures reach us as `Result`s and are logged with context).
pub const DEFAULT_FILTER: &str = "info,lapin::channel=off";
