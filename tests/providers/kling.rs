//! The `kling` adapter against documented bodies (parsed directly and served by a stub server)
//! and against the simulator.
//!
//! Fixture sources (ids adapted):
//! - `create_task.json`: the create-task answer of Kling's "Text to Video" page (`code`,
//!   `message`, `request_id`, `data.task_id`, `task_status`, `task_info.external_task_id`,
//!   `created_at`, `updated_at`), values from a recorded answer of api-singapore.klingai.com;
//! - `task_submitted.json`, `task_processing.json`, `task_succeed.json`: the "Query Task
//!   (Single)" answer of the same page (`task_status_msg`, `final_unit_deduction`,
//!   `task_result.videos[].{id,url,duration}`);
//! - `task_failed.json`: a real failed task quoted in QuantumNous/new-api pull request #2532
//!   ("message is always SUCCEED, `task_status_msg` is the real error");
//! - `error_concurrency.json`: the over-limit example of Kling's "General Information" page
//!   (code 1303, "parallel task over resource pack limit");
//! - `error_not_found.json`: code 1203 of the same page's error table ("requested resource does
//!   not exist", HTTP 404); the message wording is ours, the table gives only the definition.

use axum::body::Bytes;
use axum::extract::Path;
use axum::http::Method;
use axum::response::IntoResponse;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use video_orchestrator::providers::kling::{self, OUTPUT_RETENTION};
use video_orchestrator::providers::SubmitLookup;

use super::*;

const CREATE: &[u8] = include_bytes!("fixtures/kling/create_task.json");
const SUBMITTED: &[u8] = include_bytes!("fixtures/kling/task_submitted.json");
const PROCESSING: &[u8] = include_bytes!("fixtures/kling/task_processing.json");
const SUCCEED: &[u8] = include_bytes!("fixtures/kling/task_succeed.json");
const FAILED: &[u8] = include_bytes!("fixtures/kling/task_failed.json");
const CONCURRENCY: &[u8] = include_bytes!("fixtures/kling/error_concurrency.json");
const NOT_FOUND: &[u8] = include_bytes!("fixtures/kling/error_not_found.json");

const ACCESS_KEY: &str = "ak-test-0123456789";
const TASK_ID: &str = "867283741759111202";

fn kling_settings(base_url: &str) -> ProviderSettings {
    ProviderSettings {
        access_key: Some(ACCESS_KEY.to_owned()),
        ..settings(ProviderKind::Kling, base_url)
    }
}

/// The simulator's own settings for this kind, with the test timeouts.
fn sim_settings(sim: &SimHandle) -> ProviderSettings {
    ProviderSettings {
        timeout_ms: 2_000,
        max_concurrency: 8,
        ..sim.provider_settings(ProviderKind::Kling)
    }
}

fn task(id: &str) -> ProviderTask {
    ProviderTask { id: id.to_owned() }
}

fn ms(millis: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(millis).expect("timestamp")
}

// ---------------------------------------------------------------------------------------------
// Documented bodies.

