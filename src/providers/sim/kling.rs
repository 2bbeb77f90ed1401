//! The simulated Kling video tasks API, under `/kling`: `POST /kling/v1/videos/text2video`,
//! `GET /kling/v1/videos/text2video/{task_id or external_task_id}`, the same two under
//! `image2video` (which requires `image`: a URL or bare base64, a `data:` prefix refused as Kling
//! does; each endpoint finds only its own tasks), and the finished files (public, like Kling's
//! CDN) at `GET /kling/files/{task_id}.mp4`.
//!
//! Requests carry `Authorization: Bearer <JWT>` (HS256, claims `iss`, `exp`, `nbf`): signed with
//! [`super::SimSettings::api_key`] when it is set, else any well-formed token with an `iss` is
//! accepted; `exp` and `nbf` are always checked. Refusals are 401 with Kling's codes (1001 empty,
//! 1002 invalid, 1003 not yet valid, 1004 expired, 1000 bad signature). Every answer is Kling's
//! envelope `{code, message, request_id, data}`.

use std::sync::atomic::Ordering;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::header::AUTHORIZATION;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use rand::Rng;
use serde::{Deserialize, Serialize};

use super::http::{
    error_response, file_response, guard, header_after, json_response, parse_body, public_base,
    seconds_field, to_json, Protocol,
};
use super::state::{Job, JobRequest, Phase, SimState, FAILURE_MESSAGE};
use super::Shared;
use crate::providers::{ProviderKind, ProviderSettings};

/// The access key (`iss`) the simulator's settings carry.
pub(super) const SIM_ACCESS_KEY: &str = "sim-kling-access-key";

/// JWT bearer tokens; errors as Kling's envelope with the code its table pairs with the status.
pub(super) const KLING: Protocol = Protocol {
    authorised: |state, headers| check_jwt(state, headers).is_ok(),
    error_body: |status, message| envelope_error(code_for(status), message),
};

/// Settings for a provider of this kind served by the simulator at `base_url`.
pub(super) fn provider_settings(base_url: &str) -> ProviderSettings {
    ProviderSettings {
        access_key: Some(SIM_ACCESS_KEY.to_owned()),
        ..ProviderSettings::new(ProviderKind::Kling, format!("{base_url}/kling"))
    }
}

pub(super) fn routes() -> Router<Shared> {
    Router::new()
        .route("/kling/v1/videos/text2video", post(create_task))
        .route("/kling/v1/videos/text2video/{id}", get(get_task))
        .route("/kling/v1/videos/image2video", post(create_image_task))
        .route("/kling/v1/videos/image2video/{id}", get(get_image_task))
        .route("/kling/files/{file}", get(video_file))
}

/// The code of Kling's table for an HTTP status (the sim's own refusals and faults).
fn code_for(status: StatusCode) -> i64 {
    match status.as_u16() {
        400 => 1201,
        401 => 1000,
        403 => 1103,
        404 => 1203,
        429 => 1302,
        503 => 5001,
        504 => 5002,
        s if s >= 500 => 5000,
        _ => 1200,
    }
}

fn request_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

fn envelope_error(code: i64, message: &str) -> serde_json::Value {
    serde_json::json!({ "code": code, "message": message, "request_id": request_id() })
}

fn kling_error(status: StatusCode, code: i64, message: &str) -> Response {
    to_json(status, &envelope_error(code, message))
}

#[derive(Deserialize)]
struct Claims {
    iss: String,
    exp: i64,
    nbf: i64,
}

/// Kling's authentication, with the code of each refusal.
fn check_jwt(state: &SimState, headers: &HeaderMap) -> Result<(), (i64, &'static str)> {
    const INVALID: (i64, &str) = (1002, "Authorization is invalid");
    if headers.get(AUTHORIZATION).is_none() {
        return Err((1001, "Authorization is empty"));
    }
    let token = header_after(headers, AUTHORIZATION.as_str(), "Bearer ")
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or(INVALID)?;
    if jsonwebtoken::decode_header(token).map_err(|_| INVALID)?.alg != Algorithm::HS256 {
        return Err(INVALID);
    }
    let claims = match &state.settings.api_key {
        Some(secret) => {
            // The signature only: the times are checked below, the same way in both cases.
            let mut validation = Validation::new(Algorithm::HS256);
            validation.validate_exp = false;
            validation.validate_nbf = false;
            validation.required_spec_claims.clear();
            let key = DecodingKey::from_secret(secret.as_bytes());
            match jsonwebtoken::decode::<Claims>(token, &key, &validation) {
                Ok(data) => data.claims,
                Err(error) if *error.kind() == ErrorKind::InvalidSignature => {
                    return Err((1000, "Authentication failed"))
                }
                Err(_) => return Err(INVALID),
            }
        }
        // Without a configured key any well-formed token is accepted.
        None => {
            jsonwebtoken::dangerous::insecure_decode::<Claims>(token)
                .map_err(|_| INVALID)?
                .claims
        }
    };
    let now = chrono::Utc::now().timestamp();
    if claims.iss.trim().is_empty() {
        return Err(INVALID);
    }
    if now < claims.nbf {
        return Err((1003, "Authorization is not yet valid"));
    }
    if now >= claims.exp {
        return Err((1004, "Authorization has expired"));
    }
    Ok(())
}

