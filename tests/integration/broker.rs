//! Broker plumbing on the real RabbitMQ: the consumer loop's poison path into `video.parking`,
//! the publisher's confirms, returns and message properties.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lapin::BasicProperties;
use test_support::{header, TestEnv};
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use video_orchestrator::broker::{
    self, Broker, BrokerError, ConsumerSpec, Handler, Incoming, Outcome, Publisher,
    ORIGINAL_QUEUE_HEADER, PARKED_AT_HEADER, PARKED_REASON_HEADER, RETRY_ATTEMPT_HEADER,
};
use video_orchestrator::messages::{
    self, Envelope, Message, Meta, VideoGenerationRequested, VideoGenerationStarted,
};

/// The service's consumer loop on `queue` (prefetch 10, `concurrency` deliveries handled at
/// once) until `stop`.
fn spawn_consumer<H: Handler>(
    broker: &Arc<Broker>,
    queue: &str,
    handler: Arc<H>,
    concurrency: usize,
    retry_budget: Option<Duration>,
    stop: &CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(broker::consume(
        broker.clone(),
        Publisher::new(broker.clone(), stop.clone()),
        ConsumerSpec {
            queue: queue.to_owned(),
            prefetch: 10,
            limit: Arc::new(Semaphore::new(concurrency)),
            retry_budget,
        },
        handler,
        stop.clone(),
    ))
}

/// Decodes `VideoGenerationRequested`; parks what does not decode.
#[derive(Debug, Default)]
struct DecodingHandler {
    /// `(queue, requestId)` of every request that decoded.
    decoded: Mutex<Vec<(String, String)>>,
    handled: Notify,
}

impl DecodingHandler {
    fn decoded(&self) -> Vec<(String, String)> {
        self.decoded.lock().unwrap().clone()
    }

    /// Waits until `request_id` decoded, or `timeout`.
    async fn wait_for(&self, request_id: &str, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.handled.notified();
            if self.decoded().iter().any(|(_, id)| id == request_id) {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return false;
            }
        }
    }
}

impl Handler for DecodingHandler {
    async fn handle(&self, delivery: Incoming) -> Outcome {
        let outcome = match messages::decode::<VideoGenerationRequested>(&delivery.body) {
            Ok(request) => {
                self.decoded
                    .lock()
                    .unwrap()
                    .push((delivery.queue.clone(), request.request_id));
                Outcome::Ack
            }
            Err(e) => Outcome::Park(e.to_string()),
        };
        self.handled.notify_waiters();
        outcome
    }
}

fn request(request_id: &str) -> VideoGenerationRequested {
    VideoGenerationRequested {
        meta: Meta::new(),
        request_id: request_id.to_owned(),
        virtual_key_id: "vk-1".to_owned(),
        model: "sora-2".to_owned(),
        prompt: "a cat on a skateboard".to_owned(),
        duration_seconds: Some(4),
        size: None,
        provider: None,
        callback_url: None,
        image_url: None,
        metadata: None,
    }
}

fn raw_properties(message_id: &str) -> BasicProperties {
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_message_id(message_id.into())
        .with_type(VideoGenerationRequested::NAME.into())
}

