//! The OpenAI-compatible Videos API, as served by OpenAI and many gateways.
//!
//! - submit: `POST /v1/videos` with `{model, prompt, seconds: "4", size: "1280x720"}`, answered
//!   with a `video` object;
//! - status: `GET /v1/videos/{id}`, a `video` object whose `status` is `queued`, `in_progress`,
//!   `completed` or `failed`, with `progress` 0–100 and, on failure, `error: {code, message}`;
//! - the finished file is `GET /v1/videos/{id}/content`, which needs the API key: that endpoint is
//!   the `video_url` we report;
//! - there is no cancel. `DELETE /v1/videos/{id}` removes the video, so cancel deletes only when
//!   the provider is configured with `cancel_deletes = true` and is otherwise
//!   [`CancelOutcome::Unsupported`].

use chrono::{DateTime, Utc};
use reqwest::{Method, StatusCode};
use serde::Deserialize;

use super::transport::{bad_body, path_segment, unknown_status, HttpTransport, Operation, Request};
use super::{
    CancelOutcome, ProviderConfigError, ProviderError, ProviderSettings, ProviderState,
    ProviderStatus, ProviderTask, SubmitRequest, VideoProvider,
};

/// A provider speaking the OpenAI-compatible Videos API.
#[derive(Debug)]
pub struct OpenAiVideosProvider {
    transport: HttpTransport,
    cancel_deletes: bool,
}

impl OpenAiVideosProvider {
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

    fn video_path(id: &str) -> String {
        format!("/v1/videos/{}", path_segment(id))
    }
}

/// The `video` object, reduced to what we use. Everything but `id` and `status` is optional so
/// that gateways which omit fields still parse.
#[derive(Debug, Deserialize)]
struct Video {
    id: String,
    status: String,
    #[serde(default)]
    progress: Option<f64>,
    /// A string in the documented API (`"8"`); some gateways send a number.
    #[serde(default)]
    seconds: Option<serde_json::Value>,
    #[serde(default)]
    expires_at: Option<i64>,
    #[serde(default)]
    error: Option<VideoError>,
}

#[derive(Debug, Deserialize)]
struct VideoError {
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    message: Option<String>,
}

/// Parses a `video` object (the body of `GET /v1/videos/{id}`).
///
/// `base_url` is the provider's base URL (without `/v1`); on success the reported `video_url` is
/// `{base_url}/v1/videos/{id}/content`, the documented download endpoint.
///
/// # Errors
/// [`ProviderError::Permanent`] describing the problem when the body is not a `video` object or
/// its `status` is not one of the documented values.
pub fn parse_video(body: &[u8], base_url: &str) -> Result<ProviderStatus, ProviderError> {
    let video: Video =
        serde_json::from_slice(body).map_err(|e| bad_body("openai video object", body, &e))?;
    let state = match video.status.as_str() {
        "queued" => ProviderState::Queued,
        "in_progress" => ProviderState::InProgress,
        "completed" => ProviderState::Succeeded,
        "failed" => ProviderState::Failed,
        other => {
            return Err(unknown_status(
                "openai_videos",
                &video.id,
                other,
                "queued, in_progress, completed or failed",
            ))
        }
    };
    let progress = match (state, video.progress) {
        (ProviderState::Succeeded, _) => Some(100),
        (_, Some(p)) if p.is_finite() => Some(clamp_percent(p)),
        _ => None,
    };
    let video_url = (state == ProviderState::Succeeded).then(|| {
        format!(
            "{}/v1/videos/{}/content",
            base_url.trim_end_matches('/'),
            path_segment(&video.id)
        )
    });
    let video_url_expires_at = video
        .expires_at
        .filter(|_| state == ProviderState::Succeeded)
        .and_then(|at| DateTime::<Utc>::from_timestamp(at, 0));
    let video_seconds = match &video.seconds {
        Some(serde_json::Value::String(s)) => s.trim().parse::<f64>().ok(),
        Some(serde_json::Value::Number(n)) => n.as_f64(),
        _ => None,
    };
    let error = (state == ProviderState::Failed).then(|| {
        let (code, message) = match video.error {
            Some(e) => (e.code, e.message),
            None => (None, None),
        };
        message
            .filter(|m| !m.is_empty())
            .or(code.filter(|c| !c.is_empty()))
            .unwrap_or_else(|| "video generation failed (no error given)".to_owned())
    });
    Ok(ProviderStatus {
        state,
        progress,
        video_url,
        video_url_expires_at,
        video_seconds,
        error,
    })
}

/// A progress number as a whole percentage; providers may send fractions or overshoot.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
fn clamp_percent(p: f64) -> u8 {
    // In range after the clamp, so the cast is exact.
    p.clamp(0.0, 100.0).floor() as u8
}

#[async_trait::async_trait]
impl VideoProvider for OpenAiVideosProvider {
    fn name(&self) -> &str {
        self.transport.name()
    }

    async fn submit(&self, request: &SubmitRequest) -> Result<ProviderTask, ProviderError> {
        let mut body = serde_json::json!({
            "model": request.model,
            "prompt": request.prompt,
        });
        if let Some(seconds) = request.duration_seconds {
            // The documented type is a string ("4", "8", "12").
            body["seconds"] = serde_json::Value::String(seconds.to_string());
        }
        if let Some(size) = &request.size {
            body["size"] = serde_json::Value::String(size.clone());
        }
        let created = self
            .transport
            .submit("/v1/videos", &body, request.traceparent.as_deref(), "video")
            .await?;
        tracing::debug!(provider = %self.transport.name(), request_id = %request.request_id, video_id = %created.id, "video submitted");
        Ok(created)
    }

    async fn status(
        &self,
        task: &ProviderTask,
        traceparent: Option<&str>,
    ) -> Result<ProviderStatus, ProviderError> {
        let path = Self::video_path(&task.id);
        let base_url = self.transport.base_url();
        self.transport
            .status(&path, traceparent, |body| parse_video(body, base_url))
            .await
    }

    async fn cancel(&self, task: &ProviderTask) -> Result<CancelOutcome, ProviderError> {
        if !self.cancel_deletes {
            return Ok(CancelOutcome::Unsupported);
        }
        // A 404 means the video is already gone, which is what we wanted.
        let path = Self::video_path(&task.id);
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
    fn unknown_status_is_a_transient_error_naming_it() {
        let error = parse_video(br#"{"id":"video_1","status":"exploded"}"#, "http://x")
            .expect_err("unknown status");
        assert!(error.is_transient());
        assert!(error.to_string().contains("exploded"), "{error}");
    }

    #[test]
    fn numeric_seconds_and_fractional_progress_are_accepted() {
        let status = parse_video(
            br#"{"id":"v","status":"in_progress","progress":41.7,"seconds":8}"#,
            "http://x/",
        )
        .expect("parses");
        assert_eq!(status.progress, Some(41));
        assert_eq!(status.video_seconds, Some(8.0));
        assert_eq!(status.video_url, None);
    }

    #[test]
    fn failed_without_message_falls_back_to_code() {
        let status = parse_video(
            br#"{"id":"v","status":"failed","error":{"code":"moderation_blocked","message":""}}"#,
            "http://x",
        )
        .expect("parses");
        assert_eq!(status.error.as_deref(), Some("moderation_blocked"));
    }
}
