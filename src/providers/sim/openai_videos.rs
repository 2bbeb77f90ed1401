//! The simulated OpenAI-compatible Videos API: `POST /v1/videos`, `GET|DELETE /v1/videos/{id}`,
//! `GET /v1/videos/{id}/content`.

use std::sync::atomic::Ordering;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use serde::Serialize;

use super::http::{
    bearer_authorised, error_response, file_response, guard, json_response, parse_body,
    seconds_field, to_json, Protocol,
};
use super::state::{lock, Job, JobRequest, Phase, SimState, FAILURE_MESSAGE};
use super::Shared;
use crate::providers::{ProviderKind, ProviderSettings};

/// Bearer keys; errors as `{"error": {"message", "type", "param", "code"}}`.
pub(super) const OPENAI: Protocol = Protocol {
    authorised: bearer_authorised,
    error_body: |status, message| {
        serde_json::json!({
            "error": {
                "message": message,
                "type": if status.is_client_error() { "invalid_request_error" } else { "server_error" },
                "param": null,
                "code": null,
            }
        })
    },
};

/// Settings for a provider of this kind served by the simulator at `base_url`.
pub(super) fn provider_settings(base_url: &str) -> ProviderSettings {
    ProviderSettings::new(ProviderKind::OpenaiVideos, base_url)
}

pub(super) fn routes() -> Router<Shared> {
    Router::new()
        .route("/v1/videos", post(create_video))
        .route("/v1/videos/{id}", get(get_video).delete(delete_video))
        .route("/v1/videos/{id}/content", get(video_content))
}

#[derive(Serialize)]
struct VideoBody<'a> {
    id: &'a str,
    object: &'static str,
    model: &'a str,
    status: &'static str,
    progress: u8,
    created_at: i64,
    completed_at: Option<i64>,
    expires_at: Option<i64>,
    prompt: &'a str,
    size: &'a str,
    seconds: String,
    remixed_from_video_id: Option<&'a str>,
    error: Option<VideoErrorBody>,
}

#[derive(Serialize)]
struct VideoErrorBody {
    code: &'static str,
    message: &'static str,
}

fn render_video(id: &str, job: &Job, now: Instant) -> Vec<u8> {
    let view = job.view(now);
    let (status, error) = match view.phase {
        Phase::Queued => ("queued", None),
        Phase::Running => ("in_progress", None),
        Phase::Succeeded => ("completed", None),
        Phase::Failed => (
            "failed",
            Some(VideoErrorBody {
                code: "simulated_failure",
                message: FAILURE_MESSAGE,
            }),
        ),
        // Only reachable for a job cancelled through the Replicate endpoint.
        Phase::Canceled => (
            "failed",
            Some(VideoErrorBody {
                code: "canceled",
                message: "canceled",
            }),
        ),
    };
    let completed_at = view.completed_at.map(|at| at.timestamp());
    let body = VideoBody {
        id,
        object: "video",
        model: &job.request.model,
        status,
        progress: view.progress,
        created_at: job.created_at.timestamp(),
        completed_at,
        expires_at: (view.phase == Phase::Succeeded)
            .then(|| completed_at.map(|at| at + 3600))
            .flatten(),
        prompt: &job.request.prompt,
        size: job.request.size.as_deref().unwrap_or("720x1280"),
        seconds: job.request.clip_seconds.unwrap_or(4).to_string(),
        remixed_from_video_id: None,
        error,
    };
    serde_json::to_vec(&body).unwrap_or_default()
}

async fn create_video(State(state): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    state.submits.fetch_add(1, Ordering::Relaxed);
    if let Some(response) = guard(&state, &headers, OPENAI).await {
        return response;
    }
    let request = match parse_body(&body) {
        Ok(request) => request,
        Err(reason) => return error_response(OPENAI, StatusCode::BAD_REQUEST, &reason),
    };
    let Some(prompt) = request.get("prompt").and_then(|p| p.as_str()) else {
        return error_response(
            OPENAI,
            StatusCode::BAD_REQUEST,
            "missing required parameter: prompt",
        );
    };
    if let Some((status, message)) = state.submit_refusal(prompt) {
        return error_response(OPENAI, status, message);
    }
    let model = request
        .get("model")
        .and_then(|m| m.as_str())
        .unwrap_or("sora-2")
        .to_owned();
    let size = request
        .get("size")
        .and_then(|s| s.as_str())
        .map(str::to_owned);
    let clip_seconds = seconds_field(request.get("seconds"));
    let id = format!("video_{}", uuid::Uuid::new_v4().simple());
    let request = JobRequest {
        model,
        version: None,
        prompt: prompt.to_owned(),
        clip_seconds,
        size,
        external_id: None,
        image: None,
    };
    let id = state.create_job(id, request);
    if state.answer_lost(prompt).await {
        return error_response(
            OPENAI,
            StatusCode::SERVICE_UNAVAILABLE,
            "simulated lost answer",
        );
    }
    video_response(&state, &id)
}

async fn get_video(
    State(state): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    state.count_status_call(&id);
    if let Some(response) = guard(&state, &headers, OPENAI).await {
        return response;
    }
    video_response(&state, &id)
}

/// The `video` object of job `id` as it is now, or the protocol's 404.
fn video_response(state: &SimState, id: &str) -> Response {
    match state.render(id, |job, now| render_video(id, job, now)) {
        Some(body) => json_response(StatusCode::OK, body),
        None => video_not_found(id),
    }
}

fn video_not_found(id: &str) -> Response {
    error_response(
        OPENAI,
        StatusCode::NOT_FOUND,
        &format!("Video with id '{id}' not found."),
    )
}

async fn delete_video(
    State(state): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Some(response) = guard(&state, &headers, OPENAI).await {
        return response;
    }
    let removed = lock(state.shard(&id)).remove(&id);
    match removed {
        Some(_) => to_json(
            StatusCode::OK,
            &serde_json::json!({ "id": id, "object": "video.deleted", "deleted": true }),
        ),
        None => video_not_found(&id),
    }
}

async fn video_content(
    State(state): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Some(response) = guard(&state, &headers, OPENAI).await {
        return response;
    }
    file_response(&state, &id, OPENAI)
}
