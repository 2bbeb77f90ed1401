//! What an operator relies on: parked messages, graceful shutdown, log hygiene, the task API,
//! the client commands.

use std::process::Stdio;
use std::time::Duration;

use lapin::BasicProperties;
use secrecy::ExposeSecret;
use test_support::app::{env_with, fast_vars, start_sim};
use test_support::process::{command, sigterm};
use test_support::{eventually, spawn_app, Instance, TestEnv};
use tokio::io::AsyncReadExt;
use tokio_util::sync::CancellationToken;
use video_orchestrator::auth;
use video_orchestrator::client::{new_request, Client};
use video_orchestrator::providers::sim::{SimHandle, SimProvider, SimSettings};
use video_orchestrator::store::TaskStatus;

/// The fast settings on the test's prefix, database and broker, for a child process.
fn child_env(env: &TestEnv, sim: &SimHandle) -> Vec<(String, String)> {
    let mut vars = fast_vars(sim);
    vars.extend(env.child_vars());
    vars
}

#[tokio::test]
async fn poison_is_recorded_and_can_be_requeued_from_the_command_line() {
    let app = spawn_app(1000).await;
    let env = &app.env;
    let topology = env.topology();
    env.publish_raw(
        &topology.events_exchange(),
        "video.generation.requested",
        b"{\"this is\": not json",
        BasicProperties::default().with_type("VideoGenerationRequested".into()),
    )
    .await;
    let parked = eventually(Duration::from_secs(15), || async {
        let list = env.store.list_parked(10).await.ok()?;
        (!list.is_empty()).then_some(list)
    })
    .await
    .expect("the poison message is recorded in parked_messages");
    assert_eq!(parked.len(), 1);
    let first = &parked[0];
    assert!(first.reason.contains("JSON"), "reason: {}", first.reason);
    assert_eq!(first.original_queue, topology.generation_queue());
    assert_eq!(first.body, b"{\"this is\": not json");

    let listing = command(&["parked", "--json"])
        .envs(child_env(env, &app.sim))
        .output()
        .await
        .unwrap();
    assert!(
        listing.status.success(),
        "{}",
        String::from_utf8_lossy(&listing.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&listing.stdout).unwrap();
    assert_eq!(json[0]["id"], first.id);

    let requeue = command(&["parked", "--requeue", &first.id.to_string()])
        .envs(child_env(env, &app.sim))
        .output()
        .await
        .unwrap();
    assert!(
        requeue.status.success(),
        "{}",
        String::from_utf8_lossy(&requeue.stderr)
    );
    // Republished to where it was going, it is still poison: parked a second time.
    let again = eventually(Duration::from_secs(15), || async {
        let list = env.store.list_parked(10).await.ok()?;
        (list.len() == 2).then_some(list)
    })
    .await
    .expect("the requeued message came back through its queue");
    assert!(again
        .iter()
        .any(|p| p.id == first.id && p.requeued_at.is_some()));
    assert_eq!(env.queue_depth(&topology.parking_queue()).await, 2);
    app.stop().await;
}

#[tokio::test]
async fn the_task_endpoint_answers_only_the_owning_virtual_key() {
    let app = spawn_app(500).await;
    let request = new_request("vk-owner", "sora-2", "a fox");
    let id = app.submit(&request).await;
    app.events
        .wait_for(
            |e| e.is("video.generation.completed", &id),
            Duration::from_secs(30),
        )
        .await
        .expect("completed");
    let url = format!("http://{}/v1/tasks/{id}", app.service.http);
    let http = reqwest::Client::new();
    let owner_key = auth::create_key(&app.env.store, "vk-owner", "owner", false)
        .await
        .unwrap();
    let other_key = auth::create_key(&app.env.store, "vk-other", "other", false)
        .await
        .unwrap();
    let owner = http
        .get(&url)
        .bearer_auth(owner_key.key.expose_secret())
        .send()
        .await
        .unwrap();
    assert_eq!(owner.status(), 200);
    let body: serde_json::Value = owner.json().await.unwrap();
    for field in [
        "requestId",
        "virtualKeyId",
        "status",
        "progress",
        "videoUrl",
        "error",
    ] {
        assert!(body.get(field).is_some(), "missing {field} in {body}");
    }
    assert_eq!(body["status"], "completed");
    assert_eq!(body["progress"], 100);
    let other = http
        .get(&url)
        .bearer_auth(other_key.key.expose_secret())
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 404);
    let none = http.get(&url).send().await.unwrap();
    assert_eq!(none.status(), 401);
    let claimed = http
        .get(&url)
        .header("X-Virtual-Key", "vk-owner")
        .send()
        .await
        .unwrap();
    assert_eq!(
        claimed.status(),
        401,
        "a claimed tenant is not a credential"
    );

    let metrics = http
        .get(format!("http://{}/metrics", app.service.http))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "video_progress_checks_total",
        "video_progress_scheduling_lag_seconds_bucket",
        "video_progress_owned_partitions",
        "process_resident_memory_bytes",
    ] {
        assert!(metrics.contains(name), "/metrics lacks {name}");
    }
    app.stop().await;
}

