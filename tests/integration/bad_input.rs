//! Bad input on the real broker and database: data that PostgreSQL or AMQP cannot hold is
//! refused at once, never mistaken for an outage, and never holds up anyone else's work.

use std::time::{Duration, Instant};

use lapin::BasicProperties;
use test_support::app::{env_with, eventually, start_sim, Instance};
use test_support::TestEnv;
use tokio_util::sync::CancellationToken;
use video_orchestrator::broker::Publisher;
use video_orchestrator::client::{new_request, Client};
use video_orchestrator::messages::{Message, VideoGenerationRequested, VideoGenerationStarted};
use video_orchestrator::relay::OutboxRelay;
use video_orchestrator::store::TaskStatus;

/// A bound only a broken service reaches.
const DONE: Duration = Duration::from_secs(30);

async fn time_to_complete(client: &Client, env: &TestEnv, prompt: &str) -> Duration {
    let started = Instant::now();
    let id = client
        .submit(&new_request("vk-normal", "sora-2", prompt))
        .await
        .expect("request published");
    eventually(DONE, || async {
        let task = env.store.get(&id).await.ok()??;
        (task.status == TaskStatus::Completed).then_some(())
    })
    .await
    .unwrap_or_else(|| panic!("{id} completes"));
    started.elapsed()
}

fn raw_request(request_id: &str, prompt: &str) -> Vec<u8> {
    let mut r = new_request("vk-bad", "sora-2", "x");
    r.request_id = request_id.to_owned();
    r.prompt = prompt.to_owned();
    serde_json::to_vec(&r).expect("encode")
}

#[tokio::test]
async fn unstorable_requests_are_parked_at_once_and_a_normal_one_after_them_is_not_delayed() {
    let sim = start_sim(500).await;
    let env = env_with(&sim, &[]).await;
    let instance = Instance::start_all(&env.settings).await;
    let client_stop = CancellationToken::new();
    let client = Client::new(env.broker().await, client_stop.clone());
    let topology = env.topology();
    let without = time_to_complete(&client, &env, "before the bad ones").await;

    let long_id = "r".repeat(5000);
    let bad: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "bad-nul",
            raw_request("req-nul", "a cat\u{0}on a skateboard"),
            "NUL",
        ),
        (
            "bad-long-id",
            raw_request(&long_id, "fine prompt"),
            "requestId",
        ),
        (
            "bad-1mib",
            raw_request("req-huge", &"y".repeat(1024 * 1024)),
            "generation.max_message_bytes",
        ),
    ];
    let published = Instant::now();
    for (message_id, body, _) in &bad {
        env.publish_raw(
            &topology.events_exchange(),
            VideoGenerationRequested::ROUTING_KEY,
            body,
            BasicProperties::default()
                .with_message_id((*message_id).into())
                .with_type(VideoGenerationRequested::NAME.into()),
        )
        .await;
    }
    let with = time_to_complete(&client, &env, "right after the bad ones").await;

    let parked = eventually(Duration::from_secs(10), || async {
        let list = env.store.list_parked(10).await.ok()?;
        (list.len() >= bad.len()).then_some(list)
    })
    .await
    .expect("all three are parked within 10 s");
    let parked_within = published.elapsed();
    assert_eq!(parked.len(), bad.len(), "only the bad ones are parked");
    for (message_id, _, names) in &bad {
        let p = parked
            .iter()
            .find(|p| p.message_id.as_deref() == Some(*message_id))
            .unwrap_or_else(|| panic!("{message_id} is parked"));
        assert!(p.reason.contains(names), "{message_id}: `{}`", p.reason);
    }
    for id in ["req-nul", "req-huge"] {
        assert!(
            env.store.get(id).await.expect("read").is_none(),
            "{id}: no task row"
        );
    }
    assert_eq!(env.queue_depth(&topology.generation_queue()).await, 0);
    for tier in topology.retry_tiers_ms() {
        assert_eq!(
            env.queue_depth(&topology.retry_queue(*tier)).await,
            0,
            "nothing was retried"
        );
    }
    // A functional bound, not a speed figure: the bad messages cost the normal one no retry
    // round and no outage pause (the smallest retry tier alone is 1 s, a gate pause 120 s).
    assert!(
        with < without + Duration::from_secs(5),
        "a normal request took {with:?} after the bad ones, {without:?} before"
    );
    eprintln!(
        "[bad-input] parked 3 within {parked_within:?}; normal request {without:?} before, {with:?} after"
    );

    // Oversized metadata is storable but refused: the task fails for good, nothing is parked.
    let mut big = new_request("vk-meta", "sora-2", "too much metadata");
    big.metadata = Some(serde_json::json!({ "blob": "m".repeat(20 * 1024) }));
    let id = client.submit(&big).await.expect("request published");
    let task = eventually(DONE, || async {
        let task = env.store.get(&id).await.ok()??;
        (task.status == TaskStatus::Failed).then_some(task)
    })
    .await
    .expect("the request with oversized metadata is refused");
    assert_eq!(task.retryable, Some(false));
    assert!(
        task.error
            .as_deref()
            .is_some_and(|e| e.contains("metadata")),
        "{:?}",
        task.error
    );
    assert!(task.metadata.is_none(), "refused metadata is not stored");
    assert_eq!(
        env.store.list_parked(10).await.expect("parked").len(),
        bad.len()
    );

    client_stop.cancel();
    drop(client);
    instance.stop().await;
    sim.shutdown().await;
    env.cleanup().await;
}

#[tokio::test]
async fn an_outbox_row_that_cannot_be_published_is_parked_and_other_tasks_rows_go_on() {
    let env = TestEnv::new().await;
    let events = env.events().await;
    let topology = env.topology();
    let started = |request_id: &str| VideoGenerationStarted {
        meta: video_orchestrator::messages::Meta::new(),
        request_id: request_id.to_owned(),
        virtual_key_id: "vk-relay".to_owned(),
        provider: "sim".to_owned(),
        provider_task_id: "job-1".to_owned(),
        started_at: video_orchestrator::messages::now(),
    };
    let long_id = "r".repeat(5000);
    let mut tx = env.store.begin().await.expect("begin");
    // The bad row first: it must not hold up the row written after it.
    tx.enqueue(&topology.event(&started(&long_id)))
        .await
        .expect("enqueue bad");
    tx.enqueue(&topology.event(&started("req-fine")))
        .await
        .expect("enqueue good");
    tx.commit().await.expect("commit");

    let stop = CancellationToken::new();
    let publisher = Publisher::new(env.broker().await, stop.clone());
    let relay = OutboxRelay::new(
        env.store.clone(),
        publisher,
        env.settings.outbox.clone(),
        Default::default(),
    );
    let sent = relay.flush_once().await.expect("one round");
    assert_eq!(sent, 1, "the good row is published in the same round");
    events
        .wait_for(
            |e| e.is(VideoGenerationStarted::ROUTING_KEY, "req-fine"),
            DONE,
        )
        .await
        .expect("the good row's event arrives");
    assert_eq!(env.store.outbox_len().await.expect("outbox"), 0);
    let parked = env.store.list_parked(10).await.expect("parked");
    assert_eq!(parked.len(), 1);
    assert_eq!(parked[0].original_queue, "outbox");
    assert!(
        parked[0].reason.contains("correlation_id") && parked[0].reason.contains("255"),
        "{}",
        parked[0].reason
    );
    stop.cancel();
    events.close().await;
    env.cleanup().await;
}
