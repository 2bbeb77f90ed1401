//! The message contract (DESIGN §2): pure data, no I/O.
//!
//! Every body is camelCase JSON with `messageId`, `occurredAt` and `version`. Unknown fields are
//! ignored; a missing required field, a wrong type, an unknown version or a body that is not JSON
//! is a [`DecodeError`], which the consumer parks.

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
    /// Common fields.
    fn meta(&self) -> &Meta;
    /// The task this message is about.
    fn request_id(&self) -> &str;
    /// The tenant.
    fn virtual_key_id(&self) -> &str;
}

macro_rules! message {
    ($ty:ident, $routing:literal) => {
        impl Message for $ty {
            const NAME: &'static str = stringify!($ty);
            const ROUTING_KEY: &'static str = $routing;
            fn meta(&self) -> &Meta {
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

/// Another service asks for a video.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VideoGenerationRequested {
    #[serde(flatten)]
    #[allow(missing_docs)]
    pub meta: Meta,
    /// Caller-chosen id of the task; a second request with the same id is a duplicate.
    pub request_id: String,
    /// The tenant.
    pub virtual_key_id: String,
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
    /// Opaque data passed to the provider.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<serde_json::Value>,
}
message!(VideoGenerationRequested, "video.generation.requested");

/// Another service asks to cancel a task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VideoGenerationCancelRequested {
    #[serde(flatten)]
    #[allow(missing_docs)]
    pub meta: Meta,
    /// Task to cancel.
    pub request_id: String,
    /// Must match the task's tenant.
    pub virtual_key_id: String,
    /// Why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}
message!(
    VideoGenerationCancelRequested,
    "video.generation.cancel_requested"
);

/// The provider accepted the task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VideoGenerationStarted {
    #[serde(flatten)]
    #[allow(missing_docs)]
    pub meta: Meta,
    #[allow(missing_docs)]
    pub request_id: String,
    #[allow(missing_docs)]
    pub virtual_key_id: String,
    /// Configured provider name.
    pub provider: String,
    /// The provider's id for the job.
    pub provider_task_id: String,
    /// When the provider accepted it.
    pub started_at: DateTime<Utc>,
}
message!(VideoGenerationStarted, "video.generation.started");

/// Progress of a running task; never goes backwards.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VideoGenerationProgress {
    #[serde(flatten)]
    #[allow(missing_docs)]
    pub meta: Meta,
    #[allow(missing_docs)]
    pub request_id: String,
    #[allow(missing_docs)]
    pub virtual_key_id: String,
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
message!(VideoGenerationProgress, "video.generation.progress");

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
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::InProgress => "in_progress",
        }
    }
}

/// The video is ready.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VideoGenerationCompleted {
    #[serde(flatten)]
    #[allow(missing_docs)]
    pub meta: Meta,
    #[allow(missing_docs)]
    pub request_id: String,
    #[allow(missing_docs)]
    pub virtual_key_id: String,
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
message!(VideoGenerationCompleted, "video.generation.completed");

/// The task failed (or timed out).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VideoGenerationFailed {
    #[serde(flatten)]
    #[allow(missing_docs)]
    pub meta: Meta,
    #[allow(missing_docs)]
    pub request_id: String,
    #[allow(missing_docs)]
    pub virtual_key_id: String,
    /// What went wrong.
    pub error: String,
    /// Whether sending the same request again may succeed.
    pub retryable: bool,
    #[allow(missing_docs)]
    pub failed_at: DateTime<Utc>,
}
message!(VideoGenerationFailed, "video.generation.failed");

/// The task was cancelled.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VideoGenerationCancelled {
    #[serde(flatten)]
    #[allow(missing_docs)]
    pub meta: Meta,
    #[allow(missing_docs)]
    pub request_id: String,
    #[allow(missing_docs)]
    pub virtual_key_id: String,
    #[allow(missing_docs)]
    pub reason: String,
    #[allow(missing_docs)]
    pub cancelled_at: DateTime<Utc>,
}
message!(VideoGenerationCancelled, "video.generation.cancelled");

