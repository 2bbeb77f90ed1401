//! The simulated fal.ai queue API, below `/fal` (so a provider's `base_url` is `{sim}/fal`):
//! `POST /fal/{model_id}`, `GET /fal/{app}/requests/{id}/status[?logs=1]`,
//! `GET /fal/{app}/requests/{id}`, `PUT /fal/{app}/requests/{id}/cancel`. Output files are the
//! public `/sim/files/{id}.mp4` (served without a key, like fal's CDN).
//!
//! As at fal: `Authorization: Key <key>`; errors are `{"detail": …}` (validation errors a list
//! of `{loc, msg, type}`, request errors with an `error_type`); model ids with sub-paths are
//! submitted whole but read back under their app id only (`owner/app`), and a request read under
//! another app is not found; the status answers 202 while `IN_QUEUE` (with `queue_position`) or
//! `IN_PROGRESS`, 200 once `COMPLETED`, a failure carrying `error` and `error_type`
//! (`runner_server_error`; the result then answers 500), a cancelled request `client_cancelled`
//! (the result answers 499); cancel succeeds (202 `CANCELLATION_REQUESTED`) only while the
//! request is queued, otherwise 400 `ALREADY_COMPLETED`. `queue_position` is always 0: each
//! simulated job waits on its own timer, never behind another.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::header::AUTHORIZATION;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use axum::routing::post;
use axum::Router;
use chrono::{SecondsFormat, Utc};

use super::http::{
    error_response, guard, header_after, key_accepted, parse_body, public_base, to_json, Protocol,
};
use super::state::{lock, Job, JobRequest, Phase, FAILURE_MESSAGE};
use super::Shared;
use crate::providers::fal::{app_id, CLIENT_CANCELLED};
use crate::providers::{ProviderKind, ProviderSettings};

/// `Authorization: Key <key>`; errors as `{"detail": "…"}`.
pub(super) const FAL: Protocol = Protocol {
    authorised: |state, headers| {
        key_accepted(state, header_after(headers, AUTHORIZATION.as_str(), "Key "))
    },
    error_body: |_status, message| serde_json::json!({ "detail": message }),
};

/// The `error_type` of a simulated failure.
const RUNNER_ERROR: &str = "runner_server_error";

/// The `detail` of a cancelled request.
const CANCELLED_MESSAGE: &str = "The request was cancelled by the client.";

pub(super) fn routes() -> Router<Shared> {
    // Model ids contain slashes, so one catch-all route dispatches on the path's shape.
    Router::new().route("/fal/{*path}", post(submit).get(read).put(cancel))
}

/// Settings for a provider of this kind served by the simulator at `base_url`.
pub(super) fn provider_settings(base_url: &str) -> ProviderSettings {
    ProviderSettings::new(ProviderKind::Fal, format!("{base_url}/fal"))
}

/// What a path below `/fal/` addresses.
enum Target<'a> {
    /// `{model_id}`: a submit (POST only).
    Model(&'a str),
    /// `{app}/requests/{id}`, the result.
    Result { app: &'a str, id: &'a str },
    /// `{app}/requests/{id}/status`.
    Status { app: &'a str, id: &'a str },
    /// `{app}/requests/{id}/cancel`.
    Cancel { app: &'a str, id: &'a str },
    /// Anything else under `…/requests/`.
    Unknown,
}

fn target(path: &str) -> Target<'_> {
    let Some((app, rest)) = path.split_once("/requests/") else {
        return Target::Model(path);
    };
    match rest.split('/').collect::<Vec<_>>().as_slice() {
        [id] if !id.is_empty() => Target::Result { app, id },
        [id, "status"] if !id.is_empty() => Target::Status { app, id },
        [id, "cancel"] if !id.is_empty() => Target::Cancel { app, id },
        _ => Target::Unknown,
    }
}

fn not_found() -> Response {
    error_response(FAL, StatusCode::NOT_FOUND, "Request not found")
}

