//! The `runway` adapter against its recorded fixtures, a stub server and the simulator.
//!
//! Fixtures (`fixtures/runway/`):
//! - `task_pending`, `task_throttled`, `task_running`, `task_succeeded`, `task_failed`: the
//!   examples of `GET /v1/tasks/{id}` in Runway's OpenAPI spec (API version 2024-11-06, servers
//!   `https://api.dev.runwayml.com`; as vendored by tryAGI/Runway `src/libs/Runway/openapi.yaml`),
//!   verbatim;
//! - `task_cancelled`: the spec's `CANCELLED` variant ("a cancelled or deleted task"), which has
//!   no example, with the task id of runwayml/sdk-python's `tests/api_resources/test_tasks.py`;
//! - `text_to_video_created`: the create answer (`{id}`, schema only in the spec) with the id of
//!   the spec's code samples;
//! - `error_validation`, `error_not_found`: answers recorded from the live API and published in a
//!   public integration note (a 400 body-validation failure; the 404 of `GET` after `DELETE`).

use axum::body::Bytes;
use axum::http::{Method, Uri};
use axum::response::{IntoResponse, Response};
use video_orchestrator::providers::runway::{parse_task, DEFAULT_API_VERSION};

use super::*;

const PENDING: &[u8] = include_bytes!("fixtures/runway/task_pending.json");
const THROTTLED: &[u8] = include_bytes!("fixtures/runway/task_throttled.json");
const RUNNING: &[u8] = include_bytes!("fixtures/runway/task_running.json");
const SUCCEEDED: &[u8] = include_bytes!("fixtures/runway/task_succeeded.json");
const FAILED: &[u8] = include_bytes!("fixtures/runway/task_failed.json");
const CANCELLED: &[u8] = include_bytes!("fixtures/runway/task_cancelled.json");
const CREATED: &[u8] = include_bytes!("fixtures/runway/text_to_video_created.json");
const VALIDATION_ERROR: &[u8] = include_bytes!("fixtures/runway/error_validation.json");
const NOT_FOUND: &[u8] = include_bytes!("fixtures/runway/error_not_found.json");

fn queued(state: ProviderState) -> ProviderStatus {
    ProviderStatus {
        state,
        progress: None,
        video_url: None,
        video_url_expires_at: None,
        video_seconds: None,
        error: None,
    }
}

#[test]
fn documented_tasks_parse_with_every_status() {
    assert_eq!(
        parse_task(PENDING).expect("pending"),
        queued(ProviderState::Queued)
    );
    // Over the concurrency limit: stored, waiting to be queued.
    assert_eq!(
        parse_task(THROTTLED).expect("throttled"),
        queued(ProviderState::Queued)
    );
    assert_eq!(
        parse_task(RUNNING).expect("running"),
        ProviderStatus {
            progress: Some(20),
            ..queued(ProviderState::InProgress)
        }
    );
    assert_eq!(
        parse_task(SUCCEEDED).expect("succeeded"),
        ProviderStatus {
            state: ProviderState::Succeeded,
            progress: Some(100),
            video_url: Some("https://example.com/output1.jpg".to_owned()),
            // "URLs expire within 24-48 hours": the lower bound, from the creation time.
            video_url_expires_at: Some(
                rfc3339("2024-06-27T19:49:32.335Z") + chrono::Duration::hours(24)
            ),
            video_seconds: None,
            error: None,
        }
    );
    assert_eq!(
        parse_task(FAILED).expect("failed"),
        ProviderStatus {
            error: Some(
                "The provided image was flagged by content moderation. (SAFETY.INPUT.IMAGE)"
                    .to_owned()
            ),
            ..queued(ProviderState::Failed)
        }
    );
    let cancelled = parse_task(CANCELLED).expect("cancelled");
    assert_eq!(cancelled, queued(ProviderState::Cancelled));
    assert!(cancelled.state.is_terminal());
}

