//! The simulated Runway tasks API, under `/runway`: `POST /runway/v1/text_to_video` and
//! `POST /runway/v1/image_to_video` (the same body plus a required `promptImage`: an https URL
//! or a data URI),
//! `GET|DELETE /runway/v1/tasks/{id}`, and the output files at `GET /runway/files/{id}.mp4`
//! (public, like Runway's signed CDN URLs).
//!
//! As Runway: Bearer keys and a required `X-Runway-Version` header (400 without it, or with a
//! version other than `2024-11-06`); errors as `{"error": "..."}` (body validation failures add
//! `issues`, the zod-style list Runway sends); ids are UUIDs; a task is `PENDING` (or
//! `THROTTLED` when its prompt has `[throttled]`, as over the concurrency limit), then `RUNNING`
//! with `progress` a 0–1 fraction, then `SUCCEEDED` with `output` URLs or `FAILED` with
//! `failure` and `failureCode`. `DELETE` answers 204 and the task is gone (`GET` and a second
//! `DELETE` answer 404 `{"error": "Could not find Task"}`, as observed live), whether it was
//! aborted or, finished, deleted. The wording of the version errors is ours.

use std::sync::atomic::Ordering;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use chrono::SecondsFormat;
use serde::Serialize;

use super::http::{
    bearer_authorised, error_response, file_response, guard, json_response, parse_body,
    public_base, seconds_field, to_json, Protocol,
};
use super::state::{lock, Job, JobRequest, Phase, SimState, FAILURE_MESSAGE};
use super::Shared;
use crate::providers::{ProviderKind, ProviderSettings};

/// Bearer keys; errors as `{"error": "..."}`.
pub(super) const RUNWAY: Protocol = Protocol {
    authorised: bearer_authorised,
    error_body: |_status, message| serde_json::json!({ "error": message }),
};

/// The API versions this simulator speaks (`X-Runway-Version`).
const VERSIONS: &[&str] = &["2024-11-06"];

/// The `failureCode` of a failed simulated task (a documented family: rejected output).
const FAILURE_CODE: &str = "INTERNAL.BAD_OUTPUT.CODE01";

/// Settings for a provider of this kind served by the simulator at `base_url`.
pub(super) fn provider_settings(base_url: &str) -> ProviderSettings {
    ProviderSettings::new(ProviderKind::Runway, format!("{base_url}/runway"))
}

pub(super) fn routes() -> Router<Shared> {
    Router::new()
        .route("/runway/v1/text_to_video", post(create_task))
        .route("/runway/v1/image_to_video", post(create_image_task))
        .route("/runway/v1/tasks/{id}", get(get_task).delete(delete_task))
        .route("/runway/files/{file}", get(output_file))
}

/// [`guard`], then the version header Runway requires on every API request.
async fn check(state: &SimState, headers: &HeaderMap) -> Option<Response> {
    if let Some(response) = guard(state, headers, RUNWAY).await {
        return Some(response);
    }
    match headers
        .get("x-runway-version")
        .map(|v| v.to_str().unwrap_or_default())
    {
        None => Some(error_response(
            RUNWAY,
            StatusCode::BAD_REQUEST,
            "The X-Runway-Version header is required. See https://docs.dev.runwayml.com/api-details/versioning/",
        )),
        Some(version) if !VERSIONS.contains(&version) => Some(error_response(
            RUNWAY,
            StatusCode::BAD_REQUEST,
            &format!("Unsupported API version in X-Runway-Version: \"{version}\""),
        )),
        Some(_) => None,
    }
}

/// A 400 for a body that fails validation, in Runway's shape.
fn invalid_body(path: &str, message: &str) -> Response {
    to_json(
        StatusCode::BAD_REQUEST,
        &serde_json::json!({
            "error": "Validation of body failed",
            "issues": [{ "code": "invalid_type", "path": [path], "message": message }],
            "docUrl": "https://docs.dev.runwayml.com/api",
        }),
    )
}

