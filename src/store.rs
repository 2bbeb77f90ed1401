//! PostgreSQL: tasks, the transactional outbox, partition leases, parked messages, webhooks.
//!
//! Every lifecycle transition is a compare-and-set in one statement, so a terminal state never
//! changes again whatever instance races. The tracker's `check_sequence` only moves forward, by
//! one conditional UPDATE that exactly one check can win.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use secrecy::ExposeSecret;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Postgres, Row, Transaction};

use crate::batching::Combiner;
use crate::config::DatabaseSettings;
use crate::messages::Envelope;

/// Embedded migrations, run at start.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Database failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be reached or answered with an error.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// Migrations failed.
    #[error("database migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A row holds a value this build does not know.
    #[error("database row: {0}")]
    Corrupt(String),
    /// A batched statement (several checks' reads or writes in one) failed, or the caller that
    /// ran it was cancelled.
    #[error("database (batched): {0}")]
    Batch(String),
}

impl StoreError {
    /// True when the same statement may work later: the database is unreachable, restarting,
    /// overloaded, or lost a serialisation race. False for what it will never accept: data
    /// exceptions (SQLSTATE class 22, e.g. `0x00` in text), integrity violations (23) and
    /// statements this build got wrong (42); retrying those would only loop.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Database(e) => match e {
                sqlx::Error::Database(db) => {
                    let code = db.code();
                    let class = code.as_deref().map(|c| &c[..c.len().min(2)]);
                    !matches!(class, Some("22" | "23" | "42" | "0A" | "2B" | "44"))
                }
                sqlx::Error::Io(_)
                | sqlx::Error::Tls(_)
                | sqlx::Error::Protocol(_)
                | sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::WorkerCrashed
                | sqlx::Error::BeginFailed => true,
                _ => false,
            },
            Self::Migrate(_) | Self::Batch(_) => true,
            Self::Corrupt(_) => false,
        }
    }
}

/// Lifecycle status of a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskStatus {
    /// Recorded, not yet accepted by the provider.
    Pending,
    /// Accepted by the provider; tracked.
    Processing,
    /// Video ready.
    Completed,
    /// Failed at the provider or refused.
    Failed,
    /// Cancelled by its owner.
    Cancelled,
    /// Past `tracking.max_duration_ms`.
    TimedOut,
}

impl TaskStatus {
    /// Database and JSON name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Processing => "processing",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
            Self::TimedOut => "timed_out",
        }
    }

    /// A terminal status never changes again.
    pub fn is_terminal(self) -> bool {
        !matches!(self, Self::Pending | Self::Processing)
    }

    fn parse(s: &str) -> Result<Self, StoreError> {
        Ok(match s {
            "pending" => Self::Pending,
            "processing" => Self::Processing,
            "completed" => Self::Completed,
            "failed" => Self::Failed,
            "cancelled" => Self::Cancelled,
            "timed_out" => Self::TimedOut,
            other => {
                return Err(StoreError::Corrupt(format!(
                    "unknown task status `{other}`"
                )))
            }
        })
    }
}

/// A task row.
#[derive(Debug, Clone, PartialEq)]
pub struct Task {
    #[allow(missing_docs)]
    pub request_id: String,
    #[allow(missing_docs)]
    pub virtual_key_id: String,
    #[allow(missing_docs)]
    pub model: String,
    #[allow(missing_docs)]
    pub prompt: String,
    #[allow(missing_docs)]
    pub duration_seconds: Option<i32>,
    #[allow(missing_docs)]
    pub size: Option<String>,
    #[allow(missing_docs)]
    pub provider: String,
    #[allow(missing_docs)]
    pub provider_task_id: Option<String>,
    #[allow(missing_docs)]
    pub callback_url: Option<String>,
    #[allow(missing_docs)]
    pub metadata: Option<serde_json::Value>,
    #[allow(missing_docs)]
    pub status: TaskStatus,
    /// Last published progress (0–100).
    pub progress: i16,
    /// Last published progress status (`queued` / `in_progress`).
    pub progress_status: Option<String>,
    #[allow(missing_docs)]
    pub message: Option<String>,
    #[allow(missing_docs)]
    pub video_url: Option<String>,
    #[allow(missing_docs)]
    pub video_url_expires_at: Option<DateTime<Utc>>,
    #[allow(missing_docs)]
    pub video_seconds: Option<f64>,
    #[allow(missing_docs)]
    pub error: Option<String>,
    #[allow(missing_docs)]
    pub retryable: Option<bool>,
    #[allow(missing_docs)]
    pub traceparent: Option<String>,
    #[allow(missing_docs)]
    pub created_at: DateTime<Utc>,
    #[allow(missing_docs)]
    pub updated_at: DateTime<Utc>,
    #[allow(missing_docs)]
    pub started_at: Option<DateTime<Utc>>,
    #[allow(missing_docs)]
    pub finished_at: Option<DateTime<Utc>>,
    /// The lowest sequence a check must carry to run.
    pub check_sequence: i64,
    /// Checks that ran for this task.
    pub checks_count: i64,
    #[allow(missing_docs)]
    pub next_check_at: Option<DateTime<Utc>>,
    #[allow(missing_docs)]
    pub last_check_at: Option<DateTime<Utc>>,
    /// Set with the terminal transition: a pending check dies on arrival.
    pub tracking_stopped: bool,
}

