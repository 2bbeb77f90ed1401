//! The `fal` adapter against its recorded fixtures, a stub server and the simulator.
//!
//! Fixtures (`fixtures/fal/`), and where they come from:
//! - `submit.json`, `status_in_queue.json`: the examples of docs.fal.ai "Queue" (model-endpoints
//!   /queue), verbatim;
//! - `status_in_progress.json`, `status_completed.json`: the `InProgressQueueStatus` /
//!   `CompletedQueueStatus` shapes of @fal-ai/client (`libs/client/src/types/common.ts`: the
//!   base fields, `logs`, `metrics.inference_time`), with the docs' request id;
//! - `status_completed_error.json`, `status_cancelled.json`: the same with the `error` /
//!   `error_type` fields fal-client reads on `Completed` (`client.py` `_parse_status`); texts and
//!   types from docs.fal.ai "Request Error Types" (`request_timeout`, `client_cancelled`);
//! - `result_video.json`: the `{video: File}` output of fal's video models (`I2VOutput` and
//!   `File` in @fal-ai/client `types/endpoints.ts`), a CDN URL in fal's form;
//! - `result_validation_error.json`: the model error shape of docs.fal.ai "Errors" (`detail`: a
//!   list of `{loc, msg, type, url, ctx}`, its `image_too_large` example);
//!   `result_request_error.json`: the request error example of "Request Error Types";
//! - `cancel_*.json`: the cancel answers of the Inference API reference (`CANCELLATION_REQUESTED`,
//!   `ALREADY_COMPLETED`, `NOT_FOUND`).

use super::*;

use axum::body::Bytes;
use axum::routing::any;
use video_orchestrator::providers::fal::{self, QueueStatus};

const SUBMIT: &[u8] = include_bytes!("fixtures/fal/submit.json");
const IN_QUEUE: &[u8] = include_bytes!("fixtures/fal/status_in_queue.json");
const IN_PROGRESS: &[u8] = include_bytes!("fixtures/fal/status_in_progress.json");
const COMPLETED: &[u8] = include_bytes!("fixtures/fal/status_completed.json");
const COMPLETED_ERROR: &[u8] = include_bytes!("fixtures/fal/status_completed_error.json");
const CANCELLED: &[u8] = include_bytes!("fixtures/fal/status_cancelled.json");
const RESULT_VIDEO: &[u8] = include_bytes!("fixtures/fal/result_video.json");
const RESULT_VALIDATION: &[u8] = include_bytes!("fixtures/fal/result_validation_error.json");
const RESULT_REQUEST_ERROR: &[u8] = include_bytes!("fixtures/fal/result_request_error.json");
const CANCEL_REQUESTED: &[u8] = include_bytes!("fixtures/fal/cancel_requested.json");
const CANCEL_DONE: &[u8] = include_bytes!("fixtures/fal/cancel_already_completed.json");
const CANCEL_NOT_FOUND: &[u8] = include_bytes!("fixtures/fal/cancel_not_found.json");

const KLING: &str = "fal-ai/kling-video/v2.1/master/text-to-video";
const DOCS_REQUEST: &str = "80e732af-660e-45cd-bd63-580e4f2a94cc";
const VIDEO_URL: &str = "https://v3.fal.media/files/kangaroo/pNgoTGKmLXmpQRd2VNRAM_output.mp4";

fn fal_request(prompt: &str, model: &str) -> SubmitRequest {
    SubmitRequest {
        model: model.to_owned(),
        ..request(prompt)
    }
}

fn sim_provider(sim: &SimHandle) -> Arc<dyn VideoProvider> {
    build(&ProviderSettings {
        timeout_ms: 2_000,
        ..sim.provider_settings(ProviderKind::Fal)
    })
}

fn known(status: QueueStatus) -> ProviderStatus {
    match status {
        QueueStatus::Known(status) => status,
        QueueStatus::ResultReady => panic!("expected a known status, got ResultReady"),
    }
}

// ---------------------------------------------------------------------------------------------
// Documented bodies.

