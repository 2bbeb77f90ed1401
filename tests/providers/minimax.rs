//! The `minimax` adapter against its documented fixtures (`fixtures/minimax/`, each with a
//! `_source` note), a stub server serving them, and the simulator.

use super::*;
use axum::extract::{Query, Request};
use axum::http::Method;
use video_orchestrator::providers::minimax::{
    self, base_resp_error, code_class, CodeClass, TaskQuery, DOWNLOAD_URL_VALIDITY,
};

macro_rules! fixture {
    ($name:literal) => {
        include_bytes!(concat!("fixtures/minimax/", $name, ".json")) as &'static [u8]
    };
}

const SUBMIT_OK: &[u8] = fixture!("submit_ok");
const QUERY_PREPARING: &[u8] = fixture!("query_preparing");
const QUERY_QUEUEING: &[u8] = fixture!("query_queueing");
const QUERY_PROCESSING: &[u8] = fixture!("query_processing");
const QUERY_SUCCESS: &[u8] = fixture!("query_success");
const QUERY_FAIL: &[u8] = fixture!("query_fail");
const QUERY_OUTPUT_SENSITIVE: &[u8] = fixture!("query_output_sensitive_1027");
const QUERY_UNKNOWN: &[u8] = fixture!("query_unknown_status");
const FILE_RETRIEVE: &[u8] = fixture!("file_retrieve");
const FILE_RATE_LIMIT: &[u8] = fixture!("file_retrieve_rate_limit_1002");
const SUBMIT_SENSITIVE: &[u8] = fixture!("submit_sensitive_1026");
const SUBMIT_RATE_LIMIT: &[u8] = fixture!("submit_rate_limit_1002");
const SUBMIT_AUTH: &[u8] = fixture!("submit_auth_1004");
const SUBMIT_BALANCE: &[u8] = fixture!("submit_balance_1008");
const SUBMIT_INTERNAL: &[u8] = fixture!("submit_internal_1000");
const SUBMIT_INVALID: &[u8] = fixture!("submit_invalid_params_2013");

const CDN_URL: &str = "https://video-product.cdn.minimax.io/inference_output/video/2025-09-19/5c06f899-c689-4dfb-93f6-e4468a2743fc/output.mp4";

fn status_of(query: TaskQuery) -> ProviderStatus {
    match query {
        TaskQuery::Status(status) => status,
        TaskQuery::Succeeded { file_id, .. } => panic!("unexpected success with file {file_id}"),
    }
}

