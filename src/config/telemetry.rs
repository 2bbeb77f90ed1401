//! `[telemetry]`: where the spans go (OTLP over HTTP), if anywhere.

use serde::{Deserialize, Serialize};

use super::ConfigError;

/// `[telemetry]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct TelemetrySettings {
    /// Base URL of an OTLP/HTTP receiver, e.g. `http://127.0.0.1:4318`: spans are posted as
    /// protobuf to `{otlp_endpoint}/v1/traces`. Empty: no export.
    #[serde(default)]
    pub otlp_endpoint: String,
    /// `service.name` of the exported spans.
    #[serde(default = "default_service_name")]
    pub service_name: String,
}

impl Default for TelemetrySettings {
    fn default() -> Self {
        Self {
            otlp_endpoint: String::new(),
            service_name: default_service_name(),
        }
    }
}

fn default_service_name() -> String {
    "video-orchestrator".to_owned()
}

impl TelemetrySettings {
    /// The URL spans are posted to, when export is on.
    pub fn traces_url(&self) -> Option<String> {
        let base = self.otlp_endpoint.trim();
        if base.is_empty() {
            return None;
        }
        let base = base.trim_end_matches('/');
        Some(if base.ends_with("/v1/traces") {
            base.to_owned()
        } else {
            format!("{base}/v1/traces")
        })
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if let Some(url) = self.traces_url() {
            let parsed = url::Url::parse(&url).map_err(|e| {
                ConfigError::invalid("telemetry.otlp_endpoint", format!("not a URL: {e}"))
            })?;
            if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
                return Err(ConfigError::invalid(
                    "telemetry.otlp_endpoint",
                    "must be an http:// or https:// URL with a host, e.g. http://127.0.0.1:4318",
                ));
            }
        }
        if self.service_name.trim().is_empty() {
            return Err(ConfigError::invalid(
                "telemetry.service_name",
                "must not be empty",
            ));
        }
        Ok(())
    }
}
