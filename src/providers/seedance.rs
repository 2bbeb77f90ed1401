//! ByteDance Seedance on BytePlus ModelArk ("Ark"), the content generation tasks API.
//!
//! Sources: the ModelArk "Video Generation API" reference (docs.byteplus.com/docs/ModelArk/1520757
//! and the task query / list / cancel-or-delete pages that follow it), the official SDK types
//! `byteplussdkarkruntime/types/content_generation/content_generation_task.py` and
//! `resources/content_generation/tasks.py` (byteplus-python-sdk-v2; the same in volcengine's
//! `volcenginesdkarkruntime`), and the ModelArk error code page (docs.byteplus.com/docs/ModelArk/1299023).
//!
//! - base URL `https://ark.ap-southeast.bytepluses.com/api/v3` (Asia-Pacific; Seedance is served
//!   there only; an Ark key works in its own region only), `Authorization: Bearer <Ark API key>`;
//! - submit: `POST /contents/generations/tasks` with `{model, content: [{type: "text", text}],
//!   duration?, resolution?, ratio?}` answered `{"id": "cgt-…"}`. The clip parameters go in
//!   top-level body fields, the form the current reference documents beside the older inline
//!   text flags (`"… --dur 5 --rs 720p --ratio 16:9"`), so that the prompt is sent unchanged. A
//!   `size` of `1280x720` becomes `resolution: "720p"` (the short side) and `ratio: "16:9"`; a
//!   size given as `720p` or `16:9` is sent as that field alone;
//! - status: `GET /contents/generations/tasks/{id}`, a task whose `status` is `queued`,
//!   `running`, `cancelled`, `succeeded`, `failed` or `expired` (not finished within its
//!   `execution_expires_after`, 48 h by default: reported as a failure saying so); on success
//!   `content.video_url`, on failure `error: {code, message}`; times are Unix seconds;
//! - cancel: `DELETE /contents/generations/tasks/{id}` acts by the task's state: a `queued` task
//!   is cancelled, a `running` (or already `cancelled`) one is refused, a finished one
//!   (`succeeded`, `failed`, `expired`) has its record *deleted*. So [`VideoProvider::cancel`]
//!   first reads the task: queued → `DELETE` → [`CancelOutcome::Cancelled`]; running →
//!   [`CancelOutcome::Unsupported`] (ModelArk cannot stop it; it runs to its end and is billed;
//!   the caller stops tracking it); finished → [`CancelOutcome::Cancelled`] without deleting, so
//!   the record and its video URL stay. A task that starts between the read and the `DELETE`
//!   makes the `DELETE` fail; the task is then read again and mapped the same way.
//!
//! Progress: ModelArk reports none, so it is `None` until success (100); the caller estimates.
//!
//! Output URL expiry: the generated video is kept 24 hours ("download it promptly"; some relays
//! quote longer, 24 h is the conservative reading), so on success
//! `video_url_expires_at = updated_at + 24 h` (`updated_at` is when the task reached its final
//! state).
//!
//! Limits: at most 120 queued tasks per account (running and finished ones do not count). The
//! reference states the limit but not the error a submit over it gets; a submit refused with a
//! 4xx whose message speaks of the queue limit is reported as a *transient* error ("120 queued
//! tasks per account reached; retrying later"), whatever the status, since the queue drains.
//!
//! Idempotency: none. A task has no client-set id or metadata. The one client-set string echoed
//! on a task is `safety_identifier`, meant to identify the end user to ModelArk's abuse
//! detection (putting our attempt id there would misreport users), and the task listing
//! (`GET /contents/generations/tasks?filter.status=…&filter.model=…&filter.task_ids=…`) cannot
//! filter on it nor by creation time, so an attempt whose answer was lost cannot be matched or
//! proven absent: `find_submitted` keeps the default ([`SubmitLookup::Unknowable`](super::SubmitLookup)).

use chrono::{DateTime, TimeDelta, Utc};
use reqwest::{Method, StatusCode};
use serde::Deserialize;

use super::transport::{bad_body, path_segment, unknown_status, HttpTransport, Operation, Request};
use super::{
    CancelOutcome, ProviderConfigError, ProviderError, ProviderSettings, ProviderState,
    ProviderStatus, ProviderTask, SubmitRequest, VideoProvider,
};

