//! The `seedance` adapter (BytePlus ModelArk content generation tasks) against documented bodies,
//! a stub server and the simulator.
//!
//! Fixtures (`fixtures/seedance/`), sources:
//! - `task_succeeded.json`: the response example of ModelArk's "Query a video generation task"
//!   reference (docs.byteplus.com/docs/ModelArk, Video Generation API), as mirrored at
//!   docs.powertokens.ai/en/zmodelVideo/byteplus/seedance/seedance-tasks-query; only the masked
//!   id (`cgt-2026****-****`) was made concrete;
//! - `task_queued.json`, `task_running.json`: the same task in the other documented states, the
//!   output fields (`content`, `usage`) left out as the reference says they appear on completion;
//! - `task_failed.json`: the same task failed, with `error: {code, message}` as typed in the SDK
//!   (`byteplussdkarkruntime/types/content_generation/content_generation_task.py`,
//!   `ContentGenerationError`) and a code and message from ModelArk's error code page
//!   (docs.byteplus.com/docs/ModelArk/1299023, `OutputVideoSensitiveContentDetected`);
//! - `create_task.json`: the create-task answer `{"id": "cgt-…"}` (ModelArk 1520757).

use super::*;
use video_orchestrator::providers::seedance::{self, QUEUE_LIMIT_MESSAGE};

const CREATED: &[u8] = include_bytes!("fixtures/seedance/create_task.json");
const QUEUED: &[u8] = include_bytes!("fixtures/seedance/task_queued.json");
const RUNNING: &[u8] = include_bytes!("fixtures/seedance/task_running.json");
const SUCCEEDED: &[u8] = include_bytes!("fixtures/seedance/task_succeeded.json");
const FAILED: &[u8] = include_bytes!("fixtures/seedance/task_failed.json");

const SUCCEEDED_ID: &str = "cgt-20260521153338-k7x2q";
const QUEUED_ID: &str = "cgt-20260521153338-q1x2a";
const RUNNING_ID: &str = "cgt-20260521153338-r3y4b";

fn task(id: &str) -> ProviderTask {
    ProviderTask { id: id.to_owned() }
}