impl<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> for Task {
    fn from_row(row: &'r sqlx::postgres::PgRow) -> Result<Self, sqlx::Error> {
        let status: String = row.try_get("status")?;
        Ok(Self {
            request_id: row.try_get("request_id")?,
            virtual_key_id: row.try_get("virtual_key_id")?,
            model: row.try_get("model")?,
            prompt: row.try_get("prompt")?,
            duration_seconds: row.try_get("duration_seconds")?,
            size: row.try_get("size")?,
            provider: row.try_get("provider")?,
            provider_task_id: row.try_get("provider_task_id")?,
            callback_url: row.try_get("callback_url")?,
            metadata: row.try_get("metadata")?,
            status: TaskStatus::parse(&status)
                .map_err(|e| sqlx::Error::Decode(e.to_string().into()))?,
            progress: row.try_get("progress")?,
            progress_status: row.try_get("progress_status")?,
            message: row.try_get("message")?,
            video_url: row.try_get("video_url")?,
            video_url_expires_at: row.try_get("video_url_expires_at")?,
            video_seconds: row.try_get("video_seconds")?,
            error: row.try_get("error")?,
            retryable: row.try_get("retryable")?,
            traceparent: row.try_get("traceparent")?,
            created_at: row.try_get("created_at")?,
            updated_at: row.try_get("updated_at")?,
            started_at: row.try_get("started_at")?,
            finished_at: row.try_get("finished_at")?,
            check_sequence: row.try_get("check_sequence")?,
            checks_count: row.try_get("checks_count")?,
            next_check_at: row.try_get("next_check_at")?,
            last_check_at: row.try_get("last_check_at")?,
            tracking_stopped: row.try_get("tracking_stopped")?,
        })
    }
}

/// A task to insert.
#[derive(Debug, Clone, Default)]
pub struct NewTask {
    #[allow(missing_docs)]
    pub request_id: String,
    #[allow(missing_docs)]
    pub virtual_key_id: String,
    #[allow(missing_docs)]
    pub model: String,
    #[allow(missing_docs)]
    pub prompt: String,
    #[allow(missing_docs)]
    pub duration_seconds: Option<i32>,
    #[allow(missing_docs)]
    pub size: Option<String>,
    #[allow(missing_docs)]
    pub provider: String,
    #[allow(missing_docs)]
    pub callback_url: Option<String>,
    #[allow(missing_docs)]
    pub metadata: Option<serde_json::Value>,
    #[allow(missing_docs)]
    pub traceparent: Option<String>,
}

/// Fields a lifecycle transition may set (None = leave as is).
#[derive(Debug, Clone, Default)]
pub struct TransitionPatch {
    #[allow(missing_docs)]
    pub provider_task_id: Option<String>,
    #[allow(missing_docs)]
    pub progress: Option<i16>,
    #[allow(missing_docs)]
    pub message: Option<String>,
    #[allow(missing_docs)]
    pub video_url: Option<String>,
    #[allow(missing_docs)]
    pub video_url_expires_at: Option<DateTime<Utc>>,
    #[allow(missing_docs)]
    pub video_seconds: Option<f64>,
    #[allow(missing_docs)]
    pub error: Option<String>,
    #[allow(missing_docs)]
    pub retryable: Option<bool>,
    /// Set `started_at` and arm tracking (`check_sequence = 0`).
    pub start_tracking_at: Option<DateTime<Utc>>,
    /// When the first check is due.
    pub next_check_at: Option<DateTime<Utc>>,
}

