//! The simulated MiniMax (Hailuo) V1 video generation API, under `/minimax`:
//! `POST /minimax/v1/video_generation`, `GET /minimax/v1/query/video_generation?task_id=…`,
//! `GET /minimax/v1/files/retrieve?file_id=…[&GroupId=…]`, and the `download_url` it hands out,
//! `GET /minimax/files/{file_id}.mp4` (a stand-in for MiniMax's CDN: no key needed).
//!
//! Like MiniMax, every answer carries `base_resp {status_code, status_msg}` and call-level
//! errors come as HTTP 200 with a non-zero code: a missing or wrong key is `1004`, a bad body or
//! unknown id `2013`. Prompt tags of this protocol: `[sensitive]` makes submit answer 200 with
//! `1026` (input sensitive), `[busy]` 200 with `1002` (rate limit), and `[sensitive_output]`
//! makes the finished task a `Fail` with `1027` (output sensitive). The shared tags (`[fail]`,
//! `[reject]`, …) and the injected faults (HTTP 500/429/hangs, through `guard`) apply as
//! everywhere; their error bodies are `base_resp` too.
//!
//! Statuses: `Preparing` for the first half of the queued time, `Queueing` for the second,
//! `Processing` while running, then `Success` with a `file_id` (and `video_width` /
//! `video_height` from the requested `resolution`) or `Fail`. There is no progress field and
//! no cancel endpoint, as in the real API.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use rand::Rng;
use serde::Serialize;

use super::http::{
    bearer_authorised, error_response, file_response, guard, json_response, parse_body,
    public_base, seconds_field, to_json, Protocol,
};
use super::state::{Job, JobRequest, Phase, FAILURE_MESSAGE};
use super::Shared;
use crate::providers::{ProviderKind, ProviderSettings};

/// A task's `file_id` is its `task_id` plus this, so a file leads back to its job without more
/// state (task ids stay below it).
const FILE_ID_OFFSET: u64 = 500_000_000_000_000;

/// Errors as `{"base_resp": {"status_code", "status_msg"}}`, the code following the HTTP status.
/// The handlers check the key themselves (MiniMax answers a bad key with HTTP 200 and `1004`),
/// so `guard` only injects the faults.
pub(super) const MINIMAX: Protocol = Protocol {
    authorised: |_, _| true,
    error_body: |status, message| base_resp_body(code_for(status), message),
};

/// The `base_resp.status_code` MiniMax's table gives for what an HTTP status means.
fn code_for(status: StatusCode) -> i64 {
    match status.as_u16() {
        429 => 1002,
        401 | 403 => 1004,
        400 | 404 | 409 | 422 => 2013,
        500 => 1024,
        _ => 1000,
    }
}

fn base_resp_body(code: i64, message: &str) -> serde_json::Value {
    serde_json::json!({ "base_resp": { "status_code": code, "status_msg": message } })
}

/// A call refused the MiniMax way: HTTP 200, the reason in `base_resp`.
fn refused(code: i64, message: &str) -> Response {
    to_json(StatusCode::OK, &base_resp_body(code, message))
}

/// MiniMax's answer to a request without an acceptable `Authorization: Bearer` key.
fn unauthorised() -> Response {
    refused(
        1004,
        "login fail: Please carry the API secret key in the 'Authorization' field of the request header",
    )
}

/// Settings for a provider of this kind served by the simulator at `base_url`.
pub(super) fn provider_settings(base_url: &str) -> ProviderSettings {
    ProviderSettings::new(ProviderKind::Minimax, format!("{base_url}/minimax"))
}

pub(super) fn routes() -> Router<Shared> {
    Router::new()
        .route("/minimax/v1/video_generation", post(create_task))
        .route("/minimax/v1/query/video_generation", get(query_task))
        .route("/minimax/v1/files/retrieve", get(retrieve_file))
        .route("/minimax/files/{file}", get(download))
}

#[derive(Serialize)]
struct BaseResp<'a> {
    status_code: i64,
    status_msg: &'a str,
}

const SUCCESS: BaseResp<'static> = BaseResp {
    status_code: 0,
    status_msg: "success",
};

#[derive(Serialize)]
struct QueryBody<'a> {
    task_id: &'a str,
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    file_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    video_width: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    video_height: Option<u32>,
    base_resp: BaseResp<'a>,
}

/// Width and height of a `resolution` such as `1080P` (16:9); `768P` when none was asked.
fn dimensions(resolution: Option<&str>) -> (u32, u32) {
    let height = resolution
        .and_then(|r| r.trim().strip_suffix(['P', 'p']))
        .and_then(|lines| lines.parse::<u32>().ok())
        .filter(|lines| (1..=10_000).contains(lines))
        .unwrap_or(768);
    ((height * 16).div_ceil(9), height)
}

