//! Runway's tasks API (`https://api.dev.runwayml.com`).
//!
//! Sources: Runway's OpenAPI spec (API version `2024-11-06`, as vendored by the SDKs), the
//! official `runwayml/sdk-python` (`types/task_retrieve_response.py`,
//! `types/text_to_video_create_params.py`, `resources/tasks.py`, `_client.py`) and
//! docs.dev.runwayml.com (API errors, task failures, usage tiers, versioning).
//!
//! - every request carries `Authorization: Bearer <key>` and `X-Runway-Version: <api_version>`
//!   (`providers.<name>.api_version`, default [`DEFAULT_API_VERSION`]; Runway rejects a request
//!   without it). Paths start with `/v1/`, which the docs say is not the version;
//! - submit: `POST /v1/text_to_video` with `{model, promptText, ratio, duration?}`, answered with
//!   `{id}` (a UUID). `ratio` is required by every text-to-video model and is a resolution written
//!   `W:H`: the request's `size` (`1280x720`) is sent as `1280:720`, and [`DEFAULT_RATIO`] when no
//!   size was asked for (the one value every model accepts). Allowed values depend on the model
//!   (`gen4.5`: `1280:720`, `720:1280`; `veo3`, `veo3.1`, `veo3.1_fast`: those and `1080:1920`,
//!   `1920:1080`; others more); Runway answers 400 for any other, so the adapter does not keep
//!   its own copy of the lists. `duration` is whole seconds (`veo3.1`: 4, 6 or 8; `gen4.5`: 2–10;
//!   `veo3`: 8 only) and is omitted when not asked for. A request with an input image
//!   (`imageUrl`) goes to `POST /v1/image_to_video` instead, the same body plus `promptImage`
//!   (an https URL or a data URI; `promptText` is optional there but always sent); both answer
//!   `{id}` and are fetched the same way;
//! - status: `GET /v1/tasks/{id}`, whose `status` is `PENDING` (queued), `THROTTLED` (stored but
//!   not queued yet: the organisation is at its concurrency limit), `RUNNING`, `SUCCEEDED`,
//!   `FAILED` or `CANCELLED`. Runway asks that a task be polled at most once every 5 s: the
//!   kind's default `min_status_interval_ms` is 5000;
//! - cancel: `DELETE /v1/tasks/{id}` (204) aborts a pending, throttled or running task and
//!   deletes a finished one; either way the task can no longer be fetched (`GET` answers 404).
//!   A 404 to the `DELETE` means it is already gone, which the spec says is safe to ignore, so
//!   both are [`CancelOutcome::Cancelled`].
//!
//! Progress: `RUNNING` tasks carry `progress`, a fraction 0–1, reported here as a percentage
//! (floored); queued tasks report none (`None`), and a finished one 100.
//!
//! Output: `output` is an array of URLs on success; the first is the video. They "expire within
//! 24–48 hours" and fresh ones come with every `GET`, with no expiry or completion time in the
//! task. A URL cannot have been signed before the task was created, so `createdAt + 24 h`
//! ([`OUTPUT_URL_MIN_LIFETIME`]) is a time before which it certainly works: that is the reported
//! `video_url_expires_at`. Runway reports nothing of the clip length (`video_seconds` is `None`).
//!
//! Failure: `failure` is a human-readable reason, `failureCode` a dotted machine code
//! (`SAFETY.INPUT.TEXT`, `INTERNAL.BAD_OUTPUT.CODE01`…); the error text is `failure (code)`.
//!
//! Limits and idempotency: there is no request-rate limit; past the concurrency limit new tasks
//! wait as `THROTTLED`, and past the daily generation cap a submit answers 429 (transient). A
//! submit has no client-set id and tasks cannot be listed, so an unanswered submit cannot be
//! looked up: [`VideoProvider::find_submitted`] keeps its default (`Unknowable`).

use chrono::{DateTime, Utc};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use reqwest::{Method, StatusCode};
use serde::Deserialize;

use super::transport::{
    bad_body, path_segment, unknown_status, Auth, HttpTransport, Operation, Request,
};
use super::{
    CancelOutcome, ProviderConfigError, ProviderError, ProviderSettings, ProviderState,
    ProviderStatus, ProviderTask, SubmitRequest, VideoProvider,
};

/// The `X-Runway-Version` sent when `providers.<name>.api_version` is unset (the SDKs' default).
pub const DEFAULT_API_VERSION: &str = "2024-11-06";

/// The `ratio` sent when the request asks for no size: accepted by every text-to-video model.
pub const DEFAULT_RATIO: &str = "1280:720";

/// How long an output URL works at least ("URLs expire within 24-48 hours").
pub const OUTPUT_URL_MIN_LIFETIME: chrono::TimeDelta = chrono::TimeDelta::hours(24);

const VERSION_HEADER: HeaderName = HeaderName::from_static("x-runway-version");

