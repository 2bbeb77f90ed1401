//! Live task events for HTTP clients (server-sent events): `GET /v1/tasks/{id}/events` and
//! `GET /v1/events`.
//!
//! ## Layout
//! - `hub`: the one consumer per instance on `video.events` (an exclusive, auto-delete,
//!   server-named queue bound to the lifecycle routing keys), re-opened after every broker
//!   reconnect, and the fan-out to subscribers, each with a bounded buffer of its own.
//! - `sse`: the two endpoints: authentication, the first state from the store, resuming with
//!   `Last-Event-ID`, the event stream.
//! - `stall`: the listener wrapper that closes a connection whose client stops taking bytes.
//!
//! ## Events
//! Every event's `data` is one JSON object, a [`TaskUpdate`]: the task's state at that moment
//! (`requestId`, `virtualKeyId`, `status`, `rank`, `progress`, …), whether it was read from the
//! store or came from the broker. The `event:` names what happened: `state` (the task's current
//! state from the store, not terminal), `started`, `progress`, and one terminal event,
//! `completed`, `failed` (also for `timed_out`) or `cancelled`, after which a task's stream
//! closes. A task that is already terminal when its stream opens gets its terminal event from the
//! store. `dropped` (no `id`) ends a stream whose client fell too far behind.
//!
//! ## Ids and resuming
//! A task's states are ordered: its status only advances and its progress never goes back. The
//! **rank** numbers them: `0` pending; `1000 + 3 × progress + s` processing, where `s` is 0 before
//! the first progress report (`started`), 1 for `queued` and 2 for `in_progress`; `2000`
//! terminal. On a task's stream the id is the rank, and the stream only ever sends a rank above
//! the last one it sent (or above `Last-Event-ID`): a resume gets the current state if it is
//! newer than what the client saw, then what follows. Nothing is sent twice; progress steps that
//! happened while the client was away are folded into that one state (progress is cumulative, so
//! nothing is lost); an event that arrives after a later state was sent (a `started` relayed
//! after the first progress) is skipped. A resume after the terminal event closes at once.
//!
//! On `GET /v1/events` the id is a time (milliseconds since the Unix epoch) that never goes
//! back on one stream: when the hub received the event, or when the store row changed. A resume
//! gets the state of every task of the caller's that changed since that time minus
//! [`RESUME_OVERLAP`] (at most [`RESUME_LIMIT`], the most recent), then live events. Within the
//! overlap a state may come again: `requestId` plus `rank` tell a client it has it. A change that
//! took longer than the overlap from its commit to the broker (the relay held up by an outage)
//! and happened while the client was away is missed until the task changes again.
//!
//! The same two mechanisms cover the hub's own gaps: after its consumer is re-opened (a broker
//! reconnect) every stream re-reads what it may have missed, and a task's stream also re-reads
//! its task every `http.sse_heartbeat_ms` (a progress event is published before the row is
//! written, so one can slip between a stream's first read and its subscription).
//!
//! ## Slow clients
//! Each subscriber has `http.sse_buffer` events of room. The hub never waits for one: a
//! subscriber whose buffer is full is removed, and its stream sends what it holds, then
//! `dropped`, and ends. A client that stops reading altogether leaves its connection's send
//! buffers full; the listener closes such a connection after `http.send_timeout_ms`, so it can
//! hold up neither the service nor graceful shutdown (streams end when shutdown starts).

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::broker::Broker;
use crate::config::HttpSettings;
use crate::messages::{
    self, Message, ProgressStatus, VideoGenerationCancelled, VideoGenerationCompleted,
    VideoGenerationFailed, VideoGenerationProgress, VideoGenerationStarted,
};
use crate::store::{Store, Task, TaskStatus};

mod hub;
mod sse;
mod stall;

pub use hub::{Filter, Hub, HubMessage, Next, Subscription};
pub use sse::{all_events, task_events};
pub use stall::{StallGuard, StalledStream};

/// How far before a `/v1/events` resume time the store is searched for changed tasks.
pub const RESUME_OVERLAP: Duration = Duration::from_secs(5);
/// The most task states a `/v1/events` resume sends (the most recently changed).
pub const RESUME_LIMIT: i64 = 1000;
/// The rank of every terminal state.
pub const TERMINAL_RANK: u32 = 2000;

