//! The generation orchestrator: the only component that changes a task's lifecycle status and
//! publishes lifecycle events.
//!
//! It consumes `video.generation` (requests, cancels, provider outcomes). Every state change and
//! the events it causes are written in one PostgreSQL unit of work (the outbox); the relay
//! publishes them. Nothing about running tasks is held in memory: any instance can handle any
//! message, so a cancel works wherever it lands.
//!
//! - [`request`](self): validation, the task row, the submit with backoff, `VideoGenerationStarted`
//!   and the first check.
//! - `ending`: cancels, provider outcomes, and the one sequence every ending goes through
//!   (transition → terminal event → `VideoProgressTrackingCancelled` → webhook → commit).
//! - `database_gate`: while PostgreSQL is down, deliveries wait for it instead of failing.

mod database_gate;
mod ending;
mod request;
mod submit;
mod validation;

use std::sync::Arc;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{warn, Instrument};

use crate::broker::{delivery_span, Handler, Incoming, Outcome, PublishedBy};
use crate::config::{GenerationSettings, SecuritySettings, TrackingSettings, WebhookSettings};
use crate::interop::masstransit::{MassTransit, Received};
use crate::messages::{
    DecodeError, Envelope, GenerationCommand, Message, Meta, VideoGenerationCancelRequested,
    VideoGenerationCommandRejected, VideoGenerationRequested, VideoProviderTaskFinished,
};
use crate::providers::Providers;
use crate::store::{Store, StoreError, UnitOfWork};
use crate::topology::Topology;
use database_gate::{DatabaseGate, GateClosed, GATE_HOLD};
pub(crate) use submit::Submission;

/// What the orchestrator is built from.
#[derive(Debug)]
pub struct GenerationDeps {
    /// Where tasks and the outbox live.
    pub store: Store,
    /// The configured providers and the routing of models to them.
    pub providers: Providers,
    /// Exchange and queue names, and the delay tiers for the first check.
    pub topology: Topology,
    /// `[generation]`: limits and submit backoff.
    pub settings: GenerationSettings,
    /// `[tracking]`: when the first progress check is due.
    pub tracking: TrackingSettings,
    /// `[webhooks]`: which callback URLs are allowed and how long deliveries are retried.
    pub webhooks: WebhookSettings,
    /// Notified after every commit that wrote to the outbox, so the relay publishes at once.
    pub relay_wake: Arc<Notify>,
    /// Interrupts submit backoff at shutdown (the message goes back to the queue).
    pub stop: CancellationToken,
    /// `[security]`: which RabbitMQ user may publish commands for which tenant.
    pub security: SecuritySettings,
    /// The service's own RabbitMQ user, when `security.publishers` is on.
    pub service_user: Option<String>,
    /// Reads what MassTransit services send (`interop.masstransit`; `None`: off).
    pub masstransit: Option<Arc<MassTransit>>,
}

/// The generation orchestrator; one per process, shared by its consumer's deliveries.
#[derive(Debug)]
pub struct GenerationOrchestrator {
    store: Store,
    providers: Providers,
    topology: Topology,
    settings: GenerationSettings,
    tracking: TrackingSettings,
    webhooks: WebhookSettings,
    relay_wake: Arc<Notify>,
    stop: CancellationToken,
    gate: DatabaseGate,
    security: SecuritySettings,
    service_user: Option<String>,
    crash_at: Option<crate::crash::CrashPoint>,
    masstransit: Option<Arc<MassTransit>>,
}

/// Why a message could not be handled now.
#[derive(Debug, thiserror::Error)]
enum HandleError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("shutting down")]
    Shutdown,
    /// A well-formed message the orchestrator will not act on: parked with this reason.
    #[error("{0}")]
    Refused(String),
}

impl GenerationOrchestrator {
    /// Builds the orchestrator.
    pub fn new(deps: GenerationDeps) -> Self {
        Self {
            store: deps.store,
            providers: deps.providers,
            topology: deps.topology,
            settings: deps.settings,
            tracking: deps.tracking,
            webhooks: deps.webhooks,
            relay_wake: deps.relay_wake,
            stop: deps.stop,
            gate: DatabaseGate::default(),
            security: deps.security,
            service_user: deps.service_user,
            crash_at: crate::crash::CrashPoint::from_env(),
            masstransit: deps.masstransit,
        }
    }

    /// The command a delivery carries, and the trace it continues. A MassTransit message
    /// (envelope or raw JSON) is first turned into our contract, then decoded like any other, so
    /// everything after this sees one shape.
    fn decode(
        &self,
        incoming: &Incoming,
    ) -> Result<(GenerationCommand, Option<String>), DecodeError> {
        let received = Received {
            content_type: incoming.content_type.as_deref(),
            message_id: incoming.message_id.as_deref(),
            headers: &incoming.headers,
            body: &incoming.body,
        };
        if let Some(read) = self.masstransit.as_ref().and_then(|mt| mt.read(&received)) {
            let translated = read?;
            let command =
                GenerationCommand::decode(Some(translated.message_type), "", &translated.body)
                    .map_err(|e| e.within(translated.payload_path))?;
            let trace = translated
                .traceparent
                .or_else(|| incoming.traceparent.clone());
            return Ok((command, trace));
        }
        let command = GenerationCommand::decode(
            incoming.message_type.as_deref(),
            &incoming.routing_key,
            &incoming.body,
        )?;
        Ok((command, incoming.traceparent.clone()))
    }

