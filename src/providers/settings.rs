//! The `providers` and `routing` configuration sections, and the checks of their values.
//!
//! The checks build nothing, so the configuration can run them when it loads (`config check`
//! included) and [`super::Providers::from_settings`] runs the same ones at start-up.

use std::collections::HashMap;

use reqwest::header::HeaderValue;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use super::ProviderKind;

/// One configured provider (`providers.<name>` in the configuration).
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ProviderSettings {
    /// Selects the adapter, i.e. the protocol the provider speaks.
    pub kind: ProviderKind,
    /// Base URL, without the `/v1` suffix (e.g. `https://api.openai.com`); a path prefix is kept,
    /// so a gateway at `https://gw.example.com/openai` works.
    pub base_url: String,
    /// Sent as `Authorization: Bearer <key>`; no header is sent when empty. Never logged:
    /// `SecretString`'s `Debug` prints `[REDACTED]`.
    #[serde(default, serialize_with = "crate::redact::secret_redacted")]
    pub api_key: SecretString,
    /// Per HTTP request timeout (connect + response), also the longest wait for a concurrency
    /// permit.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// At most this many requests in flight to this provider from this process.
    #[serde(default = "default_max_concurrency")]
    pub max_concurrency: usize,
    /// OpenAI-compatible protocol only: that protocol has no cancel, only `DELETE` (which removes
    /// the video); cancel deletes only when this is `true`.
    #[serde(default)]
    pub cancel_deletes: bool,
    /// The longest `Retry-After` honoured, on submit and status: a provider asking for more
    /// (a day, or a number that would overflow a date) waits this long instead.
    #[serde(default = "default_max_retry_after_ms")]
    pub max_retry_after_ms: u64,
}

fn default_max_retry_after_ms() -> u64 {
    300_000
}

fn default_timeout_ms() -> u64 {
    10_000
}

fn default_max_concurrency() -> usize {
    64
}

/// Which provider serves which model (the `routing` configuration section).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct RoutingSettings {
    /// Exact model name → provider name.
    #[serde(default)]
    pub models: Vec<ModelRoute>,
    /// Provider for models without a route; `None` makes such models unroutable.
    #[serde(default)]
    pub default_provider: Option<String>,
}

/// One entry of `routing.models`.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ModelRoute {
    /// The model name as requested (exact match).
    pub model: String,
    /// A name configured under `providers`.
    pub provider: String,
}

