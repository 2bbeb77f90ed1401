//! At most one provider job per task: the intent is recorded before the POST, the job id the
//! moment it is known; an attempt whose outcome is unknown is failed (or resubmitted by policy),
//! never silently sent again.

use std::time::Duration;

use test_support::app::{env_with, fast_vars, spawn_app_with, start_sim};
use test_support::{process, spawn_app, Event, Instance, TestApp};
use tokio_util::sync::CancellationToken;
use video_orchestrator::client::{new_request, Client};
use video_orchestrator::messages::VideoGenerationRequested;
use video_orchestrator::providers::sim::SimFaults;
use video_orchestrator::store::{NewTask, TaskStatus};

const DONE: Duration = Duration::from_secs(30);

/// A pending row for `request` as an instance killed mid-submit leaves it: an attempt recorded,
/// maybe a job, and no touch for an hour (so the sweeper's or a duplicate's claim succeeds).
async fn leave_pending(app: &TestApp, request: &VideoGenerationRequested, job: Option<&str>) {
    let mut uow = app.env.store.begin().await.unwrap();
    let task = NewTask {
        request_id: request.request_id.clone(),
        virtual_key_id: request.virtual_key_id.clone(),
        model: request.model.clone(),
        prompt: request.prompt.clone(),
        provider: "sim".to_owned(),
        ..NewTask::default()
    };
    uow.insert_task(&task, TaskStatus::Pending).await.unwrap();
    uow.commit().await.unwrap();
    sqlx::query(
        "UPDATE video_tasks SET submit_attempt_id = 'crashed-attempt', submit_attempted_at = now() - interval '1 hour',
             provider_task_id = $2, updated_at = now() - interval '1 hour'
         WHERE request_id = $1",
    )
    .bind(&request.request_id)
    .bind(job)
    .execute(app.env.store.pool())
    .await
    .unwrap();
}

