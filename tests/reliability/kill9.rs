//! Fault 1: `kill -9` of a random instance every few seconds during a load, restarting it each
//! time. Nothing may be lost, no chain may fork or die, nothing may be reported twice.

use std::time::Duration;

use rand::Rng;
use test_support::cluster::{
    assert_clean, one_at_a_time, submit_load, Audit, Cluster, Expectation, FaultWindow, Options,
};
use test_support::figures::{figure, note};

async fn kill9_run(run: &'static str, tasks: usize, per_second: f64) {
    let _serial = one_at_a_time().await;
    let mut cluster = Cluster::start(Options {
        name: run,
        instances: 3,
        sim_duration_ms: 2000,
        sim_jitter_ms: 2000,
        extra: vec![],
    })
    .await;
    let driver = cluster.driver().await;
    let load = tokio::spawn(submit_load(
        driver.client.clone(),
        run,
        tasks,
        per_second,
        10,
    ));

    // Kill a random instance 1–2.5 s after the partitions were covered again (so every 4–6 s)
    // while the load arrives and twice more after it, so the kills also land on tasks being
    // tracked and finished.
    let mut faults: Vec<FaultWindow> = Vec::new();
    let mut restart_ready: Vec<f64> = Vec::new();
    let mut after_load = 0;
    while after_load < 2 {
        let pause = rand::rng().random_range(1000..2500);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        let slot = rand::rng().random_range(0..cluster.slots.len());
        let from = cluster.kill9(slot).await;
        let ready = cluster.restart(slot).await;
        // Recovered when every partition is leased to a live instance again: the dead
        // instance's leases must expire (3 s) before anyone may take them.
        let to = cluster
            .wait_covered(Duration::from_secs(20))
            .await
            .unwrap_or_else(|| panic!("{run}: partitions not covered 20 s after a kill"));
        restart_ready.push((ready - from).num_milliseconds() as f64 / 1000.0);
        faults.push(FaultWindow { from, to });
        if load.is_finished() {
            after_load += 1;
        }
    }
    let ids = load.await.expect("load driver");
    driver.close().await;
    note(
        run,
        &format!("{} kills; load submitted; draining", faults.len()),
    );
    let drain_s = cluster.drain(&ids, Duration::from_secs(120)).await.seconds;
    let Audit { counters, books } = cluster.audit(&Expectation::all_run(&ids), &faults).await;
    let recovered_max = faults
        .iter()
        .map(FaultWindow::recovery_s)
        .fold(0.0, f64::max);
    let restart_max = restart_ready.iter().copied().fold(0.0, f64::max);
    figure(&format!(
        "{run}: tasks={} faults={} lost={} duplicates_dropped={} stale_checks_dropped>={} rearmed={} \
         orphan_provider_jobs={} unknown_submits={} outcomes={:?} status_calls={} tightest_call_ratio={:.2} \
         restart_ready_max_s={restart_max:.1} recovered_max_s={recovered_max:.1} drain_s={drain_s:.1} total_s={:.0}",
        books.tasks,
        faults.len(),
        books.lost.len(),
        books.duplicates_dropped,
        counters.sum("video_progress_checks_total", "outcome=\"stale\""),
        counters.sum("video_progress_rearmed_total", ""),
        books.orphan_provider_jobs,
        books.unknown_submits,
        books.by_status,
        books.status_calls,
        books.tightest,
        cluster.started.elapsed().as_secs_f64(),
    ));
    assert_clean(&cluster, &books);
    assert!(faults.len() >= 3, "too few kills to mean anything");
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_random_instances_loses_nothing_and_forks_no_chain() {
    kill9_run("kill9", 200, 10.0).await;
}

/// The longer soak: `cargo test --test reliability -- --ignored`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "soak: 1,000 tasks, several minutes"]
async fn soak_kill_9_with_a_thousand_tasks() {
    kill9_run("kill9_soak", 1000, 15.0).await;
}
