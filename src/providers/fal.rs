//! fal.ai's queue API (`https://queue.fal.run`), one protocol in front of many hosted video
//! models (Kling, Veo, Seedance, Wan, MiniMax, Luma…).
//!
//! Sources: docs.fal.ai "Queue" (model-endpoints/queue, model-apis/inference/queue), the
//! Inference API reference (api-reference/inference-api, inference-api/queue/cancel), "Request
//! Error Types" (model-apis/request-errors), "Errors" (model validation errors), "Data
//! Retention & Storage" (model-apis/media-expiration); the official clients: fal-client
//! (Python, `projects/fal_client/src/fal_client/client.py`: `AppId.from_endpoint_id`,
//! `_BaseRequestHandle._parse_status`, `Completed.error` / `error_type`) and @fal-ai/client
//! (JS, `libs/client/src/queue.ts`, `utils.ts` `parseEndpointId`, `types/common.ts`).
//!
//! - auth: `Authorization: Key <api_key>`;
//! - submit: `POST /{model_id}` with the model's own input JSON, answered with `request_id`,
//!   `response_url`, `status_url` and `cancel_url`. We send `prompt`, `duration` when asked for
//!   one (see [`duration_value`]), `aspect_ratio` when the size reduces to `16:9`, `9:16` or
//!   `1:1` (the values every fal video model accepts), and `image_url` for a request with an
//!   input image (the field fal's image-to-video models take; pick such a model, e.g.
//!   `fal-ai/kling-video/v2.1/master/image-to-video`); models ignore fields they do not know;
//! - the model id is `owner/app[/path]` (`fal-ai/kling-video/v2.1/master/text-to-video`), or
//!   `workflows|comfy/owner/app[/path]`. Submit uses the whole id; status, result and cancel use
//!   only the app id (`owner/app`, see [`app_id`]) — fal's `response_url` says the same. The
//!   task id we store is `{app_id}/requests/{request_id}`, the path of the request below the
//!   base URL, taken from `response_url` when it lies under our base URL, else built;
//! - status: `GET /{app}/requests/{id}/status` (202 while waiting, 200 once complete) with
//!   `status` `IN_QUEUE` (and `queue_position`), `IN_PROGRESS` or `COMPLETED`. A `COMPLETED`
//!   status carrying `error` (and `error_type`, e.g. `request_timeout`) is a failure;
//!   `error_type` `client_cancelled` is a request cancelled by us. Otherwise the result is read
//!   with a second call, `GET /{app}/requests/{id}`: the model's output JSON, where the video
//!   URL is at `providers.<name>.output_pointer` (a JSON pointer, default `/video/url`, the
//!   `video: File` of fal's video models). A result answering 400/422 (the model refused the
//!   input: `detail` as a string or a list of `{loc, msg, type}`) or 499 (`client_cancelled`)
//!   is a failure (resp. a cancellation) with fal's text; a result without a URL at the pointer
//!   is a failure saying so;
//! - progress: fal reports none (runner logs only), so progress is `None` until success (100);
//! - cancel: `PUT /{app}/requests/{id}/cancel`: `CANCELLATION_REQUESTED` (202) removes a queued
//!   request; for a running one fal signals the runner and the model app decides whether to
//!   stop (many partner models do not), so the job may still complete: the next status tells.
//!   `ALREADY_COMPLETED` (400) leaves the finished request as it is; both are
//!   [`CancelOutcome::Cancelled`] (the request will not run any more than it did; its final
//!   state stays readable). `NOT_FOUND` is a permanent error: the id does not name a request;
//! - URL expiry: generated media lives on fal's CDN until the account's or the request's
//!   `X-Fal-Object-Lifecycle-Preference` expiry, which the result does not carry, so
//!   `video_url_expires_at` is `None`; request payloads (the result) are kept 30 days;
//! - idempotency: none (no client-set id, no listing), so a lost submit answer is
//!   [`super::SubmitLookup::Unknowable`] (the trait's default).

use reqwest::header::HeaderMap;
use reqwest::{Method, StatusCode};
use serde::Deserialize;

