//! The `vertex_veo` adapter against fixtures from Google's documentation, stub servers (the
//! Vertex API, and an OAuth2 token endpoint that verifies the JWT's RS256 signature with the
//! test key's public half), and the simulator.
//!
//! Fixture sources (`fixtures/vertex_veo/`):
//! - `operation_created.json`, `operation_succeeded.json`: the REST samples of "Generate videos
//!   with Veo from text" (docs.cloud.google.com, Vertex AI / Gemini Enterprise Agent Platform),
//!   with PROJECT_ID, MODEL_ID, BUCKET_NAME and TIMESTAMPED_FOLDER filled in;
//! - `operation_running.json`: the same operation before it is done (proto3 JSON omits
//!   `done: false`; the docs show no running sample);
//! - `operation_inline.json`: the docs' "If not provided, video bytes are returned in the
//!   response", in the field names of the google-genai SDK's `_Video_from_vertex`
//!   (`bytesBase64Encoded`, `mimeType`);
//! - `operation_filtered.json`: `raiMediaFilteredCount`/`raiMediaFilteredReasons` as the SDK's
//!   `_GenerateVideosResponse_from_vertex` reads them, with a reason worded like Veo's;
//! - `operation_failed.json`: an operation `error` (`google.rpc.Status`), message adapted;
//! - `test_only_service_account.json`: a TEST-ONLY key made with `openssl genpkey -algorithm RSA
//!   -pkeyopt rsa_keygen_bits:2048`, in the layout of a Google service-account key file;
//!   `test_only_service_account_key.pub.pem` is its public half.

