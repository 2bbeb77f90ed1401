//! The control API of the simulated provider, for tests and benchmarks: `GET /sim/stats`,
//! `GET|POST /sim/faults`.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::get;
use axum::Router;

use super::http::to_json;
use super::state::lock;
use super::{Shared, SimFaults};

pub(super) fn routes() -> Router<Shared> {
    Router::new()
        .route("/sim/stats", get(stats))
        .route("/sim/faults", get(get_faults).post(set_faults))
}

async fn stats(State(state): State<Shared>) -> Response {
    to_json(StatusCode::OK, &state.stats())
}

async fn get_faults(State(state): State<Shared>) -> Response {
    let faults = lock(&state.faults).clone();
    to_json(StatusCode::OK, &faults)
}

async fn set_faults(State(state): State<Shared>, body: Bytes) -> Response {
    let faults: SimFaults = match serde_json::from_slice(&body) {
        Ok(faults) => faults,
        Err(error) => {
            return to_json(
                StatusCode::BAD_REQUEST,
                &serde_json::json!({ "error": format!("invalid faults: {error}") }),
            )
        }
    };
    if let Err(reason) = faults.validate() {
        return to_json(
            StatusCode::BAD_REQUEST,
            &serde_json::json!({ "error": reason }),
        );
    }
    *lock(&state.faults) = faults.clone();
    to_json(StatusCode::OK, &faults)
}
