//! Luma Dream Machine generations.
//!
//! Sources: Luma's OpenAPI spec (`lumalabs/lumaai-api`, `openapi.yaml`: the paths, `201` on
//! create, `204` on delete, the error object `{"detail"}`), the official SDK generated from it
//! (`lumalabs/lumaai-python`: `resources/generations/generations.py`, `types/generation.py`,
//! `types/generations/video_create_params.py`), and docs.lumalabs.ai (Video Generation, Errors).
//!
//! - base URL `https://api.lumalabs.ai/dream-machine/v1`, `Authorization: Bearer <key>`;
//! - submit: `POST /generations/video` (the spec's and the SDK's path since 2025-05; the pages
//!   of docs.lumalabs.ai still show the older `POST /generations`, which the current spec no
//!   longer has) with `{prompt, model, aspect_ratio?, duration?, resolution?}`, answered 201
//!   with the generation object (`id`, a UUID). `duration` is `"5s"` or `"9s"`: a requested
//!   length is sent as the nearer (up to 7 s → `"5s"`). `aspect_ratio` is the supported ratio
//!   (`1:1`, `16:9`, `9:16`, `4:3`, `3:4`, `21:9`, `9:21`) nearest to the requested size,
//!   `resolution` (`540p`, `720p`, `1080p`, `4k`) its shorter side when that is one of those;
//! - status: `GET /generations/{id}`, whose `state` is `queued`, `dreaming`, `completed` or
//!   `failed`; `failure_reason` says why a generation failed; `assets.video` is the finished
//!   video (a public CDN URL);
//! - errors are `{"detail": "..."}` with the HTTP status (401 bad key, 400 invalid request,
//!   429 rate limited), classified by the transport.
//!
//! Progress: Luma reports no percentage (an `assets.progress_video` preview at most), so it is
//! `None` until completion, then 100.
//!
//! Cancel: there is none. `DELETE /generations/{id}` removes the generation, so cancel deletes
//! only when the provider is configured with `cancel_deletes = true`, and is otherwise
//! [`CancelOutcome::Unsupported`]; a 404 on delete means it is already gone.
//!
//! URL expiry: not documented, so `video_url_expires_at` is never set.
//!
//! Idempotency: none (no client-set id, no listing filter to match an attempt on): a submit
//! whose answer was lost is [`super::SubmitLookup::Unknowable`] (the trait's default).

use reqwest::{Method, StatusCode};
use serde::Deserialize;

use super::transport::{bad_body, path_segment, unknown_status, HttpTransport, Operation, Request};
use super::{
    CancelOutcome, ProviderConfigError, ProviderError, ProviderSettings, ProviderState,
    ProviderStatus, ProviderTask, SubmitRequest, VideoProvider,
};

const CREATE_PATH: &str = "/generations/video";

/// The aspect ratios Luma's video models accept, with their width / height.
const ASPECT_RATIOS: [(&str, f64); 7] = [
    ("1:1", 1.0),
    ("16:9", 16.0 / 9.0),
    ("9:16", 9.0 / 16.0),
    ("4:3", 4.0 / 3.0),
    ("3:4", 3.0 / 4.0),
    ("21:9", 21.0 / 9.0),
    ("9:21", 9.0 / 21.0),
];

/// A provider speaking Luma's Dream Machine generations API.
#[derive(Debug)]
pub struct LumaProvider {
    transport: HttpTransport,
    cancel_deletes: bool,
}

impl LumaProvider {
    /// Builds the adapter for provider `name`.
    ///
    /// # Errors
    /// [`ProviderConfigError`] naming `providers.<name>.<key>` when a setting is unusable.
    pub fn new(name: &str, settings: &ProviderSettings) -> Result<Self, ProviderConfigError> {
        Ok(Self {
            transport: HttpTransport::new(name, settings)?,
            cancel_deletes: settings.cancel_deletes,
        })
    }

