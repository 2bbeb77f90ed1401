//! Broker plumbing: one connection per process with a reconnect loop, a publisher that waits for
//! confirms with many in flight, and a consumer loop with manual acks, bounded prefetch and a
//! poison-message path into `video.parking`.
//!
//! Why our own reconnect loop rather than lapin's auto-recovery: after a reconnect we must
//! redeclare the topology and re-send every unconfirmed publish, and consumers must resubscribe
//! only to the partitions this instance still holds. One supervisor that hands out the current
//! connection makes all three explicit.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    BasicRejectOptions, ConfirmSelectOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use rand::Rng;
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::{watch, Mutex, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

pub use crate::config::redact_url;
use crate::messages::Envelope;
use crate::topology::{Topology, TopologyError, VIRTUAL_KEY_HEADER};

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
/// Headers a consumer sets itself and does not carry over to a retry or a parked copy.
const OWN_HEADERS: [&str; 5] = [
    VIRTUAL_KEY_HEADER,
    TRACEPARENT_HEADER,
    RETRY_ATTEMPT_HEADER,
    RETRY_FIRST_AT_HEADER,
    RETRY_REASON_HEADER,
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
}

impl BrokerOptions {
    /// From the configuration.
    pub fn from_settings(settings: &crate::config::Settings) -> Self {
        let r = &settings.rabbitmq;
        Self {
            urls: r.node_urls(),
            connection_name: r.connection_name.clone(),
            reconnect_initial: Duration::from_millis(r.reconnect_initial_ms),
            reconnect_max: Duration::from_millis(r.reconnect_max_ms),
            confirm_timeout: Duration::from_millis(r.confirm_timeout_ms),
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

fn properties(message: &Envelope) -> BasicProperties {
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
        BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_message_id(message.message_id.as_str().into())
            .with_type(message.message_type.as_str().into())
            .with_correlation_id(message.correlation_id.as_str().into())
            .with_timestamp(u64::try_from(Utc::now().timestamp()).unwrap_or(0))
            .with_headers(headers)
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
        }
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

    /// Publishes and waits for the broker's confirm. Connection and channel failures are retried
    /// (the same `message_id` is re-sent) until the message is confirmed, refused, or the process
    /// shuts down; an unroutable mandatory message is an error at once. A nack is re-sent on a
    /// fresh channel for up to `confirm_timeout`, then it is an error.
    ///
    /// Why a nack is retried on a new channel: on RabbitMQ 3.10, a channel whose first publish to
    /// a quorum queue comes while the queue still names a dead node as its leader (the moments
    /// after that node died, before the election) keeps nacking every publish to that queue for
    /// as long as the channel lives. A channel opened after the election works.
    ///
    /// # Errors
    /// [`BrokerError::Unpublishable`], [`BrokerError::Nacked`], [`BrokerError::Unroutable`],
    /// [`BrokerError::Shutdown`], or [`BrokerError::Unconfirmed`] after repeated failures.
    pub async fn publish(&self, message: &Envelope) -> Result<(), BrokerError> {
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
                properties(message),
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
        self.publish(&message).await?;
        if let Some(sink) = &self.park_sink {
            sink.record(delivery, reason).await;
        }
        metrics::counter!("video_parked_messages_total", "queue" => delivery.queue.clone())
            .increment(1);
        Ok(())
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// A delivery, decoupled from lapin so handlers and tests can build one.
#[derive(Debug, Clone)]
pub struct Incoming {
    /// The queue it came from.
    pub queue: String,
    /// Exchange it was published to.
    pub exchange: String,
    /// Routing key.
    pub routing_key: String,
    /// Body.
    pub body: Vec<u8>,
    /// `message_id` property.
    pub message_id: Option<String>,
    /// `type` property.
    pub message_type: Option<String>,
    /// `correlation_id` property.
    pub correlation_id: Option<String>,
    /// `x-virtual-key` header.
    pub virtual_key: Option<String>,
    /// `traceparent` header.
    pub traceparent: Option<String>,
    /// Redelivered after a crash or a nack.
    pub redelivered: bool,
    /// Times the broker returned it to the queue (`x-delivery-count`, quorum queues).
    pub delivery_count: u32,
    /// Delayed retries it has had ([`RETRY_ATTEMPT_HEADER`]).
    pub retry_attempt: u32,
    /// When it first failed for a transient reason ([`RETRY_FIRST_AT_HEADER`]).
    pub retry_first_at: Option<chrono::DateTime<Utc>>,
    /// Every other string header, carried over to retries and parked copies.
    pub headers: Vec<(String, String)>,
}

impl Incoming {
    /// A delivery of `body` from `queue` with no properties (tests, tools).
    pub fn bare(queue: &str, body: Vec<u8>) -> Self {
        Self {
            queue: queue.to_owned(),
            exchange: String::new(),
            routing_key: String::new(),
            body,
            message_id: None,
            message_type: None,
            correlation_id: None,
            virtual_key: None,
            traceparent: None,
            redelivered: false,
            delivery_count: 0,
            retry_attempt: 0,
            retry_first_at: None,
            headers: Vec::new(),
        }
    }

    /// How many times this message has been handed to a consumer, this time included.
    pub fn deliveries(&self) -> u32 {
        self.retry_attempt
            .saturating_add(self.delivery_count)
            .saturating_add(1)
    }

    /// A copy for `queue` (through the default exchange): same body, properties and foreign
    /// headers, plus `extra`. The `type` falls back to the routing key, which is how a sender
    /// without the property named the message.
    fn copy_to(&self, queue: String, extra: Vec<(String, String)>) -> Envelope {
        let mut extra_headers = self.headers.clone();
        extra_headers.extend(extra);
        Envelope {
            exchange: String::new(),
            routing_key: queue,
            body: self.body.clone(),
            message_id: self
                .message_id
                .clone()
                .unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
            message_type: self
                .message_type
                .clone()
                .filter(|t| !t.is_empty())
                .unwrap_or_else(|| self.routing_key.clone()),
            correlation_id: self.correlation_id.clone().unwrap_or_default(),
            virtual_key: self.virtual_key.clone().unwrap_or_default(),
            traceparent: self.traceparent.clone(),
            extra_headers,
            mandatory: true,
        }
    }

    fn from_delivery(queue: &str, d: &lapin::message::Delivery) -> Self {
        let header = |name: &str| -> Option<String> {
            d.properties.headers().as_ref().and_then(|h| {
                h.inner()
                    .get(&ShortString::from(name))
                    .and_then(|v| match v {
                        AMQPValue::LongString(s) => Some(s.to_string()),
                        AMQPValue::ShortString(s) => Some(s.to_string()),
                        _ => None,
                    })
            })
        };
        Self {
            queue: queue.to_owned(),
            exchange: d.exchange.to_string(),
            routing_key: d.routing_key.to_string(),
            body: d.data.clone(),
            message_id: d.properties.message_id().as_ref().map(ToString::to_string),
            message_type: d.properties.kind().as_ref().map(ToString::to_string),
            correlation_id: d
                .properties
                .correlation_id()
                .as_ref()
                .map(ToString::to_string),
            virtual_key: header(VIRTUAL_KEY_HEADER),
            traceparent: header(TRACEPARENT_HEADER),
            redelivered: d.redelivered,
            // 4.3 splits the count: `x-delivery-count` holds failed deliveries only and
            // `x-acquired-count` every return; before 4.3 the first holds every return.
            delivery_count: ["x-delivery-count", "x-acquired-count"]
                .iter()
                .filter_map(|name| {
                    d.properties
                        .headers()
                        .as_ref()
                        .and_then(|h| h.inner().get(&ShortString::from(*name)))
                        .and_then(amqp_uint)
                })
                .max()
                .unwrap_or(0),
            retry_attempt: header(RETRY_ATTEMPT_HEADER)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
            retry_first_at: header(RETRY_FIRST_AT_HEADER)
                .and_then(|v| chrono::DateTime::parse_from_rfc3339(&v).ok())
                .map(|t| t.with_timezone(&Utc)),
            headers: d
                .properties
                .headers()
                .as_ref()
                .map(|h| {
                    h.inner()
                        .iter()
                        .filter(|(k, _)| {
                            let k = k.as_str();
                            // The broker's dead-lettering history belongs to that hop.
                            !OWN_HEADERS.contains(&k)
                                && !k.starts_with("x-first-death-")
                                && !k.starts_with("x-last-death-")
                        })
                        .filter_map(|(k, v)| match v {
                            AMQPValue::LongString(s) => Some((k.to_string(), s.to_string())),
                            AMQPValue::ShortString(s) => Some((k.to_string(), s.to_string())),
                            _ => None,
                        })
                        .collect()
                })
                .unwrap_or_default(),
        }
    }
}

fn amqp_uint(v: &AMQPValue) -> Option<u32> {
    match v {
        AMQPValue::LongLongInt(n) => u32::try_from(*n).ok(),
        AMQPValue::LongInt(n) => u32::try_from(*n).ok(),
        AMQPValue::LongUInt(n) => Some(*n),
        AMQPValue::ShortInt(n) => u32::try_from(*n).ok(),
        AMQPValue::ShortUInt(n) => Some(u32::from(*n)),
        AMQPValue::ShortShortInt(n) => u32::try_from(*n).ok(),
        AMQPValue::ShortShortUInt(n) => Some(u32::from(*n)),
        _ => None,
    }
}

/// What to do with a delivery once handled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Done (or deliberately dropped): acknowledge.
    Ack,
    /// Poison or unprocessable: park with this reason, then acknowledge. Never requeued.
    Park(String),
    /// Failed for a transient reason (database down): moved into a delayed retry queue, then
    /// acknowledged; parked with the reason once the consumer's retry budget is spent. Never
    /// requeued: on RabbitMQ 4.x each requeue burns one of a quorum queue's deliveries.
    Retry(String),
    /// Not started because the process is stopping: returned to the queue at once, for another
    /// instance (a redelivery the delivery limit allows for).
    Return,
}

/// Handles one delivery. Implementations decode, act, and say what to do with the message.
pub trait Handler: Send + Sync + 'static {
    /// Handles `delivery`.
    fn handle(&self, delivery: Incoming) -> impl Future<Output = Outcome> + Send;
}

/// Where and how to consume.
#[derive(Debug, Clone)]
pub struct ConsumerSpec {
    /// Queue name.
    pub queue: String,
    /// Prefetch (unacked deliveries the broker sends ahead).
    pub prefetch: u16,
    /// Bounds deliveries handled at once; share one semaphore between consumers to bound them
    /// together (all partitions of an instance).
    pub limit: Arc<Semaphore>,
    /// How long a message may keep failing with [`Outcome::Retry`] before it is parked; `None`
    /// when the queue has no retry tiers (a retry is parked at once).
    pub retry_budget: Option<Duration>,
}

/// Consumes `spec.queue` until `stop` fires, resubscribing after connection loss. Each delivery is
/// handled in a task owned by a [`TaskTracker`]; on stop the consumer is cancelled first, then
/// in-flight handlers finish and are acked before the channel closes (prefetched deliveries that
/// never started go back to the queue when the channel closes).
pub async fn consume<H: Handler>(
    broker: Arc<Broker>,
    publisher: Publisher,
    spec: ConsumerSpec,
    handler: Arc<H>,
    stop: CancellationToken,
) {
    let limit = spec.limit.clone();
    loop {
        if stop.is_cancelled() {
            return;
        }
        let conn = match broker.connection(&stop).await {
            Ok(c) => c,
            Err(_) => return,
        };
        match consume_on(&conn, &publisher, &spec, &handler, &limit, &stop).await {
            Ok(()) => return,
            Err(e) => {
                if stop.is_cancelled() {
                    return;
                }
                warn!(queue = %spec.queue, error = %e, "consumer interrupted; resubscribing");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
            }
        }
    }
}

async fn consume_on<H: Handler>(
    conn: &Connection,
    publisher: &Publisher,
    spec: &ConsumerSpec,
    handler: &Arc<H>,
    limit: &Arc<Semaphore>,
    stop: &CancellationToken,
) -> Result<(), BrokerError> {
    let channel = conn.create_channel().await?;
    channel
        .basic_qos(spec.prefetch, BasicQosOptions::default())
        .await?;
    let mut consumer = channel
        .basic_consume(
            spec.queue.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let tag = consumer.tag();
    debug!(queue = %spec.queue, "consuming");
    let tracker = TaskTracker::new();
    let result = loop {
        let next = tokio::select! {
            _ = stop.cancelled() => break Ok(()),
            n = consumer.next() => n,
        };
        let delivery = match next {
            None => break Err(BrokerError::ConsumerEnded(spec.queue.clone())),
            Some(Err(e)) => break Err(BrokerError::Lapin(e)),
            Some(Ok(d)) => d,
        };
        // The permit is taken after a delivery arrives: consumers of idle queues must not hold
        // permits that busy ones need (the limit is shared across partitions). A delivery that
        // waits here keeps its prefetch slot and goes back to the queue if we stop.
        let permit = tokio::select! {
            _ = stop.cancelled() => break Ok(()),
            p = limit.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break Ok(()) },
        };
        let incoming = Incoming::from_delivery(&spec.queue, &delivery);
        let publisher = publisher.clone();
        let handler = handler.clone();
        let retry_budget = spec.retry_budget;
        tracker.spawn(async move {
            let _permit = permit;
            let outcome = handler.handle(incoming.clone()).await;
            settle(&publisher, &delivery, &incoming, outcome, retry_budget).await;
        });
    };
    // Hand-over order: stop pulling, let in-flight handlers finish and settle, then cancel the
    // consumer; closing the channel returns prefetched deliveries that never started.
    tracker.close();
    tracker.wait().await;
    let _ = channel
        .basic_cancel(tag, BasicCancelOptions::default())
        .await;
    let _ = channel.close(200, "consumer stopped".into()).await;
    result
}

async fn settle(
    publisher: &Publisher,
    delivery: &lapin::message::Delivery,
    incoming: &Incoming,
    outcome: Outcome,
    retry_budget: Option<Duration>,
) {
    metrics::histogram!("video_message_deliveries", "queue" => incoming.queue.clone())
        .record(f64::from(incoming.deliveries()));
    let outcome = match (outcome, retry_budget) {
        (Outcome::Retry(reason), Some(budget)) => {
            match publisher.retry(incoming, &reason, budget).await {
                Ok(RetryScheduled::Yes) => Outcome::Ack,
                Ok(RetryScheduled::BudgetSpent(reason)) => Outcome::Park(reason),
                Err(e) => {
                    // Only the broker itself failing gets here; it returns the message.
                    error!(error = %e, "could not schedule a retry; returning the message");
                    Outcome::Return
                }
            }
        }
        (Outcome::Retry(reason), None) => Outcome::Park(reason),
        (other, _) => other,
    };
    let result = match outcome {
        Outcome::Ack => delivery.ack(BasicAckOptions::default()).await,
        Outcome::Park(reason) => {
            // The reason may quote a huge bad value: the log gets a bounded prefix, the header
            // and the parked_messages row keep up to 1,000 characters.
            let short = truncate(&reason, 300);
            warn!(queue = %incoming.queue, message_id = ?incoming.message_id, reason = %short, "parking message");
            match publisher.park(incoming, &reason).await {
                Ok(()) => delivery.ack(BasicAckOptions::default()).await,
                Err(e) => {
                    error!(error = %e, "could not park message; returning it to the queue");
                    return_to_queue(delivery).await
                }
            }
        }
        Outcome::Retry(_) | Outcome::Return => return_to_queue(delivery).await,
    };
    if let Err(e) = result {
        // The channel is gone: the broker returns the delivery to the queue by itself.
        debug!(error = %e, "could not settle delivery (channel closed); broker will redeliver");
    }
}

/// Gives a delivery back to the queue. Only for a process that stops or a broker that fails.
/// `basic.reject`, not `basic.nack`: from RabbitMQ 4.3 a nack with requeue no longer counts
/// towards a quorum queue's delivery limit, a reject still does (on 3.10–4.2 both count), so a
/// message that keeps coming back ends in `video.parking` on every version.
async fn return_to_queue(delivery: &lapin::message::Delivery) -> Result<bool, lapin::Error> {
    delivery.reject(BasicRejectOptions { requeue: true }).await
}

/// What [`Publisher::retry`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RetryScheduled {
    /// A copy waits in a retry queue.
    Yes,
    /// The message has been failing for longer than the budget: park it with this reason.
    BudgetSpent(String),
}

impl Publisher {
    /// Publishes a copy of `delivery` into the retry tier of its next attempt, with the attempt
    /// count, the first failure's time and `reason` in headers. The caller acknowledges the
    /// original once this returns `Yes`.
    ///
    /// # Errors
    /// When the broker does not confirm the copy (the caller must not ack then).
    pub async fn retry(
        &self,
        delivery: &Incoming,
        reason: &str,
        budget: Duration,
    ) -> Result<RetryScheduled, BrokerError> {
        let now = crate::messages::now();
        let first = delivery.retry_first_at.unwrap_or(now);
        let failing_for = (now - first).to_std().unwrap_or_default();
        if failing_for >= budget {
            return Ok(RetryScheduled::BudgetSpent(format!(
                "still failing after {} retries over {} s (generation.retry_max_ms): {reason}",
                delivery.retry_attempt,
                failing_for.as_secs()
            )));
        }
        let attempt = delivery.retry_attempt.saturating_add(1);
        let topology = self.broker.topology();
        let tier = topology.retry_tier(attempt);
        let extra = vec![
            (RETRY_ATTEMPT_HEADER.to_owned(), attempt.to_string()),
            (
                RETRY_FIRST_AT_HEADER.to_owned(),
                crate::messages::rfc3339(first),
            ),
            (RETRY_REASON_HEADER.to_owned(), truncate(reason, 1000)),
        ];
        let copy = delivery.copy_to(topology.retry_queue(tier), extra);
        self.publish(&copy).await?;
        metrics::counter!("video_message_retries_total", "queue" => delivery.queue.clone())
            .increment(1);
        info!(
            queue = %delivery.queue,
            attempt,
            retry_in_ms = tier,
            reason = %truncate(reason, 300),
            "transient failure; retrying after a delay"
        );
        Ok(RetryScheduled::Yes)
    }
}

/// Runs `fut` with a span carrying the delivery's identifiers.
pub fn delivery_span(incoming: &Incoming) -> tracing::Span {
    tracing::info_span!(
        "message",
        queue = %incoming.queue,
        message_id = incoming.message_id.as_deref().unwrap_or(""),
        message_type = incoming.message_type.as_deref().unwrap_or(""),
        request_id = incoming.correlation_id.as_deref().unwrap_or(""),
        virtual_key = incoming.virtual_key.as_deref().unwrap_or(""),
        traceparent = incoming.traceparent.as_deref().unwrap_or(""),
    )
}

/// The W3C `traceparent` for what a message causes: the same trace id with a new parent id, or a
/// new trace when the message carried none (or an invalid one).
pub fn child_traceparent(incoming: Option<&str>) -> String {
    let span_id = format!("{:016x}", rand::rng().random::<u64>() | 1);
    if let Some(tp) = incoming {
        let parts: Vec<&str> = tp.trim().split('-').collect();
        let valid = parts.len() >= 4
            && parts[0].len() == 2
            && parts[0] != "ff"
            && parts[1].len() == 32
            && parts[1].chars().all(|c| c.is_ascii_hexdigit())
            && parts[1] != "00000000000000000000000000000000"
            && parts[3].len() == 2;
        if valid {
            return format!(
                "00-{}-{span_id}-{}",
                parts[1].to_ascii_lowercase(),
                parts[3]
            );
        }
    }
    format!("00-{:032x}-{span_id}-01", rand::rng().random::<u128>() | 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_child_traceparent_keeps_the_trace_and_changes_the_parent() {
        let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let child = child_traceparent(Some(parent));
        assert!(child.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
        assert!(child.ends_with("-01"));
        assert_ne!(child, parent);
        assert_eq!(child.len(), parent.len());
    }

    #[test]
    fn a_missing_or_invalid_traceparent_starts_a_new_trace() {
        for input in [None, Some("garbage"), Some("00-0000-11-01")] {
            let tp = child_traceparent(input);
            let parts: Vec<&str> = tp.split('-').collect();
            assert_eq!(parts.len(), 4, "{tp}");
            assert_eq!(parts[1].len(), 32);
            assert_eq!(parts[2].len(), 16);
        }
    }
}
