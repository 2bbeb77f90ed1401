//! The consumer loop: manual acks, bounded prefetch, handlers in owned tasks, and what happens
//! to a delivery afterwards (ack, park, delayed retry, or, only when stopping, back to the queue).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, BasicRejectOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::Connection;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use super::{
    truncate, Broker, BrokerError, Publisher, OWN_HEADERS, PUBLISHER_HEADER, RETRY_ATTEMPT_HEADER,
    RETRY_FIRST_AT_HEADER, RETRY_REASON_HEADER, TRACEPARENT_HEADER,
};
use crate::messages::Envelope;
use crate::topology::VIRTUAL_KEY_HEADER;

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
    /// `content_type` property.
    pub content_type: Option<String>,
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
    /// The AMQP `user_id` property: the publishing connection's user, RabbitMQ makes sure.
    pub user_id: Option<String>,
    /// [`PUBLISHER_HEADER`]: on the service's own copy, who published the original.
    pub vouched_publisher: Option<String>,
}

/// Who published a delivery, as far as the broker can prove it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublishedBy {
    /// The service itself (a re-driven request, a provider outcome, `submit`, a requeue).
    Service,
    /// Another RabbitMQ user.
    User(String),
    /// No `user_id`: unproven.
    Unknown,
}

impl Incoming {
    /// A delivery of `body` from `queue` with no properties (tests, tools).
    pub fn bare(queue: &str, body: Vec<u8>) -> Self {
        Self {
            queue: queue.to_owned(),
            exchange: String::new(),
            routing_key: String::new(),
            body,
            content_type: None,
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
            user_id: None,
            vouched_publisher: None,
        }
    }

    /// Who published this, given the service's own RabbitMQ user: a message with the service's
    /// `user_id` is the service's, or (a delayed retry's copy) the user it vouches for.
    pub fn published_by(&self, service_user: &str) -> PublishedBy {
        match (&self.user_id, &self.vouched_publisher) {
            (Some(u), Some(original)) if u == service_user => PublishedBy::User(original.clone()),
            (Some(u), None) if u == service_user => PublishedBy::Service,
            (Some(u), _) => PublishedBy::User(u.clone()),
            (None, _) => PublishedBy::Unknown,
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
    pub(crate) fn copy_to(&self, queue: String, extra: Vec<(String, String)>) -> Envelope {
        let mut extra_headers = self.headers.clone();
        extra_headers.extend(extra);
        Envelope {
            exchange: String::new(),
            routing_key: queue,
            body: self.body.clone(),
            content_type: self.content_type.clone(),
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
            content_type: d
                .properties
                .content_type()
                .as_ref()
                .map(ToString::to_string),
            message_id: d.properties.message_id().as_ref().map(ToString::to_string),
            message_type: d.properties.kind().as_ref().map(ToString::to_string),
            correlation_id: d
                .properties
                .correlation_id()
                .as_ref()
                .map(ToString::to_string),
            virtual_key: header(VIRTUAL_KEY_HEADER),
            traceparent: header(TRACEPARENT_HEADER),
            user_id: d.properties.user_id().as_ref().map(ToString::to_string),
            vouched_publisher: header(PUBLISHER_HEADER),
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
        let mut extra = vec![
            (RETRY_ATTEMPT_HEADER.to_owned(), attempt.to_string()),
            (
                RETRY_FIRST_AT_HEADER.to_owned(),
                crate::messages::rfc3339(first),
            ),
            (RETRY_REASON_HEADER.to_owned(), truncate(reason, 1000)),
        ];
        // The copy is published as the service: it vouches for the original's publisher.
        if let Some(service) = &self.broker.options.user_id {
            if let PublishedBy::User(original) = delivery.published_by(service) {
                extra.push((PUBLISHER_HEADER.to_owned(), original));
            }
        }
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

/// A span carrying the delivery's identifiers; its exported name (`otel.name`) is the handler's
/// to record before entering it, the handler's also to [`continue_trace`](super::continue_trace).
pub fn delivery_span(incoming: &Incoming) -> tracing::Span {
    tracing::info_span!(
        "message",
        otel.name = tracing::field::Empty,
        otel.kind = "consumer",
        queue = %incoming.queue,
        message_id = incoming.message_id.as_deref().unwrap_or(""),
        message_type = incoming.message_type.as_deref().unwrap_or(""),
        request_id = incoming.correlation_id.as_deref().unwrap_or(""),
        virtual_key = incoming.virtual_key.as_deref().unwrap_or(""),
        traceparent = incoming.traceparent.as_deref().unwrap_or(""),
    )
}
