//! The task store on the real PostgreSQL: compare-and-set transitions, the check chain's
//! sequence, the outbox claim and the sweeper's re-arm, each under real concurrency.

use std::collections::BTreeSet;
use std::time::Duration;

use chrono::{DateTime, Utc};
use test_support::TestEnv;
use video_orchestrator::messages::{Meta, VideoGenerationStarted};
use video_orchestrator::store::{
    CheckAdvance, Inserted, NewTask, Store, Task, TaskStatus, TransitionPatch,
};
use video_orchestrator::topology::Topology;

const ALL_STATUSES: [TaskStatus; 6] = [
    TaskStatus::Pending,
    TaskStatus::Processing,
    TaskStatus::Completed,
    TaskStatus::Failed,
    TaskStatus::Cancelled,
    TaskStatus::TimedOut,
];

fn new_task(request_id: &str) -> NewTask {
    NewTask {
        request_id: request_id.to_owned(),
        virtual_key_id: "vk-1".to_owned(),
        model: "sora-2".to_owned(),
        prompt: "a cat on a skateboard".to_owned(),
        provider: "sim".to_owned(),
        ..NewTask::default()
    }
}

/// A task accepted by the provider at `started_at`: processing, tracking armed with
/// `check_sequence = 0` and its first check due at `started_at`.
async fn processing_task(store: &Store, request_id: &str, started_at: DateTime<Utc>) -> Task {
    let mut tx = store.begin().await.unwrap();
    assert_eq!(
        tx.insert_task(&new_task(request_id), TaskStatus::Pending)
            .await
            .unwrap(),
        Inserted::New
    );
    let task = tx
        .transition(
            request_id,
            &[TaskStatus::Pending],
            TaskStatus::Processing,
            &TransitionPatch {
                provider_task_id: Some(format!("video_{request_id}")),
                start_tracking_at: Some(started_at),
                next_check_at: Some(started_at),
                ..TransitionPatch::default()
            },
        )
        .await
        .unwrap()
        .expect("pending → processing");
    tx.commit().await.unwrap();
    assert_eq!(task.check_sequence, 0);
    task
}

async fn transition(
    store: &Store,
    request_id: &str,
    from: &[TaskStatus],
    to: TaskStatus,
) -> Option<Task> {
    let mut tx = store.begin().await.unwrap();
    let moved = tx
        .transition(request_id, from, to, &TransitionPatch::default())
        .await
        .unwrap();
    tx.commit().await.unwrap();
    moved
}

fn advance(sequence: i64) -> CheckAdvance {
    CheckAdvance {
        sequence,
        next_check_at: Some(Utc::now() + chrono::Duration::seconds(2)),
        progress: Some(10),
        progress_status: Some("in_progress".to_owned()),
    }
}

#[tokio::test]
async fn a_terminal_task_never_changes_status_again() {
    let env = TestEnv::new().await;
    let store = &env.store;
    processing_task(store, "req-done", Utc::now()).await;
    let done = transition(
        store,
        "req-done",
        &[TaskStatus::Processing],
        TaskStatus::Completed,
    )
    .await
    .expect("processing → completed");
    assert!(
        done.tracking_stopped,
        "a terminal transition stops tracking"
    );
    assert!(done.finished_at.is_some());

    assert!(
        transition(
            store,
            "req-done",
            &[TaskStatus::Processing],
            TaskStatus::Completed
        )
        .await
        .is_none(),
        "only a processing task completes"
    );
    for to in [
        TaskStatus::Processing,
        TaskStatus::Pending,
        TaskStatus::Failed,
    ] {
        assert!(
            transition(store, "req-done", &[TaskStatus::Completed], to)
                .await
                .is_none(),
            "completed → {to:?} from [Completed]"
        );
        assert!(
            transition(store, "req-done", &ALL_STATUSES, to)
                .await
                .is_none(),
            "completed → {to:?} from any status"
        );
    }
    let row = store.get("req-done").await.unwrap().unwrap();
    assert_eq!(row.status, TaskStatus::Completed);
    assert!(row.tracking_stopped);
    env.cleanup().await;
}

#[tokio::test]
async fn of_two_concurrent_checks_with_the_same_sequence_exactly_one_advances_the_chain() {
    let env = TestEnv::new().await;
    let store = &env.store;
    processing_task(store, "req-race", Utc::now()).await;

    for sequence in 0..20 {
        // Two pool connections, one UPDATE each, sent at the same time.
        let (first, second) = (advance(sequence), advance(sequence));
        let (a, b) = tokio::join!(
            store.advance_check("req-race", &first),
            store.advance_check("req-race", &second),
        );
        let (a, b) = (a.unwrap(), b.unwrap());
        assert!(a ^ b, "round {sequence}: exactly one wins, got {a} and {b}");
        let row = store.get("req-race").await.unwrap().unwrap();
        assert_eq!(row.check_sequence, sequence + 1);
        assert_eq!(row.checks_count, sequence + 1);
    }
    env.cleanup().await;
}