/// A provider speaking Runway's tasks API.
#[derive(Debug)]
pub struct RunwayProvider {
    transport: HttpTransport,
}

impl RunwayProvider {
    /// Builds the adapter for provider `name`.
    ///
    /// # Errors
    /// [`ProviderConfigError`] naming `providers.<name>.<key>` when a setting is unusable
    /// (`api_version` empty or not sendable as a header value included).
    pub fn new(name: &str, settings: &ProviderSettings) -> Result<Self, ProviderConfigError> {
        let version = settings
            .api_version
            .as_deref()
            .map_or(DEFAULT_API_VERSION, str::trim);
        if version.is_empty() {
            return Err(ProviderSettings::invalid(
                name,
                "api_version",
                "must not be empty (Runway's API versions are dates such as 2024-11-06)",
            ));
        }
        let value = HeaderValue::from_str(version).map_err(|_| {
            ProviderSettings::invalid(
                name,
                "api_version",
                format!("\"{version}\" cannot be sent as the X-Runway-Version header"),
            )
        })?;
        let mut headers = HeaderMap::new();
        headers.insert(VERSION_HEADER, value);
        Ok(Self {
            transport: HttpTransport::with_auth(name, settings, Auth::Bearer, headers)?,
        })
    }

    fn task_path(id: &str) -> String {
        format!("/v1/tasks/{}", path_segment(id))
    }
}

/// A requested size as Runway's `ratio`: `1280x720` (or `1280:720`) becomes `1280:720`; `None`
/// when it is not two whole numbers.
#[must_use]
pub fn ratio_for_size(size: &str) -> Option<String> {
    let size = size.trim();
    let (width, height) = size
        .split_once(['x', 'X', ':', '×'])
        .filter(|(w, h)| [w, h].iter().all(|n| is_number(n)))?;
    Some(format!("{width}:{height}"))
}

fn is_number(text: &str) -> bool {
    !text.is_empty() && text.len() <= 5 && text.bytes().all(|b| b.is_ascii_digit())
}

/// The task object, reduced to what we use. Unknown fields (such as a cost) are ignored.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Task {
    id: String,
    status: String,
    #[serde(default)]
    created_at: Option<String>,
    #[serde(default)]
    progress: Option<f64>,
    #[serde(default)]
    output: Option<Vec<serde_json::Value>>,
    #[serde(default)]
    failure: Option<String>,
    #[serde(default)]
    failure_code: Option<String>,
}

/// Parses a task object (the body of `GET /v1/tasks/{id}`).
///
/// # Errors
/// [`ProviderError::Permanent`] describing the problem when the body is not a task object;
/// transient (and logged) when its `status` is not one of the documented values.
pub fn parse_task(body: &[u8]) -> Result<ProviderStatus, ProviderError> {
    let task: Task = serde_json::from_slice(body).map_err(|e| bad_body("runway task", body, &e))?;
    let state = match task.status.as_str() {
        // THROTTLED: over the organisation's concurrency limit, waiting to be queued.
        "PENDING" | "THROTTLED" => ProviderState::Queued,
        "RUNNING" => ProviderState::InProgress,
        "SUCCEEDED" => ProviderState::Succeeded,
        "FAILED" => ProviderState::Failed,
        "CANCELLED" => ProviderState::Cancelled,
        other => {
            return Err(unknown_status(
                "runway",
                &task.id,
                other,
                "PENDING, THROTTLED, RUNNING, SUCCEEDED, FAILED or CANCELLED",
            ))
        }
    };
    let progress = match (state, task.progress) {
        (ProviderState::Succeeded, _) => Some(100),
        (ProviderState::InProgress, Some(fraction)) if fraction.is_finite() => {
            Some(fraction_percent(fraction))
        }
        _ => None,
    };
    let video_url = if state == ProviderState::Succeeded {
        task.output
            .as_deref()
            .and_then(|urls| urls.iter().find_map(|url| url.as_str()))
            .filter(|url| !url.is_empty())
            .map(str::to_owned)
    } else {
        None
    };
    let created_at = task
        .created_at
        .as_deref()
        .and_then(|at| DateTime::parse_from_rfc3339(at).ok())
        .map(|at| at.with_timezone(&Utc));
    let video_url_expires_at = video_url
        .as_ref()
        .and(created_at)
        .map(|at| at + OUTPUT_URL_MIN_LIFETIME);
    let error = (state == ProviderState::Failed).then(|| {
        let failure = task.failure.filter(|f| !f.trim().is_empty());
        let code = task.failure_code.filter(|c| !c.trim().is_empty());
        match (failure, code) {
            (Some(failure), Some(code)) => format!("{failure} ({code})"),
            (Some(failure), None) => failure,
            (None, Some(code)) => format!("task failed ({code})"),
            (None, None) => "task failed (no reason given)".to_owned(),
        }
    });
    Ok(ProviderStatus {
        state,
        progress,
        video_url,
        video_url_expires_at,
        video_seconds: None,
        error,
    })
}

