//! Task rows: insert, read, lifecycle transitions, the sweeper's queries on pending tasks, and
//! what changed since a time (live event streams resume with it).

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::{Inserted, NewTask, Store, StoreError, Task, TaskStatus, TransitionPatch, UnitOfWork};

impl Store {
    /// Reads one task.
    ///
    /// # Errors
    /// Database errors.
    pub async fn get(&self, request_id: &str) -> Result<Option<Task>, StoreError> {
        Ok(
            sqlx::query_as::<_, Task>("SELECT * FROM video_tasks WHERE request_id = $1")
                .bind(request_id)
                .fetch_optional(&self.pool)
                .await?,
        )
    }
}

impl UnitOfWork {
    /// The task's row as this unit sees it.
    ///
    /// # Errors
    /// Database errors, or no such task.
    pub async fn task(&mut self, request_id: &str) -> Result<Task, StoreError> {
        Ok(
            sqlx::query_as::<_, Task>("SELECT * FROM video_tasks WHERE request_id = $1")
                .bind(request_id)
                .fetch_one(self.conn())
                .await?,
        )
    }

    /// Leaves a tombstone for a request id nobody used yet: `virtual_key_id`'s request with that
    /// id is refused later. Returns [`Inserted::Exists`] when the id is in use.
    ///
    /// # Errors
    /// Database errors.
    pub async fn insert_tombstone(
        &mut self,
        request_id: &str,
        virtual_key_id: &str,
        traceparent: Option<&str>,
    ) -> Result<Inserted, StoreError> {
        let done = sqlx::query(
            "INSERT INTO video_tasks (request_id, virtual_key_id, traceparent, status, finished_at, tombstone)
             VALUES ($1, $2, $3, 'cancelled', now(), true)
             ON CONFLICT (request_id) DO NOTHING",
        )
        .bind(request_id)
        .bind(virtual_key_id)
        .bind(traceparent)
        .execute(self.conn())
        .await?;
        if done.rows_affected() == 1 {
            return Ok(Inserted::New);
        }
        Ok(Inserted::Exists(Box::new(self.task(request_id).await?)))
    }

    /// Turns another tenant's tombstone for this id into `task`, pending, as if the tombstone
    /// had never been. `None` when the row is no longer another tenant's tombstone.
    ///
    /// # Errors
    /// Database errors.
    pub async fn take_over_tombstone(
        &mut self,
        task: &NewTask,
    ) -> Result<Option<Task>, StoreError> {
        Ok(sqlx::query_as::<_, Task>(
            "UPDATE video_tasks SET virtual_key_id = $2, model = $3, prompt = $4,
                 duration_seconds = $5, size = $6, provider = $7, callback_url = $8, metadata = $9,
                 traceparent = $10, image_url = $11, status = 'pending', message = NULL, finished_at = NULL,
                 tracking_stopped = false, tombstone = false, created_at = now(), updated_at = now()
             WHERE request_id = $1 AND tombstone AND virtual_key_id <> $2
             RETURNING *",
        )
        .bind(&task.request_id)
        .bind(&task.virtual_key_id)
        .bind(&task.model)
        .bind(&task.prompt)
        .bind(task.duration_seconds)
        .bind(&task.size)
        .bind(&task.provider)
        .bind(&task.callback_url)
        .bind(&task.metadata)
        .bind(&task.traceparent)
        .bind(&task.image_url)
        .fetch_optional(self.conn())
        .await?)
    }

    /// Records why a request was refused (the task was inserted as failed in this unit).
    ///
    /// # Errors
    /// Database errors.
    pub async fn record_refusal(
        &mut self,
        request_id: &str,
        reason: &str,
    ) -> Result<(), StoreError> {
        sqlx::query("UPDATE video_tasks SET error = $2, retryable = false WHERE request_id = $1")
            .bind(request_id)
            .bind(reason)
            .execute(self.conn())
            .await?;
        Ok(())
    }

