//! The `luma` adapter against documented bodies (parsed directly and served by a stub server)
//! and against the simulator.
//!
//! Fixture sources: the `Generation` example of Luma's OpenAPI spec (`lumalabs/lumaai-api`
//! `openapi.yaml`: id `123e4567-…`, `created_at`, `assets.video`, `request` with `prompt`,
//! `aspect_ratio`, `loop`, `keyframes`), with the fields of the SDK's `types/generation.py`
//! (`lumalabs/lumaai-python`: `generation_type`, `model`, `request.duration`,
//! `assets.progress_video`, `assets.image`). The example is `completed`; the `queued`,
//! `dreaming` and `failed` ones change `state` and the assets accordingly, the failed one with a
//! `failure_reason` from docs.lumalabs.ai's Errors page ("Advanced prompt moderation failed").

use axum::body::Bytes;
use axum::extract::Path;
use axum::http::Method;
use axum::response::IntoResponse;
use video_orchestrator::providers::luma;

use super::*;

const QUEUED: &[u8] = include_bytes!("fixtures/luma/generation_queued.json");
const DREAMING: &[u8] = include_bytes!("fixtures/luma/generation_dreaming.json");
const COMPLETED: &[u8] = include_bytes!("fixtures/luma/generation_completed.json");
const FAILED: &[u8] = include_bytes!("fixtures/luma/generation_failed.json");

const GENERATION_ID: &str = "123e4567-e89b-12d3-a456-426614174000";

fn luma_request(prompt: &str) -> SubmitRequest {
    SubmitRequest {
        model: "ray-2".to_owned(),
        ..request(prompt)
    }
}

fn sim_settings(sim: &SimHandle) -> ProviderSettings {
    ProviderSettings {
        timeout_ms: 2_000,
        max_concurrency: 8,
        ..sim.provider_settings(ProviderKind::Luma)
    }
}

fn generation(id: &str) -> ProviderTask {
    ProviderTask { id: id.to_owned() }
}

// ---------------------------------------------------------------------------------------------
// Documented bodies.