use super::transport::{
    bad_body, path_segment, unknown_status, Auth, HttpTransport, Operation, Request,
};
use super::{
    CancelOutcome, ProviderConfigError, ProviderError, ProviderSettings, ProviderState,
    ProviderStatus, ProviderTask, SubmitRequest, VideoProvider,
};
use crate::messages::truncate;

/// Where the video URL is in a result unless `output_pointer` says otherwise: the `video` file
/// of fal's video models (`{"video": {"url": …, "content_type": "video/mp4", …}}`).
pub const DEFAULT_OUTPUT_POINTER: &str = "/video/url";

/// The `error_type` of a request cancelled by its caller (fal's request error types).
pub const CLIENT_CANCELLED: &str = "client_cancelled";

/// App namespaces whose app id has three segments (`workflows/owner/app`), as in both clients.
const APP_NAMESPACES: [&str; 2] = ["workflows", "comfy"];

/// The separator between the app id and the request id in our task ids.
const REQUESTS: &str = "/requests/";

/// A provider speaking the fal.ai queue API.
#[derive(Debug)]
pub struct FalProvider {
    transport: HttpTransport,
    output_pointer: String,
}

impl FalProvider {
    /// Builds the adapter for provider `name`.
    ///
    /// # Errors
    /// [`ProviderConfigError`] naming `providers.<name>.<key>` when a setting is unusable, e.g.
    /// an `output_pointer` that is neither empty nor starts with `/`.
    pub fn new(name: &str, settings: &ProviderSettings) -> Result<Self, ProviderConfigError> {
        let output_pointer = settings
            .output_pointer
            .clone()
            .unwrap_or_else(|| DEFAULT_OUTPUT_POINTER.to_owned());
        if !(output_pointer.is_empty() || output_pointer.starts_with('/')) {
            return Err(ProviderSettings::invalid(
                name,
                "output_pointer",
                format!(
                    "\"{output_pointer}\" is not a JSON pointer: it must be empty (the whole \
                     result) or start with '/', e.g. \"{DEFAULT_OUTPUT_POINTER}\""
                ),
            ));
        }
        Ok(Self {
            transport: HttpTransport::with_auth(name, settings, Auth::Key, HeaderMap::new())?,
            output_pointer,
        })
    }
}

/// The app id of a model id: `owner/app` (`fal-ai/kling-video` for
/// `fal-ai/kling-video/v2.1/master/text-to-video`), or `namespace/owner/app` for the
/// `workflows` and `comfy` namespaces; `None` when the id has too few segments or an empty,
/// `.` or `..` one.
#[must_use]
pub fn app_id(model: &str) -> Option<&str> {
    let segments: Vec<&str> = model.split('/').collect();
    if segments
        .iter()
        .any(|s| s.is_empty() || *s == "." || *s == "..")
    {
        return None;
    }
    let count = if APP_NAMESPACES.contains(&segments[0]) {
        3
    } else {
        2
    };
    if segments.len() < count {
        return None;
    }
    let len = segments[..count].iter().map(|s| s.len()).sum::<usize>() + count - 1;
    Some(&model[..len])
}

/// `/seg/seg/…`, each segment of `id` escaped.
fn escaped_path(id: &str) -> String {
    id.split('/').fold(String::new(), |mut path, segment| {
        path.push('/');
        path.push_str(&path_segment(segment));
        path
    })
}

/// The request's path below the base URL (`/owner/app/requests/{id}`), from our task id.
fn request_path(task: &ProviderTask) -> Result<String, ProviderError> {
    let invalid = || {
        ProviderError::permanent(format!(
            "fal: \"{}\" is not a fal task id (expected owner/app/requests/<request_id>)",
            truncate(&task.id, 100)
        ))
    };
    let (app, request_id) = task.id.rsplit_once(REQUESTS).ok_or_else(invalid)?;
    if request_id.is_empty() || request_id.contains('/') || app_id(app) != Some(app) {
        return Err(invalid());
    }
    Ok(format!(
        "{}{REQUESTS}{}",
        escaped_path(app),
        path_segment(request_id)
    ))
}

