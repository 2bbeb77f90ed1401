//! The broker layout (DESIGN §3) on the real RabbitMQ: names, idempotent declaration, the
//! partition-count guard, consistent-hash routing and the delay tiers.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use futures::stream::{BoxStream, FuturesUnordered, SelectAll};
use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Confirmation, Connection, ConnectionProperties, ExchangeKind};
use test_support::{header, TestEnv};
use tokio_util::sync::CancellationToken;
use video_orchestrator::broker::{Broker, BrokerError, BrokerOptions, Publisher};
use video_orchestrator::messages::{self, Meta, VideoProgressCheckRequested};
use video_orchestrator::topology::{
    long_string, queue_exists, Topology, TopologyError, VIRTUAL_KEY_HEADER,
};

fn random_hex() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..8].to_owned()
}

async fn exchange_exists(connection: &Connection, name: &str) -> bool {
    let channel = connection.create_channel().await.expect("channel");
    let result = channel
        .exchange_declare(
            name.into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                passive: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await;
    if result.is_ok() {
        let _ = channel.close(200, "probe".into()).await;
    }
    result.is_ok()
}

fn check(request_id: &str, virtual_key: &str, sequence: i64) -> VideoProgressCheckRequested {
    let now = messages::now();
    VideoProgressCheckRequested {
        meta: Meta::new(),
        request_id: request_id.to_owned(),
        virtual_key_id: virtual_key.to_owned(),
        scheduled_at: now,
        interval_index: 0,
        start_time: now,
        sequence,
    }
}

/// Properties the way the service sets them on a message to `video.progress`.
fn keyed(virtual_key: &str) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert(VIRTUAL_KEY_HEADER.into(), long_string(virtual_key));
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_headers(headers)
}

/// Publishes `(virtual key, properties)` pairs to `exchange` on one confirm channel with up to
/// 1000 confirms in flight (one confirm at a time caps a channel near 1k msg/s).
async fn publish_pipelined(
    connection: &Connection,
    exchange: &str,
    messages: impl IntoIterator<Item = (String, Vec<u8>)>,
) {
    let channel = connection.create_channel().await.expect("channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm_select");
    let mut in_flight = FuturesUnordered::new();
    let await_one = |confirmation: Result<Confirmation, lapin::Error>| {
        let confirmation = confirmation.expect("confirm");
        assert_eq!(
            confirmation,
            Confirmation::Ack(None),
            "not routed or refused"
        );
    };
    for (virtual_key, body) in messages {
        if in_flight.len() >= 1000 {
            await_one(in_flight.next().await.expect("one in flight"));
        }
        let confirm = channel
            .basic_publish(
                exchange.into(),
                "".into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &body,
                keyed(&virtual_key),
            )
            .await
            .expect("publish");
        in_flight.push(confirm);
    }
    while let Some(confirmation) = in_flight.next().await {
        await_one(confirmation);
    }
    let _ = channel.close(200, "published".into()).await;
}