/// One self-scheduled progress check.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VideoProgressCheckRequested {
    #[serde(flatten)]
    #[allow(missing_docs)]
    pub meta: Meta,
    #[allow(missing_docs)]
    pub request_id: String,
    #[allow(missing_docs)]
    pub virtual_key_id: String,
    /// When the check is due (lag = processing start − this).
    pub scheduled_at: DateTime<Utc>,
    /// How many checks came before in this chain (drives the interval policy).
    pub interval_index: u32,
    /// When tracking started.
    pub start_time: DateTime<Utc>,
    /// Runs only when not below the task row's `check_sequence`; a lower one is stale.
    pub sequence: i64,
}
message!(
    VideoProgressCheckRequested,
    "video.progress.check_requested"
);

/// Tracking of a task has ended (for observers; the task row stops the tracker).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VideoProgressTrackingCancelled {
    #[serde(flatten)]
    #[allow(missing_docs)]
    pub meta: Meta,
    #[allow(missing_docs)]
    pub request_id: String,
    #[allow(missing_docs)]
    pub virtual_key_id: String,
    #[allow(missing_docs)]
    pub reason: String,
}
message!(
    VideoProgressTrackingCancelled,
    "video.progress.tracking_cancelled"
);

/// The tracker saw the provider finish (or the task time out).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VideoProviderTaskFinished {
    #[serde(flatten)]
    #[allow(missing_docs)]
    pub meta: Meta,
    #[allow(missing_docs)]
    pub request_id: String,
    #[allow(missing_docs)]
    pub virtual_key_id: String,
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
message!(VideoProviderTaskFinished, "video.provider.task_finished");

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

/// A request or cancel was refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VideoGenerationCommandRejected {
    #[serde(flatten)]
    #[allow(missing_docs)]
    pub meta: Meta,
    #[allow(missing_docs)]
    pub request_id: String,
    #[allow(missing_docs)]
    pub virtual_key_id: String,
    /// The refused message's name, e.g. `VideoGenerationCancelRequested`.
    pub command: String,
    #[allow(missing_docs)]
    pub reason: String,
}
message!(
    VideoGenerationCommandRejected,
    "video.generation.command_rejected"
);

/// One message ready to publish: body plus everything its AMQP properties and headers need.
/// Pure data, so the outbox can store it and the broker can send it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// Exchange (`""` for the default exchange).
    pub exchange: String,
    /// Routing key (a queue name on the default exchange).
    pub routing_key: String,
    /// JSON body.
    pub body: Vec<u8>,
    /// `message_id` property: the body's `messageId`, kept across re-sends.
    pub message_id: String,
    /// `type` property.
    pub message_type: String,
    /// `correlation_id` property: the request id.
    pub correlation_id: String,
    /// `x-virtual-key` header (also what `video.progress` hashes).
    pub virtual_key: String,
    /// W3C trace context, propagated from the message that caused this one.
    pub traceparent: Option<String>,
    /// Extra string headers (parking).
    pub extra_headers: Vec<(String, String)>,
    /// Fail when no queue matches.
    pub mandatory: bool,
}

impl Envelope {
    /// `message` to `exchange` with `routing_key`.
    pub fn new<M: Message>(
        exchange: impl Into<String>,
        routing_key: impl Into<String>,
        message: &M,
    ) -> Self {
        Self {
            exchange: exchange.into(),
            routing_key: routing_key.into(),
            body: encode(message),
            message_id: message.meta().message_id.to_string(),
            message_type: M::NAME.to_owned(),
            correlation_id: message.request_id().to_owned(),
            virtual_key: message.virtual_key_id().to_owned(),
            traceparent: None,
            extra_headers: Vec::new(),
            mandatory: false,
        }
    }

    /// Straight into a queue through the default exchange; unroutable is an error.
    pub fn to_queue<M: Message>(queue: impl Into<String>, message: &M) -> Self {
        let mut m = Self::new("", queue, message);
        m.mandatory = true;
        m
    }