    async fn dispatch(
        &self,
        command: GenerationCommand,
        published_by: Option<PublishedBy>,
        traceparent: Option<String>,
        redelivered: bool,
    ) -> Result<(), HandleError> {
        if let Some(refusal) = published_by.and_then(|p| self.publisher_refusal(&p, &command)) {
            warn!(%refusal, "command refused: publisher not allowed");
            let rejection = Rejection {
                command: command.name(),
                label: RejectReason::PublisherNotAllowed,
                request_id: command.request_id(),
                virtual_key_id: command.virtual_key_id(),
                reason: RejectReason::PublisherNotAllowed.as_str(),
            };
            self.reject(rejection, &traceparent).await?;
            return Err(HandleError::Refused(refusal));
        }
        match command {
            GenerationCommand::Requested(r) => self.on_requested(r, traceparent, redelivered).await,
            GenerationCommand::CancelRequested(c) => self.on_cancel(c, traceparent).await,
            GenerationCommand::ProviderTaskFinished(f) => self.on_finished(f, traceparent).await,
        }
    }

    /// Why `security.publishers` refuses this command from `published_by`, if it does.
    fn publisher_refusal(
        &self,
        published_by: &PublishedBy,
        command: &GenerationCommand,
    ) -> Option<String> {
        let virtual_key = command.virtual_key_id();
        match published_by {
            PublishedBy::Service => None,
            PublishedBy::User(user) if self.security.may_publish_for(user, virtual_key) => None,
            PublishedBy::User(user) => Some(format!(
                "publisher_not_allowed: RabbitMQ user `{user}` may not act for virtual key `{virtual_key}` (security.publishers)"
            )),
            PublishedBy::Unknown => Some(
                "publisher_not_allowed: the message has no user_id property, which security.publishers requires"
                    .to_owned(),
            ),
        }
    }

    /// Writes `envelope` to the outbox in `uow`, carrying the delivery's trace context.
    async fn enqueue(
        &self,
        uow: &mut UnitOfWork,
        envelope: &Envelope,
        traceparent: &Option<String>,
    ) -> Result<(), HandleError> {
        let envelope = envelope.clone().with_traceparent(traceparent.clone());
        uow.enqueue(&envelope).await?;
        Ok(())
    }

    /// Commits `uow` and wakes the relay for the events it wrote.
    async fn commit(&self, uow: UnitOfWork) -> Result<(), HandleError> {
        uow.commit().await?;
        self.relay_wake.notify_one();
        Ok(())
    }

    /// Publishes the rejection (in a unit of its own) and counts it.
    async fn reject(
        &self,
        rejection: Rejection<'_>,
        traceparent: &Option<String>,
    ) -> Result<(), HandleError> {
        let mut uow = self.store.begin().await?;
        self.enqueue(
            &mut uow,
            &self.topology.event(&rejection.event()),
            traceparent,
        )
        .await?;
        self.commit(uow).await?;
        rejection.count();
        Ok(())
    }
}

/// A command refused with `VideoGenerationCommandRejected`.
struct Rejection<'a> {
    /// The refused command's type name.
    command: &'static str,
    /// The `reason` label of `video_generation_commands_rejected_total`.
    label: RejectReason,
    request_id: &'a str,
    virtual_key_id: &'a str,
    /// What the publisher reads in the event.
    reason: &'a str,
}

impl Rejection<'_> {
    fn event(&self) -> VideoGenerationCommandRejected {
        VideoGenerationCommandRejected {
            meta: Meta::new(),
            request_id: self.request_id.to_owned(),
            virtual_key_id: self.virtual_key_id.to_owned(),
            command: self.command.to_owned(),
            reason: self.reason.to_owned(),
        }
    }

    fn count(&self) {
        count_rejected(self.command, self.label);
    }
}

fn count_rejected(command: &'static str, reason: RejectReason) {
    debug_assert!(
        reason.commands().contains(&command),
        "{command} is not among the commands refused for {reason:?}: add it to RejectReason::commands"
    );
    metrics::counter!("video_generation_commands_rejected_total", "command" => command, "reason" => reason.as_str())
        .increment(1);
}

