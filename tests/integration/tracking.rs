//! Progress tracking, end to end: the self-scheduling chain on the real broker and database.

use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use test_support::app::{env_with, fast_vars, spawn_app_with, start_sim};
use test_support::{eventually, process, spawn_app, Event, EventCollector, Instance, TestEnv};
use tokio_util::sync::CancellationToken;
use video_orchestrator::app::Role;
use video_orchestrator::broker::Publisher;
use video_orchestrator::client::{new_request, Client};
use video_orchestrator::messages::{Envelope, Meta, VideoProgressCheckRequested};
use video_orchestrator::providers::sim::{SimFaults, SimHandle};
use video_orchestrator::store::TaskStatus;

use crate::proxy::Proxy;

const DONE: Duration = Duration::from_secs(45);

/// Checks 5 s apart, so each waits in the 5 s delay tier.
const FIVE_SECOND_CHECKS: &[(&str, &str)] = &[
    ("APP__TRACKING__MIN_INTERVAL_MS", "5000"),
    ("APP__TRACKING__MAX_INTERVAL_MS", "5000"),
];

async fn submit(env: &TestEnv, vk: &str, prompt: &str) -> String {
    let stop = CancellationToken::new();
    let client = Client::new(env.broker().await, stop.clone());
    let request = new_request(vk, "sora-2", prompt);
    let id = client.submit(&request).await.expect("request published");
    stop.cancel();
    id
}

async fn wait_terminal(events: &EventCollector, id: &str) -> Event {
    events
        .wait_for(
            |e| {
                e.request_id() == Some(id)
                    && matches!(
                        e.routing_key.as_str(),
                        "video.generation.completed"
                            | "video.generation.failed"
                            | "video.generation.cancelled"
                    )
            },
            DONE,
        )
        .await
        .unwrap_or_else(|| panic!("no terminal event for {id}"))
}

fn status_calls(sim: &SimHandle, job: &str) -> u64 {
    sim.stats()
        .status_calls_by_job
        .get(job)
        .copied()
        .unwrap_or(0)
}

async fn publish_check(env: &TestEnv, check: &VideoProgressCheckRequested) {
    let stop = CancellationToken::new();
    let publisher = Publisher::new(env.broker().await, stop.clone());
    let topology = env.topology();
    let envelope = Envelope::new(topology.progress_exchange(), "check", check);
    publisher.publish(&envelope).await.expect("check published");
    stop.cancel();
}

#[tokio::test]
async fn a_task_is_tracked_to_the_end_with_monotonic_progress_and_leaves_no_check_behind() {
    let app = spawn_app(3000).await;
    let id = app
        .submit(&new_request("vk-mono", "sora-2", "a lighthouse at dusk"))
        .await;
    let terminal = wait_terminal(&app.events, &id).await;
    assert_eq!(terminal.routing_key, "video.generation.completed");

    let all = app.events.all();
    let progress: Vec<u64> = all
        .iter()
        .filter(|e| e.is("video.generation.progress", &id))
        .map(|e| e.body["progress"].as_u64().expect("progress is a number"))
        .collect();
    assert!(!progress.is_empty(), "no progress event was published");
    assert!(
        progress.windows(2).all(|w| w[0] <= w[1]),
        "progress went backwards: {progress:?}"
    );
    assert!(
        progress.iter().all(|p| *p < 100),
        "progress reached 100 before completion: {progress:?}"
    );
    let completed_at = all
        .iter()
        .position(|e| e.is("video.generation.completed", &id))
        .unwrap();
    assert!(
        all.iter()
            .skip(completed_at)
            .all(|e| !e.is("video.generation.progress", &id)),
        "progress published after completion"
    );

    let task = app.task(&id).await;
    assert_eq!(task.status, TaskStatus::Completed);
    assert!(task.tracking_stopped);
    assert!(task.checks_count >= 1);

    // The longest tier (5 s) elapses: nothing may be left circulating for this task.
    tokio::time::sleep(Duration::from_millis(5500)).await;
    app.stop_leaving_no_checks().await;
}

