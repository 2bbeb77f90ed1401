//! The simulated Luma Dream Machine API, under `/luma` (standing for
//! `https://api.lumalabs.ai/dream-machine/v1`): `POST /luma/generations/video` (201 with the
//! generation), `GET /luma/generations/{id}`, `DELETE /luma/generations/{id}` (204), and the
//! finished files (public, like Luma's CDN) at `GET /luma/files/{id}.mp4`. Bearer keys; errors as
//! `{"detail": "..."}`.

use std::sync::atomic::Ordering;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;

use super::http::{
    bearer_authorised, error_response, file_response, guard, json_response, parse_body,
    public_base, Protocol,
};
use super::state::{lock, Job, JobRequest, Phase, SimState, FAILURE_MESSAGE};
use super::Shared;
use crate::providers::{ProviderKind, ProviderSettings};

/// Bearer keys; errors as `{"detail"}`.
pub(super) const LUMA: Protocol = Protocol {
    authorised: bearer_authorised,
    error_body: |status, message| {
        let message = if status == StatusCode::UNAUTHORIZED {
            "Invalid API key is provided"
        } else {
            message
        };
        serde_json::json!({ "detail": message })
    },
};

const ASPECT_RATIOS: [&str; 7] = ["1:1", "16:9", "9:16", "4:3", "3:4", "21:9", "9:21"];
const RESOLUTIONS: [&str; 4] = ["540p", "720p", "1080p", "4k"];

/// Settings for a provider of this kind served by the simulator at `base_url`.
pub(super) fn provider_settings(base_url: &str) -> ProviderSettings {
    ProviderSettings::new(ProviderKind::Luma, format!("{base_url}/luma"))
}

pub(super) fn routes() -> Router<Shared> {
    Router::new()
        .route("/luma/generations/video", post(create_generation))
        .route(
            "/luma/generations/{id}",
            get(get_generation).delete(delete_generation),
        )
        .route("/luma/files/{file}", get(video_file))
}

#[derive(Serialize)]
struct GenerationBody<'a> {
    id: &'a str,
    generation_type: &'static str,
    state: &'static str,
    failure_reason: Option<&'static str>,
    created_at: String,
    assets: AssetsBody,
    model: &'a str,
    request: RequestBody<'a>,
}

#[derive(Serialize)]
struct AssetsBody {
    #[serde(skip_serializing_if = "Option::is_none")]
    video: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    image: Option<String>,
}

#[derive(Serialize)]
struct RequestBody<'a> {
    generation_type: &'static str,
    model: &'a str,
    prompt: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    aspect_ratio: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    duration: Option<String>,
    #[serde(rename = "loop")]
    looped: bool,
}

fn timestamp(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Micros, true)
}

fn render_generation(id: &str, job: &Job, now: Instant, base: &str) -> Vec<u8> {
    let view = job.view(now);
    let (state, failure_reason) = match view.phase {
        Phase::Queued => ("queued", None),
        Phase::Running => ("dreaming", None),
        Phase::Succeeded => ("completed", None),
        Phase::Failed => ("failed", Some(FAILURE_MESSAGE)),
        // Luma has no cancel (a delete removes the generation); not reachable here.
        Phase::Canceled => ("failed", Some("canceled")),
    };
    let done = view.phase == Phase::Succeeded;
    let body = GenerationBody {
        id,
        generation_type: "video",
        state,
        failure_reason,
        created_at: timestamp(job.created_at),
        assets: AssetsBody {
            video: done.then(|| format!("{base}/luma/files/{id}.mp4")),
            image: None,
        },
        model: &job.request.model,
        request: RequestBody {
            generation_type: "video",
            model: &job.request.model,
            prompt: &job.request.prompt,
            aspect_ratio: job.request.size.as_deref(),
            duration: job.request.clip_seconds.map(|s| format!("{s}s")),
            looped: false,
        },
    };
    serde_json::to_vec(&body).unwrap_or_default()
}

