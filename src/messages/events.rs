//! What observers get on `video.events`: a task's lifecycle, and the refusals of commands.

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

message! {
    /// The provider accepted the task.
    VideoGenerationStarted = "video.generation.started" {
        request_id,
        virtual_key_id,
        /// Configured provider name.
        pub provider: String,
        /// The provider's id for the job.
        pub provider_task_id: String,
        /// When the provider accepted it.
        pub started_at: DateTime<Utc>,
    }
}

message! {
    /// Progress of a running task; never goes backwards.
    VideoGenerationProgress = "video.generation.progress" {
        request_id,
        virtual_key_id,
        /// 0–100.
        pub progress: u8,
        /// `queued` or `in_progress`.
        pub status: ProgressStatus,
        /// Human-readable note.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub message: Option<String>,
        /// When the task is expected to finish.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub estimated_completion_at: Option<DateTime<Utc>>,
    }
}

/// Status reported in [`VideoGenerationProgress`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ProgressStatus {
    /// Waiting at the provider.
    Queued,
    /// Rendering.
    InProgress,
}

impl ProgressStatus {
    /// The wire name, also what the task row's `progress_status` holds.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::InProgress => "in_progress",
        }
    }
}

message! {
    /// The video is ready.
    VideoGenerationCompleted = "video.generation.completed" {
        request_id,
        virtual_key_id,
        /// Where the video is.
        pub video_url: String,
        /// When that URL stops working, if the provider says.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub video_url_expires_at: Option<DateTime<Utc>>,
        /// Length of the clip.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub video_seconds: Option<f64>,
        /// Processing time from start to completion.
        pub duration_ms: u64,
        #[allow(missing_docs)]
        pub completed_at: DateTime<Utc>,
    }
}

message! {
    /// The task failed (or timed out).
    VideoGenerationFailed = "video.generation.failed" {
        request_id,
        virtual_key_id,
        /// What went wrong.
        pub error: String,
        /// Whether sending the same request again may succeed.
        pub retryable: bool,
        #[allow(missing_docs)]
        pub failed_at: DateTime<Utc>,
    }
}

message! {
    /// The task was cancelled.
    VideoGenerationCancelled = "video.generation.cancelled" {
        request_id,
        virtual_key_id,
        #[allow(missing_docs)]
        pub reason: String,
        #[allow(missing_docs)]
        pub cancelled_at: DateTime<Utc>,
    }
}

message! {
    /// Tracking of a task has ended (for observers; the task row stops the tracker).
    VideoProgressTrackingCancelled = "video.progress.tracking_cancelled" {
        request_id,
        virtual_key_id,
        #[allow(missing_docs)]
        pub reason: String,
    }
}

message! {
    /// A request or cancel was refused.
    VideoGenerationCommandRejected = "video.generation.command_rejected" {
        request_id,
        virtual_key_id,
        /// The refused message's name, e.g. `VideoGenerationCancelRequested`.
        pub command: String,
        #[allow(missing_docs)]
        pub reason: String,
    }
}