#[tokio::test]
async fn a_check_waiting_in_a_delay_queue_dies_when_tracking_is_cancelled() {
    // Checks wait 5 s in the delay tier: the cancel lands while the first one waits there.
    let app = spawn_app_with(60_000, FIVE_SECOND_CHECKS).await;
    let id = app
        .submit(&new_request("vk-cancel", "sora-2", "a very long film"))
        .await;
    app.events
        .wait_for(|e| e.is("video.generation.started", &id), DONE)
        .await
        .expect("started");
    app.client
        .cancel(&id, "vk-cancel", Some("changed my mind".into()))
        .await
        .unwrap();
    app.events
        .wait_for(|e| e.is("video.progress.tracking_cancelled", &id), DONE)
        .await
        .expect("tracking cancelled");

    // Let the waiting check arrive and die.
    tokio::time::sleep(Duration::from_millis(6500)).await;
    let task = app.task(&id).await;
    assert_eq!(task.status, TaskStatus::Cancelled);
    let job = task.provider_task_id.clone().expect("provider job");
    assert_eq!(
        status_calls(&app.sim, &job),
        0,
        "the cancelled task's check still asked the provider"
    );
    assert!(
        !app.events
            .all()
            .iter()
            .any(|e| e.is("video.generation.progress", &id)),
        "progress was published after the cancel"
    );
    assert_eq!(task.checks_count, 0);
    app.stop_leaving_no_checks().await;
}

#[tokio::test]
async fn redelivered_and_duplicated_checks_are_dropped_so_one_chain_runs() {
    let app = spawn_app(4000).await;
    let id = app
        .submit(&new_request(
            "vk-dup",
            "sora-2",
            "two chains would be one too many",
        ))
        .await;
    let started = app
        .events
        .wait_for(|e| e.is("video.generation.started", &id), DONE)
        .await
        .expect("started");
    let start_time = started.body["startedAt"].as_str().unwrap().parse().unwrap();
    // The same first check (sequence 0) three more times, straight into the partition: as if it
    // had been redelivered and published twice.
    for _ in 0..3 {
        let check = VideoProgressCheckRequested {
            meta: Meta::new(),
            request_id: id.clone(),
            virtual_key_id: "vk-dup".into(),
            scheduled_at: video_orchestrator::messages::now(),
            interval_index: 0,
            start_time,
            sequence: 0,
        };
        publish_check(&app.env, &check).await;
    }
    let terminal = wait_terminal(&app.events, &id).await;
    assert_eq!(terminal.routing_key, "video.generation.completed");
    tokio::time::sleep(Duration::from_millis(5500)).await;

    let task = app.task(&id).await;
    let job = task.provider_task_id.clone().unwrap();
    let calls = status_calls(&app.sim, &job);
    let tracked = (task.finished_at.unwrap() - task.started_at.unwrap()).num_milliseconds() as u64;
    // One chain asks once per check that advanced (the last may lose to the completion).
    assert!(calls >= 1);
    assert!(
        calls <= task.checks_count as u64 + 1,
        "provider saw {calls} status calls for {} checks: a chain forked",
        task.checks_count
    );
    assert!(
        calls <= tracked / 1000 + 2,
        "{calls} calls in {tracked} ms at 1 s intervals"
    );
    app.stop_leaving_no_checks().await;
}

#[tokio::test]
async fn a_check_for_a_missing_task_is_orphaned_and_not_rescheduled() {
    let sim = start_sim(1000).await;
    let env = env_with(&sim, &[]).await;
    let service = Instance::start(&env.settings, &[Role::Tracking]).await;
    let check = VideoProgressCheckRequested {
        meta: Meta::new(),
        request_id: "no-such-task".into(),
        virtual_key_id: "vk-orphan".into(),
        scheduled_at: video_orchestrator::messages::now(),
        interval_index: 3,
        start_time: video_orchestrator::messages::now(),
        sequence: 7,
    };
    publish_check(&env, &check).await;
    // Consumed (the partition empties) and nothing scheduled after it.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    service.stop().await;
    env.assert_no_checks_left().await;
    assert_eq!(sim.stats().status_calls, 0);
    env.cleanup().await;
    sim.shutdown().await;
}