/// A claimed outbox row.
#[derive(Debug, Clone)]
pub struct OutboxRow {
    /// Row id.
    pub id: i64,
    /// Failed publishes so far.
    pub attempts: i32,
    /// The message.
    pub envelope: Envelope,
}

/// Result of an insert.
#[derive(Debug, Clone, PartialEq)]
pub enum Inserted {
    /// A new row.
    New,
    /// The request id exists; here is the row.
    Exists(Box<Task>),
}

/// What a tracker's check writes when it advances the chain.
#[derive(Debug, Clone)]
pub struct CheckAdvance {
    /// The sequence of the check that ran.
    pub sequence: i64,
    /// When the next check is due (None when the chain ends here).
    pub next_check_at: Option<DateTime<Utc>>,
    /// Progress published (kept monotonic by the query).
    pub progress: Option<i16>,
    /// Status published.
    pub progress_status: Option<String>,
}

/// The database handle. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    pool: PgPool,
    checks: Arc<CheckBatches>,
}

/// The progress tracker's two statements per check, each combined across concurrent checks
/// (see [`crate::batching`]): one round trip reads or advances many rows.
#[derive(Debug)]
struct CheckBatches {
    loads: Combiner<String, Result<Option<Task>, String>>,
    advances: Combiner<(String, CheckAdvance), Result<bool, String>>,
}

/// Batches at most this many checks; two batches of a kind run at once.
const CHECK_BATCH_MAX: usize = 128;
const CHECK_BATCH_EXECUTORS: usize = 2;

impl CheckBatches {
    fn new() -> Self {
        Self {
            loads: Combiner::new(CHECK_BATCH_EXECUTORS, CHECK_BATCH_MAX),
            advances: Combiner::new(CHECK_BATCH_EXECUTORS, CHECK_BATCH_MAX),
        }
    }
}

/// Connect options from a settings URL.
///
/// # Errors
/// When the URL does not parse.
pub fn connect_options(settings: &DatabaseSettings) -> Result<PgConnectOptions, StoreError> {
    settings
        .url
        .expose_secret()
        .parse::<PgConnectOptions>()
        .map_err(StoreError::Database)
}

impl Store {
    /// Connects and runs the embedded migrations.
    ///
    /// # Errors
    /// When the database is unreachable or a migration fails.
    pub async fn connect(settings: &DatabaseSettings) -> Result<Self, StoreError> {
        let pool = PgPoolOptions::new()
            .max_connections(settings.max_connections)
            .acquire_timeout(Duration::from_millis(settings.acquire_timeout_ms))
            // sqlx already pings every connection as it goes back to the pool; a second ping on
            // acquire added one more round trip to every query (a third of the database work of
            // a progress check, see BENCHMARKS.md). A connection that died while idle fails its
            // query, which every caller already handles as a database error.
            .test_before_acquire(false)
            .connect_with(connect_options(settings)?)
            .await?;
        MIGRATOR.run(&pool).await?;
        Ok(Self::from_pool(pool))
    }

    /// Wraps an existing pool (migrations must have run).
    pub fn from_pool(pool: PgPool) -> Self {
        Self {
            pool,
            checks: Arc::new(CheckBatches::new()),
        }
    }

    /// The pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// True when a trivial query answers.
    pub async fn ping(&self) -> bool {
        sqlx::query("SELECT 1").execute(&self.pool).await.is_ok()
    }

