//! The `gemini` adapter (Veo on the Gemini API) against fixtures from Google's documentation, a
//! stub server, and the simulator.
//!
//! Fixture sources (`fixtures/gemini/`):
//! - `operation_created.json`: ai.google.dev "Generate videos with Veo 3.1 in Gemini API", the
//!   REST samples read `.name` from the `predictLongRunning` answer and poll
//!   `GET ${BASE_URL}/${operation_name}`; the name has the SDK's shape
//!   `models/{model}/operations/{id}`;
//! - `operation_running.json`: the same operation with `done: false` (what the samples' `jq
//!   .done` loop waits on);
//! - `operation_succeeded.json`: `response.generateVideoResponse.generatedSamples[0].video.uri`,
//!   the path the REST samples extract, with the `@type` of `PredictLongRunningResponse`
//!   (`google.ai.generativelanguage.v1beta`) and a Files API download URI;
//! - `operation_filtered.json`: `raiMediaFilteredCount`/`raiMediaFilteredReasons`, as the SDK's
//!   `_GenerateVideosResponse_from_mldev` reads them;
//! - `operation_failed.json`: an operation `error` (`google.rpc.Status`), message adapted.

use axum::body::Bytes;
use axum::http::{Method, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use video_orchestrator::providers::gemini;

use super::*;

const CREATED: &[u8] = include_bytes!("fixtures/gemini/operation_created.json");
const RUNNING: &[u8] = include_bytes!("fixtures/gemini/operation_running.json");
const SUCCEEDED: &[u8] = include_bytes!("fixtures/gemini/operation_succeeded.json");
const FILTERED: &[u8] = include_bytes!("fixtures/gemini/operation_filtered.json");
const FAILED: &[u8] = include_bytes!("fixtures/gemini/operation_failed.json");

const OPERATION: &str = "models/veo-3.1-generate-preview/operations/mg3pt9cbmvr1";
const FILE_URI: &str =
    "https://generativelanguage.googleapis.com/v1beta/files/3h5k2m9x0q1w:download?alt=media";

fn veo_request(prompt: &str) -> SubmitRequest {
    SubmitRequest {
        model: "veo-3.1-generate-preview".to_owned(),
        ..request(prompt)
    }
}

fn task(id: &str) -> ProviderTask {
    ProviderTask { id: id.to_owned() }
}

#[test]
fn documented_operations_parse() {
    let observed = rfc3339("2026-11-02T10:00:00Z");
    let running = gemini::parse_operation(RUNNING, observed).expect("running");
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
    let done = gemini::parse_operation(SUCCEEDED, observed).expect("succeeded");
    assert_eq!(
        done,
        ProviderStatus {
            state: ProviderState::Succeeded,
            progress: Some(100),
            video_url: Some(FILE_URI.to_owned()),
            video_url_expires_at: Some(rfc3339("2026-11-04T10:00:00Z")),
            video_seconds: None,
            error: None,
        }
    );
    let failed = gemini::parse_operation(FAILED, observed).expect("failed");
    assert_eq!(failed.state, ProviderState::Failed);
    assert_eq!(
        failed.error.as_deref(),
        Some("Video generation failed due to an internal error. Please try again.")
    );
    assert_eq!(failed.video_url_expires_at, None);
    let filtered = gemini::parse_operation(FILTERED, observed).expect("filtered");
    assert_eq!(filtered.state, ProviderState::Failed);
    let reason = filtered.error.expect("reason");
    assert!(
        reason.contains("withheld 1 video") && reason.contains("issue with the audio"),
        "{reason}"
    );
}

#[test]
fn undocumented_operation_bodies_are_errors() {
    let now = Utc::now();
    let unknown = gemini::parse_operation(
        format!(r#"{{"name":"{OPERATION}","done":true}}"#).as_bytes(),
        now,
    )
    .expect_err("done without a result");
    assert!(unknown.is_transient(), "{unknown}");
    assert!(
        unknown
            .to_string()
            .contains("done without error or response"),
        "{unknown}"
    );
    for garbage in [
        &br#"{"name":"x","done":1}"#[..],
        b"",
        b"\"operations/x\"",
        b"[]",
        b"{}",
    ] {
        let error = gemini::parse_operation(garbage, now).expect_err("garbage");
        assert!(!error.is_transient(), "{error}");
        assert!(
            error.to_string().contains("unexpected response body"),
            "{error}"
        );
    }
}

type Log = Arc<Mutex<Vec<(String, String, HeaderMap, serde_json::Value)>>>;

fn json(body: &'static [u8]) -> Response {
    ([("content-type", "application/json")], body).into_response()
}

#[tokio::test]
async fn the_adapter_sends_the_documented_requests_and_publishes_the_uri_without_the_key() {
    let log = Log::default();
    let stub = {
        let log = Arc::clone(&log);
        serve(Router::new().route(
            "/v1beta/{*rest}",
            any(
                move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
                    let log = Arc::clone(&log);
                    async move {
                        let value =
                            serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
                        log.lock().expect("lock").push((
                            method.to_string(),
                            uri.path().to_owned(),
                            headers,
                            value,
                        ));
                        if uri.path().ends_with(":predictLongRunning") {
                            json(CREATED)
                        } else {
                            json(SUCCEEDED)
                        }
                    }
                },
            ),
        ))
        .await
    };
    let provider = provider(ProviderKind::Gemini, &stub.base_url);
    // The SDK's `models/…` spelling of the model reaches the same path.
    let submitted = provider
        .submit(&SubmitRequest {
            model: "models/veo-3.1-generate-preview".to_owned(),
            ..veo_request("a cat reading a book")
        })
        .await
        .expect("submit");
    assert_eq!(submitted.id, OPERATION);
    let done = provider.status(&submitted, None).await.expect("status");
    assert_eq!(done.state, ProviderState::Succeeded);
    assert_eq!(done.video_url.as_deref(), Some(FILE_URI), "published as is");
    let expires = done.video_url_expires_at.expect("expiry");
    let in_two_days = Utc::now() + chrono::Duration::days(2);
    assert!(
        (expires - in_two_days).num_seconds().abs() < 10,
        "{expires}"
    );

    let seen = log.lock().expect("lock").clone();
    assert_eq!(seen.len(), 2);
    let (method, path, headers, body) = &seen[0];
    assert_eq!(method, "POST");
    assert_eq!(
        path,
        "/v1beta/models/veo-3.1-generate-preview:predictLongRunning"
    );
    assert_eq!(
        headers.get("x-goog-api-key").and_then(|v| v.to_str().ok()),
        Some(KEY)
    );
    assert!(
        headers.get("authorization").is_none(),
        "the key goes in x-goog-api-key only"
    );
    assert_eq!(
        headers.get("traceparent").and_then(|v| v.to_str().ok()),
        Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    );
    assert_eq!(
        *body,
        serde_json::json!({
            "instances": [{ "prompt": "a cat reading a book" }],
            "parameters": { "sampleCount": 1, "durationSeconds": 8, "aspectRatio": "16:9" },
        })
    );
    let (method, path, headers, _) = &seen[1];
    assert_eq!(method, "GET");
    assert_eq!(
        path,
        "/v1beta/models/veo-3.1-generate-preview/operations/mg3pt9cbmvr1"
    );
    assert_eq!(
        headers.get("x-goog-api-key").and_then(|v| v.to_str().ok()),
        Some(KEY)
    );

    let error = provider
        .status(&task("projects/p/operations/x"), None)
        .await
        .expect_err("not a Gemini operation name");
    assert!(!error.is_transient(), "{error}");
    assert_eq!(
        log.lock().expect("lock").len(),
        2,
        "refused without a request"
    );
}

// ---------------------------------------------------------------------------------------------
// Against the simulator.

fn sim_settings(sim: &SimHandle) -> ProviderSettings {
    ProviderSettings {
        timeout_ms: 2_000,
        ..sim.provider_settings(ProviderKind::Gemini)
    }
}

#[tokio::test]
async fn sim_job_runs_to_success_with_a_file_uri_that_needs_the_key() {
    let sim = start_sim(400).await;
    let settings = sim_settings(&sim);
    let provider = build(&settings);
    let task = provider
        .submit(&veo_request("a lighthouse in a storm"))
        .await
        .expect("submit");
    let id = task
        .id
        .strip_prefix("models/veo-3.1-generate-preview/operations/")
        .expect("operation name")
        .to_owned();
    let seen = poll_to_end(provider.as_ref(), &task).await;
    assert!(!seen[0].state.is_terminal(), "{seen:?}");
    assert!(
        seen[..seen.len() - 1].iter().all(|s| s.progress.is_none()),
        "Veo reports no progress: {seen:?}"
    );
    let done = last(&seen);
    assert_eq!(done.state, ProviderState::Succeeded);
    let url = done.video_url.clone().expect("uri");
    assert_eq!(
        url,
        format!(
            "{}/gemini/v1beta/files/{id}:download?alt=media",
            sim.base_url()
        )
    );
    assert!(done
        .video_url_expires_at
        .is_some_and(|at| at > Utc::now() + chrono::Duration::hours(47)));

    let http = reqwest::Client::new();
    let file = http
        .get(&url)
        .header("x-goog-api-key", "sim-key")
        .send()
        .await
        .expect("download");
    assert_eq!(file.status(), StatusCode::OK);
    assert!(!file.bytes().await.expect("body").is_empty());
    let anonymous = http.get(&url).send().await.expect("download");
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
    let error: serde_json::Value = anonymous.json().await.expect("google error");
    assert_eq!(error["error"]["status"], "UNAUTHENTICATED");

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
    let failed = last(&poll_to_end(provider.as_ref(), &doomed).await).clone();
    assert_eq!(failed.state, ProviderState::Failed);
    assert_eq!(failed.error.as_deref(), Some("simulated failure"));

    let long = provider
        .submit(&veo_request("a long one [duration=60000]"))
        .await
        .expect("submit");
    assert_eq!(
        provider.cancel(&long).await.expect("cancel"),
        CancelOutcome::Unsupported
    );
    assert!(!provider
        .status(&long, None)
        .await
        .expect("still there")
        .state
        .is_terminal());
    sim.shutdown().await;
}

#[tokio::test]
async fn sim_refuses_a_wrong_or_missing_key_permanently() {
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
    for key in ["wrong-key", ""] {
        let error = build(&ProviderSettings {
            api_key: key.into(),
            ..sim_settings(&sim)
        })
        .submit(&veo_request("x"))
        .await
        .expect_err("401");
        assert!(!error.is_transient(), "{error}");
        assert!(error.to_string().contains("401"), "{error}");
    }
    build(&sim_settings(&sim))
        .submit(&veo_request("x"))
        .await
        .expect("the right key works");
    sim.shutdown().await;
}