    /// Why the broker could never take this message, if it could not: AMQP short strings
    /// (exchange, routing key, `message_id`, `type`, `correlation_id`, header names) hold 255
    /// bytes, and RabbitMQ 4.x refuses bodies over 16 MiB by default (`max_message_size`).
    /// Checked before publishing: such a publish would close the channel that other messages
    /// share.
    pub fn unpublishable(&self) -> Option<String> {
        let short = [
            ("exchange", self.exchange.as_str()),
            ("routing key", self.routing_key.as_str()),
            ("message_id", self.message_id.as_str()),
            ("type", self.message_type.as_str()),
            ("correlation_id", self.correlation_id.as_str()),
        ];
        let headers = self
            .extra_headers
            .iter()
            .map(|(k, _)| ("a header name", k.as_str()));
        for (what, value) in short.into_iter().chain(headers) {
            if value.len() > MAX_SHORT_STRING {
                return Some(format!(
                    "{what} is {} bytes; AMQP holds at most {MAX_SHORT_STRING}",
                    value.len()
                ));
            }
        }
        if self.body.len() > MAX_BODY_BYTES {
            return Some(format!(
                "body is {} bytes; RabbitMQ takes at most {MAX_BODY_BYTES} by default",
                self.body.len()
            ));
        }
        None
    }

    /// Sets the trace context.
    #[must_use]
    pub fn with_traceparent(mut self, traceparent: Option<String>) -> Self {
        self.traceparent = traceparent;
        self
    }
}

/// Why a body could not be decoded. The text names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Not JSON at all.
    #[error("body is not valid JSON: {0}")]
    NotJson(String),
    /// JSON, but a field is missing or has the wrong type.
    #[error("field `{field}`: {reason}")]
    Field {
        /// Path of the field (`.` for the body itself).
        field: String,
        /// serde's explanation.
        reason: String,
    },
    /// A version this build does not understand.
    #[error("field `version`: unsupported version {0} (this build understands {CURRENT_VERSION})")]
    UnsupportedVersion(u32),
    /// Neither the `type` property nor the routing key names a message this queue takes.
    #[error("unknown message type `{0}`")]
    UnknownType(String),
    /// A field has the right type but an impossible value.
    #[error("field `{field}`: {reason}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// A value PostgreSQL or AMQP cannot hold (a NUL character, an id over
    /// [`MAX_ID_BYTES`]): never retried, refused at once.
    #[error("field `{field}`: {reason}")]
    Unstorable {
        /// Path of the field.
        field: String,
        /// Why.
        reason: String,
    },
}

/// Cuts `text` to at most `max` bytes on a character boundary, marking the cut with `…`: for
/// log lines, error texts and headers that quote what a sender put in a message.
pub fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// Longest AMQP short string, in bytes.
pub const MAX_SHORT_STRING: usize = 255;
/// Largest body RabbitMQ 4.x accepts by default (`max_message_size`).
pub const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;

/// Longest `requestId` / `virtualKeyId`, in bytes. Both travel as AMQP short strings
/// (`correlation_id`, at most 255 bytes) and as PostgreSQL keys; 200 leaves room for prefixes.
pub const MAX_ID_BYTES: usize = 200;

/// The first string (or object key) in `value` that holds a NUL character, as a field path.
/// PostgreSQL refuses `0x00` in `text` and `jsonb`, so such a message can never be stored.
fn nul_path(value: &serde_json::Value, path: &str) -> Option<String> {
    let join = |key: &str| {
        if path.is_empty() {
            key.to_owned()
        } else {
            format!("{path}.{key}")
        }
    };
    match value {
        serde_json::Value::String(s) => s.contains('\0').then(|| path.to_owned()),
        serde_json::Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, v)| nul_path(v, &format!("{path}[{i}]"))),
        serde_json::Value::Object(map) => map.iter().find_map(|(k, v)| {
            if k.contains('\0') {
                Some(join(k))
            } else {
                nul_path(v, &join(k))
            }
        }),
        _ => None,
    }
}

fn check_id(field: &str, value: &str) -> Result<(), DecodeError> {
    if value.len() > MAX_ID_BYTES {
        return Err(DecodeError::Unstorable {
            field: field.to_owned(),
            reason: format!(
                "{} bytes long; the limit is {MAX_ID_BYTES} (it travels as an AMQP short string)",
                value.len()
            ),
        });
    }
    Ok(())
}