/// `"5s"` → 5.
fn duration_seconds(value: &serde_json::Value) -> Option<u32> {
    value.as_str()?.strip_suffix('s')?.parse().ok()
}

async fn create_generation(
    State(state): State<Shared>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    state.submits.fetch_add(1, Ordering::Relaxed);
    if let Some(response) = guard(&state, &headers, LUMA).await {
        return response;
    }
    let bad = |message: &str| error_response(LUMA, StatusCode::BAD_REQUEST, message);
    let request = match parse_body(&body) {
        Ok(request) => request,
        Err(reason) => return bad(&reason),
    };
    let Some(model) = request.get("model").and_then(|m| m.as_str()) else {
        return bad("model is required");
    };
    // Luma's documented request errors.
    let Some(prompt) = request.get("prompt").and_then(|p| p.as_str()) else {
        return bad("Prompt is required");
    };
    if prompt.chars().count() < 3 {
        return bad("Prompt is too short, minimum length is 3 characters");
    }
    if prompt.chars().count() > 5000 {
        return bad("Prompt is too long, maximum length is 5000 characters");
    }
    let clip_seconds = match request.get("duration") {
        None => None,
        Some(value) => match duration_seconds(value) {
            Some(seconds) => Some(seconds),
            None => return bad(&format!("Invalid duration: {value}")),
        },
    };
    let aspect_ratio = match request.get("aspect_ratio") {
        None => None,
        Some(value) => match value.as_str().filter(|r| ASPECT_RATIOS.contains(r)) {
            Some(ratio) => Some(ratio.to_owned()),
            None => return bad(&format!("Invalid aspect ratio: {value}")),
        },
    };
    if let Some(value) = request.get("resolution") {
        if !value.as_str().is_some_and(|r| RESOLUTIONS.contains(&r)) {
            return bad(&format!("Invalid resolution: {value}"));
        }
    }
    if let Some((status, message)) = state.submit_refusal(prompt) {
        return error_response(LUMA, status, message);
    }
    let job = JobRequest {
        model: model.to_owned(),
        version: None,
        prompt: prompt.to_owned(),
        clip_seconds,
        size: aspect_ratio,
        external_id: None,
        image: None,
    };
    let id = state.create_job(uuid::Uuid::new_v4().to_string(), job);
    if state.answer_lost(prompt).await {
        return error_response(
            LUMA,
            StatusCode::SERVICE_UNAVAILABLE,
            "simulated lost answer",
        );
    }
    generation_response(&state, &headers, &id, StatusCode::CREATED)
}

/// The generation object of job `id` as it is now, or the protocol's 404.
fn generation_response(
    state: &SimState,
    headers: &HeaderMap,
    id: &str,
    status: StatusCode,
) -> Response {
    let base = public_base(state, headers);
    match state.render(id, |job, now| render_generation(id, job, now, &base)) {
        Some(body) => json_response(status, body),
        None => generation_not_found(),
    }
}

fn generation_not_found() -> Response {
    error_response(LUMA, StatusCode::NOT_FOUND, "Generation not found")
}

async fn get_generation(
    State(state): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    state.count_status_call(&id);
    if let Some(response) = guard(&state, &headers, LUMA).await {
        return response;
    }
    generation_response(&state, &headers, &id, StatusCode::OK)
}

async fn delete_generation(
    State(state): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Some(response) = guard(&state, &headers, LUMA).await {
        return response;
    }
    let removed = lock(state.shard(&id)).remove(&id);
    match removed {
        Some(_) => StatusCode::NO_CONTENT.into_response(),
        None => generation_not_found(),
    }
}

/// Luma's assets are public CDN links: no authentication.
async fn video_file(State(state): State<Shared>, Path(file): Path<String>) -> Response {
    let id = file.strip_suffix(".mp4").unwrap_or(&file);
    file_response(&state, id, LUMA)
}
