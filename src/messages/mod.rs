//! The message contract (DESIGN §2): pure data, no I/O.
//!
//! Every body is camelCase JSON with `messageId`, `occurredAt` and `version`. Unknown fields are
//! ignored; a missing required field, a wrong type, an unknown version or a body that is not JSON
//! is a [`DecodeError`], which the consumer parks.
//!
//! Layout: `commands` (what the `video.generation` queue takes), `events` (what observers get on
//! `video.events`), `checks` (the tracker's self-scheduled check), `envelope` (a message with its
//! AMQP properties), `codec` (JSON bodies, [`DecodeError`]), `limits` (what AMQP and PostgreSQL
//! can hold).

use chrono::{DateTime, SecondsFormat, Utc};
use schemars::JsonSchema;
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use uuid::Uuid;

/// The only body version this build understands.
pub const CURRENT_VERSION: u32 = 1;

/// Fields every message carries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Meta {
    /// Given when the message is created and kept across re-sends, so consumers can de-duplicate.
    pub message_id: Uuid,
    /// When the message was created (RFC 3339 UTC).
    pub occurred_at: DateTime<Utc>,
    /// Body version; this build understands [`CURRENT_VERSION`].
    pub version: u32,
}

impl Meta {
    /// A new message id, now, the current version.
    pub fn new() -> Self {
        Self {
            message_id: Uuid::new_v4(),
            occurred_at: now(),
            version: CURRENT_VERSION,
        }
    }
}

impl Default for Meta {
    fn default() -> Self {
        Self::new()
    }
}

/// Current time truncated to milliseconds, so it survives a JSON round trip unchanged.
pub fn now() -> DateTime<Utc> {
    let t = Utc::now();
    DateTime::from_timestamp_millis(t.timestamp_millis()).unwrap_or(t)
}

/// Formats a timestamp as the contract writes them.
pub fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// A message of the contract.
pub trait Message: Serialize + DeserializeOwned + JsonSchema + Send + Sync + 'static {
    /// The AMQP `type` property, e.g. `VideoGenerationRequested`.
    const NAME: &'static str;
    /// Routing key on `video.events`.
    const ROUTING_KEY: &'static str;
    /// The `messageId`, `occurredAt` and `version` of the body.
    fn meta(&self) -> &Meta;
    /// The task this message is about.
    fn request_id(&self) -> &str;
    /// The tenant (virtual key) the task belongs to.
    fn virtual_key_id(&self) -> &str;
}

/// Declares a message of the contract: a camelCase struct that starts with the fields every
/// message has (the flattened [`Meta`], `requestId`, `virtualKeyId`, each with the doc written
/// before its name, if any), then its own fields; and its [`Message`] impl, named after the
/// struct and routed by `$routing_key`.
macro_rules! message {
    (
        $(#[$attr:meta])*
        $ty:ident = $routing_key:literal {
            $(#[$request_id_attr:meta])* request_id,
            $(#[$virtual_key_id_attr:meta])* virtual_key_id,
            $($fields:tt)*
        }
    ) => {
        $(#[$attr])*
        #[derive(
            Debug,
            Clone,
            PartialEq,
            ::serde::Serialize,
            ::serde::Deserialize,
            ::schemars::JsonSchema,
        )]
        #[serde(rename_all = "camelCase")]
        pub struct $ty {
            #[serde(flatten)]
            #[allow(missing_docs)]
            pub meta: $crate::messages::Meta,
            $(#[$request_id_attr])*
            #[allow(missing_docs)]
            pub request_id: String,
            $(#[$virtual_key_id_attr])*
            #[allow(missing_docs)]
            pub virtual_key_id: String,
            $($fields)*
        }

        impl $crate::messages::Message for $ty {
            const NAME: &'static str = stringify!($ty);
            const ROUTING_KEY: &'static str = $routing_key;
            fn meta(&self) -> &$crate::messages::Meta {
                &self.meta
            }
            fn request_id(&self) -> &str {
                &self.request_id
            }
            fn virtual_key_id(&self) -> &str {
                &self.virtual_key_id
            }
        }
    };
}

mod checks;
mod codec;
mod commands;
mod envelope;
mod events;
mod limits;

pub use checks::VideoProgressCheckRequested;
pub use codec::{decode, encode, DecodeError};
pub use commands::{
    GenerationCommand, TaskOutcome, VideoGenerationCancelRequested, VideoGenerationRequested,
    VideoProviderTaskFinished,
};
pub use envelope::{record_headers, Envelope};
pub use events::{
    ProgressStatus, VideoGenerationCancelled, VideoGenerationCommandRejected,
    VideoGenerationCompleted, VideoGenerationFailed, VideoGenerationProgress,
    VideoGenerationStarted, VideoProgressTrackingCancelled,
};
pub use limits::{truncate, MAX_BODY_BYTES, MAX_ID_BYTES, MAX_SHORT_STRING};

/// `(name, routing key, JSON Schema)` of every message, for the `schema` command.
pub fn schemas() -> Vec<(&'static str, &'static str, serde_json::Value)> {
    fn one<M: Message>() -> (&'static str, &'static str, serde_json::Value) {
        let schema = schemars::schema_for!(M);
        (
            M::NAME,
            M::ROUTING_KEY,
            serde_json::to_value(schema).unwrap_or_default(),
        )
    }
    vec![
        one::<VideoGenerationRequested>(),
        one::<VideoGenerationCancelRequested>(),
        one::<VideoGenerationStarted>(),
        one::<VideoGenerationProgress>(),
        one::<VideoGenerationCompleted>(),
        one::<VideoGenerationFailed>(),
        one::<VideoGenerationCancelled>(),
        one::<VideoProgressCheckRequested>(),
        one::<VideoProgressTrackingCancelled>(),
        one::<VideoProviderTaskFinished>(),
        one::<VideoGenerationCommandRejected>(),
    ]
}

/// A valid `VideoGenerationRequested` body with a field this build does not know.
#[cfg(test)]
fn request_json() -> serde_json::Value {
    serde_json::json!({
        "messageId": "6f1c1a52-2d0b-4d47-9c56-0a8c3f2f5e10",
        "occurredAt": "2026-11-25T10:00:00.000Z",
        "version": 1,
        "requestId": "r-1",
        "virtualKeyId": "vk-1",
        "model": "sora-2",
        "prompt": "a cat",
        "durationSeconds": 4,
        "somethingNew": true
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_message_has_a_schema_and_a_dotted_routing_key() {
        let all = schemas();
        assert_eq!(all.len(), 11);
        for (name, key, schema) in all {
            assert!(key.starts_with("video."), "{name}");
            assert!(
                schema.get("properties").is_some(),
                "{name} has no properties"
            );
        }
    }
}
