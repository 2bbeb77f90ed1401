//! Alibaba Wan (Tongyi Wanxiang) video generation on DashScope, Alibaba Cloud Model Studio's
//! asynchronous task API.
//!
//! Sources: Model Studio's "Wan text-to-video API reference" and "Manage asynchronous tasks"
//! pages (alibabacloud.com/help/en/model-studio/text-to-video-api-reference,
//! …/manage-asynchronous-tasks), its error code page (…/error-code), and the DashScope Python SDK
//! (`dashscope/aigc/video_synthesis.py`, `dashscope/client/base_api.py`,
//! `dashscope/common/constants.py` `TaskStatus`).
//!
//! - base URL, per region (the key, the model and the endpoint must be of one region):
//!   Singapore `https://dashscope-intl.aliyuncs.com/api/v1` (the default; Model Studio also offers
//!   a workspace domain `https://{WorkspaceId}.ap-southeast-1.maas.aliyuncs.com/api/v1`), Virginia
//!   `https://dashscope-us.aliyuncs.com/api/v1`, Beijing `https://dashscope.aliyuncs.com/api/v1`;
//!   `Authorization: Bearer <key>`;
//! - submit: `POST /services/aigc/video-generation/video-synthesis` with
//!   `X-DashScope-Async: enable` (HTTP callers may only call asynchronously; without the header
//!   DashScope answers `AccessDenied`, "current user api does not support synchronous calls") and
//!   `{model, input: {prompt}, parameters: {size?, resolution?, duration?}}`, answered
//!   `{"output": {"task_id", "task_status": "PENDING"}, "request_id"}`. A `size` of `1280x720` is
//!   sent as `size: "1280*720"` (the text-to-video form, width*height); a size given as `720P`
//!   is sent as `resolution` (the form of the newer protocol and of image-to-video). The header is
//!   sent with every request of this provider (the transport has one header set; the task
//!   queries ignore it);
//! - status: `GET /tasks/{task_id}` (20 queries per second per Alibaba Cloud account, hence the
//!   kind's default `max_status_rps = 20`), whose `output.task_status` is `PENDING`, `RUNNING`,
//!   `SUCCEEDED`, `FAILED`, `CANCELED`, `UNKNOWN` or (SDK `TaskStatus`) `SUSPENDED`, read as still
//!   queued. On success `output.video_url`, on failure `output.code` / `output.message`.
//!   `UNKNOWN` is what DashScope answers, with HTTP 200, for a task id it does not know: ids and
//!   results are kept 24 hours, so the task is gone for good and this is reported as a *failed*
//!   job saying so (not as an error, which would be retried, nor as a crash);
//! - cancel: `POST /tasks/{task_id}/cancel` cancels a `PENDING` task only. [`VideoProvider::cancel`]
//!   reads the task first: pending (or suspended) → cancel → [`CancelOutcome::Cancelled`]; running
//!   → [`CancelOutcome::Unsupported`] (it runs to its end; the caller stops tracking it);
//!   finished or unknown → [`CancelOutcome::Cancelled`] (it keeps its final state). A task that
//!   starts between the read and the cancel makes the cancel fail; it is read again and mapped
//!   the same way.
//!
//! Progress: DashScope reports none, so it is `None` until success (100).
//!
//! Output URL expiry: `video_url` is a signed OSS URL valid 24 hours. `video_url_expires_at` is
//! the URL's own signed expiry when it carries one (`Expires=<unix seconds>`, or `x-oss-date` +
//! `x-oss-expires`), else `end_time + 24 h`, else (no `end_time`) 24 h from when the success was
//! read. `end_time` has no zone (`2025-09-29 14:23:39.407`); it is read as UTC+8, the zone of the
//! Beijing and Singapore regions, which errs early (never late) if it were UTC.
//!
//! Errors: `{"code", "message", "request_id"}` with the HTTP status; `InvalidApiKey` is 401
//! (permanent), the `Throttling*` codes come with 429 (transient, `Retry-After` honoured).
//!
//! Idempotency: none ("do not create duplicate tasks"). A task has no client-set id and the task
//! listing (`GET /tasks?start_time&end_time&model_name&status`) carries no request data to match
//! an attempt on, so `find_submitted` keeps the default
//! ([`SubmitLookup::Unknowable`](super::SubmitLookup)).

use chrono::{DateTime, FixedOffset, NaiveDateTime, TimeDelta, Utc};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use reqwest::Method;
use serde::Deserialize;

