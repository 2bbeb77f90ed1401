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
    /// The shortest wait between two status checks of one job at this provider: a floor under
    /// the tracker's interval (the kind's default when unset: Runway asks for 5 s, others none).
    #[serde(default)]
    pub min_status_interval_ms: Option<u64>,
    /// At most this many status calls per second to this provider from this instance; a check
    /// over the cap is rescheduled (never waited for), so other providers' checks go on. The
    /// kind's default when unset (none for most kinds).
    #[serde(default)]
    pub max_status_rps: Option<f64>,
    /// `fal`: the JSON pointer of the video URL in a request's result (default `/video/url`).
    #[serde(default)]
    pub output_pointer: Option<String>,
    /// `runway`: the `X-Runway-Version` header (default `2024-11-06`).
    #[serde(default)]
    pub api_version: Option<String>,
    /// `vertex_veo`: the Google Cloud project id.
    #[serde(default)]
    pub project: Option<String>,
    /// `vertex_veo`: the region, e.g. `us-central1`.
    #[serde(default)]
    pub location: Option<String>,
    /// `vertex_veo`: a service-account key file (JSON); its key signs the JWT exchanged at its
    /// `token_uri` for an access token, cached until shortly before it expires.
    #[serde(default)]
    pub service_account_key_file: Option<String>,
    /// `vertex_veo`: an OAuth2 access token to send as is, instead of a key file.
    #[serde(default, serialize_with = "crate::redact::optional_secret_redacted")]
    pub access_token: Option<SecretString>,
    /// `vertex_veo`: the `gs://` prefix Veo writes videos under (`parameters.storageUri`);
    /// without it Veo answers inline bytes, which are refused.
    #[serde(default)]
    pub storage_uri: Option<String>,
    /// `kling`: the access key (the JWT's `iss`); `api_key` holds the secret key that signs it.
    #[serde(default)]
    pub access_key: Option<String>,
    /// `minimax`: the account's group id, where the protocol asks for one.
    #[serde(default)]
    pub group_id: Option<String>,
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
    /// A provider of `kind` at `base_url` with every other setting at its default (no key).
    #[must_use]
    pub fn new(kind: ProviderKind, base_url: impl Into<String>) -> Self {
        Self {
            kind,
            base_url: base_url.into(),
            api_key: SecretString::default(),
            timeout_ms: default_timeout_ms(),
            max_concurrency: default_max_concurrency(),
            cancel_deletes: false,
            max_retry_after_ms: default_max_retry_after_ms(),
            min_status_interval_ms: None,
            max_status_rps: None,
            output_pointer: None,
            api_version: None,
            project: None,
            location: None,
            service_account_key_file: None,
            access_token: None,
            storage_uri: None,
            access_key: None,
            group_id: None,
        }
    }

    /// The floor under the interval between two status checks of one job:
    /// `min_status_interval_ms`, or the kind's default.
    #[must_use]
    pub fn min_status_interval(&self) -> std::time::Duration {
        std::time::Duration::from_millis(
            self.min_status_interval_ms
                .unwrap_or_else(|| self.kind.default_min_status_interval_ms()),
        )
    }

    /// The cap on status calls per second from this instance: `max_status_rps`, or the kind's
    /// default; `None` is no cap.
    #[must_use]
    pub fn max_status_rps(&self) -> Option<f64> {
        self.max_status_rps
            .or_else(|| self.kind.default_max_status_rps())
    }

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
        if let Some(rps) = self.max_status_rps {
            if !(rps.is_finite() && rps > 0.0) {
                return Err(ProviderConfigError::invalid(
                    name,
                    "max_status_rps",
                    format!("must be a number greater than 0, got {rps}"),
                ));
            }
        }
        self.authorization(name)?;
        Ok(())
    }

    /// A required kind-specific setting, or an error naming `providers.<name>.<field>`.
    ///
    /// # Errors
    /// [`ProviderConfigError::Invalid`] when the setting is unset or empty.
    pub(crate) fn required<'a>(
        name: &str,
        field: &str,
        value: Option<&'a String>,
    ) -> Result<&'a str, ProviderConfigError> {
        match value.map(String::as_str) {
            Some(value) if !value.trim().is_empty() => Ok(value),
            _ => Err(ProviderConfigError::invalid(
                name,
                field,
                "is required for this kind".to_owned(),
            )),
        }
    }

    /// An error naming `providers.<name>.<field>`, for adapters checking their own settings.
    pub(crate) fn invalid(
        name: &str,
        field: &str,
        reason: impl Into<String>,
    ) -> ProviderConfigError {
        ProviderConfigError::invalid(name, field, reason.into())
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

impl ProviderSettings {
    /// `<prefix><key>` for schemes other than bearer (`Key <key>`, or the bare key for a header
    /// of its own), marked sensitive; `None` when no key is configured.
    ///
    /// # Errors
    /// As [`ProviderSettings::authorization`].
    pub(crate) fn key_header(
        &self,
        prefix: &str,
        name: &str,
    ) -> Result<Option<HeaderValue>, ProviderConfigError> {
        let secret = self.api_key.expose_secret();
        if secret.is_empty() {
            return Ok(None);
        }
        let mut value = HeaderValue::try_from(format!("{prefix}{secret}")).map_err(|_| {
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