/// Decodes a body into `M`, checking the version.
///
/// # Errors
/// [`DecodeError`] naming the field that is wrong.
pub fn decode<M: Message>(body: &[u8]) -> Result<M, DecodeError> {
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| DecodeError::NotJson(e.to_string()))?;
    if !value.is_object() {
        return Err(DecodeError::Field {
            field: ".".to_owned(),
            reason: "expected a JSON object".to_owned(),
        });
    }
    // Check the version first: a future version may have changed any other field.
    match value.get("version") {
        None => {
            return Err(DecodeError::Field {
                field: "version".to_owned(),
                reason: "missing field".to_owned(),
            })
        }
        Some(v) => match v.as_u64() {
            Some(v) if v == u64::from(CURRENT_VERSION) => {}
            Some(v) => {
                return Err(DecodeError::UnsupportedVersion(
                    u32::try_from(v).unwrap_or(u32::MAX),
                ))
            }
            None => {
                return Err(DecodeError::Field {
                    field: "version".to_owned(),
                    reason: format!("expected an unsigned integer, found {v}"),
                })
            }
        },
    }
    if let Some(field) = nul_path(&value, "") {
        return Err(DecodeError::Unstorable {
            field,
            reason: "contains a NUL character, which PostgreSQL cannot store".to_owned(),
        });
    }
    let message = serde_path_to_error::deserialize::<_, M>(&value).map_err(|e| {
        let mut path = e.path().to_string();
        let inner = e.into_inner().to_string();
        // A bad value in a field of the flattened `Meta` (`messageId`, `occurredAt`) is reported
        // at the body's root: ask `Meta` alone, whose error path names the field.
        if path == "." && !inner.starts_with("missing field") {
            if let Err(meta) = serde_path_to_error::deserialize::<_, Meta>(&value) {
                let meta_path = meta.path().to_string();
                if meta_path != "." {
                    path = meta_path;
                }
            }
        }
        // `missing field `x`` is reported at the parent path; name the field itself.
        let field = match inner
            .strip_prefix("missing field `")
            .and_then(|s| s.strip_suffix('`'))
        {
            Some(name) if path == "." => name.to_owned(),
            Some(name) => format!("{path}.{name}"),
            None => path,
        };
        DecodeError::Field {
            field,
            reason: inner,
        }
    })?;
    check_id("requestId", message.request_id())?;
    check_id("virtualKeyId", message.virtual_key_id())?;
    Ok(message)
}

