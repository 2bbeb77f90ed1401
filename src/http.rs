//! HTTP: `/healthz`, `/readyz`, `/metrics` (Prometheus text), `GET /v1/tasks/{requestId}`
//! (`Authorization: Bearer <API key>`; another tenant's task is indistinguishable from a missing
//! one), and the live event streams of [`crate::live`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::{FromRef, Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};

use tracing::warn;

use crate::auth::{self, AuthError, Caller};
use crate::broker::Broker;
use crate::live::{self, Live};
use crate::store::{Store, TaskView};

/// The process-wide Prometheus recorder (see [`crate::metrics`], which installs and describes it).
pub use crate::metrics::handle as metrics_handle;

/// Process metrics from `/proc` (Linux), in Prometheus text format.
fn process_metrics() -> String {
    let mut out = String::new();
    if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
        for line in status.lines() {
            if let Some(kb) = line.strip_prefix("VmRSS:") {
                if let Ok(kb) = kb.trim().trim_end_matches("kB").trim().parse::<u64>() {
                    out.push_str(
                        "# HELP process_resident_memory_bytes Resident memory size in bytes.\n",
                    );
                    out.push_str("# TYPE process_resident_memory_bytes gauge\n");
                    out.push_str(&format!("process_resident_memory_bytes {}\n", kb * 1024));
                }
            }
            if let Some(n) = line.strip_prefix("Threads:") {
                out.push_str("# HELP process_threads Threads of the process.\n");
                out.push_str("# TYPE process_threads gauge\n");
                out.push_str(&format!("process_threads {}\n", n.trim()));
            }
        }
    }
    if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
        // Fields after the command name (which may contain spaces) start at ") ".
        if let Some(rest) = stat.rsplit_once(") ").map(|(_, r)| r) {
            let fields: Vec<&str> = rest.split_whitespace().collect();
            // utime and stime are fields 14 and 15 of stat, 12 and 13 here; in clock ticks (100/s).
            if let (Some(u), Some(s)) = (fields.get(11), fields.get(12)) {
                if let (Ok(u), Ok(s)) = (u.parse::<f64>(), s.parse::<f64>()) {
                    out.push_str(
                        "# HELP process_cpu_seconds_total User and system CPU time spent in seconds.\n",
                    );
                    out.push_str("# TYPE process_cpu_seconds_total counter\n");
                    out.push_str(&format!("process_cpu_seconds_total {}\n", (u + s) / 100.0));
                }
            }
        }
    }
    if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
        out.push_str("# HELP process_open_fds Open file descriptors.\n");
        out.push_str("# TYPE process_open_fds gauge\n");
        out.push_str(&format!("process_open_fds {}\n", dir.count()));
    }
    out
}

/// What the endpoints look at.
#[derive(Debug, Clone)]
pub struct HttpState {
    /// Broker (readiness).
    pub broker: Arc<Broker>,
    /// Database (readiness, task lookups).
    pub store: Store,
    /// Set once the configured consumers run; cleared on shutdown.
    pub consumers_running: Arc<AtomicBool>,
    /// Live task events (`/v1/tasks/{requestId}/events`, `/v1/events`).
    pub live: Live,
}

impl FromRef<HttpState> for Live {
    fn from_ref(state: &HttpState) -> Self {
        state.live.clone()
    }
}

/// The router.
pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_endpoint))
        .route("/v1/tasks/{request_id}", get(task))
        .route("/v1/tasks/{request_id}/events", get(live::task_events))
        .route("/v1/events", get(live::all_events))
        .merge(crate::console::router(&state))
        .with_state(state)
}

async fn readyz(State(state): State<HttpState>) -> Response {
    let broker = state.broker.is_ready();
    let database = state.store.ping().await;
    let consumers = state.consumers_running.load(Ordering::Relaxed);
    let body = serde_json::json!({
        "ready": broker && database && consumers,
        "broker": broker,
        "database": database,
        "topology": broker,
        "consumers": consumers,
    });
    let code = if broker && database && consumers {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body)).into_response()
}

async fn metrics_endpoint() -> Response {
    let mut text = metrics_handle().render();
    text.push_str(&process_metrics());
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        text,
    )
        .into_response()
}

pub(crate) fn error(code: StatusCode, text: &str) -> Response {
    (code, Json(serde_json::json!({ "error": text }))).into_response()
}

/// The caller of a request with an API key, or the answer for one without a valid key (`401`
/// naming the scheme) or when keys cannot be checked (`503`).
pub(crate) async fn caller(store: &Store, headers: &HeaderMap) -> Result<Caller, Response> {
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    match auth::authenticate(store, authorization).await {
        Ok(caller) => Ok(caller),
        Err(AuthError::Unavailable(e)) => {
            warn!(error = %e, "API key lookup failed");
            Err(error(
                StatusCode::SERVICE_UNAVAILABLE,
                "database unavailable",
            ))
        }
        Err(e) => {
            let mut response = error(StatusCode::UNAUTHORIZED, &e.to_string());
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
            Err(response)
        }
    }
}

async fn task(
    State(state): State<HttpState>,
    Path(request_id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let caller = match caller(&state.store, &headers).await {
        Ok(caller) => caller,
        Err(response) => return response,
    };
    match state.store.get(&request_id).await {
        Ok(Some(t)) if caller.may_read(&t.virtual_key_id) => {
            Json(TaskView::from(&t)).into_response()
        }
        Ok(_) => error(StatusCode::NOT_FOUND, "not found"),
        Err(e) => {
            warn!(error = %e, "task lookup failed");
            error(StatusCode::SERVICE_UNAVAILABLE, "database unavailable")
        }
    }
}