/// `duration` as fal's video models take it: whole seconds as a string (`"5"`: Kling,
/// Seedance, MiniMax, Wan, Pixverse; models with a number field accept the numeric string),
/// or with an `s` suffix (`"8s"`) for the Veo and Luma apps, whose schemas say so.
#[must_use]
pub fn duration_value(model: &str, seconds: u32) -> String {
    let app = app_id(model).unwrap_or(model);
    let alias = app.rsplit('/').next().unwrap_or(app);
    if alias.starts_with("veo") || alias.starts_with("luma") {
        format!("{seconds}s")
    } else {
        seconds.to_string()
    }
}

/// The `aspect_ratio` for a `WIDTHxHEIGHT` size, when it is one of the ratios every fal video
/// model accepts (`16:9`, `9:16`, `1:1`).
#[must_use]
pub fn aspect_ratio(size: &str) -> Option<&'static str> {
    let (width, height) = size.trim().split_once(['x', 'X', '*'])?;
    let (width, height): (u32, u32) = (width.trim().parse().ok()?, height.trim().parse().ok()?);
    if width == 0 || height == 0 {
        return None;
    }
    let gcd = {
        let (mut a, mut b) = (width, height);
        while b != 0 {
            (a, b) = (b, a % b);
        }
        a
    };
    match (width / gcd, height / gcd) {
        (16, 9) => Some("16:9"),
        (9, 16) => Some("9:16"),
        (1, 1) => Some("1:1"),
        _ => None,
    }
}

/// The model input we send: `prompt`, and `duration` / `aspect_ratio` / `image_url` when asked
/// for (`image_url` is the input image of fal's image-to-video models, a URL or a data URI).
fn model_input(request: &SubmitRequest) -> serde_json::Value {
    let mut input = serde_json::json!({ "prompt": request.prompt });
    if let Some(image) = &request.image_url {
        input["image_url"] = serde_json::Value::from(image.as_str());
    }
    if let Some(seconds) = request.duration_seconds {
        input["duration"] = serde_json::Value::from(duration_value(&request.model, seconds));
    }
    if let Some(ratio) = request.size.as_deref().and_then(aspect_ratio) {
        input["aspect_ratio"] = serde_json::Value::from(ratio);
    }
    input
}

/// The answer to a submit, reduced to what we use.
#[derive(Debug, Deserialize)]
struct Submitted {
    request_id: String,
    #[serde(default)]
    response_url: Option<String>,
}

/// Reads the answer to a submit of `model` to the queue at `base_url` (without a trailing
/// slash): the task id is `response_url` below `base_url` when it names this request there
/// (fal's own word on the app id), else `{app_id(model)}/requests/{request_id}`.
///
/// # Errors
/// Permanent when the body is not a submit answer, has an empty `request_id`, or the model id
/// has no app id.
pub fn parse_submitted(
    body: &[u8],
    model: &str,
    base_url: &str,
) -> Result<ProviderTask, ProviderError> {
    let submitted: Submitted =
        serde_json::from_slice(body).map_err(|e| bad_body("fal submit", body, &e))?;
    let request_id = submitted.request_id;
    if request_id.is_empty() || request_id.contains('/') {
        return Err(ProviderError::permanent(format!(
            "fal submit: unusable request_id \"{}\"",
            truncate(&request_id, 100)
        )));
    }
    let from_url = submitted.response_url.as_deref().and_then(|url| {
        let rest = url.strip_prefix(base_url)?.strip_prefix('/')?;
        let app = rest
            .strip_suffix(request_id.as_str())?
            .strip_suffix(REQUESTS)?;
        (app_id(app) == Some(app) && !rest.contains(['%', '?', '#'])).then(|| rest.to_owned())
    });
    let id = match from_url {
        Some(id) => id,
        None => {
            let app = app_id(model).ok_or_else(|| invalid_model(model))?;
            format!("{app}{REQUESTS}{request_id}")
        }
    };
    Ok(ProviderTask { id })
}

fn invalid_model(model: &str) -> ProviderError {
    ProviderError::permanent(format!(
        "fal: model \"{}\" is not a fal model id (owner/app[/path], e.g. fal-ai/veo3)",
        truncate(model, 100)
    ))
}