    /// Starts a transaction.
    ///
    /// # Errors
    /// Database errors.
    pub async fn begin(&self) -> Result<Transaction<'static, Postgres>, StoreError> {
        Ok(self.pool.begin().await?)
    }

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

    /// Reads one task for a progress check: like [`Store::get`], but combined with the reads of
    /// concurrent checks into one `= ANY($1)` query.
    ///
    /// # Errors
    /// Database errors.
    pub async fn get_for_check(&self, request_id: &str) -> Result<Option<Task>, StoreError> {
        let pool = &self.pool;
        let answer = self
            .checks
            .loads
            .run(request_id.to_owned(), |ids| async move {
                metrics::histogram!("video_progress_db_batch_size", "statement" => "load")
                    .record(ids.len() as f64);
                let rows = sqlx::query_as::<_, Task>(
                    "SELECT * FROM video_tasks WHERE request_id = ANY($1)",
                )
                .bind(&ids)
                .fetch_all(pool)
                .await;
                match rows {
                    Ok(rows) => {
                        let by_id: HashMap<String, Task> = rows
                            .into_iter()
                            .map(|t| (t.request_id.clone(), t))
                            .collect();
                        ids.iter().map(|id| Ok(by_id.get(id).cloned())).collect()
                    }
                    Err(e) => ids.iter().map(|_| Err(e.to_string())).collect(),
                }
            })
            .await;
        batched(answer)
    }

    /// Inserts a task in `status` unless its request id exists.
    ///
    /// # Errors
    /// Database errors.
    pub async fn insert(
        tx: &mut Transaction<'_, Postgres>,
        task: &NewTask,
        status: TaskStatus,
    ) -> Result<Inserted, StoreError> {
        let done = sqlx::query(
            "INSERT INTO video_tasks (request_id, virtual_key_id, model, prompt, duration_seconds, size,
                 provider, callback_url, metadata, traceparent, status,
                 finished_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11,
                 CASE WHEN $11 IN ('pending', 'processing') THEN NULL ELSE now() END)
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
        .execute(&mut **tx)
        .await?;
        if done.rows_affected() == 1 {
            return Ok(Inserted::New);
        }
        let existing = sqlx::query_as::<_, Task>("SELECT * FROM video_tasks WHERE request_id = $1")
            .bind(&task.request_id)
            .fetch_one(&mut **tx)
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
        tx: &mut Transaction<'_, Postgres>,
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
        .fetch_optional(&mut **tx)
        .await?;
        Ok(row)
    }

    /// Writes a message to the outbox inside the caller's transaction.
    ///
    /// # Errors
    /// Database errors.
    pub async fn enqueue(
        tx: &mut Transaction<'_, Postgres>,
        envelope: &Envelope,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO outbox (message_id, exchange, routing_key, message_type, correlation_id,
                 virtual_key, traceparent, mandatory, body)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(&envelope.message_id)
        .bind(&envelope.exchange)
        .bind(&envelope.routing_key)
        .bind(&envelope.message_type)
        .bind(&envelope.correlation_id)
        .bind(&envelope.virtual_key)
        .bind(&envelope.traceparent)
        .bind(envelope.mandatory)
        .bind(&envelope.body)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    /// Locks up to `limit` unsent outbox rows, oldest first, skipping rows another relay holds.
    ///
    /// # Errors
    /// Database errors.
    pub async fn claim_outbox(
        tx: &mut Transaction<'_, Postgres>,
        limit: i64,
    ) -> Result<Vec<OutboxRow>, StoreError> {
        // Due rows, unless an earlier row of the same task waits after a failure.
        let rows = sqlx::query(
            "SELECT * FROM outbox o
             WHERE o.next_attempt_at <= now()
               AND NOT EXISTS (SELECT 1 FROM outbox w
                               WHERE w.correlation_id = o.correlation_id AND w.id < o.id
                                 AND w.next_attempt_at > now())
             ORDER BY o.id LIMIT $1 FOR UPDATE OF o SKIP LOCKED",
        )
        .bind(limit)
        .fetch_all(&mut **tx)
        .await?;
        rows.into_iter()
            .map(|r| {
                Ok(OutboxRow {
                    id: r.try_get("id")?,
                    attempts: r.try_get("attempts")?,
                    envelope: Envelope {
                        exchange: r.try_get("exchange")?,
                        routing_key: r.try_get("routing_key")?,
                        body: r.try_get("body")?,
                        message_id: r.try_get("message_id")?,
                        message_type: r.try_get("message_type")?,
                        correlation_id: r.try_get("correlation_id")?,
                        virtual_key: r.try_get("virtual_key")?,
                        traceparent: r.try_get("traceparent")?,
                        extra_headers: Vec::new(),
                        mandatory: r.try_get("mandatory")?,
                    },
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(StoreError::from)
    }

    /// Removes sent outbox rows.
    ///
    /// # Errors
    /// Database errors.
    pub async fn delete_outbox(
        tx: &mut Transaction<'_, Postgres>,
        ids: &[i64],
    ) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM outbox WHERE id = ANY($1)")
            .bind(ids)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }

    /// Puts a row that failed to publish back for `delay`, with the error.
    ///
    /// # Errors
    /// Database errors.
    pub async fn defer_outbox(
        tx: &mut Transaction<'_, Postgres>,
        id: i64,
        error: &str,
        delay: std::time::Duration,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE outbox SET attempts = attempts + 1, last_error = $2,
                 next_attempt_at = now() + make_interval(secs => $3)
             WHERE id = $1",
        )
        .bind(id)
        .bind(error)
        .bind(delay.as_secs_f64())
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    /// Moves an outbox row that can never be published into `parked_messages`, with the reason.
    ///
    /// # Errors
    /// Database errors.
    pub async fn park_outbox(
        tx: &mut Transaction<'_, Postgres>,
        row: &OutboxRow,
        reason: &str,
    ) -> Result<(), StoreError> {
        let e = &row.envelope;
        let headers = serde_json::json!({
            "type": e.message_type,
            "correlation_id": e.correlation_id,
            "x-virtual-key": e.virtual_key,
            "traceparent": e.traceparent,
        });
        sqlx::query(
            "INSERT INTO parked_messages
                 (message_id, original_queue, original_exchange, routing_key, reason, headers, body)
             VALUES ($1, 'outbox', $2, $3, $4, $5, $6)",
        )
        .bind(&e.message_id)
        .bind(&e.exchange)
        .bind(&e.routing_key)
        .bind(reason)
        .bind(headers)
        .bind(&e.body)
        .execute(&mut **tx)
        .await?;
        sqlx::query("DELETE FROM outbox WHERE id = $1")
            .bind(row.id)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }

    /// Age of the oldest row in the outbox, in seconds (0 when empty).
    ///
    /// # Errors
    /// Database errors.
    pub async fn outbox_oldest_age_seconds(&self) -> Result<f64, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT COALESCE(EXTRACT(EPOCH FROM now() - min(created_at))::float8, 0) FROM outbox",
        )
        .fetch_one(&self.pool)
        .await?)
    }

    /// Rows waiting in the outbox.
    ///
    /// # Errors
    /// Database errors.
    pub async fn outbox_len(&self) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar("SELECT count(*) FROM outbox")
            .fetch_one(&self.pool)
            .await?)
    }

    /// Advances the check chain: succeeds for exactly one check whose `sequence` is not below the
    /// row's, while the task is processing and tracked. Progress only moves forward.
    /// Returns false when another check won, or the task stopped meanwhile.
    ///
    /// # Errors
    /// Database errors.
    pub async fn advance_check(
        &self,
        request_id: &str,
        advance: &CheckAdvance,
    ) -> Result<bool, StoreError> {
        let pool = &self.pool;
        let answer = self
            .checks
            .advances
            .run((request_id.to_owned(), advance.clone()), |ops| async move {
                advance_checks(pool, ops).await
            })
            .await;
        batched(answer)
    }

    /// Processing tasks whose next check is overdue by more than `grace`: each gets its sequence
    /// bumped (so any late check of the old chain is stale) and its next check pushed to
    /// `now + next_in`. Returns the tasks with their new `check_sequence`. `FOR UPDATE SKIP
    /// LOCKED` makes sure one sweeper re-arms a given task.
    ///
    /// # Errors
    /// Database errors.
    pub async fn rearm_overdue(
        &self,
        grace: Duration,
        next_in: Duration,
        limit: i64,
    ) -> Result<Vec<Task>, StoreError> {
        let rows = sqlx::query_as::<_, Task>(
            "WITH due AS (
                 SELECT request_id FROM video_tasks
                 WHERE status = 'processing' AND NOT tracking_stopped
                   AND COALESCE(next_check_at, started_at, created_at) < now() - make_interval(secs => $1)
                 ORDER BY next_check_at
                 LIMIT $3
                 FOR UPDATE SKIP LOCKED)
             UPDATE video_tasks t SET
                 check_sequence = t.check_sequence + 1,
                 next_check_at = now() + make_interval(secs => $2),
                 updated_at = now()
             FROM due WHERE t.request_id = due.request_id
             RETURNING t.*",
        )
        .bind(grace.as_secs_f64())
        .bind(next_in.as_secs_f64())
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }

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
}