/// A configuration mistake in `providers` or `routing`; the message names the offending key.
#[derive(Debug, thiserror::Error)]
pub enum ProviderConfigError {
    /// A setting has an unusable value.
    #[error("{key}: {reason}")]
    Invalid {
        /// The configuration key, e.g. `providers.sim.base_url`.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A route names a provider that is not configured.
    #[error("{key}: provider \"{provider}\" is not configured under `providers` (configured: {configured})")]
    UnknownProvider {
        /// The configuration key, e.g. `routing.default_provider`.
        key: String,
        /// The name it gave.
        provider: String,
        /// The names that are configured, comma separated.
        configured: String,
    },
    /// The HTTP client could not be built (TLS backend initialisation).
    #[error("providers.{name}: cannot build the HTTP client: {source}")]
    HttpClient {
        /// The provider's name.
        name: String,
        /// The cause.
        #[source]
        source: reqwest::Error,
    },
}

impl ProviderConfigError {
    fn invalid(provider: &str, field: &str, reason: String) -> Self {
        Self::Invalid {
            key: format!("providers.{provider}.{field}"),
            reason,
        }
    }
}

impl ProviderSettings {
    /// `timeout_ms` as a duration.
    pub fn timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.timeout_ms)
    }

    /// `max_retry_after_ms` as a duration.
    pub fn max_retry_after(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.max_retry_after_ms)
    }

    /// Checks the values of provider `name`.
    ///
    /// # Errors
    /// [`ProviderConfigError::Invalid`] naming `providers.<name>.<key>` when the base URL is not
    /// an http(s) URL with a host and without query or fragment, the timeout or the concurrency
    /// limit is zero (or the limit above what a semaphore holds), or the key cannot be sent in a
    /// header.
    pub fn validate(&self, name: &str) -> Result<(), ProviderConfigError> {
        let base_url = &self.base_url;
        let invalid_url = |reason| ProviderConfigError::invalid(name, "base_url", reason);
        let parsed = url::Url::parse(base_url)
            .map_err(|e| invalid_url(format!("\"{base_url}\" is not a URL: {e}")))?;
        if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
            return Err(invalid_url(format!(
                "\"{base_url}\" must be an http:// or https:// URL with a host"
            )));
        }
        if parsed.query().is_some() || parsed.fragment().is_some() {
            return Err(invalid_url(format!(
                "\"{base_url}\" must not have a query or fragment"
            )));
        }
        if self.max_retry_after_ms == 0 {
            return Err(ProviderConfigError::invalid(
                name,
                "max_retry_after_ms",
                "must be greater than 0".to_owned(),
            ));
        }
        if self.timeout_ms == 0 {
            return Err(ProviderConfigError::invalid(
                name,
                "timeout_ms",
                "must be greater than 0".to_owned(),
            ));
        }
        if self.max_concurrency == 0 || self.max_concurrency > Semaphore::MAX_PERMITS {
            return Err(ProviderConfigError::invalid(
                name,
                "max_concurrency",
                format!(
                    "must be between 1 and {}, got {}",
                    Semaphore::MAX_PERMITS,
                    self.max_concurrency
                ),
            ));
        }
        self.authorization(name)?;
        Ok(())
    }

    /// `Bearer <key>`, marked sensitive so that it stays out of any debug output; `None` when no
    /// key is configured.
    ///
    /// # Errors
    /// [`ProviderConfigError::Invalid`] naming `providers.<name>.api_key` when the key has
    /// characters a header cannot hold (the message never shows the key).
    pub(crate) fn authorization(
        &self,
        name: &str,
    ) -> Result<Option<HeaderValue>, ProviderConfigError> {
        let secret = self.api_key.expose_secret();
        if secret.is_empty() {
            return Ok(None);
        }
        let mut value = HeaderValue::try_from(format!("Bearer {secret}")).map_err(|_| {
            ProviderConfigError::invalid(
                name,
                "api_key",
                "contains characters not allowed in an HTTP header".to_owned(),
            )
        })?;
        value.set_sensitive(true);
        Ok(Some(value))
    }
}

impl RoutingSettings {
    /// Checks the routes against the configured `providers`.
    ///
    /// # Errors
    /// [`ProviderConfigError`] naming the key when a model is routed twice, or a route or the
    /// default provider names a provider that is not configured.
    pub fn validate(
        &self,
        providers: &HashMap<String, ProviderSettings>,
    ) -> Result<(), ProviderConfigError> {
        let unknown = |key: String, provider: &str| {
            let mut names: Vec<&str> = providers.keys().map(String::as_str).collect();
            names.sort_unstable();
            ProviderConfigError::UnknownProvider {
                key,
                provider: provider.to_owned(),
                configured: if names.is_empty() {
                    "none".to_owned()
                } else {
                    names.join(", ")
                },
            }
        };
        let mut first_index: HashMap<&str, usize> = HashMap::new();
        for (index, route) in self.models.iter().enumerate() {
            if !providers.contains_key(&route.provider) {
                return Err(unknown(
                    format!("routing.models[{index}].provider"),
                    &route.provider,
                ));
            }
            if let Some(first) = first_index.insert(route.model.as_str(), index) {
                return Err(ProviderConfigError::Invalid {
                    key: format!("routing.models[{index}].model"),
                    reason: format!(
                        "model \"{}\" is already routed by routing.models[{first}]",
                        route.model
                    ),
                });
            }
        }
        match &self.default_provider {
            Some(default) if !providers.contains_key(default) => {
                Err(unknown("routing.default_provider".to_owned(), default))
            }
            _ => Ok(()),
        }
    }
}
