//! The shared shape of faults 2 and 3: a load of tasks, the shared dependency stopped for a few
//! seconds mid-run, started again, then the books.

use std::time::{Duration, Instant};

use chrono::Utc;
use test_support::cluster::{
    assert_clean, rabbit_log_lines, submit_load, Audit, Cluster, Expectation, FaultWindow, Options,
    LONGEST_TIER_MS,
};
use test_support::eventually;
use test_support::figures::{figure, note};

use crate::shared_services::{exclusive, Services};

/// What goes down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dependency {
    /// `rabbitmqctl stop_app` / `start_app`.
    RabbitMq,
    /// `pg_ctlcluster … stop` / `start`.
    PostgreSql,
}

/// How long the dependency stays down.
const DOWN: Duration = Duration::from_secs(8);

pub async fn outage_run(run: &'static str, dependency: Dependency) {
    let _exclusive = exclusive(run).await;
    let mut cluster = Cluster::start(Options {
        name: run,
        instances: 2,
        sim_duration_ms: 2000,
        sim_jitter_ms: 2000,
        extra: vec![],
    })
    .await;
    // After the cluster: dropped first, so whatever happens the services run again before the
    // cluster's clean-up needs them.
    let services = Services::guard();
    let driver = cluster.driver().await;
    let load = tokio::spawn(submit_load(driver.client.clone(), run, 200, 12.0, 10));
    tokio::time::sleep(Duration::from_secs(6)).await;

    let t_stop = Instant::now();
    let from = Utc::now();
    match dependency {
        Dependency::RabbitMq => services.stop_rabbit().await,
        Dependency::PostgreSql => services.stop_postgres().await,
    }
    let stop_s = t_stop.elapsed().as_secs_f64();
    note(run, &format!("{dependency:?} stopped in {stop_s:.1} s"));
    // Readiness must go false on every instance while it is down.
    let mut not_ready = 0;
    for p in cluster.slots.iter().flatten() {
        let went = eventually(Duration::from_secs(15), || async {
            p.not_ready(&cluster.http).await.then_some(())
        })
        .await;
        not_ready += usize::from(went.is_some());
    }
    tokio::time::sleep(DOWN.saturating_sub(t_stop.elapsed())).await;
    let down_s = t_stop.elapsed().as_secs_f64();
    let t_start = Instant::now();
    match dependency {
        Dependency::RabbitMq => services.start_rabbit().await,
        Dependency::PostgreSql => services.start_postgres().await,
    }
    let start_s = t_start.elapsed().as_secs_f64();
    let back = Instant::now();
    let to = cluster
        .wait_all_ready(Duration::from_secs(120))
        .await
        .unwrap_or_else(|| {
            panic!("{run}: instances not ready 120 s after {dependency:?} came back")
        });
    let recovered_s = back.elapsed().as_secs_f64();
    note(
        run,
        &format!("{dependency:?} back after {start_s:.1} s; every instance ready {recovered_s:.1} s later"),
    );
    let faults = vec![FaultWindow { from, to }];

    let ids = load.await.expect("load driver");
    driver.close().await;
    let drain_s = cluster.drain(&ids, Duration::from_secs(180)).await.seconds;
    // RabbitMQ 3.10 may hold a delay tier's dead-lettering after its restart (see
    // RELIABILITY.md): the checks it holds are stale by now and must die on arrival once it lets
    // them go, so wait for that before looking for zombies.
    let dlx_stalled = rabbit_log_lines(
        &format!("{}video.progress.delay.", cluster.env.prefix),
        "Cannot forward any dead-letter messages",
    );
    let mut held_max = 0;
    let held_wait = Instant::now();
    loop {
        let held: u64 = cluster.broker_held().await.iter().map(|(_, n)| n).sum();
        held_max = held_max.max(held);
        if held == 0 || held_wait.elapsed() > Duration::from_secs(240) {
            break;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let held_released_s = held_wait.elapsed().as_secs_f64();
    if held_max > 0 {
        note(
            run,
            &format!(
                "the broker held {held_max} checks for {held_released_s:.0} s after the drain"
            ),
        );
        // Released checks are stale: give them the longest tier to arrive and be dropped.
        tokio::time::sleep(Duration::from_millis(LONGEST_TIER_MS + 2000)).await;
    }
    let interrupted = cluster.log_lines("consumer interrupted");
    let retried = cluster.log_lines("transient failure; retrying after a delay");
    let Audit { counters, books } = cluster.audit(&Expectation::all_run(&ids), &faults).await;
    figure(&format!(
        "{run}: tasks={} faults=1 lost={} duplicates_dropped={} outcomes={:?} \
         readiness_false_on={not_ready}/{} broker_reconnects={} republished={} consumer_resubscribes={interrupted} \
         delayed_retries_while_down={retried} stale_checks_dropped={} rearmed={} \
         status_calls={} tightest_call_ratio={:.2} stop_s={stop_s:.1} down_s={down_s:.1} start_s={start_s:.1} \
         ready_after_back_s={recovered_s:.1} recovered_s={:.1} drain_s={drain_s:.1} \
         broker_dlx_stalled_tiers={dlx_stalled} broker_held_checks_max={held_max} held_released_after_drain_s={held_released_s:.0} total_s={:.0}",
        books.tasks,
        books.lost.len(),
        books.duplicates_dropped,
        books.by_status,
        cluster.slots.len(),
        counters.sum("video_broker_reconnects_total", ""),
        counters.sum("video_broker_republished_total", ""),
        counters.sum("video_progress_checks_total", "outcome=\"stale\""),
        counters.sum("video_progress_rearmed_total", ""),
        books.status_calls,
        books.tightest,
        faults[0].recovery_s(),
        cluster.started.elapsed().as_secs_f64(),
    ));
    assert_clean(&cluster, &books);
    assert_eq!(
        not_ready,
        cluster.slots.len(),
        "every instance reports not ready while {dependency:?} is down"
    );
    if dependency == Dependency::RabbitMq {
        assert!(
            counters.sum("video_broker_reconnects_total", "") >= cluster.slots.len() as u64,
            "every instance reconnected"
        );
    }
    cluster.cleanup().await;
    drop(services);
}