/// The simulator's Seedance protocol (`/seedance/api/v3`), with the tests' timeout.
fn sim_provider(sim: &SimHandle) -> Arc<dyn VideoProvider> {
    build(&ProviderSettings {
        timeout_ms: 2_000,
        ..sim.provider_settings(ProviderKind::Seedance)
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
    let queued = seedance::parse_task(QUEUED).expect("queued");
    assert_eq!(
        queued,
        ProviderStatus {
            state: ProviderState::Queued,
            progress: None,
            video_url: None,
            video_url_expires_at: None,
            video_seconds: Some(5.0),
            error: None,
        }
    );
    let running = seedance::parse_task(RUNNING).expect("running");
    assert_eq!(running.state, ProviderState::InProgress);
    assert_eq!(running.progress, None, "ModelArk reports no progress");
    assert_eq!(running.video_url, None);

    let done = seedance::parse_task(SUCCEEDED).expect("succeeded");
    assert_eq!(
        done,
        ProviderStatus {
            state: ProviderState::Succeeded,
            progress: Some(100),
            video_url: Some(
                "https://ark-content-generation-cn-beijing.tos-cn-beijing.volces.com/xxx"
                    .to_owned()
            ),
            // updated_at + 24 h: generated videos are kept 24 hours.
            video_url_expires_at: Some(at(1_779_348_874) + chrono::Duration::hours(24)),
            video_seconds: Some(5.0),
            error: None,
        }
    );

    let failed = seedance::parse_task(FAILED).expect("failed");
    assert_eq!(failed.state, ProviderState::Failed);
    assert_eq!(
        failed.error.as_deref(),
        Some("OutputVideoSensitiveContentDetected: The request failed because the output video may contain sensitive information.")
    );
    assert_eq!(failed.video_url, None);
    assert_eq!(failed.video_url_expires_at, None);

    // The two other documented values, inline: same task, other status.
    let with_status = |status: &str| {
        String::from_utf8_lossy(QUEUED).replace("\"queued\"", &format!("\"{status}\""))
    };
    let cancelled = seedance::parse_task(with_status("cancelled").as_bytes()).expect("cancelled");
    assert_eq!(cancelled.state, ProviderState::Cancelled);
    assert_eq!(cancelled.error, None);
    let expired = seedance::parse_task(with_status("expired").as_bytes()).expect("expired");
    assert_eq!(expired.state, ProviderState::Failed);
    let text = expired.error.expect("expired explains");
    assert!(
        text.contains("expired") && text.contains("172800"),
        "{text}"
    );

    let unknown = seedance::parse_task(with_status("paused").as_bytes()).expect_err("unknown");
    assert!(unknown.is_transient(), "{unknown}");
    assert!(unknown.to_string().contains("\"paused\""), "{unknown}");

    let garbage = seedance::parse_task(b"<html>").expect_err("not a task");
    assert!(!garbage.is_transient(), "{garbage}");
}

/// A stub ModelArk at `/api/v3` answering from the fixtures, recording each request as JSON.
async fn modelark_stub() -> Stub {
    async fn answer(
        State(recorded): State<Recorded>,
        method: axum::http::Method,
        uri: axum::http::Uri,
        headers: HeaderMap,
        body: axum::body::Bytes,
    ) -> (StatusCode, [(&'static str, &'static str); 1], Vec<u8>) {
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
                "traceparent": header("traceparent"),
                "body": serde_json::from_slice::<serde_json::Value>(&body).ok(),
            })
            .to_string(),
        );
        let json = [("content-type", "application/json")];
        let tasks = "/api/v3/contents/generations/tasks";
        let found = match (method.as_str(), path.strip_prefix(tasks)) {
            ("POST", Some("")) => Some(CREATED.to_vec()),
            ("GET", Some(id)) => match id.trim_start_matches('/') {
                SUCCEEDED_ID => Some(SUCCEEDED.to_vec()),
                QUEUED_ID => Some(QUEUED.to_vec()),
                RUNNING_ID => Some(RUNNING.to_vec()),
                _ => None,
            },
            ("DELETE", Some(_)) => Some(b"{}".to_vec()),
            _ => None,
        };
        match found {
            Some(body) => (StatusCode::OK, json, body),
            None => (
                StatusCode::NOT_FOUND,
                json,
                br#"{"error":{"code":"NotFound","message":"The specified task is not found.","param":"","type":"NotFound"}}"#.to_vec(),
            ),
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
async fn the_adapter_speaks_modelark_over_http() {
    let stub = modelark_stub().await;
    let provider = provider(ProviderKind::Seedance, &format!("{}/api/v3", stub.base_url));

    let created = provider
        .submit(&request("a lighthouse in a storm"))
        .await
        .expect("submit");
    assert_eq!(created.id, SUCCEEDED_ID);
    let done = provider
        .status(
            &task(SUCCEEDED_ID),
            Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        )
        .await
        .expect("status");
    assert_eq!(done.state, ProviderState::Succeeded);
    assert!(done.video_url.is_some());

    let seen = recorded(&stub);
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(seen[0]["method"], "POST");
    assert_eq!(seen[0]["path"], "/api/v3/contents/generations/tasks");
    assert_eq!(seen[0]["authorization"], format!("Bearer {KEY}"));
    assert_eq!(
        seen[0]["traceparent"],
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    );
    assert_eq!(
        seen[0]["body"],
        serde_json::json!({
            "model": "sim-video-1",
            "content": [{ "type": "text", "text": "a lighthouse in a storm" }],
            "duration": 8,
            "resolution": "720p",
            "ratio": "16:9",
        })
    );
    assert_eq!(seen[1]["method"], "GET");
    assert_eq!(
        seen[1]["path"],
        format!("/api/v3/contents/generations/tasks/{SUCCEEDED_ID}")
    );
    assert_eq!(seen[1]["authorization"], format!("Bearer {KEY}"));
    assert_eq!(
        seen[1]["traceparent"],
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    );
}

#[tokio::test]
async fn cancel_deletes_only_a_queued_task() {
    let stub = modelark_stub().await;
    let provider = provider(ProviderKind::Seedance, &format!("{}/api/v3", stub.base_url));

    assert_eq!(
        provider.cancel(&task(QUEUED_ID)).await.expect("queued"),
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
        provider.cancel(&task("cgt-gone")).await.expect("gone"),
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
    let tasks = "/api/v3/contents/generations/tasks";
    assert_eq!(
        calls,
        vec![
            format!("GET {tasks}/{QUEUED_ID}"),
            format!("DELETE {tasks}/{QUEUED_ID}"),
            format!("GET {tasks}/{RUNNING_ID}"),
            format!("GET {tasks}/{SUCCEEDED_ID}"),
            format!("GET {tasks}/cgt-gone"),
        ],
        "a DELETE on a running or finished task would be refused or delete its record"
    );
}

#[tokio::test]
async fn a_queue_limit_refusal_is_transient_whatever_its_status() {
    async fn refuse_400() -> (StatusCode, [(&'static str, &'static str); 1], &'static str) {
        (
            StatusCode::BAD_REQUEST,
            [("content-type", "application/json")],
            r#"{"error":{"code":"QueuedTaskLimitExceeded","message":"The number of queued tasks of your account has reached the limit of 120.","param":"","type":"BadRequest"}}"#,
        )
    }
    async fn refuse_429() -> (StatusCode, [(&'static str, &'static str); 2], &'static str) {
        (
            StatusCode::TOO_MANY_REQUESTS,
            [("content-type", "application/json"), ("retry-after", "7")],
            r#"{"error":{"code":"RateLimitExceeded","message":"Too many queued tasks: the queue limit is 120.","param":"","type":"TooManyRequests"}}"#,
        )
    }
    let stub = serve(
        Router::new()
            .route("/a/contents/generations/tasks", post(refuse_400))
            .route("/b/contents/generations/tasks", post(refuse_429)),
    )
    .await;
    for (prefix, retry_after) in [("a", None), ("b", Some(Duration::from_secs(7)))] {
        let error = provider(
            ProviderKind::Seedance,
            &format!("{}/{prefix}", stub.base_url),
        )
        .submit(&request("one more"))
        .await
        .expect_err("refused");
        assert!(error.is_transient(), "{error}");
        assert!(!error.unanswered());
        assert_eq!(error.retry_after(), retry_after);
        assert!(error.message().starts_with(QUEUE_LIMIT_MESSAGE), "{error}");
        assert!(error.message().contains("120"), "{error}");
    }
}

#[test]
fn a_base_url_with_the_tasks_path_is_refused() {
    let error = ProviderKind::Seedance
        .build(
            "ark",
            &settings(
                ProviderKind::Seedance,
                "https://ark.ap-southeast.bytepluses.com/api/v3/contents/generations/tasks",
            ),
        )
        .expect_err("invalid");
    assert!(
        error.to_string().contains("providers.ark.base_url"),
        "{error}"
    );
}

#[tokio::test]
async fn a_task_runs_to_success_with_an_expiring_public_url() {
    let sim = start_sim(500).await;
    let provider = sim_provider(&sim);
    let task = provider
        .submit(&request("a fox in the snow"))
        .await
        .expect("submit");
    assert!(task.id.starts_with("cgt-"), "{}", task.id);
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
    assert_eq!(
        url,
        format!("{}/seedance/files/{}.mp4", sim.base_url(), task.id)
    );
    let expires = done.video_url_expires_at.expect("expiry");
    let in_a_day = Utc::now() + chrono::Duration::hours(24);
    assert!((expires - in_a_day).num_seconds().abs() < 10, "{expires}");
    let file = reqwest::get(&url).await.expect("download");
    assert_eq!(file.status(), StatusCode::OK);
    assert_eq!(sim.stats().status_calls, seen.len() as u64);
    sim.shutdown().await;
}

#[tokio::test]
async fn a_fail_prompt_fails_with_the_providers_error() {
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
        Some("InternalServiceError: simulated failure")
    );
    assert_eq!(done.video_url, None);
    sim.shutdown().await;
}

#[tokio::test]
async fn cancel_cancels_a_queued_task_and_leaves_running_and_finished_ones() {
    let sim = start_sim(60_000).await;
    let provider = sim_provider(&sim);

    // Queued for the first 10% of 60 s.
    let queued = provider.submit(&request("long one")).await.expect("submit");
    assert_eq!(
        provider.cancel(&queued).await.expect("cancel"),
        CancelOutcome::Cancelled
    );
    let status = provider.status(&queued, None).await.expect("status");
    assert_eq!(status.state, ProviderState::Cancelled);
    // Cancelling again changes nothing.
    assert_eq!(
        provider.cancel(&queued).await.expect("again"),
        CancelOutcome::Cancelled
    );

    // Running from 300 ms to 3 s.
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
    let kept = provider.status(&finished, None).await.expect("not deleted");
    assert_eq!(kept.state, ProviderState::Succeeded);
    assert_eq!(sim.stats().jobs, 3);

    // The protocol itself: DELETE refuses a running task and deletes a finished one.
    let http = reqwest::Client::new();
    let delete = |id: &str| {
        http.delete(format!(
            "{}/seedance/api/v3/contents/generations/tasks/{id}",
            sim.base_url()
        ))
        .bearer_auth(KEY)
        .send()
    };
    let refused = delete(&running.id).await.expect("delete running");
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);
    let body: serde_json::Value = refused.json().await.expect("json");
    assert_eq!(body["error"]["code"], "OperationDenied.UnsupportedPhase");
    let deleted = delete(&finished.id).await.expect("delete finished");
    assert_eq!(deleted.status(), StatusCode::OK);
    assert_eq!(sim.stats().jobs, 2);
    let gone = provider.status(&finished, None).await.expect_err("deleted");
    assert!(
        !gone.is_transient() && gone.to_string().contains("404"),
        "{gone}"
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn a_full_queue_is_transient_and_creates_nothing() {
    let sim = start_sim(300).await;
    let error = sim_provider(&sim)
        .submit(&request("one too many [queue-full]"))
        .await
        .expect_err("refused");
    assert!(error.is_transient(), "{error}");
    assert!(error.message().starts_with(QUEUE_LIMIT_MESSAGE), "{error}");
    assert!(error.to_string().contains("400"), "{error}");
    assert_eq!(sim.stats().submits, 1);
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
        api_key: "wrong-key".into(),
        ..sim.provider_settings(ProviderKind::Seedance)
    });
    let error = wrong.submit(&request("x")).await.expect_err("401");
    assert!(!error.is_transient(), "{error}");
    assert!(error.to_string().contains("401"), "{error}");
    assert!(
        error.to_string().contains("missing or invalid credentials"),
        "{error}"
    );
    sim_provider(&sim)
        .submit(&request("x"))
        .await
        .expect("the right key works");
    sim.shutdown().await;
}
