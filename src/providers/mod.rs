//! Video providers: the external systems that actually render videos.
//!
//! A [`VideoProvider`] submits a job, reports its status and (where the protocol allows) cancels it.
//! Two adapters speak real HTTP protocols, one file each:
//!
//! Each adapter speaks one real HTTP protocol, one file each (the `kind` in the configuration):
//!
//! - [`openai_videos`]: OpenAI-compatible Videos gateways (`/v1/videos`; OpenAI itself shut the
//!   Videos API down on 2026-09-24, gateways still serve the shape);
//! - [`replicate`]: Replicate's predictions API (`/v1/predictions`);
//! - [`fal`]: fal.ai's queue API, in front of many hosted models;
//! - [`vertex_veo`]: Google Veo on Vertex AI; [`gemini`]: Veo on the Gemini API;
//! - [`runway`]: Runway's tasks API;
//! - [`kling`], [`seedance`], [`dashscope`] (Alibaba Wan), [`minimax`], [`luma`].
//!
//! [`sim`] is a simulated provider server speaking every protocol, a test double of the external
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

pub mod dashscope;
pub mod fal;
pub mod gemini;
mod google_operation;
pub mod kling;
pub mod luma;
pub mod minimax;
pub mod openai_videos;
mod registry;
pub mod replicate;
pub mod runway;
pub mod seedance;
mod settings;
pub mod sim;
mod transport;
pub mod vertex_veo;

use std::fmt;
use std::time::Duration;

pub use registry::{ProviderKind, Providers};
pub use settings::{ModelRoute, ProviderConfigError, ProviderSettings, RoutingSettings};

/// What to generate.
#[derive(Debug, Clone)]
pub struct SubmitRequest {
    /// Our request id (for logs; most protocols have no place for it).
    pub request_id: String,
    /// This attempt's id (a UUID), recorded on the task before the request is sent: protocols
    /// with a client-set id send it (Kling's `external_task_id`), so that an attempt whose answer
    /// was lost can be found again ([`VideoProvider::find_submitted`]).
    pub attempt_id: String,
    /// Model name as the provider knows it.
    pub model: String,
    /// Sent to the provider unchanged; the simulator reads steering tags such as `[fail]` in it.
    pub prompt: String,
    /// Clip length, when the caller asked for one.
    pub duration_seconds: Option<u32>,
    /// Resolution such as `1280x720`, when the caller asked for one.
    pub size: Option<String>,
    /// The first frame for image-to-video (`imageUrl`: an https URL or a data URI); only sent
    /// to kinds whose [`VideoProvider::takes_image`] is true.
    pub image_url: Option<String>,
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

/// What a provider knows of a submit attempt whose answer we never read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubmitLookup {
    /// The attempt created this job.
    Found(ProviderTask),
    /// The provider proves the attempt created no job: submitting again is safe.
    Absent,
    /// The protocol cannot tell (no client-set id, no listing to match on):
    /// `generation.ambiguous_submit` decides.
    Unknowable,
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
    /// Not sent: this instance is at the provider's `max_status_rps`; ask again after
    /// `retry_after`. Not the provider's error, so not counted as one.
    #[error("provider call not sent: {message}")]
    Throttled {
        /// Which cap, for logs.
        message: String,
        /// When a call will be allowed.
        retry_after: Duration,
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
        matches!(self, Self::Transient { .. } | Self::Throttled { .. })
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
            Self::Throttled { retry_after, .. } => Some(*retry_after),
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
            Self::Throttled {
                message,
                retry_after,
            } => Self::Throttled {
                message: format!("{prefix}: {message}"),
                retry_after,
            },
            Self::Permanent { message } => Self::Permanent {
                message: format!("{prefix}: {message}"),
            },
        }
    }

    /// The message, without the kind prefix.
    #[must_use]
    pub fn message(&self) -> &str {
        match self {
            Self::Transient { message, .. }
            | Self::Throttled { message, .. }
            | Self::Permanent { message } => message,
        }
    }

    fn kind_label(&self) -> &'static str {
        match self {
            Self::Transient { .. } => "transient",
            Self::Throttled { .. } => "throttled",
            Self::Permanent { .. } => "permanent",
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

    /// Whether this protocol takes an input image (`SubmitRequest::image_url`); a request with
    /// one for a provider that does not is refused before anything is sent.
    fn takes_image(&self) -> bool {
        false
    }

    /// Asks whether the attempt `request.attempt_id`, sent at `attempted_at` and never answered,
    /// created a job. The default, for protocols with neither a client-set id nor a listing to
    /// match on, is [`SubmitLookup::Unknowable`].
    ///
    /// # Errors
    /// As for [`VideoProvider::submit`]; the caller then treats the attempt as unknowable.
    async fn find_submitted(
        &self,
        request: &SubmitRequest,
        attempted_at: chrono::DateTime<chrono::Utc>,
    ) -> Result<SubmitLookup, ProviderError> {
        let _ = (request, attempted_at);
        Ok(SubmitLookup::Unknowable)
    }
}
