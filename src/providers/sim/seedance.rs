//! The simulated BytePlus ModelArk content generation tasks API (Seedance), under `/seedance`:
//! `POST /seedance/api/v3/contents/generations/tasks`,
//! `GET|DELETE /seedance/api/v3/contents/generations/tasks/{id}`, and the output
//! `GET /seedance/files/{id}.mp4` (public, like ModelArk's signed object URLs).
//!
//! As ModelArk: bearer keys; errors as `{"error": {"code", "message", "param", "type"}}`; task
//! statuses `queued`, `running`, `succeeded`, `failed` (with `error: {code, message}`),
//! `cancelled`; no progress; times in Unix seconds; `DELETE` cancels a queued task, deletes a
//! finished one and refuses a running or cancelled one (403 `OperationDenied.UnsupportedPhase`,
//! a documented ModelArk code).
//!
//! A `[queue-full]` prompt is refused as over the 120 queued tasks per account. ModelArk
//! documents the limit but not the answer; the simulator answers 400 with the code
//! `QueuedTaskLimitExceeded` and a message naming the queue limit: its own stand-in.

use std::sync::atomic::Ordering;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use chrono::{DateTime, Utc};
use rand::Rng;
use serde::Serialize;

use super::http::{
    bearer_authorised, error_response, file_response, guard, json_response, parse_body,
    public_base, seconds_field, to_json, Protocol,
};
use super::state::{lock, Job, JobRequest, Phase, FAILURE_MESSAGE};
use super::Shared;
use crate::providers::{ProviderKind, ProviderSettings};

/// Bearer keys; errors as `{"error": {"code", "message", "param", "type"}}`.
pub(super) const ARK: Protocol = Protocol {
    authorised: bearer_authorised,
    error_body: |status, message| {
        let (code, kind) = match status.as_u16() {
            400 => ("InvalidParameter", "BadRequest"),
            401 => ("AuthenticationError", "Unauthorized"),
            403 => ("AccessDenied", "Forbidden"),
            404 => ("NotFound", "NotFound"),
            429 => ("RateLimitExceeded", "TooManyRequests"),
            503 => ("ServiceUnavailable", "ServiceUnavailable"),
            _ => ("InternalServiceError", "InternalServerError"),
        };
        ark_error(code, kind, message)
    },
};

fn ark_error(code: &str, kind: &str, message: &str) -> serde_json::Value {
    serde_json::json!({
        "error": { "code": code, "message": message, "param": "", "type": kind }
    })
}

const TASKS: &str = "/seedance/api/v3/contents/generations/tasks";

/// Settings for a provider of this kind served by the simulator at `base_url`.
pub(super) fn provider_settings(base_url: &str) -> ProviderSettings {
    ProviderSettings::new(
        ProviderKind::Seedance,
        format!("{base_url}/seedance/api/v3"),
    )
}

pub(super) fn routes() -> Router<Shared> {
    Router::new()
        .route(TASKS, post(create_task))
        .route(
            &format!("{TASKS}/{{id}}"),
            get(get_task).delete(delete_task),
        )
        .route("/seedance/files/{file}", get(output_file))
}

#[derive(Serialize)]
struct TaskBody<'a> {
    id: &'a str,
    model: &'a str,
    status: &'static str,
    error: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<ContentBody>,
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<UsageBody>,
    created_at: i64,
    updated_at: i64,
    seed: u32,
    resolution: &'a str,
    ratio: &'a str,
    duration: u32,
    framespersecond: u32,
    service_tier: &'static str,
    execution_expires_after: u32,
}

#[derive(Serialize)]
struct ContentBody {
    video_url: String,
}

#[derive(Serialize)]
struct UsageBody {
    completion_tokens: u64,
    total_tokens: u64,
}

fn render_task(id: &str, job: &Job, now: Instant, base: &str) -> Vec<u8> {
    let view = job.view(now);
    let status = match view.phase {
        Phase::Queued => "queued",
        Phase::Running => "running",
        Phase::Succeeded => "succeeded",
        Phase::Failed => "failed",
        Phase::Canceled => "cancelled",
    };
    let updated: DateTime<Utc> = view
        .completed_at
        .or(view.started_at)
        .unwrap_or(job.created_at);
    let duration = job.request.clip_seconds.unwrap_or(5);
    let (resolution, ratio) = job
        .request
        .size
        .as_deref()
        .and_then(|shape| shape.split_once(' '))
        .unwrap_or(("720p", "16:9"));
    let tokens = u64::from(duration) * 21_780;
    let body = TaskBody {
        id,
        model: &job.request.model,
        status,
        error: (view.phase == Phase::Failed).then(
            || serde_json::json!({ "code": "InternalServiceError", "message": FAILURE_MESSAGE }),
        ),
        content: (view.phase == Phase::Succeeded).then(|| ContentBody {
            video_url: format!("{base}/seedance/files/{id}.mp4"),
        }),
        usage: (view.phase == Phase::Succeeded).then_some(UsageBody {
            completion_tokens: tokens,
            total_tokens: tokens,
        }),
        created_at: job.created_at.timestamp(),
        updated_at: updated.timestamp(),
        seed: 58_944,
        resolution,
        ratio,
        duration,
        framespersecond: 24,
        service_tier: "default",
        execution_expires_after: 172_800,
    };
    serde_json::to_vec(&body).unwrap_or_default()
}

/// The text of the first `text` content item.
fn prompt_of(request: &serde_json::Value) -> Option<&str> {
    request
        .get("content")?
        .as_array()?
        .iter()
        .find(|item| item.get("type").and_then(|t| t.as_str()) == Some("text"))?
        .get("text")?
        .as_str()
}