/// The Asia-Pacific (Johor) endpoint, where Seedance is served.
pub const DEFAULT_BASE_URL: &str = "https://ark.ap-southeast.bytepluses.com/api/v3";

const TASKS_PATH: &str = "/contents/generations/tasks";

/// How long a generated video is kept after the task ends.
const OUTPUT_RETENTION: TimeDelta = TimeDelta::hours(24);

/// The error text of a submit refused for the per-account queue limit.
pub const QUEUE_LIMIT_MESSAGE: &str = "120 queued tasks per account reached; retrying later";

/// The aspect ratios the create-task reference lists.
const RATIOS: [&str; 8] = [
    "21:9", "16:9", "4:3", "1:1", "3:4", "9:16", "9:21", "adaptive",
];

/// A provider speaking the ModelArk content generation tasks API (Seedance models).
#[derive(Debug)]
pub struct SeedanceProvider {
    transport: HttpTransport,
}

impl SeedanceProvider {
    /// Builds the adapter for provider `name`.
    ///
    /// # Errors
    /// [`ProviderConfigError`] naming `providers.<name>.<key>` when a setting is unusable, e.g. a
    /// `base_url` that already ends in the tasks path.
    pub fn new(name: &str, settings: &ProviderSettings) -> Result<Self, ProviderConfigError> {
        let base = settings.base_url.trim_end_matches('/');
        if base.ends_with(TASKS_PATH) {
            return Err(ProviderSettings::invalid(
                name,
                "base_url",
                format!(
                    "\"{base}\" includes the tasks path: give the API root, e.g. {DEFAULT_BASE_URL}"
                ),
            ));
        }
        Ok(Self {
            transport: HttpTransport::new(name, settings)?,
        })
    }

    fn task_path(id: &str) -> String {
        format!("{TASKS_PATH}/{}", path_segment(id))
    }
}

/// A content generation task, reduced to what we use. Only `id` and `status` are required so
/// that older models' answers (without `duration`, `frames`…) still parse.
#[derive(Debug, Deserialize)]
struct Task {
    id: String,
    status: String,
    #[serde(default)]
    error: Option<TaskError>,
    #[serde(default)]
    content: Option<Content>,
    #[serde(default)]
    updated_at: Option<i64>,
    #[serde(default)]
    duration: Option<f64>,
    #[serde(default)]
    frames: Option<f64>,
    #[serde(default)]
    framespersecond: Option<f64>,
    #[serde(default)]
    execution_expires_after: Option<i64>,
}