/// What a status answer says.
#[derive(Debug, Clone, PartialEq)]
pub enum QueueStatus {
    /// Waiting, running, or completed with an error or cancelled: nothing more to read.
    Known(ProviderStatus),
    /// `COMPLETED` without an error: the result holds the outcome.
    ResultReady,
}

/// The status object (`GET …/requests/{id}/status`), reduced to what we use.
#[derive(Debug, Deserialize)]
struct StatusBody {
    status: String,
    #[serde(default)]
    request_id: Option<String>,
    /// A string in fal-client; kept general so an object does not fail the whole parse.
    #[serde(default)]
    error: Option<serde_json::Value>,
    #[serde(default)]
    error_type: Option<String>,
}

/// Parses a status object (the body of `GET /{app}/requests/{id}/status`).
///
/// # Errors
/// Permanent when the body is not a status object; transient (and logged) when its `status`
/// is not one of the documented values.
pub fn parse_status(body: &[u8]) -> Result<QueueStatus, ProviderError> {
    let parsed: StatusBody =
        serde_json::from_slice(body).map_err(|e| bad_body("fal status", body, &e))?;
    let waiting = |state| {
        QueueStatus::Known(ProviderStatus {
            state,
            progress: None,
            video_url: None,
            video_url_expires_at: None,
            video_seconds: None,
            error: None,
        })
    };
    match parsed.status.as_str() {
        "IN_QUEUE" => Ok(waiting(ProviderState::Queued)),
        "IN_PROGRESS" => Ok(waiting(ProviderState::InProgress)),
        "COMPLETED" => {
            let error = parsed.error.as_ref().and_then(error_text);
            if error.is_none() && parsed.error_type.is_none() {
                return Ok(QueueStatus::ResultReady);
            }
            Ok(QueueStatus::Known(ended_without_video(
                error,
                parsed.error_type.as_deref(),
            )))
        }
        other => Err(unknown_status(
            "fal",
            parsed.request_id.as_deref().unwrap_or("(no request_id)"),
            other,
            "IN_QUEUE, IN_PROGRESS or COMPLETED",
        )),
    }
}

/// A request that ended without a video: cancelled by us (`client_cancelled`) or failed with
/// fal's text (the `error_type` when there is no text).
fn ended_without_video(error: Option<String>, error_type: Option<&str>) -> ProviderStatus {
    let cancelled = error_type == Some(CLIENT_CANCELLED);
    ProviderStatus {
        state: if cancelled {
            ProviderState::Cancelled
        } else {
            ProviderState::Failed
        },
        progress: None,
        video_url: None,
        video_url_expires_at: None,
        video_seconds: None,
        error: if cancelled {
            None
        } else {
            Some(
                error
                    .or_else(|| error_type.map(|t| format!("request failed ({t})")))
                    .unwrap_or_else(|| "request failed (no error given)".to_owned()),
            )
        },
    }
}

/// fal's error text: a string as is, a list of validation errors (`{loc, msg}`) as
/// `field: msg; …`, anything else as JSON; `None` for null or empty.
fn error_text(value: &serde_json::Value) -> Option<String> {
    let text = match value {
        serde_json::Value::Null => return None,
        serde_json::Value::String(text) => text.clone(),
        serde_json::Value::Array(items) => items
            .iter()
            .map(
                |item| match item.get("msg").and_then(serde_json::Value::as_str) {
                    Some(msg) => {
                        let field: Vec<String> = item
                            .get("loc")
                            .and_then(serde_json::Value::as_array)
                            .into_iter()
                            .flatten()
                            .skip_while(|part| part.as_str() == Some("body"))
                            .map(|part| match part {
                                serde_json::Value::String(s) => s.clone(),
                                other => other.to_string(),
                            })
                            .collect();
                        if field.is_empty() {
                            msg.to_owned()
                        } else {
                            format!("{}: {msg}", field.join("."))
                        }
                    }
                    None => item.to_string(),
                },
            )
            .collect::<Vec<_>>()
            .join("; "),
        other => other.to_string(),
    };
    let text = text.trim();
    (!text.is_empty()).then(|| truncate(text, 1000))
}