    /// Inserts a task in `status` unless its request id exists.
    ///
    /// # Errors
    /// Database errors.
    pub async fn insert_task(
        &mut self,
        task: &NewTask,
        status: TaskStatus,
    ) -> Result<Inserted, StoreError> {
        let done = sqlx::query(
            "INSERT INTO video_tasks (request_id, virtual_key_id, model, prompt, duration_seconds, size,
                 provider, callback_url, metadata, traceparent, status,
                 finished_at, image_url)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11,
                 CASE WHEN $11 IN ('pending', 'processing') THEN NULL ELSE now() END, $12)
             ON CONFLICT (request_id) DO NOTHING",
        )
        .bind(&task.request_id)
        .bind(&task.virtual_key_id)
        .bind(&task.model)
        .bind(&task.prompt)
        .bind(task.duration_seconds)
        .bind(&task.size)
        .bind(&task.provider)
        .bind(&task.callback_url)
        .bind(&task.metadata)
        .bind(&task.traceparent)
        .bind(status.as_str())
        .bind(&task.image_url)
        .execute(self.conn())
        .await?;
        if done.rows_affected() == 1 {
            return Ok(Inserted::New);
        }
        let existing = sqlx::query_as::<_, Task>("SELECT * FROM video_tasks WHERE request_id = $1")
            .bind(&task.request_id)
            .fetch_one(self.conn())
            .await?;
        Ok(Inserted::Exists(Box::new(existing)))
    }

    /// Compare-and-set transition: moves the task to `to` only if its status is one of `from`.
    /// A terminal `to` also stops tracking and sets `finished_at`. Returns the updated row, or
    /// `None` when the task was not in `from` (someone else moved it first).
    ///
    /// # Errors
    /// Database errors.
    pub async fn transition(
        &mut self,
        request_id: &str,
        from: &[TaskStatus],
        to: TaskStatus,
        patch: &TransitionPatch,
    ) -> Result<Option<Task>, StoreError> {
        let from: Vec<&str> = from.iter().map(|s| s.as_str()).collect();
        let row = sqlx::query_as::<_, Task>(
            "UPDATE video_tasks SET
                 status = $3,
                 updated_at = now(),
                 provider_task_id = COALESCE($4, provider_task_id),
                 progress = COALESCE($5, progress),
                 message = COALESCE($6, message),
                 video_url = COALESCE($7, video_url),
                 video_url_expires_at = COALESCE($8, video_url_expires_at),
                 video_seconds = COALESCE($9, video_seconds),
                 error = COALESCE($10, error),
                 retryable = COALESCE($11, retryable),
                 started_at = COALESCE($12, started_at),
                 next_check_at = COALESCE($13, next_check_at),
                 check_sequence = CASE WHEN $12 IS NULL THEN check_sequence ELSE 0 END,
                 finished_at = CASE WHEN $3 IN ('pending', 'processing') THEN finished_at ELSE now() END,
                 tracking_stopped = tracking_stopped OR $3 NOT IN ('pending', 'processing')
             WHERE request_id = $1 AND status = ANY($2)
               AND status IN ('pending', 'processing')
             RETURNING *",
        )
        .bind(request_id)
        .bind(&from)
        .bind(to.as_str())
        .bind(&patch.provider_task_id)
        .bind(patch.progress)
        .bind(&patch.message)
        .bind(&patch.video_url)
        .bind(patch.video_url_expires_at)
        .bind(patch.video_seconds)
        .bind(&patch.error)
        .bind(patch.retryable)
        .bind(patch.start_tracking_at)
        .bind(patch.next_check_at)
        .fetch_optional(self.conn())
        .await?;
        Ok(row)
    }
}