#[test]
fn documented_generations_parse_with_every_state() {
    let queued = luma::parse_generation(QUEUED).expect("queued");
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
    let dreaming = luma::parse_generation(DREAMING).expect("dreaming");
    assert_eq!(dreaming.state, ProviderState::InProgress);
    assert_eq!(dreaming.progress, None, "Luma reports no percentage");
    assert_eq!(
        dreaming.video_url, None,
        "a progress video is not the video"
    );

    let done = luma::parse_generation(COMPLETED).expect("completed");
    assert_eq!(
        done,
        ProviderStatus {
            state: ProviderState::Succeeded,
            progress: Some(100),
            video_url: Some("https://example.com/video.mp4".to_owned()),
            // Luma documents no expiry for its asset URLs.
            video_url_expires_at: None,
            video_seconds: Some(9.0),
            error: None,
        }
    );

    let failed = luma::parse_generation(FAILED).expect("failed");
    assert_eq!(failed.state, ProviderState::Failed);
    assert_eq!(
        failed.error.as_deref(),
        Some("Advanced prompt moderation failed")
    );
    assert_eq!(failed.video_url, None);
    assert_eq!(failed.video_seconds, None);

    let no_reason = luma::parse_generation(br#"{"id":"g","state":"failed","failure_reason":null}"#)
        .expect("failed without a reason");
    assert!(no_reason.error.is_some_and(|e| !e.is_empty()));
}

#[test]
fn an_unknown_state_is_transient_and_named() {
    let error =
        luma::parse_generation(br#"{"id":"g","state":"pondering"}"#).expect_err("unknown state");
    assert!(error.is_transient(), "{error}");
    assert!(error.to_string().contains("pondering"), "{error}");
    let garbage = luma::parse_generation(b"[]").expect_err("not an object");
    assert!(!garbage.is_transient(), "{garbage}");
}

// ---------------------------------------------------------------------------------------------
// A stub server serving the documented bodies.

fn record_request(
    recorded: &Recorded,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    body: &[u8],
) {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let entry = serde_json::json!({
        "method": method.as_str(),
        "path": path,
        "authorization": header("authorization"),
        "traceparent": header("traceparent"),
        "body": serde_json::from_slice::<serde_json::Value>(body).ok(),
    });
    recorded.lock().expect("lock").push(entry.to_string());
}

fn recorded(stub: &Stub) -> Vec<serde_json::Value> {
    stub.traceparents
        .lock()
        .expect("lock")
        .iter()
        .map(|entry| serde_json::from_str(entry).expect("json"))
        .collect()
}

fn json(status: StatusCode, body: &'static [u8]) -> axum::response::Response {
    (status, [("content-type", "application/json")], body).into_response()
}

async fn luma_stub() -> Stub {
    async fn create(
        State(recorded): State<Recorded>,
        method: Method,
        headers: HeaderMap,
        body: Bytes,
    ) -> axum::response::Response {
        record_request(&recorded, &method, "/generations/video", &headers, &body);
        json(StatusCode::CREATED, QUEUED)
    }
    async fn one(
        State(recorded): State<Recorded>,
        Path(id): Path<String>,
        method: Method,
        headers: HeaderMap,
    ) -> axum::response::Response {
        record_request(
            &recorded,
            &method,
            &format!("/generations/{id}"),
            &headers,
            b"",
        );
        if method == Method::DELETE {
            return StatusCode::NO_CONTENT.into_response();
        }
        match id.as_str() {
            "dreaming" => json(StatusCode::OK, DREAMING),
            "completed" => json(StatusCode::OK, COMPLETED),
            "failed" => json(StatusCode::OK, FAILED),
            _ => json(StatusCode::OK, QUEUED),
        }
    }
    // The base URL's path prefix is kept, as with `https://api.lumalabs.ai/dream-machine/v1`.
    serve(
        Router::new()
            .route("/dream-machine/v1/generations/video", post(create))
            .route("/dream-machine/v1/generations/{id}", get(one).delete(one)),
    )
    .await
}

#[tokio::test]
async fn the_adapter_sends_the_documented_requests() {
    let stub = luma_stub().await;
    let base = format!("{}/dream-machine/v1", stub.base_url);
    let provider = provider(ProviderKind::Luma, &base);
    let submit = luma_request("A serene lake surrounded by mountains at sunset");

    assert_eq!(
        provider.submit(&submit).await.expect("submit"),
        generation(GENERATION_ID)
    );
    let done = provider
        .status(&generation("completed"), None)
        .await
        .expect("completed");
    assert_eq!(
        done.video_url.as_deref(),
        Some("https://example.com/video.mp4")
    );
    let failed = provider
        .status(
            &generation("failed"),
            Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        )
        .await
        .expect("failed");
    assert_eq!(failed.state, ProviderState::Failed);
    // Without cancel_deletes nothing is sent.
    assert_eq!(
        provider
            .cancel(&generation("completed"))
            .await
            .expect("cancel"),
        CancelOutcome::Unsupported
    );
    let deleting = build(&ProviderSettings {
        cancel_deletes: true,
        ..settings(ProviderKind::Luma, &base)
    });
    assert_eq!(
        deleting
            .cancel(&generation("completed"))
            .await
            .expect("delete"),
        CancelOutcome::Cancelled
    );

    let seen = recorded(&stub);
    assert_eq!(seen.len(), 4, "{seen:?}");
    assert_eq!(seen[0]["method"], "POST");
    assert_eq!(seen[0]["path"], "/generations/video");
    assert_eq!(
        seen[0]["body"],
        serde_json::json!({
            "prompt": "A serene lake surrounded by mountains at sunset",
            "model": "ray-2",
            // 8 s asked: the nearer of "5s" and "9s".
            "duration": "9s",
            "aspect_ratio": "16:9",
            "resolution": "720p",
        })
    );
    assert_eq!(seen[1]["method"], "GET");
    assert_eq!(seen[1]["path"], "/generations/completed");
    assert_eq!(
        seen[2]["traceparent"],
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    );
    assert_eq!(seen[3]["method"], "DELETE");
    assert_eq!(seen[3]["path"], "/generations/completed");
    let bearer = format!("Bearer {KEY}");
    assert!(
        seen.iter()
            .all(|entry| entry["authorization"] == bearer.as_str()),
        "{seen:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Against the simulator.

#[tokio::test]
async fn a_sim_generation_dreams_and_completes_with_a_public_video() {
    let sim = start_sim(500).await;
    let provider = build(&sim_settings(&sim));
    let created = provider
        .submit(&luma_request("a teddy bear playing guitar"))
        .await
        .expect("submit");
    assert!(uuid::Uuid::parse_str(&created.id).is_ok(), "{}", created.id);
    let seen = poll_to_end(provider.as_ref(), &created).await;
    assert!(!seen[0].state.is_terminal(), "{seen:?}");
    assert!(
        seen.iter().any(|s| s.state == ProviderState::InProgress),
        "{seen:?}"
    );
    let done = last(&seen);
    assert_eq!(done.state, ProviderState::Succeeded);
    assert_eq!(done.progress, Some(100));
    assert_eq!(done.video_seconds, Some(9.0));
    assert_eq!(done.video_url_expires_at, None);
    let url = done.video_url.clone().expect("video");
    assert_eq!(
        url,
        format!("{}/luma/files/{}.mp4", sim.base_url(), created.id)
    );
    let file = reqwest::get(&url).await.expect("download");
    assert_eq!(file.status(), StatusCode::OK);
    let stats = sim.stats();
    assert_eq!((stats.submits, stats.jobs), (1, 1));
    assert_eq!(stats.status_calls, seen.len() as u64);
    sim.shutdown().await;
}

#[tokio::test]
async fn a_fail_prompt_fails_with_the_simulated_reason() {
    let sim = start_sim(300).await;
    let provider = build(&sim_settings(&sim));
    let doomed = provider
        .submit(&luma_request("a doomed render [fail]"))
        .await
        .expect("submit");
    let done = last(&poll_to_end(provider.as_ref(), &doomed).await).clone();
    assert_eq!(done.state, ProviderState::Failed);
    assert_eq!(done.error.as_deref(), Some("simulated failure"));
    assert_eq!(done.video_url, None);

    let short = provider
        .submit(&luma_request("ab"))
        .await
        .expect_err("too short");
    assert!(!short.is_transient(), "{short}");
    assert!(
        short.to_string().contains("Prompt is too short"),
        "the provider's detail: {short}"
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn cancel_is_unsupported_unless_cancel_deletes() {
    let sim = start_sim(5_000).await;
    let keep = build(&sim_settings(&sim));
    let created = keep
        .submit(&luma_request("keep me please"))
        .await
        .expect("submit");
    assert_eq!(
        keep.cancel(&created).await.expect("cancel"),
        CancelOutcome::Unsupported
    );
    assert!(
        !keep
            .status(&created, None)
            .await
            .expect("still there")
            .state
            .is_terminal(),
        "an unsupported cancel must not touch the generation"
    );

    let deleting = build(&ProviderSettings {
        cancel_deletes: true,
        ..sim_settings(&sim)
    });
    assert_eq!(
        deleting.cancel(&created).await.expect("delete"),
        CancelOutcome::Cancelled
    );
    let gone = deleting.status(&created, None).await.expect_err("deleted");
    assert!(!gone.is_transient(), "{gone}");
    assert!(gone.to_string().contains("404"), "{gone}");
    // Deleting again finds nothing, which is still the outcome wanted.
    assert_eq!(
        deleting.cancel(&created).await.expect("delete again"),
        CancelOutcome::Cancelled
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
    for key in ["wrong-key", ""] {
        let error = build(&ProviderSettings {
            api_key: key.into(),
            ..sim_settings(&sim)
        })
        .submit(&luma_request("a valid prompt"))
        .await
        .expect_err("401");
        assert!(!error.is_transient(), "{error}");
        assert!(
            error.to_string().contains("401") && error.to_string().contains("Invalid API key"),
            "{error}"
        );
    }
    build(&sim_settings(&sim))
        .submit(&luma_request("a valid prompt"))
        .await
        .expect("the right key works");
    sim.shutdown().await;
}
