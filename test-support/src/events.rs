//! Reading what the broker carries: [`EventCollector`] for `video.events`, [`header`] and
//! [`consume_unacked`] for any delivery.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Channel, Connection, Consumer};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A consumer on `queue` with automatic acknowledgement (`no_ack`): for reading a queue out, where
/// what was delivered is gone.
///
/// # Errors
/// The broker's (a missing queue included).
pub async fn consume_unacked(channel: &Channel, queue: &str) -> lapin::Result<Consumer> {
    channel
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
}

/// A string header of a delivery.
pub fn header(delivery: &Delivery, name: &str) -> Option<String> {
    let headers = delivery.properties.headers().as_ref()?;
    match headers.inner().get(&ShortString::from(name))? {
        AMQPValue::LongString(s) => Some(s.to_string()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        _ => None,
    }
}

/// One message seen on `video.events`.
#[derive(Debug, Clone)]
pub struct Event {
    /// Routing key, e.g. `video.generation.completed`.
    pub routing_key: String,
    /// The AMQP `type` property, e.g. `VideoGenerationCompleted`.
    pub message_type: Option<String>,
    /// The AMQP `message_id` property.
    pub message_id: Option<String>,
    /// The AMQP `correlation_id` property (the request id).
    pub correlation_id: Option<String>,
    /// The `x-virtual-key` header.
    pub virtual_key: Option<String>,
    /// The `traceparent` header.
    pub traceparent: Option<String>,
    /// The body; a body that is not JSON is kept as a JSON string.
    pub body: serde_json::Value,
}

impl Event {
    /// The body's `requestId`.
    pub fn request_id(&self) -> Option<&str> {
        self.body.get("requestId")?.as_str()
    }

    /// True for `routing_key` about `request_id`.
    pub fn is(&self, routing_key: &str, request_id: &str) -> bool {
        self.routing_key == routing_key && self.request_id() == Some(request_id)
    }

    fn from_delivery(delivery: &Delivery) -> Self {
        let body = serde_json::from_slice(&delivery.data).unwrap_or_else(|_| {
            serde_json::Value::String(String::from_utf8_lossy(&delivery.data).into_owned())
        });
        let props = &delivery.properties;
        Self {
            routing_key: delivery.routing_key.to_string(),
            message_type: props.kind().as_ref().map(ToString::to_string),
            message_id: props.message_id().as_ref().map(ToString::to_string),
            correlation_id: props.correlation_id().as_ref().map(ToString::to_string),
            virtual_key: header(delivery, video_orchestrator::topology::VIRTUAL_KEY_HEADER),
            traceparent: header(delivery, video_orchestrator::broker::TRACEPARENT_HEADER),
            body,
        }
    }
}

/// Collects every event published to one `video.events` exchange, through an exclusive,
/// auto-delete queue bound with `#`.
///
/// The consumer runs in a task this collector owns: [`EventCollector::close`] stops it and
/// waits for it; dropping the collector aborts it.
#[derive(Debug)]
pub struct EventCollector {
    events: Arc<Mutex<Vec<Event>>>,
    arrived: watch::Receiver<usize>,
    channel: lapin::Channel,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl EventCollector {
    pub(crate) async fn start(connection: &Connection, exchange: &str) -> Self {
        let channel = connection.create_channel().await.expect("channel");
        let queue = channel
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("declare the collector's queue");
        let queue = queue.name().to_string();
        channel
            .queue_bind(
                queue.as_str().into(),
                exchange.into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind the collector's queue");
        let mut consumer = consume_unacked(&channel, &queue)
            .await
            .expect("consume the collector's queue");
        let events = Arc::new(Mutex::new(Vec::new()));
        let (arrived_tx, arrived) = watch::channel(0usize);
        let stop = CancellationToken::new();
        let task = tokio::spawn({
            let events = events.clone();
            let stop = stop.clone();
            async move {
                loop {
                    let next = tokio::select! {
                        _ = stop.cancelled() => return,
                        next = consumer.next() => next,
                    };
                    let Some(Ok(delivery)) = next else { return };
                    let event = Event::from_delivery(&delivery);
                    let count = {
                        let mut all = events
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner);
                        all.push(event);
                        all.len()
                    };
                    arrived_tx.send_replace(count);
                }
            }
        });
        Self {
            events,
            arrived,
            channel,
            stop,
            task: Some(task),
        }
    }

    /// Everything received so far, in arrival order.
    pub fn all(&self) -> Vec<Event> {
        self.events
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The first event (received so far or within `timeout`) that satisfies `pred`.
    pub async fn wait_for(
        &self,
        pred: impl Fn(&Event) -> bool,
        timeout: Duration,
    ) -> Option<Event> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut arrived = self.arrived.clone();
        loop {
            // Mark as seen before looking, so an event pushed after the look wakes us.
            arrived.borrow_and_update();
            if let Some(found) = self.all().into_iter().find(|e| pred(e)) {
                return Some(found);
            }
            tokio::select! {
                changed = arrived.changed() => if changed.is_err() { return None },
                _ = tokio::time::sleep_until(deadline) => return None,
            }
        }
    }

    /// Waits until at least `n` events with `routing_key` about `request_id` arrived, or
    /// `timeout` passed; returns the matching events either way (check the length).
    pub async fn wait_count(
        &self,
        routing_key: &str,
        request_id: &str,
        n: usize,
        timeout: Duration,
    ) -> Vec<Event> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut arrived = self.arrived.clone();
        loop {
            arrived.borrow_and_update();
            let matching: Vec<Event> = self
                .all()
                .into_iter()
                .filter(|e| e.is(routing_key, request_id))
                .collect();
            if matching.len() >= n {
                return matching;
            }
            tokio::select! {
                changed = arrived.changed() => if changed.is_err() { return matching },
                _ = tokio::time::sleep_until(deadline) => return matching,
            }
        }
    }

    /// Stops the consumer, waits for its task and closes the channel (deleting the queue).
    pub async fn close(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        let _ = self.channel.close(200, "collector closed".into()).await;
    }
}

impl Drop for EventCollector {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}
