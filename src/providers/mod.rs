//! Video providers: the external systems that actually render videos.
//!
//! A [`VideoProvider`] submits a job, reports its status and (where the protocol allows) cancels it.
//! Two adapters speak real HTTP protocols, one file each:
//!
//! - [`openai_videos`]: the OpenAI-compatible Videos API (`/v1/videos`), served by many gateways;
//! - [`replicate`]: Replicate's predictions API (`/v1/predictions`).
//!
//! [`sim`] is a simulated provider server speaking both protocols, a test double of the external
//! system used by the tests, the demo and the benchmarks.
//!
//! Errors are split the way callers branch: [`ProviderError::Transient`] (connection failure,
//! timeout, 429, 5xx — worth retrying, honouring `Retry-After`) versus [`ProviderError::Permanent`]
//! (any other 4xx, a body we cannot understand — retrying would only repeat the failure).
//!
//! ## Layout
//! - this file: the trait and the types it speaks in;
//! - `settings`: the `providers` and `routing` configuration sections and their checks;
//! - `registry`: every adapter by its [`ProviderKind`], and [`Providers`], the configured set
//!   with the model → provider routing;
//! - `transport`: the HTTP client, limits, error classification and metrics both adapters share.
//!
//! Adding a provider is an adapter file here, a protocol file under `sim/`, and one line in the
//! registry.
//!
//! This module knows HTTP and the providers' protocols, nothing of the broker, the store, the
//! orchestrators or the configuration loader.

pub mod openai_videos;
mod registry;
pub mod replicate;
mod settings;
pub mod sim;
mod transport;

use std::fmt;
use std::time::Duration;

pub use registry::{ProviderKind, Providers};
pub use settings::{ModelRoute, ProviderConfigError, ProviderSettings, RoutingSettings};

/// What to generate.
#[derive(Debug, Clone)]
pub struct SubmitRequest {
    /// Our request id (for logs; the protocols have no place for it).
    pub request_id: String,
    /// Model name as the provider knows it.
    pub model: String,
    /// Sent to the provider unchanged; the simulator reads steering tags such as `[fail]` in it.
    pub prompt: String,
    /// Clip length, when the caller asked for one.
    pub duration_seconds: Option<u32>,
    /// Resolution such as `1280x720`, when the caller asked for one.
    pub size: Option<String>,
    /// Caller metadata; not sent (neither protocol has a field for it).
    pub metadata: Option<serde_json::Value>,
    /// W3C trace context, sent as the `traceparent` header.
    pub traceparent: Option<String>,
}

/// The provider's handle on a submitted job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderTask {
    /// The provider's job id.
    pub id: String,
}

/// A provider job's state, common to all protocols.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderState {
    /// Accepted, not running yet.
    Queued,
    /// Rendering; progress may be reported.
    InProgress,
    /// Finished with a video.
    Succeeded,
    /// Finished without a video.
    Failed,
    /// Cancelled at the provider.
    Cancelled,
}

impl ProviderState {
    /// Whether the job will not change any more.
    #[must_use]
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }
}

/// One status observation of a provider job.
#[derive(Debug, Clone, PartialEq)]
pub struct ProviderStatus {
    /// The job's state in the protocol-independent terms callers branch on.
    pub state: ProviderState,
    /// Percentage 0–100 when the provider reports one (`None` means unknown, not zero).
    pub progress: Option<u8>,
    /// The finished video, on success.
    pub video_url: Option<String>,
    /// When `video_url` stops working, when known.
    pub video_url_expires_at: Option<chrono::DateTime<chrono::Utc>>,
    /// Length of the clip in seconds, when known.
    pub video_seconds: Option<f64>,
    /// The provider's error text, on failure.
    pub error: Option<String>,
}

/// What a cancel achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelOutcome {
    /// The provider accepted the cancel (or deleted the job). A job that had already finished
    /// keeps its final state; ask [`VideoProvider::status`] to know.
    Cancelled,
    /// The provider cannot cancel; the caller should simply stop tracking the job.
    Unsupported,
}

/// Why a provider call failed, split the way callers branch.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// Worth retrying: connection failure, timeout, 429, 5xx.
    #[error("transient provider error: {message}")]
    Transient {
        /// What happened, for logs.
        message: String,
        /// The provider's `Retry-After`, when it sent one.
        retry_after: Option<Duration>,
        /// The request may have reached the provider and been acted on, with no answer back
        /// (a timeout or a reset after sending): a submit may have created a job.
        unanswered: bool,
    },
    /// Retrying would repeat the failure: other 4xx, a body we cannot understand.
    #[error("permanent provider error: {message}")]
    Permanent {
        /// What happened, for logs.
        message: String,
    },
}

impl ProviderError {
    /// Whether a retry may succeed.
    #[must_use]
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Transient { .. })
    }

    /// Whether the provider may have acted on the request although we got no answer: a
    /// submit that fails this way may have created a job, so it is not simply sent again.
    #[must_use]
    pub fn unanswered(&self) -> bool {
        matches!(
            self,
            Self::Transient {
                unanswered: true,
                ..
            }
        )
    }

    /// How long the provider asked us to wait, when it said.
    #[must_use]
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Transient { retry_after, .. } => *retry_after,
            Self::Permanent { .. } => None,
        }
    }

    pub(crate) fn permanent(message: impl Into<String>) -> Self {
        Self::Permanent {
            message: message.into(),
        }
    }

    /// The same error with `prefix: ` before its message (e.g. the provider name).
    pub(crate) fn context(self, prefix: &str) -> Self {
        match self {
            Self::Transient {
                message,
                retry_after,
                unanswered,
            } => Self::Transient {
                message: format!("{prefix}: {message}"),
                retry_after,
                unanswered,
            },
            Self::Permanent { message } => Self::Permanent {
                message: format!("{prefix}: {message}"),
            },
        }
    }

    fn kind_label(&self) -> &'static str {
        if self.is_transient() {
            "transient"
        } else {
            "permanent"
        }
    }
}

/// An external video generation service.
#[async_trait::async_trait]
pub trait VideoProvider: Send + Sync + fmt::Debug {
    /// The configuration name, e.g. `"sim"`.
    fn name(&self) -> &str;

    /// Starts a job.
    ///
    /// # Errors
    /// [`ProviderError::Transient`] when a retry may succeed, [`ProviderError::Permanent`] when
    /// the provider refused the request or answered something we cannot read.
    async fn submit(&self, request: &SubmitRequest) -> Result<ProviderTask, ProviderError>;

    /// Asks where a job is.
    ///
    /// # Errors
    /// As for [`VideoProvider::submit`]; an unknown job is permanent.
    async fn status(
        &self,
        task: &ProviderTask,
        traceparent: Option<&str>,
    ) -> Result<ProviderStatus, ProviderError>;

    /// Cancels a job, where the protocol allows.
    ///
    /// # Errors
    /// As for [`VideoProvider::submit`].
    async fn cancel(&self, task: &ProviderTask) -> Result<CancelOutcome, ProviderError>;
}