#[tokio::test]
async fn poison_messages_are_parked_with_a_reason_and_the_consumer_keeps_going() {
    let env = TestEnv::new().await;
    let broker = env.broker().await;
    let topology = broker.topology().clone();
    let generation = topology.generation_queue();

    let good = serde_json::to_value(request("req-good")).unwrap();
    let mut missing_request_id = good.clone();
    missing_request_id
        .as_object_mut()
        .unwrap()
        .remove("requestId");
    let mut future_version = good.clone();
    future_version["version"] = serde_json::json!(99);
    // (message id, body, what the parked reason must name)
    let poison: Vec<(&str, Vec<u8>, &str)> = vec![
        ("poison-not-json", b"this is { not json".to_vec(), "JSON"),
        (
            "poison-no-request-id",
            serde_json::to_vec(&missing_request_id).unwrap(),
            "requestId",
        ),
        (
            "poison-version-99",
            serde_json::to_vec(&future_version).unwrap(),
            "version",
        ),
    ];
    for (id, body, _) in &poison {
        env.publish_raw("", &generation, body, raw_properties(id))
            .await;
    }
    env.publish_raw(
        "",
        &generation,
        &serde_json::to_vec(&good).unwrap(),
        raw_properties("good"),
    )
    .await;

    let handler = Arc::new(DecodingHandler::default());
    let stop = CancellationToken::new();
    let consumer = spawn_consumer(&broker, &generation, handler.clone(), 1, None, &stop);

    assert!(
        handler.wait_for("req-good", Duration::from_secs(5)).await,
        "the good message after three poison ones was handled"
    );
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(10), consumer)
        .await
        .expect("the consumer stops when cancelled")
        .expect("the consumer did not panic");

    assert_eq!(
        handler.decoded(),
        vec![(generation.clone(), "req-good".to_owned())]
    );
    assert_eq!(
        env.queue_depth(&generation).await,
        0,
        "everything was acked"
    );

    let parked = env
        .drain_queue(&topology.parking_queue(), Duration::from_secs(1))
        .await;
    assert_eq!(parked.len(), poison.len(), "exactly the poison is parked");
    for (id, body, names) in &poison {
        let delivery = parked
            .iter()
            .find(|d| d.properties.message_id().as_ref().map(|m| m.as_str()) == Some(*id))
            .unwrap_or_else(|| panic!("{id} is parked"));
        let reason = header(delivery, PARKED_REASON_HEADER).expect("x-parked-reason");
        assert!(reason.contains(names), "{id}: reason `{reason}`");
        assert_eq!(
            header(delivery, ORIGINAL_QUEUE_HEADER).as_deref(),
            Some(generation.as_str()),
            "{id}"
        );
        let parked_at = header(delivery, PARKED_AT_HEADER).expect("x-parked-at");
        chrono::DateTime::parse_from_rfc3339(&parked_at)
            .unwrap_or_else(|e| panic!("{id}: x-parked-at `{parked_at}`: {e}"));
        assert_eq!(&delivery.data, body, "{id}: the body is kept as it was");
    }
    env.cleanup().await;
}

/// Fails every delivery for a transient reason until it has been retried `succeed_after` times;
/// records each delivery's `(retry attempt, type, instant)`.
#[derive(Debug)]
struct FlakyHandler {
    succeed_after: u32,
    seen: Mutex<Vec<(u32, Option<String>, Instant)>>,
    handled: Notify,
}

impl Handler for FlakyHandler {
    async fn handle(&self, delivery: Incoming) -> Outcome {
        self.seen.lock().unwrap().push((
            delivery.retry_attempt,
            delivery.message_type.clone(),
            Instant::now(),
        ));
        self.handled.notify_waiters();
        if delivery.retry_attempt >= self.succeed_after {
            Outcome::Ack
        } else {
            Outcome::Retry("database unavailable (test)".to_owned())
        }
    }
}