fn file_id_of(task_id: &str) -> Option<String> {
    let id: u64 = task_id.parse().ok()?;
    id.checked_add(FILE_ID_OFFSET).map(|file| file.to_string())
}

fn task_id_of(file_id: &str) -> Option<String> {
    let file: u64 = file_id.trim().parse().ok()?;
    file.checked_sub(FILE_ID_OFFSET).map(|id| id.to_string())
}

fn render_query(id: &str, job: &Job, now: Instant) -> Vec<u8> {
    let view = job.view(now);
    let sensitive_output = job.request.prompt.contains("[sensitive_output]");
    let mut body = QueryBody {
        task_id: id,
        status: "Fail",
        file_id: None,
        video_width: None,
        video_height: None,
        base_resp: SUCCESS,
    };
    match view.phase {
        Phase::Queued => {
            // Still queued at twice the time elapsed: in the first half of the queued time.
            let elapsed = now.saturating_duration_since(job.created);
            let later = job.view(job.created + elapsed * 2);
            body.status = if later.phase == Phase::Queued {
                "Preparing"
            } else {
                "Queueing"
            };
        }
        Phase::Running => body.status = "Processing",
        Phase::Succeeded | Phase::Failed if sensitive_output => {
            body.base_resp = BaseResp {
                status_code: 1027,
                status_msg: "output new_sensitive",
            };
        }
        Phase::Succeeded => {
            let (width, height) = dimensions(job.request.size.as_deref());
            body.status = "Success";
            body.file_id = file_id_of(id);
            body.video_width = Some(width);
            body.video_height = Some(height);
        }
        Phase::Failed => {
            body.base_resp = BaseResp {
                status_code: 0,
                status_msg: FAILURE_MESSAGE,
            };
        }
        // Only reachable for a job cancelled through another protocol's endpoint.
        Phase::Canceled => {
            body.base_resp = BaseResp {
                status_code: 0,
                status_msg: "canceled",
            };
        }
    }
    serde_json::to_vec(&body).unwrap_or_default()
}

async fn create_task(State(state): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    state.submits.fetch_add(1, Ordering::Relaxed);
    if !bearer_authorised(&state, &headers) {
        return unauthorised();
    }
    if let Some(response) = guard(&state, &headers, MINIMAX).await {
        return response;
    }
    let request = match parse_body(&body) {
        Ok(request) => request,
        Err(reason) => return refused(2013, &format!("invalid params, {reason}")),
    };
    let Some(model) = request.get("model").and_then(|m| m.as_str()) else {
        return refused(2013, "invalid params, model is required");
    };
    let Some(prompt) = request.get("prompt").and_then(|p| p.as_str()) else {
        return refused(2013, "invalid params, prompt is required");
    };
    if prompt.contains("[sensitive]") {
        return refused(1026, "input new_sensitive");
    }
    if prompt.contains("[busy]") {
        return refused(1002, "rate limit, please retry later");
    }
    if let Some((status, message)) = state.submit_refusal(prompt) {
        return error_response(MINIMAX, status, message);
    }
    let request = JobRequest {
        model: model.to_owned(),
        version: None,
        prompt: prompt.to_owned(),
        clip_seconds: seconds_field(request.get("duration")).or(Some(6)),
        size: request
            .get("resolution")
            .and_then(|r| r.as_str())
            .map(str::to_owned),
        external_id: None,
        image: None,
    };
    let id = state.create_job(task_id(), request);
    if state.answer_lost(prompt).await {
        return error_response(
            MINIMAX,
            StatusCode::SERVICE_UNAVAILABLE,
            "simulated lost answer",
        );
    }
    to_json(
        StatusCode::OK,
        &serde_json::json!({ "task_id": id, "base_resp": SUCCESS }),
    )
}

async fn query_task(
    State(state): State<Shared>,
    Query(params): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let id = params
        .get("task_id")
        .map(|id| id.trim())
        .filter(|id| !id.is_empty());
    state.count_status_call(id.unwrap_or_default());
    if !bearer_authorised(&state, &headers) {
        return unauthorised();
    }
    if let Some(response) = guard(&state, &headers, MINIMAX).await {
        return response;
    }
    let Some(id) = id else {
        return refused(2013, "invalid params, task_id is required");
    };
    match state.render(id, |job, now| render_query(id, job, now)) {
        Some(body) => json_response(StatusCode::OK, body),
        None => refused(2013, "invalid params, invalid task_id"),
    }
}

