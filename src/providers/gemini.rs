//! Veo on the Gemini API (`generativelanguage.googleapis.com`, models such as
//! `veo-3.1-generate-preview`).
//!
//! Sources: ai.google.dev "Generate videos with Veo 3.1 in Gemini API" (the REST samples, the
//! parameter table, "Video retention"), the google-genai Python SDK (`models.py`
//! `_GenerateVideosOperation_from_mldev`, `_Video_from_mldev`; `operations.py`: the Gemini API
//! path is `GET {operation name}`), and the generated `google.ai.generativelanguage.v1beta`
//! REST client (its long-running-operation rules).
//!
//! - base URL `https://generativelanguage.googleapis.com`; every path starts with `/v1beta`;
//!   auth is the key alone in `x-goog-api-key` (`api_key`);
//! - submit: `POST /v1beta/models/{model}:predictLongRunning` with
//!   `{"instances":[{"prompt"}],"parameters":{"sampleCount":1,"durationSeconds"?,
//!   "aspectRatio"?,"resolution"?}}`, answered `{"name":"models/{model}/operations/{id}"}`: that
//!   name is the task id;
//! - status: `GET /v1beta/{name}`, an operation: no status enum, `done` (absent while false)
//!   then `error` (`google.rpc.Status`) or `response.generateVideoResponse` with
//!   `generatedSamples[].video.uri` and `raiMediaFilteredCount`/`raiMediaFilteredReasons`:
//!   - not done → `InProgress`, progress `None` (Veo reports none);
//!   - done with `error` → `Failed` with its message (`CANCELLED`, code 1, → `Cancelled`);
//!   - done with a sample → `Succeeded`, `video_url` = the first `video.uri`;
//!   - done with no sample and filtered ones → Failed with the filter's reasons; a sample
//!     carrying bytes instead of a URI is refused (Failed): we never carry video bytes;
//!   - done with neither `error` nor `response`, or a `response` without
//!     `generateVideoResponse` → a transient error (logged);
//! - the video URI is a Files API download URL that needs the API key (`curl -L -H
//!   "x-goog-api-key: …"`): it is published as is, the key is never added to it, so whoever
//!   fetches it supplies the key;
//! - URL expiry: "Generated videos are stored on the server for 2 days", so
//!   `video_url_expires_at` is two days after the check that saw the operation done (the
//!   operation carries no completion time: this is later than the truth by at most the time
//!   between completion and that check);
//! - cancel: the API routes `CancelOperation` for `batches/*` only, not for
//!   `models/*/operations/*`, and the SDK has no cancel for video operations:
//!   [`CancelOutcome::Unsupported`];
//! - idempotency: none (no client-set id); a lost submit answer is unknowable (the default
//!   `find_submitted`).
//!
//! The Veo 3.1 preview models are shut down on the Gemini API (2026-10-22); their successor,
//! Gemini Omni on the Interactions API (`/v1beta/interactions`), is another protocol and not
//! spoken here. Errors come as `{"error":{"code","message","status"}}`, which the transport
//! already reads.

use chrono::{DateTime, TimeDelta, Utc};
use reqwest::header::{HeaderMap, HeaderName};

use super::google_operation::{
    self, created_operation, match_name, veo_parameters, GeneratedVideo, LongRunningOperation,
    Stage, VideoResult,
};
use super::transport::{path_segment, unknown_status, Auth, HttpTransport};
use super::{
    CancelOutcome, ProviderConfigError, ProviderError, ProviderSettings, ProviderStatus,
    ProviderTask, SubmitRequest, VideoProvider,
};
use crate::messages::truncate;

/// How long the Gemini API keeps a generated video ("stored on the server for 2 days").
pub const VIDEO_RETENTION: TimeDelta = TimeDelta::days(2);

/// The API key header.
pub const API_KEY_HEADER: &str = "x-goog-api-key";

/// A provider speaking Veo on the Gemini API.
#[derive(Debug)]
pub struct GeminiProvider {
    transport: HttpTransport,
}

impl GeminiProvider {
    /// Builds the adapter for provider `name`.
    ///
    /// # Errors
    /// [`ProviderConfigError`] naming `providers.<name>.<key>` when a setting is unusable.
    pub fn new(name: &str, settings: &ProviderSettings) -> Result<Self, ProviderConfigError> {
        Ok(Self {
            transport: HttpTransport::with_auth(
                name,
                settings,
                Auth::Header(HeaderName::from_static(API_KEY_HEADER)),
                HeaderMap::new(),
            )?,
        })
    }
}

/// `models/{model}/operations/{id}` (what `predictLongRunning` answers), or the short
/// `operations/{id}`, as escaped path segments after `/v1beta/`.
fn operation_path(name: &str) -> Option<String> {
    if let Some(parts) = match_name(name, "models/*/operations/*") {
        return Some(format!(
            "/v1beta/models/{}/operations/{}",
            path_segment(parts[0]),
            path_segment(parts[1])
        ));
    }
    match_name(name, "operations/*")
        .map(|parts| format!("/v1beta/operations/{}", path_segment(parts[0])))
}