/// Kling's own 401 (with the precise code), then the shared faults.
async fn kling_guard(state: &SimState, headers: &HeaderMap) -> Option<Response> {
    if let Err((code, message)) = check_jwt(state, headers) {
        return Some(kling_error(StatusCode::UNAUTHORIZED, code, message));
    }
    guard(state, headers, KLING).await
}

#[derive(Serialize)]
struct TaskEnvelope<'a> {
    code: i64,
    message: &'static str,
    request_id: String,
    data: TaskBody<'a>,
}

#[derive(Serialize)]
struct TaskBody<'a> {
    task_id: &'a str,
    task_status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    task_status_msg: Option<&'static str>,
    task_info: TaskInfoBody<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    task_result: Option<serde_json::Value>,
    created_at: i64,
    updated_at: i64,
}

#[derive(Serialize)]
struct TaskInfoBody<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    external_task_id: Option<&'a str>,
}

/// The task as Kling shows it: `full` for a query (status message and result), else the
/// creation answer.
fn render_task(id: &str, job: &Job, now: Instant, base: &str, full: bool) -> Vec<u8> {
    let view = job.view(now);
    let (status, message) = match view.phase {
        Phase::Queued => ("submitted", ""),
        Phase::Running => ("processing", ""),
        Phase::Succeeded => ("succeed", ""),
        Phase::Failed => ("failed", FAILURE_MESSAGE),
        // Kling has no cancel; not reachable through this protocol.
        Phase::Canceled => ("failed", "canceled"),
    };
    let task_result = full.then(|| {
        if view.phase == Phase::Succeeded {
            serde_json::json!({ "videos": [{
                "id": format!("{id}-0"),
                "url": format!("{base}/kling/files/{id}.mp4"),
                "duration": job.request.clip_seconds.unwrap_or(5).to_string(),
            }] })
        } else {
            serde_json::json!({})
        }
    });
    let created_at = job.created_at.timestamp_millis();
    let updated_at = view
        .completed_at
        .or(view.started_at)
        .map_or(created_at, |at| at.timestamp_millis());
    let body = TaskEnvelope {
        code: 0,
        message: "SUCCEED",
        request_id: request_id(),
        data: TaskBody {
            task_id: id,
            task_status: status,
            task_status_msg: full.then_some(message),
            task_info: TaskInfoBody {
                external_task_id: job.request.external_id.as_deref(),
            },
            task_result,
            created_at,
            updated_at,
        },
    };
    serde_json::to_vec(&body).unwrap_or_default()
}

/// An 18-digit numeric id, like Kling's task ids.
fn task_id() -> String {
    let mut rng = rand::rng();
    format!("8{:017}", rng.random_range(0..100_000_000_000_000_000_u64))
}

fn bad_request(message: &str) -> Response {
    kling_error(StatusCode::BAD_REQUEST, 1201, message)
}

async fn create_task(State(state): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    create(&state, &headers, &body, false).await
}

async fn create_image_task(
    State(state): State<Shared>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    create(&state, &headers, &body, true).await
}

