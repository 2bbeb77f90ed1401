//! A client of the service, as another service would be: publishes requests and cancels to
//! `video.events` and follows the lifecycle events on a queue of its own. Used by the `submit`,
//! `cancel` and `demo` commands and by tests.

use std::sync::Arc;

use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::Connection;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::broker::{Broker, BrokerError, Publisher};
use crate::messages::{Meta, VideoGenerationCancelRequested, VideoGenerationRequested};
use crate::topology::Topology;

/// One event seen on `video.events`.
#[derive(Debug, Clone)]
pub struct Event {
    /// Routing key, e.g. `video.generation.completed`.
    pub routing_key: String,
    /// `type` property.
    pub message_type: String,
    /// Decoded body.
    pub body: Value,
}

impl Event {
    /// The body's `requestId`.
    pub fn request_id(&self) -> &str {
        self.body
            .get("requestId")
            .and_then(Value::as_str)
            .unwrap_or_default()
    }

    /// The body's `messageId`.
    pub fn message_id(&self) -> &str {
        self.body
            .get("messageId")
            .and_then(Value::as_str)
            .unwrap_or_default()
    }

    /// True for completed, failed and cancelled.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self.routing_key.as_str(),
            "video.generation.completed" | "video.generation.failed" | "video.generation.cancelled"
        )
    }
}

/// A subscription to every event on `video.events`, on an exclusive auto-delete queue.
#[derive(Debug)]
pub struct EventStream {
    consumer: lapin::Consumer,
    _channel: lapin::Channel,
}

impl EventStream {
    /// Binds a private queue to `video.events` for `routing_keys` (`#` for all). Bind before
    /// publishing so nothing is missed.
    ///
    /// # Errors
    /// Broker errors.
    pub async fn subscribe(
        connection: &Connection,
        topology: &Topology,
        routing_keys: &[&str],
    ) -> Result<Self, lapin::Error> {
        let channel = connection.create_channel().await?;
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
            .await?;
        for key in routing_keys {
            channel
                .queue_bind(
                    queue.name().clone(),
                    topology.events_exchange().as_str().into(),
                    (*key).into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
        }
        let consumer = channel
            .basic_consume(
                queue.name().clone(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(Self {
            consumer,
            _channel: channel,
        })
    }

    /// The next event, or `None` when the subscription ends.
    pub async fn next(&mut self) -> Option<Event> {
        loop {
            let delivery = match self.consumer.next().await? {
                Ok(d) => d,
                Err(_) => return None,
            };
            let _ = delivery.ack(BasicAckOptions::default()).await;
            let Ok(body) = serde_json::from_slice::<Value>(&delivery.data) else {
                continue;
            };
            return Some(Event {
                routing_key: delivery.routing_key.to_string(),
                message_type: delivery
                    .properties
                    .kind()
                    .as_ref()
                    .map(ToString::to_string)
                    .unwrap_or_default(),
                body,
            });
        }
    }
}

/// Publishes requests and cancels.
#[derive(Debug, Clone)]
pub struct Client {
    broker: Arc<Broker>,
    publisher: Publisher,
}

impl Client {
    /// A client on `broker`.
    pub fn new(broker: Arc<Broker>, stop: CancellationToken) -> Self {
        Self {
            publisher: Publisher::new(broker.clone(), stop),
            broker,
        }
    }

    /// Publishes a request (confirmed) and returns its `requestId`.
    ///
    /// # Errors
    /// When the broker does not confirm it.
    pub async fn submit(&self, request: &VideoGenerationRequested) -> Result<String, BrokerError> {
        let envelope = self.broker.topology().event(request);
        self.publisher.publish(&envelope).await?;
        Ok(request.request_id.clone())
    }

    /// Publishes a cancel (confirmed).
    ///
    /// # Errors
    /// When the broker does not confirm it.
    pub async fn cancel(
        &self,
        request_id: &str,
        virtual_key_id: &str,
        reason: Option<String>,
    ) -> Result<(), BrokerError> {
        let cancel = VideoGenerationCancelRequested {
            meta: Meta::new(),
            request_id: request_id.to_owned(),
            virtual_key_id: virtual_key_id.to_owned(),
            reason,
        };
        self.publisher
            .publish(&self.broker.topology().event(&cancel))
            .await
    }

    /// A raw publish (tests send malformed bodies through it).
    pub fn publisher(&self) -> &Publisher {
        &self.publisher
    }
}

/// A new request with a fresh id.
pub fn new_request(virtual_key_id: &str, model: &str, prompt: &str) -> VideoGenerationRequested {
    VideoGenerationRequested {
        meta: Meta::new(),
        request_id: format!("req-{}", uuid::Uuid::new_v4().simple()),
        virtual_key_id: virtual_key_id.to_owned(),
        model: model.to_owned(),
        prompt: prompt.to_owned(),
        duration_seconds: None,
        size: None,
        provider: None,
        callback_url: None,
        image_url: None,
        metadata: None,
    }
}