#[tokio::test]
async fn submit_wait_exits_with_the_outcome_code() {
    let app = spawn_app(800).await;
    let run = |prompt: &'static str| {
        let vars = child_env(&app.env, &app.sim);
        async move {
            command(&[
                "submit",
                "--virtual-key",
                "vk-cli",
                "--model",
                "sora-2",
                "--prompt",
                prompt,
                "--wait",
            ])
            .envs(vars)
            .output()
            .await
            .unwrap()
        }
    };
    let ok = run("a calm sea").await;
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let id = String::from_utf8_lossy(&ok.stdout).trim().to_owned();
    assert!(id.starts_with("req-"), "prints the requestId: {id}");
    let task = app.task(&id).await;
    assert_eq!(task.status, TaskStatus::Completed);
    let failed = run("a stormy sea [fail]").await;
    assert_eq!(failed.status.code(), Some(3));

    let status = command(&["status", &id, "--json"])
        .envs(child_env(&app.env, &app.sim))
        .output()
        .await
        .unwrap();
    assert!(status.status.success());
    let json: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(json["requestId"], id.as_str());
    assert_eq!(json["status"], "completed");
    app.stop().await;
}

#[tokio::test]
async fn sigterm_mid_load_drains_and_loses_nothing() {
    let sim = start_sim(1500).await;
    let env = env_with(&sim, &[]).await;
    let events = env.events().await;
    let mut child = command(&["serve"])
        .envs(child_env(&env, &sim))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let stop = CancellationToken::new();
    let client = Client::new(env.broker().await, stop.clone());
    let mut ids = Vec::new();
    for i in 0..40 {
        let request = new_request(&format!("vk-{}", i % 4), "sora-2", "drain me");
        ids.push(client.submit(&request).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(sigterm(child.id().expect("pid")));
    let exit = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("the service exits within its grace period")
        .unwrap();
    assert!(exit.success(), "SIGTERM must end in exit 0, got {exit}");

    // Every request was either taken (a row exists) or is back in its queue.
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM video_tasks")
        .fetch_one(env.store.pool())
        .await
        .unwrap();
    let queued = env.queue_depth(&env.topology().generation_queue()).await;
    assert!(
        rows as u32 + queued >= 40,
        "{rows} rows + {queued} queued < 40 submitted: a message was lost on shutdown"
    );

    // A new instance finishes everything, once.
    let service = Instance::start_all(&env.settings).await;
    for id in &ids {
        let terminal = events
            .wait_for(
                |e| {
                    e.request_id() == Some(id.as_str())
                        && e.routing_key == "video.generation.completed"
                },
                Duration::from_secs(60),
            )
            .await;
        assert!(terminal.is_some(), "{id} never completed after the restart");
    }
    for id in &ids {
        let mut completed: Vec<String> = events
            .all()
            .iter()
            .filter(|e| e.is("video.generation.completed", id))
            .map(|e| e.body["messageId"].as_str().unwrap_or_default().to_owned())
            .collect();
        completed.sort();
        completed.dedup();
        assert_eq!(
            completed.len(),
            1,
            "{id} completed {} times",
            completed.len()
        );
    }
    stop.cancel();
    service.stop().await;
    events.close().await;
    env.cleanup().await;
    sim.shutdown().await;
}

#[tokio::test]
async fn logs_are_json_with_message_context_and_never_show_secrets() {
    const API_KEY: &str = "sk-test-SECRET-4242";
    let sim = SimProvider::start(
        "127.0.0.1:0".parse().unwrap(),
        SimSettings {
            duration_ms: 800,
            api_key: Some(API_KEY.to_owned()),
            ..SimSettings::default()
        },
    )
    .await
    .unwrap();
    let env = env_with(&sim, &[]).await;
    let events = env.events().await;
    let mut vars = child_env(&env, &sim);
    vars.push(("APP__PROVIDERS__SIM__API_KEY".into(), API_KEY.into()));
    vars.push(("APP__LOG__FORMAT".into(), "json".into()));
    let mut child = command(&["serve"])
        .envs(vars)
        .env("RUST_LOG", "debug")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let reader = tokio::spawn(async move {
        let mut all = Vec::new();
        let _ = stderr.read_to_end(&mut all).await;
        all
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let stop = CancellationToken::new();
    let client = Client::new(env.broker().await, stop.clone());
    let id = client
        .submit(&new_request("vk-logs", "sora-2", "quiet please"))
        .await
        .unwrap();
    events
        .wait_for(
            |e| e.is("video.generation.completed", &id),
            Duration::from_secs(30),
        )
        .await
        .expect("the task completes with the real key");
    sigterm(child.id().unwrap());
    tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8(reader.await.unwrap()).unwrap();

    assert!(
        !text.contains(API_KEY),
        "the provider API key appears in the logs"
    );
    assert!(
        !text.contains(":guest@"),
        "the broker password appears in the logs"
    );
    let mut handler_lines = 0;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let value: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
        let spans = value
            .get("spans")
            .and_then(|s| s.as_array())
            .cloned()
            .unwrap_or_default();
        if let Some(message_span) = spans.iter().find(|s| s["name"] == "message") {
            handler_lines += 1;
            for field in ["request_id", "virtual_key", "message_id", "message_type"] {
                assert!(
                    message_span.get(field).is_some(),
                    "{field} missing in {line}"
                );
            }
        }
    }
    assert!(handler_lines > 0, "no log line came from a message handler");
    stop.cancel();
    events.close().await;
    env.cleanup().await;
    sim.shutdown().await;
}

#[tokio::test]
async fn a_traceparent_is_carried_from_the_request_to_every_event_it_causes() {
    let app = spawn_app(1500).await;
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let request = new_request("vk-trace", "sora-2", "follow the trace");
    let mut headers = lapin::types::FieldTable::default();
    headers.insert(
        "x-virtual-key".into(),
        lapin::types::AMQPValue::LongString("vk-trace".into()),
    );
    headers.insert(
        "traceparent".into(),
        lapin::types::AMQPValue::LongString(format!("00-{trace_id}-00f067aa0ba902b7-01").into()),
    );
    app.env
        .publish_raw(
            &app.env.topology().events_exchange(),
            "video.generation.requested",
            &video_orchestrator::messages::encode(&request),
            BasicProperties::default()
                .with_type("VideoGenerationRequested".into())
                .with_headers(headers),
        )
        .await;
    let id = request.request_id.clone();
    app.events
        .wait_for(
            |e| e.is("video.progress.tracking_cancelled", &id),
            Duration::from_secs(30),
        )
        .await
        .expect("the task finishes");
    let caused: Vec<_> = app
        .events
        .all()
        .into_iter()
        .filter(|e| e.request_id() == Some(id.as_str()))
        .collect();
    assert!(caused
        .iter()
        .any(|e| e.routing_key == "video.generation.progress"));
    for e in &caused {
        let tp = e
            .traceparent
            .as_deref()
            .unwrap_or_else(|| panic!("{} has no traceparent", e.routing_key));
        assert!(
            tp.contains(trace_id),
            "{} left the trace: {tp}",
            e.routing_key
        );
    }
    app.stop().await;
}

/// Runs `rabbitmqctl -q ARGS` on this machine's broker.
async fn rabbitmqctl(args: &[&str]) {
    let out = tokio::process::Command::new("timeout")
        .args(["60", "rabbitmqctl", "-q"])
        .args(args)
        .output()
        .await
        .expect("rabbitmqctl runs");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `s` as a literal inside a RabbitMQ permission regex (PCRE).
fn regex_literal(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            let escape = !c.is_ascii_alphanumeric();
            escape.then_some('\\').into_iter().chain(std::iter::once(c))
        })
        .collect()
}

/// README "Who may publish what": with those permissions a client user can publish a request,
/// and RabbitMQ refuses its forged provider outcome before any consumer sees it.
#[tokio::test]
async fn the_readme_topic_permissions_let_a_client_request_but_not_forge_an_outcome() {
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
    use lapin::uri::AMQPUri;

    let env = TestEnv::new().await;
    let topology = env.topology();
    let _declared = env.broker().await;
    let exchange = topology.events_exchange();
    let user = format!("vo-client-{}", uuid::Uuid::new_v4().simple());
    let own = format!("^{}orders\\.", regex_literal(&env.prefix));
    let reach = format!(
        "^({}|{}orders\\..*)$",
        regex_literal(exchange.as_str()),
        regex_literal(&env.prefix)
    );
    rabbitmqctl(&["add_user", &user, "client-password"]).await;
    let outcome = async {
        rabbitmqctl(&["set_permissions", "-p", "/", &user, &own, &reach, &reach]).await;
        rabbitmqctl(&[
            "set_topic_permissions",
            "-p",
            "/",
            &user,
            exchange.as_str(),
            r"^video\.generation\.(requested|cancel_requested)$",
            r"^video\.(generation|progress)\..*$",
        ])
        .await;
        let mut uri: AMQPUri = env
            .rabbitmq_url()
            .parse()
            .expect("the test broker URL parses");
        uri.authority.userinfo.username = user.clone();
        uri.authority.userinfo.password = "client-password".to_owned();
        let connection =
            lapin::Connection::connect_uri(uri, lapin::ConnectionProperties::default())
                .await
                .expect("the client user connects");
        let channel = connection.create_channel().await.expect("channel");
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirms");
        let publish = |routing_key: &'static str| {
            let channel = channel.clone();
            let exchange = exchange.clone();
            async move {
                channel
                    .basic_publish(
                        exchange.as_str().into(),
                        routing_key.into(),
                        BasicPublishOptions::default(),
                        b"{}",
                        BasicProperties::default(),
                    )
                    .await?
                    .await
            }
        };
        let request = publish("video.generation.requested").await;
        let forged = publish("video.provider.task_finished").await;
        let _ = connection.close(200, "done".into()).await;
        (request, forged)
    }
    .await;
    rabbitmqctl(&["delete_user", &user]).await;
    env.cleanup().await;

    let (request, forged) = outcome;
    assert!(
        request.expect("a request is accepted").is_ack(),
        "the broker confirms the request"
    );
    let refused = format!("{:?}", forged.expect_err("the forged outcome is refused"));
    assert!(
        refused.to_ascii_uppercase().contains("ACCESS"),
        "refused for access, not something else: {refused}"
    );
}