async fn run_flaky(
    env: &TestEnv,
    succeed_after: u32,
    budget: Duration,
    until: impl Fn(&[(u32, Option<String>, Instant)]) -> bool,
) -> Vec<(u32, Option<String>, Instant)> {
    let broker = env.broker().await;
    let generation = broker.topology().generation_queue();
    // No `type` property: the routing key names the message, and a retry must keep that name.
    env.publish_raw(
        &broker.topology().events_exchange(),
        VideoGenerationRequested::ROUTING_KEY,
        &serde_json::to_vec(&request("req-flaky")).unwrap(),
        BasicProperties::default().with_message_id("flaky-1".into()),
    )
    .await;
    let handler = Arc::new(FlakyHandler {
        succeed_after,
        seen: Mutex::new(Vec::new()),
        handled: Notify::new(),
    });
    let stop = CancellationToken::new();
    let consumer = spawn_consumer(
        &broker,
        &generation,
        handler.clone(),
        4,
        Some(budget),
        &stop,
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !until(&handler.seen.lock().unwrap()) && Instant::now() < deadline {
        let _ = tokio::time::timeout(Duration::from_millis(200), handler.handled.notified()).await;
    }
    // Let the last outcome settle before stopping.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.cancel();
    consumer.await.expect("the consumer did not panic");
    let seen = handler.seen.lock().unwrap().clone();
    seen
}

#[tokio::test]
async fn a_transient_failure_waits_in_a_retry_queue_instead_of_being_requeued() {
    let env = TestEnv::new().await;
    let topology = env.topology();
    let seen = run_flaky(&env, 2, Duration::from_secs(3600), |seen| seen.len() >= 3).await;
    let attempts: Vec<u32> = seen.iter().map(|(a, _, _)| *a).collect();
    assert_eq!(
        attempts,
        vec![0, 1, 2],
        "each retry counts in our own header"
    );
    // The first retry waits the first tier (1 s), the second the second (5 s); a requeue would
    // come back at once.
    let first_wait = seen[1].2 - seen[0].2;
    let second_wait = seen[2].2 - seen[1].2;
    assert!(first_wait >= Duration::from_millis(900), "{first_wait:?}");
    assert!(
        second_wait >= Duration::from_millis(4500),
        "{second_wait:?}"
    );
    assert_eq!(
        seen[2].1.as_deref(),
        Some(VideoGenerationRequested::ROUTING_KEY),
        "the retried copy keeps the message's name"
    );
    assert_eq!(env.queue_depth(&topology.generation_queue()).await, 0);
    for tier in topology.retry_tiers_ms() {
        assert_eq!(env.queue_depth(&topology.retry_queue(*tier)).await, 0);
    }
    let parked = env
        .drain_queue(&topology.parking_queue(), Duration::from_millis(500))
        .await;
    assert!(parked.is_empty(), "nothing parked");
    env.cleanup().await;
}

#[tokio::test]
async fn a_message_that_keeps_failing_past_its_budget_is_parked_with_the_reason() {
    let env = TestEnv::new().await;
    let topology = env.topology();
    // Budget 500 ms: the first retry goes out (1 s), the second failure is past the budget.
    let seen = run_flaky(&env, u32::MAX, Duration::from_millis(500), |seen| {
        seen.len() >= 2
    })
    .await;
    assert_eq!(seen.len(), 2, "one retry, then parked: {seen:?}");
    let parked = env
        .drain_queue(&topology.parking_queue(), Duration::from_secs(2))
        .await;
    assert_eq!(parked.len(), 1, "parked once");
    let reason = header(&parked[0], PARKED_REASON_HEADER).expect("x-parked-reason");
    assert!(
        reason.contains("still failing after 1 retries") && reason.contains("database unavailable"),
        "{reason}"
    );
    assert_eq!(
        header(&parked[0], RETRY_ATTEMPT_HEADER).as_deref(),
        Some("1")
    );
    assert_eq!(env.queue_depth(&topology.generation_queue()).await, 0);
    env.cleanup().await;
}

#[tokio::test]
async fn a_mandatory_publish_to_a_missing_queue_is_unroutable() {
    let env = TestEnv::new().await;
    let broker = env.broker().await;
    let publisher = Publisher::new(broker, CancellationToken::new());
    let missing = format!("{}no.such.queue", env.prefix);

    let started = Instant::now();
    let err = publisher
        .publish(&Envelope::to_queue(missing.clone(), &request("req-lost")))
        .await
        .expect_err("nothing is bound to that name");
    match &err {
        BrokerError::Unroutable { routing_key, .. } => assert_eq!(routing_key, &missing),
        other => panic!("expected Unroutable, got {other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "refused at once, not retried"
    );
    env.cleanup().await;
}

#[tokio::test]
async fn published_events_carry_the_contract_properties() {
    let env = TestEnv::new().await;
    let events = env.events().await;
    let broker = env.broker().await;
    let publisher = Publisher::new(broker.clone(), CancellationToken::new());
    let started = VideoGenerationStarted {
        meta: Meta::new(),
        request_id: "req-props".to_owned(),
        virtual_key_id: "vk-props".to_owned(),
        provider: "sim".to_owned(),
        provider_task_id: "video_123".to_owned(),
        started_at: messages::now(),
    };
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    publisher
        .publish(
            &broker
                .topology()
                .event(&started)
                .with_traceparent(Some(traceparent.to_owned())),
        )
        .await
        .expect("confirmed");

    let seen = events
        .wait_count(
            VideoGenerationStarted::ROUTING_KEY,
            "req-props",
            1,
            Duration::from_secs(5),
        )
        .await;
    assert_eq!(seen.len(), 1, "{:?}", events.all());
    let event = &seen[0];
    assert_eq!(event.routing_key, "video.generation.started");
    assert_eq!(
        event.message_type.as_deref(),
        Some("VideoGenerationStarted")
    );
    assert_eq!(
        event.message_id.as_deref(),
        Some(started.meta.message_id.to_string().as_str())
    );
    assert_eq!(event.body["messageId"], started.meta.message_id.to_string());
    assert_eq!(event.correlation_id.as_deref(), Some("req-props"));
    assert_eq!(event.virtual_key.as_deref(), Some("vk-props"));
    assert_eq!(event.traceparent.as_deref(), Some(traceparent));
    assert_eq!(event.body["version"], 1);
    assert_eq!(event.body["providerTaskId"], "video_123");
    let decoded: VideoGenerationStarted =
        messages::decode(&serde_json::to_vec(&event.body).unwrap()).unwrap();
    assert_eq!(decoded, started);

    let again = events
        .wait_for(
            |e| e.request_id() == Some("req-props"),
            Duration::from_millis(10),
        )
        .await;
    assert!(again.is_some());
    assert_eq!(events.all().len(), 1, "nothing else was published");
    events.close().await;
    env.cleanup().await;
}