use super::transport::{
    bad_body, path_segment, unknown_status, Auth, HttpTransport, Operation, Request,
};
use super::{
    CancelOutcome, ProviderConfigError, ProviderError, ProviderSettings, ProviderState,
    ProviderStatus, ProviderTask, SubmitRequest, VideoProvider,
};

/// The Singapore (international) endpoint.
pub const DEFAULT_BASE_URL: &str = "https://dashscope-intl.aliyuncs.com/api/v1";

const SYNTHESIS_PATH: &str = "/services/aigc/video-generation/video-synthesis";

/// The header that makes a DashScope call asynchronous.
pub const ASYNC_HEADER: &str = "x-dashscope-async";

/// How long the output URL and the task are kept.
const RETENTION: TimeDelta = TimeDelta::hours(24);

/// The zone DashScope's `submit_time` / `end_time` are written in (see the module docs).
const TIMES_OFFSET_SECONDS: i32 = 8 * 3600;

/// A provider speaking DashScope's asynchronous video synthesis API (Wan models).
#[derive(Debug)]
pub struct DashscopeProvider {
    transport: HttpTransport,
}

impl DashscopeProvider {
    /// Builds the adapter for provider `name`.
    ///
    /// # Errors
    /// [`ProviderConfigError`] naming `providers.<name>.<key>` when a setting is unusable, e.g. a
    /// `base_url` that already ends in an endpoint path.
    pub fn new(name: &str, settings: &ProviderSettings) -> Result<Self, ProviderConfigError> {
        let base = settings.base_url.trim_end_matches('/');
        if base.ends_with(SYNTHESIS_PATH) || base.ends_with("/tasks") {
            return Err(ProviderSettings::invalid(
                name,
                "base_url",
                format!(
                    "\"{base}\" includes an endpoint path: give the API root, e.g. {DEFAULT_BASE_URL}"
                ),
            ));
        }
        let mut headers = HeaderMap::new();
        headers.insert(
            HeaderName::from_static(ASYNC_HEADER),
            HeaderValue::from_static("enable"),
        );
        Ok(Self {
            transport: HttpTransport::with_auth(name, settings, Auth::Bearer, headers)?,
        })
    }

    fn task_path(id: &str) -> String {
        format!("/tasks/{}", path_segment(id))
    }
}

#[derive(Debug, Deserialize)]
struct Created {
    output: CreatedOutput,
}

#[derive(Debug, Deserialize)]
struct CreatedOutput {
    task_id: String,
}

/// Reads the task id from a submit answer.
///
/// # Errors
/// [`ProviderError::Permanent`] when the body has no `output.task_id`, or an empty one.
pub fn parse_created(body: &[u8]) -> Result<ProviderTask, ProviderError> {
    let created: Created =
        serde_json::from_slice(body).map_err(|e| bad_body("dashscope task creation", body, &e))?;
    if created.output.task_id.is_empty() {
        return Err(ProviderError::permanent(
            "dashscope: the created task has an empty task_id",
        ));
    }
    Ok(ProviderTask {
        id: created.output.task_id,
    })
}

/// A task query answer, reduced to what we use.
#[derive(Debug, Deserialize)]
struct TaskBody {
    output: Output,
    #[serde(default)]
    usage: Option<Usage>,
}

#[derive(Debug, Deserialize)]
struct Output {
    task_id: String,
    task_status: String,
    #[serde(default)]
    end_time: Option<String>,
    #[serde(default)]
    video_url: Option<String>,
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    message: Option<String>,
}

/// Model versions name the clip length differently (`video_duration` for wan2.1,
/// `output_video_duration` / `duration` for later ones).
#[derive(Debug, Deserialize)]
struct Usage {
    #[serde(default)]
    output_video_duration: Option<serde_json::Value>,
    #[serde(default)]
    video_duration: Option<serde_json::Value>,
    #[serde(default)]
    duration: Option<serde_json::Value>,
}

