//! The `dashscope` adapter (Alibaba Wan on DashScope, asynchronous tasks) against documented
//! bodies, a stub server and the simulator.
//!
//! Fixtures (`fixtures/dashscope/`), sources:
//! - `create_task.json`, `task_succeeded.json`, `task_failed.json`, `task_unknown.json`: the
//!   response examples of Model Studio's "Wan text-to-video API reference"
//!   (alibabacloud.com/help/en/model-studio/text-to-video-api-reference; the success example as
//!   also mirrored at s.apifox.cn for `/api/v1/tasks/{task_id}`). The masked ids (`…-xxxxxx`)
//!   were made concrete, and the masked `Expires=xxxxxx` of the signed URL was set to
//!   `end_time` (UTC+8) + 24 h;
//! - `task_running.json`: the field set of the "Manage asynchronous tasks" page
//!   (…/model-studio/manage-asynchronous-tasks) for a `RUNNING` task (`submit_time`,
//!   `scheduled_time`, no output yet);
//! - `error_invalid_api_key.json`, `error_throttling.json`: codes and messages of Model Studio's
//!   error code page (…/model-studio/error-code) in the `{code, message, request_id}` shape.

use super::*;
use video_orchestrator::providers::dashscope;

const CREATED: &[u8] = include_bytes!("fixtures/dashscope/create_task.json");
const RUNNING: &[u8] = include_bytes!("fixtures/dashscope/task_running.json");
const SUCCEEDED: &[u8] = include_bytes!("fixtures/dashscope/task_succeeded.json");
const FAILED: &[u8] = include_bytes!("fixtures/dashscope/task_failed.json");
const UNKNOWN: &[u8] = include_bytes!("fixtures/dashscope/task_unknown.json");
const INVALID_KEY: &[u8] = include_bytes!("fixtures/dashscope/error_invalid_api_key.json");
const THROTTLING: &[u8] = include_bytes!("fixtures/dashscope/error_throttling.json");

const CREATED_ID: &str = "0385dc79-5ff8-4d82-bcb6-5e6b2d1c9f01";
const RUNNING_ID: &str = "a8532587-fa8c-4ef8-82be-0c46b17950d1";
const SUCCEEDED_ID: &str = "436310e6-5404-42ef-b875-2a7e9c0d5b13";

fn task(id: &str) -> ProviderTask {
    ProviderTask { id: id.to_owned() }
}

/// The simulator's DashScope protocol (`/dashscope/api/v1`), with the tests' timeout.
fn sim_provider(sim: &SimHandle) -> Arc<dyn VideoProvider> {
    build(&ProviderSettings {
        timeout_ms: 2_000,
        ..sim.provider_settings(ProviderKind::Dashscope)
    })
}

