//! What we send MassTransit consumers: each event of `video.events`, also as an envelope on its
//! `{namespace}:{EventName}` exchange.
//!
//! The envelope is MassTransit's (`JsonMessageEnvelope`): `messageId` (ours), `correlationId` (the
//! request id, when it is a UUID: MassTransit's ids are GUIDs), `conversationId` (the trace the
//! request started, which is the request's own `conversationId` when MassTransit sent it),
//! `sourceAddress` (our `video.events`), `destinationAddress` (the exchange), `messageType`
//! (`["urn:message:{namespace}:{EventName}"]`), `message` (our body, camelCase, unchanged),
//! `sentTime`, `headers` and `host`. AMQP properties as MassTransit's RabbitMQ transport sets
//! them: `content_type`, `message_id`, `correlation_id`, persistent.

use serde_json::{Map, Value};

use super::{guid, MassTransit, ENVELOPE_CONTENT_TYPE};
use crate::messages::Envelope;
use crate::topology::MASSTRANSIT_EVENTS;

impl MassTransit {
    /// The MassTransit copy of `event`, or `None` when it is not an event on `video.events`
    /// (commands, checks, parked copies and retries are not copied).
    pub fn copy_of(&self, event: &Envelope) -> Option<Envelope> {
        if event.exchange != self.topology.events_exchange()
            || !MASSTRANSIT_EVENTS.contains(&event.message_type.as_str())
        {
            return None;
        }
        let exchange = self.topology.masstransit_exchange(&event.message_type)?;
        // Our own bodies are JSON objects; anything else is not an event of ours to copy.
        let message: Value = serde_json::from_slice(&event.body).ok()?;
        let mut envelope = Map::new();
        let mut put = |name: &str, value: Value| {
            envelope.insert(name.to_owned(), value);
        };
        put("messageId", Value::String(event.message_id.clone()));
        if let Some(correlation) = guid(&event.correlation_id) {
            put("correlationId", Value::String(correlation.to_string()));
        }
        if let Some(conversation) = event.traceparent.as_deref().and_then(trace_id) {
            put("conversationId", Value::String(conversation.to_string()));
        }
        put(
            "sourceAddress",
            Value::String(self.address(&self.topology.events_exchange())),
        );
        put("destinationAddress", Value::String(self.address(&exchange)));
        put(
            "messageType",
            Value::Array(vec![Value::String(self.urn(&event.message_type))]),
        );
        put("message", message);
        put(
            "sentTime",
            Value::String(chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)),
        );
        put("headers", Value::Object(Map::new()));
        put("host", self.host.clone());
        Some(Envelope {
            exchange,
            routing_key: String::new(),
            body: serde_json::to_vec(&Value::Object(envelope)).unwrap_or_default(),
            content_type: Some(ENVELOPE_CONTENT_TYPE.to_owned()),
            message_id: event.message_id.clone(),
            message_type: event.message_type.clone(),
            correlation_id: event.correlation_id.clone(),
            virtual_key: event.virtual_key.clone(),
            traceparent: event.traceparent.clone(),
            extra_headers: Vec::new(),
            // A fanout exchange no consumer has bound yet drops the copy, as MassTransit's own
            // publishes are dropped.
            mandatory: false,
        })
    }
}

/// The trace id of a W3C `traceparent` as a UUID: the conversation it belongs to.
fn trace_id(traceparent: &str) -> Option<uuid::Uuid> {
    let id = traceparent.trim().split('-').nth(1)?;
    if id.len() != 32 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    uuid::Uuid::try_parse(id).ok().filter(|u| !u.is_nil())
}