fn seconds(value: Option<&serde_json::Value>) -> Option<f64> {
    match value? {
        serde_json::Value::Number(n) => n.as_f64(),
        serde_json::Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
    .filter(|s: &f64| *s > 0.0)
}

/// Parses a task query answer (the body of `GET /tasks/{task_id}`). `now` is when it was read,
/// for the expiry of a URL that has no other.
///
/// # Errors
/// [`ProviderError::Permanent`] when the body is not a task answer; transient (and logged) when
/// `task_status` is not one of the documented values.
pub fn parse_task(body: &[u8], now: DateTime<Utc>) -> Result<ProviderStatus, ProviderError> {
    let task: TaskBody =
        serde_json::from_slice(body).map_err(|e| bad_body("dashscope task", body, &e))?;
    let output = task.output;
    let state = match output.task_status.as_str() {
        "PENDING" | "SUSPENDED" => ProviderState::Queued,
        "RUNNING" => ProviderState::InProgress,
        "SUCCEEDED" => ProviderState::Succeeded,
        "FAILED" | "UNKNOWN" => ProviderState::Failed,
        "CANCELED" => ProviderState::Cancelled,
        other => {
            return Err(unknown_status(
                "dashscope",
                &output.task_id,
                other,
                "PENDING, RUNNING, SUCCEEDED, FAILED, CANCELED, UNKNOWN or SUSPENDED",
            ))
        }
    };
    let succeeded = state == ProviderState::Succeeded;
    let video_url = output.video_url.filter(|url| succeeded && !url.is_empty());
    let video_url_expires_at = video_url.as_deref().map(|url| {
        signed_expiry(url)
            .or_else(|| {
                output
                    .end_time
                    .as_deref()
                    .and_then(parse_time)
                    .map(|end| end + RETENTION)
            })
            .unwrap_or(now + RETENTION)
    });
    let video_seconds = task.usage.and_then(|usage| {
        seconds(usage.output_video_duration.as_ref())
            .or_else(|| seconds(usage.video_duration.as_ref()))
            .or_else(|| seconds(usage.duration.as_ref()))
    });
    let error = match output.task_status.as_str() {
        "FAILED" => Some(
            match (
                output.code.filter(|c| !c.is_empty()),
                output.message.filter(|m| !m.is_empty()),
            ) {
                (Some(code), Some(message)) => format!("{code}: {message}"),
                (Some(text), None) | (None, Some(text)) => text,
                (None, None) => "video synthesis failed (no error given)".to_owned(),
            },
        ),
        "UNKNOWN" => Some(format!(
            "task {} is unknown to DashScope: its id expired (tasks are kept 24 hours) or never existed",
            output.task_id
        )),
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

/// A DashScope time (`2025-09-29 14:23:39.407`, UTC+8).
fn parse_time(text: &str) -> Option<DateTime<Utc>> {
    let naive = NaiveDateTime::parse_from_str(text.trim(), "%Y-%m-%d %H:%M:%S%.f").ok()?;
    let zone = FixedOffset::east_opt(TIMES_OFFSET_SECONDS)?;
    Some(naive.and_local_timezone(zone).single()?.with_timezone(&Utc))
}

/// The expiry an OSS signed URL carries: `Expires=<unix seconds>` (signature V1) or
/// `x-oss-date=<YYYYMMDDTHHMMSSZ>` + `x-oss-expires=<seconds>` (V4).
fn signed_expiry(url: &str) -> Option<DateTime<Utc>> {
    let parsed = url::Url::parse(url).ok()?;
    let param = |name: &str| {
        parsed
            .query_pairs()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.into_owned())
    };
    if let Some(at) = param("Expires").and_then(|v| v.parse::<i64>().ok()) {
        return DateTime::<Utc>::from_timestamp(at, 0);
    }
    let date = param("x-oss-date")?;
    let signed = NaiveDateTime::parse_from_str(&date, "%Y%m%dT%H%M%SZ")
        .ok()?
        .and_utc();
    let valid = param("x-oss-expires")?.parse::<i64>().ok()?;
    Some(signed + TimeDelta::try_seconds(valid)?)
}

/// The `parameters` of a submit.
///
/// # Errors
/// A description of `size` when it is neither `WxH` nor a resolution such as `720P`.
pub fn parameters(request: &SubmitRequest) -> Result<serde_json::Value, String> {
    let mut parameters = serde_json::Map::new();
    if let Some(seconds) = request.duration_seconds {
        parameters.insert("duration".to_owned(), serde_json::Value::from(seconds));
    }
    if let Some(size) = &request.size {
        let size = size.trim();
        if let Some((w, h)) = size.to_ascii_lowercase().split_once(['x', '*']) {
            let (Ok(w), Ok(h)) = (w.trim().parse::<u32>(), h.trim().parse::<u32>()) else {
                return Err(format!("size \"{size}\" is not WIDTHxHEIGHT"));
            };
            parameters.insert("size".to_owned(), format!("{w}*{h}").into());
        } else if size.to_ascii_lowercase().ends_with('p') {
            parameters.insert("resolution".to_owned(), size.to_ascii_uppercase().into());
        } else {
            return Err(format!(
                "size \"{size}\" is neither WIDTHxHEIGHT nor a resolution such as 720P"
            ));
        }
    }
    Ok(serde_json::Value::Object(parameters))
}

impl DashscopeProvider {
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

#[async_trait::async_trait]
impl VideoProvider for DashscopeProvider {
    fn name(&self) -> &str {
        self.transport.name()
    }

    async fn submit(&self, request: &SubmitRequest) -> Result<ProviderTask, ProviderError> {
        let parameters = parameters(request).map_err(|reason| {
            ProviderError::permanent(format!("{}: {reason}", self.transport.name()))
        })?;
        let body = serde_json::json!({
            "model": request.model,
            "input": { "prompt": request.prompt },
            "parameters": parameters,
        });
        let created = self
            .transport
            .submit_with(
                SYNTHESIS_PATH,
                &body,
                request.traceparent.as_deref(),
                parse_created,
            )
            .await?;
        tracing::debug!(provider = %self.transport.name(), request_id = %request.request_id, task_id = %created.id, "dashscope task submitted");
        Ok(created)
    }

    async fn status(
        &self,
        task: &ProviderTask,
        traceparent: Option<&str>,
    ) -> Result<ProviderStatus, ProviderError> {
        self.transport
            .status(&Self::task_path(&task.id), traceparent, |body| {
                parse_task(body, Utc::now())
            })
            .await
    }

    async fn cancel(&self, task: &ProviderTask) -> Result<CancelOutcome, ProviderError> {
        let status = self.status(task, None).await?;
        if let Some(outcome) = Self::settled_cancel(status.state) {
            return Ok(outcome);
        }
        let path = format!("{}/cancel", Self::task_path(&task.id));
        match self
            .transport
            .send(Request::new(Operation::Cancel, Method::POST, &path))
            .await
        {
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
    fn times_are_read_as_utc_plus_eight() {
        let at = parse_time("2025-09-29 14:23:39.407").expect("parses");
        assert_eq!(at.to_rfc3339(), "2025-09-29T06:23:39.407+00:00");
        assert_eq!(parse_time("yesterday"), None);
    }

    #[test]
    fn signed_urls_carry_their_expiry() {
        assert_eq!(
            signed_expiry("https://x.oss-cn-beijing.aliyuncs.com/a.mp4?Expires=1759213419&OSSAccessKeyId=k&Signature=s"),
            DateTime::<Utc>::from_timestamp(1_759_213_419, 0)
        );
        assert_eq!(
            signed_expiry(
                "https://x/a.mp4?x-oss-date=20250929T062339Z&x-oss-expires=86400&x-oss-signature=s"
            )
            .map(|at| at.to_rfc3339()),
            Some("2025-09-30T06:23:39+00:00".to_owned())
        );
        assert_eq!(signed_expiry("https://x/a.mp4"), None);
    }

    #[test]
    fn sizes_become_size_or_resolution() {
        let mut request = SubmitRequest {
            request_id: "r".to_owned(),
            attempt_id: "a".to_owned(),
            model: "wan2.6-t2v".to_owned(),
            prompt: "p".to_owned(),
            duration_seconds: Some(5),
            size: Some("1280x720".to_owned()),
            image_url: None,
            metadata: None,
            traceparent: None,
        };
        assert_eq!(
            parameters(&request).expect("size"),
            serde_json::json!({"duration": 5, "size": "1280*720"})
        );
        request.size = Some("1080p".to_owned());
        assert_eq!(
            parameters(&request).expect("resolution"),
            serde_json::json!({"duration": 5, "resolution": "1080P"})
        );
        request.size = Some("huge".to_owned());
        assert!(parameters(&request).is_err());
    }

    #[test]
    fn suspended_is_still_queued() {
        let status = parse_task(
            br#"{"request_id":"r","output":{"task_id":"t","task_status":"SUSPENDED"}}"#,
            Utc::now(),
        )
        .expect("parses");
        assert_eq!(status.state, ProviderState::Queued);
        assert_eq!(status.progress, None);
    }
}
