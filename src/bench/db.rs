//! Every SQL statement of the bench: seeding `video_tasks`, reading back what the chains did, and
//! creating and dropping the run's own database. Tasks of one service process share a tag: their
//! request ids are `{tag}-{index}`.

use sqlx::postgres::PgConnectOptions;
use sqlx::Connection as _;

use crate::store::Store;

fn request_ids_of(tag: &str) -> String {
    format!("{tag}-%")
}

/// Inserts `processing` rows: the i-th has request id `request_ids[i]`, virtual key
/// `virtual_keys[i]`, the simulator's job `provider_task_ids[i]`, and its first check due
/// `first_check_in_secs[i]` seconds from now.
pub(super) async fn insert_processing_tasks(
    store: &Store,
    request_ids: &[String],
    virtual_keys: &[String],
    provider_task_ids: &[String],
    first_check_in_secs: &[f64],
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO video_tasks (request_id, virtual_key_id, model, prompt, provider,
             provider_task_id, status, started_at, check_sequence, next_check_at)
         SELECT r, v, 'sim-bench', 'benchmark job', 'sim', p, 'processing', now(), 0,
             now() + make_interval(secs => o)
         FROM UNNEST($1::text[], $2::text[], $3::text[], $4::float8[]) AS t(r, v, p, o)",
    )
    .bind(request_ids)
    .bind(virtual_keys)
    .bind(provider_task_ids)
    .bind(first_check_in_secs)
    .execute(store.pool())
    .await?;
    Ok(())
}

/// Live chains of `tag` whose last check is older than `since` (or that never ran).
pub(super) async fn count_stalled_chains(
    store: &Store,
    tag: &str,
    since: chrono::DateTime<chrono::Utc>,
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT count(*) FROM video_tasks
         WHERE request_id LIKE $1 AND status = 'processing' AND NOT tracking_stopped
           AND (last_check_at IS NULL OR last_check_at < $2)",
    )
    .bind(request_ids_of(tag))
    .bind(since)
    .fetch_one(store.pool())
    .await
}

/// What a task's row recorded of its checks.
#[derive(Debug, Clone)]
pub(super) struct RecordedChecks {
    /// The simulator's job id.
    pub(super) provider_task_id: Option<String>,
    /// Checks that ran to the end and advanced the row.
    pub(super) checks_count: i64,
    pub(super) tracking_stopped: bool,
}

/// [`RecordedChecks`] of every task of `tag`.
pub(super) async fn recorded_checks(
    store: &Store,
    tag: &str,
) -> Result<Vec<RecordedChecks>, sqlx::Error> {
    let rows: Vec<(Option<String>, i64, bool)> = sqlx::query_as(
        "SELECT provider_task_id, checks_count, tracking_stopped FROM video_tasks
         WHERE request_id LIKE $1",
    )
    .bind(request_ids_of(tag))
    .fetch_all(store.pool())
    .await?;
    Ok(rows
        .into_iter()
        .map(
            |(provider_task_id, checks_count, tracking_stopped)| RecordedChecks {
                provider_task_id,
                checks_count,
                tracking_stopped,
            },
        )
        .collect())
}

/// Stops the chains of these tasks, as a terminal transition would: each dies on its next check.
pub(super) async fn stop_tracking(
    store: &Store,
    request_ids: &[String],
) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE video_tasks SET tracking_stopped = true WHERE request_id = ANY($1)")
        .bind(request_ids)
        .execute(store.pool())
        .await?;
    Ok(())
}

/// Stops every chain of `tag`.
pub(super) async fn stop_tracking_tag(store: &Store, tag: &str) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE video_tasks SET tracking_stopped = true WHERE request_id LIKE $1")
        .bind(request_ids_of(tag))
        .execute(store.pool())
        .await?;
    Ok(())
}

/// Closes the store's pool, so the run's database can be dropped.
pub(super) async fn close(store: &Store) {
    store.pool().close().await;
}

/// One connection to the server outside any pool, to create and drop the run's database.
#[derive(Debug)]
pub(super) struct ServerConnection(sqlx::PgConnection);

impl ServerConnection {
    pub(super) async fn open(options: &PgConnectOptions) -> Result<Self, sqlx::Error> {
        Ok(Self(sqlx::PgConnection::connect_with(options).await?))
    }

    pub(super) async fn create_database(&mut self, name: &str) -> Result<(), sqlx::Error> {
        sqlx::query(&format!(r#"CREATE DATABASE "{name}""#))
            .execute(&mut self.0)
            .await?;
        Ok(())
    }

    /// Drops `name` even while other sessions are connected to it.
    pub(super) async fn drop_database(&mut self, name: &str) -> Result<(), sqlx::Error> {
        sqlx::query(&format!(r#"DROP DATABASE IF EXISTS "{name}" WITH (FORCE)"#))
            .execute(&mut self.0)
            .await?;
        Ok(())
    }

    pub(super) async fn close(self) {
        let _ = self.0.close().await;
    }
}