fn is_ratio(text: &str) -> bool {
    text.split_once(':').is_some_and(|(w, h)| {
        [w, h]
            .iter()
            .all(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    })
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

/// Both create endpoints; `image_to_video` also requires `promptImage`.
async fn create(state: &Shared, headers: &HeaderMap, body: &Bytes, from_image: bool) -> Response {
    state.submits.fetch_add(1, Ordering::Relaxed);
    if let Some(response) = check(state, headers).await {
        return response;
    }
    let request = match parse_body(body) {
        Ok(request) => request,
        Err(reason) => return error_response(RUNWAY, StatusCode::BAD_REQUEST, &reason),
    };
    let text = |field: &str| request.get(field).and_then(|v| v.as_str());
    let Some(model) = text("model").filter(|m| !m.is_empty()) else {
        return invalid_body(
            "model",
            "Invalid input: expected string, received undefined",
        );
    };
    let Some(prompt) = text("promptText").filter(|p| !p.is_empty()) else {
        return invalid_body("promptText", "Invalid input: expected a non-empty string");
    };
    let image = text("promptImage").map(str::to_owned);
    match (&image, from_image) {
        (None, true) => {
            return invalid_body(
                "promptImage",
                "Invalid input: expected string, received undefined",
            )
        }
        (Some(i), true) if !(i.starts_with("https://") || i.starts_with("data:image/")) => {
            return invalid_body(
                "promptImage",
                "Invalid input: expected an HTTPS URL or a data URI",
            )
        }
        (Some(_), false) => return invalid_body("promptImage", "Unrecognized key: promptImage"),
        _ => {}
    }
    let Some(ratio) = text("ratio").filter(|r| is_ratio(r)) else {
        return invalid_body("ratio", "Invalid input: expected a ratio such as 1280:720");
    };
    let clip_seconds = match request.get("duration") {
        None => None,
        Some(value) => match seconds_field(Some(value)).filter(|_| value.is_number()) {
            Some(seconds) => Some(seconds),
            None => return invalid_body("duration", "Invalid input: expected number"),
        },
    };
    if let Some((status, message)) = state.submit_refusal(prompt) {
        return error_response(RUNWAY, status, message);
    }
    let request = JobRequest {
        model: model.to_owned(),
        version: None,
        prompt: prompt.to_owned(),
        clip_seconds,
        size: Some(ratio.to_owned()),
        external_id: None,
        image,
    };
    let id = state.create_job(uuid::Uuid::new_v4().to_string(), request);
    if state.answer_lost(prompt).await {
        return error_response(
            RUNWAY,
            StatusCode::SERVICE_UNAVAILABLE,
            "simulated lost answer",
        );
    }
    to_json(StatusCode::OK, &serde_json::json!({ "id": id }))
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct TaskBody<'a> {
    id: &'a str,
    status: &'static str,
    created_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    progress: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    output: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    failure: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    failure_code: Option<&'static str>,
}

fn render_task(id: &str, job: &Job, now: Instant, base: &str) -> Vec<u8> {
    let view = job.view(now);
    let status = match view.phase {
        Phase::Queued if job.request.prompt.contains("[throttled]") => "THROTTLED",
        Phase::Queued => "PENDING",
        Phase::Running => "RUNNING",
        Phase::Succeeded => "SUCCEEDED",
        Phase::Failed => "FAILED",
        // Not reached: a deleted task is removed.
        Phase::Canceled => "CANCELLED",
    };
    let failed = view.phase == Phase::Failed;
    let body = TaskBody {
        id,
        status,
        created_at: job.created_at.to_rfc3339_opts(SecondsFormat::Millis, true),
        progress: (view.phase == Phase::Running).then(|| f64::from(view.progress) / 100.0),
        output: (view.phase == Phase::Succeeded)
            .then(|| vec![format!("{base}/runway/files/{id}.mp4")]),
        failure: failed.then_some(FAILURE_MESSAGE),
        failure_code: failed.then_some(FAILURE_CODE),
    };
    serde_json::to_vec(&body).unwrap_or_default()
}

fn task_not_found() -> Response {
    error_response(RUNWAY, StatusCode::NOT_FOUND, "Could not find Task")
}

async fn get_task(
    State(state): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    state.count_status_call(&id);
    if let Some(response) = check(&state, &headers).await {
        return response;
    }
    let base = public_base(&state, &headers);
    match state.render(&id, |job, now| render_task(&id, job, now, &base)) {
        Some(body) => json_response(StatusCode::OK, body),
        None => task_not_found(),
    }
}

/// Aborts a pending or running task, deletes a finished one: either way it is gone.
async fn delete_task(
    State(state): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Some(response) = check(&state, &headers).await {
        return response;
    }
    let removed = lock(state.shard(&id)).remove(&id);
    match removed {
        Some(_) => StatusCode::NO_CONTENT.into_response(),
        None => task_not_found(),
    }
}

async fn output_file(State(state): State<Shared>, Path(file): Path<String>) -> Response {
    let id = file.strip_suffix(".mp4").unwrap_or(&file);
    file_response(&state, id, RUNWAY)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::state::test_job;
    use super::*;
    use crate::providers::runway::parse_task;
    use crate::providers::ProviderState;

    #[test]
    fn rendered_tasks_parse_with_the_adapter() {
        let job = test_job(1000, false);
        let at = |ms| {
            render_task(
                "t-1",
                &job,
                job.created + Duration::from_millis(ms),
                "http://h",
            )
        };
        let running = parse_task(&at(500)).expect("running");
        assert_eq!(running.state, ProviderState::InProgress);
        assert_eq!(running.progress, Some(50));
        let done = parse_task(&at(1000)).expect("succeeded");
        assert_eq!(
            done.video_url.as_deref(),
            Some("http://h/runway/files/t-1.mp4")
        );
        assert!(done.video_url_expires_at.is_some());

        let failing = test_job(100, true);
        let failed = parse_task(&render_task(
            "t-2",
            &failing,
            failing.created + Duration::from_millis(100),
            "http://h",
        ))
        .expect("failed");
        assert_eq!(
            failed.error.as_deref(),
            Some("simulated failure (INTERNAL.BAD_OUTPUT.CODE01)")
        );
    }

    #[test]
    fn ratios_are_two_numbers() {
        assert!(is_ratio("1280:720"));
        assert!(!is_ratio("1280x720") && !is_ratio(":720") && !is_ratio("16:9:1"));
    }
}
