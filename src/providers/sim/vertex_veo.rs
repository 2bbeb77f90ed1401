//! The simulated Google Veo on Vertex AI, under `/vertex_veo`:
//! `POST /vertex_veo/v1/projects/{p}/locations/{l}/publishers/{pub}/models/{m}:predictLongRunning`,
//! `POST …/models/{m}:fetchPredictOperation` (`{"operationName"}`), and an OAuth2 token endpoint
//! `POST /vertex_veo/token` (the JWT bearer grant).
//!
//! - auth: `Authorization: Bearer <token>` with a token this simulator issued and that has not
//!   expired, [`SIM_ACCESS_TOKEN`], or a key [`key_accepted`] takes; else 401;
//! - the token endpoint checks the form (`grant_type` is the JWT bearer grant, `assertion` an
//!   RS256 JWT whose claims have `aud` = this endpoint's URL, the cloud-platform `scope`, an
//!   `iss` and an `exp` in the future) but does **not** verify the signature (it has no public
//!   key); it answers `{"access_token":"sim-…","expires_in":3600,"token_type":"Bearer"}`, the
//!   token being an HMAC of its expiry so that no state is kept. OAuth errors are
//!   `{"error","error_description"}` with 400. No faults are injected there;
//! - operations are `{"name"}` while running (no `done`, as proto3 JSON omits false), then
//!   `done` with `response.videos[{gcsUri: "{storageUri}/{id}/sample_0.mp4", mimeType}]` when the
//!   submit gave a `storageUri`, else the bytes inline (`bytesBase64Encoded`), as Veo does;
//!   failures are `error: {code: 13, message}`, a job cancelled through another protocol
//!   `error: {code: 1}`;
//! - errors are Google's `{"error":{"code","message","status"}}`.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{LazyLock, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::header::AUTHORIZATION;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::post;
use axum::Router;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::http::{
    error_response, guard, header_after, json_response, key_accepted, parse_body, public_base,
    seconds_field, to_json, Protocol,
};
use super::state::{lock, Job, JobRequest, Phase, SimState, FAILURE_MESSAGE};
use super::Shared;
use crate::providers::{ProviderKind, ProviderSettings};

/// A token every simulator accepts, as if issued earlier: what [`provider_settings`] configures.
pub(super) const SIM_ACCESS_TOKEN: &str = "sim-vertex-access-token";

/// The lifetime of issued tokens, in seconds.
const TOKEN_LIFETIME_SECS: u64 = 3600;

const SCOPE: &str = "https://www.googleapis.com/auth/cloud-platform";
const JWT_BEARER_GRANT: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";

/// A few bytes standing in for an MP4 file, for inline answers.
const INLINE_MP4: &[u8] = b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom";

/// Job id → the `storageUri` its submit gave. Jobs have globally unique ids (UUIDs), so one
/// map serves every simulator in the process.
static STORAGE: LazyLock<Mutex<HashMap<String, String>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

/// Bearer tokens (issued, the fixed one, or the key); errors in Google's shape.
pub(super) const VERTEX: Protocol = Protocol {
    authorised: vertex_authorised,
    error_body: google_error,
};

/// Google's error body: `{"error": {"code", "message", "status"}}`.
pub(super) fn google_error(status: StatusCode, message: &str) -> serde_json::Value {
    let name = match status.as_u16() {
        400 => "INVALID_ARGUMENT",
        401 => "UNAUTHENTICATED",
        403 => "PERMISSION_DENIED",
        404 => "NOT_FOUND",
        409 => "ABORTED",
        429 => "RESOURCE_EXHAUSTED",
        501 => "UNIMPLEMENTED",
        503 => "UNAVAILABLE",
        504 => "DEADLINE_EXCEEDED",
        _ if status.is_server_error() => "INTERNAL",
        _ => "FAILED_PRECONDITION",
    };
    serde_json::json!({
        "error": { "code": status.as_u16(), "message": message, "status": name }
    })
}

fn vertex_authorised(state: &SimState, headers: &HeaderMap) -> bool {
    let Some(token) = header_after(headers, AUTHORIZATION.as_str(), "Bearer ") else {
        return false;
    };
    token == SIM_ACCESS_TOKEN || issued(state, token) || key_accepted(state, Some(token))
}

