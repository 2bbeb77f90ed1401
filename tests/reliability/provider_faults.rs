//! Fault 4: the provider answers 500s and 429s (`Retry-After: 1`) and hangs past the client
//! timeout for a while. Submits retry with backoff and then fail `retryable`; status checks that
//! fail keep the chain going at its interval. Every task still completes or fails as the
//! provider decided.

use std::time::{Duration, Instant};

use chrono::Utc;
use test_support::cluster::{
    assert_clean, one_at_a_time, submit_load, Audit, Cluster, Expectation, FaultWindow, Options,
};
use test_support::figures::{figure, note};
use video_orchestrator::providers::sim::SimFaults;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_500s_429s_and_timeouts_end_every_task_correctly() {
    let run = "provider_faults";
    let _serial = one_at_a_time().await;
    let mut cluster = Cluster::start(Options {
        name: run,
        instances: 2,
        sim_duration_ms: 2000,
        sim_jitter_ms: 2000,
        extra: vec![
            // A hang (60 s at the simulator) becomes a timeout after 2 s.
            ("APP__PROVIDERS__SIM__TIMEOUT_MS", "2000".to_owned()),
            ("APP__GENERATION__SUBMIT_MAX_ATTEMPTS", "5".to_owned()),
            (
                "APP__GENERATION__SUBMIT_BACKOFF_INITIAL_MS",
                "200".to_owned(),
            ),
            ("APP__GENERATION__SUBMIT_BACKOFF_MAX_MS", "2000".to_owned()),
        ],
    })
    .await;
    let driver = cluster.driver().await;
    let load = tokio::spawn(submit_load(driver.client.clone(), run, 200, 12.0, 10));

    tokio::time::sleep(Duration::from_secs(2)).await;
    let from = Utc::now();
    cluster
        .sim
        .set_faults(&SimFaults {
            error_rate: 0.25,
            rate_limit_rate: 0.15,
            hang_rate: 0.03,
            ..SimFaults::default()
        })
        .await;
    // A few the provider refuses with 503 on every attempt: retries run out, `retryable`.
    let mut unavailable = Vec::new();
    for i in 0..8 {
        let request = video_orchestrator::client::new_request(
            "vk-unavailable",
            "sora-2",
            &format!("never accepted #{i} [unavailable]"),
        );
        unavailable.push(driver.client.submit(&request).await.expect("published"));
    }
    tokio::time::sleep(Duration::from_secs(12)).await;
    cluster.sim.set_faults(&SimFaults::default()).await;
    let cleared = Instant::now();
    let to = Utc::now();
    note(run, "provider faults cleared");
    let faults = vec![FaultWindow { from, to }];

    let mut ids = load.await.expect("load driver");
    ids.extend(unavailable);
    driver.close().await;
    let last = cluster
        .drain(&ids, Duration::from_secs(120))
        .await
        .last_finished;
    let recovered_s = (last - to).num_milliseconds().max(0) as f64 / 1000.0;
    let timeouts = cluster.log_lines("timed out");
    let Audit { counters, books } = cluster.audit(&Expectation::all_run(&ids), &faults).await;
    let gave_up: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM video_tasks WHERE request_id = ANY($1)
           AND status = 'failed' AND retryable AND provider_task_id IS NULL",
    )
    .bind(&ids)
    .fetch_one(cluster.env.store.pool())
    .await
    .expect("count give-ups");
    let submit_errors = counters.sum("video_provider_errors_total", "operation=\"submit\"");
    let status_errors = counters.sum("video_provider_errors_total", "operation=\"status\"");
    figure(&format!(
        "{run}: tasks={} faults={} (provider errors seen: submit={submit_errors} status={status_errors}, timeouts logged={timeouts}) \
         lost={} duplicates_dropped={} outcomes={:?} submit_gave_up_retryable={gave_up} \
         status_calls={} tightest_call_ratio={:.2} fault_window_s={:.0} last_task_after_clear_s={recovered_s:.1} \
         drain_after_clear_s={:.1} total_s={:.0}",
        books.tasks,
        submit_errors + status_errors,
        books.lost.len(),
        books.duplicates_dropped,
        books.by_status,
        books.status_calls,
        books.tightest,
        faults[0].recovery_s(),
        cleared.elapsed().as_secs_f64(),
        cluster.started.elapsed().as_secs_f64(),
    ));
    assert_clean(&cluster, &books);
    assert!(
        gave_up >= 8,
        "the always-unavailable requests end failed and retryable"
    );
    assert!(
        submit_errors > 0 && status_errors > 0,
        "the faults never reached the service (submit {submit_errors}, status {status_errors})"
    );
    cluster.cleanup().await;
}
