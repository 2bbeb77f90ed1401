//! The simulated Replicate predictions API: `POST /v1/predictions`,
//! `POST /v1/models/{owner}/{name}/predictions`, `GET /v1/predictions/{id}`,
//! `POST /v1/predictions/{id}/cancel`, and the output files under `/sim/files/`.

use std::sync::atomic::Ordering;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use chrono::{DateTime, SecondsFormat, Utc};
use rand::Rng;
use serde::Serialize;

use super::http::{
    bearer_authorised, error_response, file_response, guard, json_response, parse_body,
    public_base, seconds_field, Protocol,
};
use super::state::{lock, Job, JobRequest, Phase, SimState, View, FAILURE_MESSAGE};
use super::Shared;
use crate::providers::{ProviderKind, ProviderSettings};

/// Bearer keys; errors as problem details `{"title", "detail", "status"}`.
pub(super) const REPLICATE: Protocol = Protocol {
    authorised: bearer_authorised,
    error_body: |status, message| {
        serde_json::json!({
            "title": status.canonical_reason().unwrap_or("Error"),
            "detail": message,
            "status": status.as_u16(),
        })
    },
};

/// Settings for a provider of this kind served by the simulator at `base_url`.
pub(super) fn provider_settings(base_url: &str) -> ProviderSettings {
    ProviderSettings::new(ProviderKind::Replicate, base_url)
}

pub(super) fn routes() -> Router<Shared> {
    Router::new()
        .route("/v1/predictions", post(create))
        .route(
            "/v1/models/{owner}/{name}/predictions",
            post(create_for_model),
        )
        .route("/v1/predictions/{id}", get(get_prediction))
        .route("/v1/predictions/{id}/cancel", post(cancel_prediction))
        .route("/sim/files/{file}", get(output_file))
}

#[derive(Serialize)]
struct PredictionBody<'a> {
    id: &'a str,
    model: &'a str,
    version: Option<&'a str>,
    input: PredictionInput<'a>,
    logs: String,
    output: Option<String>,
    data_removed: bool,
    error: Option<&'static str>,
    status: &'static str,
    created_at: String,
    started_at: Option<String>,
    completed_at: Option<String>,
    metrics: Option<PredictionMetrics>,
    urls: PredictionUrls,
}

#[derive(Serialize)]
struct PredictionInput<'a> {
    prompt: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    duration: Option<u32>,
}

#[derive(Serialize)]
struct PredictionMetrics {
    predict_time: f64,
    total_time: f64,
}

#[derive(Serialize)]
struct PredictionUrls {
    get: String,
    cancel: String,
    web: String,
}