    fn generation_path(id: &str) -> String {
        format!("/generations/{}", path_segment(id))
    }
}

/// The generation object, reduced to what we use (every field is optional in the SDK).
#[derive(Debug, Deserialize)]
struct Generation {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    state: Option<String>,
    #[serde(default)]
    failure_reason: Option<String>,
    #[serde(default)]
    assets: Option<Assets>,
    #[serde(default)]
    request: Option<GenerationRequest>,
}

#[derive(Debug, Deserialize)]
struct Assets {
    #[serde(default)]
    video: Option<String>,
}

#[derive(Debug, Deserialize)]
struct GenerationRequest {
    /// `"5s"`, `"9s"`.
    #[serde(default)]
    duration: Option<String>,
}

/// Parses a generation object (the body of `GET /generations/{id}`).
///
/// # Errors
/// [`ProviderError::Permanent`] describing the problem when the body is not a generation
/// object; transient (and logged) when its `state` is missing or not one of the documented
/// values.
pub fn parse_generation(body: &[u8]) -> Result<ProviderStatus, ProviderError> {
    let what = "luma generation";
    // Every field is optional, so only an object is checked for: serde would also read a
    // struct from a JSON array.
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| bad_body(what, body, &e))?;
    if !value.is_object() {
        let error = <serde_json::Error as serde::de::Error>::custom("not a JSON object");
        return Err(bad_body(what, body, &error));
    }
    let generation: Generation =
        serde_json::from_value(value).map_err(|e| bad_body(what, body, &e))?;
    let id = generation.id.as_deref().unwrap_or("(no id)");
    let state = match generation.state.as_deref() {
        Some("queued") => ProviderState::Queued,
        Some("dreaming") => ProviderState::InProgress,
        Some("completed") => ProviderState::Succeeded,
        Some("failed") => ProviderState::Failed,
        other => {
            return Err(unknown_status(
                "luma",
                id,
                other.unwrap_or("(none)"),
                "queued, dreaming, completed or failed",
            ))
        }
    };
    let video_url = generation
        .assets
        .and_then(|assets| assets.video)
        .filter(|url| !url.is_empty() && state == ProviderState::Succeeded);
    let video_seconds = generation
        .request
        .and_then(|request| request.duration)
        .and_then(|d| d.trim().trim_end_matches('s').parse::<f64>().ok());
    let error = (state == ProviderState::Failed).then(|| {
        generation
            .failure_reason
            .filter(|reason| !reason.trim().is_empty())
            .unwrap_or_else(|| "luma generation failed (no failure_reason given)".to_owned())
    });
    Ok(ProviderStatus {
        state,
        progress: (state == ProviderState::Succeeded).then_some(100),
        video_url,
        video_url_expires_at: None,
        video_seconds,
        error,
    })
}

/// Luma's `duration`: `"5s"` or `"9s"`, the nearer to the requested seconds.
fn duration_field(seconds: u32) -> &'static str {
    if seconds <= 7 {
        "5s"
    } else {
        "9s"
    }
}

/// `WIDTHxHEIGHT` as numbers.
fn dimensions(size: &str) -> Option<(u32, u32)> {
    let (width, height) = size.trim().split_once(['x', 'X', '*'])?;
    let width: u32 = width.trim().parse().ok()?;
    let height: u32 = height.trim().parse().ok()?;
    (width > 0 && height > 0).then_some((width, height))
}

/// The supported aspect ratio nearest to `size` (compared on a log scale, so that 2:1 and 1:2
/// are equally far from 1:1), or the ratio itself when one is given.
fn aspect_ratio_field(size: &str) -> Option<&'static str> {
    if let Some((name, _)) = ASPECT_RATIOS.iter().find(|(name, _)| *name == size.trim()) {
        return Some(name);
    }
    let (width, height) = dimensions(size)?;
    let ratio = (f64::from(width) / f64::from(height)).ln();
    ASPECT_RATIOS
        .iter()
        .min_by(|a, b| {
            (a.1.ln() - ratio)
                .abs()
                .total_cmp(&(b.1.ln() - ratio).abs())
        })
        .map(|(name, _)| *name)
}

