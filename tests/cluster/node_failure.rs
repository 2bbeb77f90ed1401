//! The fault: two `serve` instances (the real binary) with the cluster's node list, a load of
//! tasks, and `kill -9` of the node that leads the most partition queues in the middle of it.
//! Then the reliability suite's books: every task exactly one terminal state and one terminal
//! event (de-duplicated by `messageId`), no check left in a delay or partition queue after the
//! longest tier, no forked chain (status calls per task within tracked time / shortest interval
//! + 1 + faults).
//!
//! The run's topology is declared through `vo1` before the instances start, so with RabbitMQ's
//! default leader placement (`client-local`) `vo1` leads every queue, and both instances, given
//! the list `vo1,vo2,vo3`, are connected to it: the kill takes the leaders of every partition and
//! both instances' connections at once. The worst case, on purpose.
//!
//! RabbitMQ 3.10 may then hold checks in a delay tier for as long as the node is away (its
//! dead-letter worker cannot deliver to partitions whose leader it first looked up on the dead
//! node); tracking goes on through the sweeper's re-arms. So the test watches what the broker
//! holds (ready or not), brings the killed node back after the drain with the instances still
//! running, and requires that everything held then flows and nothing is left anywhere.

use std::path::Path;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::{AMQPValue, FieldTable};
use test_support::cluster::{
    assert_clean, declare_books_queue, one_at_a_time, submit_load, Audit, Cluster, Expectation,
    FaultWindow, Options,
};
use test_support::figures::{self, note};

use crate::inspect_proxy::InspectProxy;
use crate::rabbit::RabbitCluster;

const RUN: &str = "cluster";
const TASKS: usize = 300;
const PER_SECOND: f64 = 10.0;
/// The kill lands after this share of the load was submitted.
const KILL_AT: f64 = 0.4;

/// A `CLUSTER …` figure, kept in `target/tmp/cluster-figures.txt`.
fn figure(line: &str) {
    figures::record("CLUSTER", "cluster-figures.txt", line);
}

/// The AMQP port of every "connected to RabbitMQ" line in a `serve` log, in order.
fn connections(log: &Path) -> Vec<u16> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["message"] == "connected to RabbitMQ")
        .filter_map(|v| {
            let node = v["node"].as_str()?;
            url::Url::parse(node).ok()?.port()
        })
        .collect()
}

