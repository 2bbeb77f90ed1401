//! The simulated DashScope asynchronous video synthesis API (Alibaba Wan), under `/dashscope`:
//! `POST /dashscope/api/v1/services/aigc/video-generation/video-synthesis`,
//! `GET /dashscope/api/v1/tasks/{task_id}`, `POST /dashscope/api/v1/tasks/{task_id}/cancel`, and
//! the output `GET /dashscope/files/{id}.mp4?Expires=…` (public, like DashScope's signed OSS URLs).
//!
//! As DashScope: bearer keys; a submit without `X-DashScope-Async: enable` is refused (403
//! `AccessDenied`, "current user api does not support synchronous calls"); errors as
//! `{"code", "message", "request_id"}` (`InvalidApiKey` on 401, `Throttling.RateQuota` on 429);
//! `output.task_status` `PENDING`, `RUNNING`, `SUCCEEDED`, `FAILED` (with `output.code` /
//! `output.message`), `CANCELED`, and `UNKNOWN` with HTTP 200 for an id it does not know; times
//! as `YYYY-MM-DD HH:MM:SS.mmm` in UTC+8; cancel only while `PENDING` (400
//! `UnsupportedOperation` otherwise). The 20 queries per second per account are not enforced
//! here: the adapter's own cap (`max_status_rps`) is what the tests exercise.

use std::sync::atomic::Ordering;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use chrono::{DateTime, FixedOffset, TimeDelta, Utc};
use serde::Serialize;

use super::http::{
    bearer_authorised, error_response, file_response, guard, header_after, json_response,
    parse_body, public_base, seconds_field, to_json, Protocol,
};
use super::state::{lock, Job, JobRequest, Phase, FAILURE_MESSAGE};
use super::Shared;
use crate::providers::{ProviderKind, ProviderSettings};

/// Bearer keys; errors as `{"code", "message", "request_id"}`.
pub(super) const DASHSCOPE: Protocol = Protocol {
    authorised: bearer_authorised,
    error_body: |status, message| {
        let code = match status.as_u16() {
            400 => "InvalidParameter",
            401 => "InvalidApiKey",
            403 => "AccessDenied",
            404 => "NotFound",
            429 => "Throttling.RateQuota",
            _ => "InternalError",
        };
        dashscope_error(code, message)
    },
};

fn dashscope_error(code: &str, message: &str) -> serde_json::Value {
    serde_json::json!({ "code": code, "message": message, "request_id": request_id() })
}

const API: &str = "/dashscope/api/v1";

/// Settings for a provider of this kind served by the simulator at `base_url`.
pub(super) fn provider_settings(base_url: &str) -> ProviderSettings {
    ProviderSettings::new(ProviderKind::Dashscope, format!("{base_url}{API}"))
}

pub(super) fn routes() -> Router<Shared> {
    Router::new()
        .route(
            &format!("{API}/services/aigc/video-generation/video-synthesis"),
            post(create_task),
        )
        .route(&format!("{API}/tasks/{{task_id}}"), get(get_task))
        .route(
            &format!("{API}/tasks/{{task_id}}/cancel"),
            post(cancel_task),
        )
        .route("/dashscope/files/{file}", get(output_file))
}

#[derive(Serialize)]
struct TaskBody<'a> {
    request_id: String,
    output: OutputBody<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<UsageBody>,
}

#[derive(Serialize)]
struct OutputBody<'a> {
    task_id: &'a str,
    task_status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    submit_time: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    scheduled_time: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    end_time: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    orig_prompt: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    video_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    code: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<&'static str>,
}

#[derive(Serialize)]
struct UsageBody {
    video_duration: u32,
    video_ratio: String,
    video_count: u32,
}

/// A DashScope time: `YYYY-MM-DD HH:MM:SS.mmm` in UTC+8, without a zone.
fn dashscope_time(at: DateTime<Utc>) -> String {
    let Some(zone) = FixedOffset::east_opt(8 * 3600) else {
        return at.format("%Y-%m-%d %H:%M:%S%.3f").to_string();
    };
    at.with_timezone(&zone)
        .format("%Y-%m-%d %H:%M:%S%.3f")
        .to_string()
}

fn render_task(id: &str, job: &Job, now: Instant, base: &str) -> Vec<u8> {
    let view = job.view(now);
    let task_status = match view.phase {
        Phase::Queued => "PENDING",
        Phase::Running => "RUNNING",
        Phase::Succeeded => "SUCCEEDED",
        Phase::Failed => "FAILED",
        Phase::Canceled => "CANCELED",
    };
    let succeeded = view.phase == Phase::Succeeded;
    let failed = view.phase == Phase::Failed;
    let video_url = view.completed_at.filter(|_| succeeded).map(|end| {
        let expires = (end + TimeDelta::hours(24)).timestamp();
        format!(
            "{base}/dashscope/files/{id}.mp4?Expires={expires}&OSSAccessKeyId=sim&Signature=sim"
        )
    });
    let body = TaskBody {
        request_id: request_id(),
        output: OutputBody {
            task_id: id,
            task_status,
            submit_time: Some(dashscope_time(job.created_at)),
            scheduled_time: view.started_at.map(dashscope_time),
            end_time: view.completed_at.map(dashscope_time),
            orig_prompt: succeeded.then_some(job.request.prompt.as_str()),
            video_url,
            code: failed.then_some("InternalError.Algo"),
            message: failed.then_some(FAILURE_MESSAGE),
        },
        usage: succeeded.then(|| UsageBody {
            video_duration: job.request.clip_seconds.unwrap_or(5),
            video_ratio: job
                .request
                .size
                .clone()
                .unwrap_or_else(|| "1280*720".to_owned()),
            video_count: 1,
        }),
    };
    serde_json::to_vec(&body).unwrap_or_default()
}

