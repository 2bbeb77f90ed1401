//! MassTransit 8.x (Apache-2.0) on RabbitMQ, read and written as MassTransit 8.5 does.
//!
//! What its services send us (`inbound`): the default envelope (`application/vnd.masstransit+json`:
//! `messageId`, `conversationId`, `messageType`, `message`, `sentTime`, … read case-insensitively),
//! the minimal envelope (only `messageType` and `message`), and raw JSON (`application/json`, the
//! bare message, the envelope's fields in transport headers: `MT-MessageType` with URNs joined by
//! `;`, `MessageId`, `ConversationId`). Each becomes one of our commands, in our contract's shape,
//! before anything else looks at it.
//!
//! What we send them (`outbound`): every event we publish on `video.events`, also as an envelope
//! to the event's `{namespace}:{EventName}` exchange.
//!
//! Sources: MassTransit's `doc/content/3.documentation/2.configuration/serialization.md`
//! (envelope, raw JSON headers), `src/MassTransit/Serialization/JsonMessageEnvelope.cs`,
//! `RawMessageSerializer.cs`, `SystemTextJsonMessageSerializer.cs` (case-insensitive names),
//! `src/MassTransit.Abstractions/MessageUrn.cs` (URNs), `MessageHeaders.cs` (header names),
//! `RabbitMqEndpointAddress.cs` (addresses), `tests/MassTransit.Tests/MinimalBody_Specs.cs`.

use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::topology::{Topology, MASSTRANSIT_INBOUND};

mod inbound;
mod outbound;

pub use inbound::{Received, Translated};

/// Content type of MassTransit's envelope (its default serializer).
pub const ENVELOPE_CONTENT_TYPE: &str = "application/vnd.masstransit+json";
/// Transport header of raw JSON naming the message types, `;`-separated.
pub const MESSAGE_TYPE_HEADER: &str = "MT-MessageType";
/// Transport header of raw JSON with the message id.
pub const MESSAGE_ID_HEADER: &str = "MessageId";
/// Transport header of raw JSON with the conversation id.
pub const CONVERSATION_ID_HEADER: &str = "ConversationId";
/// What every message type URN starts with.
pub const URN_PREFIX: &str = "urn:message:";

/// MassTransit's `HostInfo`: the process that produced a message, in the envelope's `host`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostInfo {
    /// `machineName`.
    pub machine_name: String,
    /// `processName`.
    pub process_name: String,
    /// `processId`.
    pub process_id: u32,
    /// `assembly`: the program.
    pub assembly: String,
    /// `assemblyVersion`: its version.
    pub assembly_version: String,
    /// `operatingSystemVersion`.
    pub operating_system_version: String,
}

impl HostInfo {
    /// This process on `machine_name`.
    pub fn of_this_process(machine_name: &str) -> Self {
        let process_name = std::env::current_exe()
            .ok()
            .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
            .unwrap_or_else(|| env!("CARGO_PKG_NAME").to_owned());
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        Self {
            machine_name: machine_name.to_owned(),
            process_name,
            process_id: std::process::id(),
            assembly: env!("CARGO_PKG_NAME").to_owned(),
            assembly_version: env!("CARGO_PKG_VERSION").to_owned(),
            operating_system_version: format!("{} {}", std::env::consts::OS, release.trim())
                .trim()
                .to_owned(),
        }
    }

    fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "machineName": self.machine_name,
            "processName": self.process_name,
            "processId": self.process_id,
            "assembly": self.assembly,
            "assemblyVersion": self.assembly_version,
            "operatingSystemVersion": self.operating_system_version,
        })
    }
}

/// MassTransit interop for one namespace: reads what MassTransit services send, writes what they
/// consume. Built once at start; cheap to share.
#[derive(Debug, Clone)]
pub struct MassTransit {
    topology: Topology,
    namespace: String,
    /// `rabbitmq://host[:port]/[vhost/]`: every address we write starts with it.
    address_base: String,
    host: serde_json::Value,
    /// The camelCase field names of each type we read, for reading names case-insensitively.
    fields: Vec<(&'static str, Vec<String>)>,
}

impl MassTransit {
    /// Interop for `topology`'s namespace (`None` while `interop.masstransit` is off), writing
    /// addresses on the broker at `broker_url` and `host` into what it publishes.
    pub fn new(topology: &Topology, broker_url: &str, host: HostInfo) -> Option<Self> {
        let namespace = topology.masstransit_namespace()?.to_owned();
        let fields = crate::messages::schemas()
            .into_iter()
            .filter(|(name, _, _)| MASSTRANSIT_INBOUND.contains(name))
            .map(|(name, _, schema)| {
                let names = schema
                    .get("properties")
                    .and_then(|p| p.as_object())
                    .map(|p| p.keys().cloned().collect())
                    .unwrap_or_default();
                (name, names)
            })
            .collect();
        Some(Self {
            topology: topology.clone(),
            namespace,
            address_base: address_base(broker_url),
            host: host.to_json(),
            fields,
        })
    }