#[test]
fn the_documented_submit_answer_gives_the_app_request_path() {
    let task = fal::parse_submitted(SUBMIT, "fal-ai/fast-sdxl", "https://queue.fal.run")
        .expect("submit answer");
    assert_eq!(task.id, format!("fal-ai/fast-sdxl/requests/{DOCS_REQUEST}"));

    // Behind a gateway whose URLs fal does not know, the id is built from the model's app id,
    // without the endpoint path.
    let task = fal::parse_submitted(SUBMIT, KLING, "https://gateway.example.com/fal")
        .expect("submit answer");
    assert_eq!(
        task.id,
        format!("fal-ai/kling-video/requests/{DOCS_REQUEST}")
    );

    let no_id = fal::parse_submitted(br#"{"request_id": ""}"#, KLING, "https://queue.fal.run")
        .expect_err("empty id");
    assert!(!no_id.is_transient(), "{no_id}");
    let garbage =
        fal::parse_submitted(b"<html>", KLING, "https://queue.fal.run").expect_err("not json");
    assert!(
        garbage.to_string().contains("unexpected response body"),
        "{garbage}"
    );
}

#[test]
fn every_documented_status_maps() {
    let queued = known(fal::parse_status(IN_QUEUE).expect("IN_QUEUE"));
    assert_eq!(queued.state, ProviderState::Queued);
    assert_eq!(queued.progress, None, "fal reports no progress");
    let running = known(fal::parse_status(IN_PROGRESS).expect("IN_PROGRESS"));
    assert_eq!(running.state, ProviderState::InProgress);
    assert_eq!(running.progress, None);
    assert_eq!(running.video_url, None);

    assert_eq!(
        fal::parse_status(COMPLETED).expect("COMPLETED"),
        QueueStatus::ResultReady,
        "a completion without an error is read from the result"
    );
    assert_eq!(
        known(fal::parse_status(COMPLETED_ERROR).expect("COMPLETED with error")),
        ProviderStatus {
            state: ProviderState::Failed,
            progress: None,
            video_url: None,
            video_url_expires_at: None,
            video_seconds: None,
            error: Some("Request timed out".to_owned()),
        }
    );
    let cancelled = known(fal::parse_status(CANCELLED).expect("cancelled"));
    assert_eq!(cancelled.state, ProviderState::Cancelled);
    assert!(cancelled.state.is_terminal());
}

#[test]
fn an_unknown_status_is_transient_and_named() {
    for status in ["FAILED", "RUNNING"] {
        let body = format!(r#"{{"status": "{status}", "request_id": "{DOCS_REQUEST}"}}"#);
        let error = fal::parse_status(body.as_bytes()).expect_err("unknown");
        assert!(error.is_transient(), "{error}");
        assert!(!error.unanswered());
        let text = error.to_string();
        assert!(
            text.contains(status) && text.contains(DOCS_REQUEST),
            "{text}"
        );
    }
    let error = fal::parse_status(br#"{"queue_position": 1}"#).expect_err("no status");
    assert!(!error.is_transient(), "{error}");
}

#[test]
fn documented_results_give_the_url_or_the_error() {
    assert_eq!(
        fal::parse_result(RESULT_VIDEO, fal::DEFAULT_OUTPUT_POINTER).expect("video"),
        ProviderStatus {
            state: ProviderState::Succeeded,
            progress: Some(100),
            video_url: Some(VIDEO_URL.to_owned()),
            // fal's CDN expiry is an account or request setting the result does not carry.
            video_url_expires_at: None,
            video_seconds: None,
            error: None,
        }
    );
    let refused = fal::parse_result(RESULT_VALIDATION, "/video/url").expect("422 body");
    assert_eq!(refused.state, ProviderState::Failed);
    assert_eq!(
        refused.error.as_deref(),
        Some("image_url: Image dimensions are too large")
    );
    let timed_out = fal::parse_result(RESULT_REQUEST_ERROR, "/video/url").expect("504 body");
    assert_eq!(timed_out.state, ProviderState::Failed);
    assert_eq!(timed_out.error.as_deref(), Some("Request timed out"));

    // Another pointer, for a model whose output differs.
    let custom = br#"{"videos": [{"url": "https://v3.fal.media/files/a.mp4"}]}"#;
    assert_eq!(
        fal::parse_result(custom, "/videos/0/url")
            .expect("custom")
            .video_url
            .as_deref(),
        Some("https://v3.fal.media/files/a.mp4")
    );
    let missing = fal::parse_result(custom, "/video/url").expect("no url there");
    assert_eq!(missing.state, ProviderState::Failed);
    assert!(
        missing
            .error
            .as_deref()
            .is_some_and(|e| e.contains("/video/url")),
        "{missing:?}"
    );
    // The empty pointer is the whole result.
    assert_eq!(
        fal::parse_result(br#""https://v3.fal.media/files/b.mp4""#, "")
            .expect("whole")
            .state,
        ProviderState::Succeeded
    );
}

#[test]
fn documented_cancel_answers_map() {
    assert_eq!(
        fal::parse_cancel(CANCEL_REQUESTED).expect("requested"),
        CancelOutcome::Cancelled
    );
    assert_eq!(
        fal::parse_cancel(CANCEL_DONE).expect("already completed"),
        CancelOutcome::Cancelled,
        "a finished request keeps its outcome; the cancel is not an error"
    );
    let missing = fal::parse_cancel(CANCEL_NOT_FOUND).expect_err("not found");
    assert!(!missing.is_transient() && missing.to_string().contains("NOT_FOUND"));
}

#[test]
fn the_output_pointer_is_validated() {
    for pointer in ["video/url", "video.url"] {
        let error = Providers::from_settings(
            &HashMap::from([(
                "fal".to_owned(),
                ProviderSettings {
                    output_pointer: Some(pointer.to_owned()),
                    ..settings(ProviderKind::Fal, "https://queue.fal.run")
                },
            )]),
            &RoutingSettings::default(),
        )
        .expect_err("not a pointer");
        assert!(
            error.to_string().contains("providers.fal.output_pointer"),
            "{error}"
        );
    }
    for pointer in ["", "/video/url", "/videos/0/url"] {
        ProviderKind::Fal
            .build(
                "fal",
                &ProviderSettings {
                    output_pointer: Some(pointer.to_owned()),
                    ..settings(ProviderKind::Fal, "https://queue.fal.run")
                },
            )
            .expect("valid pointer");
    }
}

// ---------------------------------------------------------------------------------------------
// Over HTTP, against a stub serving the documented bodies.

/// One request as the stub saw it.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    authorization: Option<String>,
    body: Option<serde_json::Value>,
}

fn json(status: StatusCode, body: &[u8]) -> axum::response::Response {
    axum::response::IntoResponse::into_response((
        status,
        [("content-type", "application/json")],
        body.to_vec(),
    ))
}

async fn fal_stub() -> (Stub, Arc<Mutex<Vec<Seen>>>) {
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let log = Arc::clone(&seen);
    let handler = move |State(recorded): State<Recorded>,
                        method: axum::http::Method,
                        uri: axum::http::Uri,
                        headers: HeaderMap,
                        body: Bytes| {
        let log = Arc::clone(&log);
        async move {
            record(&recorded, &headers);
            let path = uri.path().to_owned();
            log.lock().expect("lock").push(Seen {
                method: method.to_string(),
                path: path.clone(),
                authorization: headers
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned),
                body: serde_json::from_slice(&body).ok(),
            });
            let host = headers
                .get("host")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("localhost");
            match (method.as_str(), path.as_str()) {
                ("POST", p) if p == format!("/{KLING}") => {
                    // The submit answer, with URLs under the stub's own address.
                    let url = format!("http://{host}/fal-ai/kling-video/requests/{DOCS_REQUEST}");
                    let body = serde_json::json!({
                        "request_id": DOCS_REQUEST,
                        "response_url": url,
                        "status_url": format!("{url}/status"),
                        "cancel_url": format!("{url}/cancel"),
                    });
                    json(StatusCode::OK, body.to_string().as_bytes())
                }
                ("POST", "/fal-ai/refusing") => {
                    json(StatusCode::UNPROCESSABLE_ENTITY, RESULT_VALIDATION)
                }
                ("GET", p) if p.ends_with("/status") => {
                    if p.contains("/requests/refused/") || p.contains(DOCS_REQUEST) {
                        json(StatusCode::OK, COMPLETED)
                    } else if p.contains("/requests/queued/") {
                        json(StatusCode::ACCEPTED, IN_QUEUE)
                    } else if p.contains("/requests/odd/") {
                        json(
                            StatusCode::OK,
                            br#"{"status": "PAUSED", "request_id": "odd"}"#,
                        )
                    } else {
                        json(StatusCode::OK, COMPLETED_ERROR)
                    }
                }
                ("GET", p) if p.ends_with(&format!("/requests/{DOCS_REQUEST}")) => {
                    json(StatusCode::OK, RESULT_VIDEO)
                }
                ("GET", p) if p.ends_with("/requests/refused") => {
                    json(StatusCode::UNPROCESSABLE_ENTITY, RESULT_VALIDATION)
                }
                ("PUT", p) if p.ends_with("/cancel") => json(StatusCode::BAD_REQUEST, CANCEL_DONE),
                _ => json(StatusCode::NOT_FOUND, br#"{"detail": "Not Found"}"#),
            }
        }
    };
    let stub = serve(Router::new().route("/{*path}", any(handler))).await;
    (stub, seen)
}

#[tokio::test]
async fn the_adapter_speaks_the_queue_protocol_over_http() {
    let (stub, seen) = fal_stub().await;
    let provider = provider(ProviderKind::Fal, &stub.base_url);
    let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    let task = provider
        .submit(&fal_request("a paper boat in the rain", KLING))
        .await
        .expect("submit");
    assert_eq!(
        task.id,
        format!("fal-ai/kling-video/requests/{DOCS_REQUEST}")
    );
    let done = provider
        .status(&task, Some(traceparent))
        .await
        .expect("status then result");
    assert_eq!(done.state, ProviderState::Succeeded);
    assert_eq!(done.video_url.as_deref(), Some(VIDEO_URL));
    assert_eq!(
        provider.cancel(&task).await.expect("cancel"),
        CancelOutcome::Cancelled,
        "400 ALREADY_COMPLETED is an answer, not an error"
    );

    let seen = seen.lock().expect("lock").clone();
    let calls: Vec<(&str, &str)> = seen
        .iter()
        .map(|s| (s.method.as_str(), s.path.as_str()))
        .collect();
    let base = format!("/fal-ai/kling-video/requests/{DOCS_REQUEST}");
    assert_eq!(
        calls,
        vec![
            ("POST", format!("/{KLING}").as_str()),
            ("GET", format!("{base}/status").as_str()),
            ("GET", base.as_str()),
            ("PUT", format!("{base}/cancel").as_str()),
        ],
        "submit uses the whole model id, the rest the app id only"
    );
    let key = format!("Key {KEY}");
    assert!(
        seen.iter()
            .all(|s| s.authorization.as_deref() == Some(key.as_str())),
        "{seen:?}"
    );
    assert_eq!(
        seen[0].body,
        Some(serde_json::json!({
            "prompt": "a paper boat in the rain",
            "duration": "8",
            "aspect_ratio": "16:9",
        }))
    );
    assert_eq!(seen[1].body, None);
    assert_eq!(
        *stub.traceparents.lock().expect("lock"),
        vec![
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_owned(),
            traceparent.to_owned(),
            traceparent.to_owned(),
        ],
        "the submit's own traceparent, then the status call's on both reads"
    );
}

#[tokio::test]
async fn failures_and_odd_answers_over_http() {
    let (stub, _seen) = fal_stub().await;
    let provider = provider(ProviderKind::Fal, &stub.base_url);
    let task = |id: &str| ProviderTask {
        id: format!("fal-ai/kling-video/requests/{id}"),
    };

    let failed = provider
        .status(&task("timed-out"), None)
        .await
        .expect("failed");
    assert_eq!(failed.state, ProviderState::Failed);
    assert_eq!(failed.error.as_deref(), Some("Request timed out"));

    let refused = provider
        .status(&task("refused"), None)
        .await
        .expect("422 result");
    assert_eq!(refused.state, ProviderState::Failed);
    assert_eq!(
        refused.error.as_deref(),
        Some("image_url: Image dimensions are too large")
    );

    let queued = provider.status(&task("queued"), None).await.expect("202");
    assert_eq!(queued.state, ProviderState::Queued);

    let odd = provider
        .status(&task("odd"), None)
        .await
        .expect_err("PAUSED");
    assert!(
        odd.is_transient() && odd.to_string().contains("PAUSED"),
        "{odd}"
    );

    // A submit refused by the model's validation: permanent, with the first message.
    let error = provider
        .submit(&fal_request("x", "fal-ai/refusing"))
        .await
        .expect_err("422");
    assert!(!error.is_transient(), "{error}");
    let text = error.to_string();
    assert!(
        text.contains("422") && text.contains("Image dimensions are too large"),
        "{text}"
    );

    // Ids and model ids that do not fit the protocol never reach the server.
    for model in ["sim-video-1", "fal-ai/../admin", "fal-ai//veo3"] {
        let error = provider
            .submit(&fal_request("x", model))
            .await
            .expect_err("invalid model id");
        assert!(
            !error.is_transient() && error.to_string().contains("model"),
            "{error}"
        );
    }
    let error = provider
        .status(
            &ProviderTask {
                id: "abc".to_owned(),
            },
            None,
        )
        .await
        .expect_err("not a fal task id");
    assert!(!error.is_transient(), "{error}");
}

// ---------------------------------------------------------------------------------------------
// Against the simulator.

#[tokio::test]
async fn sim_job_is_queued_then_runs_then_succeeds_with_a_public_url() {
    let sim = start_sim(500).await;
    let provider = sim_provider(&sim);

    let task = provider
        .submit(&fal_request("a lighthouse in a storm", KLING))
        .await
        .expect("submit");
    let request_id = task
        .id
        .strip_prefix("fal-ai/kling-video/requests/")
        .expect("the task id keeps the app id only");
    assert_eq!(request_id.len(), 36, "a UUID: {request_id}");

    let seen = poll_to_end(provider.as_ref(), &task).await;
    assert_eq!(seen[0].state, ProviderState::Queued, "{seen:?}");
    assert!(
        seen.iter().any(|s| s.state == ProviderState::InProgress),
        "{seen:?}"
    );
    assert!(
        seen.iter()
            .filter(|s| !s.state.is_terminal())
            .all(|s| s.progress.is_none()),
        "fal reports no percentage: {seen:?}"
    );
    let done = last(&seen);
    assert_eq!(done.state, ProviderState::Succeeded);
    assert_eq!(done.progress, Some(100));
    let url = format!("{}/sim/files/{request_id}.mp4", sim.base_url());
    assert_eq!(done.video_url.as_deref(), Some(url.as_str()));
    assert_eq!(done.error, None);

    let file = reqwest::get(&url).await.expect("download");
    assert_eq!(file.status(), StatusCode::OK, "fal's CDN URLs need no key");

    let stats = sim.stats();
    assert_eq!((stats.submits, stats.jobs), (1, 1));
    assert_eq!(
        stats.status_calls,
        seen.len() as u64,
        "one status call per poll (the result read is not a status call)"
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn sim_speaks_the_real_paths_auth_and_shapes() {
    // Queued for the first 500 ms: long enough for the checks below.
    let sim = start_sim(5_000).await;
    let provider = sim_provider(&sim);
    let task = provider
        .submit(&fal_request("raw checks", KLING))
        .await
        .expect("submit");
    let http = reqwest::Client::new();
    let base = format!("{}/fal", sim.base_url());
    let key = format!("Key {}", "sim-key");

    // Status under the full model id (with its endpoint path) is not the request's app.
    let request_id = task.id.rsplit('/').next().expect("id");
    let wrong = http
        .get(format!("{base}/{KLING}/requests/{request_id}/status"))
        .header("authorization", &key)
        .send()
        .await
        .expect("request");
    assert_eq!(wrong.status(), StatusCode::NOT_FOUND);

    let queued = http
        .get(format!("{base}/{}/status?logs=1", task.id))
        .header("authorization", &key)
        .send()
        .await
        .expect("request");
    assert_eq!(queued.status(), StatusCode::ACCEPTED, "202 while waiting");
    let body: serde_json::Value = queued.json().await.expect("json");
    assert_eq!(body["status"], "IN_QUEUE");
    assert_eq!(body["queue_position"], 0);
    assert!(body["status_url"]
        .as_str()
        .is_some_and(|u| u.ends_with(&format!("{}/status", task.id))));

    // A bearer token is not fal's scheme.
    let bearer = http
        .get(format!("{base}/{}/status", task.id))
        .bearer_auth("sim-key")
        .send()
        .await
        .expect("request");
    assert_eq!(bearer.status(), StatusCode::UNAUTHORIZED);
    let body: serde_json::Value = bearer.json().await.expect("json");
    assert!(body["detail"].is_string(), "{body}");

    // No prompt: a validation error in fal's shape.
    let invalid = http
        .post(format!("{base}/fal-ai/veo3"))
        .header("authorization", &key)
        .json(&serde_json::json!({ "duration": "8s" }))
        .send()
        .await
        .expect("request");
    assert_eq!(invalid.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let body: serde_json::Value = invalid.json().await.expect("json");
    assert_eq!(
        body["detail"][0]["loc"],
        serde_json::json!(["body", "prompt"])
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn sim_failure_is_failed_with_the_error() {
    let sim = start_sim(300).await;
    let provider = sim_provider(&sim);
    let task = provider
        .submit(&fal_request("a doomed render [fail]", "fal-ai/veo3"))
        .await
        .expect("submit");
    let seen = poll_to_end(provider.as_ref(), &task).await;
    let done = last(&seen);
    assert_eq!(done.state, ProviderState::Failed);
    assert_eq!(done.error.as_deref(), Some("simulated failure"));
    assert_eq!(done.video_url, None);

    // The result of a failed request answers the request error itself.
    let result = reqwest::Client::new()
        .get(format!("{}/fal/{}", sim.base_url(), task.id))
        .header("authorization", "Key sim-key")
        .send()
        .await
        .expect("request");
    assert_eq!(result.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(
        result
            .headers()
            .get("x-fal-error-type")
            .and_then(|v| v.to_str().ok()),
        Some("runner_server_error")
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn sim_cancel_works_only_while_queued() {
    let sim = start_sim(5_000).await;
    let provider = sim_provider(&sim);

    // Queued for the first 10% (500 ms): the cancel removes it.
    let task = provider
        .submit(&fal_request("cancel me", KLING))
        .await
        .expect("submit");
    assert_eq!(
        provider.cancel(&task).await.expect("cancel"),
        CancelOutcome::Cancelled
    );
    let status = provider.status(&task, None).await.expect("status");
    assert_eq!(status.state, ProviderState::Cancelled);
    // Cancelling again: ALREADY_COMPLETED, still not an error.
    assert_eq!(
        provider.cancel(&task).await.expect("again"),
        CancelOutcome::Cancelled
    );

    // Once running, the request goes on to its end.
    let running = provider
        .submit(&fal_request("too late [duration=600]", KLING))
        .await
        .expect("submit");
    let deadline = Instant::now() + Duration::from_secs(5);
    while provider.status(&running, None).await.expect("status").state != ProviderState::InProgress
    {
        assert!(Instant::now() < deadline, "never ran");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        provider.cancel(&running).await.expect("cancel"),
        CancelOutcome::Cancelled
    );
    let seen = poll_to_end(provider.as_ref(), &running).await;
    assert_eq!(last(&seen).state, ProviderState::Succeeded, "{seen:?}");

    // An unknown request: NOT_FOUND is a permanent error.
    let error = provider
        .cancel(&ProviderTask {
            id: "fal-ai/kling-video/requests/nope".to_owned(),
        })
        .await
        .expect_err("not found");
    assert!(
        !error.is_transient() && error.to_string().contains("NOT_FOUND"),
        "{error}"
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn sim_wrong_key_is_permanent() {
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
            ..sim.provider_settings(ProviderKind::Fal)
        })
        .submit(&fal_request("x", KLING))
        .await
        .expect_err("401");
        assert!(!error.is_transient(), "{error}");
        assert!(error.to_string().contains("401"), "{error}");
    }
    sim_provider(&sim)
        .submit(&fal_request("x", KLING))
        .await
        .expect("the right key works");
    sim.shutdown().await;
}

#[tokio::test]
async fn sim_rejection_is_permanent_with_the_message() {
    let sim = start_sim(300).await;
    let error = sim_provider(&sim)
        .submit(&fal_request("forbidden [reject]", KLING))
        .await
        .expect_err("400");
    assert!(!error.is_transient(), "{error}");
    let text = error.to_string();
    assert!(
        text.contains("400") && text.contains("simulated rejection"),
        "{text}"
    );
    assert_eq!(sim.stats().jobs, 0);
    sim.shutdown().await;
}

#[tokio::test]
async fn an_input_image_goes_in_the_models_image_url() {
    let sim = start_sim(500).await;
    let provider = sim_provider(&sim);
    assert!(provider.takes_image());
    let mut from_image = fal_request(
        "the frame comes alive",
        "fal-ai/kling-video/v2.1/master/image-to-video",
    );
    from_image.image_url = Some("https://cdn.example.com/frame.png".to_owned());
    let task = provider.submit(&from_image).await.expect("submit");
    let seen = poll_to_end(provider.as_ref(), &task).await;
    assert_eq!(last(&seen).state, ProviderState::Succeeded, "{seen:?}");
    let stats = sim.stats();
    assert_eq!((stats.jobs, stats.image_jobs), (1, 1));
    sim.shutdown().await;
}
