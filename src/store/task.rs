//! The task row and the values written to it.

use chrono::{DateTime, Utc};
use sqlx::Row;

use super::StoreError;

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
    /// Every terminal status: the `status` label values of `video_generation_terminal_total`.
    pub const TERMINAL: [TaskStatus; 4] = [
        Self::Completed,
        Self::Failed,
        Self::Cancelled,
        Self::TimedOut,
    ];

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
    /// The input image of an image-to-video request.
    pub image_url: Option<String>,
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
    /// Left by a cancel that arrived before its request: refuses that tenant's request later,
    /// and gives way to another tenant's.
    pub tombstone: bool,
    /// The submit in flight or last left unfinished: set before each POST to the provider,
    /// cleared when the provider answered without creating a job. Set with no
    /// `provider_task_id` after a crash, the attempt's outcome is unknown.
    pub submit_attempt_id: Option<String>,
    /// When `submit_attempt_id` was recorded, i.e. just before its POST.
    pub submit_attempted_at: Option<DateTime<Utc>>,
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
            image_url: row.try_get("image_url")?,
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
            tombstone: row.try_get("tombstone")?,
            submit_attempt_id: row.try_get("submit_attempt_id")?,
            submit_attempted_at: row.try_get("submit_attempted_at")?,
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
    /// The input image of an image-to-video request.
    pub image_url: Option<String>,
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

/// Result of an insert.
#[derive(Debug, Clone, PartialEq)]
pub enum Inserted {
    /// A new row.
    New,
    /// The request id exists; here is the row.
    Exists(Box<Task>),
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
