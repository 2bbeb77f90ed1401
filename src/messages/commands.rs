//! What the `video.generation` queue takes: requests and cancels from other services, and the
//! tracker's word that a provider's job ended.

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{decode, DecodeError, Message, Meta};

message! {
    /// Another service asks for a video.
    VideoGenerationRequested = "video.generation.requested" {
        /// Caller-chosen id of the task; a second request with the same id is a duplicate.
        request_id,
        /// The tenant.
        virtual_key_id,
        /// Model name, routed to a provider by `routing.models`.
        pub model: String,
        /// What to generate.
        pub prompt: String,
        /// Clip length in seconds.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub duration_seconds: Option<u32>,
        /// `WIDTHxHEIGHT`, e.g. `1280x720`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub size: Option<String>,
        /// Force a configured provider instead of the model's route.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub provider: Option<String>,
        /// Where to POST terminal events (signed).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub callback_url: Option<String>,
        /// The first frame, for image-to-video: an `https://` URL or a `data:image/…;base64,`
        /// URI. Only kinds that take an image accept it (`runway`, `kling`, `fal`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub image_url: Option<String>,
        /// Opaque data passed to the provider.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub metadata: Option<serde_json::Value>,
    }
}

message! {
    /// Another service asks to cancel a task.
    VideoGenerationCancelRequested = "video.generation.cancel_requested" {
        /// Task to cancel.
        request_id,
        /// Must match the task's tenant.
        virtual_key_id,
        /// Why the caller cancels; the `VideoGenerationCancelled` event repeats it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub reason: Option<String>,
    }
}

message! {
    /// The tracker saw the provider finish (or the task time out).
    VideoProviderTaskFinished = "video.provider.task_finished" {
        request_id,
        virtual_key_id,
        #[allow(missing_docs)]
        pub outcome: TaskOutcome,
        /// The provider's id for the job the outcome is about. The tracker always sets it; the
        /// generation orchestrator refuses an outcome whose id differs from the task's.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub provider_task_id: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[allow(missing_docs)]
        pub video_url: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[allow(missing_docs)]
        pub video_url_expires_at: Option<DateTime<Utc>>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[allow(missing_docs)]
        pub video_seconds: Option<f64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[allow(missing_docs)]
        pub error: Option<String>,
    }
}

/// How the provider's job ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum TaskOutcome {
    #[allow(missing_docs)]
    Succeeded,
    #[allow(missing_docs)]
    Failed,
    #[allow(missing_docs)]
    Cancelled,
    /// Past `tracking.max_duration_ms`.
    TimedOut,
}

/// What arrives on the `video.generation` queue.
#[derive(Debug, Clone, PartialEq)]
pub enum GenerationCommand {
    /// A new task.
    Requested(VideoGenerationRequested),
    /// Cancel a task.
    CancelRequested(VideoGenerationCancelRequested),
    /// The tracker saw the provider finish.
    ProviderTaskFinished(VideoProviderTaskFinished),
}

impl GenerationCommand {
    /// Decodes by the AMQP `type` property, falling back to the routing key.
    ///
    /// # Errors
    /// [`DecodeError`] for unknown types or bad bodies.
    pub fn decode(
        message_type: Option<&str>,
        routing_key: &str,
        body: &[u8],
    ) -> Result<Self, DecodeError> {
        let kind = match message_type {
            Some(t) if !t.is_empty() => t,
            _ => routing_key,
        };
        match kind {
            VideoGenerationRequested::NAME | VideoGenerationRequested::ROUTING_KEY => {
                decode(body).map(Self::Requested)
            }
            VideoGenerationCancelRequested::NAME | VideoGenerationCancelRequested::ROUTING_KEY => {
                decode(body).map(Self::CancelRequested)
            }
            VideoProviderTaskFinished::NAME | VideoProviderTaskFinished::ROUTING_KEY => {
                decode(body).map(Self::ProviderTaskFinished)
            }
            other => Err(DecodeError::UnknownType(other.to_owned())),
        }
    }

    /// The AMQP `type` of the command, e.g. `VideoGenerationRequested`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Requested(_) => VideoGenerationRequested::NAME,
            Self::CancelRequested(_) => VideoGenerationCancelRequested::NAME,
            Self::ProviderTaskFinished(_) => VideoProviderTaskFinished::NAME,
        }
    }

    /// Its `messageId`, `occurredAt` and `version`.
    pub fn meta(&self) -> &Meta {
        match self {
            Self::Requested(m) => m.meta(),
            Self::CancelRequested(m) => m.meta(),
            Self::ProviderTaskFinished(m) => m.meta(),
        }
    }

    /// The task the command is about.
    pub fn request_id(&self) -> &str {
        match self {
            Self::Requested(m) => m.request_id(),
            Self::CancelRequested(m) => m.request_id(),
            Self::ProviderTaskFinished(m) => m.request_id(),
        }
    }

    /// The tenant that sent it.
    pub fn virtual_key_id(&self) -> &str {
        match self {
            Self::Requested(m) => m.virtual_key_id(),
            Self::CancelRequested(m) => m.virtual_key_id(),
            Self::ProviderTaskFinished(m) => m.virtual_key_id(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_dispatch_on_type_then_routing_key() {
        let body = serde_json::to_vec(&crate::messages::request_json()).unwrap();
        let by_type =
            GenerationCommand::decode(Some("VideoGenerationRequested"), "x", &body).unwrap();
        let by_key = GenerationCommand::decode(None, "video.generation.requested", &body).unwrap();
        assert_eq!(by_type, by_key);
        let err = GenerationCommand::decode(Some("Nope"), "x", &body).unwrap_err();
        assert_eq!(err, DecodeError::UnknownType("Nope".into()));
    }
}