/// Parses a request's result (the body of `GET /{app}/requests/{id}`, also when it answered
/// 400, 422 or 499): the video URL at `pointer`, or fal's error (`detail`, `error_type`).
///
/// # Errors
/// Permanent when the body is not JSON.
pub fn parse_result(body: &[u8], pointer: &str) -> Result<ProviderStatus, ProviderError> {
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| bad_body("fal result", body, &e))?;
    let url = value
        .pointer(pointer)
        .and_then(serde_json::Value::as_str)
        .filter(|url| !url.is_empty());
    if let Some(url) = url {
        return Ok(ProviderStatus {
            state: ProviderState::Succeeded,
            progress: Some(100),
            video_url: Some(url.to_owned()),
            video_url_expires_at: None,
            video_seconds: None,
            error: None,
        });
    }
    let error_type = value.get("error_type").and_then(serde_json::Value::as_str);
    if let Some(detail) = value.get("detail").filter(|d| !d.is_null()) {
        return Ok(ended_without_video(error_text(detail), error_type));
    }
    if error_type.is_some() {
        return Ok(ended_without_video(None, error_type));
    }
    Ok(ended_without_video(
        Some(format!(
            "the result has no video URL at \"{pointer}\" (providers.<name>.output_pointer): {}",
            truncate(&String::from_utf8_lossy(body), 200)
        )),
        None,
    ))
}

/// The answer to a cancel, reduced to what we use.
#[derive(Debug, Deserialize)]
struct CancelBody {
    status: String,
}

/// Parses the answer to `PUT …/cancel` (also when it answered 400, 404 or 409).
///
/// # Errors
/// Permanent for `NOT_FOUND`, an unknown `status`, or a body that is not a cancel answer.
pub fn parse_cancel(body: &[u8]) -> Result<CancelOutcome, ProviderError> {
    let parsed: CancelBody =
        serde_json::from_slice(body).map_err(|e| bad_body("fal cancel", body, &e))?;
    match parsed.status.as_str() {
        // Removed from the queue, or the runner was told; a finished request keeps its
        // outcome. Either way the status call tells what happened.
        "CANCELLATION_REQUESTED" | "OK" | "ALREADY_COMPLETED" => Ok(CancelOutcome::Cancelled),
        "NOT_FOUND" => Err(ProviderError::permanent(
            "fal cancel: NOT_FOUND: no such request under this app",
        )),
        other => Err(ProviderError::permanent(format!(
            "fal cancel: unexpected status \"{}\" (expected CANCELLATION_REQUESTED, OK, \
             ALREADY_COMPLETED or NOT_FOUND)",
            truncate(other, 50)
        ))),
    }
}

/// 499, fal's status for a request its client cancelled (`client_cancelled`).
fn client_closed_request() -> StatusCode {
    StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST)
}

#[async_trait::async_trait]
impl VideoProvider for FalProvider {
    fn name(&self) -> &str {
        self.transport.name()
    }

    fn takes_image(&self) -> bool {
        true
    }

    async fn submit(&self, request: &SubmitRequest) -> Result<ProviderTask, ProviderError> {
        if app_id(&request.model).is_none() {
            return Err(invalid_model(&request.model).context(self.transport.name()));
        }
        let path = escaped_path(&request.model);
        let body = model_input(request);
        let base_url = self.transport.base_url().to_owned();
        let task = self
            .transport
            .submit_with(&path, &body, request.traceparent.as_deref(), |answer| {
                parse_submitted(answer, &request.model, &base_url)
            })
            .await?;
        tracing::debug!(provider = %self.transport.name(), request_id = %request.request_id, fal_request = %task.id, "fal request submitted");
        Ok(task)
    }

