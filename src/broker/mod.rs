//! Broker plumbing: one connection per process with a reconnect loop and a publisher that waits
//! for confirms with many in flight (here); the consumer loop with manual acks, bounded prefetch,
//! parking and delayed retries (`consumer.rs`); W3C trace context (`trace.rs`).
//!
//! Why our own reconnect loop rather than lapin's auto-recovery: after a reconnect we must
//! redeclare the topology and re-send every unconfirmed publish, and consumers must resubscribe
//! only to the partitions this instance still holds. One supervisor that hands out the current
//! connection makes all three explicit.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use rand::Rng;
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::{watch, Mutex};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

mod consumer;
mod trace;

use crate::interop::masstransit::MassTransit;
use crate::messages::Envelope;
pub use crate::redact::redact_url;
use crate::topology::{Topology, TopologyError, VIRTUAL_KEY_HEADER};
pub use consumer::{
    consume, delivery_span, ConsumerSpec, Handler, Incoming, Outcome, PublishedBy, RetryScheduled,
};
pub use trace::{child_traceparent, continue_trace, onward_traceparent, remote_span};

/// Header naming why a message was parked.
pub const PARKED_REASON_HEADER: &str = "x-parked-reason";
/// Header naming the queue a parked message came from.
pub const ORIGINAL_QUEUE_HEADER: &str = "x-original-queue";
/// Header with the RFC 3339 time a message was parked.
pub const PARKED_AT_HEADER: &str = "x-parked-at";
/// W3C trace context header.
pub const TRACEPARENT_HEADER: &str = "traceparent";
/// Our own count of delayed retries a message has had. RabbitMQ 4.x no longer reads `x-death`
/// on republished messages, and a retry is a new publish, so the count travels in a header.
pub const RETRY_ATTEMPT_HEADER: &str = "x-retry-attempt";
/// RFC 3339 time of the first transient failure: the retry budget runs from it.
pub const RETRY_FIRST_AT_HEADER: &str = "x-retry-first-at";
/// Why the last attempt failed.
pub const RETRY_REASON_HEADER: &str = "x-retry-reason";
/// On a copy the service publishes again (a delayed retry), the AMQP `user_id` of the message
/// it copies. Believed only on a message whose own `user_id` is the service's: RabbitMQ makes
/// sure nobody else can publish with that `user_id`.
pub const PUBLISHER_HEADER: &str = "x-vo-publisher";
/// Headers a consumer sets itself and does not carry over to a retry or a parked copy.
pub(crate) const OWN_HEADERS: [&str; 6] = [
    VIRTUAL_KEY_HEADER,
    TRACEPARENT_HEADER,
    RETRY_ATTEMPT_HEADER,
    RETRY_FIRST_AT_HEADER,
    RETRY_REASON_HEADER,
    PUBLISHER_HEADER,
];