    /// The .NET namespace of the message types.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// `urn:message:{namespace}:{type_name}`.
    pub fn urn(&self, type_name: &str) -> String {
        format!("{URN_PREFIX}{}:{type_name}", self.namespace)
    }

    /// MassTransit's address of the exchange `name`: `rabbitmq://{host}/{vhost}/{name}`, the
    /// vhost left out when it is `/` and the port when it is the scheme's default, as
    /// MassTransit writes them.
    pub fn address(&self, name: &str) -> String {
        format!("{}{name}", self.address_base)
    }

    /// Our type `name` if it is one MassTransit services may send us, for the message types
    /// they listed: the first URN of ours wins (MassTransit lists the type itself first, then
    /// its interfaces and base types, and delivers a message to a consumer of any of them).
    fn our_type(&self, urns: &[String]) -> Option<&'static str> {
        urns.iter().find_map(|urn| {
            let (namespace, name) = parse_urn(urn)?;
            if namespace != Some(self.namespace.as_str()) {
                return None;
            }
            MASSTRANSIT_INBOUND.iter().find(|t| **t == name).copied()
        })
    }

    fn fields_of(&self, type_name: &str) -> &[String] {
        self.fields
            .iter()
            .find(|(name, _)| *name == type_name)
            .map(|(_, names)| names.as_slice())
            .unwrap_or_default()
    }
}

/// `rabbitmq[s]://host[:port]/[vhost/]` of an AMQP URL (MassTransit's `RabbitMqEndpointAddress`).
fn address_base(broker_url: &str) -> String {
    let Ok(uri) = broker_url.parse::<lapin::uri::AMQPUri>() else {
        return "rabbitmq://localhost/".to_owned();
    };
    let (scheme, default_port) = match uri.scheme {
        lapin::uri::AMQPScheme::AMQP => ("rabbitmq", 5672),
        lapin::uri::AMQPScheme::AMQPS => ("rabbitmqs", 5671),
    };
    let port = if uri.authority.port == default_port {
        String::new()
    } else {
        format!(":{}", uri.authority.port)
    };
    let vhost = if uri.vhost == "/" || uri.vhost.is_empty() {
        String::new()
    } else {
        format!("{}/", escape_data(&uri.vhost))
    };
    format!("{scheme}://{}{port}/{vhost}", uri.authority.host)
}

/// Percent-encodes all but RFC 3986's unreserved characters, as .NET's `Uri.EscapeDataString`.
fn escape_data(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// `(namespace, type name)` of `urn:message:Namespace:TypeName` (also `urn:message:TypeName`,
/// and `urn:message:Namespace:TypeName:Assembly`, as MassTransit's `MessageUrn` reads them).
pub fn parse_urn(urn: &str) -> Option<(Option<&str>, &str)> {
    let urn = urn.trim();
    let head = urn.get(..URN_PREFIX.len())?;
    if !head.eq_ignore_ascii_case(URN_PREFIX) {
        return None;
    }
    let parts: Vec<&str> = urn[URN_PREFIX.len()..].split(':').collect();
    match parts.as_slice() {
        [name] if !name.is_empty() => Some((None, name)),
        [namespace, name, ..] if !name.is_empty() => Some((Some(namespace), name)),
        _ => None,
    }
}

/// A GUID as .NET's `Guid.TryParse` reads one (hyphenated, 32 digits, in braces or parentheses).
pub fn guid(text: &str) -> Option<Uuid> {
    let text = text.trim();
    let text = text
        .strip_prefix('(')
        .and_then(|t| t.strip_suffix(')'))
        .unwrap_or(text);
    Uuid::try_parse(text).ok()
}

/// The same UUID for the same `seed`, every time (version 8: SHA-256 of the seed).
pub fn derived_id(seed: &[u8]) -> Uuid {
    let mut hash = Sha256::new();
    hash.update(b"video-orchestrator/masstransit-id\0");
    hash.update(seed);
    let digest = hash.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_custom_bytes(bytes).into_uuid()
}

/// A message id as we carry it: the GUID MassTransit gave, or a UUID derived from whatever text
/// stood in its place.
pub fn message_id_from(text: &str) -> Uuid {
    guid(text).unwrap_or_else(|| derived_id(text.as_bytes()))
}

#[cfg(test)]
mod tests;