/// Settings for a provider of this kind served by the simulator at `base_url`.
pub(super) fn provider_settings(base_url: &str) -> ProviderSettings {
    ProviderSettings {
        project: Some("sim-project".to_owned()),
        location: Some("us-central1".to_owned()),
        access_token: Some(SIM_ACCESS_TOKEN.into()),
        storage_uri: Some("gs://sim-bucket/videos/".to_owned()),
        ..ProviderSettings::new(ProviderKind::VertexVeo, format!("{base_url}/vertex_veo"))
    }
}

pub(super) fn routes() -> Router<Shared> {
    Router::new()
        .route("/vertex_veo/token", post(token))
        .route("/vertex_veo/v1/{*rest}", post(model_method))
}

// ---------------------------------------------------------------------------------------------
// Tokens.

fn token_mac(state: &SimState, expires: u64) -> Option<String> {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(format!("vertex-sim-{}", state.addr).as_bytes()).ok()?;
    mac.update(expires.to_string().as_bytes());
    Some(hex::encode(mac.finalize().into_bytes()))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Whether `token` is one this simulator issued (`sim-{expiry}-{mac}`) and is still valid.
fn issued(state: &SimState, token: &str) -> bool {
    let Some((expires, mac)) = token
        .strip_prefix("sim-")
        .and_then(|rest| rest.split_once('-'))
    else {
        return false;
    };
    let Ok(expires) = expires.parse::<u64>() else {
        return false;
    };
    expires > unix_now() && token_mac(state, expires).is_some_and(|expected| expected == mac)
}

fn oauth_error(error: &str, description: &str) -> Response {
    to_json(
        StatusCode::BAD_REQUEST,
        &serde_json::json!({ "error": error, "error_description": description }),
    )
}

/// `POST /vertex_veo/token`: the JWT bearer grant (claims checked, signature not).
async fn token(State(state): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    let form: HashMap<String, String> = url::form_urlencoded::parse(&body).into_owned().collect();
    match form.get("grant_type").map(String::as_str) {
        Some(JWT_BEARER_GRANT) => {}
        Some(other) => {
            return oauth_error(
                "unsupported_grant_type",
                &format!("Invalid grant_type: {other}"),
            )
        }
        None => return oauth_error("invalid_request", "Missing required parameter: grant_type"),
    }
    let Some(assertion) = form.get("assertion") else {
        return oauth_error("invalid_request", "Missing required parameter: assertion");
    };
    let audience = format!("{}/vertex_veo/token", public_base(&state, &headers));
    if let Err(reason) = check_assertion(assertion, &audience) {
        return oauth_error("invalid_grant", &reason);
    }
    let expires = unix_now() + TOKEN_LIFETIME_SECS;
    let Some(mac) = token_mac(&state, expires) else {
        return error_response(VERTEX, StatusCode::INTERNAL_SERVER_ERROR, "cannot issue");
    };
    to_json(
        StatusCode::OK,
        &serde_json::json!({
            "access_token": format!("sim-{expires}-{mac}"),
            "expires_in": TOKEN_LIFETIME_SECS,
            "token_type": "Bearer",
        }),
    )
}

/// The JWT's header and claims, as Google's token endpoint wants them (the signature is not
/// checked).
fn check_assertion(assertion: &str, audience: &str) -> Result<(), String> {
    let mut parts = assertion.split('.');
    let (Some(header), Some(claims), Some(_signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("Invalid JWT: not three segments".to_owned());
    };
    let decode = |segment: &str| -> Result<serde_json::Value, String> {
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(segment)
            .map_err(|_| "Invalid JWT: a segment is not base64url".to_owned())?;
        serde_json::from_slice(&bytes).map_err(|_| "Invalid JWT: a segment is not JSON".to_owned())
    };
    let header = decode(header)?;
    if header.get("alg").and_then(|a| a.as_str()) != Some("RS256") {
        return Err("Invalid JWT: alg must be RS256".to_owned());
    }
    let claims = decode(claims)?;
    let text = |key: &str| claims.get(key).and_then(|v| v.as_str()).unwrap_or_default();
    if text("iss").is_empty() {
        return Err("Invalid JWT: no iss".to_owned());
    }
    if text("aud") != audience {
        return Err(format!(
            "Invalid JWT: aud must be {audience}, got \"{}\"",
            text("aud")
        ));
    }
    if !text("scope").split(' ').any(|scope| scope == SCOPE) {
        return Err(format!("Invalid JWT: scope must include {SCOPE}"));
    }
    let now = unix_now();
    let exp = claims.get("exp").and_then(serde_json::Value::as_u64);
    let iat = claims.get("iat").and_then(serde_json::Value::as_u64);
    match (iat, exp) {
        (Some(iat), Some(exp)) if exp > now && iat <= now + 60 && exp <= iat + 3600 => Ok(()),
        _ => Err("Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe. Check your iat and exp values in the JWT claim.".to_owned()),
    }
}

// ---------------------------------------------------------------------------------------------
// The model methods.

/// `{resource}:{verb}` where resource is `projects/*/locations/*/publishers/*/models/*`.
struct ModelMethod<'a> {
    resource: &'a str,
    model: &'a str,
    verb: &'a str,
}

fn model_method_of(rest: &str) -> Option<ModelMethod<'_>> {
    let (resource, verb) = rest.rsplit_once(':')?;
    let segments: Vec<&str> = resource.split('/').collect();
    match segments.as_slice() {
        ["projects", p, "locations", l, "publishers", publisher, "models", model]
            if [p, l, publisher, model].iter().all(|s| !s.is_empty()) =>
        {
            Some(ModelMethod {
                resource,
                model,
                verb,
            })
        }
        _ => None,
    }
}