/// `--duration N` / `--dur N` in the prompt, the older inline form of the parameter.
fn inline_duration(prompt: &str) -> Option<u32> {
    let mut words = prompt.split_whitespace();
    while let Some(word) = words.next() {
        if word == "--duration" || word == "--dur" {
            return words.next()?.parse().ok();
        }
    }
    None
}

async fn create_task(State(state): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    state.submits.fetch_add(1, Ordering::Relaxed);
    if let Some(response) = guard(&state, &headers, ARK).await {
        return response;
    }
    let request = match parse_body(&body) {
        Ok(request) => request,
        Err(reason) => return error_response(ARK, StatusCode::BAD_REQUEST, &reason),
    };
    let Some(model) = request.get("model").and_then(|m| m.as_str()) else {
        return to_json(
            StatusCode::BAD_REQUEST,
            &ark_error(
                "MissingParameter",
                "BadRequest",
                "The request failed because it is missing one or multiple required parameters: model",
            ),
        );
    };
    let Some(prompt) = prompt_of(&request) else {
        return to_json(
            StatusCode::BAD_REQUEST,
            &ark_error(
                "MissingParameter",
                "BadRequest",
                "The request failed because it is missing one or multiple required parameters: content (a text item)",
            ),
        );
    };
    if prompt.contains("[queue-full]") {
        return to_json(
            StatusCode::BAD_REQUEST,
            &ark_error(
                "QueuedTaskLimitExceeded",
                "BadRequest",
                "The number of queued tasks of your account has reached the limit of 120. Retry when some have started.",
            ),
        );
    }
    if let Some((status, message)) = state.submit_refusal(prompt) {
        return error_response(ARK, status, message);
    }
    let clip_seconds = seconds_field(request.get("duration")).or_else(|| inline_duration(prompt));
    let text = |field: &str, default: &str| {
        request
            .get(field)
            .and_then(|v| v.as_str())
            .unwrap_or(default)
            .to_owned()
    };
    let shape = format!("{} {}", text("resolution", "720p"), text("ratio", "16:9"));
    let job = JobRequest {
        model: model.to_owned(),
        version: None,
        prompt: prompt.to_owned(),
        clip_seconds,
        size: Some(shape),
        external_id: None,
        image: None,
    };
    let id = state.create_job(task_id(), job);
    if state.answer_lost(prompt).await {
        return error_response(
            ARK,
            StatusCode::SERVICE_UNAVAILABLE,
            "simulated lost answer",
        );
    }
    to_json(StatusCode::OK, &serde_json::json!({ "id": id }))
}

async fn get_task(
    State(state): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    state.count_status_call(&id);
    if let Some(response) = guard(&state, &headers, ARK).await {
        return response;
    }
    let base = public_base(&state, &headers);
    match state.render(&id, |job, now| render_task(&id, job, now, &base)) {
        Some(body) => json_response(StatusCode::OK, body),
        None => task_not_found(&id),
    }
}

fn task_not_found(id: &str) -> Response {
    error_response(
        ARK,
        StatusCode::NOT_FOUND,
        &format!("The specified task {id} is not found."),
    )
}

/// Cancels a queued task, deletes a finished one, refuses a running or cancelled one.
async fn delete_task(
    State(state): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Some(response) = guard(&state, &headers, ARK).await {
        return response;
    }
    let now = Instant::now();
    let mut shard = lock(state.shard(&id));
    let Some(job) = shard.get_mut(&id) else {
        return task_not_found(&id);
    };
    match job.view(now).phase {
        Phase::Queued => {
            job.cancelled_after = Some(now.saturating_duration_since(job.created));
        }
        Phase::Running | Phase::Canceled => {
            return to_json(
                StatusCode::FORBIDDEN,
                &ark_error(
                    "OperationDenied.UnsupportedPhase",
                    "Forbidden",
                    "Operation is denied because operation is not supported while the target is in its current phase.",
                ),
            );
        }
        Phase::Succeeded | Phase::Failed => {
            shard.remove(&id);
        }
    }
    to_json(StatusCode::OK, &serde_json::json!({}))
}

async fn output_file(State(state): State<Shared>, Path(file): Path<String>) -> Response {
    let id = file.strip_suffix(".mp4").unwrap_or(&file);
    file_response(&state, id, ARK)
}

/// `cgt-YYYYMMDDHHMMSS-xxxxx`, like ModelArk's task ids.
fn task_id() -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    let suffix: String = (0..5)
        .map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]))
        .collect();
    format!("cgt-{}-{suffix}", Utc::now().format("%Y%m%d%H%M%S"))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::state::test_job;
    use super::*;
    use crate::providers::seedance::parse_task;
    use crate::providers::ProviderState;

    #[test]
    fn task_ids_look_like_modelarks() {
        let id = task_id();
        assert!(id.starts_with("cgt-") && id.len() == 24, "{id}");
    }

    #[test]
    fn rendered_tasks_parse_with_the_adapter() {
        let job = test_job(1000, true);
        let at = |ms| job.created + Duration::from_millis(ms);
        let queued = parse_task(&render_task("cgt-1", &job, at(10), "http://h")).expect("queued");
        assert_eq!(queued.state, ProviderState::Queued);
        let failed = parse_task(&render_task("cgt-1", &job, at(1000), "http://h")).expect("failed");
        assert_eq!(failed.state, ProviderState::Failed);
        assert_eq!(
            failed.error.as_deref(),
            Some("InternalServiceError: simulated failure")
        );
    }

    #[test]
    fn inline_duration_is_read_from_the_prompt() {
        assert_eq!(inline_duration("a cat --ratio 16:9 --dur 10"), Some(10));
        assert_eq!(inline_duration("a cat --duration 5"), Some(5));
        assert_eq!(inline_duration("a cat"), None);
    }
}