/// A 0–1 fraction as a whole percentage, clamped (a provider may overshoot).
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
fn fraction_percent(fraction: f64) -> u8 {
    // In range after the clamp, so the cast is exact.
    (fraction * 100.0).clamp(0.0, 100.0).floor() as u8
}

/// Text to video: `{model, promptText, ratio, duration?}`.
const TEXT_TO_VIDEO_PATH: &str = "/v1/text_to_video";
/// Image to video: the same and `promptImage` (an https URL or a data URI).
const IMAGE_TO_VIDEO_PATH: &str = "/v1/image_to_video";

#[async_trait::async_trait]
impl VideoProvider for RunwayProvider {
    fn name(&self) -> &str {
        self.transport.name()
    }

    fn takes_image(&self) -> bool {
        true
    }

    async fn submit(&self, request: &SubmitRequest) -> Result<ProviderTask, ProviderError> {
        let ratio = match request.size.as_deref() {
            None => DEFAULT_RATIO.to_owned(),
            Some(size) => ratio_for_size(size).ok_or_else(|| {
                ProviderError::permanent(format!(
                    "{}: size \"{size}\" is not WIDTHxHEIGHT (e.g. 1280x720)",
                    self.transport.name()
                ))
            })?,
        };
        let mut body = serde_json::json!({
            "model": request.model,
            "promptText": request.prompt,
            "ratio": ratio,
        });
        if let Some(duration) = request.duration_seconds {
            body["duration"] = serde_json::Value::from(duration);
        }
        let path = match &request.image_url {
            Some(image) => {
                body["promptImage"] = serde_json::Value::from(image.as_str());
                IMAGE_TO_VIDEO_PATH
            }
            None => TEXT_TO_VIDEO_PATH,
        };
        let created = self
            .transport
            .submit(path, &body, request.traceparent.as_deref(), "task")
            .await?;
        tracing::debug!(provider = %self.transport.name(), request_id = %request.request_id, task_id = %created.id, "runway task submitted");
        Ok(created)
    }

    async fn status(
        &self,
        task: &ProviderTask,
        traceparent: Option<&str>,
    ) -> Result<ProviderStatus, ProviderError> {
        self.transport
            .status(&Self::task_path(&task.id), traceparent, parse_task)
            .await
    }

    async fn cancel(&self, task: &ProviderTask) -> Result<CancelOutcome, ProviderError> {
        // 404: already cancelled or deleted, "safe to ignore" per the spec.
        let path = Self::task_path(&task.id);
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
    fn sizes_become_ratios() {
        assert_eq!(ratio_for_size("1280x720").as_deref(), Some("1280:720"));
        assert_eq!(ratio_for_size(" 720X1280 ").as_deref(), Some("720:1280"));
        assert_eq!(ratio_for_size("1920:1080").as_deref(), Some("1920:1080"));
        assert_eq!(ratio_for_size("960×960").as_deref(), Some("960:960"));
        for bad in [
            "",
            "1280",
            "16:9x",
            "x720",
            "1280x",
            "12a0x720",
            "1280x720x3",
            "720p",
        ] {
            assert_eq!(ratio_for_size(bad), None, "{bad}");
        }
    }

    #[test]
    fn progress_fractions_become_percentages() {
        assert_eq!(fraction_percent(0.0), 0);
        assert_eq!(fraction_percent(0.2), 20);
        assert_eq!(fraction_percent(0.999), 99);
        assert_eq!(fraction_percent(1.7), 100);
        assert_eq!(fraction_percent(-0.5), 0);
    }

    #[test]
    fn a_failure_without_text_keeps_the_code() {
        let status = parse_task(
            br#"{"id":"t","status":"FAILED","createdAt":"2024-06-27T19:49:32.335Z","failureCode":"INTERNAL"}"#,
        )
        .expect("parses");
        assert_eq!(status.error.as_deref(), Some("task failed (INTERNAL)"));
    }

    #[test]
    fn success_without_created_at_has_no_expiry() {
        let status = parse_task(br#"{"id":"t","status":"SUCCEEDED","output":["https://x/v.mp4"]}"#)
            .expect("parses");
        assert_eq!(status.video_url.as_deref(), Some("https://x/v.mp4"));
        assert_eq!(status.video_url_expires_at, None);
    }

    #[test]
    fn an_unusable_api_version_is_a_config_error() {
        for version in ["", "  ", "2024-11\n-06"] {
            let settings = ProviderSettings {
                api_version: Some(version.to_owned()),
                ..ProviderSettings::new(super::super::ProviderKind::Runway, "https://x")
            };
            let error = RunwayProvider::new("rw", &settings).expect_err(version);
            assert!(
                error.to_string().contains("providers.rw.api_version"),
                "{error}"
            );
        }
    }
}