/// A combined statement's answer as a store result (`None`: the caller running the batch was
/// cancelled before it answered).
fn batched<T>(answer: Option<Result<T, String>>) -> Result<T, StoreError> {
    answer
        .unwrap_or_else(|| Err("the batch was cancelled".to_owned()))
        .map_err(StoreError::Batch)
}

/// Advances many check chains in one statement per round; a request id that appears twice
/// (never in one process, whose checks of a task are serial, but cheap to allow) goes in a later
/// round, so each operation is answered for its own row. One answer per operation, in order.
async fn advance_checks(
    pool: &PgPool,
    ops: Vec<(String, CheckAdvance)>,
) -> Vec<Result<bool, String>> {
    let mut answers: Vec<Option<Result<bool, String>>> = vec![None; ops.len()];
    let mut left: Vec<usize> = (0..ops.len()).collect();
    metrics::histogram!("video_progress_db_batch_size", "statement" => "advance")
        .record(ops.len() as f64);
    while !left.is_empty() {
        let mut seen = HashSet::new();
        let (round, later): (Vec<usize>, Vec<usize>) =
            left.iter().partition(|&&i| seen.insert(ops[i].0.as_str()));
        let ids: Vec<&str> = round.iter().map(|&i| ops[i].0.as_str()).collect();
        let sequences: Vec<i64> = round.iter().map(|&i| ops[i].1.sequence).collect();
        let next: Vec<Option<DateTime<Utc>>> =
            round.iter().map(|&i| ops[i].1.next_check_at).collect();
        let progress: Vec<Option<i16>> = round.iter().map(|&i| ops[i].1.progress).collect();
        let statuses: Vec<Option<&str>> = round
            .iter()
            .map(|&i| ops[i].1.progress_status.as_deref())
            .collect();
        let advanced = sqlx::query_scalar::<_, String>(
            "UPDATE video_tasks t SET
                 check_sequence = u.sequence + 1,
                 checks_count = t.checks_count + 1,
                 last_check_at = now(),
                 next_check_at = u.next_check_at,
                 progress = GREATEST(t.progress, COALESCE(u.progress, t.progress)),
                 progress_status = COALESCE(u.progress_status, t.progress_status),
                 updated_at = now()
             FROM unnest($1::text[], $2::int8[], $3::timestamptz[], $4::int2[], $5::text[])
                  AS u(request_id, sequence, next_check_at, progress, progress_status)
             WHERE t.request_id = u.request_id AND t.check_sequence <= u.sequence
               AND t.status = 'processing' AND NOT t.tracking_stopped
             RETURNING t.request_id",
        )
        .bind(&ids)
        .bind(&sequences)
        .bind(&next)
        .bind(&progress)
        .bind(&statuses)
        .fetch_all(pool)
        .await;
        match advanced {
            Ok(rows) => {
                let rows: HashSet<String> = rows.into_iter().collect();
                for &i in &round {
                    answers[i] = Some(Ok(rows.contains(&ops[i].0)));
                }
            }
            Err(e) => {
                for &i in &round {
                    answers[i] = Some(Err(e.to_string()));
                }
            }
        }
        left = later;
    }
    answers
        .into_iter()
        .map(|a| a.unwrap_or_else(|| Err("not run".to_owned())))
        .collect()
}