fn timestamp(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// tqdm-like logs: a line per quarter passed, then the current percentage last, as a model's
/// progress bar would leave them.
fn prediction_logs(view: &View) -> String {
    let bar = |p: u8| {
        let filled = usize::from(p / 10);
        format!(
            "{p:>3}%|{}{}| {p}/100\n",
            "█".repeat(filled),
            " ".repeat(10 - filled)
        )
    };
    let mut logs = String::from("Starting video generation\n");
    if view.phase == Phase::Queued {
        return logs;
    }
    for quarter in [0_u8, 25, 50, 75] {
        if quarter < view.progress {
            logs.push_str(&bar(quarter));
        }
    }
    logs.push_str(&bar(view.progress));
    match view.phase {
        Phase::Succeeded => logs.push_str("Video saved\n"),
        Phase::Failed => {
            logs.push_str("Error: ");
            logs.push_str(FAILURE_MESSAGE);
            logs.push('\n');
        }
        Phase::Canceled => logs.push_str("Prediction canceled\n"),
        Phase::Queued | Phase::Running => {}
    }
    logs
}

fn render_prediction(id: &str, job: &Job, now: Instant, base: &str) -> Vec<u8> {
    let view = job.view(now);
    let status = match view.phase {
        Phase::Queued => "starting",
        Phase::Running => "processing",
        Phase::Succeeded => "succeeded",
        Phase::Failed => "failed",
        Phase::Canceled => "canceled",
    };
    let body = PredictionBody {
        id,
        model: job
            .request
            .model
            .split_once(':')
            .map_or(job.request.model.as_str(), |(model, _)| model),
        version: job.request.version.as_deref(),
        input: PredictionInput {
            prompt: &job.request.prompt,
            duration: job.request.clip_seconds,
        },
        logs: prediction_logs(&view),
        output: (view.phase == Phase::Succeeded).then(|| format!("{base}/sim/files/{id}.mp4")),
        data_removed: false,
        error: (view.phase == Phase::Failed).then_some(FAILURE_MESSAGE),
        status,
        created_at: timestamp(job.created_at),
        started_at: view.started_at.map(timestamp),
        completed_at: view.completed_at.map(timestamp),
        metrics: view.phase.is_terminal().then_some(PredictionMetrics {
            predict_time: view.predict_time,
            total_time: view.total_time,
        }),
        urls: PredictionUrls {
            get: format!("{base}/v1/predictions/{id}"),
            cancel: format!("{base}/v1/predictions/{id}/cancel"),
            web: format!("{base}/p/{id}"),
        },
    };
    serde_json::to_vec(&body).unwrap_or_default()
}

async fn create(State(state): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    create_prediction(&state, &headers, &body, None).await
}

async fn create_for_model(
    State(state): State<Shared>,
    Path((owner, name)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    create_prediction(&state, &headers, &body, Some(format!("{owner}/{name}"))).await
}

async fn create_prediction(
    state: &SimState,
    headers: &HeaderMap,
    body: &[u8],
    path_model: Option<String>,
) -> Response {
    state.submits.fetch_add(1, Ordering::Relaxed);
    if let Some(response) = guard(state, headers, REPLICATE).await {
        return response;
    }
    let request = match parse_body(body) {
        Ok(request) => request,
        Err(reason) => return error_response(REPLICATE, StatusCode::BAD_REQUEST, &reason),
    };
    let version = request
        .get("version")
        .and_then(|v| v.as_str())
        .map(str::to_owned);
    let model = path_model
        .or_else(|| {
            request
                .get("model")
                .and_then(|m| m.as_str())
                .map(str::to_owned)
        })
        .or_else(|| version.clone());
    let Some(model) = model else {
        return error_response(
            REPLICATE,
            StatusCode::UNPROCESSABLE_ENTITY,
            "either version or model is required",
        );
    };
    let input = request.get("input");
    let Some(prompt) = input.and_then(|i| i.get("prompt")).and_then(|p| p.as_str()) else {
        return error_response(
            REPLICATE,
            StatusCode::UNPROCESSABLE_ENTITY,
            "input.prompt is required",
        );
    };
    if let Some((status, message)) = state.submit_refusal(prompt) {
        return error_response(REPLICATE, status, message);
    }
    let request = JobRequest {
        model,
        version,
        prompt: prompt.to_owned(),
        clip_seconds: seconds_field(input.and_then(|i| i.get("duration"))),
        size: None,
        external_id: None,
        image: None,
    };
    let id = state.create_job(replicate_id(), request);
    if state.answer_lost(prompt).await {
        return error_response(
            REPLICATE,
            StatusCode::SERVICE_UNAVAILABLE,
            "simulated lost answer",
        );
    }
    prediction_response(state, headers, &id, StatusCode::CREATED)
}

/// The prediction object of job `id` as it is now, or the protocol's 404.
fn prediction_response(
    state: &SimState,
    headers: &HeaderMap,
    id: &str,
    status: StatusCode,
) -> Response {
    let base = public_base(state, headers);
    match state.render(id, |job, now| render_prediction(id, job, now, &base)) {
        Some(body) => json_response(status, body),
        None => prediction_not_found(),
    }
}

fn prediction_not_found() -> Response {
    error_response(REPLICATE, StatusCode::NOT_FOUND, "Not found.")
}

async fn get_prediction(
    State(state): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    state.count_status_call(&id);
    if let Some(response) = guard(&state, &headers, REPLICATE).await {
        return response;
    }
    prediction_response(&state, &headers, &id, StatusCode::OK)
}

async fn cancel_prediction(
    State(state): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Some(response) = guard(&state, &headers, REPLICATE).await {
        return response;
    }
    let base = public_base(&state, &headers);
    let now = Instant::now();
    let mut shard = lock(state.shard(&id));
    let Some(job) = shard.get_mut(&id) else {
        return prediction_not_found();
    };
    // Like Replicate: cancelling a finished prediction changes nothing and still answers 200.
    if !job.view(now).phase.is_terminal() {
        job.cancelled_after = Some(now.saturating_duration_since(job.created));
    }
    json_response(StatusCode::OK, render_prediction(&id, job, now, &base))
}

/// Replicate-style output: a public URL, no key needed.
async fn output_file(State(state): State<Shared>, Path(file): Path<String>) -> Response {
    let id = file.strip_suffix(".mp4").unwrap_or(&file);
    file_response(&state, id, REPLICATE)
}

/// 26 characters of base32, like Replicate's prediction ids.
fn replicate_id() -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz234567";
    let mut rng = rand::rng();
    (0..26)
        .map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]))
        .collect()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::state::test_job;
    use super::*;

    #[test]
    fn replicate_ids_look_like_replicates() {
        let id = replicate_id();
        assert_eq!(id.len(), 26);
        assert!(id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || (b'2'..=b'7').contains(&b)));
    }

    #[test]
    fn running_logs_end_with_the_current_percentage() {
        let job = test_job(1000, false);
        let logs = prediction_logs(&job.view(job.created + Duration::from_millis(630)));
        assert_eq!(
            crate::providers::replicate::last_log_percentage(&logs),
            Some(63),
            "{logs}"
        );
    }
}