#[tokio::test]
async fn a_check_with_a_lower_sequence_than_the_row_is_stale() {
    let env = TestEnv::new().await;
    let store = &env.store;
    processing_task(store, "req-stale", Utc::now()).await;
    for sequence in 0..5 {
        assert!(store
            .advance_check("req-stale", &advance(sequence))
            .await
            .unwrap());
    }
    let before = store.get("req-stale").await.unwrap().unwrap();
    assert_eq!(before.check_sequence, 5);

    for stale in [0, 3, 4] {
        assert!(
            !store
                .advance_check("req-stale", &advance(stale))
                .await
                .unwrap(),
            "sequence {stale} against a row at 5"
        );
    }
    let after = store.get("req-stale").await.unwrap().unwrap();
    assert_eq!(after.check_sequence, 5);
    assert_eq!(after.checks_count, before.checks_count);

    // Nor does any check advance a finished task.
    transition(
        store,
        "req-stale",
        &[TaskStatus::Processing],
        TaskStatus::Failed,
    )
    .await
    .expect("processing → failed");
    assert!(!store.advance_check("req-stale", &advance(5)).await.unwrap());
    env.cleanup().await;
}

#[tokio::test]
async fn concurrent_outbox_claims_never_return_the_same_row_twice() {
    let env = TestEnv::new().await;
    let store = &env.store;
    let topology = Topology::new(env.prefix.clone(), 16, vec![1000]);

    for round in 0..10 {
        let mut tx = store.begin().await.unwrap();
        for i in 0..50 {
            let event = VideoGenerationStarted {
                meta: Meta::new(),
                request_id: format!("req-{round}-{i}"),
                virtual_key_id: "vk-1".to_owned(),
                provider: "sim".to_owned(),
                provider_task_id: format!("video_{i}"),
                started_at: Utc::now(),
            };
            tx.enqueue(&topology.event(&event)).await.unwrap();
        }
        tx.commit().await.unwrap();
        assert_eq!(store.outbox_len().await.unwrap(), 50);

        // Two relays claim at the same time, each in its own transaction.
        let mut first = store.begin().await.unwrap();
        let mut second = store.begin().await.unwrap();
        let (a, b) = tokio::join!(first.claim_outbox(30), second.claim_outbox(30),);
        let (a, b) = (a.unwrap(), b.unwrap());
        let ids_a: BTreeSet<i64> = a.iter().map(|r| r.id).collect();
        let ids_b: BTreeSet<i64> = b.iter().map(|r| r.id).collect();
        assert_eq!(ids_a.len(), a.len());
        assert_eq!(ids_b.len(), b.len());
        assert!(
            ids_a.is_disjoint(&ids_b),
            "round {round}: both claimed {:?}",
            ids_a.intersection(&ids_b).collect::<Vec<_>>()
        );
        assert_eq!(
            a.len() + b.len(),
            50,
            "round {round}: every row claimed once"
        );
        assert!(a
            .iter()
            .chain(&b)
            .all(|r| r.envelope.message_type == "VideoGenerationStarted"));

        let ids: Vec<i64> = ids_a.iter().chain(&ids_b).copied().collect();
        first
            .delete_outbox(&ids_a.iter().copied().collect::<Vec<_>>())
            .await
            .unwrap();
        first.commit().await.unwrap();
        second
            .delete_outbox(&ids_b.iter().copied().collect::<Vec<_>>())
            .await
            .unwrap();
        second.commit().await.unwrap();
        assert_eq!(ids.len(), 50);
        assert_eq!(store.outbox_len().await.unwrap(), 0);
    }
    env.cleanup().await;
}

#[tokio::test]
async fn rearming_bumps_the_sequence_of_overdue_processing_tasks_and_ignores_terminal_ones() {
    let env = TestEnv::new().await;
    let store = &env.store;
    let long_ago = Utc::now() - chrono::Duration::minutes(5);
    processing_task(store, "req-overdue", long_ago).await;
    processing_task(
        store,
        "req-on-time",
        Utc::now() + chrono::Duration::minutes(5),
    )
    .await;
    processing_task(store, "req-finished", long_ago).await;
    transition(
        store,
        "req-finished",
        &[TaskStatus::Processing],
        TaskStatus::Completed,
    )
    .await
    .expect("processing → completed");

    let rearmed = store
        .rearm_overdue(Duration::from_secs(15), Duration::from_secs(2), 100)
        .await
        .unwrap();
    let ids: Vec<&str> = rearmed.iter().map(|t| t.request_id.as_str()).collect();
    assert_eq!(ids, vec!["req-overdue"]);
    assert_eq!(rearmed[0].check_sequence, 1);
    let next = rearmed[0].next_check_at.expect("next check set");
    assert!(
        next > Utc::now(),
        "the next check is pushed into the future"
    );

    // The old chain is stale now; the re-armed one runs.
    assert!(!store
        .advance_check("req-overdue", &advance(0))
        .await
        .unwrap());
    assert!(store
        .advance_check("req-overdue", &advance(1))
        .await
        .unwrap());

    for id in ["req-on-time", "req-finished"] {
        assert_eq!(
            store.get(id).await.unwrap().unwrap().check_sequence,
            0,
            "{id} left alone"
        );
    }
    // Re-armed once: not overdue again right away.
    assert!(store
        .rearm_overdue(Duration::from_secs(15), Duration::from_secs(2), 100)
        .await
        .unwrap()
        .is_empty());
    env.cleanup().await;
}