fn method_not_allowed() -> Response {
    error_response(FAL, StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed")
}

/// The URLs of request `id` of `app`, as fal returns them.
fn request_urls(base: &str, app: &str, id: &str) -> serde_json::Value {
    let response_url = format!("{base}/fal/{app}/requests/{id}");
    serde_json::json!({
        "request_id": id,
        "response_url": response_url,
        "status_url": format!("{response_url}/status"),
        "cancel_url": format!("{response_url}/cancel"),
    })
}

/// A validation error as fal's model endpoints answer it (422).
fn validation_error(field: &str, msg: &str, kind: &str) -> Response {
    to_json(
        StatusCode::UNPROCESSABLE_ENTITY,
        &serde_json::json!({
            "detail": [{
                "loc": ["body", field],
                "msg": msg,
                "type": kind,
                "url": format!("https://docs.fal.ai/errors#{kind}"),
            }]
        }),
    )
}

async fn submit(
    State(state): State<Shared>,
    Path(path): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    state.submits.fetch_add(1, Ordering::Relaxed);
    if let Some(response) = guard(&state, &headers, FAL).await {
        return response;
    }
    let model = match target(&path) {
        Target::Model(model) => model,
        _ => return method_not_allowed(),
    };
    let Some(app) = app_id(model) else {
        return error_response(FAL, StatusCode::NOT_FOUND, "Application not found");
    };
    let input = match parse_body(&body) {
        Ok(input) => input,
        Err(reason) => return error_response(FAL, StatusCode::BAD_REQUEST, &reason),
    };
    let Some(prompt) = input.get("prompt").and_then(|p| p.as_str()) else {
        return validation_error("prompt", "Field required", "missing");
    };
    if let Some((status, message)) = state.submit_refusal(prompt) {
        return error_response(FAL, status, message);
    }
    let clip_seconds = match input.get("duration") {
        None | Some(serde_json::Value::Null) => None,
        Some(value) => match duration_seconds(value) {
            Some(seconds) => Some(seconds),
            None => {
                return validation_error(
                    "duration",
                    "Input should be a whole number of seconds",
                    "literal_error",
                )
            }
        },
    };
    let request = JobRequest {
        model: model.to_owned(),
        version: None,
        prompt: prompt.to_owned(),
        clip_seconds,
        size: input
            .get("aspect_ratio")
            .and_then(|r| r.as_str())
            .map(str::to_owned),
        external_id: None,
        image: input
            .get("image_url")
            .and_then(|i| i.as_str())
            .map(str::to_owned),
    };
    let app = app.to_owned();
    let id = state.create_job(uuid::Uuid::new_v4().to_string(), request);
    if state.answer_lost(prompt).await {
        return error_response(
            FAL,
            StatusCode::SERVICE_UNAVAILABLE,
            "simulated lost answer",
        );
    }
    let mut answer = request_urls(&public_base(&state, &headers), &app, &id);
    answer["status"] = "IN_QUEUE".into();
    answer["queue_position"] = 0.into();
    to_json(StatusCode::OK, &answer)
}

/// `"5"`, `5` or `"8s"` (the forms fal's video models take).
fn duration_seconds(value: &serde_json::Value) -> Option<u32> {
    match value {
        serde_json::Value::String(s) => s.trim().trim_end_matches('s').parse().ok(),
        serde_json::Value::Number(n) => n.as_u64().and_then(|n| u32::try_from(n).ok()),
        _ => None,
    }
}

/// Whether job `id` exists and was submitted under `app`.
fn belongs(job: &Job, app: &str) -> bool {
    app_id(&job.request.model) == Some(app)
}

async fn read(
    State(state): State<Shared>,
    Path(path): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    match target(&path) {
        Target::Status { app, id } => {
            state.count_status_call(id);
            if let Some(response) = guard(&state, &headers, FAL).await {
                return response;
            }
            let logs = matches!(query.get("logs").map(String::as_str), Some("1" | "true"));
            let base = public_base(&state, &headers);
            let now = Instant::now();
            let shard = lock(state.shard(id));
            match shard.get(id).filter(|job| belongs(job, app)) {
                Some(job) => status_response(&base, app, id, job, now, logs),
                None => not_found(),
            }
        }
        Target::Result { app, id } => {
            if let Some(response) = guard(&state, &headers, FAL).await {
                return response;
            }
            let base = public_base(&state, &headers);
            let now = Instant::now();
            let shard = lock(state.shard(id));
            match shard.get(id).filter(|job| belongs(job, app)) {
                Some(job) => result_response(&base, id, job, now),
                None => not_found(),
            }
        }
        Target::Cancel { .. } | Target::Model(_) => {
            if let Some(response) = guard(&state, &headers, FAL).await {
                return response;
            }
            method_not_allowed()
        }
        Target::Unknown => {
            if let Some(response) = guard(&state, &headers, FAL).await {
                return response;
            }
            not_found()
        }
    }
}

fn log_line(message: String) -> serde_json::Value {
    serde_json::json!({
        "message": message,
        "level": "INFO",
        "source": "USER",
        "timestamp": Utc::now().to_rfc3339_opts(SecondsFormat::Micros, true),
    })
}

fn status_response(
    base: &str,
    app: &str,
    id: &str,
    job: &Job,
    now: Instant,
    with_logs: bool,
) -> Response {
    let view = job.view(now);
    let mut body = request_urls(base, app, id);
    let logs = |lines: Vec<String>| {
        if with_logs {
            serde_json::Value::Array(lines.into_iter().map(log_line).collect())
        } else {
            serde_json::Value::Null
        }
    };
    let code = match view.phase {
        Phase::Queued => {
            body["status"] = "IN_QUEUE".into();
            body["queue_position"] = 0.into();
            StatusCode::ACCEPTED
        }
        Phase::Running => {
            body["status"] = "IN_PROGRESS".into();
            body["logs"] = logs(vec![format!("Generating video: {}%", view.progress)]);
            StatusCode::ACCEPTED
        }
        Phase::Succeeded | Phase::Failed | Phase::Canceled => {
            body["status"] = "COMPLETED".into();
            body["logs"] = logs(vec!["Generating video: done".to_owned()]);
            body["metrics"] = serde_json::json!({ "inference_time": view.predict_time });
            match view.phase {
                Phase::Failed => {
                    body["error"] = FAILURE_MESSAGE.into();
                    body["error_type"] = RUNNER_ERROR.into();
                }
                Phase::Canceled => {
                    body["error"] = CANCELLED_MESSAGE.into();
                    body["error_type"] = CLIENT_CANCELLED.into();
                }
                _ => {}
            }
            StatusCode::OK
        }
    };
    to_json(code, &body)
}

fn result_response(base: &str, id: &str, job: &Job, now: Instant) -> Response {
    let request_error = |code: StatusCode, detail: &str, error_type: &'static str| {
        let mut response = to_json(
            code,
            &serde_json::json!({ "detail": detail, "error_type": error_type }),
        );
        response
            .headers_mut()
            .insert("x-fal-error-type", HeaderValue::from_static(error_type));
        response
    };
    match job.view(now).phase {
        Phase::Queued | Phase::Running => {
            error_response(FAL, StatusCode::BAD_REQUEST, "Request is still in progress")
        }
        Phase::Succeeded => to_json(
            StatusCode::OK,
            &serde_json::json!({
                "video": {
                    "url": format!("{base}/sim/files/{id}.mp4"),
                    "content_type": "video/mp4",
                    "file_name": format!("{id}.mp4"),
                }
            }),
        ),
        Phase::Failed => request_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            FAILURE_MESSAGE,
            RUNNER_ERROR,
        ),
        Phase::Canceled => request_error(
            StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
            CANCELLED_MESSAGE,
            CLIENT_CANCELLED,
        ),
    }
}

