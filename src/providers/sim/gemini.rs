//! The simulated Veo on the Gemini API, under `/gemini`:
//! `POST /gemini/v1beta/models/{model}:predictLongRunning`,
//! `GET /gemini/v1beta/models/{model}/operations/{id}`, and the video file
//! `GET /gemini/v1beta/files/{id}:download?alt=media`.
//!
//! - auth: the key in `x-goog-api-key` ([`key_accepted`]), on every route including the file;
//! - operation names are `models/{model}/operations/{id}` (12 lowercase characters);
//! - operations are `{"name","done":false}` while running, then `done` with
//!   `response.generateVideoResponse.generatedSamples[{video: {uri}}]`, the URI being the file
//!   route above (which, like the real one, needs the key); failures are
//!   `error: {code: 13, message}`, a job cancelled through another protocol `error: {code: 1}`;
//! - `parameters.storageUri` is refused (400), as the Gemini API has no output bucket;
//! - errors are Google's `{"error":{"code","message","status"}}`.

use std::sync::atomic::Ordering;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::get;
use axum::Router;

use super::http::{
    error_response, file_response, guard, header_after, json_response, key_accepted, parse_body,
    public_base, seconds_field, to_json, Protocol,
};
use super::state::{Job, JobRequest, Phase, FAILURE_MESSAGE};
use super::vertex_veo::google_error;
use super::Shared;
use crate::providers::{ProviderKind, ProviderSettings};

/// The key in `x-goog-api-key`; errors in Google's shape.
pub(super) const GEMINI: Protocol = Protocol {
    authorised: |state, headers| key_accepted(state, header_after(headers, "x-goog-api-key", "")),
    error_body: google_error,
};

/// Settings for a provider of this kind served by the simulator at `base_url`.
pub(super) fn provider_settings(base_url: &str) -> ProviderSettings {
    ProviderSettings::new(ProviderKind::Gemini, format!("{base_url}/gemini"))
}

pub(super) fn routes() -> Router<Shared> {
    Router::new().route(
        "/gemini/v1beta/{*rest}",
        get(get_resource).post(post_method),
    )
}

fn not_found(rest: &str) -> Response {
    error_response(
        GEMINI,
        StatusCode::NOT_FOUND,
        &format!("The requested URL /v1beta/{rest} was not found on this server."),
    )
}

/// `POST /v1beta/models/{model}:predictLongRunning`.
async fn post_method(
    State(state): State<Shared>,
    Path(rest): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(model) = rest
        .strip_suffix(":predictLongRunning")
        .and_then(|resource| resource.strip_prefix("models/"))
        .filter(|model| !model.is_empty() && !model.contains('/'))
    else {
        return not_found(&rest);
    };
    state.submits.fetch_add(1, Ordering::Relaxed);
    if let Some(response) = guard(&state, &headers, GEMINI).await {
        return response;
    }
    let request = match parse_body(&body) {
        Ok(request) => request,
        Err(reason) => return error_response(GEMINI, StatusCode::BAD_REQUEST, &reason),
    };
    let Some(prompt) = request
        .pointer("/instances/0/prompt")
        .and_then(|p| p.as_str())
    else {
        return error_response(
            GEMINI,
            StatusCode::BAD_REQUEST,
            "instances[0].prompt is required",
        );
    };
    let parameters = request
        .get("parameters")
        .cloned()
        .unwrap_or_else(|| serde_json::json!({}));
    if parameters.get("storageUri").is_some() {
        return error_response(
            GEMINI,
            StatusCode::BAD_REQUEST,
            "storageUri is not supported by the Gemini API",
        );
    }
    if let Some((status, message)) = state.submit_refusal(prompt) {
        return error_response(GEMINI, status, message);
    }
    let id: String = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
    let job = JobRequest {
        model: model.to_owned(),
        version: None,
        prompt: prompt.to_owned(),
        clip_seconds: seconds_field(parameters.get("durationSeconds")),
        size: parameters
            .get("aspectRatio")
            .and_then(|a| a.as_str())
            .map(str::to_owned),
        external_id: None,
        image: None,
    };
    let id = state.create_job(id, job);
    if state.answer_lost(prompt).await {
        return error_response(
            GEMINI,
            StatusCode::SERVICE_UNAVAILABLE,
            "simulated lost answer",
        );
    }
    to_json(
        StatusCode::OK,
        &serde_json::json!({ "name": format!("models/{model}/operations/{id}") }),
    )
}

/// `GET /v1beta/models/{model}/operations/{id}` or `GET /v1beta/files/{id}:download`.
async fn get_resource(
    State(state): State<Shared>,
    Path(rest): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Some(file) = rest
        .strip_prefix("files/")
        .and_then(|file| file.strip_suffix(":download"))
    {
        if let Some(response) = guard(&state, &headers, GEMINI).await {
            return response;
        }
        return file_response(&state, file, GEMINI);
    }
    let segments: Vec<&str> = rest.split('/').collect();
    let ["models", model, "operations", id] = segments.as_slice() else {
        return not_found(&rest);
    };
    state.count_status_call(id);
    if let Some(response) = guard(&state, &headers, GEMINI).await {
        return response;
    }
    let name = format!("models/{model}/operations/{id}");
    let base = public_base(&state, &headers);
    // An operation belongs to the model it was created on: another model's is not found.
    let rendered = state
        .render(id, |job, now| {
            if job.request.model == *model {
                render_operation(&name, id, job, now, &base)
            } else {
                Vec::new()
            }
        })
        .filter(|body| !body.is_empty());
    match rendered {
        Some(body) => json_response(StatusCode::OK, body),
        None => error_response(
            GEMINI,
            StatusCode::NOT_FOUND,
            &format!("Operation {name} not found."),
        ),
    }
}

fn render_operation(name: &str, id: &str, job: &Job, now: Instant, base: &str) -> Vec<u8> {
    let view = job.view(now);
    let body = match view.phase {
        Phase::Queued | Phase::Running => serde_json::json!({ "name": name, "done": false }),
        Phase::Succeeded => serde_json::json!({
            "name": name,
            "done": true,
            "response": {
                "@type": "type.googleapis.com/google.ai.generativelanguage.v1beta.PredictLongRunningResponse",
                "generateVideoResponse": {
                    "generatedSamples": [{
                        "video": { "uri": format!("{base}/gemini/v1beta/files/{id}:download?alt=media") }
                    }]
                }
            }
        }),
        Phase::Failed => serde_json::json!({
            "name": name,
            "done": true,
            "error": { "code": 13, "message": FAILURE_MESSAGE },
        }),
        // Only reachable for a job cancelled through another protocol's endpoint.
        Phase::Canceled => serde_json::json!({
            "name": name,
            "done": true,
            "error": { "code": 1, "message": "Operation cancelled." },
        }),
    };
    serde_json::to_vec(&body).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_operations_say_not_done() {
        let state = super::super::state::SimState::new(
            super::super::SimSettings::default(),
            "127.0.0.1:1".parse().expect("addr"),
            tokio_util::sync::CancellationToken::new(),
        );
        let id = state.create_job(
            "abc".to_owned(),
            JobRequest {
                model: "veo".to_owned(),
                version: None,
                prompt: "p [duration=60000]".to_owned(),
                clip_seconds: None,
                size: None,
                external_id: None,
                image: None,
            },
        );
        let body = state
            .render(&id, |job, now| {
                render_operation("models/veo/operations/abc", &id, job, now, "http://x")
            })
            .expect("job");
        let value: serde_json::Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(value["done"], false);
    }
}