#[derive(Debug, Deserialize)]
struct TaskError {
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    message: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Content {
    #[serde(default)]
    video_url: Option<String>,
}

/// Parses a task (the body of `GET /contents/generations/tasks/{id}`).
///
/// # Errors
/// [`ProviderError::Permanent`] when the body is not a task; transient (and logged) when its
/// `status` is not one of the documented values.
pub fn parse_task(body: &[u8]) -> Result<ProviderStatus, ProviderError> {
    let task: Task =
        serde_json::from_slice(body).map_err(|e| bad_body("seedance task", body, &e))?;
    let state = match task.status.as_str() {
        "queued" => ProviderState::Queued,
        "running" => ProviderState::InProgress,
        "succeeded" => ProviderState::Succeeded,
        "failed" | "expired" => ProviderState::Failed,
        "cancelled" => ProviderState::Cancelled,
        other => {
            return Err(unknown_status(
                "seedance",
                &task.id,
                other,
                "queued, running, cancelled, succeeded, failed or expired",
            ))
        }
    };
    let succeeded = state == ProviderState::Succeeded;
    let video_url = task
        .content
        .and_then(|content| content.video_url)
        .filter(|url| succeeded && !url.is_empty());
    let video_url_expires_at = video_url
        .as_ref()
        .and(task.updated_at)
        .and_then(|at| DateTime::<Utc>::from_timestamp(at, 0))
        .map(|at| at + OUTPUT_RETENTION);
    let video_seconds =
        task.duration
            .filter(|d| *d > 0.0)
            .or_else(|| match (task.frames, task.framespersecond) {
                (Some(frames), Some(fps)) if fps > 0.0 => Some(frames / fps),
                _ => None,
            });
    let error = match task.status.as_str() {
        "failed" => Some(error_text(task.error)),
        "expired" => Some(match task.execution_expires_after {
            Some(seconds) => format!(
                "task expired: it did not finish within its execution_expires_after of {seconds} s"
            ),
            None => "task expired: it did not finish within its execution_expires_after".to_owned(),
        }),
        _ => None,
    };
    Ok(ProviderStatus {
        state,
        progress: succeeded.then_some(100),
        video_url,
        video_url_expires_at,
        video_seconds,
        error,
    })
}

/// `code: message`, or whichever of the two there is.
fn error_text(error: Option<TaskError>) -> String {
    let (code, message) = match error {
        Some(TaskError { code, message }) => (
            code.filter(|c| !c.is_empty()),
            message.filter(|m| !m.is_empty()),
        ),
        None => (None, None),
    };
    match (code, message) {
        (Some(code), Some(message)) => format!("{code}: {message}"),
        (Some(text), None) | (None, Some(text)) => text,
        (None, None) => "video generation failed (no error given)".to_owned(),
    }
}

/// The clip shape fields for a requested size: `WxH` (or `W*H`) gives `resolution` from the short
/// side and `ratio` reduced; `720p` gives `resolution`; `16:9` gives `ratio`.
///
/// # Errors
/// A description of the size when it has none of these forms.
pub fn shape_fields(size: &str) -> Result<Vec<(&'static str, String)>, String> {
    let size = size.trim();
    let lower = size.to_ascii_lowercase();
    if let Some((w, h)) = lower.split_once(['x', '*']) {
        let (Ok(w), Ok(h)) = (w.trim().parse::<u32>(), h.trim().parse::<u32>()) else {
            return Err(format!("size \"{size}\" is not WIDTHxHEIGHT"));
        };
        if w == 0 || h == 0 {
            return Err(format!("size \"{size}\" has a zero side"));
        }
        let divisor = gcd(w, h);
        return Ok(vec![
            ("resolution", format!("{}p", w.min(h))),
            ("ratio", format!("{}:{}", w / divisor, h / divisor)),
        ]);
    }
    if lower.ends_with('p') || lower == "2k" {
        return Ok(vec![("resolution", lower)]);
    }
    if RATIOS.contains(&lower.as_str()) {
        return Ok(vec![("ratio", lower)]);
    }
    Err(format!(
        "size \"{size}\" is neither WIDTHxHEIGHT, a resolution such as 720p, nor a ratio such as 16:9"
    ))
}

fn gcd(mut a: u32, mut b: u32) -> u32 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// Whether an error message (the provider's words included) is a refusal for the queue limit.
fn mentions_queue_limit(message: &str) -> bool {
    let lower = message.to_ascii_lowercase();
    lower.contains("http 4")
        && lower.contains("queue")
        && ["limit", "exceed", "full", "maximum", "120"]
            .iter()
            .any(|word| lower.contains(word))
}

/// A submit refused for the per-account queue limit becomes transient, whatever its status.
fn queue_limit_is_transient(error: ProviderError) -> ProviderError {
    let (message, retry_after) = match &error {
        ProviderError::Permanent { message } => (message, None),
        ProviderError::Transient {
            message,
            retry_after,
            unanswered: false,
        } => (message, *retry_after),
        _ => return error,
    };
    if !mentions_queue_limit(message) {
        return error;
    }
    ProviderError::Transient {
        message: format!("{QUEUE_LIMIT_MESSAGE} ({message})"),
        retry_after,
        unanswered: false,
    }
}

impl SeedanceProvider {
    /// What a cancel achieves for a task in `state`, when nothing more is to be sent.
    fn settled_cancel(state: ProviderState) -> Option<CancelOutcome> {
        match state {
            ProviderState::Queued => None,
            ProviderState::InProgress => Some(CancelOutcome::Unsupported),
            ProviderState::Succeeded | ProviderState::Failed | ProviderState::Cancelled => {
                Some(CancelOutcome::Cancelled)
            }
        }
    }
}

/// Whether an error is the provider's 404 (the task does not exist, or its record was deleted).
fn is_not_found(error: &ProviderError) -> bool {
    matches!(error, ProviderError::Permanent { message } if message.contains("HTTP 404"))
}

#[async_trait::async_trait]
impl VideoProvider for SeedanceProvider {
    fn name(&self) -> &str {
        self.transport.name()
    }

