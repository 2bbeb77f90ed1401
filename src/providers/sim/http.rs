//! What the simulated protocols share over HTTP: authentication and injected faults ([`guard`])
//! through each protocol's [`Protocol`], JSON bodies, and the finished file.

use std::time::{Duration, Instant};

use axum::http::header::{AUTHORIZATION, CONTENT_TYPE, HOST, RETRY_AFTER};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::state::{lock, roll, Phase, SimState};

/// What tells one simulated protocol's requests apart: how a caller authenticates, and the shape
/// of an error body. Each protocol file defines its own as a `const`.
#[derive(Clone, Copy)]
pub(super) struct Protocol {
    /// Whether the request carries this protocol's credentials (see [`key_accepted`]).
    pub(super) authorised: fn(&SimState, &HeaderMap) -> bool,
    /// The protocol's error body for a status and a message.
    pub(super) error_body: fn(StatusCode, &str) -> serde_json::Value,
}

/// Whether `presented` (the credential a request carried, already stripped of its scheme) is
/// acceptable: the exact key when [`super::SimSettings::api_key`] is set, else any non-empty one.
pub(super) fn key_accepted(state: &SimState, presented: Option<&str>) -> bool {
    match (
        presented.map(str::trim).filter(|k| !k.is_empty()),
        &state.settings.api_key,
    ) {
        (None, _) => false,
        (Some(_), None) => true,
        (Some(key), Some(expected)) => key == expected,
    }
}

/// The value of header `name` after `prefix` (e.g. `Authorization`, `Bearer `), if present.
pub(super) fn header_after<'h>(
    headers: &'h HeaderMap,
    name: &str,
    prefix: &str,
) -> Option<&'h str> {
    headers
        .get(name)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix(prefix))
}

/// `Authorization: Bearer <key>`, the scheme most protocols use.
pub(super) fn bearer_authorised(state: &SimState, headers: &HeaderMap) -> bool {
    key_accepted(
        state,
        header_after(headers, AUTHORIZATION.as_str(), "Bearer "),
    )
}

pub(super) fn json_response(status: StatusCode, body: Vec<u8>) -> Response {
    (
        status,
        [(CONTENT_TYPE, HeaderValue::from_static("application/json"))],
        body,
    )
        .into_response()
}

pub(super) fn to_json<T: Serialize>(status: StatusCode, value: &T) -> Response {
    match serde_json::to_vec(value) {
        Ok(body) => json_response(status, body),
        Err(error) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot serialise response: {error}"),
        )
            .into_response(),
    }
}

/// An error in the protocol's own shape.
pub(super) fn error_response(protocol: Protocol, status: StatusCode, message: &str) -> Response {
    to_json(status, &(protocol.error_body)(status, message))
}

/// Authentication and injected faults, common to every protocol request. `Some` is the response
/// to send instead of serving the request.
pub(super) async fn guard(
    state: &SimState,
    headers: &HeaderMap,
    protocol: Protocol,
) -> Option<Response> {
    let authorised = (protocol.authorised)(state, headers);
    if !authorised {
        return Some(error_response(
            protocol,
            StatusCode::UNAUTHORIZED,
            "missing or invalid credentials",
        ));
    }
    let faults = lock(&state.faults).clone();
    if faults.latency_ms > 0 {
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(faults.latency_ms)) => {}
            () = state.token.cancelled() => {
                return Some(error_response(protocol, StatusCode::SERVICE_UNAVAILABLE, "shutting down"));
            }
        }
    }
    if roll(faults.hang_rate) {
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(60)) => {}
            () = state.token.cancelled() => {}
        }
        return Some(error_response(
            protocol,
            StatusCode::SERVICE_UNAVAILABLE,
            "simulated hang",
        ));
    }
    if roll(faults.error_rate) {
        return Some(error_response(
            protocol,
            StatusCode::INTERNAL_SERVER_ERROR,
            "simulated server error",
        ));
    }
    if roll(faults.forbidden_rate) {
        return Some(error_response(
            protocol,
            StatusCode::FORBIDDEN,
            "simulated forbidden: this key may not use the resource",
        ));
    }
    if roll(faults.rate_limit_rate) {
        let after = faults.retry_after.as_deref().unwrap_or("1");
        let mut response = error_response(
            protocol,
            StatusCode::TOO_MANY_REQUESTS,
            &format!("simulated rate limit: retry after {after}"),
        );
        let value = HeaderValue::from_str(after).unwrap_or(HeaderValue::from_static("1"));
        response.headers_mut().insert(RETRY_AFTER, value);
        return Some(response);
    }
    None
}

/// `http://host` as the client addressed us, for URLs in responses.
pub(super) fn public_base(state: &SimState, headers: &HeaderMap) -> String {
    match headers.get(HOST).and_then(|host| host.to_str().ok()) {
        Some(host) => format!("http://{host}"),
        None => format!("http://{}", state.addr),
    }
}

/// The request body as a JSON object, or why not.
pub(super) fn parse_body(body: &[u8]) -> Result<serde_json::Value, String> {
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(value) if value.is_object() => Ok(value),
        Ok(_) => Err("the request body must be a JSON object".to_owned()),
        Err(error) => Err(format!("the request body is not valid JSON: {error}")),
    }
}

/// A whole number of seconds given as a string (`"4"`, the OpenAI form) or a number.
pub(super) fn seconds_field(value: Option<&serde_json::Value>) -> Option<u32> {
    match value? {
        serde_json::Value::String(s) => s.trim().parse().ok(),
        serde_json::Value::Number(n) => n.as_u64().and_then(|n| u32::try_from(n).ok()),
        _ => None,
    }
}

/// A few bytes standing in for an MP4 file (an `ftyp` box).
const FAKE_MP4: &[u8] = b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom";

/// The finished file of job `id`: 404 when there is no such job, 409 until it has succeeded.
pub(super) fn file_response(state: &SimState, id: &str, protocol: Protocol) -> Response {
    let shard = lock(state.shard(id));
    let Some(job) = shard.get(id) else {
        return error_response(protocol, StatusCode::NOT_FOUND, "no such video");
    };
    if job.view(Instant::now()).phase != Phase::Succeeded {
        return error_response(protocol, StatusCode::CONFLICT, "the video is not ready");
    }
    (
        StatusCode::OK,
        [(CONTENT_TYPE, HeaderValue::from_static("video/mp4"))],
        FAKE_MP4,
    )
        .into_response()
}