#[test]
fn an_unknown_status_is_transient_and_named_and_a_wrong_body_permanent() {
    let error = parse_task(
        br#"{"id":"08388106-1b46-4f5c-bd46-1c1d7ee86892","status":"EXPLODED","createdAt":"2024-06-27T19:49:32.335Z"}"#,
    )
    .expect_err("unknown status");
    assert!(error.is_transient(), "{error}");
    assert!(
        error.to_string().contains("\"EXPLODED\"") && error.to_string().contains("THROTTLED"),
        "{error}"
    );
    let error = parse_task(br#"{"task": "x"}"#).expect_err("not a task");
    assert!(!error.is_transient(), "{error}");
    assert!(
        error.to_string().contains("unexpected response body"),
        "{error}"
    );
}

#[test]
fn runway_is_polled_at_most_every_five_seconds_unless_configured() {
    let default = ProviderSettings::new(ProviderKind::Runway, "https://api.dev.runwayml.com");
    assert_eq!(default.min_status_interval(), Duration::from_secs(5));
    let explicit = ProviderSettings {
        min_status_interval_ms: Some(10_000),
        ..default.clone()
    };
    assert_eq!(explicit.min_status_interval(), Duration::from_secs(10));
    let zero = ProviderSettings {
        min_status_interval_ms: Some(0),
        ..default
    };
    assert_eq!(zero.min_status_interval(), Duration::ZERO);
}

#[test]
fn an_unusable_api_version_names_the_key() {
    for version in ["", "2024-11\u{7f}-06"] {
        let error = ProviderKind::Runway
            .build(
                "sim",
                &ProviderSettings {
                    api_version: Some(version.to_owned()),
                    ..settings(ProviderKind::Runway, "https://api.dev.runwayml.com")
                },
            )
            .expect_err("invalid api_version");
        assert!(
            error.to_string().contains("providers.sim.api_version"),
            "{error}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// A stub server serving the fixtures, recording what the adapter sends.

/// One request as the stub saw it.
fn seen(method: &Method, uri: &Uri, headers: &HeaderMap, body: &[u8]) -> String {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    serde_json::json!({
        "method": method.as_str(),
        "path": uri.path(),
        "authorization": header("authorization"),
        "version": header("x-runway-version"),
        "traceparent": header("traceparent"),
        "body": serde_json::from_slice::<serde_json::Value>(body).ok(),
    })
    .to_string()
}

fn json_reply(status: StatusCode, body: &'static [u8]) -> Response {
    (status, [("content-type", "application/json")], body).into_response()
}

async fn runway_stub() -> Stub {
    async fn create(
        State(recorded): State<Recorded>,
        method: Method,
        uri: Uri,
        headers: HeaderMap,
        body: Bytes,
    ) -> Response {
        recorded
            .lock()
            .expect("lock")
            .push(seen(&method, &uri, &headers, &body));
        if body.windows(9).any(|w| w == b"\"invalid\"") {
            return json_reply(StatusCode::BAD_REQUEST, VALIDATION_ERROR);
        }
        json_reply(StatusCode::OK, CREATED)
    }
    async fn task_route(
        State(recorded): State<Recorded>,
        Path(id): Path<String>,
        method: Method,
        uri: Uri,
        headers: HeaderMap,
    ) -> Response {
        recorded
            .lock()
            .expect("lock")
            .push(seen(&method, &uri, &headers, b""));
        let body = match id.as_str() {
            "pending" => PENDING,
            "throttled" => THROTTLED,
            "running" => RUNNING,
            "succeeded" => SUCCEEDED,
            "failed" => FAILED,
            "cancelled" => CANCELLED,
            _ => return json_reply(StatusCode::NOT_FOUND, NOT_FOUND),
        };
        if method == Method::DELETE {
            return StatusCode::NO_CONTENT.into_response();
        }
        json_reply(StatusCode::OK, body)
    }
    serve(
        Router::new()
            .route("/v1/text_to_video", post(create))
            .route("/v1/image_to_video", post(create))
            .route("/v1/tasks/{id}", get(task_route).delete(task_route)),
    )
    .await
}

fn requests(stub: &Stub) -> Vec<serde_json::Value> {
    stub.traceparents
        .lock()
        .expect("lock")
        .drain(..)
        .map(|line| serde_json::from_str(&line).expect("recorded json"))
        .collect()
}

fn task(id: &str) -> ProviderTask {
    ProviderTask { id: id.to_owned() }
}

#[tokio::test]
async fn the_adapter_speaks_runways_protocol_over_http() {
    let stub = runway_stub().await;
    let runway = provider(ProviderKind::Runway, &stub.base_url);
    let bearer = format!("Bearer {KEY}");
    let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    // Submit: text_to_video with the size as a ratio, the duration, both headers.
    let submitted = runway
        .submit(&request("a lighthouse in a storm"))
        .await
        .expect("submit");
    assert_eq!(submitted, task("17f20503-6c24-4c16-946b-35dbbce2af2f"));
    let mut bare = request("no size asked");
    bare.size = None;
    bare.duration_seconds = None;
    bare.traceparent = None;
    runway.submit(&bare).await.expect("submit without size");
    let mut portrait = request("portrait");
    portrait.size = Some("720x1280".to_owned());
    runway.submit(&portrait).await.expect("portrait");
    let mut odd = request("odd size");
    odd.size = Some("720p".to_owned());
    let error = runway.submit(&odd).await.expect_err("not WxH");
    assert!(
        !error.is_transient() && error.to_string().contains("720p"),
        "{error}"
    );
    let sent = requests(&stub);
    assert_eq!(
        sent.len(),
        3,
        "a size that is not WxH is not sent: {sent:?}"
    );
    assert_eq!(
        sent[0],
        serde_json::json!({
            "method": "POST",
            "path": "/v1/text_to_video",
            "authorization": bearer,
            "version": DEFAULT_API_VERSION,
            "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "body": {
                "model": "sim-video-1",
                "promptText": "a lighthouse in a storm",
                "ratio": "1280:720",
                "duration": 8,
            },
        })
    );
    assert_eq!(
        sent[1]["body"],
        serde_json::json!({ "model": "sim-video-1", "promptText": "no size asked", "ratio": "1280:720" })
    );
    assert_eq!(sent[1]["traceparent"], serde_json::Value::Null);
    assert_eq!(sent[2]["body"]["ratio"], "720:1280");

    // Status: the documented bodies, with both headers and the trace context.
    let running = runway
        .status(&task("running"), Some(traceparent))
        .await
        .expect("running");
    assert_eq!(running.state, ProviderState::InProgress);
    assert_eq!(running.progress, Some(20));
    for (id, state) in [
        ("pending", ProviderState::Queued),
        ("throttled", ProviderState::Queued),
        ("succeeded", ProviderState::Succeeded),
        ("failed", ProviderState::Failed),
        ("cancelled", ProviderState::Cancelled),
    ] {
        let status = runway.status(&task(id), None).await.expect(id);
        assert_eq!(status.state, state, "{id}");
    }
    let sent = requests(&stub);
    assert_eq!(
        sent[0],
        serde_json::json!({
            "method": "GET",
            "path": "/v1/tasks/running",
            "authorization": bearer,
            "version": DEFAULT_API_VERSION,
            "traceparent": traceparent,
            "body": null,
        })
    );

    // A task that is gone: 404 with Runway's message, permanent.
    let gone = runway
        .status(&task("deleted"), None)
        .await
        .expect_err("404");
    assert!(!gone.is_transient(), "{gone}");
    assert!(
        gone.to_string().contains("404") && gone.to_string().contains("Could not find Task"),
        "{gone}"
    );

    // Cancel: DELETE; a 404 (already gone) is what we wanted too.
    for id in ["running", "deleted"] {
        assert_eq!(
            runway.cancel(&task(id)).await.expect(id),
            CancelOutcome::Cancelled
        );
    }
    let sent = requests(&stub);
    let deletes: Vec<_> = sent
        .iter()
        .filter(|r| r["method"] == "DELETE")
        .map(|r| {
            (
                r["path"].clone(),
                r["version"].clone(),
                r["authorization"].clone(),
            )
        })
        .collect();
    assert_eq!(
        deletes,
        vec![
            (
                "/v1/tasks/running".into(),
                DEFAULT_API_VERSION.into(),
                bearer.clone().into()
            ),
            (
                "/v1/tasks/deleted".into(),
                DEFAULT_API_VERSION.into(),
                bearer.clone().into()
            ),
        ]
    );

    // A body-validation 400: permanent, with the issue's message.
    let mut invalid = request("x");
    invalid.model = "invalid".to_owned();
    let error = runway.submit(&invalid).await.expect_err("400");
    assert!(!error.is_transient(), "{error}");
    let text = error.to_string();
    assert!(
        text.contains("400") && text.contains("Asset duration must be at most 30 seconds"),
        "{text}"
    );

    // `api_version` is what is sent.
    let pinned = build(&ProviderSettings {
        api_version: Some("2025-01-01".to_owned()),
        ..settings(ProviderKind::Runway, &stub.base_url)
    });
    pinned
        .status(&task("pending"), None)
        .await
        .expect("pending");
    let sent = requests(&stub);
    assert_eq!(sent.last().expect("a request")["version"], "2025-01-01");
}

// ---------------------------------------------------------------------------------------------
// Against the simulator.

fn sim_runway(sim: &SimHandle) -> Arc<dyn VideoProvider> {
    build(&sim_settings(sim))
}

fn sim_settings(sim: &SimHandle) -> ProviderSettings {
    ProviderSettings {
        timeout_ms: 2_000,
        ..sim.provider_settings(ProviderKind::Runway)
    }
}

async fn raw_task(sim: &SimHandle, id: &str) -> serde_json::Value {
    reqwest::Client::new()
        .get(format!("{}/runway/v1/tasks/{id}", sim.base_url()))
        .bearer_auth("sim-key")
        .header("X-Runway-Version", DEFAULT_API_VERSION)
        .send()
        .await
        .expect("get task")
        .json()
        .await
        .expect("task json")
}

#[tokio::test]
async fn a_sim_task_progresses_and_succeeds_with_an_output_url() {
    let sim = start_sim(500).await;
    let runway = sim_runway(&sim);
    let submitted = runway
        .submit(&request("a lighthouse in a storm"))
        .await
        .expect("submit");
    assert!(
        uuid::Uuid::parse_str(&submitted.id).is_ok(),
        "{}",
        submitted.id
    );
    let seen = poll_to_end(runway.as_ref(), &submitted).await;
    assert!(!seen[0].state.is_terminal(), "{seen:?}");
    assert_progress_advances(&seen);
    let done = last(&seen);
    assert_eq!(done.state, ProviderState::Succeeded);
    assert_eq!(done.progress, Some(100));
    let url = format!("{}/runway/files/{}.mp4", sim.base_url(), submitted.id);
    assert_eq!(done.video_url.as_deref(), Some(url.as_str()));
    let expires = done.video_url_expires_at.expect("expiry");
    let in_a_day = Utc::now() + chrono::Duration::hours(24);
    assert!(
        (expires - in_a_day).num_seconds().abs() < 30,
        "expires {expires}, expected about {in_a_day}"
    );
    assert_eq!(done.error, None);

    // The output URL is public, like Runway's signed URLs.
    let file = reqwest::get(&url).await.expect("download");
    assert_eq!(file.status(), StatusCode::OK);
    assert!(!file.bytes().await.expect("body").is_empty());

    let stats = sim.stats();
    assert_eq!(stats.submits, 1);
    assert_eq!(stats.jobs, 1);
    assert_eq!(
        stats.status_calls_by_job.get(&submitted.id),
        Some(&(seen.len() as u64))
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn a_throttled_prompt_waits_as_throttled_then_pending_tasks_as_pending() {
    let sim = start_sim(60_000).await;
    let runway = sim_runway(&sim);
    for (prompt, status) in [
        ("over the limit [throttled]", "THROTTLED"),
        ("within the limit", "PENDING"),
    ] {
        let submitted = runway.submit(&request(prompt)).await.expect("submit");
        let raw = raw_task(&sim, &submitted.id).await;
        assert_eq!(raw["status"], status, "{raw}");
        assert!(raw.get("progress").is_none(), "{raw}");
        let observed = runway.status(&submitted, None).await.expect("status");
        assert_eq!(observed, queued(ProviderState::Queued));
    }
    sim.shutdown().await;
}

#[tokio::test]
async fn a_fail_prompt_fails_with_the_reason_and_the_code() {
    let sim = start_sim(300).await;
    let runway = sim_runway(&sim);
    let submitted = runway
        .submit(&request("a doomed render [fail]"))
        .await
        .expect("submit");
    let seen = poll_to_end(runway.as_ref(), &submitted).await;
    let done = last(&seen);
    assert_eq!(done.state, ProviderState::Failed);
    assert_eq!(
        done.error.as_deref(),
        Some("simulated failure (INTERNAL.BAD_OUTPUT.CODE01)")
    );
    assert_eq!(done.video_url, None);
    let raw = raw_task(&sim, &submitted.id).await;
    assert_eq!(raw["failureCode"], "INTERNAL.BAD_OUTPUT.CODE01", "{raw}");
    sim.shutdown().await;
}

#[tokio::test]
async fn cancel_aborts_a_running_task_and_deletes_a_finished_one() {
    let sim = start_sim(5_000).await;
    let runway = sim_runway(&sim);
    let running = runway.submit(&request("long one")).await.expect("submit");
    let finished = runway
        .submit(&request("quick one [duration=50]"))
        .await
        .expect("submit");
    let seen = poll_to_end(runway.as_ref(), &finished).await;
    assert_eq!(last(&seen).state, ProviderState::Succeeded);
    assert_eq!(sim.stats().jobs, 2);

    for submitted in [&running, &finished] {
        assert_eq!(
            runway.cancel(submitted).await.expect("cancel"),
            CancelOutcome::Cancelled
        );
        // Aborted or deleted, the task cannot be fetched any more.
        let gone = runway
            .status(submitted, None)
            .await
            .expect_err("deleted task");
        assert!(!gone.is_transient(), "{gone}");
        assert!(
            gone.to_string().contains("404") && gone.to_string().contains("Could not find Task"),
            "{gone}"
        );
        // Runway answers 404 to a second DELETE, "safe to ignore".
        assert_eq!(
            runway.cancel(submitted).await.expect("cancel again"),
            CancelOutcome::Cancelled
        );
    }
    assert_eq!(sim.stats().jobs, 0);
    sim.shutdown().await;
}

#[tokio::test]
async fn the_sim_requires_a_known_version_header() {
    let sim = start_sim(300).await;
    let http = reqwest::Client::new();
    let missing = http
        .post(format!("{}/runway/v1/text_to_video", sim.base_url()))
        .bearer_auth("sim-key")
        .json(&serde_json::json!({ "model": "gen4.5", "promptText": "x", "ratio": "1280:720" }))
        .send()
        .await
        .expect("request");
    assert_eq!(missing.status(), StatusCode::BAD_REQUEST);
    let body: serde_json::Value = missing.json().await.expect("json");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("X-Runway-Version")),
        "{body}"
    );
    assert_eq!(sim.stats().jobs, 0);

    let outdated = build(&ProviderSettings {
        api_version: Some("2024-09-13".to_owned()),
        ..sim_settings(&sim)
    });
    let error = outdated.submit(&request("x")).await.expect_err("400");
    assert!(!error.is_transient(), "{error}");
    assert!(
        error.to_string().contains("400") && error.to_string().contains("2024-09-13"),
        "{error}"
    );

    // A body Runway would refuse: the issue is reported.
    let invalid = http
        .post(format!("{}/runway/v1/text_to_video", sim.base_url()))
        .bearer_auth("sim-key")
        .header("X-Runway-Version", DEFAULT_API_VERSION)
        .json(&serde_json::json!({ "model": "gen4.5", "promptText": "x" }))
        .send()
        .await
        .expect("request");
    assert_eq!(invalid.status(), StatusCode::BAD_REQUEST);
    let body: serde_json::Value = invalid.json().await.expect("json");
    assert_eq!(body["error"], "Validation of body failed", "{body}");
    assert_eq!(body["issues"][0]["path"][0], "ratio", "{body}");

    let rejected = sim_runway(&sim)
        .submit(&request("forbidden [reject]"))
        .await
        .expect_err("400");
    assert!(!rejected.is_transient(), "{rejected}");
    assert!(
        rejected.to_string().contains("simulated rejection"),
        "{rejected}"
    );
    assert_eq!(sim.stats().jobs, 0);
    sim.shutdown().await;
}

#[tokio::test]
async fn a_wrong_key_is_permanent() {
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
        api_key: "key_wrong".into(),
        ..sim_settings(&sim)
    });
    let error = wrong.submit(&request("x")).await.expect_err("401");
    assert!(!error.is_transient(), "{error}");
    assert!(error.to_string().contains("401"), "{error}");
    sim_runway(&sim)
        .submit(&request("x"))
        .await
        .expect("the right key works");
    sim.shutdown().await;
}

#[tokio::test]
async fn an_image_request_goes_to_image_to_video_with_its_prompt_image() {
    let stub = runway_stub().await;
    let runway = provider(ProviderKind::Runway, &stub.base_url);
    let mut from_image = request("the frame comes alive");
    from_image.image_url = Some("https://cdn.example.com/frame.png".to_owned());
    runway.submit(&from_image).await.expect("submit");
    let sent = requests(&stub);
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(
        (&sent[0]["method"], &sent[0]["path"]),
        (
            &serde_json::json!("POST"),
            &serde_json::json!("/v1/image_to_video")
        ),
        "{sent:?}"
    );
    assert_eq!(
        sent[0]["body"]["promptImage"],
        "https://cdn.example.com/frame.png"
    );
    assert_eq!(sent[0]["body"]["promptText"], "the frame comes alive");
    assert_eq!(sent[0]["body"]["ratio"], "1280:720");
    assert!(runway.takes_image());

    // The simulator's image_to_video needs the image, and its task is fetched like any other.
    let sim = start_sim(500).await;
    let runway = sim_runway(&sim);
    let submitted = runway.submit(&from_image).await.expect("submit");
    let seen = poll_to_end(runway.as_ref(), &submitted).await;
    assert_eq!(last(&seen).state, ProviderState::Succeeded);
    let stats = sim.stats();
    assert_eq!((stats.jobs, stats.image_jobs), (1, 1));
    sim.shutdown().await;
}