/// A job at the simulator, created the way the service would have created it.
async fn job_at_the_simulator(app: &TestApp, prompt: &str) -> String {
    let created: serde_json::Value = reqwest::Client::new()
        .post(format!("{}/v1/videos", app.sim.base_url()))
        .bearer_auth("sim-key")
        .json(&serde_json::json!({ "model": "sora-2", "prompt": prompt }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    created["id"].as_str().expect("a job id").to_owned()
}

#[tokio::test]
async fn a_recorded_job_is_resumed_and_never_submitted_again() {
    let app = spawn_app(500).await;
    let request = new_request("vk-once", "sora-2", "submitted before the crash");
    let job = job_at_the_simulator(&app, &request.prompt).await;
    leave_pending(&app, &request, Some(&job)).await;
    app.submit(&request).await;
    app.events
        .wait_for(
            |e| e.is("video.generation.completed", &request.request_id),
            DONE,
        )
        .await
        .expect("the task resumes from its recorded job and completes");
    let task = app.task(&request.request_id).await;
    assert_eq!(task.provider_task_id.as_deref(), Some(job.as_str()));
    assert_eq!(
        app.sim.stats().submits,
        1,
        "only the job made before the crash"
    );
    app.stop().await;
}

#[tokio::test]
async fn an_attempt_of_unknown_outcome_fails_the_task_by_default_and_is_not_sent_again() {
    let app = spawn_app(500).await;
    let request = new_request(
        "vk-once",
        "sora-2",
        "crashed between the POST and the record",
    );
    leave_pending(&app, &request, None).await;
    app.submit(&request).await;
    let failed = app
        .events
        .wait_for(
            |e| e.is("video.generation.failed", &request.request_id),
            DONE,
        )
        .await
        .expect("the task fails");
    assert_eq!(failed.body["error"], "submission outcome unknown");
    assert_eq!(failed.body["retryable"], true);
    assert_eq!(app.sim.stats().submits, 0, "nothing is sent again");
    app.stop().await;
}

#[tokio::test]
async fn an_attempt_of_unknown_outcome_is_resubmitted_when_the_policy_says_so() {
    let app = spawn_app_with(500, &[("APP__GENERATION__AMBIGUOUS_SUBMIT", "resubmit")]).await;
    let request = new_request("vk-once", "sora-2", "resubmitted by policy");
    leave_pending(&app, &request, None).await;
    app.submit(&request).await;
    app.events
        .wait_for(
            |e| e.is("video.generation.completed", &request.request_id),
            DONE,
        )
        .await
        .expect("the task is submitted again and completes");
    assert_eq!(app.sim.stats().submits, 1);
    app.stop().await;
}

#[tokio::test]
async fn a_submit_the_provider_never_answers_is_not_retried() {
    let app = spawn_app_with(
        500,
        &[
            ("APP__PROVIDERS__SIM__TIMEOUT_MS", "1000"),
            ("APP__GENERATION__SUBMIT_MAX_ATTEMPTS", "5"),
        ],
    )
    .await;
    app.sim.set_faults(SimFaults {
        latency_ms: 3000,
        ..SimFaults::default()
    });
    let request = new_request("vk-once", "sora-2", "sent, then silence");
    app.submit(&request).await;
    let failed = app
        .events
        .wait_for(
            |e| e.is("video.generation.failed", &request.request_id),
            DONE,
        )
        .await
        .expect("the task fails as unknown");
    assert_eq!(failed.body["error"], "submission outcome unknown");
    assert_eq!(
        app.sim.stats().submits,
        1,
        "one POST: a timed-out submit may have created the job, so it is not sent again"
    );
    app.sim.set_faults(SimFaults::default());
    app.stop().await;
}

/// Runs the real binary with the submit crash hook at `point`, waits for it to die right after
/// the provider accepted the job, then a normal instance takes the redelivered request over.
/// `extra` configures both (e.g. a provider of another kind); `provider` is requested by name.
async fn crash_in_submit(
    point: &str,
    extra: &[(&str, &str)],
    provider: Option<&str>,
) -> (Event, video_orchestrator::providers::sim::SimStats) {
    let sim = start_sim(1500).await;
    let owned: Vec<(String, String)> = extra
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.replace("{sim}", &sim.base_url())))
        .collect();
    let borrowed: Vec<(&str, &str)> = owned
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let env = env_with(&sim, &borrowed).await;
    let events = env.events().await;
    let mut vars = fast_vars(&sim);
    vars.extend(owned.iter().cloned());
    vars.extend(env.child_vars());
    let child = process::command(&["serve"])
        .envs(vars)
        .env("VIDEO_ORCHESTRATOR_CRASH_AT", point)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("binary starts");
    // The binary declares the topology and waits for its HTTP port; publish once it is up.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let stop = CancellationToken::new();
    let client = Client::new(env.broker().await, stop.clone());
    let mut request = new_request("vk-crash-submit", "sim-video-1", "crash in the submit");
    request.provider = provider.map(str::to_owned);
    let id = client.submit(&request).await.expect("published");
    let output = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("the process dies at the crash point")
        .unwrap();
    assert!(!output.status.success(), "the process must have aborted");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("VIDEO_ORCHESTRATOR_CRASH_AT"),
        "the process died elsewhere than the crash point: {stderr}"
    );
    assert_eq!(sim.stats().jobs, 1, "the provider accepted the job");

    let service = Instance::start_all(&env.settings).await;
    let terminal = events
        .wait_for(
            |e| e.is("video.generation.completed", &id) || e.is("video.generation.failed", &id),
            DONE,
        )
        .await
        .expect("the task ends");
    let stats = sim.stats();
    stop.cancel();
    drop(client);
    service.stop().await;
    events.close().await;
    env.cleanup().await;
    sim.shutdown().await;
    (terminal, stats)
}

#[tokio::test]
async fn a_crash_after_the_job_id_was_recorded_resumes_the_one_job() {
    let (terminal, stats) = crash_in_submit("after_job_recorded", &[], None).await;
    assert_eq!(
        terminal.routing_key, "video.generation.completed",
        "{}",
        terminal.body
    );
    assert_eq!(stats.submits, 1, "nothing submitted again");
    assert_eq!(stats.jobs, 1, "exactly one provider job");
}

#[tokio::test]
async fn a_crash_before_the_job_id_was_recorded_fails_the_task_as_unknown_by_default() {
    let (terminal, stats) = crash_in_submit("after_provider_accepted", &[], None).await;
    assert_eq!(
        terminal.routing_key, "video.generation.failed",
        "{}",
        terminal.body
    );
    assert_eq!(terminal.body["error"], "submission outcome unknown");
    assert_eq!(terminal.body["retryable"], true);
    assert_eq!(stats.submits, 1, "not sent again");
    assert_eq!(stats.jobs, 1, "exactly one provider job");
}

#[tokio::test]
async fn a_crash_before_the_job_id_was_recorded_is_resolved_through_klings_external_task_id() {
    let kling = [
        ("APP__PROVIDERS__KLING__KIND", "kling"),
        ("APP__PROVIDERS__KLING__BASE_URL", "{sim}/kling"),
        ("APP__PROVIDERS__KLING__ACCESS_KEY", "ak-crash-test"),
        ("APP__PROVIDERS__KLING__API_KEY", "sim-key"),
    ];
    let (terminal, stats) = crash_in_submit("after_provider_accepted", &kling, Some("kling")).await;
    assert_eq!(
        terminal.routing_key, "video.generation.completed",
        "the job is found again by our attempt id and tracked: {}",
        terminal.body
    );
    assert_eq!(stats.submits, 1, "not sent again");
    assert_eq!(stats.jobs, 1, "exactly one provider job");
}

