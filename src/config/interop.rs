//! `[interop]`: speaking the wire formats of other messaging frameworks beside our own contract.

use serde::{Deserialize, Serialize};

use super::{ensure, ConfigError, TopologySettings};

/// The longest message type name that gets a MassTransit exchange (`VideoGenerationCancelRequested`,
/// `VideoGenerationCommandRejected`, `VideoProgressTrackingCancelled`: 30 bytes each).
const LONGEST_TYPE_NAME: usize = 30;

/// `[interop]`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct InteropSettings {
    /// `[interop.masstransit]`.
    #[serde(default)]
    pub masstransit: MassTransitSettings,
}

/// `[interop.masstransit]`: MassTransit (8.x, RabbitMQ transport) publishers and consumers.
///
/// When enabled, `{topology.prefix}{namespace}:{TypeName}` fanout exchanges are declared the way
/// MassTransit declares them: requests and cancels published there reach `video.generation`, and
/// every event we publish on `video.events` is also published there as a MassTransit envelope.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct MassTransitSettings {
    /// Off by default.
    #[serde(default)]
    pub enabled: bool,
    /// The .NET namespace of the message types, e.g. `Contoso.Video.Contracts`: the exchanges are
    /// `{namespace}:VideoGenerationRequested` and so on, the message types
    /// `urn:message:{namespace}:VideoGenerationRequested`. No default: a guessed namespace would
    /// silently match nothing, so it must be set when `enabled` is.
    #[serde(default)]
    pub namespace: String,
}

impl MassTransitSettings {
    /// The namespace, when interop is on.
    pub fn enabled_namespace(&self) -> Option<&str> {
        self.enabled.then_some(self.namespace.as_str())
    }
}

/// Whether `namespace` is a .NET namespace: identifiers joined by `.`, each a letter or `_`
/// followed by letters, digits or `_` (C# also takes non-ASCII letters; so do we). Nothing that
/// means something in a MassTransit name: no `:` (URN separator), `+` (nested type), `/`, `?`,
/// whitespace.
pub fn is_dotnet_namespace(namespace: &str) -> bool {
    !namespace.is_empty()
        && namespace.split('.').all(|identifier| {
            let mut chars = identifier.chars();
            chars.next().is_some_and(|c| c.is_alphabetic() || c == '_')
                && chars.all(|c| c.is_alphanumeric() || c == '_')
        })
}

impl InteropSettings {
    pub(super) fn validate(&self, topology: &TopologySettings) -> Result<(), ConfigError> {
        let mt = &self.masstransit;
        if !mt.enabled {
            return Ok(());
        }
        let key = "interop.masstransit.namespace";
        ensure(
            !mt.namespace.is_empty(),
            key,
            "must be set when interop.masstransit.enabled = true: the .NET namespace of the \
             message types, e.g. Contoso.Video.Contracts",
        )?;
        ensure(
            is_dotnet_namespace(&mt.namespace),
            key,
            "must be a .NET namespace: identifiers (a letter or `_`, then letters, digits or `_`) \
             joined by `.`",
        )?;
        // `{prefix}{namespace}:{TypeName}` is an exchange name: an AMQP short string.
        let longest = topology.prefix.len() + mt.namespace.len() + 1 + LONGEST_TYPE_NAME;
        ensure(
            longest <= crate::messages::MAX_SHORT_STRING,
            key,
            &format!(
                "is too long: with topology.prefix the exchange names reach {longest} bytes; AMQP \
                 holds {}",
                crate::messages::MAX_SHORT_STRING
            ),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;

    fn load(pairs: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let vars: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Settings::load_from(&vars)
    }

    fn refused_key(pairs: &[(&str, &str)]) -> String {
        match load(pairs) {
            Err(ConfigError::Invalid { key, .. }) => key,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn masstransit_is_off_by_default_and_loads_from_the_environment() {
        let s = load(&[]).expect("defaults");
        assert_eq!(s.interop.masstransit.enabled_namespace(), None);
        let s = load(&[
            ("APP__INTEROP__MASSTRANSIT__ENABLED", "true"),
            (
                "APP__INTEROP__MASSTRANSIT__NAMESPACE",
                "Contoso.Video.Contracts",
            ),
        ])
        .expect("valid");
        assert_eq!(
            s.interop.masstransit.enabled_namespace(),
            Some("Contoso.Video.Contracts")
        );
        let printed = s.redacted().expect("prints");
        assert!(printed.contains("[interop.masstransit]"), "{printed}");
    }

    #[test]
    fn an_enabled_masstransit_without_a_valid_namespace_fails_naming_the_key() {
        let key = "interop.masstransit.namespace";
        assert_eq!(
            refused_key(&[("APP__INTEROP__MASSTRANSIT__ENABLED", "true")]),
            key
        );
        assert_eq!(
            refused_key(&[
                ("APP__INTEROP__MASSTRANSIT__ENABLED", "true"),
                ("APP__INTEROP__MASSTRANSIT__NAMESPACE", "Contoso:Video"),
            ]),
            key
        );
        let long = "N".repeat(230);
        assert_eq!(
            refused_key(&[
                ("APP__INTEROP__MASSTRANSIT__ENABLED", "true"),
                ("APP__INTEROP__MASSTRANSIT__NAMESPACE", &long),
            ]),
            key
        );
        // A bad namespace is not checked while interop is off.
        assert!(load(&[("APP__INTEROP__MASSTRANSIT__NAMESPACE", "not valid")]).is_ok());
    }

    #[test]
    fn dotnet_namespaces_are_identifiers_joined_by_dots() {
        for ok in [
            "Contoso.Video.Contracts",
            "VideoOrchestrator",
            "_Internal.V2",
            "Übung.Verträge",
        ] {
            assert!(is_dotnet_namespace(ok), "{ok}");
        }
        for bad in [
            "",
            "Contoso..Video",
            ".Contoso",
            "Contoso.",
            "Contoso.2Video",
            "Contoso:Video",
            "Contoso+Video",
            "Contoso Video",
            "Contoso/Video",
            "Contoso-Video",
        ] {
            assert!(!is_dotnet_namespace(bad), "{bad}");
        }
    }
}