/// Why a command was refused: the `reason` label of `video_generation_commands_rejected_total`
/// (an external interface, like the outcomes of checks: [`RejectReason::as_str`] must not change).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RejectReason {
    /// `security.publishers` does not let the message's RabbitMQ user act for its virtual key.
    PublisherNotAllowed,
    /// The request id belongs to another tenant's task.
    RequestIdTaken,
    /// The request's owner cancelled it before it arrived.
    AlreadyCancelled,
    /// The request failed validation (`VideoGenerationFailed`, `retryable: false`).
    Invalid,
    /// The virtual key does not own the task (a cancel, or a forged provider outcome).
    VirtualKeyMismatch,
    /// A provider outcome names another provider job than the task's.
    ProviderTaskMismatch,
}

impl RejectReason {
    /// Every reason, for the series that exist from the first scrape.
    pub(crate) const ALL: [Self; 6] = [
        Self::PublisherNotAllowed,
        Self::RequestIdTaken,
        Self::AlreadyCancelled,
        Self::Invalid,
        Self::VirtualKeyMismatch,
        Self::ProviderTaskMismatch,
    ];

    /// The metric label value.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::PublisherNotAllowed => "publisher_not_allowed",
            Self::RequestIdTaken => "request_id_taken",
            Self::AlreadyCancelled => "already_cancelled",
            Self::Invalid => "invalid",
            Self::VirtualKeyMismatch => "virtual_key_mismatch",
            Self::ProviderTaskMismatch => "provider_task_mismatch",
        }
    }

    /// The commands (type names, the `command` label) refused for this reason.
    pub(crate) fn commands(self) -> &'static [&'static str] {
        match self {
            Self::PublisherNotAllowed => &[
                VideoGenerationRequested::NAME,
                VideoGenerationCancelRequested::NAME,
                VideoProviderTaskFinished::NAME,
            ],
            Self::RequestIdTaken | Self::AlreadyCancelled | Self::Invalid => {
                &[VideoGenerationRequested::NAME]
            }
            Self::VirtualKeyMismatch => &[
                VideoGenerationCancelRequested::NAME,
                VideoProviderTaskFinished::NAME,
            ],
            Self::ProviderTaskMismatch => &[VideoProviderTaskFinished::NAME],
        }
    }
}

impl Handler for GenerationOrchestrator {
    async fn handle(&self, incoming: Incoming) -> Outcome {
        let span = delivery_span(&incoming);
        // Decoded before the span is entered: the trace it continues may come from the body
        // (a MassTransit conversation), and a span's parent is fixed once it is entered.
        let decoded = if incoming.body.len() > self.settings.max_message_bytes {
            Err(format!(
                "body is {} bytes; the limit is {} (generation.max_message_bytes)",
                incoming.body.len(),
                self.settings.max_message_bytes
            ))
        } else {
            self.decode(&incoming).map_err(|e| e.to_string())
        };
        match &decoded {
            Ok((command, parent_trace)) => {
                span.record("otel.name", format!("receive {}", command.name()));
                span.record("request_id", command.request_id());
                span.record("virtual_key", command.virtual_key_id());
                span.record("message_type", command.name());
                crate::broker::continue_trace(&span, parent_trace.as_deref());
            }
            Err(_) => {
                span.record("otel.name", "receive unreadable message");
                crate::broker::continue_trace(&span, incoming.traceparent.as_deref());
            }
        }
        async {
            let (command, parent_trace) = match decoded {
                Ok(decoded) => decoded,
                Err(reason) => {
                    metrics::counter!("video_poison_messages_total", "queue" => "generation")
                        .increment(1);
                    return Outcome::Park(reason);
                }
            };
            match self.gate.pass(&self.store, &self.stop, GATE_HOLD).await {
                Ok(()) => {}
                Err(GateClosed::Stopping) => return Outcome::Return,
                Err(GateClosed::StillDown) => {
                    return Outcome::Retry("database unavailable".to_owned())
                }
            }
            let traceparent = crate::broker::onward_traceparent(parent_trace.as_deref());
            // A retry is our own message coming back: resume it like a redelivery.
            let redelivered = incoming.redelivered || incoming.retry_attempt > 0;
            let published_by = self
                .service_user
                .as_deref()
                .filter(|_| !self.security.publishers.is_empty())
                .map(|service| incoming.published_by(service));
            match self
                .dispatch(command, published_by, Some(traceparent), redelivered)
                .await
            {
                Ok(()) => Outcome::Ack,
                Err(HandleError::Shutdown) => Outcome::Return,
                Err(HandleError::Refused(reason)) => Outcome::Park(reason),
                Err(HandleError::Store(e)) if e.is_transient() => {
                    self.gate.close();
                    metrics::counter!("video_generation_errors_total", "kind" => "database")
                        .increment(1);
                    Outcome::Retry(format!("database unavailable: {e}"))
                }
                Err(HandleError::Store(e)) => {
                    metrics::counter!("video_generation_errors_total", "kind" => "data")
                        .increment(1);
                    Outcome::Park(format!("the database refused the message's data: {e}"))
                }
            }
        }
        .instrument(span)
        .await
    }
}
