//! A delay tier the broker holds (the stall a RabbitMQ restart can cause, reproduced without
//! restarting anything).
//!
//! After `rabbitmqctl stop_app`/`start_app`, RabbitMQ 3.10 restarts each quorum queue's
//! at-least-once dead-letter worker before it has recovered the durable exchanges. A delay tier
//! whose checks expire in that moment finds no `video.progress`, buffers those checks and
//! retries them only every `dead_letter_worker_publisher_confirm_timeout` (120 s by default);
//! with its prefetch (32) full of them, the whole tier stops. Seen on this machine in the broker
//! restart test: 150 tasks waited ~3 minutes. Deleting `video.progress` while checks expire and
//! declaring it again puts the tier in exactly that state. The sweeper's re-arms go straight to
//! `video.progress`, so tracking must go on (at the sweeper's pace) while the tier is held.

use std::time::{Duration, Instant};

use lapin::options::ExchangeDeleteOptions;

use test_support::cluster::{
    assert_clean, one_at_a_time, rabbit_log_lines, submit_load, Audit, Cluster, Expectation,
    FaultWindow, Options,
};
use test_support::figures::{figure, note};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delay_tier_held_by_the_broker_does_not_stall_tracking() {
    let run = "held_tier";
    let _serial = one_at_a_time().await;
    let mut cluster = Cluster::start(Options {
        name: run,
        instances: 2,
        sim_duration_ms: 4000,
        sim_jitter_ms: 2000,
        extra: vec![],
    })
    .await;
    let driver = cluster.driver().await;
    let ids = submit_load(driver.client.clone(), run, 60, 30.0, 10).await;
    driver.close().await;
    let processing = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM video_tasks WHERE request_id = ANY($1) AND status = 'processing'",
        )
        .bind(&ids)
        .fetch_one(cluster.env.store.pool())
        .await
        .unwrap_or(0)
    };
    let t = Instant::now();
    while processing().await < 50 && t.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Take the tier's dead-letter target away while checks expire, then put it back.
    let topology = cluster.env.topology();
    let tier = topology.delay_queue(1000);
    let conn = cluster.connect().await;
    let from = chrono::Utc::now();
    let channel = conn.create_channel().await.expect("channel");
    channel
        .exchange_delete(
            topology.progress_exchange().as_str().into(),
            ExchangeDeleteOptions::default(),
        )
        .await
        .expect("delete video.progress");
    let t = Instant::now();
    while rabbit_log_lines(
        &format!("'{tier}'"),
        "Cannot forward any dead-letter messages",
    ) == 0
        && t.elapsed() < Duration::from_secs(10)
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // More checks expire into the missing exchange: fill the worker's prefetch (32).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    topology
        .declare(&conn)
        .await
        .expect("declare the topology again");
    let to = chrono::Utc::now();
    note(run, "video.progress deleted and declared again");

    let drain_s = cluster.drain(&ids, Duration::from_secs(90)).await.seconds;
    let Audit {
        counters,
        mut books,
    } = cluster
        .audit(&Expectation::all_run(&ids), &[FaultWindow { from, to }])
        .await;
    // The held checks are stale: the broker lets them go after its timeout (120 s), after this
    // test; nothing else may be left.
    let still_held: u64 = books
        .zombie_queues
        .iter()
        .filter(|(q, _)| q.ends_with("(held by the broker)"))
        .map(|(_, n)| u64::from(*n))
        .sum();
    books
        .zombie_queues
        .retain(|(q, _)| !q.ends_with("(held by the broker)"));
    let stalled_logged = rabbit_log_lines(
        &format!("'{tier}'"),
        "Cannot forward any dead-letter messages",
    );
    figure(&format!(
        "{run}: tasks={} faults=1 broker_logged_stall={stalled_logged} held_by_broker_at_end={still_held} lost={} \
         duplicates_dropped={} outcomes={:?} rearmed={} drain_s={drain_s:.1} total_s={:.0}",
        books.tasks,
        books.lost.len(),
        books.duplicates_dropped,
        books.by_status,
        counters.sum("video_progress_rearmed_total", ""),
        cluster.started.elapsed().as_secs_f64(),
    ));
    assert!(
        stalled_logged > 0 || still_held > 0,
        "the tier was not held: the fault was not reproduced"
    );
    assert_clean(&cluster, &books);
    assert!(
        drain_s < 60.0,
        "tracking waited for the broker's dead-letter timeout ({drain_s:.0} s)"
    );
    let _ = conn.close(200, "done".into()).await;
    cluster.cleanup().await;
}
