//! What MassTransit services send us, turned into our contract.
//!
//! Which shape a delivery has: the envelope's content type; else an `MT-MessageType` header
//! (raw JSON); else, with no content type at all, a body with `messageType` and `message` (what
//! MassTransit's default deserializer assumes when the content type is missing). Anything else is
//! not MassTransit's and is read as our own contract.
//!
//! The result is a body of our contract: the payload with its names made our camelCase ones
//! (MassTransit reads names case-insensitively, and a Newtonsoft-configured sender may write
//! PascalCase), plus `messageId` (the envelope's GUID, or a UUID derived from whatever stood in
//! its place), `occurredAt` (the payload's, else `sentTime`, else now) and `version` (the
//! payload's, else 1). It is then decoded, validated and handled exactly like a body we were sent
//! directly, so a bad field is parked with a reason naming it.

use chrono::{DateTime, NaiveDateTime, Utc};
use serde_json::{Map, Value};
use uuid::Uuid;

use super::{
    derived_id, guid, message_id_from, MassTransit, CONVERSATION_ID_HEADER, ENVELOPE_CONTENT_TYPE,
    MESSAGE_ID_HEADER, MESSAGE_TYPE_HEADER,
};
use crate::messages::{now, rfc3339, truncate, DecodeError, CURRENT_VERSION};
use crate::topology::MASSTRANSIT_INBOUND;

/// A delivery, as far as reading MassTransit needs it.
#[derive(Debug, Clone, Copy)]
pub struct Received<'a> {
    /// The `content_type` property.
    pub content_type: Option<&'a str>,
    /// The `message_id` property.
    pub message_id: Option<&'a str>,
    /// String headers.
    pub headers: &'a [(String, String)],
    /// The body.
    pub body: &'a [u8],
}

/// A MassTransit message, as a message of our contract.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Translated {
    /// Our type name (`VideoGenerationRequested`, `VideoGenerationCancelRequested`).
    pub message_type: &'static str,
    /// The body in our contract's shape.
    pub body: Vec<u8>,
    /// The W3C `traceparent` of the conversation: its trace id is the `conversationId`.
    pub traceparent: Option<String>,
    /// Where the payload sat in what was sent (`message` in an envelope, empty for raw JSON), so
    /// a decode error names the field as the sender wrote it ([`DecodeError::within`]).
    pub payload_path: &'static str,
}

enum Shape {
    Envelope,
    /// Raw JSON with these message type URNs.
    Raw(Vec<String>),
}

impl MassTransit {
    /// `d` as one of our commands when it is MassTransit's; `None` when it is not (read it as our
    /// own contract).
    ///
    /// # Errors
    /// [`DecodeError`] naming the envelope field or header that is wrong (the delivery is
    /// parked); fields of the payload are checked when the translated body is decoded.
    pub fn read(&self, d: &Received<'_>) -> Option<Result<Translated, DecodeError>> {
        Some(match shape(d)? {
            Shape::Envelope => self.read_envelope(d),
            Shape::Raw(urns) => self.read_raw(d, &urns),
        })
    }