impl Store {
    /// Tasks still `pending` after `grace` (a crash between insert and submit) that no sweeper
    /// re-drove in the last `grace`: marks them (`next_check_at`, unused while pending) so one
    /// sweeper re-drives each per grace period.
    ///
    /// # Errors
    /// Database errors.
    pub async fn claim_stale_pending(
        &self,
        grace: Duration,
        limit: i64,
    ) -> Result<Vec<Task>, StoreError> {
        Ok(sqlx::query_as::<_, Task>(
            "WITH due AS (
                 SELECT request_id FROM video_tasks
                 WHERE status = 'pending' AND updated_at < now() - make_interval(secs => $1)
                   AND (next_check_at IS NULL OR next_check_at < now())
                 ORDER BY created_at LIMIT $2
                 FOR UPDATE SKIP LOCKED)
             UPDATE video_tasks t SET next_check_at = now() + make_interval(secs => $1)
             FROM due WHERE t.request_id = due.request_id
             RETURNING t.*",
        )
        .bind(grace.as_secs_f64())
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Claims a pending task for (re)submission: succeeds for one caller, and only when nobody
    /// touched the task for `grace` (so a submission in progress elsewhere is left alone).
    ///
    /// # Errors
    /// Database errors.
    pub async fn touch_pending(
        &self,
        request_id: &str,
        grace: Duration,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE video_tasks SET updated_at = now()
             WHERE request_id = $1 AND status = 'pending' AND updated_at < now() - make_interval(secs => $2)",
        )
        .bind(request_id)
        .bind(grace.as_secs_f64())
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Median processing time of the model's recent completed tasks (for progress estimates).
    ///
    /// # Errors
    /// Database errors.
    pub async fn median_duration(&self, model: &str) -> Result<Option<Duration>, StoreError> {
        let secs: Option<f64> = sqlx::query_scalar(
            "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY EXTRACT(EPOCH FROM finished_at - started_at))
             FROM (SELECT finished_at, started_at FROM video_tasks
                   WHERE status = 'completed' AND model = $1 AND started_at IS NOT NULL
                   ORDER BY finished_at DESC LIMIT 200) recent",
        )
        .bind(model)
        .fetch_one(&self.pool)
        .await?;
        Ok(secs
            .filter(|s| s.is_finite() && *s > 0.0)
            .map(Duration::from_secs_f64))
    }

    /// Records the intent to submit, before the POST: succeeds only while the task is pending
    /// with no provider job, and keeps its claim fresh (`updated_at`) so the sweeper leaves a
    /// submit in progress alone.
    ///
    /// # Errors
    /// Database errors.
    pub async fn record_submit_attempt(
        &self,
        request_id: &str,
        attempt_id: &str,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE video_tasks SET submit_attempt_id = $2, submit_attempted_at = now(), updated_at = now()
             WHERE request_id = $1 AND status = 'pending' AND provider_task_id IS NULL",
        )
        .bind(request_id)
        .bind(attempt_id)
        .execute(self.pool())
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Keeps the claim of a submit in flight alive (`updated_at`), so the sweeper's
    /// `claim_stale_pending` never takes a task whose POST is still waiting for its answer.
    ///
    /// # Errors
    /// Database errors.
    pub async fn keep_submit_claim(
        &self,
        request_id: &str,
        attempt_id: &str,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE video_tasks SET updated_at = now()
             WHERE request_id = $1 AND status = 'pending' AND submit_attempt_id = $2",
        )
        .bind(request_id)
        .bind(attempt_id)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Forgets an attempt the provider answered without creating a job.
    ///
    /// # Errors
    /// Database errors.
    pub async fn clear_submit_attempt(
        &self,
        request_id: &str,
        attempt_id: &str,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE video_tasks SET submit_attempt_id = NULL
             WHERE request_id = $1 AND submit_attempt_id = $2",
        )
        .bind(request_id)
        .bind(attempt_id)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Records the provider's job of `attempt_id`, in a statement of its own the moment the job
    /// is known. False when the task left `pending` meanwhile (cancelled while submitting): the
    /// job is still written on the ended row when it has none, so every job the provider holds
    /// stays some task's (the console shows it; the reliability books count on it).
    ///
    /// # Errors
    /// Database errors.
    pub async fn record_provider_job(
        &self,
        request_id: &str,
        attempt_id: &str,
        job_id: &str,
    ) -> Result<bool, StoreError> {
        let pending: Option<bool> = sqlx::query_scalar(
            "UPDATE video_tasks SET provider_task_id = $3, updated_at = now()
             WHERE request_id = $1 AND provider_task_id IS NULL
               AND (status <> 'pending' OR submit_attempt_id = $2)
             RETURNING status = 'pending'",
        )
        .bind(request_id)
        .bind(attempt_id)
        .bind(job_id)
        .fetch_optional(self.pool())
        .await?;
        Ok(pending == Some(true))
    }

    /// Tasks changed at or after `since`, of one tenant (`None`: every tenant), at most `limit`
    /// of the most recently changed, oldest change first: what a live event stream resumes
    /// with. Each condition of the `OR` has an index of its own (pending, tracked, finished), so
    /// no index on `updated_at` is needed, which every check writes (it would end HOT updates).
    ///
    /// # Errors
    /// Database errors.
    pub async fn tasks_changed_since(
        &self,
        virtual_key_id: Option<&str>,
        since: DateTime<Utc>,
        limit: i64,
    ) -> Result<Vec<Task>, StoreError> {
        let mut rows = sqlx::query_as::<_, Task>(
            "SELECT * FROM video_tasks
             WHERE ($1::text IS NULL OR virtual_key_id = $1) AND updated_at >= $2
               AND (status = 'pending'
                    OR (status = 'processing' AND NOT tracking_stopped)
                    OR (status NOT IN ('pending', 'processing') AND finished_at >= $2))
             ORDER BY updated_at DESC
             LIMIT $3",
        )
        .bind(virtual_key_id)
        .bind(since)
        .bind(limit)
        .fetch_all(self.pool())
        .await?;
        rows.reverse();
        Ok(rows)
    }
}