/// Serialises a message body.
pub fn encode<M: Message>(message: &M) -> Vec<u8> {
    // Serialising these plain structs cannot fail.
    serde_json::to_vec(message).unwrap_or_default()
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

    /// The message name.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Requested(_) => VideoGenerationRequested::NAME,
            Self::CancelRequested(_) => VideoGenerationCancelRequested::NAME,
            Self::ProviderTaskFinished(_) => VideoProviderTaskFinished::NAME,
        }
    }

    /// Common fields.
    pub fn meta(&self) -> &Meta {
        match self {
            Self::Requested(m) => m.meta(),
            Self::CancelRequested(m) => m.meta(),
            Self::ProviderTaskFinished(m) => m.meta(),
        }
    }

    /// The task.
    pub fn request_id(&self) -> &str {
        match self {
            Self::Requested(m) => m.request_id(),
            Self::CancelRequested(m) => m.request_id(),
            Self::ProviderTaskFinished(m) => m.request_id(),
        }
    }

    /// The tenant.
    pub fn virtual_key_id(&self) -> &str {
        match self {
            Self::Requested(m) => m.virtual_key_id(),
            Self::CancelRequested(m) => m.virtual_key_id(),
            Self::ProviderTaskFinished(m) => m.virtual_key_id(),
        }
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn what_postgresql_or_amqp_cannot_hold_is_unstorable_naming_the_field() {
        let unstorable = |v: serde_json::Value| match decode::<VideoGenerationRequested>(
            &serde_json::to_vec(&v).unwrap(),
        ) {
            Err(DecodeError::Unstorable { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        let mut v = request_json();
        v["prompt"] = serde_json::json!("a cat\u{0}");
        assert_eq!(unstorable(v), "prompt");
        let mut v = request_json();
        v["metadata"] = serde_json::json!({"outer": {"in\u{0}ner": 1}});
        assert_eq!(unstorable(v), "metadata.outer.in\u{0}ner");
        let mut v = request_json();
        v["requestId"] = serde_json::json!("r".repeat(MAX_ID_BYTES + 1));
        assert_eq!(unstorable(v), "requestId");
        let mut v = request_json();
        v["virtualKeyId"] = serde_json::json!("é".repeat(MAX_ID_BYTES / 2 + 1));
        assert_eq!(unstorable(v), "virtualKeyId");
        // At the limit is fine.
        let mut v = request_json();
        v["requestId"] = serde_json::json!("r".repeat(MAX_ID_BYTES));
        assert!(decode::<VideoGenerationRequested>(&serde_json::to_vec(&v).unwrap()).is_ok());
    }

    #[test]
    fn an_envelope_with_a_property_over_255_bytes_is_unpublishable() {
        let mut e = Envelope::new(
            "x",
            "k",
            &decode::<VideoGenerationRequested>(&serde_json::to_vec(&request_json()).unwrap())
                .unwrap(),
        );
        assert_eq!(e.unpublishable(), None);
        e.correlation_id = "c".repeat(256);
        assert!(e.unpublishable().unwrap().contains("correlation_id"));
    }

    #[test]
    fn request_round_trips_and_ignores_unknown_fields() {
        let body = serde_json::to_vec(&request_json()).unwrap();
        let m: VideoGenerationRequested = decode(&body).unwrap();
        assert_eq!(m.request_id, "r-1");
        assert_eq!(m.duration_seconds, Some(4));
        let again: VideoGenerationRequested = decode(&encode(&m)).unwrap();
        assert_eq!(again, m);
        let v: serde_json::Value = serde_json::from_slice(&encode(&m)).unwrap();
        assert!(v.get("virtualKeyId").is_some() && v.get("messageId").is_some());
    }

    #[test]
    fn decode_errors_name_the_field() {
        let mut v = request_json();
        v.as_object_mut().unwrap().remove("requestId");
        let err = decode::<VideoGenerationRequested>(&serde_json::to_vec(&v).unwrap()).unwrap_err();
        assert!(
            matches!(&err, DecodeError::Field { field, .. } if field == "requestId"),
            "{err}"
        );

        let mut v = request_json();
        v["durationSeconds"] = serde_json::json!("four");
        let err = decode::<VideoGenerationRequested>(&serde_json::to_vec(&v).unwrap()).unwrap_err();
        assert!(err.to_string().contains("durationSeconds"), "{err}");

        let mut v = request_json();
        v["version"] = serde_json::json!(99);
        let err = decode::<VideoGenerationRequested>(&serde_json::to_vec(&v).unwrap()).unwrap_err();
        assert_eq!(err, DecodeError::UnsupportedVersion(99));

        let err = decode::<VideoGenerationRequested>(b"not json").unwrap_err();
        assert!(matches!(err, DecodeError::NotJson(_)));

        // Fields of the flattened `Meta` are named too, not reported at the root.
        for (field, bad) in [
            ("messageId", serde_json::json!(false)),
            ("messageId", serde_json::json!("not-a-uuid")),
            ("occurredAt", serde_json::json!("yesterday")),
        ] {
            let mut v = request_json();
            v[field] = bad;
            let err =
                decode::<VideoGenerationRequested>(&serde_json::to_vec(&v).unwrap()).unwrap_err();
            assert!(
                matches!(&err, DecodeError::Field { field: f, .. } if f == field),
                "{err}"
            );
        }
    }

    #[test]
    fn commands_dispatch_on_type_then_routing_key() {
        let body = serde_json::to_vec(&request_json()).unwrap();
        let by_type =
            GenerationCommand::decode(Some("VideoGenerationRequested"), "x", &body).unwrap();
        let by_key = GenerationCommand::decode(None, "video.generation.requested", &body).unwrap();
        assert_eq!(by_type, by_key);
        let err = GenerationCommand::decode(Some("Nope"), "x", &body).unwrap_err();
        assert_eq!(err, DecodeError::UnknownType("Nope".into()));
    }

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
