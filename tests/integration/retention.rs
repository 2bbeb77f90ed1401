//! Retention: what is old goes, and nothing else.

use std::time::Duration;

use test_support::TestEnv;
use video_orchestrator::retention::RetentionCleaner;
use video_orchestrator::store::{NewTask, Retained, TaskStatus};

async fn exec(env: &TestEnv, sql: &str) {
    sqlx::query(sql)
        .execute(env.store.pool())
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

async fn count(env: &TestEnv, sql: &str) -> i64 {
    sqlx::query_scalar(sql)
        .fetch_one(env.store.pool())
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

async fn task(env: &TestEnv, id: &str, status: TaskStatus) {
    let mut uow = env.store.begin().await.unwrap();
    let t = NewTask {
        request_id: id.to_owned(),
        virtual_key_id: "vk-old".to_owned(),
        model: "sora-2".to_owned(),
        prompt: "kept or not".to_owned(),
        provider: "sim".to_owned(),
        ..NewTask::default()
    };
    uow.insert_task(&t, status).await.unwrap();
    uow.commit().await.unwrap();
}

#[tokio::test]
async fn retention_removes_what_is_old_and_nothing_else() {
    let env = TestEnv::new().await;
    for (id, status) in [
        ("old-done", TaskStatus::Completed),
        ("old-failed", TaskStatus::Failed),
        ("new-done", TaskStatus::Completed),
        ("old-pending", TaskStatus::Pending),
        ("old-processing", TaskStatus::Processing),
    ] {
        task(&env, id, status).await;
    }
    let mut uow = env.store.begin().await.unwrap();
    uow.insert_tombstone("old-tomb", "vk-b", None)
        .await
        .unwrap();
    uow.insert_tombstone("new-tomb", "vk-b", None)
        .await
        .unwrap();
    uow.commit().await.unwrap();
    exec(&env, "UPDATE video_tasks SET finished_at = now() - interval '3 days', created_at = now() - interval '3 days', updated_at = now() - interval '3 days' WHERE request_id LIKE 'old-%'").await;
    exec(&env, "INSERT INTO webhook_deliveries (request_id, message_id, event_type, url, body, give_up_at, delivered_at, created_at) VALUES
        ('old-done', 'm1', 'E', 'http://x/', '', now() - interval '2 days', now() - interval '3 days', now() - interval '3 days'),
        ('old-done', 'm2', 'E', 'http://x/', '', now() + interval '1 hour', NULL, now() - interval '3 days'),
        ('new-done', 'm3', 'E', 'http://x/', '', now() + interval '1 hour', now(), now())").await;
    exec(
        &env,
        "INSERT INTO parked_messages (original_queue, reason, body, parked_at) VALUES
        ('q', 'old', '', now() - interval '3 days'), ('q', 'new', '', now())",
    )
    .await;
    exec(
        &env,
        "INSERT INTO service_instances (topology_prefix, instance_id, heartbeat_at) VALUES
        ('p', 'gone', now() - interval '3 days'), ('p', 'alive', now())",
    )
    .await;

    let cleaner = RetentionCleaner::new(env.store.clone(), env.settings.retention.clone());
    let two_days = Duration::from_secs(2 * 86_400);
    let removed = cleaner
        .clean_older_than(|rule| (rule != Retained::Tombstones).then_some(two_days))
        .await
        .unwrap();
    let by = |rule| removed.iter().find(|(r, _)| *r == rule).map(|(_, n)| *n);
    assert_eq!(
        by(Retained::TerminalTasks),
        Some(2),
        "old-done and old-failed"
    );
    assert_eq!(
        by(Retained::WebhookDeliveries),
        Some(1),
        "only the old delivered one"
    );
    assert_eq!(by(Retained::ParkedMessages), Some(1));
    assert_eq!(by(Retained::StaleInstances), Some(1));
    assert_eq!(
        by(Retained::Tombstones),
        None,
        "a rule set to keep is skipped"
    );

    let left: Vec<String> =
        sqlx::query_scalar("SELECT request_id FROM video_tasks ORDER BY request_id")
            .fetch_all(env.store.pool())
            .await
            .unwrap();
    assert_eq!(
        left,
        [
            "new-done",
            "new-tomb",
            "old-pending",
            "old-processing",
            "old-tomb"
        ],
        "live tasks and tombstones stay"
    );
    assert_eq!(
        count(
            &env,
            "SELECT count(*) FROM webhook_deliveries WHERE message_id = 'm2'"
        )
        .await,
        1,
        "a delivery still being retried stays"
    );
    assert_eq!(count(&env, "SELECT count(*) FROM parked_messages").await, 1);
    assert_eq!(
        count(&env, "SELECT count(*) FROM service_instances").await,
        1
    );

    let again = cleaner.clean_older_than(|_| Some(two_days)).await.unwrap();
    assert_eq!(
        again
            .iter()
            .find(|(r, _)| *r == Retained::Tombstones)
            .map(|(_, n)| *n),
        Some(1)
    );
    assert_eq!(
        again.iter().map(|(_, n)| n).sum::<u64>(),
        1,
        "nothing else was old"
    );
    env.cleanup().await;
}