/// The routing keys the hub binds: a task's lifecycle.
pub const ROUTING_KEYS: [&str; 5] = [
    VideoGenerationStarted::ROUTING_KEY,
    VideoGenerationProgress::ROUTING_KEY,
    VideoGenerationCompleted::ROUTING_KEY,
    VideoGenerationFailed::ROUTING_KEY,
    VideoGenerationCancelled::ROUTING_KEY,
];

/// What an event says happened: its SSE `event:` name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The current state, read from the store (not terminal).
    State,
    /// The provider accepted the task.
    Started,
    /// Progress.
    Progress,
    /// The video is ready.
    Completed,
    /// Failed or timed out.
    Failed,
    /// Cancelled.
    Cancelled,
}

impl Kind {
    /// The SSE event name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::State => "state",
            Self::Started => "started",
            Self::Progress => "progress",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    /// A terminal event: a task's stream closes after it.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Cancelled)
    }
}

/// A task's state at one moment: the `data` of every event (camelCase JSON, absent fields
/// omitted).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskUpdate {
    #[allow(missing_docs)]
    pub request_id: String,
    #[allow(missing_docs)]
    pub virtual_key_id: String,
    /// The task's status: `pending`, `processing`, `completed`, `failed`, `cancelled`,
    /// `timed_out` (a `failed` event from the broker says `failed` for a time-out too).
    pub status: TaskStatus,
    /// The position of this state among the task's states (module docs).
    pub rank: u32,
    /// 0–100, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub progress: Option<u8>,
    /// `queued` or `in_progress`, once the provider reported either.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub progress_status: Option<ProgressStatus>,
    /// The provider's note on its progress.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[allow(missing_docs)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub estimated_completion_at: Option<DateTime<Utc>>,
    /// Configured provider name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    #[allow(missing_docs)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provider_task_id: Option<String>,
    #[allow(missing_docs)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub video_url: Option<String>,
    #[allow(missing_docs)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub video_url_expires_at: Option<DateTime<Utc>>,
    #[allow(missing_docs)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub video_seconds: Option<f64>,
    /// Processing time from start to completion (`completed` from the broker).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    #[allow(missing_docs)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[allow(missing_docs)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retryable: Option<bool>,
    /// Why it was cancelled.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When the task reached this state (the event's `occurredAt`, the row's `updated_at`).
    pub at: DateTime<Utc>,
}

/// The rank of a state (module docs).
pub fn rank(status: TaskStatus, progress: u8, progress_status: Option<ProgressStatus>) -> u32 {
    match status {
        TaskStatus::Pending => 0,
        TaskStatus::Processing => {
            let step = match progress_status {
                None => 0,
                Some(ProgressStatus::Queued) => 1,
                Some(ProgressStatus::InProgress) => 2,
            };
            1000 + 3 * u32::from(progress.min(100)) + step
        }
        _ => TERMINAL_RANK,
    }
}

impl TaskUpdate {
    fn new(request_id: &str, virtual_key_id: &str, status: TaskStatus, at: DateTime<Utc>) -> Self {
        Self {
            request_id: request_id.to_owned(),
            virtual_key_id: virtual_key_id.to_owned(),
            status,
            rank: rank(status, 0, None),
            progress: None,
            progress_status: None,
            message: None,
            estimated_completion_at: None,
            provider: None,
            provider_task_id: None,
            video_url: None,
            video_url_expires_at: None,
            video_seconds: None,
            duration_ms: None,
            error: None,
            retryable: None,
            reason: None,
            at,
        }
    }

    /// A task's state as the store has it, with the event name it is sent under.
    pub fn from_task(task: &Task) -> (Kind, Self) {
        let progress = u8::try_from(task.progress.clamp(0, 100)).unwrap_or(0);
        let progress_status = match task.progress_status.as_deref() {
            Some("queued") => Some(ProgressStatus::Queued),
            Some("in_progress") => Some(ProgressStatus::InProgress),
            _ => None,
        };
        let cancelled = task.status == TaskStatus::Cancelled;
        let update = Self {
            rank: rank(task.status, progress, progress_status),
            progress: Some(progress),
            progress_status,
            message: task.message.clone().filter(|_| !cancelled),
            provider: Some(task.provider.clone()).filter(|p| !p.is_empty()),
            provider_task_id: task.provider_task_id.clone(),
            video_url: task.video_url.clone(),
            video_url_expires_at: task.video_url_expires_at,
            video_seconds: task.video_seconds,
            error: task.error.clone(),
            retryable: task.retryable,
            // A cancellation's reason is kept as the row's message.
            reason: task.message.clone().filter(|_| cancelled),
            ..Self::new(
                &task.request_id,
                &task.virtual_key_id,
                task.status,
                task.updated_at,
            )
        };
        let kind = match task.status {
            TaskStatus::Pending | TaskStatus::Processing => Kind::State,
            TaskStatus::Completed => Kind::Completed,
            TaskStatus::Failed | TaskStatus::TimedOut => Kind::Failed,
            TaskStatus::Cancelled => Kind::Cancelled,
        };
        (kind, update)
    }