/// Kling's lookup by `external_task_id` right after a timeout may not see a job whose POST
/// landed as the client gave up. A "no such task" is asked again after a pause, so the late job
/// is found and tracked instead of a second one being made.
#[tokio::test]
async fn a_job_that_appears_just_after_the_timeout_is_found_not_made_twice() {
    use video_orchestrator::providers::ProviderKind;
    let app = test_support::app::spawn_app_with_providers(500, |sim| {
        let mut kling = sim.provider_settings(ProviderKind::Kling);
        // Under the simulator's 1.5 s before a `[late]` job can be looked up.
        kling.timeout_ms = 1_000;
        vec![("kling".to_owned(), kling)]
    })
    .await;
    let mut request = new_request("vk-late", "kling-v2-6", "landed as we gave up [late]");
    request.provider = Some("kling".to_owned());
    let id = app.submit(&request).await;
    let terminal = app
        .events
        .wait_for(
            |e| {
                e.request_id() == Some(id.as_str())
                    && (e.routing_key == "video.generation.completed"
                        || e.routing_key == "video.generation.failed")
            },
            DONE,
        )
        .await
        .expect("the task ends");
    let stats = app.sim.stats();
    assert_eq!(
        terminal.routing_key, "video.generation.completed",
        "the late job is found by the attempt id and tracked: {}",
        terminal.body
    );
    assert_eq!((stats.submits, stats.jobs), (1, 1), "one POST, one job");
    app.stop().await;
}

/// A cancel that lands while the submit is in flight ends the task at once; the job the provider
/// answered with afterwards is still written on the cancelled row (and cancelled there where
/// the protocol can), so no job is left that no task points at.
#[tokio::test]
async fn a_task_cancelled_while_its_submit_is_in_flight_keeps_the_job_it_got() {
    let app = spawn_app(500).await;
    app.sim.set_faults(SimFaults {
        latency_ms: 1500,
        ..SimFaults::default()
    });
    let request = new_request("vk-once", "sora-2", "cancelled mid-submit");
    let id = app.submit(&request).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    app.client
        .cancel(&id, "vk-once", Some("changed my mind".to_owned()))
        .await
        .expect("cancel published");
    app.events
        .wait_for(|e| e.is("video.generation.cancelled", &id), DONE)
        .await
        .expect("the task is cancelled while its submit is in flight");
    let recorded = test_support::eventually(Duration::from_secs(10), || async {
        app.task(&id).await.provider_task_id
    })
    .await
    .expect("the job the provider answered with is written on the cancelled row");
    let task = app.task(&id).await;
    assert_eq!(task.status, TaskStatus::Cancelled);
    assert!(!recorded.is_empty());
    assert_eq!(app.sim.stats().submits, 1);
    app.sim.set_faults(SimFaults::default());
    app.stop().await;
}

/// A POST slower than `generation.pending_grace_ms` keeps its claim alive while it waits, so the
/// sweeper does not re-drive the task meanwhile (which would find an attempt of unknown outcome
/// and fail the task while its job was being made).
#[tokio::test]
async fn a_submit_slower_than_the_pending_grace_keeps_its_claim_and_completes() {
    let app = spawn_app_with(
        300,
        &[
            ("APP__GENERATION__PENDING_GRACE_MS", "1500"),
            ("APP__PROVIDERS__SIM__TIMEOUT_MS", "10000"),
        ],
    )
    .await;
    app.sim.set_faults(SimFaults {
        latency_ms: 4000,
        ..SimFaults::default()
    });
    let request = new_request("vk-once", "sora-2", "a slow provider");
    let id = app.submit(&request).await;
    let terminal = app
        .events
        .wait_for(
            |e| {
                e.request_id() == Some(id.as_str())
                    && (e.routing_key == "video.generation.completed"
                        || e.routing_key == "video.generation.failed")
            },
            Duration::from_secs(45),
        )
        .await
        .expect("the task ends");
    app.sim.set_faults(SimFaults::default());
    assert_eq!(
        terminal.routing_key, "video.generation.completed",
        "not re-driven mid-submit: {}",
        terminal.body
    );
    assert_eq!(app.sim.stats().submits, 1);
    app.stop().await;
}