/// Luma's `resolution` for a size whose shorter side is one Luma names.
fn resolution_field(size: &str) -> Option<&'static str> {
    let (width, height) = dimensions(size)?;
    match width.min(height) {
        540 => Some("540p"),
        720 => Some("720p"),
        1080 => Some("1080p"),
        2160 => Some("4k"),
        _ => None,
    }
}

#[async_trait::async_trait]
impl VideoProvider for LumaProvider {
    fn name(&self) -> &str {
        self.transport.name()
    }

    async fn submit(&self, request: &SubmitRequest) -> Result<ProviderTask, ProviderError> {
        let mut body = serde_json::json!({
            "prompt": request.prompt,
            "model": request.model,
        });
        if let Some(seconds) = request.duration_seconds {
            body["duration"] = serde_json::Value::from(duration_field(seconds));
        }
        if let Some(size) = request.size.as_deref() {
            if let Some(ratio) = aspect_ratio_field(size) {
                body["aspect_ratio"] = serde_json::Value::from(ratio);
            }
            if let Some(resolution) = resolution_field(size) {
                body["resolution"] = serde_json::Value::from(resolution);
            }
        }
        let created = self
            .transport
            .submit(
                CREATE_PATH,
                &body,
                request.traceparent.as_deref(),
                "generation",
            )
            .await?;
        tracing::debug!(provider = %self.transport.name(), request_id = %request.request_id, generation_id = %created.id, "luma generation submitted");
        Ok(created)
    }

    async fn status(
        &self,
        task: &ProviderTask,
        traceparent: Option<&str>,
    ) -> Result<ProviderStatus, ProviderError> {
        self.transport
            .status(
                &Self::generation_path(&task.id),
                traceparent,
                parse_generation,
            )
            .await
    }

    async fn cancel(&self, task: &ProviderTask) -> Result<CancelOutcome, ProviderError> {
        if !self.cancel_deletes {
            return Ok(CancelOutcome::Unsupported);
        }
        // A 404 means the generation is already gone, which is what we wanted.
        let path = Self::generation_path(&task.id);
        self.transport
            .send(
                Request::new(Operation::Cancel, Method::DELETE, &path)
                    .accepting(&[StatusCode::NOT_FOUND]),
            )
            .await?;
        Ok(CancelOutcome::Cancelled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_map_to_the_nearest_supported_ratio_and_resolution() {
        assert_eq!(aspect_ratio_field("1280x720"), Some("16:9"));
        assert_eq!(aspect_ratio_field("720x1280"), Some("9:16"));
        assert_eq!(aspect_ratio_field("1024x768"), Some("4:3"));
        assert_eq!(aspect_ratio_field("2560x1080"), Some("21:9"));
        assert_eq!(aspect_ratio_field("1000x1000"), Some("1:1"));
        assert_eq!(aspect_ratio_field("3:4"), Some("3:4"));
        assert_eq!(aspect_ratio_field("big"), None);
        assert_eq!(aspect_ratio_field("0x10"), None);
        assert_eq!(resolution_field("1280x720"), Some("720p"));
        assert_eq!(resolution_field("1080x1920"), Some("1080p"));
        assert_eq!(resolution_field("3840x2160"), Some("4k"));
        assert_eq!(resolution_field("1000x1000"), None);
    }

    #[test]
    fn durations_round_to_five_or_nine_seconds() {
        assert_eq!(duration_field(5), "5s");
        assert_eq!(duration_field(7), "5s");
        assert_eq!(duration_field(8), "9s");
        assert_eq!(duration_field(20), "9s");
    }

    #[test]
    fn a_missing_state_is_transient() {
        let error = parse_generation(br#"{"id":"g"}"#).expect_err("no state");
        assert!(error.is_transient(), "{error}");
    }
}