    /// An event from `video.events`; `None` for another routing key or a body that is not the
    /// contract's.
    pub fn from_event(routing_key: &str, body: &[u8]) -> Option<(Kind, Self)> {
        let processing = TaskStatus::Processing;
        let update = match routing_key {
            VideoGenerationStarted::ROUTING_KEY => {
                let e: VideoGenerationStarted = messages::decode(body).ok()?;
                let at = e.meta.occurred_at;
                let update = Self {
                    progress: Some(0),
                    provider: Some(e.provider),
                    provider_task_id: Some(e.provider_task_id),
                    ..Self::new(&e.request_id, &e.virtual_key_id, processing, at)
                };
                (Kind::Started, update)
            }
            VideoGenerationProgress::ROUTING_KEY => {
                let e: VideoGenerationProgress = messages::decode(body).ok()?;
                let at = e.meta.occurred_at;
                let update = Self {
                    rank: rank(processing, e.progress, Some(e.status)),
                    progress: Some(e.progress.min(100)),
                    progress_status: Some(e.status),
                    message: e.message,
                    estimated_completion_at: e.estimated_completion_at,
                    ..Self::new(&e.request_id, &e.virtual_key_id, processing, at)
                };
                (Kind::Progress, update)
            }
            VideoGenerationCompleted::ROUTING_KEY => {
                let e: VideoGenerationCompleted = messages::decode(body).ok()?;
                let at = e.meta.occurred_at;
                let update = Self {
                    progress: Some(100),
                    video_url: Some(e.video_url),
                    video_url_expires_at: e.video_url_expires_at,
                    video_seconds: e.video_seconds,
                    duration_ms: Some(e.duration_ms),
                    ..Self::new(&e.request_id, &e.virtual_key_id, TaskStatus::Completed, at)
                };
                (Kind::Completed, update)
            }
            VideoGenerationFailed::ROUTING_KEY => {
                let e: VideoGenerationFailed = messages::decode(body).ok()?;
                let at = e.meta.occurred_at;
                let update = Self {
                    error: Some(e.error),
                    retryable: Some(e.retryable),
                    ..Self::new(&e.request_id, &e.virtual_key_id, TaskStatus::Failed, at)
                };
                (Kind::Failed, update)
            }
            VideoGenerationCancelled::ROUTING_KEY => {
                let e: VideoGenerationCancelled = messages::decode(body).ok()?;
                let at = e.meta.occurred_at;
                let update = Self {
                    reason: Some(e.reason),
                    ..Self::new(&e.request_id, &e.virtual_key_id, TaskStatus::Cancelled, at)
                };
                (Kind::Cancelled, update)
            }
            _ => return None,
        };
        Some(update)
    }
}

/// One event as the hub fans it out: its JSON is written once for every subscriber.
#[derive(Debug, Clone, PartialEq)]
pub struct LiveEvent {
    /// The event name.
    pub kind: Kind,
    #[allow(missing_docs)]
    pub request_id: String,
    #[allow(missing_docs)]
    pub virtual_key_id: String,
    /// [`TaskUpdate::rank`].
    pub rank: u32,
    /// When this instance received it (or read it from the store).
    pub received_at: DateTime<Utc>,
    /// The [`TaskUpdate`] as JSON.
    pub data: Arc<str>,
}

impl LiveEvent {
    /// `update` under `kind`, received at `received_at`.
    pub fn new(kind: Kind, update: &TaskUpdate, received_at: DateTime<Utc>) -> Self {
        Self {
            kind,
            request_id: update.request_id.clone(),
            virtual_key_id: update.virtual_key_id.clone(),
            rank: update.rank,
            received_at,
            data: serde_json::to_string(update)
                .unwrap_or_else(|_| "{}".to_owned())
                .into(),
        }
    }

    /// A store row as an event.
    pub fn from_task(task: &Task) -> Self {
        let (kind, update) = TaskUpdate::from_task(task);
        Self::new(kind, &update, task.updated_at)
    }
}