#[test]
fn documented_tasks_parse_with_every_status() {
    let queued = kling::parse_task(SUBMITTED).expect("submitted");
    assert_eq!(
        queued,
        ProviderStatus {
            state: ProviderState::Queued,
            progress: None,
            video_url: None,
            video_url_expires_at: None,
            video_seconds: None,
            error: None,
        }
    );
    let running = kling::parse_task(PROCESSING).expect("processing");
    assert_eq!(running.state, ProviderState::InProgress);
    assert_eq!(running.progress, None, "Kling reports no percentage");
    assert_eq!(running.video_url, None);

    let done = kling::parse_task(SUCCEED).expect("succeed");
    assert_eq!(
        done,
        ProviderStatus {
            state: ProviderState::Succeeded,
            progress: Some(100),
            video_url: Some(
                "https://cdn.klingai.com/bs2/upload-kling-api/0923471513/text2video/867283741759111202-d8f1e0b2.mp4"
                    .to_owned()
            ),
            // Cleared 30 days after the task finished (`updated_at`).
            video_url_expires_at: Some(ms(1_774_805_191_745) + OUTPUT_RETENTION),
            video_seconds: Some(10.1),
            error: None,
        }
    );
    assert_eq!(OUTPUT_RETENTION, chrono::TimeDelta::days(30));

    let failed = kling::parse_task(FAILED).expect("failed");
    assert_eq!(failed.state, ProviderState::Failed);
    assert_eq!(failed.error.as_deref(), Some("Image pixel is invalid"));
    assert_eq!(failed.video_url, None);
    assert_eq!(failed.progress, None);

    let no_message = kling::parse_task(
        br#"{"code":0,"message":"SUCCEED","request_id":"r","data":{"task_id":"1","task_status":"failed","task_status_msg":""}}"#,
    )
    .expect("failed without a message");
    assert!(no_message.error.is_some_and(|e| !e.is_empty()));

    assert_eq!(
        kling::parse_created(CREATE).expect("created"),
        task(TASK_ID)
    );
}

#[test]
fn an_unknown_status_is_transient_and_named() {
    let error = kling::parse_task(
        br#"{"code":0,"message":"SUCCEED","request_id":"r","data":{"task_id":"1","task_status":"rendering"}}"#,
    )
    .expect_err("unknown status");
    assert!(error.is_transient(), "{error}");
    assert!(error.to_string().contains("rendering"), "{error}");
}