/// Polls until `state` is seen (5 s at most).
async fn poll_until(
    provider: &dyn VideoProvider,
    task: &ProviderTask,
    state: ProviderState,
) -> ProviderStatus {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let status = provider.status(task, None).await.expect("status");
        if status.state == state {
            return status;
        }
        assert!(Instant::now() < deadline, "never {state:?}: {status:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn documented_tasks_parse() {
    let now = Utc::now();
    assert_eq!(
        dashscope::parse_created(CREATED).expect("created"),
        task(CREATED_ID)
    );

    let running = dashscope::parse_task(RUNNING, now).expect("running");
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

    let done = dashscope::parse_task(SUCCEEDED, now).expect("succeeded");
    assert_eq!(
        done,
        ProviderStatus {
            state: ProviderState::Succeeded,
            progress: Some(100),
            video_url: Some(
                "https://dashscope-result-wlcb.oss-cn-wulanchabu.aliyuncs.com/1d/xxx.mp4?Expires=1753708078"
                    .to_owned()
            ),
            // The URL's own signed expiry.
            video_url_expires_at: Some(at(1_753_708_078)),
            video_seconds: Some(5.0),
            error: None,
        }
    );
    // Without a signed expiry: end_time (UTC+8) + 24 h.
    let unsigned = String::from_utf8_lossy(SUCCEEDED).replace("?Expires=1753708078", "");
    let done = dashscope::parse_task(unsigned.as_bytes(), now).expect("succeeded");
    assert_eq!(
        done.video_url_expires_at,
        Some(rfc3339("2025-07-28T13:07:58.027Z")),
        "end_time 2025-07-27 21:07:58.027 (UTC+8) + 24 h"
    );
    // Without end_time either: 24 h from when the success was read.
    let bare = br#"{"request_id":"r","output":{"task_id":"t","task_status":"SUCCEEDED","video_url":"https://x/v.mp4"}}"#;
    let done = dashscope::parse_task(bare, now).expect("succeeded");
    assert_eq!(
        done.video_url_expires_at,
        Some(now + chrono::Duration::hours(24))
    );

    let failed = dashscope::parse_task(FAILED, now).expect("failed");
    assert_eq!(failed.state, ProviderState::Failed);
    assert_eq!(
        failed.error.as_deref(),
        Some("InvalidParameter: The size is not match xxxxxx")
    );
    assert_eq!(failed.video_url, None);

    let unknown = dashscope::parse_task(UNKNOWN, now).expect("unknown");
    assert_eq!(unknown.state, ProviderState::Failed);
    let text = unknown.error.expect("explained");
    assert!(
        text.contains("502a00b1-19d9-4839-a82f-6c4e1d7b3a28") && text.contains("24 hours"),
        "{text}"
    );

    // The other documented values, inline.
    let with_status = |status: &str| {
        String::from_utf8_lossy(RUNNING).replace("\"RUNNING\"", &format!("\"{status}\""))
    };
    for (status, state) in [
        ("PENDING", ProviderState::Queued),
        ("SUSPENDED", ProviderState::Queued),
        ("CANCELED", ProviderState::Cancelled),
    ] {
        let parsed = dashscope::parse_task(with_status(status).as_bytes(), now).expect(status);
        assert_eq!(parsed.state, state, "{status}");
        assert_eq!(parsed.error, None, "{status}");
    }
    let strange =
        dashscope::parse_task(with_status("ARCHIVED").as_bytes(), now).expect_err("undocumented");
    assert!(strange.is_transient(), "{strange}");
    assert!(strange.to_string().contains("\"ARCHIVED\""), "{strange}");
    let garbage = dashscope::parse_task(br#"{"code":"x"}"#, now).expect_err("not a task");
    assert!(!garbage.is_transient(), "{garbage}");
}

/// A stub DashScope at `/api/v1` answering from the fixtures, recording each request as JSON.
async fn dashscope_stub() -> Stub {
    async fn answer(
        State(recorded): State<Recorded>,
        method: axum::http::Method,
        uri: axum::http::Uri,
        headers: HeaderMap,
        body: axum::body::Bytes,
    ) -> (
        StatusCode,
        axum::response::AppendHeaders<Vec<(&'static str, &'static str)>>,
        Vec<u8>,
    ) {
        let header = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let path = uri.path().to_owned();
        recorded.lock().expect("lock").push(
            serde_json::json!({
                "method": method.as_str(),
                "path": path,
                "authorization": header("authorization"),
                "async": header("x-dashscope-async"),
                "traceparent": header("traceparent"),
                "body": serde_json::from_slice::<serde_json::Value>(&body).ok(),
            })
            .to_string(),
        );
        let json = ("content-type", "application/json");
        let headers = |list: Vec<(&'static str, &'static str)>| axum::response::AppendHeaders(list);
        let ok = |body: &[u8]| (StatusCode::OK, headers(vec![json]), body.to_vec());
        match (method.as_str(), path.as_str()) {
            ("POST", "/api/v1/services/aigc/video-generation/video-synthesis") => ok(CREATED),
            ("GET", p) if p == format!("/api/v1/tasks/{RUNNING_ID}") => ok(RUNNING),
            ("GET", p) if p == format!("/api/v1/tasks/{SUCCEEDED_ID}") => ok(SUCCEEDED),
            ("GET", "/api/v1/tasks/pending") => ok(&String::from_utf8_lossy(RUNNING)
                .replace("\"RUNNING\"", "\"PENDING\"")
                .into_bytes()),
            ("POST", "/api/v1/tasks/pending/cancel") => ok(br#"{"request_id":"r"}"#),
            ("GET", "/api/v1/tasks/bad-key") => (
                StatusCode::UNAUTHORIZED,
                headers(vec![json]),
                INVALID_KEY.to_vec(),
            ),
            ("GET", "/api/v1/tasks/throttled") => (
                StatusCode::TOO_MANY_REQUESTS,
                headers(vec![json, ("retry-after", "3")]),
                THROTTLING.to_vec(),
            ),
            _ => ok(UNKNOWN),
        }
    }
    serve(Router::new().fallback(answer)).await
}

fn recorded(stub: &Stub) -> Vec<serde_json::Value> {
    stub.traceparents
        .lock()
        .expect("lock")
        .iter()
        .map(|line| serde_json::from_str(line).expect("recorded json"))
        .collect()
}

#[tokio::test]
async fn the_adapter_speaks_dashscope_over_http() {
    let stub = dashscope_stub().await;
    let provider = provider(
        ProviderKind::Dashscope,
        &format!("{}/api/v1", stub.base_url),
    );

    let created = provider
        .submit(&request("a cat running on the grass"))
        .await
        .expect("submit");
    assert_eq!(created.id, CREATED_ID);
    let done = provider
        .status(&task(SUCCEEDED_ID), None)
        .await
        .expect("status");
    assert_eq!(done.state, ProviderState::Succeeded);
    assert!(done.video_url.is_some());

    let seen = recorded(&stub);
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(seen[0]["method"], "POST");
    assert_eq!(
        seen[0]["path"],
        "/api/v1/services/aigc/video-generation/video-synthesis"
    );
    assert_eq!(seen[0]["authorization"], format!("Bearer {KEY}"));
    assert_eq!(seen[0]["async"], "enable");
    assert_eq!(
        seen[0]["traceparent"],
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    );
    assert_eq!(
        seen[0]["body"],
        serde_json::json!({
            "model": "sim-video-1",
            "input": { "prompt": "a cat running on the grass" },
            "parameters": { "duration": 8, "size": "1280*720" },
        })
    );
    assert_eq!(seen[1]["method"], "GET");
    assert_eq!(seen[1]["path"], format!("/api/v1/tasks/{SUCCEEDED_ID}"));
    assert_eq!(seen[1]["authorization"], format!("Bearer {KEY}"));
}

#[tokio::test]
async fn dashscope_errors_are_classified_by_status() {
    let stub = dashscope_stub().await;
    let provider = provider(
        ProviderKind::Dashscope,
        &format!("{}/api/v1", stub.base_url),
    );
    let bad_key = provider
        .status(&task("bad-key"), None)
        .await
        .expect_err("401");
    assert!(!bad_key.is_transient(), "{bad_key}");
    assert!(
        bad_key.to_string().contains("401")
            && bad_key.to_string().contains("Invalid API-key provided."),
        "{bad_key}"
    );
    let throttled = provider
        .status(&task("throttled"), None)
        .await
        .expect_err("429");
    assert!(throttled.is_transient(), "{throttled}");
    assert_eq!(throttled.retry_after(), Some(Duration::from_secs(3)));
    assert!(
        throttled
            .to_string()
            .contains("Requests rate limit exceeded"),
        "{throttled}"
    );
}

#[tokio::test]
async fn cancel_cancels_only_a_pending_task() {
    let stub = dashscope_stub().await;
    let provider = provider(
        ProviderKind::Dashscope,
        &format!("{}/api/v1", stub.base_url),
    );
    assert_eq!(
        provider.cancel(&task("pending")).await.expect("pending"),
        CancelOutcome::Cancelled
    );
    assert_eq!(
        provider.cancel(&task(RUNNING_ID)).await.expect("running"),
        CancelOutcome::Unsupported
    );
    assert_eq!(
        provider
            .cancel(&task(SUCCEEDED_ID))
            .await
            .expect("finished"),
        CancelOutcome::Cancelled
    );
    assert_eq!(
        provider.cancel(&task("expired-id")).await.expect("unknown"),
        CancelOutcome::Cancelled
    );
    let calls: Vec<String> = recorded(&stub)
        .iter()
        .map(|r| {
            format!(
                "{} {}",
                r["method"].as_str().unwrap_or(""),
                r["path"].as_str().unwrap_or("")
            )
        })
        .collect();
    assert_eq!(
        calls,
        vec![
            "GET /api/v1/tasks/pending".to_owned(),
            "POST /api/v1/tasks/pending/cancel".to_owned(),
            format!("GET /api/v1/tasks/{RUNNING_ID}"),
            format!("GET /api/v1/tasks/{SUCCEEDED_ID}"),
            "GET /api/v1/tasks/expired-id".to_owned(),
        ]
    );
}

#[test]
fn the_kind_caps_status_calls_at_twenty_per_second() {
    let defaults = ProviderSettings::new(ProviderKind::Dashscope, dashscope::DEFAULT_BASE_URL);
    assert_eq!(defaults.max_status_rps(), Some(20.0));
    let lowered = ProviderSettings {
        max_status_rps: Some(5.0),
        ..defaults
    };
    assert_eq!(lowered.max_status_rps(), Some(5.0));

    let error = ProviderKind::Dashscope
        .build(
            "wan",
            &settings(
                ProviderKind::Dashscope,
                "https://dashscope-intl.aliyuncs.com/api/v1/services/aigc/video-generation/video-synthesis",
            ),
        )
        .expect_err("invalid");
    assert!(
        error.to_string().contains("providers.wan.base_url"),
        "{error}"
    );
}

#[tokio::test]
async fn status_calls_over_the_cap_are_throttled_before_they_are_sent() {
    let sim = start_sim(60_000).await;
    let provider = build(&ProviderSettings {
        max_status_rps: Some(2.0),
        timeout_ms: 2_000,
        ..sim.provider_settings(ProviderKind::Dashscope)
    });
    let task = provider.submit(&request("watched")).await.expect("submit");
    let mut results = Vec::new();
    for _ in 0..6 {
        results.push(provider.status(&task, None).await);
    }
    let sent = results.iter().filter(|r| r.is_ok()).count();
    assert!(
        results[0].is_ok() && results[1].is_ok(),
        "the burst of two goes through: {results:?}"
    );
    assert!(
        sent < results.len(),
        "some calls must be held back: {results:?}"
    );
    for error in results.iter().filter_map(|r| r.as_ref().err()) {
        assert!(
            matches!(error, ProviderError::Throttled { .. }),
            "not a provider error: {error}"
        );
        assert!(error.is_transient(), "{error}");
        assert!(
            error.retry_after().is_some_and(|d| d > Duration::ZERO),
            "{error}"
        );
        assert!(error.to_string().contains("max_status_rps=2"), "{error}");
    }
    assert_eq!(
        sim.stats().status_calls,
        sent as u64,
        "throttled calls never reach the provider"
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn a_task_runs_to_success_with_a_signed_url() {
    let sim = start_sim(500).await;
    let provider = sim_provider(&sim);
    let task = provider
        .submit(&request("a fox in the snow"))
        .await
        .expect("submit");
    assert_eq!(task.id.len(), 36, "a UUID: {}", task.id);
    let seen = poll_to_end(provider.as_ref(), &task).await;
    assert!(!seen[0].state.is_terminal(), "{seen:?}");
    assert!(
        seen.iter().any(|s| s.state == ProviderState::InProgress),
        "{seen:?}"
    );
    assert!(
        seen.iter()
            .filter(|s| !s.state.is_terminal())
            .all(|s| s.progress.is_none()),
        "no progress is reported: {seen:?}"
    );
    let done = last(&seen);
    assert_eq!(done.state, ProviderState::Succeeded);
    assert_eq!(done.progress, Some(100));
    assert_eq!(done.video_seconds, Some(8.0));
    let url = done.video_url.clone().expect("url");
    assert!(
        url.starts_with(&format!(
            "{}/dashscope/files/{}.mp4?Expires=",
            sim.base_url(),
            task.id
        )),
        "{url}"
    );
    let expires = done.video_url_expires_at.expect("expiry");
    let in_a_day = Utc::now() + chrono::Duration::hours(24);
    assert!((expires - in_a_day).num_seconds().abs() < 10, "{expires}");
    let file = reqwest::get(&url).await.expect("download");
    assert_eq!(file.status(), StatusCode::OK);
    sim.shutdown().await;
}

#[tokio::test]
async fn a_fail_prompt_fails_and_an_unknown_id_is_a_failed_job() {
    let sim = start_sim(300).await;
    let provider = sim_provider(&sim);
    let task = provider
        .submit(&request("a doomed render [fail]"))
        .await
        .expect("submit");
    let seen = poll_to_end(provider.as_ref(), &task).await;
    let done = last(&seen);
    assert_eq!(done.state, ProviderState::Failed);
    assert_eq!(
        done.error.as_deref(),
        Some("InternalError.Algo: simulated failure")
    );
    assert_eq!(done.video_url, None);

    let gone = provider
        .status(&self::task("3f0b6a8e-0000-4000-8000-000000000000"), None)
        .await
        .expect("UNKNOWN is an answer");
    assert_eq!(gone.state, ProviderState::Failed);
    assert!(gone
        .error
        .is_some_and(|e| e.contains("unknown to DashScope")));
    sim.shutdown().await;
}

#[tokio::test]
async fn a_submit_without_the_async_header_is_refused() {
    let sim = start_sim(300).await;
    let response = reqwest::Client::new()
        .post(format!(
            "{}/dashscope/api/v1/services/aigc/video-generation/video-synthesis",
            sim.base_url()
        ))
        .bearer_auth(KEY)
        .json(&serde_json::json!({ "model": "wan2.6-t2v", "input": { "prompt": "x" } }))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    let body: serde_json::Value = response.json().await.expect("json");
    assert_eq!(body["code"], "AccessDenied");
    assert_eq!(
        body["message"],
        "current user api does not support synchronous calls"
    );
    assert!(body["request_id"].is_string());
    assert_eq!(sim.stats().jobs, 0);
    sim.shutdown().await;
}

#[tokio::test]
async fn cancel_cancels_a_pending_task_and_leaves_running_and_finished_ones() {
    let sim = start_sim(60_000).await;
    let provider = sim_provider(&sim);

    let pending = provider.submit(&request("long one")).await.expect("submit");
    assert_eq!(
        provider.cancel(&pending).await.expect("cancel"),
        CancelOutcome::Cancelled
    );
    assert_eq!(
        provider.status(&pending, None).await.expect("status").state,
        ProviderState::Cancelled
    );

    let running = provider
        .submit(&request("busy [duration=3000]"))
        .await
        .expect("submit");
    poll_until(provider.as_ref(), &running, ProviderState::InProgress).await;
    assert_eq!(
        provider.cancel(&running).await.expect("cancel"),
        CancelOutcome::Unsupported
    );
    assert!(!provider
        .status(&running, None)
        .await
        .expect("still there")
        .state
        .is_terminal());

    let finished = provider
        .submit(&request("quick [duration=100]"))
        .await
        .expect("submit");
    poll_to_end(provider.as_ref(), &finished).await;
    assert_eq!(
        provider.cancel(&finished).await.expect("cancel"),
        CancelOutcome::Cancelled
    );
    assert_eq!(
        provider
            .status(&finished, None)
            .await
            .expect("status")
            .state,
        ProviderState::Succeeded
    );

    // The protocol itself: the cancel endpoint refuses anything but PENDING.
    let refused = reqwest::Client::new()
        .post(format!(
            "{}/dashscope/api/v1/tasks/{}/cancel",
            sim.base_url(),
            running.id
        ))
        .bearer_auth(KEY)
        .send()
        .await
        .expect("request");
    assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
    let body: serde_json::Value = refused.json().await.expect("json");
    assert_eq!(body["code"], "UnsupportedOperation");
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
        api_key: "wrong-key".into(),
        ..sim.provider_settings(ProviderKind::Dashscope)
    });
    let error = wrong.submit(&request("x")).await.expect_err("401");
    assert!(!error.is_transient(), "{error}");
    assert!(error.to_string().contains("401"), "{error}");
    sim_provider(&sim)
        .submit(&request("x"))
        .await
        .expect("the right key works");
    sim.shutdown().await;
}
