//! The operator console: `GET /console`, one small page (HTML, JS and CSS embedded in the binary:
//! no CDN, works offline), and the admin JSON API under `/v1/admin/` it reads.
//!
//! ## Layout
//! - this file: the routes, the embedded assets, and the admin check every API call makes
//!   (`Authorization: Bearer <admin key>`: 401 without a valid key, 403 for a tenant's key).
//! - `api`: the handlers: tasks (filters, search), one task's timeline, instances and their
//!   partitions, parked messages and their requeue, the headline figures.
//! - `figures`: the headline figures from this instance's own Prometheus recorder.
//!
//! The page asks for the admin key once and keeps it in the browser's `sessionStorage` (gone
//! when the tab closes). Live progress comes from `GET /v1/events` when this build serves it,
//! read with `fetch` (an `EventSource` cannot send an `Authorization` header); where that answers
//! 404 the page polls `GET /v1/admin/tasks` every 2 s instead.

mod api;
mod figures;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::auth::{self, AuthError, Caller};
use crate::broker::Publisher;
use crate::http::HttpState;
use crate::store::Store;

pub use figures::{Figures, MetricsText};

const INDEX_HTML: &str = include_str!("assets/index.html");
const CONSOLE_JS: &str = include_str!("assets/console.js");
const CONSOLE_CSS: &str = include_str!("assets/console.css");

/// How long a requeue waits for the broker's confirm before the console reports a failure (the
/// message then stays listed as parked, unmarked, though the broker may have taken it).
const REQUEUE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the console's handlers share.
#[derive(Debug, Clone)]
struct ConsoleState {
    store: Store,
    /// Requeues parked messages; its own confirm channel, opened on first use.
    publisher: Publisher,
    topology_prefix: String,
    partitions: u16,
    sampler: Arc<Mutex<figures::Sampler>>,
}

/// The console's routes, to merge into the service's router.
pub fn router(state: &HttpState) -> Router<HttpState> {
    let topology = state.broker.topology();
    let console = ConsoleState {
        store: state.store.clone(),
        // Never cancelled: a requeue is bounded by REQUEUE_TIMEOUT instead, and the publisher
        // goes with the router when the server stops.
        publisher: Publisher::new(state.broker.clone(), CancellationToken::new()),
        topology_prefix: topology.prefix().to_owned(),
        partitions: topology.partitions(),
        sampler: Arc::new(Mutex::new(figures::Sampler::default())),
    };
    Router::new()
        .route(
            "/console",
            get(|| asset("text/html; charset=utf-8", INDEX_HTML)),
        )
        .route(
            "/console/console.js",
            get(|| asset("text/javascript; charset=utf-8", CONSOLE_JS)),
        )
        .route(
            "/console/console.css",
            get(|| asset("text/css; charset=utf-8", CONSOLE_CSS)),
        )
        .route("/v1/admin/tasks", get(api::tasks))
        .route("/v1/admin/tasks/{request_id}", get(api::task))
        .route("/v1/admin/instances", get(api::instances))
        .route("/v1/admin/parked", get(api::parked))
        .route("/v1/admin/parked/{id}/requeue", post(api::requeue))
        .route("/v1/admin/figures", get(api::figures))
        .with_state(console)
}

async fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; style-src 'self'; script-src 'self'",
            ),
        ],
        body,
    )
        .into_response()
}

fn error(code: StatusCode, text: &str) -> Response {
    (code, Json(serde_json::json!({ "error": text }))).into_response()
}

/// The caller, when it presents an admin key; otherwise the response to send.
async fn admin(store: &Store, headers: &HeaderMap) -> Result<Caller, Response> {
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    match auth::authenticate(store, authorization).await {
        Ok(caller) if caller.admin => Ok(caller),
        Ok(caller) => {
            warn!(key_id = %caller.key_id, virtual_key = %caller.virtual_key_id, "console: a tenant key was refused");
            Err(error(
                StatusCode::FORBIDDEN,
                "the console needs an admin key",
            ))
        }
        Err(AuthError::Unavailable(e)) => {
            warn!(error = %e, "API key lookup failed");
            Err(error(
                StatusCode::SERVICE_UNAVAILABLE,
                "database unavailable",
            ))
        }
        Err(e) => {
            let mut response = error(StatusCode::UNAUTHORIZED, &e.to_string());
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            Err(response)
        }
    }
}