use std::sync::atomic::{AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;

use axum::body::Bytes;
use axum::http::{Method, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use video_orchestrator::providers::vertex_veo;

use super::*;

const CREATED: &[u8] = include_bytes!("fixtures/vertex_veo/operation_created.json");
const RUNNING: &[u8] = include_bytes!("fixtures/vertex_veo/operation_running.json");
const SUCCEEDED: &[u8] = include_bytes!("fixtures/vertex_veo/operation_succeeded.json");
const INLINE: &[u8] = include_bytes!("fixtures/vertex_veo/operation_inline.json");
const FILTERED: &[u8] = include_bytes!("fixtures/vertex_veo/operation_filtered.json");
const FAILED: &[u8] = include_bytes!("fixtures/vertex_veo/operation_failed.json");
const KEY_FILE: &str = include_str!("fixtures/vertex_veo/test_only_service_account.json");
const PUBLIC_KEY: &[u8] =
    include_bytes!("fixtures/vertex_veo/test_only_service_account_key.pub.pem");

const OPERATION: &str = "projects/my-project/locations/us-central1/publishers/google/models/veo-3.1-generate-001/operations/a1b07c8e-7b5a-4aba-bb34-3e1ccb8afcc8";
const MODEL: &str = "veo-3.1-generate-001";
const TOKEN: &str = "ya29.test-access-token";
const CLIENT_EMAIL: &str = "veo-tests@test-only-project.iam.gserviceaccount.com";

fn vertex_settings(base_url: &str) -> ProviderSettings {
    ProviderSettings {
        project: Some("my-project".to_owned()),
        location: Some("us-central1".to_owned()),
        access_token: Some(TOKEN.into()),
        storage_uri: Some("gs://my-bucket/veo/".to_owned()),
        ..settings(ProviderKind::VertexVeo, base_url)
    }
}

fn veo_request(prompt: &str) -> SubmitRequest {
    SubmitRequest {
        model: MODEL.to_owned(),
        ..request(prompt)
    }
}

fn task(id: &str) -> ProviderTask {
    ProviderTask { id: id.to_owned() }
}

fn json(body: &'static [u8]) -> Response {
    ([("content-type", "application/json")], body).into_response()
}

#[test]
fn documented_operations_parse() {
    let running = vertex_veo::parse_operation(RUNNING, "veo").expect("running");
    assert_eq!(
        running,
        ProviderStatus {
            state: ProviderState::InProgress,
            progress: None,
            video_url: None,
            video_url_expires_at: None,
            video_seconds: None,
            error: None,
        }
    );
    let done = vertex_veo::parse_operation(SUCCEEDED, "veo").expect("succeeded");
    assert_eq!(
        done,
        ProviderStatus {
            state: ProviderState::Succeeded,
            progress: Some(100),
            video_url: Some("gs://my-bucket/veo/17330500000000/sample_0.mp4".to_owned()),
            video_url_expires_at: None,
            video_seconds: None,
            error: None,
        }
    );
    let failed = vertex_veo::parse_operation(FAILED, "veo").expect("failed");
    assert_eq!(failed.state, ProviderState::Failed);
    assert_eq!(
        failed.error.as_deref(),
        Some("The duration 12 is not supported. Supported durations are [4, 6, 8].")
    );
    assert_eq!(failed.video_url, None);

    let inline = vertex_veo::parse_operation(INLINE, "veo").expect("inline");
    assert_eq!(inline.state, ProviderState::Failed);
    assert_eq!(
        inline.error.as_deref(),
        Some("Veo returned the video inline; set providers.veo.storage_uri so it writes to Cloud Storage")
    );
    assert_eq!(inline.video_url, None);

    let filtered = vertex_veo::parse_operation(FILTERED, "veo").expect("filtered");
    assert_eq!(filtered.state, ProviderState::Failed);
    let reason = filtered.error.expect("reason");
    assert!(
        reason.contains("withheld 1 video") && reason.contains("Support codes: 17301594"),
        "{reason}"
    );

    let cancelled = vertex_veo::parse_operation(
        format!(r#"{{"name":"{OPERATION}","done":true,"error":{{"code":1,"message":"Operation cancelled."}}}}"#).as_bytes(),
        "veo",
    )
    .expect("cancelled");
    assert_eq!(cancelled.state, ProviderState::Cancelled);
    assert_eq!(cancelled.error.as_deref(), Some("Operation cancelled."));
}

#[test]
fn undocumented_operation_bodies_are_errors() {
    let unknown = vertex_veo::parse_operation(
        format!(r#"{{"name":"{OPERATION}","done":true}}"#).as_bytes(),
        "veo",
    )
    .expect_err("done without a result");
    assert!(unknown.is_transient(), "{unknown}");
    assert!(
        unknown
            .to_string()
            .contains("done without error or response"),
        "{unknown}"
    );
    for garbage in [&br#"{"done":"yes"}"#[..], b"<html>", b"[]", b"{}"] {
        let error = vertex_veo::parse_operation(garbage, "veo").expect_err("garbage");
        assert!(!error.is_transient(), "{error}");
        assert!(
            error.to_string().contains("unexpected response body"),
            "{error}"
        );
    }
}

/// What a stub saw of one request.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    authorization: Option<String>,
    traceparent: Option<String>,
    body: serde_json::Value,
}

type Log = Arc<Mutex<Vec<Seen>>>;

fn seen(method: &Method, uri: &Uri, headers: &HeaderMap, body: &[u8]) -> Seen {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    Seen {
        method: method.to_string(),
        path: uri.path().to_owned(),
        authorization: header("authorization"),
        traceparent: header("traceparent"),
        body: serde_json::from_slice(body).unwrap_or(serde_json::Value::Null),
    }
}

/// A Vertex API stub: `predictLongRunning` answers the created operation, `fetchPredictOperation`
/// answers `status_body`.
fn api_routes(log: &Log, status_body: &'static [u8]) -> Router<Recorded> {
    let log = Arc::clone(log);
    Router::new().route(
        "/v1/{*rest}",
        any(
            move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
                let log = Arc::clone(&log);
                async move {
                    log.lock()
                        .expect("lock")
                        .push(seen(&method, &uri, &headers, &body));
                    if uri.path().ends_with(":predictLongRunning") {
                        json(CREATED)
                    } else if uri.path().ends_with(":fetchPredictOperation") {
                        json(status_body)
                    } else {
                        (StatusCode::NOT_FOUND, "no route").into_response()
                    }
                }
            },
        ),
    )
}

#[tokio::test]
async fn the_adapter_sends_the_documented_requests_and_reads_the_answers() {
    let log = Log::default();
    let stub = serve(api_routes(&log, SUCCEEDED)).await;
    let provider = build(&vertex_settings(&stub.base_url));

    let submitted = provider
        .submit(&veo_request("a lighthouse in a storm"))
        .await
        .expect("submit");
    assert_eq!(submitted.id, OPERATION);
    let done = provider
        .status(
            &submitted,
            Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        )
        .await
        .expect("status");
    assert_eq!(done.state, ProviderState::Succeeded);
    assert_eq!(
        done.video_url.as_deref(),
        Some("gs://my-bucket/veo/17330500000000/sample_0.mp4")
    );

    let seen = log.lock().expect("lock").clone();
    assert_eq!(seen.len(), 2, "{seen:?}");
    let submit = &seen[0];
    assert_eq!(submit.method, "POST");
    assert_eq!(
        submit.path,
        "/v1/projects/my-project/locations/us-central1/publishers/google/models/veo-3.1-generate-001:predictLongRunning"
    );
    assert_eq!(
        submit.authorization.as_deref(),
        Some("Bearer ya29.test-access-token")
    );
    assert_eq!(
        submit.traceparent.as_deref(),
        Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    );
    assert_eq!(
        submit.body,
        serde_json::json!({
            "instances": [{ "prompt": "a lighthouse in a storm" }],
            "parameters": {
                "sampleCount": 1,
                "durationSeconds": 8,
                "aspectRatio": "16:9",
                "storageUri": "gs://my-bucket/veo/",
            },
        })
    );
    let status = &seen[1];
    assert_eq!(status.method, "POST");
    assert_eq!(
        status.path,
        "/v1/projects/my-project/locations/us-central1/publishers/google/models/veo-3.1-generate-001:fetchPredictOperation"
    );
    assert_eq!(
        status.body,
        serde_json::json!({ "operationName": OPERATION })
    );
    assert_eq!(
        status.authorization.as_deref(),
        Some("Bearer ya29.test-access-token")
    );
    assert_eq!(
        status.traceparent.as_deref(),
        Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
    );
}

#[tokio::test]
async fn sizes_become_aspect_ratio_and_resolution_or_are_refused_before_sending() {
    let log = Log::default();
    let stub = serve(api_routes(&log, RUNNING)).await;
    let provider = build(&vertex_settings(&stub.base_url));
    provider
        .submit(&SubmitRequest {
            size: Some("1080x1920".to_owned()),
            duration_seconds: None,
            ..veo_request("portrait")
        })
        .await
        .expect("submit");
    let sent = log.lock().expect("lock")[0].body["parameters"].clone();
    assert_eq!(
        sent,
        serde_json::json!({
            "sampleCount": 1,
            "aspectRatio": "9:16",
            "resolution": "1080p",
            "storageUri": "gs://my-bucket/veo/",
        })
    );
    let error = provider
        .submit(&SubmitRequest {
            size: Some("1024x1024".to_owned()),
            ..veo_request("square")
        })
        .await
        .expect_err("Veo renders no squares");
    assert!(!error.is_transient(), "{error}");
    assert!(error.to_string().contains("16:9 or 9:16"), "{error}");
    assert_eq!(
        log.lock().expect("lock").len(),
        1,
        "nothing sent for the square"
    );

    // A task id that is not an operation name is refused without a request.
    let error = provider
        .status(&task("operations/123"), None)
        .await
        .expect_err("not a Veo operation");
    assert!(!error.is_transient(), "{error}");
    assert_eq!(log.lock().expect("lock").len(), 1);
}

#[test]
fn configuration_errors_name_the_key() {
    let check = |settings: ProviderSettings, keys: &[&str]| {
        let error = ProviderKind::VertexVeo
            .build("veo", &settings)
            .expect_err("invalid settings");
        let text = error.to_string();
        for key in keys {
            assert!(text.contains(key), "{text} does not name {key}");
        }
        assert!(
            !text.contains(TOKEN) && !text.contains("PRIVATE KEY"),
            "leak: {text}"
        );
    };
    let base = "https://us-central1-aiplatform.googleapis.com";
    check(
        ProviderSettings {
            project: None,
            ..vertex_settings(base)
        },
        &["providers.veo.project"],
    );
    check(
        ProviderSettings {
            location: Some("  ".to_owned()),
            ..vertex_settings(base)
        },
        &["providers.veo.location"],
    );
    check(
        ProviderSettings {
            storage_uri: None,
            ..vertex_settings(base)
        },
        &["providers.veo.storage_uri"],
    );
    check(
        ProviderSettings {
            storage_uri: Some("s3://bucket/veo".to_owned()),
            ..vertex_settings(base)
        },
        &["providers.veo.storage_uri", "gs://"],
    );
    let both_or_neither = [
        "providers.veo.access_token",
        "providers.veo.service_account_key_file",
    ];
    check(
        ProviderSettings {
            access_token: None,
            ..vertex_settings(base)
        },
        &both_or_neither,
    );
    check(
        ProviderSettings {
            service_account_key_file: Some("/etc/veo.json".to_owned()),
            ..vertex_settings(base)
        },
        &both_or_neither,
    );
    let key_file = |path: String| ProviderSettings {
        access_token: None,
        service_account_key_file: Some(path),
        ..vertex_settings(base)
    };
    check(
        key_file("/nonexistent/veo-key.json".to_owned()),
        &[
            "providers.veo.service_account_key_file",
            "/nonexistent/veo-key.json",
        ],
    );
    let mut user_credential: serde_json::Value = serde_json::from_str(KEY_FILE).expect("json");
    user_credential["type"] = "authorized_user".into();
    let mut broken_key: serde_json::Value = serde_json::from_str(KEY_FILE).expect("json");
    broken_key["private_key"] =
        "-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n".into();
    let mut no_email: serde_json::Value = serde_json::from_str(KEY_FILE).expect("json");
    no_email
        .as_object_mut()
        .expect("object")
        .remove("client_email");
    for (contents, reason) in [
        ("not json".to_owned(), "not a JSON key file"),
        (user_credential.to_string(), "authorized_user"),
        (broken_key.to_string(), "private_key"),
        (no_email.to_string(), "client_email"),
    ] {
        let path = scratch_file(&contents);
        check(
            key_file(path),
            &["providers.veo.service_account_key_file", reason],
        );
    }
    // And the fixture itself is a valid key.
    ProviderKind::VertexVeo
        .build("veo", &key_file(scratch_file(KEY_FILE)))
        .expect("the test key file is valid");
}

/// Writes `contents` to a fresh file under the test target's scratch directory.
fn scratch_file(contents: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("vertex-veo-{}.json", uuid::Uuid::new_v4().simple()));
    std::fs::write(&path, contents).expect("write scratch file");
    path.to_string_lossy().into_owned()
}

/// The test key file with `token_uri` pointing at `token_uri`.
fn key_file_for(token_uri: &str) -> String {
    let mut key: serde_json::Value = serde_json::from_str(KEY_FILE).expect("json");
    key["token_uri"] = token_uri.into();
    scratch_file(&key.to_string())
}

/// A stub OAuth2 token endpoint (`POST /token`) that verifies the JWT bearer grant as Google's
/// does (RS256 signature against the public key, `aud` = its URL, `iss`, `scope`, `kid`, a
/// lifetime of one hour), beside a Vertex API stub whose status calls answer "running".
struct TokenStub {
    stub: Stub,
    /// Tokens issued.
    issued: Arc<AtomicUsize>,
    /// Token requests received.
    requests: Arc<AtomicUsize>,
    /// `expires_in` of the next tokens.
    expires_in: Arc<AtomicU64>,
    /// When not 200, the token endpoint answers this status with an OAuth2 error.
    answer: Arc<AtomicU16>,
    /// Why grants were refused (must stay empty).
    refusals: Arc<Mutex<Vec<String>>>,
    api: Log,
}

impl TokenStub {
    async fn start() -> Self {
        let issued = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(AtomicUsize::new(0));
        let expires_in = Arc::new(AtomicU64::new(3600));
        let answer = Arc::new(AtomicU16::new(200));
        let refusals: Arc<Mutex<Vec<String>>> = Arc::default();
        let url: Arc<OnceLock<String>> = Arc::default();
        let api = Log::default();
        let token = {
            let (issued, requests, expires_in, answer, refusals, url) = (
                Arc::clone(&issued),
                Arc::clone(&requests),
                Arc::clone(&expires_in),
                Arc::clone(&answer),
                Arc::clone(&refusals),
                Arc::clone(&url),
            );
            post(move |headers: HeaderMap, body: Bytes| {
                let (issued, requests, expires_in, answer, refusals, url) = (
                    Arc::clone(&issued),
                    Arc::clone(&requests),
                    Arc::clone(&expires_in),
                    Arc::clone(&answer),
                    Arc::clone(&refusals),
                    Arc::clone(&url),
                );
                async move {
                    requests.fetch_add(1, Ordering::SeqCst);
                    let status = answer.load(Ordering::SeqCst);
                    if status != 200 {
                        let status = StatusCode::from_u16(status).expect("status");
                        return (
                            status,
                            [("content-type", "application/json")],
                            r#"{"error":"invalid_grant","error_description":"Invalid JWT Signature."}"#,
                        )
                            .into_response();
                    }
                    let audience = url.get().expect("url set").clone();
                    match verify_grant(&headers, &body, &audience) {
                        Ok(()) => {
                            let n = issued.fetch_add(1, Ordering::SeqCst) + 1;
                            axum::Json(serde_json::json!({
                                "access_token": format!("ya29.stub-{n}"),
                                "expires_in": expires_in.load(Ordering::SeqCst),
                                "token_type": "Bearer",
                            }))
                            .into_response()
                        }
                        Err(reason) => {
                            refusals.lock().expect("lock").push(reason.clone());
                            (
                                StatusCode::BAD_REQUEST,
                                axum::Json(serde_json::json!({
                                    "error": "invalid_grant",
                                    "error_description": reason,
                                })),
                            )
                                .into_response()
                        }
                    }
                }
            })
        };
        let stub = serve(api_routes(&api, RUNNING).route("/token", token)).await;
        url.set(format!("{}/token", stub.base_url))
            .expect("set once");
        Self {
            stub,
            issued,
            requests,
            expires_in,
            answer,
            refusals,
            api,
        }
    }

    fn provider(&self) -> Arc<dyn VideoProvider> {
        build(&ProviderSettings {
            access_token: None,
            service_account_key_file: Some(key_file_for(&format!("{}/token", self.stub.base_url))),
            ..vertex_settings(&self.stub.base_url)
        })
    }

    fn issued(&self) -> usize {
        self.issued.load(Ordering::SeqCst)
    }

    fn authorizations(&self) -> Vec<String> {
        self.api
            .lock()
            .expect("lock")
            .iter()
            .filter_map(|seen| seen.authorization.clone())
            .collect()
    }
}

/// Checks a JWT bearer grant the way Google's token endpoint does.
fn verify_grant(headers: &HeaderMap, body: &[u8], audience: &str) -> Result<(), String> {
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if content_type != "application/x-www-form-urlencoded" {
        return Err(format!("content-type {content_type}"));
    }
    let form: HashMap<String, String> = url::form_urlencoded::parse(body).into_owned().collect();
    if form.get("grant_type").map(String::as_str)
        != Some("urn:ietf:params:oauth:grant-type:jwt-bearer")
    {
        return Err(format!("grant_type {:?}", form.get("grant_type")));
    }
    let assertion = form.get("assertion").ok_or("no assertion")?;
    let header = jsonwebtoken::decode_header(assertion).map_err(|e| format!("header: {e}"))?;
    if header.kid.as_deref() != Some("test-only-key-0001") {
        return Err(format!("kid {:?}", header.kid));
    }
    let key = jsonwebtoken::DecodingKey::from_rsa_pem(PUBLIC_KEY).map_err(|e| e.to_string())?;
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    validation.set_audience(&[audience]);
    validation.set_required_spec_claims(&["exp", "iat", "aud", "iss"]);
    validation.set_issuer(&[CLIENT_EMAIL]);
    let claims = jsonwebtoken::decode::<serde_json::Value>(assertion, &key, &validation)
        .map_err(|e| format!("signature or claims: {e}"))?
        .claims;
    if claims["scope"] != "https://www.googleapis.com/auth/cloud-platform" {
        return Err(format!("scope {}", claims["scope"]));
    }
    let lifetime = claims["exp"].as_i64().unwrap_or(0) - claims["iat"].as_i64().unwrap_or(0);
    if lifetime != 3600 {
        return Err(format!("lifetime {lifetime}"));
    }
    Ok(())
}

#[tokio::test]
async fn a_service_account_key_is_exchanged_once_and_the_token_reused() {
    let tokens = TokenStub::start().await;
    let provider = tokens.provider();
    for _ in 0..2 {
        let status = provider
            .status(&task(OPERATION), None)
            .await
            .expect("status");
        assert_eq!(status.state, ProviderState::InProgress);
    }
    assert_eq!(
        tokens.refusals.lock().expect("lock").clone(),
        Vec::<String>::new()
    );
    assert_eq!(tokens.issued(), 1, "two status calls, one token");
    assert_eq!(
        tokens.authorizations(),
        vec![
            "Bearer ya29.stub-1".to_owned(),
            "Bearer ya29.stub-1".to_owned()
        ]
    );

    // Callers arriving together wait for one refresh rather than each asking.
    let fresh = tokens.provider();
    let task = task(OPERATION);
    let results = futures::future::join_all((0..4).map(|_| fresh.status(&task, None))).await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    assert_eq!(tokens.issued(), 2, "one refresh for four concurrent calls");

    let text = format!("{provider:?}");
    assert!(
        !text.contains("ya29") && !text.contains("PRIVATE KEY"),
        "secret in debug output: {text}"
    );
}

#[tokio::test]
async fn a_token_close_to_its_expiry_is_refreshed() {
    let tokens = TokenStub::start().await;
    // Shorter-lived than the refresh margin: each call needs a new one.
    tokens.expires_in.store(0, Ordering::SeqCst);
    let provider = tokens.provider();
    provider
        .status(&task(OPERATION), None)
        .await
        .expect("first");
    provider
        .status(&task(OPERATION), None)
        .await
        .expect("second");
    assert_eq!(tokens.issued(), 2);
    assert_eq!(
        tokens.authorizations(),
        vec![
            "Bearer ya29.stub-1".to_owned(),
            "Bearer ya29.stub-2".to_owned()
        ]
    );
    assert_eq!(
        tokens.refusals.lock().expect("lock").clone(),
        Vec::<String>::new()
    );
}

#[tokio::test]
async fn token_endpoint_refusals_are_permanent_and_its_outages_transient() {
    let tokens = TokenStub::start().await;
    let provider = tokens.provider();

    tokens.answer.store(400, Ordering::SeqCst);
    let refused = provider
        .status(&task(OPERATION), None)
        .await
        .expect_err("400 from the token endpoint");
    assert!(!refused.is_transient(), "{refused}");
    assert!(
        refused
            .to_string()
            .contains("invalid_grant: Invalid JWT Signature."),
        "{refused}"
    );

    tokens.answer.store(503, Ordering::SeqCst);
    let outage = provider
        .status(&task(OPERATION), None)
        .await
        .expect_err("503 from the token endpoint");
    assert!(outage.is_transient(), "{outage}");
    assert!(
        !outage.unanswered(),
        "the Veo request was never sent: {outage}"
    );
    // Callers that waited for a failing refresh share its outcome instead of queueing theirs.
    let before = tokens.requests.load(Ordering::SeqCst);
    let task = task(OPERATION);
    let results = futures::future::join_all((0..4).map(|_| provider.status(&task, None))).await;
    assert!(
        results
            .iter()
            .all(|r| r.as_ref().is_err_and(ProviderError::is_transient)),
        "{results:?}"
    );
    assert_eq!(
        tokens.requests.load(Ordering::SeqCst) - before,
        1,
        "one attempt for four waiting calls"
    );
    assert!(
        tokens.authorizations().is_empty(),
        "no API call without a token"
    );

    tokens.answer.store(200, Ordering::SeqCst);
    provider
        .status(&task, None)
        .await
        .expect("recovers once the endpoint does");
    assert_eq!(tokens.issued(), 1);
}

// ---------------------------------------------------------------------------------------------
// Against the simulator.

fn sim_settings(sim: &SimHandle) -> ProviderSettings {
    ProviderSettings {
        timeout_ms: 2_000,
        ..sim.provider_settings(ProviderKind::VertexVeo)
    }
}

#[tokio::test]
async fn sim_job_runs_to_success_with_the_cloud_storage_uri() {
    let sim = start_sim(400).await;
    let provider = build(&sim_settings(&sim));
    let task = provider
        .submit(&veo_request("a fox in the snow"))
        .await
        .expect("submit");
    assert!(
        task.id.starts_with(
            "projects/sim-project/locations/us-central1/publishers/google/models/veo-3.1-generate-001/operations/"
        ),
        "{}",
        task.id
    );
    let seen = poll_to_end(provider.as_ref(), &task).await;
    assert!(!seen[0].state.is_terminal(), "{seen:?}");
    assert!(
        seen[..seen.len() - 1]
            .iter()
            .all(|s| s.state == ProviderState::InProgress && s.progress.is_none()),
        "Veo reports no progress: {seen:?}"
    );
    let done = last(&seen);
    assert_eq!(done.state, ProviderState::Succeeded);
    assert_eq!(done.progress, Some(100));
    let url = done.video_url.clone().expect("gcs uri");
    assert!(
        url.starts_with("gs://sim-bucket/videos/") && url.ends_with("/sample_0.mp4"),
        "{url}"
    );
    assert_eq!(done.video_url_expires_at, None);
    let stats = sim.stats();
    assert_eq!((stats.submits, stats.jobs), (1, 1));
    assert_eq!(stats.status_calls, seen.len() as u64);
    sim.shutdown().await;
}

#[tokio::test]
async fn sim_fail_prompt_fails_and_cancel_is_unsupported() {
    let sim = start_sim(300).await;
    let provider = build(&sim_settings(&sim));
    let doomed = provider
        .submit(&veo_request("a doomed render [fail]"))
        .await
        .expect("submit");
    let seen = poll_to_end(provider.as_ref(), &doomed).await;
    let failed = last(&seen);
    assert_eq!(failed.state, ProviderState::Failed);
    assert_eq!(failed.error.as_deref(), Some("simulated failure"));
    assert_eq!(failed.video_url, None);

    let long = provider
        .submit(&veo_request("a long one [duration=60000]"))
        .await
        .expect("submit");
    assert_eq!(
        provider.cancel(&long).await.expect("cancel"),
        CancelOutcome::Unsupported
    );
    assert!(
        !provider
            .status(&long, None)
            .await
            .expect("still there")
            .state
            .is_terminal(),
        "an unsupported cancel must not touch the job"
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn sim_refuses_a_wrong_token_and_accepts_its_own() {
    let sim = SimProvider::start(
        "127.0.0.1:0".parse().expect("address"),
        SimSettings {
            duration_ms: 300,
            api_key: Some(KEY.to_owned()),
            ..SimSettings::default()
        },
    )
    .await
    .expect("sim starts");
    let wrong = build(&ProviderSettings {
        access_token: Some("ya29.wrong".into()),
        ..sim_settings(&sim)
    });
    let error = wrong.submit(&veo_request("x")).await.expect_err("401");
    assert!(!error.is_transient(), "{error}");
    assert!(error.to_string().contains("401"), "{error}");

    // A service-account key exchanged at the simulator's token endpoint gets a token it takes.
    let own = build(&ProviderSettings {
        access_token: None,
        service_account_key_file: Some(key_file_for(&format!(
            "{}/vertex_veo/token",
            sim.base_url()
        ))),
        ..sim_settings(&sim)
    });
    let task = own.submit(&veo_request("served")).await.expect("submit");
    let seen = poll_to_end(own.as_ref(), &task).await;
    assert_eq!(last(&seen).state, ProviderState::Succeeded);
    sim.shutdown().await;
}

#[tokio::test]
async fn sim_answers_inline_bytes_without_a_storage_uri_and_the_adapter_refuses_them() {
    let sim = start_sim(300).await;
    let http = reqwest::Client::new();
    let model = format!(
        "{}/vertex_veo/v1/projects/p/locations/us-central1/publishers/google/models/{MODEL}",
        sim.base_url()
    );
    let created: serde_json::Value = http
        .post(format!("{model}:predictLongRunning"))
        .bearer_auth("sim-vertex-access-token")
        .json(&serde_json::json!({ "instances": [{ "prompt": "inline [duration=50]" }] }))
        .send()
        .await
        .expect("submit")
        .json()
        .await
        .expect("json");
    let name = created["name"].as_str().expect("name").to_owned();
    let deadline = Instant::now() + Duration::from_secs(5);
    let body = loop {
        let body = http
            .post(format!("{model}:fetchPredictOperation"))
            .bearer_auth("sim-vertex-access-token")
            .json(&serde_json::json!({ "operationName": name }))
            .send()
            .await
            .expect("status")
            .bytes()
            .await
            .expect("body");
        let value: serde_json::Value = serde_json::from_slice(&body).expect("json");
        if value["done"] == true {
            assert!(
                value["response"]["videos"][0]["bytesBase64Encoded"].is_string(),
                "{value}"
            );
            break body;
        }
        assert!(Instant::now() < deadline, "never done: {value}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let status = vertex_veo::parse_operation(&body, "veo").expect("parses");
    assert_eq!(status.state, ProviderState::Failed);
    assert!(
        status
            .error
            .as_deref()
            .is_some_and(|e| e.contains("providers.veo.storage_uri")),
        "{status:?}"
    );
    sim.shutdown().await;
}