/// What the live endpoints need: the hub, the store, the stream settings, and the signal that
/// ends every stream (shutdown).
#[derive(Debug, Clone)]
pub struct Live {
    hub: Hub,
    store: Store,
    heartbeat: Duration,
    stop: CancellationToken,
}

impl Live {
    /// A hub with `http.sse_buffer` of room per subscriber; streams end when `stop` fires.
    pub fn new(store: Store, http: &HttpSettings, stop: CancellationToken) -> Self {
        Self {
            hub: Hub::new(http.sse_buffer),
            store,
            heartbeat: http.sse_heartbeat(),
            stop,
        }
    }

    /// The hub.
    pub fn hub(&self) -> &Hub {
        &self.hub
    }

    /// The hub's consumer, until the stop signal: to run in a task the application owns.
    pub async fn run(self, broker: Arc<Broker>) {
        let stop = self.stop.clone();
        self.hub.run(broker, stop).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(value: serde_json::Value) -> Vec<u8> {
        let mut object = serde_json::json!({
            "messageId": "6f1c1a52-2d0b-4d47-9c56-0a8c3f2f5e10",
            "occurredAt": "2026-01-01T10:00:00.000Z",
            "version": 1,
            "requestId": "r-1",
            "virtualKeyId": "vk-1",
        });
        if let (Some(o), Some(extra)) = (object.as_object_mut(), value.as_object()) {
            o.extend(extra.clone());
        }
        serde_json::to_vec(&object).unwrap()
    }

    #[test]
    fn ranks_order_every_state_a_task_goes_through() {
        use ProgressStatus::{InProgress, Queued};
        let processing = TaskStatus::Processing;
        let states = [
            rank(TaskStatus::Pending, 0, None),
            rank(processing, 0, None),
            rank(processing, 0, Some(Queued)),
            rank(processing, 0, Some(InProgress)),
            rank(processing, 1, None),
            rank(processing, 1, Some(Queued)),
            rank(processing, 1, Some(InProgress)),
            rank(processing, 99, Some(InProgress)),
            rank(processing, 100, Some(Queued)),
            rank(processing, 100, Some(InProgress)),
            rank(TaskStatus::Completed, 0, None),
        ];
        assert!(states.windows(2).all(|w| w[0] < w[1]), "{states:?}");
        for terminal in [
            TaskStatus::Failed,
            TaskStatus::Cancelled,
            TaskStatus::TimedOut,
        ] {
            assert_eq!(rank(terminal, 40, None), TERMINAL_RANK);
        }
        assert_eq!(rank(processing, 250, None), rank(processing, 100, None));
    }

    #[test]
    fn broker_events_become_updates_with_their_rank() {
        let (kind, started) = TaskUpdate::from_event(
            "video.generation.started",
            &body(serde_json::json!({
                "provider": "sim", "providerTaskId": "job-1",
                "startedAt": "2026-01-01T10:00:00.000Z"
            })),
        )
        .expect("a started event");
        assert_eq!(kind, Kind::Started);
        assert_eq!(started.rank, 1000);
        assert_eq!(started.provider_task_id.as_deref(), Some("job-1"));

        let (kind, progress) = TaskUpdate::from_event(
            "video.generation.progress",
            &body(serde_json::json!({"progress": 40, "status": "in_progress"})),
        )
        .expect("a progress event");
        assert_eq!(kind, Kind::Progress);
        assert_eq!(progress.rank, 1000 + 120 + 2);
        let json = serde_json::to_value(&progress).unwrap();
        assert_eq!(json["status"], "processing");
        assert_eq!(json["progressStatus"], "in_progress");
        assert_eq!(json["progress"], 40);
        assert_eq!(json["at"], "2026-01-01T10:00:00Z");
        assert!(json.get("videoUrl").is_none(), "absent fields are omitted");

        let (kind, failed) = TaskUpdate::from_event(
            "video.generation.failed",
            &body(serde_json::json!({
                "error": "boom", "retryable": true, "failedAt": "2026-01-01T10:00:00.000Z"
            })),
        )
        .expect("a failed event");
        assert!(kind.is_terminal());
        assert_eq!(failed.rank, TERMINAL_RANK);
        assert_eq!(failed.error.as_deref(), Some("boom"));

        assert!(TaskUpdate::from_event("video.generation.progress", b"{}").is_none());
        assert!(
            TaskUpdate::from_event("video.generation.requested", &body(serde_json::json!({})))
                .is_none()
        );
    }
}