/// Both create endpoints; `image2video` also requires `image`.
async fn create(state: &Shared, headers: &HeaderMap, body: &Bytes, from_image: bool) -> Response {
    state.submits.fetch_add(1, Ordering::Relaxed);
    if let Some(response) = kling_guard(state, headers).await {
        return response;
    }
    let request = match parse_body(body) {
        Ok(request) => request,
        Err(reason) => return kling_error(StatusCode::BAD_REQUEST, 1200, &reason),
    };
    let Some(prompt) = request
        .get("prompt")
        .and_then(|p| p.as_str())
        .filter(|p| !p.is_empty())
    else {
        return bad_request("prompt is required");
    };
    let clip_seconds = match request.get("duration") {
        None => None,
        Some(serde_json::Value::String(d)) if d == "5" || d == "10" => {
            seconds_field(request.get("duration"))
        }
        Some(other) => {
            return bad_request(&format!("duration must be \"5\" or \"10\", got {other}"))
        }
    };
    let aspect_ratio = match request.get("aspect_ratio") {
        None => None,
        Some(serde_json::Value::String(r)) if ["16:9", "9:16", "1:1"].contains(&r.as_str()) => {
            Some(r.clone())
        }
        Some(other) => return bad_request(&format!("aspect_ratio is invalid: {other}")),
    };
    let image = if from_image {
        match request.get("image").and_then(|i| i.as_str()) {
            None | Some("") => return bad_request("image is required"),
            Some(i) if i.starts_with("data:") => {
                return bad_request(
                    "image must be an image URL or bare base64, without a data: prefix",
                )
            }
            Some(i) => Some(i.to_owned()),
        }
    } else {
        None
    };
    let external_id = match request.get("external_task_id") {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(e)) if !e.is_empty() => Some(e.clone()),
        Some(other) => return bad_request(&format!("external_task_id is invalid: {other}")),
    };
    if let Some((status, message)) = state.submit_refusal(prompt) {
        return error_response(KLING, status, message);
    }
    if let Some(external) = &external_id {
        if state.find_external(external).is_some() {
            return bad_request(&format!(
                "external_task_id {external} already exists: it must be unique within the account"
            ));
        }
    }
    let model = request
        .get("model_name")
        .and_then(|m| m.as_str())
        .unwrap_or("kling-v1")
        .to_owned();
    let job = JobRequest {
        model,
        version: None,
        prompt: prompt.to_owned(),
        clip_seconds,
        size: aspect_ratio,
        external_id,
        image,
    };
    let id = state.create_job(task_id(), job);
    if state.answer_lost(prompt).await {
        return error_response(
            KLING,
            StatusCode::SERVICE_UNAVAILABLE,
            "simulated lost answer",
        );
    }
    let base = public_base(state, headers);
    match state.render(&id, |job, now| render_task(&id, job, now, &base, false)) {
        Some(body) => json_response(StatusCode::OK, body),
        None => task_not_found(),
    }
}

fn task_not_found() -> Response {
    kling_error(
        StatusCode::NOT_FOUND,
        1203,
        "The requested resource does not exist",
    )
}

/// `{id}` is a task id or, as Kling documents, the `external_task_id` given at creation.
async fn get_task(
    State(state): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    query(&state, &id, &headers, false).await
}

async fn get_image_task(
    State(state): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    query(&state, &id, &headers, true).await
}

/// A task query on the text or the image endpoint, which knows only its own tasks.
async fn query(state: &Shared, id: &str, headers: &HeaderMap, from_image: bool) -> Response {
    state.count_status_call(id);
    if let Some(response) = kling_guard(state, headers).await {
        return response;
    }
    let base = public_base(state, headers);
    let task = match state.made_from_image(id) {
        Some(_) => Some(id.to_owned()),
        None => state.find_external(id),
    }
    .filter(|task| state.made_from_image(task) == Some(from_image));
    let body = task
        .and_then(|task| state.render(&task, |job, now| render_task(&task, job, now, &base, true)));
    match body {
        Some(body) => json_response(StatusCode::OK, body),
        None => task_not_found(),
    }
}

/// Kling's result URLs are public CDN links: no authentication.
async fn video_file(State(state): State<Shared>, Path(file): Path<String>) -> Response {
    let id = file.strip_suffix(".mp4").unwrap_or(&file);
    file_response(&state, id, KLING)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_ids_are_eighteen_digits() {
        let id = task_id();
        assert_eq!(id.len(), 18, "{id}");
        assert!(id.bytes().all(|b| b.is_ascii_digit()));
    }

    #[test]
    fn statuses_map_to_the_documented_codes() {
        assert_eq!(code_for(StatusCode::UNAUTHORIZED), 1000);
        assert_eq!(code_for(StatusCode::TOO_MANY_REQUESTS), 1302);
        assert_eq!(code_for(StatusCode::INTERNAL_SERVER_ERROR), 5000);
        assert_eq!(code_for(StatusCode::SERVICE_UNAVAILABLE), 5001);
        assert_eq!(code_for(StatusCode::NOT_FOUND), 1203);
    }
}
