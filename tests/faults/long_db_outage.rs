//! Fault 4: PostgreSQL down for four minutes while requests and cancels keep arriving. On
//! RabbitMQ 4.x a consumer that returned messages to the queue while the database was down would
//! burn the quorum queue's delivery limit (20 by default) and lose them; ours holds them at the
//! database gate and retries through delayed retry queues, so every task ends right, nothing is
//! parked, and no message is delivered more than a few times.

use std::time::{Duration, Instant};

use test_support::cluster::{assert_clean, Audit, Cluster, Expectation, FaultWindow, Options};
use test_support::figures::{figure, note};
use video_orchestrator::client::new_request;
use video_orchestrator::store::TaskStatus;

use crate::shared_services::{exclusive, Services};

const DOWN: Duration = Duration::from_secs(240);
const REQUESTS: usize = 50;
const CANCELS: usize = 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_four_minute_postgresql_outage_loses_nothing_parks_nothing_and_burns_no_deliveries() {
    let run = "db_outage_4min";
    let _exclusive = exclusive(run).await;
    let mut cluster = Cluster::start(Options {
        name: run,
        instances: 2,
        sim_duration_ms: 2000,
        sim_jitter_ms: 1000,
        extra: vec![],
    })
    .await;
    let services = Services::guard();
    let driver = cluster.driver().await;

    let from = chrono::Utc::now();
    let t_stop = Instant::now();
    services.stop_postgres().await;
    note(run, "PostgreSQL stopped");
    // Requests spread over the first minute of the outage; every other one of the first forty
    // is cancelled a few seconds after it was requested.
    let mut ids = Vec::with_capacity(REQUESTS);
    let mut cancelled: Vec<(String, String)> = Vec::with_capacity(CANCELS);
    let mut cancels_sent = 0;
    for i in 0..REQUESTS {
        let vk = format!("vk-{run}-{}", i % 8);
        let request = new_request(&vk, "sora-2", &format!("{run} task {i}"));
        let id = driver
            .client
            .submit(&request)
            .await
            .unwrap_or_else(|e| panic!("request {i} not published: {e}"));
        if i % 2 == 1 && cancelled.len() < CANCELS {
            cancelled.push((id.clone(), vk));
        }
        ids.push(id);
        tokio::time::sleep(Duration::from_millis(1200)).await;
        if i % 5 == 4 || i == REQUESTS - 1 {
            for (id, vk) in &cancelled[cancels_sent..] {
                driver
                    .client
                    .cancel(id, vk, Some("changed my mind".to_owned()))
                    .await
                    .expect("cancel published");
            }
            cancels_sent = cancelled.len();
        }
    }
    assert_eq!(cancelled.len(), CANCELS);
    tokio::time::sleep(DOWN.saturating_sub(t_stop.elapsed())).await;
    let down_s = t_stop.elapsed().as_secs_f64();
    services.start_postgres().await;
    let back = Instant::now();
    let to = cluster
        .wait_all_ready(Duration::from_secs(120))
        .await
        .expect("instances ready after PostgreSQL came back");
    note(run, &format!("PostgreSQL back after {down_s:.0} s"));
    driver.close().await;
    cluster.drain(&ids, Duration::from_secs(240)).await;
    let recovered_s = back.elapsed().as_secs_f64();

    // Cancelled ones: cancelled (a cancel that overtook its request leaves a tombstone that
    // refuses it: cancelled too). The rest completed.
    let mut wrong = Vec::new();
    for id in &ids {
        let status = cluster
            .env
            .store
            .get(id)
            .await
            .expect("read task")
            .map(|t| t.status);
        let want = if cancelled.iter().any(|(c, _)| c == id) {
            TaskStatus::Cancelled
        } else {
            TaskStatus::Completed
        };
        if status != Some(want) {
            wrong.push(format!("{id}: {status:?}, want {want:?}"));
        }
    }
    let parked = cluster.env.store.list_parked(100).await.expect("parked");
    // The tracked tasks (not cancelled) must balance like every other fault run.
    let tracked: Vec<String> = ids
        .iter()
        .filter(|id| !cancelled.iter().any(|(c, _)| c == *id))
        .cloned()
        .collect();
    let faults = vec![FaultWindow { from, to }];
    let Audit { counters, books } = cluster
        .audit(&Expectation::all_run(&tracked), &faults)
        .await;
    let generation = format!("queue=\"{}\"", cluster.env.topology().generation_queue());
    let deliveries = counters.sum("video_message_deliveries_count", &generation);
    let within_five = counters.sum(
        "video_message_deliveries_bucket",
        &format!("{generation},le=\"5\""),
    );
    let retries = counters.sum("video_message_retries_total", "");
    figure(&format!(
        "{run}: requests={REQUESTS} cancels={CANCELS} down_s={down_s:.0} wrong={} parked={} \
         generation_deliveries={deliveries} over_5_deliveries={} delayed_retries={retries} \
         recovered_s={recovered_s:.0} lost={}",
        wrong.len(),
        parked.len(),
        deliveries.saturating_sub(within_five),
        books.lost.len(),
    ));
    assert!(wrong.is_empty(), "wrong terminal states: {wrong:#?}");
    assert!(
        parked.is_empty(),
        "nothing parked: {:?}",
        parked.iter().map(|p| &p.reason).collect::<Vec<_>>()
    );
    assert_eq!(
        cluster
            .depth(
                &cluster.connect().await,
                &cluster.env.topology().parking_queue()
            )
            .await,
        0,
        "the parking queue is empty"
    );
    assert!(
        deliveries >= (REQUESTS + CANCELS) as u64,
        "{deliveries} deliveries counted"
    );
    assert_eq!(
        within_five, deliveries,
        "no message on video.generation was delivered more than 5 times"
    );
    assert_clean(&cluster, &books);
    cluster.cleanup().await;
    drop(services);
}
