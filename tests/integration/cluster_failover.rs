//! The broker node list (`rabbitmq.urls`) without a cluster: nodes that do not answer are skipped
//! at start, and losing the node in use moves the connection to the next one in the list, which
//! redeclares the topology and confirms the publishes that were in flight. Two cuttable proxies in
//! front of the one real broker play two nodes. A nacked publish is re-sent on fresh channels for
//! the confirm timeout (RabbitMQ 3.10 can leave a channel nacking a quorum queue after its leader
//! died), then reported. The three-node cluster itself is exercised by
//! `cargo test --test cluster -- --ignored` (tests/cluster).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures::future::join_all;
use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::{AMQPValue, FieldTable};
use secrecy::SecretString;
use test_support::TestEnv;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use video_orchestrator::broker::{redact_url, Broker, BrokerError, BrokerOptions, Publisher};
use video_orchestrator::messages::{Envelope, Meta, VideoGenerationRequested};
use video_orchestrator::topology::queue_exists;

use crate::proxy::Proxy;

/// The broker URL with another port (same credentials and vhost).
fn url_on_port(url: &str, port: u16) -> String {
    let mut parsed = url::Url::parse(url).expect("broker URL parses");
    parsed.set_port(Some(port)).expect("the URL takes a port");
    parsed.to_string()
}

fn broker_addr(url: &str) -> SocketAddr {
    let parsed = url::Url::parse(url).expect("broker URL parses");
    let host = parsed.host_str().expect("broker URL has a host");
    let port = parsed.port().unwrap_or(5672);
    format!("{host}:{port}")
        .parse()
        .expect("the test broker is addressed by IP (127.0.0.1)")
}

fn options(env: &TestEnv, urls: &[String]) -> BrokerOptions {
    let mut options = BrokerOptions::from_settings(&env.settings);
    options.urls = urls.iter().cloned().map(SecretString::from).collect();
    options.reconnect_initial = Duration::from_millis(100);
    options.reconnect_max = Duration::from_millis(1000);
    options
}

/// A port that accepts TCP and closes at once: a node whose socket is up but speaks no AMQP.
async fn accept_and_close() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            drop(socket);
        }
    });
    (addr, task)
}

fn request(n: usize) -> VideoGenerationRequested {
    VideoGenerationRequested {
        meta: Meta::new(),
        request_id: format!("req-failover-{n}"),
        virtual_key_id: "vk-failover".to_owned(),
        model: "sora-2".to_owned(),
        prompt: "a ferry between two islands".to_owned(),
        duration_seconds: Some(4),
        size: None,
        provider: None,
        callback_url: None,
        image_url: None,
        metadata: None,
    }
}

#[tokio::test]
async fn connect_skips_nodes_that_do_not_answer_and_reports_the_node_in_use() {
    let env = TestEnv::new().await;
    let real = env.rabbitmq_url().to_owned();
    let (closing, closer) = accept_and_close().await;
    let refused = url_on_port(&real, 1);
    let mute = url_on_port(&real, closing.port());

    let started = Instant::now();
    let broker = Broker::connect(
        options(&env, &[refused.clone(), mute.clone(), real.clone()]),
        env.topology(),
    )
    .await
    .expect("the third node answers");
    assert_eq!(broker.node(), redact_url(&real), "reports the node in use");
    assert!(broker.is_ready(), "connected and topology declared");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "dead nodes are skipped quickly, took {:?}",
        started.elapsed()
    );
    assert_eq!(
        env.queue_depth(&env.topology().generation_queue()).await,
        0,
        "the topology was declared through the third node"
    );
    drop(broker);

    // No node answers: the error names every node, passwords removed.
    let err = Broker::connect(options(&env, &[refused, mute]), env.topology())
        .await
        .expect_err("no node answers");
    match &err {
        BrokerError::Connect { urls, .. } => {
            assert!(urls.contains("127.0.0.1:1/"), "{urls}");
            assert!(urls.contains(&format!(":{}/", closing.port())), "{urls}");
            assert!(!urls.contains("guest:guest"), "password in `{urls}`");
        }
        other => panic!("expected Connect, got {other:?}"),
    }
    closer.abort();
    env.cleanup().await;
}