/// The harness declares its books queue as a classic queue, which lives on one node: on a
/// cluster that loses a node it must be a quorum queue, replicated like the rest.
async fn replicate_books_queue(cluster: &Cluster) {
    let name = cluster.books_queue();
    let conn = cluster.connect().await;
    let channel = conn.create_channel().await.expect("channel");
    channel
        .queue_declare(
            name.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap_or_else(|e| panic!("the harness's books queue `{name}` exists: {e}"));
    channel
        .queue_delete(name.into(), QueueDeleteOptions::default())
        .await
        .expect("delete the classic books queue");
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    args.insert("x-quorum-initial-group-size".into(), AMQPValue::LongInt(3));
    declare_books_queue(&cluster.env, &conn, name, args).await;
    let _ = conn.close(200, "books queue replicated".into()).await;
}

/// Checks the broker holds for the run, ready or not, in every delay tier and partition (0 when
/// the CLI does not answer, e.g. while leaders are being elected).
fn held(rabbit: &RabbitCluster, prefix: &str) -> u64 {
    let progress = format!("{prefix}video.progress.");
    rabbit
        .queues(prefix)
        .map(|qs| {
            qs.iter()
                .filter(|q| q.name.starts_with(&progress))
                .map(|q| q.messages)
                .sum()
        })
        .unwrap_or(0)
}

/// What recovery waits for, and when each part came back.
#[derive(Debug, Default)]
struct Recovery {
    /// Every instance ready, those that were on the killed node connected elsewhere.
    reconnected: Option<DateTime<Utc>>,
    /// Every queue of the run led by a live node.
    leaders: Option<DateTime<Utc>>,
    /// Every partition leased to a live instance.
    covered: Option<DateTime<Utc>>,
}

impl Recovery {
    fn done(&self) -> Option<DateTime<Utc>> {
        Some(self.reconnected?.max(self.leaders?).max(self.covered?))
    }
}

/// Polls until the instances, the queue leaders and the partition leases are all back.
async fn wait_recovered(
    cluster: &Cluster,
    rabbit: &RabbitCluster,
    moved: &[(std::path::PathBuf, usize)],
    victim_port: u16,
    timeout: Duration,
) -> Recovery {
    let live: Vec<String> = rabbit
        .nodes
        .iter()
        .filter(|n| !n.killed)
        .map(|n| n.name.clone())
        .collect();
    let mut r = Recovery::default();
    let t = Instant::now();
    while r.done().is_none() && t.elapsed() < timeout {
        if r.reconnected.is_none() {
            let mut ok = cluster.ready_count().await == cluster.slots.len();
            for (log, before) in moved {
                let seen = connections(log);
                ok &= seen.len() > *before && seen.last() != Some(&victim_port);
            }
            if ok {
                r.reconnected = Some(Utc::now());
            }
        }
        if r.leaders.is_none() {
            // Blocking CLI call on the test's own thread: the runtime's workers keep going.
            if let Ok(queues) = rabbit.queues(&cluster.env.prefix) {
                if !queues.is_empty() && queues.iter().all(|q| live.contains(&q.leader)) {
                    r.leaders = Some(Utc::now());
                }
            }
        }
        if r.covered.is_none() && cluster.partitions_covered().await {
            r.covered = Some(Utc::now());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "starts its own three-node RabbitMQ cluster and runs 300 tasks through a node kill: \
            about 90 s; cargo test --test cluster -- --ignored --nocapture"]
async fn killing_the_node_that_leads_most_partitions_loses_nothing() {
    let _serial = one_at_a_time().await;
    let started = Instant::now();
    // Declared first so it is dropped last: the harness cleans up through the proxy, and the
    // proxy reaches the nodes.
    let mut rabbit = tokio::task::spawn_blocking(RabbitCluster::start)
        .await
        .expect("the cluster starts");
    let formed_s = started.elapsed().as_secs_f64();
    let inspect = InspectProxy::start(rabbit.amqp_addrs());
    // The harness's own connections (declare, depths, books, clean-up) take this URL; the
    // instances and the load driver get the node list below.
    std::env::set_var("APP__RABBITMQ__URL", inspect.url());

    let mut cluster = Cluster::start(Options {
        name: RUN,
        instances: 2,
        sim_duration_ms: 3000,
        sim_jitter_ms: 3000,
        extra: vec![
            ("APP__RABBITMQ__URLS", rabbit.node_list()),
            ("APP__TOPOLOGY__QUORUM_GROUP_SIZE", "3".to_owned()),
        ],
    })
    .await;
    replicate_books_queue(&cluster).await;
    let prefix = cluster.env.prefix.clone();
    let queues = rabbit.queues(&prefix).expect("list the run's queues");
    let partitions = usize::from(cluster.env.topology().partitions());
    let expected_queues = partitions + cluster.env.topology().delay_tiers_ms().len() + 3;
    assert_eq!(
        queues.len(),
        expected_queues,
        "generation, parking, books, partitions and tiers are quorum queues: {queues:?}"
    );
    for q in &queues {
        assert_eq!(
            q.members.len(),
            3,
            "{} has a replica on every node (topology.quorum_group_size = 3): {q:?}",
            q.name
        );
    }

    let driver = cluster.driver().await;
    let load = tokio::spawn(submit_load(
        driver.client.clone(),
        RUN,
        TASKS,
        PER_SECOND,
        10,
    ));
    tokio::time::sleep(Duration::from_secs_f64(TASKS as f64 / PER_SECOND * KILL_AT)).await;

    // The node that leads the most partition queues right now.
    let queues = rabbit.queues(&prefix).expect("list the run's queues");
    let partition_prefix = format!("{prefix}video.progress.p");
    let led = |node: &str| {
        queues
            .iter()
            .filter(|q| q.name.starts_with(&partition_prefix) && q.leader == node)
            .count()
    };
    let victim = (0..rabbit.nodes.len())
        .max_by_key(|i| (led(&rabbit.nodes[*i].name), std::cmp::Reverse(*i)))
        .expect("three nodes");
    let victim_name = rabbit.nodes[victim].name.clone();
    let victim_port = rabbit.nodes[victim].amqp_port;
    let partitions_led = led(&victim_name);
    let moved: Vec<(std::path::PathBuf, usize)> = cluster
        .slots
        .iter()
        .flatten()
        .map(|p| (p.log.clone(), connections(&p.log)))
        .filter(|(_, seen)| seen.last() == Some(&victim_port))
        .map(|(log, seen)| (log, seen.len()))
        .collect();
    note(
        RUN,
        &format!(
            "kill -9 {victim_name}: leads {partitions_led}/{partitions} partitions, {} of {} instances connected to it",
            moved.len(),
            cluster.slots.len()
        ),
    );
    let from = Utc::now();
    rabbit.kill9(victim);
    let recovery = wait_recovered(
        &cluster,
        &rabbit,
        &moved,
        victim_port,
        Duration::from_secs(120),
    )
    .await;
    let to = recovery.done().unwrap_or_else(|| {
        panic!(
            "{RUN}: not recovered 120 s after killing {victim_name}: {recovery:?} (logs in {})",
            cluster.dir.display()
        )
    });
    let secs = |t: Option<DateTime<Utc>>| {
        t.map_or(f64::NAN, |t| (t - from).num_milliseconds() as f64 / 1000.0)
    };
    let faults = vec![FaultWindow { from, to }];
    let replicas_up = rabbit
        .queues(&prefix)
        .map(|qs| qs.iter().map(|q| q.online.len()).min().unwrap_or(0))
        .unwrap_or(0);
    note(
        RUN,
        &format!("recovered: {recovery:?}; every queue has at least {replicas_up} replicas up"),
    );

    // While the load goes on, watch the checks the broker holds in delay tiers and partitions
    // (ready or not: a tier's dead-letter backlog is not "ready").
    let mut held_max = 0u64;
    while !load.is_finished() {
        held_max = held_max.max(held(&rabbit, &prefix));
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let ids = load.await.expect("load driver");
    driver.close().await;
    let drain_s = cluster.drain(&ids, Duration::from_secs(240)).await.seconds;
    let held_after_drain = held(&rabbit, &prefix);
    held_max = held_max.max(held_after_drain);

    // The killed node comes back and rejoins, the instances still running: whatever the broker
    // held while it was away must flow (to die as `stopped` checks of finished tasks), and
    // nothing may be left anywhere. With every replica up, deleting the run's queues at
    // clean-up is quick too (with a member down each delete waits about 5 s for it).
    let restarted = Instant::now();
    let rabbit = tokio::task::spawn_blocking(move || {
        rabbit.restart(victim);
        rabbit
    })
    .await
    .expect("the killed node restarts");
    let rejoined_s = restarted.elapsed().as_secs_f64();
    let mut left = held(&rabbit, &prefix);
    while left > 0 && restarted.elapsed() < Duration::from_secs(180) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        left = held(&rabbit, &prefix);
    }
    let released_s = restarted.elapsed().as_secs_f64();
    note(
        RUN,
        &format!(
            "{victim_name} rejoined in {rejoined_s:.1} s; {held_after_drain} held checks after the \
             drain, {left} left {released_s:.1} s after the restart"
        ),
    );
    let Audit { counters, books } = cluster.audit(&Expectation::all_run(&ids), &faults).await;
    let reconnects = counters.sum("video_broker_reconnects_total", "");
    figure(&format!(
        "tasks={} killed_node={victim_name} partitions_led={partitions_led}/{partitions} \
         instances_on_killed_node={}/{} time_to_recover_s={:.1} (instances_reconnected_s={:.1} \
         leaders_elected_s={:.1} partitions_covered_s={:.1}) lost={} duplicates_dropped={} \
         reconnects={reconnects} republished={} error_checks={} stale_checks_dropped={} \
         rearmed={} held_in_broker_max={held_max} held_after_drain={held_after_drain} \
         held_left_after_rejoin={left} rejoin_s={rejoined_s:.1} released_s={released_s:.1} \
         outcomes={:?} status_calls={} tightest_call_ratio={:.2} cluster_formed_s={formed_s:.1} \
         drain_s={drain_s:.1} total_s={:.0}",
        books.tasks,
        moved.len(),
        cluster.slots.len(),
        secs(Some(to)),
        secs(recovery.reconnected),
        secs(recovery.leaders),
        secs(recovery.covered),
        books.lost.len(),
        books.duplicates_dropped,
        counters.sum("video_broker_republished_total", ""),
        counters.sum("video_progress_checks_total", "outcome=\"error\""),
        counters.sum("video_progress_checks_total", "outcome=\"stale\""),
        counters.sum("video_progress_rearmed_total", ""),
        books.by_status,
        books.status_calls,
        books.tightest,
        started.elapsed().as_secs_f64(),
    ));
    assert_clean(&cluster, &books);
    assert_eq!(
        left, 0,
        "{RUN}: {left} checks still held by the broker {released_s:.0} s after {victim_name} came back"
    );
    assert!(
        reconnects >= moved.len() as u64,
        "{reconnects} reconnects for {} instances that lost their node",
        moved.len()
    );
    cluster.cleanup().await;
    drop(inspect);
    tokio::task::spawn_blocking(move || drop(rabbit))
        .await
        .expect("the cluster stops");
}