#[test]
fn error_codes_count_even_inside_a_200() {
    let busy = kling::parse_task(CONCURRENCY).expect_err("1303");
    assert!(busy.is_transient(), "{busy}");
    assert!(
        busy.to_string()
            .contains("parallel task over resource pack limit"),
        "{busy}"
    );
    let expired = kling::parse_created(
        br#"{"code":1004,"message":"Authorization has expired","request_id":"r"}"#,
    )
    .expect_err("1004");
    assert!(!expired.is_transient(), "{expired}");
    let server =
        kling::parse_task(br#"{"code":5001,"message":"server unavailable"}"#).expect_err("5001");
    assert!(server.is_transient(), "{server}");
    let moderated =
        kling::parse_created(br#"{"code":1301,"message":"risk control"}"#).expect_err("1301");
    assert!(!moderated.is_transient(), "{moderated}");
    // Not the envelope at all.
    let garbage = kling::parse_task(b"<html>").expect_err("html");
    assert!(!garbage.is_transient());
    assert!(garbage.to_string().contains("unexpected response body"));
}

#[test]
fn lookups_tell_found_from_absent() {
    assert_eq!(
        kling::parse_lookup(SUBMITTED, "6f1c2d3e-0000-4000-8000-000000000001").expect("found"),
        SubmitLookup::Found(task(TASK_ID))
    );
    assert_eq!(
        kling::parse_lookup(NOT_FOUND, "never-sent").expect("absent"),
        SubmitLookup::Absent
    );
    // Other refusals prove nothing.
    assert!(kling::parse_lookup(CONCURRENCY, "x").is_err());
    assert!(kling::parse_lookup(b"404 page not found", "x").is_err());
}

// ---------------------------------------------------------------------------------------------
// A stub server serving the documented bodies.

/// Records every request as JSON `{method, path, authorization, traceparent, body}`.
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

async fn kling_stub() -> Stub {
    async fn create(
        State(recorded): State<Recorded>,
        method: Method,
        headers: HeaderMap,
        body: Bytes,
    ) -> axum::response::Response {
        record_request(&recorded, &method, "/v1/videos/text2video", &headers, &body);
        json(StatusCode::OK, CREATE)
    }
    async fn query(
        State(recorded): State<Recorded>,
        Path(id): Path<String>,
        method: Method,
        headers: HeaderMap,
    ) -> axum::response::Response {
        record_request(
            &recorded,
            &method,
            &format!("/v1/videos/text2video/{id}"),
            &headers,
            b"",
        );
        match id.as_str() {
            "6f1c2d3e-0000-4000-8000-000000000001" | "submitted" => json(StatusCode::OK, SUBMITTED),
            "processing" => json(StatusCode::OK, PROCESSING),
            "succeed" => json(StatusCode::OK, SUCCEED),
            "failed" => json(StatusCode::OK, FAILED),
            "busy" => json(StatusCode::OK, CONCURRENCY),
            "html-404" => (StatusCode::NOT_FOUND, "404 page not found").into_response(),
            _ => json(StatusCode::NOT_FOUND, NOT_FOUND),
        }
    }
    serve(
        Router::new()
            .route("/v1/videos/text2video", post(create))
            .route("/v1/videos/text2video/{id}", get(query)),
    )
    .await
}

fn decode_jwt(authorization: &str) -> (jsonwebtoken::Header, serde_json::Value) {
    let token = authorization
        .strip_prefix("Bearer ")
        .expect("bearer scheme");
    let mut validation = Validation::new(Algorithm::HS256);
    validation.set_required_spec_claims(&["exp", "nbf", "iss"]);
    let data = jsonwebtoken::decode::<serde_json::Value>(
        token,
        &DecodingKey::from_secret(KEY.as_bytes()),
        &validation,
    )
    .expect("a valid HS256 JWT signed with the secret key");
    (data.header, data.claims)
}

#[tokio::test]
async fn the_adapter_sends_a_signed_jwt_and_the_documented_request() {
    let stub = kling_stub().await;
    let provider = build(&kling_settings(&stub.base_url));
    let mut submit = request("a lighthouse in a storm");
    submit.model = "kling-v2-6".to_owned();

    let created = provider.submit(&submit).await.expect("submit");
    assert_eq!(created, task(TASK_ID));
    let done = provider
        .status(&task("succeed"), None)
        .await
        .expect("status");
    assert_eq!(done.state, ProviderState::Succeeded);
    assert!(done.video_url.is_some() && done.video_url_expires_at.is_some());
    let failed = provider
        .status(&task("failed"), None)
        .await
        .expect("failed");
    assert_eq!(failed.error.as_deref(), Some("Image pixel is invalid"));

    let seen = recorded(&stub);
    assert_eq!(seen.len(), 3);
    assert_eq!(seen[0]["method"], "POST");
    assert_eq!(seen[0]["path"], "/v1/videos/text2video");
    assert_eq!(
        seen[0]["body"],
        serde_json::json!({
            "model_name": "kling-v2-6",
            "prompt": "a lighthouse in a storm",
            // 8 s asked: the nearer of Kling's "5" and "10".
            "duration": "10",
            "aspect_ratio": "16:9",
            "external_task_id": submit.attempt_id,
        })
    );
    assert_eq!(
        seen[0]["traceparent"],
        submit.traceparent.clone().expect("set").as_str()
    );
    assert_eq!(seen[1]["method"], "GET");
    assert_eq!(seen[1]["path"], "/v1/videos/text2video/succeed");
    assert_eq!(seen[1]["traceparent"], serde_json::Value::Null);

    let authorization = seen[0]["authorization"]
        .as_str()
        .expect("authorization sent");
    let (header, claims) = decode_jwt(authorization);
    assert_eq!(header.alg, Algorithm::HS256);
    assert_eq!(header.typ.as_deref(), Some("JWT"));
    assert_eq!(claims["iss"], ACCESS_KEY);
    let exp = claims["exp"].as_i64().expect("exp");
    let nbf = claims["nbf"].as_i64().expect("nbf");
    assert_eq!(exp - nbf, 1805, "exp = now + 1800, nbf = now - 5");
    assert!((exp - Utc::now().timestamp() - 1800).abs() <= 5, "{claims}");
    // The token is cached: every request of this session carried the same one.
    assert!(
        seen.iter()
            .all(|entry| entry["authorization"] == authorization),
        "{seen:?}"
    );
}

#[tokio::test]
async fn find_submitted_asks_by_external_task_id() {
    let stub = kling_stub().await;
    let provider = build(&kling_settings(&stub.base_url));
    let attempted = request("x");
    assert_eq!(
        provider
            .find_submitted(&attempted, Utc::now())
            .await
            .expect("found"),
        SubmitLookup::Found(task(TASK_ID))
    );
    let mut never_sent = request("x");
    never_sent.attempt_id = "6f1c2d3e-0000-4000-8000-0000000000ff".to_owned();
    assert_eq!(
        provider
            .find_submitted(&never_sent, Utc::now())
            .await
            .expect("absent"),
        SubmitLookup::Absent
    );
    // A 404 that is not Kling's "does not exist" proves nothing.
    let mut odd = request("x");
    odd.attempt_id = "html-404".to_owned();
    assert!(provider.find_submitted(&odd, Utc::now()).await.is_err());
    // Neither does a busy answer.
    odd.attempt_id = "busy".to_owned();
    let busy = provider
        .find_submitted(&odd, Utc::now())
        .await
        .expect_err("busy");
    assert!(busy.is_transient(), "{busy}");

    let paths: Vec<_> = recorded(&stub)
        .iter()
        .map(|e| e["path"].as_str().expect("path").to_owned())
        .collect();
    assert_eq!(
        paths[..2],
        [
            format!("/v1/videos/text2video/{}", attempted.attempt_id),
            format!("/v1/videos/text2video/{}", never_sent.attempt_id),
        ]
    );
}

#[test]
fn settings_need_the_access_key_and_the_secret_key() {
    let mut missing = kling_settings("https://api-singapore.klingai.com");
    missing.access_key = None;
    let error = ProviderKind::Kling
        .build("kling", &missing)
        .expect_err("no access key");
    assert!(
        error.to_string().contains("providers.kling.access_key"),
        "{error}"
    );
    let mut no_secret = kling_settings("https://api-singapore.klingai.com");
    no_secret.api_key = "".into();
    let error = ProviderKind::Kling
        .build("kling", &no_secret)
        .expect_err("no secret key");
    assert!(
        error.to_string().contains("providers.kling.api_key"),
        "{error}"
    );
    let built = ProviderKind::Kling
        .build(
            "kling",
            &kling_settings("https://api-singapore.klingai.com"),
        )
        .expect("valid");
    assert!(!format!("{built:?}").contains(KEY), "key leaked");
}

// ---------------------------------------------------------------------------------------------
// Against the simulator.

#[tokio::test]
async fn a_sim_task_succeeds_with_a_public_video_url() {
    let sim = start_sim(500).await;
    let provider = build(&sim_settings(&sim));
    let created = provider
        .submit(&request("a fox in the snow"))
        .await
        .expect("submit");
    assert!(
        created.id.len() == 18 && created.id.bytes().all(|b| b.is_ascii_digit()),
        "{}",
        created.id
    );
    let seen = poll_to_end(provider.as_ref(), &created).await;
    assert!(!seen[0].state.is_terminal(), "{seen:?}");
    assert!(
        seen.iter().any(|s| s.state == ProviderState::InProgress),
        "{seen:?}"
    );
    let done = last(&seen);
    assert_eq!(done.state, ProviderState::Succeeded);
    assert_eq!(done.progress, Some(100));
    assert_eq!(done.video_seconds, Some(10.0));
    let url = done.video_url.clone().expect("video url");
    assert_eq!(
        url,
        format!("{}/kling/files/{}.mp4", sim.base_url(), created.id)
    );
    let expires = done.video_url_expires_at.expect("expiry");
    let in_30_days = Utc::now() + chrono::TimeDelta::days(30);
    assert!((expires - in_30_days).num_seconds().abs() < 10, "{expires}");
    // Kling's CDN links need no key.
    let file = reqwest::get(&url).await.expect("download");
    assert_eq!(file.status(), StatusCode::OK);
    let stats = sim.stats();
    assert_eq!((stats.submits, stats.jobs), (1, 1));
    assert_eq!(stats.status_calls, seen.len() as u64);
    sim.shutdown().await;
}

#[tokio::test]
async fn a_fail_prompt_fails_with_the_simulated_error_and_cancel_is_unsupported() {
    let sim = start_sim(300).await;
    let provider = build(&sim_settings(&sim));
    let doomed = provider
        .submit(&request("a doomed render [fail]"))
        .await
        .expect("submit");
    let done = last(&poll_to_end(provider.as_ref(), &doomed).await).clone();
    assert_eq!(done.state, ProviderState::Failed);
    assert_eq!(done.error.as_deref(), Some("simulated failure"));
    assert_eq!(done.video_url, None);

    let mut long = request("a long one [duration=5000]");
    long.attempt_id = "6f1c2d3e-0000-4000-8000-000000000002".to_owned();
    let running = provider.submit(&long).await.expect("submit");
    assert_eq!(
        provider.cancel(&running).await.expect("cancel"),
        CancelOutcome::Unsupported
    );
    assert!(
        !provider
            .status(&running, None)
            .await
            .expect("untouched")
            .state
            .is_terminal(),
        "an unsupported cancel must not touch the task"
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn a_wrong_secret_key_is_permanent_with_klings_code() {
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
        api_key: "not-the-secret".into(),
        ..sim_settings(&sim)
    });
    let error = wrong.submit(&request("x y z")).await.expect_err("401");
    assert!(!error.is_transient(), "{error}");
    assert!(
        error.to_string().contains("401") && error.to_string().contains("Authentication failed"),
        "{error}"
    );
    build(&sim_settings(&sim))
        .submit(&request("x y z"))
        .await
        .expect("the right secret works");

    // Kling's other authentication codes, straight over HTTP.
    let url = format!("{}/kling/v1/videos/text2video/1", sim.base_url());
    let now = Utc::now().timestamp();
    let sign = |exp: i64, nbf: i64| {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &serde_json::json!({ "iss": ACCESS_KEY, "exp": exp, "nbf": nbf }),
            &EncodingKey::from_secret(KEY.as_bytes()),
        )
        .expect("sign")
    };
    let http = reqwest::Client::new();
    for (token, code) in [
        (None, 1001),
        (Some("not-a-jwt".to_owned()), 1002),
        (Some(sign(now - 10, now - 100)), 1004),
        (Some(sign(now + 1800, now + 600)), 1003),
    ] {
        let mut call = http.get(&url);
        if let Some(token) = token {
            call = call.bearer_auth(token);
        }
        let answer = call.send().await.expect("answer");
        assert_eq!(answer.status(), StatusCode::UNAUTHORIZED);
        let body: serde_json::Value = answer.json().await.expect("json");
        assert_eq!(body["code"], code, "{body}");
    }
    sim.shutdown().await;
}

#[tokio::test]
async fn a_lost_answer_is_resolved_through_the_external_task_id() {
    let sim = start_sim(300).await;
    let provider = build(&ProviderSettings {
        timeout_ms: 300,
        ..sim_settings(&sim)
    });
    let lost = request("the answer never comes [lost]");
    let started = Instant::now();
    let error = provider.submit(&lost).await.expect_err("timeout");
    assert!(error.is_transient() && error.unanswered(), "{error}");
    assert!(started.elapsed() < Duration::from_secs(2));
    let stats = sim.stats();
    assert_eq!((stats.submits, stats.jobs), (1, 1));
    let job = stats
        .status_calls_by_job
        .keys()
        .next()
        .expect("the one job")
        .clone();

    // The same attempt, asked by its id: the job it created.
    assert_eq!(
        provider
            .find_submitted(&lost, Utc::now())
            .await
            .expect("lookup"),
        SubmitLookup::Found(task(&job))
    );
    // An attempt never sent: provably absent.
    let mut never_sent = lost.clone();
    never_sent.attempt_id = "6f1c2d3e-0000-4000-8000-0000000000aa".to_owned();
    assert_eq!(
        provider
            .find_submitted(&never_sent, Utc::now())
            .await
            .expect("lookup"),
        SubmitLookup::Absent
    );
    // Nothing was submitted again.
    let stats = sim.stats();
    assert_eq!((stats.submits, stats.jobs), (1, 1));
    // The found task is a real one: it can be tracked to its end.
    let seen = poll_to_end(provider.as_ref(), &task(&job)).await;
    assert_eq!(last(&seen).state, ProviderState::Succeeded);
    sim.shutdown().await;
}

#[tokio::test]
async fn a_repeated_external_task_id_is_refused() {
    let sim = start_sim(300).await;
    let provider = build(&sim_settings(&sim));
    let once = request("only once");
    provider.submit(&once).await.expect("first");
    let error = provider.submit(&once).await.expect_err("duplicate");
    assert!(!error.is_transient(), "{error}");
    assert!(
        error.to_string().contains("400") && error.to_string().contains("external_task_id"),
        "{error}"
    );
    assert_eq!(sim.stats().jobs, 1);

    let mut rejected = request("not this [reject]");
    rejected.attempt_id = "6f1c2d3e-0000-4000-8000-000000000004".to_owned();
    let refused = provider.submit(&rejected).await.expect_err("400");
    assert!(!refused.is_transient(), "{refused}");
    sim.shutdown().await;
}

#[test]
fn a_data_uri_is_sent_to_kling_as_bare_base64_and_a_url_as_given() {
    assert_eq!(
        kling::image_field("data:image/png;base64,iVBORw0KGgo="),
        "iVBORw0KGgo="
    );
    assert_eq!(
        kling::image_field("https://cdn.example.com/frame.png"),
        "https://cdn.example.com/frame.png"
    );
}

#[tokio::test]
async fn an_image_request_goes_to_image2video_and_is_queried_and_looked_up_there() {
    let sim = start_sim(500).await;
    let provider = build(&sim_settings(&sim));
    assert!(provider.takes_image());
    let mut from_image = request("the frame comes alive");
    // The simulator refuses a `data:` prefix as Kling does: success means it was taken off.
    from_image.image_url = Some("data:image/png;base64,iVBORw0KGgo=".to_owned());
    let created = provider.submit(&from_image).await.expect("submit");
    let raw = created
        .id
        .strip_prefix("image2video/")
        .unwrap_or_else(|| panic!("an image task's id says so: {}", created.id));
    assert!(
        raw.len() == 18 && raw.bytes().all(|b| b.is_ascii_digit()),
        "{raw}"
    );
    let seen = poll_to_end(provider.as_ref(), &created).await;
    let done = last(&seen);
    assert_eq!(done.state, ProviderState::Succeeded, "{seen:?}");
    assert_eq!(
        done.video_url.as_deref(),
        Some(format!("{}/kling/files/{raw}.mp4", sim.base_url()).as_str())
    );
    // The text endpoint does not know an image task.
    assert!(provider.status(&task(raw), None).await.is_err());
    // A lost answer is looked up under the image endpoint, and found with the same id.
    assert_eq!(
        provider
            .find_submitted(&from_image, Utc::now())
            .await
            .expect("lookup"),
        SubmitLookup::Found(created.clone())
    );
    let stats = sim.stats();
    assert_eq!((stats.submits, stats.jobs, stats.image_jobs), (1, 1, 1));
    sim.shutdown().await;
}