async fn owned_by(env: &TestEnv, instance: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM partition_leases WHERE topology_prefix = $1 AND owner = $2 AND expires_at > now()",
    )
    .bind(&env.prefix)
    .bind(instance)
    .fetch_one(env.store.pool())
    .await
    .unwrap()
}

/// As after a database outage longer than the lease TTL: the instance's consumers stopped while
/// its rows still name it the owner of every partition, and a second instance is live when the
/// database answers again. Renewing all 16 and running 8 would keep the other 8 from everyone
/// (a CI run lost 14 of 30 tasks that way); the extras must be given back.
#[tokio::test]
async fn leases_an_instance_holds_over_its_share_but_does_not_run_are_given_back() {
    let sim = start_sim(1000).await;
    let env = env_with(&sim, &[]).await;
    let app = video_orchestrator::app::Application::build(env.settings.clone(), &[Role::Tracking])
        .await
        .expect("service builds");
    let a = app.instance_id().to_owned();
    sqlx::query(
        "INSERT INTO partition_leases (topology_prefix, partition, owner, expires_at)
         SELECT $1, g, $2, now() - interval '1 minute' FROM generate_series(0, 15) g",
    )
    .bind(&env.prefix)
    .bind(&a)
    .execute(env.store.pool())
    .await
    .expect("leases of an instance whose consumers stopped");
    // A live peer that takes nothing: whatever A gives back stays free for the assertion.
    let peer = CancellationToken::new();
    let beats = {
        let (pool, prefix, peer) = (env.store.pool().clone(), env.prefix.clone(), peer.clone());
        tokio::spawn(async move {
            while !peer.is_cancelled() {
                sqlx::query(
                    "INSERT INTO service_instances (topology_prefix, instance_id, heartbeat_at)
                     VALUES ($1, 'peer-b', now())
                     ON CONFLICT (topology_prefix, instance_id) DO UPDATE SET heartbeat_at = now()",
                )
                .bind(&prefix)
                .execute(&pool)
                .await
                .expect("peer heartbeat");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    let instance = Instance::run(app);
    let free = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM partition_leases
             WHERE topology_prefix = $1 AND (owner IS NULL OR expires_at < now())",
        )
        .bind(&env.prefix)
        .fetch_one(env.store.pool())
        .await
        .unwrap()
    };
    let split = eventually(Duration::from_secs(10), || async {
        let (held, free) = (owned_by(&env, &a).await, free().await);
        (held == 8 && free == 8).then_some(())
    })
    .await;
    // Several heartbeats later (500 ms apart) it still holds its share and no more.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (held, left) = (owned_by(&env, &a).await, free().await);
    peer.cancel();
    beats.await.expect("peer heartbeats");
    instance.stop().await;
    assert!(
        split.is_some(),
        "the instance kept {held} leases and left {left} free; its share is 8"
    );
    assert_eq!((held, left), (8, 8), "8 held, 8 free for the peer");
    env.cleanup().await;
    sim.shutdown().await;
}

#[tokio::test]
async fn two_instances_share_the_partitions_and_one_takes_all_when_the_other_stops() {
    let sim = start_sim(3000).await;
    let env = env_with(&sim, &[]).await;
    let events = env.events().await;
    let a = Instance::start_all(&env.settings).await;
    eventually(Duration::from_secs(30), || async {
        (owned_by(&env, &a.instance_id).await == 16).then_some(())
    })
    .await
    .expect("the first instance owns all 16 partitions");

    let b = Instance::start_all(&env.settings).await;
    let mut ids = Vec::new();
    for i in 0..8 {
        ids.push(submit(&env, &format!("vk-{i}"), "handover").await);
    }
    let balanced = eventually(Duration::from_secs(30), || async {
        let (na, nb) = (
            owned_by(&env, &a.instance_id).await,
            owned_by(&env, &b.instance_id).await,
        );
        ((7..=9).contains(&na) && (7..=9).contains(&nb) && na + nb == 16).then_some((na, nb))
    })
    .await;
    assert!(
        balanced.is_some(),
        "partitions not balanced 8 ± 1 within 30 s"
    );

    let b_id = b.instance_id.clone();
    a.stop().await;
    eventually(Duration::from_secs(30), || async {
        (owned_by(&env, &b_id).await == 16).then_some(())
    })
    .await
    .expect("the remaining instance owns all 16 partitions within 30 s");

    for id in &ids {
        let terminal = wait_terminal(&events, id).await;
        assert_eq!(terminal.routing_key, "video.generation.completed", "{id}");
    }
    tokio::time::sleep(Duration::from_millis(5500)).await;
    for id in &ids {
        let task = env.store.get(id).await.unwrap().unwrap();
        let calls = status_calls(&sim, task.provider_task_id.as_deref().unwrap());
        assert!(
            calls <= task.checks_count as u64 + 1,
            "{id}: {calls} provider calls for {} checks across the hand-over",
            task.checks_count
        );
        let completed = events
            .all()
            .iter()
            .filter(|e| e.is("video.generation.completed", id))
            .count();
        assert_eq!(completed, 1, "{id} completed {completed} times");
    }
    b.stop().await;
    env.assert_no_checks_left().await;
    events.close().await;
    env.cleanup().await;
    sim.shutdown().await;
}

#[tokio::test]
async fn a_database_outage_mid_task_does_not_end_tracking() {
    let sim = start_sim(8000).await;
    let env = env_with(&sim, &[("APP__DATABASE__ACQUIRE_TIMEOUT_MS", "1000")]).await;
    let pg = Proxy::start("127.0.0.1:5432".parse().unwrap()).await;
    let mut settings = env.settings.clone();
    let mut url = url::Url::parse(settings.database.url.expose_secret()).unwrap();
    url.set_port(Some(pg.addr().port())).unwrap();
    settings.database.url = SecretString::from(url.to_string());
    let events = env.events().await;
    let service = Instance::start_all(&settings).await;

    let id = submit(&env, "vk-db", "through an outage").await;
    events
        .wait_for(|e| e.is("video.generation.progress", &id), DONE)
        .await
        .expect("tracking started");
    pg.set_down(true);
    let ready = format!("http://{}/readyz", service.http);
    let not_ready = eventually(Duration::from_secs(15), || async {
        let r = reqwest::get(&ready).await.ok()?;
        (r.status() == reqwest::StatusCode::SERVICE_UNAVAILABLE).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    pg.set_down(false);
    assert!(
        not_ready.is_some(),
        "/readyz stayed ready while the database was down"
    );

    let terminal = wait_terminal(&events, &id).await;
    assert_eq!(terminal.routing_key, "video.generation.completed");
    let back = eventually(Duration::from_secs(15), || async {
        let r = reqwest::get(&ready).await.ok()?;
        r.status().is_success().then_some(())
    })
    .await;
    assert!(back.is_some(), "/readyz did not come back");
    service.stop().await;
    events.close().await;
    env.cleanup().await;
    sim.shutdown().await;
}

#[tokio::test]
async fn a_lost_delayed_check_is_rearmed_by_the_sweeper() {
    let app = spawn_app_with(9000, FIVE_SECOND_CHECKS).await;
    let id = app
        .submit(&new_request("vk-lost", "sora-2", "a check goes missing"))
        .await;
    app.events
        .wait_for(|e| e.is("video.generation.started", &id), DONE)
        .await
        .expect("started");
    let tier = app.env.topology().delay_queue(5000);
    eventually(Duration::from_secs(5), || async {
        (app.env.queue_depth(&tier).await == 1).then_some(())
    })
    .await
    .expect("the first check waits in the 5 s tier");
    let channel = app.env.connection.create_channel().await.unwrap();
    channel
        .queue_purge(
            tier.as_str().into(),
            lapin::options::QueuePurgeOptions::default(),
        )
        .await
        .unwrap();
    let _ = channel.close(200, "purged".into()).await;

    let terminal = wait_terminal(&app.events, &id).await;
    assert_eq!(terminal.routing_key, "video.generation.completed");
    let task = app.task(&id).await;
    assert!(
        task.check_sequence >= 1,
        "the sweeper bumps the sequence when it re-arms"
    );
    app.stop().await;
}

/// Runs the real binary with the crash hook at `point`, waits for it to die mid-check, then a
/// normal instance takes over: the task completes once, the chain neither forked nor died.
async fn crash_at(point: &str) {
    let sim = start_sim(4000).await;
    let env = env_with(&sim, &[]).await;
    let events = env.events().await;
    let mut vars = fast_vars(&sim);
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
    let id = submit(&env, "vk-crash", "crash me").await;
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

    let service = Instance::start_all(&env.settings).await;
    let terminal = wait_terminal(&events, &id).await;
    assert_eq!(terminal.routing_key, "video.generation.completed");
    tokio::time::sleep(Duration::from_millis(5500)).await;
    let task = env.store.get(&id).await.unwrap().unwrap();
    let calls = status_calls(&sim, task.provider_task_id.as_deref().unwrap());
    assert!(
        calls <= task.checks_count as u64 + 2,
        "{point}: {calls} provider calls for {} checks: the chain forked",
        task.checks_count
    );
    // The relay is at-least-once: count distinct message ids, as a consumer de-duplicates.
    let distinct = |key: &str| {
        let mut ids: Vec<String> = events
            .all()
            .iter()
            .filter(|e| e.is(key, &id))
            .map(|e| e.body["messageId"].as_str().unwrap_or_default().to_owned())
            .collect();
        ids.sort();
        ids.dedup();
        ids.len()
    };
    assert_eq!(distinct("video.generation.completed"), 1);
    assert_eq!(distinct("video.generation.started"), 1);
    service.stop().await;
    env.assert_no_checks_left().await;
    events.close().await;
    env.cleanup().await;
    sim.shutdown().await;
}

#[tokio::test]
async fn a_crash_after_receiving_a_check_leaves_one_chain() {
    crash_at("received").await;
}

#[tokio::test]
async fn a_crash_after_publishing_the_next_check_leaves_one_chain() {
    crash_at("after_publish").await;
}

#[tokio::test]
async fn a_crash_after_advancing_the_row_leaves_one_chain() {
    crash_at("after_advance").await;
}

#[tokio::test]
async fn a_huge_retry_after_on_status_leaves_the_task_checked_before_its_deadline() {
    for retry_after in ["86400", "99999999999999"] {
        let app = spawn_app_with(600_000, &[("APP__TRACKING__MAX_DURATION_MS", "8000")]).await;
        let request = new_request("vk-slow-down", "sora-2", "rate limited for a day");
        let id = app.submit(&request).await;
        app.events
            .wait_for(|e| e.is("video.generation.started", &id), DONE)
            .await
            .expect("started");
        app.sim.set_faults(SimFaults {
            rate_limit_rate: 1.0,
            retry_after: Some(retry_after.to_owned()),
            ..SimFaults::default()
        });
        let failed = app
            .events
            .wait_for(|e| e.is("video.generation.failed", &id), DONE)
            .await
            .unwrap_or_else(|| panic!("Retry-After: {retry_after}: the task was not checked again before its deadline"));
        assert_eq!(failed.body["error"], "timed out", "{}", failed.body);
        assert!(
            app.sim.stats().status_calls > 0,
            "the provider was asked and answered 429"
        );
        assert_eq!(app.task(&id).await.status, TaskStatus::TimedOut);
        app.stop().await;
    }
}