#[tokio::test]
async fn losing_the_node_in_use_moves_to_the_next_redeclares_and_confirms_publishes_in_flight() {
    let env = TestEnv::new().await;
    let real = env.rabbitmq_url().to_owned();
    let target = broker_addr(&real);
    let a = Proxy::start(target).await;
    let b = Proxy::start(target).await;
    let url_a = url_on_port(&real, a.addr().port());
    let url_b = url_on_port(&real, b.addr().port());
    let topology = env.topology();
    let queue = topology.generation_queue();

    let broker = Broker::connect(
        options(&env, &[url_a.clone(), url_b.clone()]),
        topology.clone(),
    )
    .await
    .expect("connects to the first node");
    assert_eq!(broker.node(), redact_url(&url_a));
    let stop = CancellationToken::new();
    let supervisor = tokio::spawn(broker.clone().supervise(stop.clone()));
    let publisher = Publisher::new(broker.clone(), stop.clone());
    let first = request(0);
    publisher
        .publish(&Envelope::to_queue(queue.clone(), &first))
        .await
        .expect("a publish before the cut is confirmed");

    // A burst of publishes, and the node goes away under it: some are confirmed before the cut,
    // some are in flight (unconfirmed, re-sent on the next node), some start during the cut.
    let burst: Vec<VideoGenerationRequested> = (1..=300).map(request).collect();
    let sends = burst.iter().map(|r| {
        let publisher = publisher.clone();
        let envelope = Envelope::to_queue(queue.clone(), r);
        async move { publisher.publish(&envelope).await }
    });
    // Behind the service's back: only a redeclare on the next connection brings this back.
    env.connection
        .create_channel()
        .await
        .expect("channel")
        .queue_delete(
            topology.parking_queue().as_str().into(),
            QueueDeleteOptions::default(),
        )
        .await
        .expect("delete the parking queue");
    let all = tokio::spawn(join_all(sends));
    tokio::time::sleep(Duration::from_millis(5)).await;
    a.set_down(true);
    let late = request(301);
    let late_envelope = Envelope::to_queue(queue.clone(), &late);
    let during = publisher.publish(&late_envelope);
    tokio::time::timeout(Duration::from_secs(60), during)
        .await
        .expect("the publish issued during the cut finished within 60 s")
        .expect("the publish issued during the cut is confirmed after the reconnect");
    let results = tokio::time::timeout(Duration::from_secs(60), all)
        .await
        .expect("the burst finished within 60 s")
        .expect("burst task");
    let failed: Vec<String> = results
        .iter()
        .filter_map(|r| r.as_ref().err().map(ToString::to_string))
        .collect();
    assert!(failed.is_empty(), "unconfirmed publishes: {failed:?}");

    assert_eq!(broker.node(), redact_url(&url_b), "moved to the next node");
    assert!(broker.is_ready());
    assert!(
        queue_exists(&env.connection, &topology.parking_queue())
            .await
            .expect("probe"),
        "the topology was redeclared on the new connection"
    );
    // At least once: every message is in the queue (a re-send may have made a duplicate).
    let delivered = env.drain_queue(&queue, Duration::from_secs(3)).await;
    let ids: HashSet<String> = delivered
        .iter()
        .filter_map(|d| d.properties.message_id().as_ref().map(ToString::to_string))
        .collect();
    let expected: HashSet<String> = std::iter::once(first)
        .chain(burst)
        .map(|r| r.meta.message_id.to_string())
        .collect();
    let missing = expected.difference(&ids).count();
    assert_eq!(
        missing, 0,
        "{missing} confirmed publishes are not in the queue"
    );
    assert!(
        ids.contains(&late.meta.message_id.to_string()),
        "the publish issued during the cut is in the queue"
    );

    // And round the list again: the first node is back, the second goes away.
    a.set_down(false);
    b.set_down(true);
    publisher
        .publish(&Envelope::to_queue(queue.clone(), &request(302)))
        .await
        .expect("confirmed after the second failover");
    assert_eq!(
        broker.node(),
        redact_url(&url_a),
        "wrapped round to the first node"
    );

    stop.cancel();
    tokio::time::timeout(Duration::from_secs(10), supervisor)
        .await
        .expect("the supervisor stops")
        .expect("the supervisor did not panic");
    drop(publisher);
    drop(broker);
    env.cleanup().await;
}

#[tokio::test]
async fn a_nacked_publish_is_resent_on_fresh_channels_for_the_confirm_timeout_then_reported() {
    let env = TestEnv::new().await;
    // A queue that refuses every message: the broker nacks each publish into it.
    let full = format!("{}full", env.prefix);
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongInt(0));
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    let channel = env.connection.create_channel().await.expect("channel");
    channel
        .queue_declare(full.as_str().into(), QueueDeclareOptions::default(), args)
        .await
        .expect("declare the full queue");
    let mut options = options(&env, &[env.rabbitmq_url().to_owned()]);
    options.confirm_timeout = Duration::from_millis(1500);
    let broker = Broker::connect(options, env.topology())
        .await
        .expect("connects");
    let stop = CancellationToken::new();
    let publisher = Publisher::new(broker.clone(), stop.clone());

    let started = Instant::now();
    let err = publisher
        .publish(&Envelope::to_queue(full.clone(), &request(0)))
        .await
        .expect_err("every attempt is nacked");
    let took = started.elapsed();
    assert!(
        matches!(err, BrokerError::Nacked { .. }),
        "reported as a nack: {err:?}"
    );
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(10),
        "re-sent for the confirm timeout (1.5 s), then reported; took {took:?}"
    );
    // The publisher still works afterwards.
    publisher
        .publish(&Envelope::to_queue(
            env.topology().generation_queue(),
            &request(1),
        ))
        .await
        .expect("a publish elsewhere is confirmed");
    stop.cancel();
    let _ = channel
        .queue_delete(full.as_str().into(), QueueDeleteOptions::default())
        .await;
    drop(publisher);
    drop(broker);
    env.cleanup().await;
}
