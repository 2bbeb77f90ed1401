//! Provider adapters against the simulated provider (in process, on loopback), against stub
//! servers returning documented or broken bodies, and the provider configuration.
//!
//! This file covers what every adapter shares and the first two protocols; each later kind has
//! a module of its own (its fixtures under `fixtures/<kind>/`).

mod dashscope;
mod fal;
mod gemini;
mod kling;
mod luma;
mod minimax;
mod runway;
mod seedance;
mod vertex_veo;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::Router;
use chrono::{DateTime, Utc};
use video_orchestrator::providers::openai_videos;
use video_orchestrator::providers::replicate;
use video_orchestrator::providers::sim::{SimFaults, SimHandle, SimProvider, SimSettings};
use video_orchestrator::providers::{
    CancelOutcome, ModelRoute, ProviderError, ProviderKind, ProviderSettings, ProviderState,
    ProviderStatus, ProviderTask, Providers, RoutingSettings, SubmitRequest, VideoProvider,
};

const KEY: &str = "sk-test-provider-key-0123456789";

async fn start_sim(duration_ms: u64) -> SimHandle {
    SimProvider::start(
        "127.0.0.1:0".parse().expect("address"),
        SimSettings {
            duration_ms,
            ..SimSettings::default()
        },
    )
    .await
    .expect("sim starts")
}

fn settings(kind: ProviderKind, base_url: &str) -> ProviderSettings {
    ProviderSettings {
        api_key: KEY.into(),
        timeout_ms: 2_000,
        max_concurrency: 8,
        ..ProviderSettings::new(kind, base_url)
    }
}

fn build(settings: &ProviderSettings) -> Arc<dyn VideoProvider> {
    settings
        .kind
        .build("sim", settings)
        .expect("valid settings")
}

fn provider(kind: ProviderKind, base_url: &str) -> Arc<dyn VideoProvider> {
    build(&settings(kind, base_url))
}

fn request(prompt: &str) -> SubmitRequest {
    SubmitRequest {
        request_id: "req-1".to_owned(),
        attempt_id: "6f1c2d3e-0000-4000-8000-000000000001".to_owned(),
        model: "sim-video-1".to_owned(),
        prompt: prompt.to_owned(),
        duration_seconds: Some(8),
        size: Some("1280x720".to_owned()),
        image_url: None,
        metadata: None,
        traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_owned()),
    }
}

/// Polls every 30 ms until a terminal state (5 s at most), returning every observation.
async fn poll_to_end(provider: &dyn VideoProvider, task: &ProviderTask) -> Vec<ProviderStatus> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut seen = Vec::new();
    loop {
        let status = provider.status(task, None).await.expect("status");
        let done = status.state.is_terminal();
        seen.push(status);
        if done {
            return seen;
        }
        assert!(Instant::now() < deadline, "no terminal state: {seen:?}");
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
}

fn last(seen: &[ProviderStatus]) -> &ProviderStatus {
    seen.last().expect("at least one status")
}

/// Progress only moves forward, and some observation was mid-way.
fn assert_progress_advances(seen: &[ProviderStatus]) {
    let progress: Vec<u8> = seen.iter().filter_map(|s| s.progress).collect();
    assert!(
        progress.windows(2).all(|w| w[0] <= w[1]),
        "progress went backwards: {progress:?}"
    );
    assert!(
        seen.iter().any(|s| s.state == ProviderState::InProgress
            && s.progress.is_some_and(|p| p > 0 && p < 100)),
        "no in-progress observation with a partial percentage: {seen:?}"
    );
}