/// The public view of a task (`status --json`, `GET /v1/tasks/{requestId}`).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskView {
    #[allow(missing_docs)]
    pub request_id: String,
    #[allow(missing_docs)]
    pub virtual_key_id: String,
    #[allow(missing_docs)]
    pub status: TaskStatus,
    #[allow(missing_docs)]
    pub progress: i16,
    #[allow(missing_docs)]
    pub video_url: Option<String>,
    #[allow(missing_docs)]
    pub video_url_expires_at: Option<DateTime<Utc>>,
    #[allow(missing_docs)]
    pub error: Option<String>,
    #[allow(missing_docs)]
    pub retryable: Option<bool>,
    #[allow(missing_docs)]
    pub model: String,
    #[allow(missing_docs)]
    pub provider: String,
    #[allow(missing_docs)]
    pub provider_task_id: Option<String>,
    #[allow(missing_docs)]
    pub message: Option<String>,
    #[allow(missing_docs)]
    pub created_at: DateTime<Utc>,
    #[allow(missing_docs)]
    pub started_at: Option<DateTime<Utc>>,
    #[allow(missing_docs)]
    pub finished_at: Option<DateTime<Utc>>,
    /// Progress checks that ran.
    pub checks: i64,
}

impl From<&Task> for TaskView {
    fn from(t: &Task) -> Self {
        Self {
            request_id: t.request_id.clone(),
            virtual_key_id: t.virtual_key_id.clone(),
            status: t.status,
            progress: t.progress,
            video_url: t.video_url.clone(),
            video_url_expires_at: t.video_url_expires_at,
            error: t.error.clone(),
            retryable: t.retryable,
            model: t.model.clone(),
            provider: t.provider.clone(),
            provider_task_id: t.provider_task_id.clone(),
            message: t.message.clone(),
            created_at: t.created_at,
            started_at: t.started_at,
            finished_at: t.finished_at,
            checks: t.checks_count,
        }
    }
}