fn pending(state: ProviderState) -> ProviderStatus {
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
fn documented_statuses_and_the_file_parse() {
    assert_eq!(
        minimax::parse_submit(SUBMIT_OK).expect("created").id,
        "106916112212032"
    );
    // No progress is reported: None (unknown), never 0.
    for (body, state) in [
        (QUERY_PREPARING, ProviderState::Queued),
        (QUERY_QUEUEING, ProviderState::Queued),
        (QUERY_PROCESSING, ProviderState::InProgress),
    ] {
        let status = status_of(minimax::parse_query(body).expect("parses"));
        assert_eq!(status, pending(state));
    }
    assert_eq!(
        minimax::parse_query(QUERY_SUCCESS).expect("success"),
        TaskQuery::Succeeded {
            file_id: "176844028768320".to_owned(),
            width: Some(1920),
            height: Some(1080),
        }
    );
    let failed = status_of(minimax::parse_query(QUERY_FAIL).expect("fail"));
    assert_eq!(failed.state, ProviderState::Failed);
    assert_eq!(
        failed.error.as_deref(),
        Some("video generation failed, please try again")
    );
    assert_eq!(failed.video_url, None);
    // Output moderation is the task's outcome, not a failed query call.
    let moderated = status_of(minimax::parse_query(QUERY_OUTPUT_SENSITIVE).expect("1027"));
    assert_eq!(moderated.state, ProviderState::Failed);
    assert_eq!(
        moderated.error.as_deref(),
        Some("output new_sensitive (1027)")
    );

    let retrieved_at = rfc3339("2026-10-01T12:00:00Z");
    let done = minimax::parse_file(FILE_RETRIEVE, retrieved_at).expect("file");
    assert_eq!(
        done,
        ProviderStatus {
            state: ProviderState::Succeeded,
            progress: Some(100),
            video_url: Some(CDN_URL.to_owned()),
            video_url_expires_at: Some(rfc3339("2026-10-01T21:00:00Z")),
            video_seconds: None,
            error: None,
        }
    );
    assert_eq!(DOWNLOAD_URL_VALIDITY, chrono::TimeDelta::hours(9));
}

#[test]
fn an_unknown_status_is_transient_and_named() {
    let error = minimax::parse_query(QUERY_UNKNOWN).expect_err("unknown status");
    assert!(error.is_transient(), "{error}");
    assert!(!error.unanswered());
    let text = error.to_string();
    assert!(
        text.contains("\"Unknown\"") && text.contains("176843862716480"),
        "{text}"
    );
    let odd = minimax::parse_query(
        br#"{"task_id":"1","status":"Exploded","base_resp":{"status_code":0}}"#,
    )
    .expect_err("unknown");
    assert!(
        odd.is_transient() && odd.to_string().contains("Exploded"),
        "{odd}"
    );
}

/// The required check: errors MiniMax puts inside HTTP 200 bodies are classified like HTTP
/// errors, from the documented fixtures.
#[test]
fn errors_inside_http_200_are_classified_from_the_fixtures() {
    for (body, code, message) in [
        (SUBMIT_SENSITIVE, 1026, "input new_sensitive"),
        (SUBMIT_AUTH, 1004, "login fail"),
        (SUBMIT_BALANCE, 1008, "insufficient balance"),
        (SUBMIT_INVALID, 2013, "invalid params"),
    ] {
        let error = minimax::parse_submit(body).expect_err("refused");
        assert!(!error.is_transient(), "{code} must be permanent: {error}");
        let text = error.to_string();
        assert!(
            text.contains(&code.to_string()) && text.contains(message),
            "{text}"
        );
        assert_eq!(code_class(code), CodeClass::Permanent);
    }
    for (body, code) in [(SUBMIT_RATE_LIMIT, 1002), (SUBMIT_INTERNAL, 1000)] {
        let error = minimax::parse_submit(body).expect_err("refused");
        assert!(error.is_transient(), "{code} must be transient: {error}");
        assert!(!error.unanswered(), "a refusal was answered");
        assert!(error.to_string().contains(&code.to_string()), "{error}");
    }
    // The query and the files call go through the same classification.
    let query = minimax::parse_query(SUBMIT_AUTH).expect_err("1004 on the query");
    assert!(!query.is_transient(), "{query}");
    let query = minimax::parse_query(SUBMIT_RATE_LIMIT).expect_err("1002 on the query");
    assert!(query.is_transient(), "{query}");
    let file = minimax::parse_file(FILE_RATE_LIMIT, Utc::now()).expect_err("1002");
    assert!(file.is_transient(), "{file}");
    let file = minimax::parse_file(SUBMIT_AUTH, Utc::now()).expect_err("1004");
    assert!(!file.is_transient(), "{file}");
    assert!(base_resp_error("x", 0, "success").is_none());
}

#[test]
fn broken_bodies_are_permanent_and_descriptive() {
    let no_id = minimax::parse_submit(br#"{"base_resp":{"status_code":0,"status_msg":"success"}}"#)
        .expect_err("no task_id");
    assert!(
        !no_id.is_transient() && no_id.to_string().contains("task_id"),
        "{no_id}"
    );
    let html = minimax::parse_query(b"<html>bad gateway</html>").expect_err("html");
    assert!(
        !html.is_transient() && html.to_string().contains("<html>"),
        "{html}"
    );
    let no_file = minimax::parse_query(
        br#"{"task_id":"7","status":"Success","base_resp":{"status_code":0}}"#,
    )
    .expect_err("no file_id");
    assert!(
        !no_file.is_transient() && no_file.to_string().contains("file_id"),
        "{no_file}"
    );
    let no_url = minimax::parse_file(
        br#"{"file":{"file_id":1},"base_resp":{"status_code":0}}"#,
        Utc::now(),
    )
    .expect_err("no url");
    assert!(
        !no_url.is_transient() && no_url.to_string().contains("download_url"),
        "{no_url}"
    );
}

// ---------------------------------------------------------------------------------------------
// A stub server serving the fixtures over HTTP.

/// Records `METHOD path?query | authorization | body` per request; answers by fixture.
async fn minimax_stub() -> Stub {
    async fn handle(
        State(recorded): State<Recorded>,
        Query(params): Query<HashMap<String, String>>,
        request: Request,
    ) -> ([(&'static str, &'static str); 1], &'static [u8]) {
        let (parts, body) = request.into_parts();
        let body = axum::body::to_bytes(body, 1 << 20)
            .await
            .unwrap_or_default();
        let auth = parts
            .headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .to_owned();
        let traceparent = parts
            .headers
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .to_owned();
        recorded.lock().expect("lock").push(format!(
            "{} {} | {auth} | {traceparent} | {}",
            parts.method,
            parts.uri,
            String::from_utf8_lossy(&body)
        ));
        let answer = match (parts.method, parts.uri.path()) {
            (Method::POST, "/v1/video_generation") => {
                if String::from_utf8_lossy(&body).contains("flagged") {
                    SUBMIT_SENSITIVE
                } else {
                    SUBMIT_OK
                }
            }
            (Method::GET, "/v1/query/video_generation") => {
                match params.get("task_id").map(String::as_str) {
                    Some("176843862716480") => QUERY_SUCCESS,
                    Some("processing") => QUERY_PROCESSING,
                    Some("busy") => SUBMIT_RATE_LIMIT,
                    _ => QUERY_FAIL,
                }
            }
            (Method::GET, "/v1/files/retrieve") => FILE_RETRIEVE,
            _ => b"{}",
        };
        ([("content-type", "application/json")], answer)
    }
    serve(
        Router::new()
            .route("/v1/video_generation", post(handle))
            .route("/v1/query/video_generation", get(handle))
            .route("/v1/files/retrieve", get(handle)),
    )
    .await
}

fn recorded(stub: &Stub) -> Vec<String> {
    std::mem::take(&mut *stub.traceparents.lock().expect("lock"))
}

#[tokio::test]
async fn the_adapter_speaks_the_documented_protocol_over_http() {
    let stub = minimax_stub().await;
    let provider = provider(ProviderKind::Minimax, &stub.base_url);
    let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let bearer = format!("Bearer {KEY}");

    let task = provider
        .submit(&SubmitRequest {
            model: "MiniMax-Hailuo-02".to_owned(),
            duration_seconds: Some(6),
            size: Some("1920x1080".to_owned()),
            ..request("a koi pond at dawn")
        })
        .await
        .expect("submit");
    assert_eq!(task.id, "106916112212032");
    let calls = recorded(&stub);
    assert_eq!(calls.len(), 1, "{calls:?}");
    let (line, body) = calls[0].rsplit_once(" | ").expect("body");
    assert_eq!(
        line,
        format!(
            "POST /v1/video_generation | {bearer} | 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        )
    );
    let sent: serde_json::Value = serde_json::from_str(body).expect("json body");
    assert_eq!(
        sent,
        serde_json::json!({
            "model": "MiniMax-Hailuo-02",
            "prompt": "a koi pond at dawn",
            "duration": 6,
            "resolution": "1080P",
        })
    );

    // Success: the query, then the file, both authenticated and traced.
    let done = provider
        .status(
            &ProviderTask {
                id: "176843862716480".to_owned(),
            },
            Some(traceparent),
        )
        .await
        .expect("status");
    assert_eq!(done.state, ProviderState::Succeeded);
    assert_eq!(done.video_url.as_deref(), Some(CDN_URL));
    let expires = done.video_url_expires_at.expect("expiry");
    let in_nine_hours = Utc::now() + chrono::Duration::hours(9);
    assert!(
        (expires - in_nine_hours).num_seconds().abs() < 10,
        "{expires}"
    );
    assert_eq!(
        recorded(&stub),
        vec![
            format!("GET /v1/query/video_generation?task_id=176843862716480 | {bearer} | {traceparent} | "),
            format!("GET /v1/files/retrieve?file_id=176844028768320 | {bearer} | {traceparent} | "),
        ]
    );

    // Not finished: no files call.
    let running = provider
        .status(
            &ProviderTask {
                id: "processing".to_owned(),
            },
            None,
        )
        .await
        .expect("processing");
    assert_eq!(running, pending(ProviderState::InProgress));
    assert_eq!(recorded(&stub).len(), 1);

    // An error inside HTTP 200, read over HTTP.
    let refused = provider
        .submit(&request("this gets flagged"))
        .await
        .expect_err("1026");
    assert!(!refused.is_transient(), "{refused}");
    assert!(refused.to_string().contains("1026"), "{refused}");
    let busy = provider
        .status(
            &ProviderTask {
                id: "busy".to_owned(),
            },
            None,
        )
        .await
        .expect_err("1002");
    assert!(busy.is_transient(), "{busy}");

    recorded(&stub);
    assert_eq!(
        provider
            .cancel(&ProviderTask {
                id: "processing".to_owned()
            })
            .await
            .expect("cancel"),
        CancelOutcome::Unsupported
    );
    assert!(
        recorded(&stub).is_empty(),
        "an unsupported cancel sends nothing"
    );
}

#[tokio::test]
async fn the_group_id_is_sent_to_files_retrieve_when_configured() {
    let stub = minimax_stub().await;
    let provider = build(&ProviderSettings {
        group_id: Some("1948".to_owned()),
        ..settings(ProviderKind::Minimax, &stub.base_url)
    });
    provider
        .status(
            &ProviderTask {
                id: "176843862716480".to_owned(),
            },
            None,
        )
        .await
        .expect("status");
    let calls = recorded(&stub);
    assert!(
        calls[1].starts_with("GET /v1/files/retrieve?GroupId=1948&file_id=176844028768320 |"),
        "{calls:?}"
    );
    assert!(
        !calls[0].contains("GroupId"),
        "only files/retrieve takes it: {calls:?}"
    );

    let blank = ProviderKind::Minimax
        .build(
            "mm",
            &ProviderSettings {
                group_id: Some(" ".to_owned()),
                ..settings(ProviderKind::Minimax, &stub.base_url)
            },
        )
        .expect_err("blank group id");
    assert!(
        blank.to_string().contains("providers.mm.group_id"),
        "{blank}"
    );
}

// ---------------------------------------------------------------------------------------------
// Against the simulator.

fn sim_provider(sim: &SimHandle) -> Arc<dyn VideoProvider> {
    build(&ProviderSettings {
        timeout_ms: 2_000,
        ..sim.provider_settings(ProviderKind::Minimax)
    })
}

#[tokio::test]
async fn a_sim_task_goes_through_the_statuses_to_a_downloadable_url() {
    let sim = start_sim(600).await;
    let provider = sim_provider(&sim);
    let task = provider
        .submit(&SubmitRequest {
            size: Some("1920x1080".to_owned()),
            ..request("a lighthouse in a storm")
        })
        .await
        .expect("submit");
    assert!(
        task.id.len() == 15 && task.id.bytes().all(|b| b.is_ascii_digit()),
        "{}",
        task.id
    );
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
        "MiniMax reports no progress: {seen:?}"
    );
    let done = last(&seen);
    assert_eq!(done.state, ProviderState::Succeeded);
    assert_eq!(done.progress, Some(100));
    assert_eq!(done.error, None);
    let url = done.video_url.clone().expect("download url");
    assert!(
        url.starts_with(&format!("{}/minimax/files/", sim.base_url())) && url.ends_with(".mp4"),
        "{url}"
    );
    let expires = done.video_url_expires_at.expect("expiry");
    let in_nine_hours = Utc::now() + chrono::Duration::hours(9);
    assert!(
        (expires - in_nine_hours).num_seconds().abs() < 10,
        "{expires}"
    );

    // The download URL is public, like MiniMax's CDN links.
    let file = reqwest::get(&url).await.expect("download");
    assert_eq!(file.status(), StatusCode::OK);
    assert!(!file.bytes().await.expect("body").is_empty());

    let stats = sim.stats();
    assert_eq!(stats.submits, 1);
    assert_eq!(stats.jobs, 1);
    assert_eq!(stats.status_calls, seen.len() as u64);
    sim.shutdown().await;
}

#[tokio::test]
async fn sim_queries_answer_the_raw_protocol() {
    let sim = start_sim(400).await;
    let http = reqwest::Client::new();
    let base = format!("{}/minimax", sim.base_url());
    let created: serde_json::Value = http
        .post(format!("{base}/v1/video_generation"))
        .bearer_auth(KEY)
        .json(&serde_json::json!({"model": "MiniMax-Hailuo-02", "prompt": "p", "duration": 6, "resolution": "1080P"}))
        .send()
        .await
        .expect("submit")
        .json()
        .await
        .expect("json");
    assert_eq!(created["base_resp"]["status_code"], 0);
    let task_id = created["task_id"].as_str().expect("task_id").to_owned();
    let first: serde_json::Value = http
        .get(format!(
            "{base}/v1/query/video_generation?task_id={task_id}"
        ))
        .bearer_auth(KEY)
        .send()
        .await
        .expect("query")
        .json()
        .await
        .expect("json");
    assert!(
        matches!(
            first["status"].as_str(),
            Some("Preparing" | "Queueing" | "Processing")
        ),
        "{first}"
    );
    tokio::time::sleep(Duration::from_millis(450)).await;
    let done: serde_json::Value = http
        .get(format!(
            "{base}/v1/query/video_generation?task_id={task_id}"
        ))
        .bearer_auth(KEY)
        .send()
        .await
        .expect("query")
        .json()
        .await
        .expect("json");
    assert_eq!(done["status"], "Success", "{done}");
    assert_eq!(done["video_width"], 1920);
    assert_eq!(done["video_height"], 1080);
    let file_id = done["file_id"].as_str().expect("file_id");
    let file: serde_json::Value = http
        .get(format!("{base}/v1/files/retrieve?file_id={file_id}"))
        .bearer_auth(KEY)
        .send()
        .await
        .expect("retrieve")
        .json()
        .await
        .expect("json");
    assert_eq!(file["base_resp"]["status_code"], 0);
    assert_eq!(file["file"]["purpose"], "video_generation");
    assert!(file["file"]["download_url"].as_str().is_some(), "{file}");
    sim.shutdown().await;
}

#[tokio::test]
async fn a_sim_fail_prompt_fails_with_the_simulated_error() {
    let sim = start_sim(300).await;
    let provider = sim_provider(&sim);
    let task = provider
        .submit(&request("a doomed render [fail]"))
        .await
        .expect("submit");
    let seen = poll_to_end(provider.as_ref(), &task).await;
    let done = last(&seen);
    assert_eq!(done.state, ProviderState::Failed);
    assert_eq!(done.error.as_deref(), Some("simulated failure"));
    assert_eq!(done.video_url, None);
    sim.shutdown().await;
}

#[tokio::test]
async fn sim_cancel_is_unsupported_and_leaves_the_task_running() {
    let sim = start_sim(5_000).await;
    let provider = sim_provider(&sim);
    let task = provider.submit(&request("long one")).await.expect("submit");
    assert_eq!(
        provider.cancel(&task).await.expect("cancel"),
        CancelOutcome::Unsupported
    );
    let status = provider.status(&task, None).await.expect("status");
    assert!(!status.state.is_terminal(), "{status:?}");
    sim.shutdown().await;
}

/// The required check, through the simulator: MiniMax's errors inside HTTP 200.
#[tokio::test]
async fn sim_errors_inside_http_200_are_classified() {
    let sim = start_sim(300).await;
    let provider = sim_provider(&sim);
    let http = reqwest::Client::new();

    // The raw answer really is a 200 with base_resp.
    let raw = http
        .post(format!("{}/minimax/v1/video_generation", sim.base_url()))
        .bearer_auth(KEY)
        .json(&serde_json::json!({"model": "MiniMax-Hailuo-02", "prompt": "x [sensitive]"}))
        .send()
        .await
        .expect("submit");
    assert_eq!(raw.status(), StatusCode::OK);
    let body: serde_json::Value = raw.json().await.expect("json");
    assert_eq!(body["base_resp"]["status_code"], 1026);

    let sensitive = provider
        .submit(&request("something [sensitive]"))
        .await
        .expect_err("1026");
    assert!(!sensitive.is_transient(), "{sensitive}");
    assert!(
        sensitive.to_string().contains("1026") && sensitive.to_string().contains("new_sensitive"),
        "{sensitive}"
    );
    let busy = provider
        .submit(&request("rush hour [busy]"))
        .await
        .expect_err("1002");
    assert!(busy.is_transient(), "{busy}");
    assert!(!busy.unanswered());
    assert!(busy.to_string().contains("1002"), "{busy}");
    assert_eq!(sim.stats().jobs, 0, "refused submits create nothing");

    let unknown = provider
        .status(
            &ProviderTask {
                id: "123456789012345".to_owned(),
            },
            None,
        )
        .await
        .expect_err("2013");
    assert!(!unknown.is_transient(), "{unknown}");
    assert!(unknown.to_string().contains("2013"), "{unknown}");

    // Output moderation ends the task as Failed with MiniMax's message.
    let task = provider
        .submit(&request("fine input [sensitive_output]"))
        .await
        .expect("submit");
    let seen = poll_to_end(provider.as_ref(), &task).await;
    let done = last(&seen);
    assert_eq!(done.state, ProviderState::Failed);
    assert_eq!(done.error.as_deref(), Some("output new_sensitive (1027)"));
    sim.shutdown().await;
}

#[tokio::test]
async fn a_wrong_or_missing_key_is_permanent() {
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
        let provider = build(&ProviderSettings {
            api_key: key.into(),
            ..sim.provider_settings(ProviderKind::Minimax)
        });
        let task = ProviderTask {
            id: "123456789012345".to_owned(),
        };
        let submit = provider.submit(&request("x")).await.expect_err("1004");
        let status = provider.status(&task, None).await.expect_err("1004");
        for error in [submit, status] {
            assert!(!error.is_transient(), "{key:?}: {error}");
            assert!(error.to_string().contains("1004"), "{error}");
        }
    }
    sim_provider(&sim)
        .submit(&request("x"))
        .await
        .expect("the right key works");
    sim.shutdown().await;
}
