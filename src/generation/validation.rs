//! What makes a request acceptable: limits from `[generation]`, an allowed callback URL, and a
//! provider the model is routed to.

use std::sync::Arc;

use super::GenerationOrchestrator;
use crate::messages::VideoGenerationRequested;
use crate::providers::VideoProvider;
use crate::webhooks;

impl GenerationOrchestrator {
    /// Why a request cannot be accepted, or the provider it goes to.
    pub(super) fn validate(
        &self,
        r: &VideoGenerationRequested,
    ) -> Result<Arc<dyn VideoProvider>, String> {
        if r.request_id.trim().is_empty() {
            return Err("requestId must not be empty".to_owned());
        }
        if r.virtual_key_id.trim().is_empty() {
            return Err("virtualKeyId must not be empty".to_owned());
        }
        if r.prompt.trim().is_empty() {
            return Err("prompt must not be empty".to_owned());
        }
        let chars = r.prompt.chars().count();
        if chars > self.settings.max_prompt_length {
            return Err(format!(
                "prompt is {chars} characters long; the limit is {}",
                self.settings.max_prompt_length
            ));
        }
        if r.model.trim().is_empty() {
            return Err("model must not be empty".to_owned());
        }
        if let Some(metadata) = &r.metadata {
            let bytes = serde_json::to_vec(metadata).map_or(0, |b| b.len());
            if bytes > self.settings.max_metadata_bytes {
                return Err(format!(
                    "metadata is {bytes} bytes as JSON; the limit is {} (generation.max_metadata_bytes)",
                    self.settings.max_metadata_bytes
                ));
            }
        }
        if let Some(d) = r.duration_seconds {
            if d == 0 || d > self.settings.max_duration_seconds {
                return Err(format!(
                    "durationSeconds must be between 1 and {}, got {d}",
                    self.settings.max_duration_seconds
                ));
            }
        }
        if let Some(size) = &r.size {
            let ok = size
                .split_once('x')
                .and_then(|(w, h)| Some((w.parse::<u32>().ok()?, h.parse::<u32>().ok()?)))
                .is_some_and(|(w, h)| (16..=8192).contains(&w) && (16..=8192).contains(&h));
            if !ok {
                return Err(format!(
                    "size must be WIDTHxHEIGHT between 16 and 8192, got `{size}`"
                ));
            }
        }
        if let Some(url) = &r.callback_url {
            webhooks::validate_url(url, &self.webhooks.allowed_hosts)
                .map_err(|e| format!("callbackUrl: {e}"))?;
        }
        self.providers
            .route(&r.model, r.provider.as_deref())
            .ok_or_else(|| match &r.provider {
                Some(p) => format!("provider `{p}` is not configured"),
                None => format!(
                    "model `{}` is not routed to any configured provider",
                    r.model
                ),
            })
    }
}
