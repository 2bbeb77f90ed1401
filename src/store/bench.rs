//! The bench's statements: seeding `video_tasks` with tracked tasks and reading back what their
//! chains did. Tasks of one bench service process share a tag: their request ids are
//! `{tag}-{index}`. Only the bench's own scratch database ever sees them.

use super::{Store, StoreError};

fn request_ids_of(tag: &str) -> String {
    format!("{tag}-%")
}

/// What a task's row recorded of its checks.
#[derive(Debug, Clone)]
pub struct RecordedChecks {
    /// The simulator's job id.
    pub provider_task_id: Option<String>,
    /// Checks that ran to the end and advanced the row.
    pub checks_count: i64,
    /// The chain was stopped (terminal, or by the bench).
    pub tracking_stopped: bool,
}

impl Store {
    /// Inserts `processing` rows: the i-th has request id `request_ids[i]`, virtual key
    /// `virtual_keys[i]`, the simulator's job `provider_task_ids[i]`, and its first check due
    /// `first_check_in_secs[i]` seconds from now.
    pub async fn insert_processing_tasks(
        &self,
        request_ids: &[String],
        virtual_keys: &[String],
        provider_task_ids: &[String],
        first_check_in_secs: &[f64],
    ) -> Result<(), StoreError> {
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
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Live chains of `tag` whose last check is older than `since` (or that never ran).
    pub async fn count_stalled_chains(
        &self,
        tag: &str,
        since: chrono::DateTime<chrono::Utc>,
    ) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT count(*) FROM video_tasks
         WHERE request_id LIKE $1 AND status = 'processing' AND NOT tracking_stopped
           AND (last_check_at IS NULL OR last_check_at < $2)",
        )
        .bind(request_ids_of(tag))
        .bind(since)
        .fetch_one(self.pool())
        .await?)
    }

    /// [`RecordedChecks`] of every task of `tag`.
    pub async fn recorded_checks(&self, tag: &str) -> Result<Vec<RecordedChecks>, StoreError> {
        let rows: Vec<(Option<String>, i64, bool)> = sqlx::query_as(
            "SELECT provider_task_id, checks_count, tracking_stopped FROM video_tasks
         WHERE request_id LIKE $1",
        )
        .bind(request_ids_of(tag))
        .fetch_all(self.pool())
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
    pub async fn stop_tracking(&self, request_ids: &[String]) -> Result<(), StoreError> {
        sqlx::query("UPDATE video_tasks SET tracking_stopped = true WHERE request_id = ANY($1)")
            .bind(request_ids)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    /// Stops every chain of `tag`.
    pub async fn stop_tracking_tag(&self, tag: &str) -> Result<(), StoreError> {
        sqlx::query("UPDATE video_tasks SET tracking_stopped = true WHERE request_id LIKE $1")
            .bind(request_ids_of(tag))
            .execute(self.pool())
            .await?;
        Ok(())
    }
}