/// What DashScope answers, with 200, for an id it does not know (or no longer keeps).
fn unknown_task(id: &str) -> Response {
    to_json(
        StatusCode::OK,
        &serde_json::json!({
            "request_id": request_id(),
            "output": { "task_id": id, "task_status": "UNKNOWN" },
        }),
    )
}

async fn create_task(State(state): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    state.submits.fetch_add(1, Ordering::Relaxed);
    if let Some(response) = guard(&state, &headers, DASHSCOPE).await {
        return response;
    }
    if header_after(&headers, "x-dashscope-async", "").map(str::trim) != Some("enable") {
        return to_json(
            StatusCode::FORBIDDEN,
            &dashscope_error(
                "AccessDenied",
                "current user api does not support synchronous calls",
            ),
        );
    }
    let request = match parse_body(&body) {
        Ok(request) => request,
        Err(reason) => return error_response(DASHSCOPE, StatusCode::BAD_REQUEST, &reason),
    };
    let Some(model) = request.get("model").and_then(|m| m.as_str()) else {
        return to_json(
            StatusCode::BAD_REQUEST,
            &dashscope_error(
                "BadRequest.EmptyModel",
                "Required parameter \"model\" missing from request.",
            ),
        );
    };
    let Some(prompt) = request
        .get("input")
        .and_then(|input| input.get("prompt"))
        .and_then(|p| p.as_str())
    else {
        return to_json(
            StatusCode::BAD_REQUEST,
            &dashscope_error(
                "BadRequest.EmptyInput",
                "Required input parameter missing from request.",
            ),
        );
    };
    if let Some((status, message)) = state.submit_refusal(prompt) {
        return error_response(DASHSCOPE, status, message);
    }
    let parameters = request.get("parameters");
    let field = |name: &str| parameters.and_then(|p| p.get(name));
    let size = field("size")
        .or_else(|| field("resolution"))
        .and_then(|s| s.as_str())
        .map(str::to_owned);
    let job = JobRequest {
        model: model.to_owned(),
        version: None,
        prompt: prompt.to_owned(),
        clip_seconds: seconds_field(field("duration")),
        size,
        external_id: None,
        image: None,
    };
    let id = state.create_job(uuid::Uuid::new_v4().to_string(), job);
    if state.answer_lost(prompt).await {
        return error_response(
            DASHSCOPE,
            StatusCode::SERVICE_UNAVAILABLE,
            "simulated lost answer",
        );
    }
    to_json(
        StatusCode::OK,
        &serde_json::json!({
            "output": { "task_id": id, "task_status": "PENDING" },
            "request_id": request_id(),
        }),
    )
}

async fn get_task(
    State(state): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    state.count_status_call(&id);
    if let Some(response) = guard(&state, &headers, DASHSCOPE).await {
        return response;
    }
    let base = public_base(&state, &headers);
    match state.render(&id, |job, now| render_task(&id, job, now, &base)) {
        Some(body) => json_response(StatusCode::OK, body),
        None => unknown_task(&id),
    }
}

/// Cancels a `PENDING` task; anything else is refused.
async fn cancel_task(
    State(state): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Some(response) = guard(&state, &headers, DASHSCOPE).await {
        return response;
    }
    let now = Instant::now();
    let mut shard = lock(state.shard(&id));
    let pending = shard
        .get_mut(&id)
        .filter(|job| job.view(now).phase == Phase::Queued);
    let Some(job) = pending else {
        return to_json(
            StatusCode::BAD_REQUEST,
            &dashscope_error(
                "UnsupportedOperation",
                "Failed to cancel the task, please confirm if the task is in PENDING status.",
            ),
        );
    };
    job.cancelled_after = Some(now.saturating_duration_since(job.created));
    to_json(
        StatusCode::OK,
        &serde_json::json!({ "request_id": request_id() }),
    )
}

async fn output_file(State(state): State<Shared>, Path(file): Path<String>) -> Response {
    let id = file.strip_suffix(".mp4").unwrap_or(&file);
    file_response(&state, id, DASHSCOPE)
}

fn request_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::state::test_job;
    use super::*;
    use crate::providers::dashscope::parse_task;
    use crate::providers::ProviderState;

    #[test]
    fn rendered_tasks_parse_with_the_adapter() {
        let job = test_job(1000, false);
        let at = |ms| job.created + Duration::from_millis(ms);
        let pending =
            parse_task(&render_task("t", &job, at(10), "http://h"), Utc::now()).expect("pending");
        assert_eq!(pending.state, ProviderState::Queued);
        let done = parse_task(&render_task("t", &job, at(1000), "http://h"), Utc::now())
            .expect("succeeded");
        assert_eq!(done.state, ProviderState::Succeeded);
        let end = job.created_at + TimeDelta::seconds(1);
        let expires = done.video_url_expires_at.expect("expiry");
        assert!((expires - (end + TimeDelta::hours(24))).num_seconds().abs() <= 1);
    }

    #[test]
    fn times_are_written_in_utc_plus_eight() {
        let at = DateTime::<Utc>::from_timestamp(1_759_126_999, 407_000_000).expect("time");
        assert_eq!(dashscope_time(at), "2025-09-29 14:23:19.407");
    }
}