async fn cancel(
    State(state): State<Shared>,
    Path(path): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Some(response) = guard(&state, &headers, FAL).await {
        return response;
    }
    let Target::Cancel { app, id } = target(&path) else {
        return method_not_allowed();
    };
    let now = Instant::now();
    let mut shard = lock(state.shard(id));
    let Some(job) = shard.get_mut(id).filter(|job| belongs(job, app)) else {
        return to_json(
            StatusCode::NOT_FOUND,
            &serde_json::json!({ "status": "NOT_FOUND" }),
        );
    };
    if job.view(now).phase == Phase::Queued {
        job.cancelled_after = Some(now.saturating_duration_since(job.created));
        to_json(
            StatusCode::ACCEPTED,
            &serde_json::json!({ "status": "CANCELLATION_REQUESTED" }),
        )
    } else {
        to_json(
            StatusCode::BAD_REQUEST,
            &serde_json::json!({ "status": "ALREADY_COMPLETED" }),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_dispatch_on_their_shape() {
        assert!(matches!(
            target("fal-ai/kling-video/v2.1/master/text-to-video"),
            Target::Model("fal-ai/kling-video/v2.1/master/text-to-video")
        ));
        assert!(matches!(
            target("fal-ai/veo3/requests/r1"),
            Target::Result {
                app: "fal-ai/veo3",
                id: "r1"
            }
        ));
        assert!(matches!(
            target("fal-ai/veo3/requests/r1/status"),
            Target::Status {
                app: "fal-ai/veo3",
                id: "r1"
            }
        ));
        assert!(matches!(
            target("fal-ai/veo3/requests/r1/cancel"),
            Target::Cancel {
                app: "fal-ai/veo3",
                id: "r1"
            }
        ));
        assert!(matches!(
            target("fal-ai/veo3/requests/r1/status/stream"),
            Target::Unknown
        ));
        assert!(matches!(target("fal-ai/veo3/requests/"), Target::Unknown));
    }

    #[test]
    fn durations_accept_the_models_forms() {
        assert_eq!(duration_seconds(&serde_json::json!("5")), Some(5));
        assert_eq!(duration_seconds(&serde_json::json!("8s")), Some(8));
        assert_eq!(duration_seconds(&serde_json::json!(6)), Some(6));
        assert_eq!(duration_seconds(&serde_json::json!("long")), None);
    }
}