#[tokio::test]
async fn openai_job_progresses_and_succeeds_with_the_content_url() {
    let sim = start_sim(500).await;
    let provider = provider(ProviderKind::OpenaiVideos, &sim.base_url());

    let task = provider
        .submit(&request("a lighthouse in a storm"))
        .await
        .expect("submit");
    assert!(task.id.starts_with("video_"), "{}", task.id);
    let seen = poll_to_end(provider.as_ref(), &task).await;

    assert!(!seen[0].state.is_terminal(), "{seen:?}");
    assert_progress_advances(&seen);
    let done = last(&seen);
    assert_eq!(done.state, ProviderState::Succeeded);
    assert_eq!(done.progress, Some(100));
    let url = format!("{}/v1/videos/{}/content", sim.base_url(), task.id);
    assert_eq!(done.video_url.as_deref(), Some(url.as_str()));
    assert_eq!(done.video_seconds, Some(8.0));
    assert!(done.video_url_expires_at.is_some_and(|at| at > Utc::now()));
    assert_eq!(done.error, None);

    // The reported URL serves the file, with the key.
    let file = reqwest::Client::new()
        .get(&url)
        .bearer_auth(KEY)
        .send()
        .await
        .expect("download");
    assert_eq!(file.status(), StatusCode::OK);
    assert!(!file.bytes().await.expect("body").is_empty());

    let stats = sim.stats();
    assert_eq!(stats.submits, 1);
    assert_eq!(stats.jobs, 1);
    assert_eq!(stats.status_calls, seen.len() as u64);
    assert_eq!(
        stats.status_calls_by_job.get(&task.id),
        Some(&(seen.len() as u64))
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn replicate_job_reports_log_progress_and_an_expiring_url() {
    let sim = start_sim(500).await;
    let provider = provider(ProviderKind::Replicate, &sim.base_url());

    let task = provider
        .submit(&request("a fox in the snow"))
        .await
        .expect("submit");
    assert_eq!(task.id.len(), 26, "{}", task.id);
    let seen = poll_to_end(provider.as_ref(), &task).await;

    assert!(!seen[0].state.is_terminal(), "{seen:?}");
    assert!(
        seen.iter()
            .filter(|s| s.state == ProviderState::Queued)
            .all(|s| s.progress.is_none()),
        "`starting` logs carry no percentage: {seen:?}"
    );
    assert_progress_advances(&seen);
    let done = last(&seen);
    assert_eq!(done.state, ProviderState::Succeeded);
    let url = done.video_url.clone().expect("output url");
    assert_eq!(url, format!("{}/sim/files/{}.mp4", sim.base_url(), task.id));
    assert_eq!(done.video_seconds, Some(8.0));
    let expires = done.video_url_expires_at.expect("expiry");
    let in_an_hour = Utc::now() + chrono::Duration::hours(1);
    assert!(
        (expires - in_an_hour).num_seconds().abs() < 10,
        "expires {expires}, expected about {in_an_hour}"
    );

    // Replicate output URLs are public.
    let file = reqwest::get(&url).await.expect("download");
    assert_eq!(file.status(), StatusCode::OK);
    assert_eq!(sim.stats().status_calls, seen.len() as u64);
    sim.shutdown().await;
}

#[tokio::test]
async fn a_fail_prompt_ends_in_failure_with_the_simulated_error() {
    let sim = start_sim(300).await;
    for kind in [ProviderKind::OpenaiVideos, ProviderKind::Replicate] {
        let provider = provider(kind, &sim.base_url());
        let task = provider
            .submit(&request("a doomed render [fail]"))
            .await
            .expect("submit");
        let seen = poll_to_end(provider.as_ref(), &task).await;
        let done = last(&seen);
        assert_eq!(done.state, ProviderState::Failed, "{kind:?}");
        assert_eq!(done.error.as_deref(), Some("simulated failure"), "{kind:?}");
        assert_eq!(done.video_url, None, "{kind:?}");
    }
    sim.shutdown().await;
}

#[tokio::test]
async fn duration_override_in_the_prompt_sets_the_job_duration() {
    // The default duration would be far longer than the deadline below.
    let sim = start_sim(60_000).await;
    let provider = provider(ProviderKind::Replicate, &sim.base_url());
    let started = Instant::now();
    let task = provider
        .submit(&request("quick one [duration=200]"))
        .await
        .expect("submit");
    let seen = poll_to_end(provider.as_ref(), &task).await;
    assert_eq!(last(&seen).state, ProviderState::Succeeded);
    assert!(started.elapsed() < Duration::from_secs(2));
    sim.shutdown().await;
}

#[tokio::test]
async fn replicate_cancel_cancels_the_prediction() {
    let sim = start_sim(5_000).await;
    let provider = provider(ProviderKind::Replicate, &sim.base_url());
    let task = provider.submit(&request("long one")).await.expect("submit");

    assert_eq!(
        provider.cancel(&task).await.expect("cancel"),
        CancelOutcome::Cancelled
    );
    let status = provider.status(&task, None).await.expect("status");
    assert_eq!(status.state, ProviderState::Cancelled);
    assert!(status.state.is_terminal());
    sim.shutdown().await;
}

#[tokio::test]
async fn openai_cancel_is_unsupported_unless_cancel_deletes() {
    let sim = start_sim(5_000).await;

    let keep = provider(ProviderKind::OpenaiVideos, &sim.base_url());
    let task = keep.submit(&request("keep me")).await.expect("submit");
    assert_eq!(
        keep.cancel(&task).await.expect("cancel"),
        CancelOutcome::Unsupported
    );
    assert!(
        !keep
            .status(&task, None)
            .await
            .expect("still there")
            .state
            .is_terminal(),
        "an unsupported cancel must not touch the job"
    );

    let deleting = build(&ProviderSettings {
        cancel_deletes: true,
        ..settings(ProviderKind::OpenaiVideos, &sim.base_url())
    });
    assert_eq!(
        deleting.cancel(&task).await.expect("delete"),
        CancelOutcome::Cancelled
    );
    let gone = deleting
        .status(&task, None)
        .await
        .expect_err("deleted video");
    assert!(!gone.is_transient(), "{gone}");
    assert!(gone.to_string().contains("404"), "{gone}");
    // Deleting again finds nothing, which is still the outcome we wanted.
    assert_eq!(
        deleting.cancel(&task).await.expect("delete again"),
        CancelOutcome::Cancelled
    );
    assert_eq!(sim.stats().jobs, 0);
    sim.shutdown().await;
}

#[tokio::test]
async fn rate_limit_is_transient_with_the_retry_after_delay() {
    let sim = start_sim(300).await;
    for kind in [ProviderKind::OpenaiVideos, ProviderKind::Replicate] {
        let provider = provider(kind, &sim.base_url());
        sim.set_faults(SimFaults::default());
        let task = provider.submit(&request("ok")).await.expect("submit");

        sim.set_faults(SimFaults {
            rate_limit_rate: 1.0,
            ..SimFaults::default()
        });
        let submit = provider.submit(&request("limited")).await.expect_err("429");
        let status = provider.status(&task, None).await.expect_err("429");
        for error in [submit, status] {
            assert!(error.is_transient(), "{kind:?}: {error}");
            assert_eq!(
                error.retry_after(),
                Some(Duration::from_secs(1)),
                "{kind:?}"
            );
            assert!(error.to_string().contains("429"), "{error}");
        }
    }
    sim.shutdown().await;
}

#[tokio::test]
async fn server_errors_are_transient() {
    let sim = start_sim(300).await;
    sim.set_faults(SimFaults {
        error_rate: 1.0,
        ..SimFaults::default()
    });
    for kind in [ProviderKind::OpenaiVideos, ProviderKind::Replicate] {
        let error = provider(kind, &sim.base_url())
            .submit(&request("x"))
            .await
            .expect_err("500");
        assert!(error.is_transient(), "{kind:?}: {error}");
        assert_eq!(error.retry_after(), None);
        assert!(
            error.to_string().contains("simulated server error"),
            "{error}"
        );
    }
    sim.shutdown().await;
}

#[tokio::test]
async fn a_rejected_prompt_is_permanent_with_the_providers_message() {
    let sim = start_sim(300).await;
    for kind in [ProviderKind::OpenaiVideos, ProviderKind::Replicate] {
        let error = provider(kind, &sim.base_url())
            .submit(&request("forbidden [reject]"))
            .await
            .expect_err("400");
        assert!(!error.is_transient(), "{kind:?}: {error}");
        assert_eq!(error.retry_after(), None);
        let text = error.to_string();
        assert!(
            text.contains("400") && text.contains("simulated rejection"),
            "{text}"
        );
    }
    assert_eq!(sim.stats().jobs, 0);
    sim.shutdown().await;
}

#[tokio::test]
async fn unavailable_stays_transient_and_flaky_succeeds_on_the_third_attempt() {
    let sim = start_sim(300).await;
    for kind in [ProviderKind::OpenaiVideos, ProviderKind::Replicate] {
        let provider = provider(kind, &sim.base_url());
        for _ in 0..3 {
            let error = provider
                .submit(&request("never [unavailable]"))
                .await
                .expect_err("503");
            assert!(error.is_transient(), "{error}");
            assert!(error.to_string().contains("503"), "{error}");
        }
        let flaky = request(&format!("{kind:?} sometimes [flaky]"));
        for _ in 0..2 {
            let error = provider.submit(&flaky).await.expect_err("503");
            assert!(error.is_transient(), "{error}");
        }
        provider.submit(&flaky).await.expect("third attempt");
    }
    assert_eq!(sim.stats().submits, 12);
    assert_eq!(sim.stats().jobs, 2);
    sim.shutdown().await;
}

#[tokio::test]
async fn a_client_timeout_is_transient_and_shutdown_cuts_hangs_short() {
    let sim = start_sim(300).await;
    sim.set_faults(SimFaults {
        hang_rate: 1.0,
        ..SimFaults::default()
    });
    for kind in [ProviderKind::OpenaiVideos, ProviderKind::Replicate] {
        let provider = build(&ProviderSettings {
            timeout_ms: 300,
            ..settings(kind, &sim.base_url())
        });
        let started = Instant::now();
        let error = provider
            .status(
                &ProviderTask {
                    id: "any".to_owned(),
                },
                None,
            )
            .await
            .expect_err("timeout");
        assert!(error.is_transient(), "{kind:?}: {error}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
    }
    let stopping = Instant::now();
    tokio::time::timeout(Duration::from_secs(5), sim.shutdown())
        .await
        .expect("shutdown does not wait for the 60 s hangs");
    assert!(stopping.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn an_unknown_or_missing_key_is_permanent() {
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
    for kind in [ProviderKind::OpenaiVideos, ProviderKind::Replicate] {
        for key in ["wrong-key", ""] {
            let error = build(&ProviderSettings {
                api_key: key.into(),
                ..settings(kind, &sim.base_url())
            })
            .submit(&request("x"))
            .await
            .expect_err("401");
            assert!(!error.is_transient(), "{kind:?}: {error}");
            assert!(error.to_string().contains("401"), "{error}");
        }
        provider(kind, &sim.base_url())
            .submit(&request("x"))
            .await
            .expect("the right key works");
    }
    sim.shutdown().await;
}

#[tokio::test]
async fn the_concurrency_limit_bounds_requests_in_flight() {
    let sim = start_sim(5_000).await;
    sim.set_faults(SimFaults {
        latency_ms: 200,
        ..SimFaults::default()
    });
    let limited = build(&ProviderSettings {
        max_concurrency: 1,
        timeout_ms: 5_000,
        ..settings(ProviderKind::Replicate, &sim.base_url())
    });
    let task = ProviderTask {
        id: "unknown".to_owned(),
    };
    let started = Instant::now();
    let results = futures::future::join_all((0..3).map(|_| limited.status(&task, None))).await;
    let elapsed = started.elapsed();
    assert!(results.iter().all(Result::is_err), "unknown ids are 404s");
    assert!(
        elapsed >= Duration::from_millis(580),
        "three 200 ms calls through one permit took only {elapsed:?}"
    );
    sim.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Stub servers: documented bodies and broken ones.

struct Stub {
    base_url: String,
    traceparents: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Stub {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type Recorded = Arc<Mutex<Vec<String>>>;

async fn serve(router: Router<Recorded>) -> Stub {
    let traceparents: Recorded = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base_url = format!("http://{}", listener.local_addr().expect("addr"));
    let app = router.with_state(Arc::clone(&traceparents));
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Stub {
        base_url,
        traceparents,
        task,
    }
}

fn record(recorded: &Recorded, headers: &HeaderMap) {
    if let Some(value) = headers.get("traceparent").and_then(|v| v.to_str().ok()) {
        recorded.lock().expect("lock").push(value.to_owned());
    }
}

const OPENAI_IN_PROGRESS: &[u8] = include_bytes!("fixtures/openai_video_in_progress.json");
const OPENAI_COMPLETED: &[u8] = include_bytes!("fixtures/openai_video_completed.json");
const OPENAI_FAILED: &[u8] = include_bytes!("fixtures/openai_video_failed.json");
const REPLICATE_PROCESSING: &[u8] = include_bytes!("fixtures/replicate_prediction_processing.json");
const REPLICATE_SUCCEEDED: &[u8] = include_bytes!("fixtures/replicate_prediction_succeeded.json");
const REPLICATE_FAILED: &[u8] = include_bytes!("fixtures/replicate_prediction_failed.json");

fn fixture(name: &str) -> &'static [u8] {
    match name {
        "openai_in_progress" => OPENAI_IN_PROGRESS,
        "openai_completed" => OPENAI_COMPLETED,
        "openai_failed" => OPENAI_FAILED,
        "replicate_processing" => REPLICATE_PROCESSING,
        "replicate_succeeded" => REPLICATE_SUCCEEDED,
        "replicate_failed" => REPLICATE_FAILED,
        _ => b"{}",
    }
}

async fn fixture_server() -> Stub {
    async fn by_name(
        State(recorded): State<Recorded>,
        Path(name): Path<String>,
        headers: HeaderMap,
    ) -> ([(&'static str, &'static str); 1], &'static [u8]) {
        record(&recorded, &headers);
        ([("content-type", "application/json")], fixture(&name))
    }
    serve(
        Router::new()
            .route("/v1/videos/{id}", get(by_name))
            .route("/v1/predictions/{id}", get(by_name)),
    )
    .await
}

fn at(seconds: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(seconds, 0).expect("timestamp")
}

fn rfc3339(text: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(text)
        .expect("timestamp")
        .with_timezone(&Utc)
}

#[test]
fn documented_openai_video_objects_parse() {
    let base = "https://api.openai.com";
    let running = openai_videos::parse_video(OPENAI_IN_PROGRESS, base).expect("in progress");
    assert_eq!(
        running,
        ProviderStatus {
            state: ProviderState::InProgress,
            progress: Some(33),
            video_url: None,
            video_url_expires_at: None,
            video_seconds: Some(8.0),
            error: None,
        }
    );
    let done = openai_videos::parse_video(OPENAI_COMPLETED, base).expect("completed");
    assert_eq!(
        done,
        ProviderStatus {
            state: ProviderState::Succeeded,
            progress: Some(100),
            video_url: Some(
                "https://api.openai.com/v1/videos/video_68e4f1b2c3d48190a1b2c3d4e5f60718/content"
                    .to_owned()
            ),
            video_url_expires_at: Some(at(1_759_919_542)),
            video_seconds: Some(8.0),
            error: None,
        }
    );
    let failed = openai_videos::parse_video(OPENAI_FAILED, base).expect("failed");
    assert_eq!(failed.state, ProviderState::Failed);
    assert_eq!(
        failed.error.as_deref(),
        Some("Your request was blocked by our moderation system.")
    );
    assert_eq!(failed.video_url, None);
    assert_eq!(failed.video_seconds, Some(4.0));
}

#[test]
fn documented_replicate_predictions_parse() {
    let running = replicate::parse_prediction(REPLICATE_PROCESSING).expect("processing");
    assert_eq!(
        running,
        ProviderStatus {
            state: ProviderState::InProgress,
            progress: Some(47),
            video_url: None,
            video_url_expires_at: None,
            video_seconds: Some(5.0),
            error: None,
        }
    );
    let done = replicate::parse_prediction(REPLICATE_SUCCEEDED).expect("succeeded");
    assert_eq!(
        done,
        ProviderStatus {
            state: ProviderState::Succeeded,
            progress: Some(100),
            video_url: Some(
                "https://replicate.delivery/xezq/8fKzQm2aY3c1Lh0pW9vGq4nRbXe7TdJs5uVw6oIy/output.mp4"
                    .to_owned()
            ),
            video_url_expires_at: Some(
                rfc3339("2025-03-12T10:21:19.407125Z") + chrono::Duration::hours(1)
            ),
            video_seconds: Some(5.0),
            error: None,
        }
    );
    let failed = replicate::parse_prediction(REPLICATE_FAILED).expect("failed");
    assert_eq!(failed.state, ProviderState::Failed);
    assert_eq!(
        failed.error.as_deref(),
        Some("CUDA out of memory. Tried to allocate 2.50 GiB")
    );
    assert_eq!(failed.progress, Some(10));
    assert_eq!(failed.video_url, None);
}

#[tokio::test]
async fn adapters_read_documented_bodies_over_http_and_forward_traceparent() {
    let stub = fixture_server().await;
    let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    let openai = provider(ProviderKind::OpenaiVideos, &stub.base_url);
    let done = openai
        .status(
            &ProviderTask {
                id: "openai_completed".to_owned(),
            },
            Some(traceparent),
        )
        .await
        .expect("completed");
    assert_eq!(done.state, ProviderState::Succeeded);
    assert_eq!(
        done.video_url,
        Some(format!(
            "{}/v1/videos/video_68e4f1b2c3d48190a1b2c3d4e5f60718/content",
            stub.base_url
        ))
    );
    let failed = openai
        .status(
            &ProviderTask {
                id: "openai_failed".to_owned(),
            },
            None,
        )
        .await
        .expect("failed");
    assert_eq!(failed.state, ProviderState::Failed);

    let replicate = provider(ProviderKind::Replicate, &stub.base_url);
    let running = replicate
        .status(
            &ProviderTask {
                id: "replicate_processing".to_owned(),
            },
            Some(traceparent),
        )
        .await
        .expect("processing");
    assert_eq!(running.progress, Some(47));
    let done = replicate
        .status(
            &ProviderTask {
                id: "replicate_succeeded".to_owned(),
            },
            None,
        )
        .await
        .expect("succeeded");
    assert!(done.video_url_expires_at.is_some());

    assert_eq!(
        *stub.traceparents.lock().expect("lock"),
        vec![traceparent.to_owned(), traceparent.to_owned()],
        "traceparent is sent when given, and only then"
    );
}

#[tokio::test]
async fn a_garbage_body_is_a_permanent_descriptive_error() {
    async fn html() -> &'static str {
        "<html><body>502 Bad Gateway? no: 200 OK with HTML</body></html>"
    }
    async fn wrong_shape() -> ([(&'static str, &'static str); 1], &'static str) {
        (
            [("content-type", "application/json")],
            r#"{"id": 42, "state": "done"}"#,
        )
    }
    let stub = serve(
        Router::new()
            .route("/v1/videos", post(html))
            .route("/v1/predictions", post(html))
            .route("/v1/videos/{id}", get(wrong_shape))
            .route("/v1/predictions/{id}", get(wrong_shape)),
    )
    .await;
    for kind in [ProviderKind::OpenaiVideos, ProviderKind::Replicate] {
        let provider = provider(kind, &stub.base_url);
        let submit = provider.submit(&request("x")).await.expect_err("html body");
        let status = provider
            .status(&ProviderTask { id: "v".to_owned() }, None)
            .await
            .expect_err("wrong shape");
        for (error, excerpt) in [(submit, "<html>"), (status, "\"id\": 42")] {
            assert!(!error.is_transient(), "{kind:?}: {error}");
            let text = error.to_string();
            assert!(
                text.contains("unexpected response body") && text.contains(excerpt),
                "not descriptive: {text}"
            );
        }
    }
}

#[tokio::test]
async fn a_connection_refused_is_transient() {
    // Bind then drop, so nothing listens on the port.
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr").port()
    };
    let error = provider(ProviderKind::Replicate, &format!("http://127.0.0.1:{port}"))
        .submit(&request("x"))
        .await
        .expect_err("refused");
    assert!(error.is_transient(), "{error}");
}

// ---------------------------------------------------------------------------------------------
// The simulated provider's own HTTP surface.

#[tokio::test]
async fn sim_control_endpoints_report_stats_and_replace_faults() {
    let sim = start_sim(300).await;
    let http = reqwest::Client::new();
    let base = sim.base_url();

    let unauthorised = http
        .get(format!("{base}/v1/videos/video_x"))
        .send()
        .await
        .expect("request");
    assert_eq!(unauthorised.status(), StatusCode::UNAUTHORIZED);

    let set = http
        .post(format!("{base}/sim/faults"))
        .json(&serde_json::json!({ "latencyMs": 5, "errorRate": 0.25 }))
        .send()
        .await
        .expect("set faults");
    assert_eq!(set.status(), StatusCode::OK);
    let faults: serde_json::Value = http
        .get(format!("{base}/sim/faults"))
        .send()
        .await
        .expect("get faults")
        .json()
        .await
        .expect("json");
    assert_eq!(
        faults,
        serde_json::json!({ "errorRate": 0.25, "rateLimitRate": 0.0, "forbiddenRate": 0.0, "latencyMs": 5, "hangRate": 0.0 })
    );
    assert_eq!(
        sim.faults(),
        SimFaults {
            error_rate: 0.25,
            latency_ms: 5,
            ..SimFaults::default()
        }
    );
    let invalid = http
        .post(format!("{base}/sim/faults"))
        .json(&serde_json::json!({ "errorRate": 2.0 }))
        .send()
        .await
        .expect("invalid faults");
    assert_eq!(invalid.status(), StatusCode::BAD_REQUEST);

    sim.set_faults(SimFaults::default());
    let provider = provider(ProviderKind::OpenaiVideos, &base);
    let task = provider.submit(&request("counted")).await.expect("submit");
    provider.status(&task, None).await.expect("status");
    provider.status(&task, None).await.expect("status");
    let stats: serde_json::Value = http
        .get(format!("{base}/sim/stats"))
        .send()
        .await
        .expect("stats")
        .json()
        .await
        .expect("json");
    assert_eq!(
        stats,
        serde_json::json!({
            "jobs": 1,
            "imageJobs": 0,
            "submits": 1,
            // The unauthorised request above counts: it reached the status endpoint.
            "statusCalls": 3,
            "statusCallsByJob": { task.id.clone(): 2 },
        })
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn run_serves_until_its_shutdown_future_resolves() {
    let addr = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr")
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(video_orchestrator::providers::sim::run(
        addr,
        SimSettings {
            duration_ms: 300,
            ..SimSettings::default()
        },
        async {
            let _ = stopped.await;
        },
    ));
    let provider = provider(ProviderKind::Replicate, &format!("http://{addr}"));
    let deadline = Instant::now() + Duration::from_secs(5);
    let task = loop {
        match provider.submit(&request("served")).await {
            Ok(task) => break task,
            Err(error) if error.is_transient() && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(error) => panic!("sim never answered: {error}"),
        }
    };
    provider.status(&task, None).await.expect("status");
    stop.send(()).expect("server waiting");
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("run returns")
        .expect("no panic")
        .expect("clean stop");
}

// ---------------------------------------------------------------------------------------------
// Configuration and routing.

fn configured(names: &[(&str, ProviderKind)]) -> HashMap<String, ProviderSettings> {
    names
        .iter()
        .map(|(name, kind)| ((*name).to_owned(), settings(*kind, "http://127.0.0.1:9")))
        .collect()
}

fn route(model: &str, provider: &str) -> ModelRoute {
    ModelRoute {
        model: model.to_owned(),
        provider: provider.to_owned(),
    }
}

#[test]
fn settings_deserialize_with_documented_defaults() {
    let settings: ProviderSettings = serde_json::from_value(serde_json::json!({
        "kind": "replicate",
        "base_url": "https://api.replicate.com",
    }))
    .expect("settings");
    assert_eq!(settings.kind, ProviderKind::Replicate);
    assert_eq!(settings.timeout_ms, 10_000);
    assert_eq!(settings.max_concurrency, 64);
    assert!(!settings.cancel_deletes);
    let openai: ProviderSettings = serde_json::from_value(serde_json::json!({
        "kind": "openai_videos",
        "base_url": "https://api.openai.com",
        "api_key": "sk-x",
        "cancel_deletes": true,
    }))
    .expect("settings");
    assert_eq!(openai.kind, ProviderKind::OpenaiVideos);
    assert!(openai.cancel_deletes);
}

#[test]
fn routing_prefers_the_requested_provider_then_the_model_route_then_the_default() {
    let providers = Providers::from_settings(
        &configured(&[
            ("openai", ProviderKind::OpenaiVideos),
            ("replicate", ProviderKind::Replicate),
        ]),
        &RoutingSettings {
            models: vec![route("wan-2.1", "replicate")],
            default_provider: Some("openai".to_owned()),
        },
    )
    .expect("valid");
    let name = |p: Option<Arc<dyn VideoProvider>>| p.map(|p| p.name().to_owned());
    assert_eq!(
        name(providers.route("wan-2.1", None)).as_deref(),
        Some("replicate")
    );
    assert_eq!(
        name(providers.route("sora-2", None)).as_deref(),
        Some("openai")
    );
    assert_eq!(
        name(providers.route("wan-2.1", Some("openai"))).as_deref(),
        Some("openai")
    );
    assert!(providers.route("wan-2.1", Some("nope")).is_none());
    assert_eq!(
        providers.names(),
        vec!["openai".to_owned(), "replicate".to_owned()]
    );
    assert!(providers.get("replicate").is_some() && providers.get("nope").is_none());

    let no_default = Providers::from_settings(
        &configured(&[("replicate", ProviderKind::Replicate)]),
        &RoutingSettings {
            models: vec![route("wan-2.1", "replicate")],
            default_provider: None,
        },
    )
    .expect("valid");
    assert!(no_default.route("sora-2", None).is_none());
}

#[test]
fn configuration_errors_name_the_key() {
    let check =
        |providers: HashMap<String, ProviderSettings>, routing: RoutingSettings, key: &str| {
            let error = Providers::from_settings(&providers, &routing).expect_err("invalid");
            assert!(
                error.to_string().contains(key),
                "{error} does not name {key}"
            );
        };
    for base_url in ["not a url", "ftp://example.com", "http://x/?q=1"] {
        let mut providers = configured(&[("sim", ProviderKind::OpenaiVideos)]);
        providers.get_mut("sim").expect("sim").base_url = base_url.to_owned();
        check(
            providers,
            RoutingSettings::default(),
            "providers.sim.base_url",
        );
    }
    let mut providers = configured(&[("sim", ProviderKind::Replicate)]);
    providers.get_mut("sim").expect("sim").max_concurrency = 0;
    check(
        providers,
        RoutingSettings::default(),
        "providers.sim.max_concurrency",
    );
    let mut providers = configured(&[("sim", ProviderKind::Replicate)]);
    providers.get_mut("sim").expect("sim").timeout_ms = 0;
    check(
        providers,
        RoutingSettings::default(),
        "providers.sim.timeout_ms",
    );

    let mut providers = configured(&[("sim", ProviderKind::OpenaiVideos)]);
    providers.get_mut("sim").expect("sim").api_key = "sk-secret\nvalue".into();
    let error = Providers::from_settings(&providers, &RoutingSettings::default())
        .expect_err("a newline cannot go in a header");
    assert!(
        error.to_string().contains("providers.sim.api_key"),
        "{error}"
    );
    assert!(
        !error.to_string().contains("sk-secret"),
        "key leaked: {error}"
    );

    let one = || configured(&[("sim", ProviderKind::Replicate)]);
    check(
        one(),
        RoutingSettings {
            models: vec![route("a", "sim"), route("b", "missing")],
            default_provider: None,
        },
        "routing.models[1].provider",
    );
    check(
        one(),
        RoutingSettings {
            models: vec![route("a", "sim"), route("a", "sim")],
            default_provider: None,
        },
        "routing.models[1].model",
    );
    check(
        one(),
        RoutingSettings {
            models: vec![],
            default_provider: Some("missing".to_owned()),
        },
        "routing.default_provider",
    );
}

#[test]
fn debug_output_never_shows_the_api_key() {
    let all = configured(&[
        ("openai", ProviderKind::OpenaiVideos),
        ("replicate", ProviderKind::Replicate),
    ]);
    let providers = Providers::from_settings(&all, &RoutingSettings::default()).expect("valid");
    for text in [
        format!("{providers:?}"),
        format!("{all:?}"),
        format!("{:?}", providers.get("openai").expect("openai")),
    ] {
        assert!(!text.contains(KEY), "key leaked: {text}");
    }
}

#[test]
fn provider_errors_expose_kind_and_delay() {
    let transient = ProviderError::Transient {
        message: "busy".to_owned(),
        retry_after: Some(Duration::from_secs(3)),
        unanswered: false,
    };
    assert!(transient.is_transient());
    assert!(!transient.unanswered());
    assert_eq!(transient.retry_after(), Some(Duration::from_secs(3)));
    let permanent = ProviderError::Permanent {
        message: "no".to_owned(),
    };
    assert!(!permanent.is_transient());
    assert_eq!(permanent.retry_after(), None);
    assert!(ProviderState::Cancelled.is_terminal());
    assert!(!ProviderState::InProgress.is_terminal());
}

/// What every kind's adapter must do against the simulator speaking its protocol, written once:
/// 429 (with `Retry-After: 1`) and 500 are transient on submit and status, with the provider's
/// message; 403 is permanent on both; a submit whose answer is lost (the simulator created the
/// job, then hung) is transient and `unanswered`, and made exactly one job.
#[tokio::test]
async fn every_kind_classifies_rate_limits_server_errors_and_lost_answers() {
    for kind in ProviderKind::ALL {
        let sim = start_sim(300).await;
        // A fresh attempt id per request: Kling refuses a client-set id it has seen.
        let request = |prompt: &str| SubmitRequest {
            model: video_orchestrator::providers::sim::model_for(kind).to_owned(),
            attempt_id: uuid::Uuid::new_v4().to_string(),
            ..request(prompt)
        };
        let provider = build(&ProviderSettings {
            timeout_ms: 500,
            ..sim.provider_settings(kind)
        });
        let task = provider
            .submit(&request("a quiet lake"))
            .await
            .unwrap_or_else(|e| panic!("{kind}: submit: {e}"));

        sim.set_faults(SimFaults {
            rate_limit_rate: 1.0,
            ..SimFaults::default()
        });
        let submit = provider
            .submit(&request("a limited lake"))
            .await
            .expect_err("429");
        let status = provider.status(&task, None).await.expect_err("429");
        for error in [submit, status] {
            assert!(error.is_transient(), "{kind}: {error}");
            assert_eq!(
                error.retry_after(),
                Some(Duration::from_secs(1)),
                "{kind}: {error}"
            );
            assert!(error.to_string().contains("429"), "{kind}: {error}");
        }

        sim.set_faults(SimFaults {
            error_rate: 1.0,
            ..SimFaults::default()
        });
        let submit = provider
            .submit(&request("a broken lake"))
            .await
            .expect_err("500");
        let status = provider.status(&task, None).await.expect_err("500");
        for error in [submit, status] {
            assert!(error.is_transient(), "{kind}: {error}");
            assert_eq!(error.retry_after(), None, "{kind}: {error}");
            assert!(
                error.to_string().contains("simulated server error"),
                "{kind}: the provider's message is read: {error}"
            );
        }

        sim.set_faults(SimFaults {
            forbidden_rate: 1.0,
            ..SimFaults::default()
        });
        let submit = provider
            .submit(&request("a forbidden lake"))
            .await
            .expect_err("403");
        let status = provider.status(&task, None).await.expect_err("403");
        for error in [submit, status] {
            assert!(!error.is_transient(), "{kind}: 403 is permanent: {error}");
            assert!(!error.unanswered(), "{kind}: {error}");
        }

        sim.set_faults(SimFaults::default());
        let before = sim.stats();
        let error = provider
            .submit(&request("into the void [lost]"))
            .await
            .expect_err("timeout");
        assert!(error.is_transient(), "{kind}: {error}");
        assert!(error.unanswered(), "{kind}: {error}");
        let after = sim.stats();
        assert_eq!(after.submits, before.submits + 1, "{kind}: one POST");
        assert_eq!(after.jobs, before.jobs + 1, "{kind}: exactly one job");
        sim.shutdown().await;
    }
}
