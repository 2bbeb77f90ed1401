//! A message ready to publish, with its AMQP properties and headers.

use super::{encode, Message, MAX_BODY_BYTES, MAX_SHORT_STRING};

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
    /// `content_type` property; `None` is our contract's `application/json`.
    pub content_type: Option<String>,
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
            content_type: None,
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

    /// The properties as `parked_messages.headers` records them, the layout
    /// [`Envelope::from_recorded`] reads back.
    pub fn recorded_properties(&self) -> serde_json::Value {
        serde_json::json!({
            "messageId": self.message_id,
            "type": self.message_type,
            "correlationId": self.correlation_id,
            "x-virtual-key": self.virtual_key,
            "traceparent": self.traceparent,
            "contentType": self.content_type,
            "headers": record_headers(&self.extra_headers),
        })
    }

    /// A message recorded with its properties, to publish again as it was to `exchange` with
    /// `routing_key`; unroutable is an error. `properties` is the JSON object a
    /// `parked_messages` row keeps (`messageId`, `type`, `correlationId`, `x-virtual-key`,
    /// `traceparent`, `contentType`, and the other string `headers`, such as MassTransit's
    /// `MT-MessageType`); a message recorded without an id gets a fresh one.
    pub fn from_recorded(
        exchange: impl Into<String>,
        routing_key: impl Into<String>,
        body: Vec<u8>,
        properties: &serde_json::Value,
    ) -> Self {
        let text = |k: &str| {
            properties
                .get(k)
                .and_then(|v| v.as_str())
                .map(str::to_owned)
        };
        Self {
            exchange: exchange.into(),
            routing_key: routing_key.into(),
            body,
            content_type: text("contentType"),
            message_id: text("messageId").unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
            message_type: text("type").unwrap_or_default(),
            correlation_id: text("correlationId").unwrap_or_default(),
            virtual_key: text("x-virtual-key").unwrap_or_default(),
            traceparent: text("traceparent"),
            extra_headers: properties
                .get("headers")
                .and_then(|h| h.as_object())
                .map(|h| {
                    h.iter()
                        .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                        .collect()
                })
                .unwrap_or_default(),
            mandatory: true,
        }
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

/// String headers as the JSON object `parked_messages.headers` keeps under `headers`.
pub fn record_headers(headers: &[(String, String)]) -> serde_json::Value {
    serde_json::Value::Object(
        headers
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::{decode, request_json, VideoGenerationRequested};

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
    fn a_recorded_message_is_sent_again_with_its_properties() {
        let properties = serde_json::json!({
            "messageId": "m-1",
            "type": "VideoGenerationRequested",
            "correlationId": "r-1",
            "x-virtual-key": "vk-1",
            "traceparent": null,
            "redelivered": true,
        });
        let e = Envelope::from_recorded("video.events", "k", b"{}".to_vec(), &properties);
        assert_eq!(
            (e.message_id.as_str(), e.message_type.as_str()),
            ("m-1", "VideoGenerationRequested")
        );
        assert_eq!(
            (e.correlation_id.as_str(), e.virtual_key.as_str()),
            ("r-1", "vk-1")
        );
        assert_eq!(e.traceparent, None);
        assert_eq!(e.content_type, None);
        assert!(e.mandatory && e.extra_headers.is_empty());
        let fresh = Envelope::from_recorded("", "q", Vec::new(), &serde_json::json!({}));
        assert!(uuid::Uuid::parse_str(&fresh.message_id).is_ok());
    }

    #[test]
    fn recorded_properties_read_back_as_the_same_envelope() {
        let mut e = Envelope::from_recorded(
            "video.events",
            "video.generation.started",
            b"{}".to_vec(),
            &serde_json::json!({
                "messageId": "m-2", "type": "VideoGenerationStarted",
                "correlationId": "r-2", "x-virtual-key": "vk-2", "traceparent": "00-ab-cd-01",
                "contentType": "application/vnd.masstransit+json",
                "headers": {"MT-MessageType": "urn:message:A:B", "not-a-string": 1},
            }),
        );
        assert_eq!(
            e.extra_headers,
            vec![("MT-MessageType".to_owned(), "urn:message:A:B".to_owned())]
        );
        e.mandatory = false;
        let again = Envelope::from_recorded(
            e.exchange.clone(),
            e.routing_key.clone(),
            e.body.clone(),
            &e.recorded_properties(),
        );
        assert_eq!(again.message_id, "m-2");
        assert_eq!(again.correlation_id, "r-2");
        assert_eq!(again.virtual_key, "vk-2");
        assert_eq!(again.traceparent.as_deref(), Some("00-ab-cd-01"));
        assert_eq!(again.message_type, "VideoGenerationStarted");
        assert_eq!(
            again.content_type.as_deref(),
            Some("application/vnd.masstransit+json")
        );
        assert_eq!(again.extra_headers, e.extra_headers);
    }
}