    fn read_envelope(&self, d: &Received<'_>) -> Result<Translated, DecodeError> {
        let value: Value =
            serde_json::from_slice(d.body).map_err(|e| DecodeError::NotJson(e.to_string()))?;
        let Value::Object(envelope) = value else {
            return Err(field(
                ".",
                "expected a JSON object (a MassTransit envelope)",
            ));
        };
        let get = |name: &str| lookup(&envelope, name).filter(|v| !v.is_null());
        let urns = match get("messageType") {
            None => return Err(field("messageType", "missing field")),
            Some(Value::String(urn)) => vec![urn.clone()],
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.as_str().map(str::to_owned))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| field("messageType", "expected a list of URN strings"))?,
            Some(other) => {
                return Err(field(
                    "messageType",
                    &format!("expected a list of URNs, found {}", kind(other)),
                ))
            }
        };
        let message_type = self.inbound_type("messageType", &urns)?;
        let payload = match get("message") {
            None => return Err(field("message", "missing field")),
            Some(Value::Object(payload)) => payload.clone(),
            Some(other) => {
                return Err(field(
                    "message",
                    &format!("expected a JSON object, found {}", kind(other)),
                ))
            }
        };
        let message_id = get("messageId")
            .and_then(Value::as_str)
            .or(d.message_id)
            .map_or_else(|| derived_id(d.body), message_id_from);
        let conversation = get("conversationId").and_then(Value::as_str).and_then(guid);
        let sent = get("sentTime").and_then(Value::as_str).and_then(parse_time);
        Ok(self.translate(
            message_type,
            payload,
            message_id,
            sent,
            conversation,
            "message",
        ))
    }

    fn read_raw(&self, d: &Received<'_>, urns: &[String]) -> Result<Translated, DecodeError> {
        let message_type = self.inbound_type(MESSAGE_TYPE_HEADER, urns)?;
        let value: Value =
            serde_json::from_slice(d.body).map_err(|e| DecodeError::NotJson(e.to_string()))?;
        let Value::Object(payload) = value else {
            return Err(field(".", "expected a JSON object"));
        };
        let message_id = header(d.headers, MESSAGE_ID_HEADER)
            .or(d.message_id)
            .map_or_else(|| derived_id(d.body), message_id_from);
        let conversation = header(d.headers, CONVERSATION_ID_HEADER).and_then(guid);
        Ok(self.translate(message_type, payload, message_id, None, conversation, ""))
    }

    /// Our type among `urns`, or an error naming where they came from (`messageType` or the
    /// `MT-MessageType` header) and what this endpoint takes.
    fn inbound_type(&self, from: &str, urns: &[String]) -> Result<&'static str, DecodeError> {
        self.our_type(urns).ok_or_else(|| {
            let takes: Vec<String> = MASSTRANSIT_INBOUND.iter().map(|t| self.urn(t)).collect();
            field(
                from,
                &format!(
                    "names no message type this endpoint takes ({}); got {}",
                    takes.join(", "),
                    truncate(&format!("{urns:?}"), 300)
                ),
            )
        })
    }

    fn translate(
        &self,
        message_type: &'static str,
        payload: Map<String, Value>,
        message_id: Uuid,
        sent: Option<DateTime<Utc>>,
        conversation: Option<Uuid>,
        payload_path: &'static str,
    ) -> Translated {
        let mut body = ours(payload, self.fields_of(message_type));
        body.insert("messageId".into(), Value::String(message_id.to_string()));
        if body.get("occurredAt").is_none_or(Value::is_null) {
            let at = rfc3339(sent.unwrap_or_else(now));
            body.insert("occurredAt".into(), Value::String(at));
        }
        if body.get("version").is_none_or(Value::is_null) {
            body.insert("version".into(), Value::from(CURRENT_VERSION));
        }
        Translated {
            message_type,
            body: serde_json::to_vec(&Value::Object(body)).unwrap_or_default(),
            traceparent: conversation
                .filter(|c| !c.is_nil())
                .map(|c| traceparent(c, message_id)),
            payload_path,
        }
    }
}

fn shape(d: &Received<'_>) -> Option<Shape> {
    let media = d
        .content_type
        .map(|c| {
            c.split(';')
                .next()
                .unwrap_or_default()
                .trim()
                .to_ascii_lowercase()
        })
        .filter(|m| !m.is_empty());
    if media.as_deref() == Some(ENVELOPE_CONTENT_TYPE) {
        return Some(Shape::Envelope);
    }
    if let Some(types) = header(d.headers, MESSAGE_TYPE_HEADER) {
        let urns: Vec<String> = types
            .split(';')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(str::to_owned)
            .collect();
        if !urns.is_empty() {
            return Some(Shape::Raw(urns));
        }
    }
    if media.is_none() {
        if let Ok(Value::Object(body)) = serde_json::from_slice::<Value>(d.body) {
            if lookup(&body, "messageType").is_some() && lookup(&body, "message").is_some() {
                return Some(Shape::Envelope);
            }
        }
    }
    None
}

/// `name` in `object`, case-insensitively (an exact match first).
fn lookup<'a>(object: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    object.get(name).or_else(|| {
        object
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    })
}

/// A transport header, its name read case-insensitively as MassTransit reads headers.
fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// `payload` with each name that matches one of `fields` case-insensitively spelled as the field
/// is; a name written exactly as the field wins over another spelling of it. Other names stay.
fn ours(payload: Map<String, Value>, fields: &[String]) -> Map<String, Value> {
    let mut out = Map::new();
    let mut rest = Vec::new();
    for (name, value) in payload {
        if fields.contains(&name) {
            out.insert(name, value);
        } else {
            rest.push((name, value));
        }
    }
    for (name, value) in rest {
        let name = fields
            .iter()
            .find(|f| f.eq_ignore_ascii_case(&name))
            .cloned()
            .unwrap_or(name);
        out.entry(name).or_insert(value);
    }
    out
}

/// ISO-8601 as MassTransit writes it: with an offset (`2023-01-12T21:55:53.715882Z`), or without
/// one for a `DateTime` of unspecified kind, which is read as UTC.
fn parse_time(text: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(text.trim())
        .map(|t| t.with_timezone(&Utc))
        .ok()
        .or_else(|| {
            NaiveDateTime::parse_from_str(text.trim(), "%Y-%m-%dT%H:%M:%S%.f")
                .ok()
                .map(|t| t.and_utc())
        })
}

/// A parent `traceparent` in the conversation's trace (trace id = the conversation's 128 bits),
/// its span id taken from the message id so a redelivery carries the same one.
fn traceparent(conversation: Uuid, message_id: Uuid) -> String {
    let mut span = [0u8; 8];
    span.copy_from_slice(&message_id.as_bytes()[..8]);
    format!(
        "00-{}-{:016x}-01",
        conversation.simple(),
        u64::from_be_bytes(span) | 1
    )
}

fn field(name: &str, reason: &str) -> DecodeError {
    DecodeError::Field {
        field: name.to_owned(),
        reason: reason.to_owned(),
    }
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}