/// Broker failures callers branch on.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// No node in the list answered.
    #[error("cannot connect to RabbitMQ at {urls}: {reason}")]
    Connect {
        /// The node list, passwords removed.
        urls: String,
        /// The last error.
        reason: String,
    },
    /// Declaring the topology failed.
    #[error(transparent)]
    Topology(#[from] TopologyError),
    /// The process is shutting down.
    #[error("shutting down")]
    Shutdown,
    /// The broker answered a publish with nack (e.g. a full delay tier with `reject-publish`).
    #[error("publish to `{exchange}` / `{routing_key}` was refused by the broker (nack)")]
    Nacked {
        /// Exchange.
        exchange: String,
        /// Routing key.
        routing_key: String,
    },
    /// A mandatory publish matched no queue.
    #[error("publish to `{exchange}` / `{routing_key}` was unroutable: {reply}")]
    Unroutable {
        /// Exchange.
        exchange: String,
        /// Routing key.
        routing_key: String,
        /// The broker's reply text.
        reply: String,
    },
    /// The publish could not be confirmed in time, even after re-sending.
    #[error("publish to `{exchange}` / `{routing_key}` was not confirmed: {reason}")]
    Unconfirmed {
        /// Exchange.
        exchange: String,
        /// Routing key.
        routing_key: String,
        /// Last error.
        reason: String,
    },
    /// The message can never be published (a property too long for AMQP, a body too large);
    /// refused before sending.
    #[error("message `{message_id}` cannot be published: {reason}")]
    Unpublishable {
        /// The message id (bounded).
        message_id: String,
        /// Why.
        reason: String,
    },
    /// The broker ended a consumer (queue deleted, channel closed).
    #[error("consumer on `{0}` ended")]
    ConsumerEnded(String),
    /// Any other client error.
    #[error("broker: {0}")]
    Lapin(#[from] lapin::Error),
}

/// Settings the broker needs.
#[derive(Debug, Clone)]
pub struct BrokerOptions {
    /// Node URLs, tried in order.
    pub urls: Vec<SecretString>,
    /// Shown in the management UI.
    pub connection_name: String,
    /// First reconnect delay.
    pub reconnect_initial: Duration,
    /// Longest reconnect delay.
    pub reconnect_max: Duration,
    /// How long a publish waits for its confirm.
    pub confirm_timeout: Duration,
    /// Set as the AMQP `user_id` of every publish: the service's own RabbitMQ user, when
    /// `security.publishers` is on (RabbitMQ refuses a `user_id` that is not the connection's,
    /// so it proves a message came from the service).
    pub user_id: Option<String>,
}

impl BrokerOptions {
    /// From the configuration.
    pub fn from_settings(settings: &crate::config::Settings) -> Self {
        let r = &settings.rabbitmq;
        Self {
            urls: r.node_urls(),
            connection_name: r.connection_name.clone(),
            reconnect_initial: r.reconnect_initial(),
            reconnect_max: r.reconnect_max(),
            confirm_timeout: r.confirm_timeout(),
            user_id: (!settings.security.publishers.is_empty())
                .then(|| settings.rabbitmq.user())
                .flatten(),
        }
    }
}

/// The process's broker connection, replaced by a new one whenever it drops.
#[derive(Debug)]
pub struct Broker {
    options: BrokerOptions,
    topology: Topology,
    current: watch::Sender<Option<Arc<Connection>>>,
    declared: std::sync::atomic::AtomicBool,
    /// Index in the node list of the node last connected to; a reconnect tries the next first.
    node: std::sync::atomic::AtomicUsize,
}

impl Broker {
    /// Connects to the first node that answers and declares the topology.
    ///
    /// # Errors
    /// [`BrokerError::Connect`] when no node answers; [`BrokerError::Topology`] when the layout
    /// is refused (e.g. another partition count).
    pub async fn connect(
        options: BrokerOptions,
        topology: Topology,
    ) -> Result<Arc<Self>, BrokerError> {
        let (connection, node) = connect_any(&options, 0).await?;
        topology.declare(&connection).await?;
        let (current, _) = watch::channel(Some(Arc::new(connection)));
        Ok(Arc::new(Self {
            options,
            topology,
            current,
            declared: std::sync::atomic::AtomicBool::new(true),
            node: std::sync::atomic::AtomicUsize::new(node),
        }))
    }

    /// The topology this broker declared.
    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// True while a connection is up and the topology declared on it.
    pub fn is_ready(&self) -> bool {
        self.declared.load(std::sync::atomic::Ordering::Relaxed)
            && self
                .current
                .borrow()
                .as_ref()
                .is_some_and(|c| c.status().connected())
    }

    /// The current connection, waiting for a reconnect if there is none.
    ///
    /// # Errors
    /// [`BrokerError::Shutdown`] when `shutdown` fires first.
    pub async fn connection(
        &self,
        shutdown: &CancellationToken,
    ) -> Result<Arc<Connection>, BrokerError> {
        let mut rx = self.current.subscribe();
        loop {
            if let Some(c) = rx.borrow_and_update().as_ref() {
                if c.status().connected() {
                    return Ok(c.clone());
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Err(BrokerError::Shutdown),
                changed = rx.changed() => if changed.is_err() { return Err(BrokerError::Shutdown) },
                // A connection that dies is noticed by the supervisor; poll in case we raced it.
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
    }

    /// Watches the connection and replaces it when it drops: reconnect with backoff (next node
    /// in the list first), redeclare, publish the new connection. Returns when `shutdown` fires,
    /// after closing the connection.
    pub async fn supervise(self: Arc<Self>, shutdown: CancellationToken) {
        let mut delay = self.options.reconnect_initial;
        loop {
            let current = self.current.borrow().clone();
            match current {
                Some(conn) if conn.status().connected() => {
                    delay = self.options.reconnect_initial;
                    tokio::select! {
                        _ = shutdown.cancelled() => {
                            let _ = conn.close(200, "shutdown".into()).await;
                            self.current.send_replace(None);
                            return;
                        }
                        _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                    }
                }
                _ => {
                    if self.current.borrow().is_some() {
                        warn!(node = %self.node(), "broker connection lost; reconnecting");
                        self.current.send_replace(None);
                        self.declared
                            .store(false, std::sync::atomic::Ordering::Relaxed);
                        metrics::counter!("video_broker_reconnects_total").increment(1);
                    }
                    let attempt = async {
                        // The node we lost is the last one tried: start with the next.
                        let start = self.node.load(std::sync::atomic::Ordering::Relaxed) + 1;
                        let (conn, node) = connect_any(&self.options, start).await?;
                        self.node.store(node, std::sync::atomic::Ordering::Relaxed);
                        self.topology.declare(&conn).await?;
                        Ok::<_, BrokerError>(conn)
                    };
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        result = attempt => match result {
                            Ok(conn) => {
                                info!(node = %self.node(), "broker connection re-established and topology redeclared");
                                self.declared.store(true, std::sync::atomic::Ordering::Relaxed);
                                self.current.send_replace(Some(Arc::new(conn)));
                            }
                            Err(e) => {
                                warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "reconnect failed");
                                tokio::select! {
                                    _ = shutdown.cancelled() => return,
                                    _ = tokio::time::sleep(jitter(delay)) => {}
                                }
                                delay = (delay * 2).min(self.options.reconnect_max);
                            }
                        }
                    }
                }
            }
        }
    }
}

fn jitter(d: Duration) -> Duration {
    let ms = d.as_millis() as u64;
    Duration::from_millis(ms / 2 + rand::rng().random_range(0..=ms / 2 + 1))
}

impl Broker {
    /// The redacted URL of the node in use.
    pub fn node(&self) -> String {
        let i = self.node.load(std::sync::atomic::Ordering::Relaxed);
        self.options
            .urls
            .get(i)
            .map(|u| redact_url(u.expose_secret()))
            .unwrap_or_default()
    }
}

/// Tries every node once, starting at index `start` (wrapping), and returns the first that
/// answers with its index.
async fn connect_any(
    options: &BrokerOptions,
    start: usize,
) -> Result<(Connection, usize), BrokerError> {
    let mut last = String::from("no URL configured");
    let n = options.urls.len();
    for i in (0..n).map(|k| (start + k) % n) {
        let url = &options.urls[i];
        let props = ConnectionProperties::default()
            .with_connection_name(options.connection_name.as_str().into());
        match tokio::time::timeout(
            Duration::from_secs(10),
            Connection::connect(url.expose_secret(), props),
        )
        .await
        {
            Ok(Ok(conn)) => {
                info!(node = %redact_url(url.expose_secret()), index = i, "connected to RabbitMQ");
                return Ok((conn, i));
            }
            Ok(Err(e)) => last = e.to_string(),
            Err(_) => last = "timed out after 10 s".to_owned(),
        }
        debug!(node = %redact_url(url.expose_secret()), error = %last, "node did not answer");
    }
    Err(BrokerError::Connect {
        urls: options
            .urls
            .iter()
            .map(|u| redact_url(u.expose_secret()))
            .collect::<Vec<_>>()
            .join(", "),
        reason: last,
    })
}

fn properties(message: &Envelope, user_id: Option<&str>) -> BasicProperties {
    {
        let mut headers = FieldTable::default();
        headers.insert(
            VIRTUAL_KEY_HEADER.into(),
            AMQPValue::LongString(message.virtual_key.as_str().into()),
        );
        if let Some(tp) = &message.traceparent {
            headers.insert(
                TRACEPARENT_HEADER.into(),
                AMQPValue::LongString(tp.as_str().into()),
            );
        }
        for (k, v) in &message.extra_headers {
            headers.insert(k.as_str().into(), AMQPValue::LongString(v.as_str().into()));
        }
        let properties = BasicProperties::default()
            .with_content_type(
                message
                    .content_type
                    .as_deref()
                    .unwrap_or("application/json")
                    .into(),
            )
            .with_delivery_mode(2)
            .with_message_id(message.message_id.as_str().into())
            .with_type(message.message_type.as_str().into())
            .with_correlation_id(message.correlation_id.as_str().into())
            .with_timestamp(u64::try_from(Utc::now().timestamp()).unwrap_or(0))
            .with_headers(headers);
        match user_id {
            Some(user) => properties.with_user_id(user.into()),
            None => properties,
        }
    }
}

/// Publishes with confirms. Cheap to clone; every clone shares one confirm channel, on which
/// many publishes are in flight at once (one publish waiting for its own confirm before the next
/// caps a channel near 1k msg/s here).
#[derive(Debug, Clone)]
pub struct Publisher {
    broker: Arc<Broker>,
    channel: Arc<Mutex<Option<Channel>>>,
    shutdown: CancellationToken,
    park_sink: Option<Arc<dyn ParkSink>>,
    masstransit: Option<Arc<MassTransit>>,
}

/// Also records parked messages elsewhere (the `parked_messages` table), so operators can list
/// and requeue them without consuming the parking queue.
#[async_trait::async_trait]
pub trait ParkSink: Send + Sync + std::fmt::Debug {
    /// Records `delivery`, parked for `reason`. Failures are the sink's to log: the message is
    /// in the parking queue either way.
    async fn record(&self, delivery: &Incoming, reason: &str);
}

impl Publisher {
    /// A publisher on `broker`. `shutdown` stops waiting for a reconnect.
    pub fn new(broker: Arc<Broker>, shutdown: CancellationToken) -> Self {
        Self {
            broker,
            channel: Arc::new(Mutex::new(None)),
            shutdown,
            park_sink: None,
            masstransit: None,
        }
    }

    /// Also publishes every event on `video.events` as a MassTransit envelope to its
    /// `{namespace}:{EventName}` exchange (`interop.masstransit`; `None`: off).
    #[must_use]
    pub fn with_masstransit(mut self, masstransit: Option<Arc<MassTransit>>) -> Self {
        self.masstransit = masstransit;
        self
    }

    /// Records every parked message in `sink` too.
    #[must_use]
    pub fn with_park_sink(mut self, sink: Arc<dyn ParkSink>) -> Self {
        self.park_sink = Some(sink);
        self
    }

    /// The broker.
    pub fn broker(&self) -> &Arc<Broker> {
        &self.broker
    }

    async fn confirm_channel(&self) -> Result<Channel, BrokerError> {
        let mut guard = self.channel.lock().await;
        if let Some(ch) = guard.as_ref() {
            if ch.status().connected() {
                return Ok(ch.clone());
            }
        }
        let conn = self.broker.connection(&self.shutdown).await?;
        let ch = conn.create_channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        *guard = Some(ch.clone());
        Ok(ch)
    }

    /// Publishes and waits for the broker's confirm; with MassTransit interop on, an event on
    /// `video.events` is published together with its MassTransit copy, and this returns once both
    /// are confirmed (an error for either: the caller sends both again, with the same message id,
    /// so the copy is exactly as at-least-once and as ordered per task as the event).
    ///
    /// # Errors
    /// As [`Self::publish_one`], for the event or its copy. A copy that could never be published
    /// (over the broker's size limit) is logged and left out: it must not hold up the event.
    pub async fn publish(&self, message: &Envelope) -> Result<(), BrokerError> {
        let Some(copy) = self.masstransit.as_ref().and_then(|mt| mt.copy_of(message)) else {
            return self.publish_one(message).await;
        };
        let (ours, theirs) = tokio::join!(self.publish_one(message), self.publish_one(&copy));
        ours?;
        match theirs {
            Err(e @ BrokerError::Unpublishable { .. }) => {
                warn!(exchange = %copy.exchange, error = %e, "MassTransit copy left out: it can never be published");
                Ok(())
            }
            other => other,
        }
    }

    /// Publishes one message and waits for the broker's confirm. Connection and channel failures
    /// are retried (the same `message_id` is re-sent) until the message is confirmed, refused, or
    /// the process shuts down; an unroutable mandatory message is an error at once. A nack is
    /// re-sent on a fresh channel for up to `confirm_timeout`, then it is an error.
    ///
    /// Why a nack is retried on a new channel: on RabbitMQ 3.10, a channel whose first publish to
    /// a quorum queue comes while the queue still names a dead node as its leader (the moments
    /// after that node died, before the election) keeps nacking every publish to that queue for
    /// as long as the channel lives. A channel opened after the election works.
    ///
    /// # Errors
    /// [`BrokerError::Unpublishable`], [`BrokerError::Nacked`], [`BrokerError::Unroutable`],
    /// [`BrokerError::Shutdown`], or [`BrokerError::Unconfirmed`] after repeated failures.
    pub async fn publish_one(&self, message: &Envelope) -> Result<(), BrokerError> {
        if let Some(reason) = message.unpublishable() {
            return Err(BrokerError::Unpublishable {
                message_id: truncate(&message.message_id, 80),
                reason,
            });
        }
        let mut attempt = 0u32;
        let started = std::time::Instant::now();
        loop {
            attempt += 1;
            let result = self.publish_once(message).await;
            match result {
                Ok(()) => {
                    metrics::counter!("video_broker_published_total").increment(1);
                    return Ok(());
                }
                Err(e @ (BrokerError::Unroutable { .. } | BrokerError::Shutdown)) => return Err(e),
                Err(e @ BrokerError::Nacked { .. })
                    if started.elapsed() >= self.broker.options.confirm_timeout =>
                {
                    return Err(e)
                }
                Err(e) if attempt >= 20 => {
                    return Err(BrokerError::Unconfirmed {
                        exchange: message.exchange.clone(),
                        routing_key: message.routing_key.clone(),
                        reason: e.to_string(),
                    })
                }
                Err(e) => {
                    debug!(error = %e, attempt, "publish not confirmed; re-sending");
                    metrics::counter!("video_broker_republished_total").increment(1);
                    // Drop the channel so the next attempt opens a fresh one.
                    self.channel.lock().await.take();
                    tokio::select! {
                        _ = self.shutdown.cancelled() => return Err(BrokerError::Shutdown),
                        _ = tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt.min(20)))) => {}
                    }
                }
            }
        }
    }

    async fn publish_once(&self, message: &Envelope) -> Result<(), BrokerError> {
        let channel = self.confirm_channel().await?;
        let confirm = channel
            .basic_publish(
                message.exchange.as_str().into(),
                message.routing_key.as_str().into(),
                BasicPublishOptions {
                    mandatory: message.mandatory,
                    ..BasicPublishOptions::default()
                },
                &message.body,
                properties(message, self.broker.options.user_id.as_deref()),
            )
            .await?;
        let confirmation = tokio::time::timeout(self.broker.options.confirm_timeout, confirm)
            .await
            .map_err(|_| BrokerError::Unconfirmed {
                exchange: message.exchange.clone(),
                routing_key: message.routing_key.clone(),
                reason: "confirm timed out".to_owned(),
            })??;
        match confirmation {
            Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
            Confirmation::Ack(Some(returned)) => Err(BrokerError::Unroutable {
                exchange: message.exchange.clone(),
                routing_key: message.routing_key.clone(),
                reply: returned.reply_text.to_string(),
            }),
            Confirmation::Nack(_) => Err(BrokerError::Nacked {
                exchange: message.exchange.clone(),
                routing_key: message.routing_key.clone(),
            }),
        }
    }

    /// Parks a delivery in `video.parking` with the reason in a header. Keeps the original body,
    /// properties and headers.
    ///
    /// # Errors
    /// When the parking queue cannot take it (the caller must not ack then).
    pub async fn park(&self, delivery: &Incoming, reason: &str) -> Result<(), BrokerError> {
        let mut extra = vec![
            (PARKED_REASON_HEADER.to_owned(), truncate(reason, 1000)),
            (ORIGINAL_QUEUE_HEADER.to_owned(), delivery.queue.clone()),
            (
                PARKED_AT_HEADER.to_owned(),
                crate::messages::rfc3339(crate::messages::now()),
            ),
            (
                "x-original-routing-key".to_owned(),
                delivery.routing_key.clone(),
            ),
        ];
        if !delivery.exchange.is_empty() {
            extra.push(("x-original-exchange".to_owned(), delivery.exchange.clone()));
        }
        if delivery.retry_attempt > 0 {
            extra.push((
                RETRY_ATTEMPT_HEADER.to_owned(),
                delivery.retry_attempt.to_string(),
            ));
        }
        let message = delivery.copy_to(self.broker.topology().parking_queue(), extra);
        self.publish_one(&message).await?;
        if let Some(sink) = &self.park_sink {
            sink.record(delivery, reason).await;
        }
        metrics::counter!("video_parked_messages_total", "queue" => delivery.queue.clone())
            .increment(1);
        Ok(())
    }
}

pub(crate) use crate::messages::truncate;