/// Parses a Veo operation (the body of `GET /v1beta/{name}`), seen at `observed_at` (the URL
/// expiry counts from it).
///
/// # Errors
/// [`ProviderError::Permanent`] when the body is not an operation; transient (and logged) when
/// it is done with neither `error` nor a `generateVideoResponse`.
pub fn parse_operation(
    body: &[u8],
    observed_at: DateTime<Utc>,
) -> Result<ProviderStatus, ProviderError> {
    let operation = LongRunningOperation::parse("gemini operation", body)?;
    match operation.stage("gemini")? {
        Stage::Running => Ok(google_operation::running()),
        Stage::Failed(error) => Ok(google_operation::failed(error)),
        Stage::Finished(response) => {
            let Some(result) = response.get("generateVideoResponse") else {
                return Err(unknown_status(
                    "gemini",
                    &operation.name,
                    "done with a response without generateVideoResponse",
                    "a response with generateVideoResponse",
                ));
            };
            let videos = result
                .get("generatedSamples")
                .and_then(serde_json::Value::as_array)
                .map(|samples| samples.iter().map(generated_video).collect())
                .unwrap_or_default();
            let mut status = VideoResult::with_filters(videos, result).into_status(
                "the Gemini API returned the video inline instead of a file URI; this adapter does not carry video bytes",
            );
            if status.video_url.is_some() {
                status.video_url_expires_at = Some(observed_at + VIDEO_RETENTION);
            }
            Ok(status)
        }
    }
}

/// One `generatedSamples[]` entry: `{"video": {"uri"}}`, or bytes (`video.video` in the proto,
/// `encodedVideo` as the SDK reads it).
fn generated_video(sample: &serde_json::Value) -> GeneratedVideo {
    let Some(video) = sample.get("video") else {
        return GeneratedVideo::Empty;
    };
    if let Some(uri) = video
        .get("uri")
        .and_then(serde_json::Value::as_str)
        .filter(|uri| !uri.is_empty())
    {
        return GeneratedVideo::Uri(uri.to_owned());
    }
    let inline = ["encodedVideo", "video", "bytesBase64Encoded"]
        .iter()
        .any(|key| {
            video
                .get(key)
                .and_then(serde_json::Value::as_str)
                .is_some_and(|bytes| !bytes.is_empty())
        });
    if inline {
        GeneratedVideo::Inline
    } else {
        GeneratedVideo::Empty
    }
}

#[async_trait::async_trait]
impl VideoProvider for GeminiProvider {
    fn name(&self) -> &str {
        self.transport.name()
    }

    async fn submit(&self, request: &SubmitRequest) -> Result<ProviderTask, ProviderError> {
        let parameters = veo_parameters(request).map_err(|e| e.context(self.name()))?;
        let body = serde_json::json!({
            "instances": [{ "prompt": request.prompt }],
            "parameters": parameters,
        });
        // The SDK accepts `models/veo-…` as well as `veo-…`.
        let model = request
            .model
            .strip_prefix("models/")
            .unwrap_or(&request.model);
        let path = format!("/v1beta/models/{}:predictLongRunning", path_segment(model));
        let created = self
            .transport
            .submit_with(&path, &body, request.traceparent.as_deref(), |body| {
                created_operation("gemini operation", body, |name| {
                    operation_path(name).is_some()
                })
            })
            .await?;
        tracing::debug!(provider = %self.name(), request_id = %request.request_id, operation = %created.id, "video submitted");
        Ok(created)
    }

    async fn status(
        &self,
        task: &ProviderTask,
        traceparent: Option<&str>,
    ) -> Result<ProviderStatus, ProviderError> {
        let Some(path) = operation_path(&task.id) else {
            return Err(ProviderError::permanent(format!(
                "{}: \"{}\" is not a Gemini API operation name (models/…/operations/…)",
                self.name(),
                truncate(&task.id, 200)
            )));
        };
        self.transport
            .status(&path, traceparent, |body| parse_operation(body, Utc::now()))
            .await
    }

    async fn cancel(&self, _task: &ProviderTask) -> Result<CancelOutcome, ProviderError> {
        Ok(CancelOutcome::Unsupported)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::ProviderState;

    #[test]
    fn operation_names_become_escaped_paths() {
        assert_eq!(
            operation_path("models/veo-3.1-generate-preview/operations/mg3pt9cbmvr1").as_deref(),
            Some("/v1beta/models/veo-3.1-generate-preview/operations/mg3pt9cbmvr1")
        );
        assert_eq!(
            operation_path("operations/abc").as_deref(),
            Some("/v1beta/operations/abc")
        );
        assert_eq!(
            operation_path("models/x/operations/a b").as_deref(),
            Some("/v1beta/models/x/operations/a%20b")
        );
        assert_eq!(operation_path("../../etc/passwd"), None);
        assert_eq!(operation_path("models/x/operations/y/cancel"), None);
    }

    #[test]
    fn a_response_without_generate_video_response_is_transient() {
        let error = parse_operation(
            br#"{"name":"models/m/operations/o","done":true,"response":{"@type":"x"}}"#,
            Utc::now(),
        )
        .expect_err("unknown response");
        assert!(error.is_transient(), "{error}");
        assert!(
            error.to_string().contains("generateVideoResponse"),
            "{error}"
        );
    }

    #[test]
    fn inline_bytes_are_refused() {
        let status = parse_operation(
            br#"{"name":"models/m/operations/o","done":true,"response":{"generateVideoResponse":{"generatedSamples":[{"video":{"encodedVideo":"AAAA","encoding":"video/mp4"}}]}}}"#,
            Utc::now(),
        )
        .expect("parses");
        assert_eq!(status.state, ProviderState::Failed);
        assert!(
            status
                .error
                .as_deref()
                .is_some_and(|e| e.contains("inline")),
            "{status:?}"
        );
    }
}