    async fn status(
        &self,
        task: &ProviderTask,
        traceparent: Option<&str>,
    ) -> Result<ProviderStatus, ProviderError> {
        let base = request_path(task).map_err(|e| e.context(self.transport.name()))?;
        let status_path = format!("{base}/status");
        let status = self
            .transport
            .status(&status_path, traceparent, parse_status)
            .await?;
        match status {
            QueueStatus::Known(status) => Ok(status),
            QueueStatus::ResultReady => {
                // The model's refusals (400/422) and a cancellation (499) are the request's
                // outcome, not a failed call; other statuses are classified as usual.
                let outcomes = [
                    StatusCode::BAD_REQUEST,
                    StatusCode::UNPROCESSABLE_ENTITY,
                    client_closed_request(),
                ];
                let request = Request::new(Operation::Status, Method::GET, &base)
                    .traceparent(traceparent)
                    .accepting(&outcomes);
                self.transport
                    .send_parsed(request, |body| parse_result(body, &self.output_pointer))
                    .await
            }
        }
    }

    async fn cancel(&self, task: &ProviderTask) -> Result<CancelOutcome, ProviderError> {
        let path = format!(
            "{}/cancel",
            request_path(task).map_err(|e| e.context(self.transport.name()))?
        );
        // fal answers ALREADY_COMPLETED and NOT_FOUND with a 4xx; the body says which.
        let answers = [
            StatusCode::BAD_REQUEST,
            StatusCode::NOT_FOUND,
            StatusCode::CONFLICT,
        ];
        let request = Request::new(Operation::Cancel, Method::PUT, &path).accepting(&answers);
        self.transport.send_parsed(request, parse_cancel).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn app_ids_drop_the_endpoint_path() {
        assert_eq!(app_id("fal-ai/veo3"), Some("fal-ai/veo3"));
        assert_eq!(
            app_id("fal-ai/kling-video/v2.1/master/text-to-video"),
            Some("fal-ai/kling-video")
        );
        assert_eq!(
            app_id("workflows/acme/my-flow/run"),
            Some("workflows/acme/my-flow")
        );
        assert_eq!(app_id("fal-ai"), None);
        assert_eq!(app_id("workflows/acme"), None);
        assert_eq!(app_id("fal-ai//veo3"), None);
        assert_eq!(app_id("fal-ai/../admin"), None);
        assert_eq!(app_id(""), None);
    }

    #[test]
    fn task_ids_become_escaped_request_paths() {
        let task = |id: &str| ProviderTask { id: id.to_owned() };
        assert_eq!(
            request_path(&task("fal-ai/kling-video/requests/abc-1")).expect("valid"),
            "/fal-ai/kling-video/requests/abc-1"
        );
        assert_eq!(
            request_path(&task("fal-ai/veo3/requests/a b")).expect("valid"),
            "/fal-ai/veo3/requests/a%20b"
        );
        for bad in [
            "abc",
            "fal-ai/requests/x",
            "fal-ai/veo3/requests/",
            "fal-ai/veo3/x/requests/y",
            "a/../requests/x",
        ] {
            assert!(request_path(&task(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn durations_and_aspect_ratios_follow_the_model_schemas() {
        assert_eq!(duration_value("fal-ai/veo3", 8), "8s");
        assert_eq!(duration_value("fal-ai/veo3.1/fast", 6), "6s");
        assert_eq!(duration_value("fal-ai/luma-dream-machine/ray-2", 5), "5s");
        assert_eq!(
            duration_value("fal-ai/kling-video/v2.1/master/text-to-video", 5),
            "5"
        );
        assert_eq!(aspect_ratio("1280x720"), Some("16:9"));
        assert_eq!(aspect_ratio("1080x1920"), Some("9:16"));
        assert_eq!(aspect_ratio("1024x1024"), Some("1:1"));
        assert_eq!(aspect_ratio("1024x1792"), None);
        assert_eq!(aspect_ratio("0x720"), None);
        assert_eq!(aspect_ratio("wide"), None);
    }

    #[test]
    fn validation_errors_read_as_field_and_message() {
        let detail = serde_json::json!([
            {"loc": ["body", "prompt"], "msg": "Field required", "type": "missing"},
            {"loc": ["body", "duration"], "msg": "Input should be '5' or '10'", "type": "literal_error"}
        ]);
        assert_eq!(
            error_text(&detail).as_deref(),
            Some("prompt: Field required; duration: Input should be '5' or '10'")
        );
        assert_eq!(error_text(&serde_json::json!(" ")), None);
        assert_eq!(error_text(&serde_json::Value::Null), None);
    }
}