/// Ready messages per partition queue, once all `expected` have arrived (within `timeout`).
async fn partition_depths(
    env: &TestEnv,
    topology: &Topology,
    expected: u32,
    timeout: Duration,
) -> Vec<u32> {
    let deadline = Instant::now() + timeout;
    loop {
        let mut depths = Vec::new();
        for p in 0..topology.partitions() {
            depths.push(env.queue_depth(&topology.partition_queue(p)).await);
        }
        let total: u32 = depths.iter().sum();
        if total >= expected || Instant::now() > deadline {
            assert_eq!(total, expected, "messages in the partitions: {depths:?}");
            return depths;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One consumer on every partition queue (they are single-active-consumer: nobody else is
/// subscribed in a test), reporting which queue each delivery came from.
struct PartitionWatcher {
    channel: lapin::Channel,
    deliveries: SelectAll<BoxStream<'static, (String, Result<Delivery, lapin::Error>)>>,
}

impl PartitionWatcher {
    async fn start(env: &TestEnv, topology: &Topology) -> Self {
        let channel = env.connection.create_channel().await.expect("channel");
        channel
            .basic_qos(100, BasicQosOptions::default())
            .await
            .expect("qos");
        let mut deliveries = SelectAll::new();
        for p in 0..topology.partitions() {
            let queue = topology.partition_queue(p);
            let consumer = channel
                .basic_consume(
                    queue.as_str().into(),
                    "".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .expect("consume a partition");
            deliveries.push(consumer.map(move |d| (queue.clone(), d)).boxed());
        }
        Self {
            channel,
            deliveries,
        }
    }

    /// The next delivery (acked) with its queue and arrival time.
    async fn next(&mut self, timeout: Duration) -> Option<(String, Delivery, Instant)> {
        let (queue, delivery) = tokio::time::timeout(timeout, self.deliveries.next())
            .await
            .ok()??;
        let at = Instant::now();
        let delivery = delivery.expect("delivery");
        delivery.ack(BasicAckOptions::default()).await.expect("ack");
        Some((queue, delivery, at))
    }

    async fn close(self) {
        drop(self.deliveries);
        let _ = self.channel.close(200, "watched".into()).await;
    }
}

#[tokio::test]
async fn declaring_the_topology_twice_is_idempotent() {
    let env = TestEnv::new().await;
    let topology = env.topology();

    topology
        .declare(&env.connection)
        .await
        .expect("first declare");
    topology
        .declare(&env.connection)
        .await
        .expect("second declare of the same layout");

    for queue in topology.all_queues() {
        assert!(
            queue_exists(&env.connection, &queue).await.unwrap(),
            "{queue}"
        );
    }
    env.cleanup().await;
}

#[tokio::test]
async fn a_different_partition_count_is_refused_naming_the_setting() {
    let env = TestEnv::new().await;
    let topology = env.topology();
    assert_eq!(topology.partitions(), 16);
    topology.declare(&env.connection).await.expect("declare 16");

    for count in [17, 32, 15, 8] {
        let other = Topology::new(
            env.prefix.clone(),
            count,
            topology.delay_tiers_ms().to_vec(),
        );
        env.adopt(&other);
        let err = other
            .declare(&env.connection)
            .await
            .expect_err(&format!("{count} partitions over 16 must be refused"));
        let text = err.to_string();
        match &err {
            TopologyError::PartitionMismatch {
                found, configured, ..
            } => {
                assert_eq!(found, "16", "{text}");
                assert_eq!(*configured, count, "{text}");
            }
            other => panic!("expected PartitionMismatch, got {other:?}"),
        }
        assert!(text.contains("topology.partitions"), "{text}");
    }
    // The refused declarations changed nothing.
    assert!(
        !queue_exists(&env.connection, &topology.partition_queue(16))
            .await
            .unwrap()
    );

    // The service refuses to start on it, with the same error.
    let mut settings = env.settings.clone();
    settings.topology.partitions = 8;
    let err = Broker::connect(
        BrokerOptions::from_settings(&settings),
        Topology::from_settings(&settings),
    )
    .await
    .expect_err("start with 8 partitions over 16");
    assert!(
        matches!(
            err,
            BrokerError::Topology(TopologyError::PartitionMismatch { .. })
        ),
        "{err:?}"
    );
    env.cleanup().await;
}

#[tokio::test]
async fn declare_creates_exactly_the_listed_names_under_its_prefix() {
    let env = TestEnv::new().await;
    let prefix = format!("x-{}.", random_hex());
    let topology = Topology::new(
        prefix.clone(),
        env.settings.topology.partitions,
        env.settings.tracking.delay_tiers_ms.clone(),
    );
    env.adopt(&topology);

    let queues = topology.all_queues();
    let exchanges = topology.all_exchanges();
    let expected_queues: BTreeSet<String> =
        ["video.generation".to_owned(), "video.parking".to_owned()]
            .into_iter()
            .chain((0..16).map(|p| format!("video.progress.p{p}")))
            .chain(
                [1000, 2000, 5000, 10000, 30000, 60000]
                    .iter()
                    .map(|ms| format!("video.progress.delay.{ms}")),
            )
            .chain(
                [1000, 5000, 30000, 120000]
                    .iter()
                    .map(|ms| format!("video.generation.retry.{ms}")),
            )
            .map(|name| format!("{prefix}{name}"))
            .collect();
    assert_eq!(
        queues.iter().cloned().collect::<BTreeSet<_>>(),
        expected_queues
    );
    assert_eq!(queues.len(), expected_queues.len(), "no duplicates");
    assert_eq!(
        exchanges,
        vec![
            format!("{prefix}video.events"),
            format!("{prefix}video.progress")
        ]
    );
    assert_eq!(
        topology.partition_queue(0),
        format!("{prefix}video.progress.p0")
    );
    assert_eq!(
        topology.delay_queue(1000),
        format!("{prefix}video.progress.delay.1000")
    );
    assert_eq!(topology.parking_queue(), format!("{prefix}video.parking"));
    assert_eq!(
        topology.generation_queue(),
        format!("{prefix}video.generation")
    );
    assert_eq!(topology.events_exchange(), format!("{prefix}video.events"));

    for queue in &queues {
        assert!(
            !queue_exists(&env.connection, queue).await.unwrap(),
            "{queue}"
        );
    }
    topology.declare(&env.connection).await.expect("declare");

    for queue in &queues {
        assert!(
            queue_exists(&env.connection, queue).await.unwrap(),
            "{queue}"
        );
    }
    for exchange in &exchanges {
        assert!(
            exchange_exists(&env.connection, exchange).await,
            "{exchange}"
        );
    }
    // Nothing beyond the layout, and nothing under anyone else's prefix.
    for name in [
        topology.partition_queue(16),
        topology.delay_queue(3000),
        format!("{prefix}video.progress.delay"),
    ] {
        assert!(
            !queue_exists(&env.connection, &name).await.unwrap(),
            "{name}"
        );
    }
    for queue in env.topology().all_queues() {
        assert!(
            !queue_exists(&env.connection, &queue).await.unwrap(),
            "{queue}"
        );
    }

    topology.delete(&env.connection).await.expect("delete");
    for queue in &queues {
        assert!(
            !queue_exists(&env.connection, queue).await.unwrap(),
            "{queue}"
        );
    }
    for exchange in &exchanges {
        assert!(
            !exchange_exists(&env.connection, exchange).await,
            "{exchange}"
        );
    }
    env.cleanup().await;
}

#[tokio::test]
async fn messages_with_the_same_virtual_key_always_land_in_the_same_partition() {
    let env = TestEnv::new().await;
    let topology = env.topology();
    topology.declare(&env.connection).await.expect("declare");
    let keys: Vec<String> = (0..5)
        .map(|i| format!("vk-same-{i}-{}", random_hex()))
        .collect();
    let per_key = 10;

    // Interleaved: k0, k1, …, k4, k0, k1, …
    let messages = (0..per_key).flat_map(|round| {
        keys.iter()
            .map(move |k| (k.clone(), format!(r#"{{"round":{round}}}"#).into_bytes()))
    });
    publish_pipelined(&env.connection, &topology.progress_exchange(), messages).await;
    let total = u32::try_from(keys.len() * per_key).unwrap();
    let depths = partition_depths(&env, &topology, total, Duration::from_secs(10)).await;

    let mut queues_by_key: HashMap<String, BTreeSet<String>> = HashMap::new();
    let mut count_by_key: HashMap<String, usize> = HashMap::new();
    for p in 0..topology.partitions() {
        if depths[usize::from(p)] == 0 {
            continue;
        }
        let queue = topology.partition_queue(p);
        let drained = env.drain_queue(&queue, Duration::from_millis(500)).await;
        assert_eq!(drained.len(), depths[usize::from(p)] as usize, "{queue}");
        for delivery in drained {
            let key = header(&delivery, VIRTUAL_KEY_HEADER).expect("x-virtual-key kept");
            queues_by_key
                .entry(key.clone())
                .or_default()
                .insert(queue.clone());
            *count_by_key.entry(key).or_default() += 1;
        }
    }
    for key in &keys {
        assert_eq!(
            queues_by_key.get(key).map(BTreeSet::len),
            Some(1),
            "{key} is in {:?}",
            queues_by_key.get(key)
        );
        assert_eq!(count_by_key.get(key), Some(&per_key), "{key}");
    }
    env.cleanup().await;
}

#[tokio::test]
async fn ten_thousand_virtual_keys_spread_evenly_over_sixteen_partitions() {
    let env = TestEnv::new().await;
    let topology = env.topology();
    assert_eq!(topology.partitions(), 16);
    topology.declare(&env.connection).await.expect("declare");

    let n = 10_000u32;
    let run = random_hex();
    let messages = (0..n).map(|i| (format!("vk-{run}-{i}"), b"{}".to_vec()));
    publish_pipelined(&env.connection, &topology.progress_exchange(), messages).await;
    let depths = partition_depths(&env, &topology, n, Duration::from_secs(60)).await;

    let mean = f64::from(n) / f64::from(topology.partitions());
    let max = f64::from(*depths.iter().max().unwrap());
    assert!(
        max <= 1.5 * mean,
        "the fullest partition holds {max} messages, the mean is {mean}: {depths:?}"
    );
    assert!(depths.iter().all(|d| *d > 0), "{depths:?}");
    env.cleanup().await;
}

/// Publishes `check` into the 1 s tier through the service's publisher and returns when the
/// broker has confirmed it, with the instant taken just before publishing.
async fn publish_check_through_the_service(
    env: &TestEnv,
    check: &VideoProgressCheckRequested,
) -> Instant {
    let broker = env.broker().await;
    let publisher = Publisher::new(broker.clone(), CancellationToken::new());
    let message = broker.topology().delayed_check(1000, check);
    let start = Instant::now();
    publisher.publish(&message).await.expect("confirmed");
    start
}

#[tokio::test]
async fn a_check_in_the_one_second_tier_arrives_after_a_second() {
    let env = TestEnv::new().await;
    let topology = env.topology();
    topology.declare(&env.connection).await.expect("declare");
    let mut watcher = PartitionWatcher::start(&env, &topology).await;
    let virtual_key = format!("vk-{}", random_hex());
    let sent = check("req-delay-1", &virtual_key, 3);

    let start = publish_check_through_the_service(&env, &sent).await;
    let (queue, delivery, at) = watcher
        .next(Duration::from_secs(6))
        .await
        .expect("the check arrives in a partition within 5 s");
    let elapsed = at - start;
    assert!(
        elapsed >= Duration::from_millis(900),
        "arrived after {elapsed:?}, before its tier's second"
    );
    assert!(
        elapsed <= Duration::from_secs(5),
        "arrived after {elapsed:?}"
    );

    let received: VideoProgressCheckRequested =
        messages::decode(&delivery.data).expect("the body is intact");
    assert_eq!(received, sent);
    assert_eq!(
        header(&delivery, VIRTUAL_KEY_HEADER).as_deref(),
        Some(virtual_key.as_str())
    );
    assert_eq!(
        delivery
            .properties
            .message_id()
            .as_ref()
            .map(|m| m.to_string()),
        Some(sent.meta.message_id.to_string())
    );
    assert_eq!(env.queue_depth(&topology.delay_queue(1000)).await, 0);

    // It is the virtual key's partition: a message sent straight to the hash exchange with the
    // same key lands in the same queue.
    publish_pipelined(
        &env.connection,
        &topology.progress_exchange(),
        [(virtual_key.clone(), b"{}".to_vec())],
    )
    .await;
    let (direct_queue, _, _) = watcher
        .next(Duration::from_secs(5))
        .await
        .expect("the direct message arrives");
    assert_eq!(direct_queue, queue);

    watcher.close().await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_delayed_check_still_arrives_when_its_publisher_disconnects_right_after_the_confirm() {
    let env = TestEnv::new().await;
    let topology = env.topology();
    topology.declare(&env.connection).await.expect("declare");
    let mut watcher = PartitionWatcher::start(&env, &topology).await;
    let sent = check("req-delay-2", &format!("vk-{}", random_hex()), 0);
    let envelope = topology.delayed_check(1000, &sent);

    let publisher = Connection::connect(env.rabbitmq_url(), ConnectionProperties::default())
        .await
        .expect("a second connection");
    let channel = publisher.create_channel().await.expect("channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm_select");
    let start = Instant::now();
    let confirmation = channel
        .basic_publish(
            envelope.exchange.as_str().into(),
            envelope.routing_key.as_str().into(),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            &envelope.body,
            keyed(&envelope.virtual_key)
                .with_message_id(envelope.message_id.as_str().into())
                .with_type(envelope.message_type.as_str().into()),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    assert_eq!(confirmation, Confirmation::Ack(None));
    publisher
        .close(200, "gone".into())
        .await
        .expect("close the publishing connection");

    let (_, delivery, at) = watcher
        .next(Duration::from_secs(6))
        .await
        .expect("the check arrives without its publisher");
    let elapsed = at - start;
    assert!(elapsed >= Duration::from_millis(900), "after {elapsed:?}");
    assert!(elapsed <= Duration::from_secs(5), "after {elapsed:?}");
    let received: VideoProgressCheckRequested = messages::decode(&delivery.data).unwrap();
    assert_eq!(received.request_id, "req-delay-2");

    watcher.close().await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_message_returned_past_the_delivery_limit_is_dead_lettered_into_parking() {
    // The same on RabbitMQ 3.10 (no default limit) and 4.x (default 20): our explicit limit.
    let env = TestEnv::with_env(&[("APP__TOPOLOGY__DELIVERY_LIMIT", "3")]).await;
    let broker = env.broker().await;
    let topology = broker.topology().clone();
    let generation = topology.generation_queue();
    env.publish_raw(
        "",
        &generation,
        b"{}",
        BasicProperties::default().with_message_id("looping".into()),
    )
    .await;
    let channel = env.connection.create_channel().await.expect("channel");
    let mut returns = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let got = channel
            .basic_get(
                generation.as_str().into(),
                lapin::options::BasicGetOptions::default(),
            )
            .await
            .expect("basic.get");
        match got {
            Some(message) => {
                message
                    .delivery
                    .nack(lapin::options::BasicNackOptions {
                        requeue: true,
                        ..Default::default()
                    })
                    .await
                    .expect("nack");
                returns += 1;
            }
            None if returns > 0 => break,
            None => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    assert!(
        (3..=4).contains(&returns),
        "returned {returns} times before the limit took it"
    );
    let parked = env
        .drain_queue(&topology.parking_queue(), Duration::from_secs(2))
        .await;
    assert_eq!(parked.len(), 1, "dead-lettered into video.parking");
    assert_eq!(
        header(&parked[0], "x-first-death-reason").as_deref(),
        Some("delivery_limit")
    );
    assert_eq!(
        header(&parked[0], "x-first-death-queue").as_deref(),
        Some(generation.as_str())
    );
    let _ = channel.close(200, "done".into()).await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_queue_declared_without_delivery_limits_is_refused_naming_the_migration_and_policy_mode_accepts_it(
) {
    let env = TestEnv::new().await;
    let topology = env.topology();
    env.adopt(&topology);
    // As an earlier version declared it: a plain quorum queue.
    let channel = env.connection.create_channel().await.expect("channel");
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), long_string("quorum"));
    channel
        .queue_declare(
            topology.generation_queue().as_str().into(),
            lapin::options::QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await
        .expect("declare the old queue");
    let _ = channel.close(200, "done".into()).await;

    let err = topology
        .declare(&env.connection)
        .await
        .expect_err("the new arguments differ from the queue's");
    assert!(
        matches!(&err, TopologyError::LegacyQueue { name, .. } if *name == topology.generation_queue()),
        "{err:?}"
    );
    assert!(err.to_string().contains("consumer_queue_limits"), "{err}");

    let policy = TestEnv::with_env(&[
        ("APP__TOPOLOGY__PREFIX", env.prefix.as_str()),
        ("APP__TOPOLOGY__CONSUMER_QUEUE_LIMITS", "policy"),
    ])
    .await;
    let conn = Connection::connect(env.rabbitmq_url(), ConnectionProperties::default())
        .await
        .expect("connect");
    Topology::from_settings(&policy.settings)
        .declare(&conn)
        .await
        .expect("policy mode declares over the old queue");
    let _ = conn.close(200, "done".into()).await;
    policy.cleanup().await;
    env.cleanup().await;
}