/// A parked message as recorded in `parked_messages`.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ParkedMessage {
    /// Row id (`parked --requeue ID`).
    pub id: i64,
    #[allow(missing_docs)]
    pub message_id: Option<String>,
    /// The queue it was consumed from.
    pub original_queue: String,
    /// The exchange it was published to (empty: the default exchange).
    pub original_exchange: String,
    #[allow(missing_docs)]
    pub routing_key: String,
    #[allow(missing_docs)]
    pub reason: String,
    /// Its AMQP properties and headers.
    pub headers: serde_json::Value,
    /// The body, as it arrived.
    #[serde(skip)]
    pub body: Vec<u8>,
    #[allow(missing_docs)]
    pub parked_at: DateTime<Utc>,
    #[allow(missing_docs)]
    pub requeued_at: Option<DateTime<Utc>>,
}

impl<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> for ParkedMessage {
    fn from_row(r: &'r sqlx::postgres::PgRow) -> Result<Self, sqlx::Error> {
        Ok(Self {
            id: r.try_get("id")?,
            message_id: r.try_get("message_id")?,
            original_queue: r.try_get("original_queue")?,
            original_exchange: r.try_get("original_exchange")?,
            routing_key: r.try_get("routing_key")?,
            reason: r.try_get("reason")?,
            headers: r.try_get("headers")?,
            body: r.try_get("body")?,
            parked_at: r.try_get("parked_at")?,
            requeued_at: r.try_get("requeued_at")?,
        })
    }
}

impl Store {
    /// Records a parked message; returns its id.
    ///
    /// # Errors
    /// Database errors.
    pub async fn record_parked(&self, parked: &ParkedMessage) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar(
            "INSERT INTO parked_messages (message_id, original_queue, original_exchange, routing_key, reason, headers, body)
             VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
        )
        .bind(&parked.message_id)
        .bind(&parked.original_queue)
        .bind(&parked.original_exchange)
        .bind(&parked.routing_key)
        .bind(&parked.reason)
        .bind(&parked.headers)
        .bind(&parked.body)
        .fetch_one(&self.pool)
        .await?)
    }

    /// The most recent parked messages, newest first.
    ///
    /// # Errors
    /// Database errors.
    pub async fn list_parked(&self, limit: i64) -> Result<Vec<ParkedMessage>, StoreError> {
        Ok(sqlx::query_as::<_, ParkedMessage>(
            "SELECT * FROM parked_messages ORDER BY id DESC LIMIT $1",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }

    /// One parked message.
    ///
    /// # Errors
    /// Database errors.
    pub async fn get_parked(&self, id: i64) -> Result<Option<ParkedMessage>, StoreError> {
        Ok(
            sqlx::query_as::<_, ParkedMessage>("SELECT * FROM parked_messages WHERE id = $1")
                .bind(id)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    /// Marks a parked message as requeued.
    ///
    /// # Errors
    /// Database errors.
    pub async fn mark_requeued(&self, id: i64) -> Result<(), StoreError> {
        sqlx::query("UPDATE parked_messages SET requeued_at = now() WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}