async fn model_method(
    State(state): State<Shared>,
    Path(rest): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(method) = model_method_of(&rest) else {
        return error_response(
            VERTEX,
            StatusCode::NOT_FOUND,
            &format!("The requested URL /v1/{rest} was not found on this server."),
        );
    };
    match method.verb {
        "predictLongRunning" => predict_long_running(&state, &method, &headers, &body).await,
        "fetchPredictOperation" => fetch_predict_operation(&state, &method, &headers, &body).await,
        other => error_response(
            VERTEX,
            StatusCode::NOT_FOUND,
            &format!("Method {other} is not found for this model."),
        ),
    }
}

async fn predict_long_running(
    state: &SimState,
    method: &ModelMethod<'_>,
    headers: &HeaderMap,
    body: &[u8],
) -> Response {
    state.submits.fetch_add(1, Ordering::Relaxed);
    if let Some(response) = guard(state, headers, VERTEX).await {
        return response;
    }
    let request = match parse_body(body) {
        Ok(request) => request,
        Err(reason) => return error_response(VERTEX, StatusCode::BAD_REQUEST, &reason),
    };
    let Some(prompt) = request
        .pointer("/instances/0/prompt")
        .and_then(|p| p.as_str())
    else {
        return error_response(
            VERTEX,
            StatusCode::BAD_REQUEST,
            "instances[0].prompt is required for text-to-video",
        );
    };
    let parameters = request
        .get("parameters")
        .cloned()
        .unwrap_or_else(|| serde_json::json!({}));
    if let Some(count) = parameters.get("sampleCount") {
        if !count.as_u64().is_some_and(|n| (1..=4).contains(&n)) {
            return error_response(
                VERTEX,
                StatusCode::BAD_REQUEST,
                "sampleCount must be between 1 and 4",
            );
        }
    }
    let storage_uri = match parameters.get("storageUri") {
        None => None,
        Some(serde_json::Value::String(uri)) if uri.starts_with("gs://") && uri.len() > 5 => {
            Some(uri.clone())
        }
        Some(_) => {
            return error_response(
                VERTEX,
                StatusCode::BAD_REQUEST,
                "storageUri must be a Cloud Storage URI (gs://bucket/prefix)",
            )
        }
    };
    if let Some((status, message)) = state.submit_refusal(prompt) {
        return error_response(VERTEX, status, message);
    }
    let id = uuid::Uuid::new_v4().to_string();
    if let Some(uri) = storage_uri {
        lock(&STORAGE).insert(id.clone(), uri);
    }
    let job = JobRequest {
        model: method.model.to_owned(),
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
            VERTEX,
            StatusCode::SERVICE_UNAVAILABLE,
            "simulated lost answer",
        );
    }
    to_json(
        StatusCode::OK,
        &serde_json::json!({ "name": format!("{}/operations/{id}", method.resource) }),
    )
}