#[derive(Serialize)]
struct FileBody<'a> {
    file: FileObject,
    base_resp: BaseResp<'a>,
}

#[derive(Serialize)]
struct FileObject {
    file_id: u64,
    bytes: u64,
    created_at: i64,
    filename: &'static str,
    purpose: &'static str,
    download_url: String,
}

/// The file object of a succeeded task, `None` while there is no video to give.
fn render_file(file_id: u64, job: &Job, now: Instant, base: &str) -> Option<Vec<u8>> {
    let view = job.view(now);
    if view.phase != Phase::Succeeded || job.request.prompt.contains("[sensitive_output]") {
        return None;
    }
    let body = FileBody {
        file: FileObject {
            file_id,
            bytes: 5_896_337,
            created_at: view.completed_at.unwrap_or(job.created_at).timestamp(),
            filename: "output.mp4",
            purpose: "video_generation",
            download_url: format!("{base}/minimax/files/{file_id}.mp4"),
        },
        base_resp: SUCCESS,
    };
    serde_json::to_vec(&body).ok()
}

async fn retrieve_file(
    State(state): State<Shared>,
    Query(params): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    if !bearer_authorised(&state, &headers) {
        return unauthorised();
    }
    if let Some(response) = guard(&state, &headers, MINIMAX).await {
        return response;
    }
    // `GroupId` is accepted and not needed, as in MiniMax's current API.
    let Some(file_id) = params
        .get("file_id")
        .and_then(|id| id.trim().parse::<u64>().ok())
    else {
        return refused(2013, "invalid params, file_id is required");
    };
    let base = public_base(&state, &headers);
    let rendered = task_id_of(&file_id.to_string()).and_then(|id| {
        state
            .render(&id, |job, now| {
                render_file(file_id, job, now, &base).unwrap_or_default()
            })
            .filter(|body| !body.is_empty())
    });
    match rendered {
        Some(body) => json_response(StatusCode::OK, body),
        None => refused(2013, "invalid params, file not found"),
    }
}

/// The `download_url`: public, like MiniMax's CDN links.
async fn download(State(state): State<Shared>, Path(file): Path<String>) -> Response {
    let file_id = file.strip_suffix(".mp4").unwrap_or(&file);
    let id = task_id_of(file_id).unwrap_or_default();
    file_response(&state, &id, MINIMAX)
}

/// 15 digits, like MiniMax's task ids (below [`FILE_ID_OFFSET`]).
fn task_id() -> String {
    rand::rng()
        .random_range(100_000_000_000_000..FILE_ID_OFFSET)
        .to_string()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::state::test_job;
    use super::*;

    #[test]
    fn file_ids_lead_back_to_their_task() {
        let id = task_id();
        assert_eq!(id.len(), 15);
        let file = file_id_of(&id).expect("numeric");
        assert_ne!(file, id);
        assert_eq!(task_id_of(&file).as_deref(), Some(id.as_str()));
        assert_eq!(task_id_of("12"), None);
        assert_eq!(task_id_of("x"), None);
    }

    #[test]
    fn resolutions_give_sixteen_by_nine_sizes() {
        assert_eq!(dimensions(Some("1080P")), (1920, 1080));
        assert_eq!(dimensions(Some("768P")), (1366, 768));
        assert_eq!(dimensions(Some("720p")), (1280, 720));
        assert_eq!(dimensions(None), (1366, 768));
    }

    #[test]
    fn a_queued_task_prepares_then_queues() {
        let job = test_job(1000, false);
        let status_at = |ms| {
            let body = render_query("1", &job, job.created + Duration::from_millis(ms));
            let value: serde_json::Value = serde_json::from_slice(&body).expect("json");
            value["status"].as_str().unwrap_or_default().to_owned()
        };
        assert_eq!(status_at(10), "Preparing");
        assert_eq!(status_at(80), "Queueing");
        assert_eq!(status_at(500), "Processing");
        assert_eq!(status_at(1000), "Success");
    }

    #[test]
    fn error_bodies_carry_the_matching_code() {
        let body = (MINIMAX.error_body)(StatusCode::TOO_MANY_REQUESTS, "slow down");
        assert_eq!(body["base_resp"]["status_code"], 1002);
        assert_eq!(body["base_resp"]["status_msg"], "slow down");
        assert_eq!(code_for(StatusCode::SERVICE_UNAVAILABLE), 1000);
        assert_eq!(code_for(StatusCode::BAD_REQUEST), 2013);
    }
}