    async fn submit(&self, request: &SubmitRequest) -> Result<ProviderTask, ProviderError> {
        let mut body = serde_json::json!({
            "model": request.model,
            "content": [{ "type": "text", "text": request.prompt }],
        });
        if let Some(seconds) = request.duration_seconds {
            body["duration"] = serde_json::Value::from(seconds);
        }
        if let Some(size) = &request.size {
            let fields = shape_fields(size).map_err(|reason| {
                ProviderError::permanent(format!("{}: {reason}", self.transport.name()))
            })?;
            for (field, value) in fields {
                body[field] = serde_json::Value::String(value);
            }
        }
        let created = self
            .transport
            .submit(TASKS_PATH, &body, request.traceparent.as_deref(), "task")
            .await
            .map_err(queue_limit_is_transient)?;
        tracing::debug!(provider = %self.transport.name(), request_id = %request.request_id, task_id = %created.id, "seedance task submitted");
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
        // Read first: a DELETE on a finished task would delete its record and video URL.
        match self.status(task, None).await {
            Ok(status) => {
                if let Some(outcome) = Self::settled_cancel(status.state) {
                    return Ok(outcome);
                }
            }
            Err(error) if is_not_found(&error) => return Ok(CancelOutcome::Cancelled),
            Err(error) => return Err(error),
        }
        let path = Self::task_path(&task.id);
        let deleted = self
            .transport
            .send(
                Request::new(Operation::Cancel, Method::DELETE, &path)
                    .accepting(&[StatusCode::NOT_FOUND]),
            )
            .await;
        match deleted {
            Ok(_) => Ok(CancelOutcome::Cancelled),
            // Refused: most likely the task started meanwhile. Ask again where it is.
            Err(error @ ProviderError::Permanent { .. }) => {
                let status = self.status(task, None).await?;
                Self::settled_cancel(status.state).ok_or(error)
            }
            Err(error) => Err(error),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_become_resolution_and_ratio() {
        assert_eq!(
            shape_fields("1280x720").expect("wxh"),
            vec![
                ("resolution", "720p".to_owned()),
                ("ratio", "16:9".to_owned())
            ]
        );
        assert_eq!(
            shape_fields("1080*1920").expect("w*h"),
            vec![
                ("resolution", "1080p".to_owned()),
                ("ratio", "9:16".to_owned())
            ]
        );
        assert_eq!(
            shape_fields("1080P").expect("resolution"),
            vec![("resolution", "1080p".to_owned())]
        );
        assert_eq!(
            shape_fields("16:9").expect("ratio"),
            vec![("ratio", "16:9".to_owned())]
        );
        assert!(shape_fields("big").is_err());
        assert!(shape_fields("0x720").is_err());
    }

    #[test]
    fn only_a_4xx_about_the_queue_is_the_queue_limit() {
        let refused = ProviderError::permanent(
            "ark: POST /contents/generations/tasks: HTTP 400 Bad Request: The number of queued tasks has reached the limit of 120.",
        );
        let error = queue_limit_is_transient(refused);
        assert!(error.is_transient(), "{error}");
        assert!(error.message().starts_with(QUEUE_LIMIT_MESSAGE), "{error}");

        let other = ProviderError::permanent(
            "ark: POST /contents/generations/tasks: HTTP 400 Bad Request: invalid ratio",
        );
        assert!(!queue_limit_is_transient(other).is_transient());
        // A body we could not read that happens to mention a queue is not a refusal.
        let garbage = ProviderError::permanent("unexpected response body: queue limit");
        assert!(!queue_limit_is_transient(garbage).is_transient());
    }

    #[test]
    fn frames_give_the_length_when_duration_is_absent() {
        let status =
            parse_task(br#"{"id":"cgt-1","status":"running","frames":121,"framespersecond":24}"#)
                .expect("parses");
        assert_eq!(status.state, ProviderState::InProgress);
        assert_eq!(status.progress, None);
        let seconds = status.video_seconds.expect("seconds");
        assert!((seconds - 121.0 / 24.0).abs() < 1e-9);
    }

    #[test]
    fn failed_without_details_still_explains() {
        let status =
            parse_task(br#"{"id":"cgt-1","status":"failed","error":null}"#).expect("parses");
        assert_eq!(status.state, ProviderState::Failed);
        assert_eq!(
            status.error.as_deref(),
            Some("video generation failed (no error given)")
        );
    }
}