async fn fetch_predict_operation(
    state: &SimState,
    method: &ModelMethod<'_>,
    headers: &HeaderMap,
    body: &[u8],
) -> Response {
    let request = parse_body(body);
    let name = request
        .as_ref()
        .ok()
        .and_then(|r| r.get("operationName"))
        .and_then(|n| n.as_str())
        .map(str::to_owned);
    let prefix = format!("{}/operations/", method.resource);
    let id = name
        .as_deref()
        .and_then(|name| name.strip_prefix(&prefix))
        .filter(|id| !id.is_empty() && !id.contains('/'));
    state.count_status_call(id.unwrap_or_default());
    if let Some(response) = guard(state, headers, VERTEX).await {
        return response;
    }
    if let Err(reason) = request {
        return error_response(VERTEX, StatusCode::BAD_REQUEST, &reason);
    }
    let (Some(name), Some(id)) = (name.as_deref(), id) else {
        return error_response(
            VERTEX,
            StatusCode::BAD_REQUEST,
            &format!(
                "operationName must name an operation of {}",
                method.resource
            ),
        );
    };
    let storage = lock(&STORAGE).get(id).cloned();
    match state.render(id, |job, now| {
        render_operation(name, id, job, now, storage.as_deref())
    }) {
        Some(body) => json_response(StatusCode::OK, body),
        None => error_response(
            VERTEX,
            StatusCode::NOT_FOUND,
            &format!("Operation {name} not found."),
        ),
    }
}

fn render_operation(
    name: &str,
    id: &str,
    job: &Job,
    now: Instant,
    storage: Option<&str>,
) -> Vec<u8> {
    let view = job.view(now);
    let body = match view.phase {
        Phase::Queued | Phase::Running => serde_json::json!({ "name": name }),
        Phase::Succeeded => {
            let video = match storage {
                Some(prefix) => serde_json::json!({
                    "gcsUri": format!("{}/{id}/sample_0.mp4", prefix.trim_end_matches('/')),
                    "mimeType": "video/mp4",
                }),
                None => serde_json::json!({
                    "bytesBase64Encoded": base64::engine::general_purpose::STANDARD.encode(INLINE_MP4),
                    "mimeType": "video/mp4",
                }),
            };
            serde_json::json!({
                "name": name,
                "done": true,
                "response": {
                    "@type": "type.googleapis.com/cloud.ai.large_models.vision.GenerateVideoResponse",
                    "raiMediaFilteredCount": 0,
                    "videos": [video],
                },
            })
        }
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

    fn jwt(claims: &serde_json::Value) -> String {
        let encode = |v: &serde_json::Value| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
        };
        format!(
            "{}.{}.c2ln",
            encode(&serde_json::json!({"alg": "RS256", "typ": "JWT"})),
            encode(claims)
        )
    }

    #[test]
    fn assertions_are_checked_for_audience_scope_and_lifetime() {
        let aud = "http://127.0.0.1:1/vertex_veo/token";
        let now = unix_now();
        let good = serde_json::json!({"iss": "a@b", "scope": SCOPE, "aud": aud, "iat": now, "exp": now + 3600});
        assert_eq!(check_assertion(&jwt(&good), aud), Ok(()));
        let mut wrong_aud = good.clone();
        wrong_aud["aud"] = "https://oauth2.googleapis.com/token".into();
        assert!(check_assertion(&jwt(&wrong_aud), aud).is_err());
        let mut no_scope = good.clone();
        no_scope["scope"] = "https://www.googleapis.com/auth/drive".into();
        assert!(check_assertion(&jwt(&no_scope), aud).is_err());
        let mut expired = good.clone();
        expired["exp"] = (now - 1).into();
        assert!(check_assertion(&jwt(&expired), aud).is_err());
        assert!(check_assertion("not-a-jwt", aud).is_err());
    }

    #[test]
    fn model_methods_are_split_from_the_path() {
        let method = model_method_of(
            "projects/p/locations/us-central1/publishers/google/models/veo-3.1-generate-001:predictLongRunning",
        )
        .expect("method");
        assert_eq!(method.model, "veo-3.1-generate-001");
        assert_eq!(method.verb, "predictLongRunning");
        assert!(model_method_of("projects/p/models/m:predict").is_none());
    }
}
