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
        if let Some(image) = &r.image_url {
            validate_image_url(image).map_err(|e| format!("imageUrl: {e}"))?;
        }
        let provider = self
            .providers
            .route(&r.model, r.provider.as_deref())
            .ok_or_else(|| match &r.provider {
                Some(p) => format!("provider `{p}` is not configured"),
                None => format!(
                    "model `{}` is not routed to any configured provider",
                    r.model
                ),
            })?;
        if r.image_url.is_some() && !provider.takes_image() {
            return Err(format!(
                "imageUrl: provider `{}` takes no input image (image-to-video: runway, kling, fal)",
                provider.name()
            ));
        }
        Ok(provider)
    }
}

/// Longest `https://` image URL accepted (Runway's limit for `promptImage` URLs).
const MAX_IMAGE_URL_CHARS: usize = 2048;

/// An input image is an `https://` URL or a base64 `data:image/…` URI, with no whitespace.
fn validate_image_url(image: &str) -> Result<(), String> {
    if image.chars().any(char::is_whitespace) {
        return Err("must not contain whitespace".to_owned());
    }
    if let Some(rest) = image.strip_prefix("data:image/") {
        let (kind, data) = rest
            .split_once(";base64,")
            .ok_or("a data URI must be `data:image/<type>;base64,<data>`")?;
        if kind.is_empty() || data.is_empty() {
            return Err("a data URI needs an image type and data".to_owned());
        }
        return Ok(());
    }
    let Some(host) = image.strip_prefix("https://") else {
        return Err("must be an https:// URL or a data:image/…;base64, URI".to_owned());
    };
    if host.is_empty() || host.starts_with('/') {
        return Err("the URL has no host".to_owned());
    }
    let chars = image.chars().count();
    if chars > MAX_IMAGE_URL_CHARS {
        return Err(format!(
            "the URL is {chars} characters long; the limit is {MAX_IMAGE_URL_CHARS}"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::validate_image_url;

    #[test]
    fn image_urls_are_https_or_base64_data_uris() {
        assert!(validate_image_url("https://cdn.example.com/frame.png").is_ok());
        assert!(validate_image_url("data:image/png;base64,iVBORw0KGgo=").is_ok());
        for bad in [
            "http://cdn.example.com/frame.png",
            "https://",
            "ftp://example.com/a.png",
            "data:text/plain;base64,aGk=",
            "data:image/png,raw",
            "data:image/;base64,AAAA",
            "https://example.com/a b.png",
        ] {
            assert!(validate_image_url(bad).is_err(), "{bad} accepted");
        }
        let long = format!("https://example.com/{}", "a".repeat(2100));
        assert!(validate_image_url(&long)
            .unwrap_err()
            .contains("limit is 2048"));
    }
}
