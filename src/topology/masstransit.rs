//! MassTransit's exchanges for our message types (`interop.masstransit`), declared with exactly
//! the arguments MassTransit 8.5's RabbitMQ transport gives a message type's publish exchange:
//! fanout, durable, not auto-delete, not internal, no arguments (`RabbitMqMessagePublishTopology`,
//! `FanoutExchangeTypeSelector`, `RabbitMqExchangeConfigurator`). A MassTransit service that
//! declares the same exchange then agrees with us instead of failing with PRECONDITION_FAILED.
//!
//! - `{prefix}{namespace}:VideoGenerationRequested` and `…:VideoGenerationCancelRequested`: what a
//!   MassTransit `Publish` of those types goes to. Each is bound exchange-to-exchange to
//!   `{prefix}video.generation`, a fanout exchange named after our queue and bound to it, which is
//!   the layout MassTransit gives a receive endpoint (so `Send` to `exchange:video.generation`
//!   reaches us too).
//! - `{prefix}{namespace}:{Event}` for each of [`MASSTRANSIT_EVENTS`]: we publish a copy of each
//!   event there; MassTransit consumers bind their endpoints to them.

use lapin::options::{ExchangeBindOptions, ExchangeDeclareOptions, QueueBindOptions};
use lapin::types::FieldTable;
use lapin::{Channel, ExchangeKind};

use super::{Topology, TopologyError};
use crate::messages::{
    Message, VideoGenerationCancelRequested, VideoGenerationCancelled,
    VideoGenerationCommandRejected, VideoGenerationCompleted, VideoGenerationFailed,
    VideoGenerationProgress, VideoGenerationRequested, VideoGenerationStarted,
    VideoProgressTrackingCancelled,
};

/// What MassTransit services may publish to us.
pub const MASSTRANSIT_INBOUND: [&str; 2] = [
    <VideoGenerationRequested as Message>::NAME,
    <VideoGenerationCancelRequested as Message>::NAME,
];

/// The events we also publish as MassTransit envelopes: every event of the contract that goes to
/// `video.events` for observers. Not the commands (`VideoProviderTaskFinished` is the tracker's
/// word to the generation orchestrator) nor the checks.
pub const MASSTRANSIT_EVENTS: [&str; 7] = [
    <VideoGenerationStarted as Message>::NAME,
    <VideoGenerationProgress as Message>::NAME,
    <VideoGenerationCompleted as Message>::NAME,
    <VideoGenerationFailed as Message>::NAME,
    <VideoGenerationCancelled as Message>::NAME,
    <VideoGenerationCommandRejected as Message>::NAME,
    <VideoProgressTrackingCancelled as Message>::NAME,
];

impl Topology {
    /// This topology with MassTransit's exchanges for `namespace` (tests; the service takes it
    /// from `interop.masstransit`).
    #[must_use]
    pub fn with_masstransit(mut self, namespace: impl Into<String>) -> Self {
        self.masstransit_namespace = Some(namespace.into());
        self
    }

    /// The .NET namespace of the message types, when MassTransit interop is on.
    pub fn masstransit_namespace(&self) -> Option<&str> {
        self.masstransit_namespace.as_deref()
    }

    /// `{prefix}{namespace}:{type_name}`, the exchange MassTransit publishes `type_name` to
    /// (`None` while interop is off).
    pub fn masstransit_exchange(&self, type_name: &str) -> Option<String> {
        self.masstransit_namespace
            .as_ref()
            .map(|ns| format!("{}{ns}:{type_name}", self.prefix))
    }

    /// `{prefix}video.generation` as an exchange: the receive endpoint exchange in front of our
    /// queue, named after it as MassTransit names one.
    pub fn masstransit_endpoint_exchange(&self) -> String {
        self.generation_queue()
    }

    /// Every MassTransit exchange under this prefix (none while interop is off).
    pub(super) fn masstransit_exchanges(&self) -> Vec<String> {
        if self.masstransit_namespace.is_none() {
            return Vec::new();
        }
        let mut names: Vec<String> = MASSTRANSIT_INBOUND
            .iter()
            .chain(MASSTRANSIT_EVENTS.iter())
            .filter_map(|t| self.masstransit_exchange(t))
            .collect();
        names.push(self.masstransit_endpoint_exchange());
        names
    }

    /// Declares the exchanges and bindings of the module docs; nothing while interop is off. The
    /// generation queue must exist.
    pub(super) async fn declare_masstransit(&self, channel: &Channel) -> Result<(), TopologyError> {
        if self.masstransit_namespace.is_none() {
            return Ok(());
        }
        let endpoint = self.masstransit_endpoint_exchange();
        declare_fanout(channel, &endpoint).await?;
        channel
            .queue_bind(
                self.generation_queue().as_str().into(),
                endpoint.as_str().into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        for name in MASSTRANSIT_INBOUND {
            let Some(exchange) = self.masstransit_exchange(name) else {
                continue;
            };
            declare_fanout(channel, &exchange).await?;
            channel
                .exchange_bind(
                    endpoint.as_str().into(),
                    exchange.as_str().into(),
                    "".into(),
                    ExchangeBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
        }
        for name in MASSTRANSIT_EVENTS {
            if let Some(exchange) = self.masstransit_exchange(name) {
                declare_fanout(channel, &exchange).await?;
            }
        }
        Ok(())
    }
}

/// A message type exchange as MassTransit declares it.
async fn declare_fanout(channel: &Channel, name: &str) -> Result<(), TopologyError> {
    channel
        .exchange_declare(
            name.into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                durable: true,
                auto_delete: false,
                internal: false,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|source| TopologyError::Declare {
            name: name.to_owned(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masstransit_exchanges_are_namespace_colon_type_under_the_prefix() {
        let off = Topology::new("t.", 2, vec![1000]);
        assert_eq!(off.masstransit_exchange("VideoGenerationRequested"), None);
        assert_eq!(off.all_exchanges().len(), 2);
        let on = off.with_masstransit("Contoso.Video.Contracts");
        assert_eq!(
            on.masstransit_exchange("VideoGenerationRequested")
                .as_deref(),
            Some("t.Contoso.Video.Contracts:VideoGenerationRequested")
        );
        let all = on.all_exchanges();
        assert!(all.contains(&"t.Contoso.Video.Contracts:VideoGenerationCompleted".to_owned()));
        assert!(all.contains(&"t.video.generation".to_owned()));
        // Ours, theirs for 2 commands and 7 events, and the endpoint exchange.
        assert_eq!(all.len(), 2 + 2 + 7 + 1);
    }
}
