//! Kling's video tasks API (text to video and image to video).
//!
//! Sources: Kling's API documentation (app.klingai.com/global/dev/document-api: "General
//! Information" for the domain, authentication and error codes; "Text to Video" for the task
//! endpoints), read through copies of those pages.
//!
//! - base URL `https://api-singapore.klingai.com` (the global system; `api.klingai.com` is the
//!   old domain);
//! - authentication: every request carries `Authorization: Bearer <JWT>`, a JWT signed with
//!   HS256 by the account's secret key (`api_key`), header `{"alg":"HS256","typ":"JWT"}`, claims
//!   `iss` = the access key (`access_key`), `exp` = now + 1800 s, `nbf` = now − 5 s. The token is
//!   cached and signed again when less than five minutes of it remain;
//! - submit: `POST /v1/videos/text2video` with `{model_name, prompt, duration, aspect_ratio,
//!   external_task_id}`. `duration` is a string, `"5"` or `"10"`: a requested length is sent as
//!   the nearer of the two (up to 7 s → `"5"`). `aspect_ratio` (`16:9`, `9:16`, `1:1`) follows
//!   the requested size's orientation;
//! - image to video, for a request with an input image (`imageUrl`): `POST
//!   /v1/videos/image2video` with `{model_name, image, prompt, duration, external_task_id}`
//!   (no `aspect_ratio`: the image gives it). `image` is an image URL or bare base64: Kling
//!   refuses a `data:image/…;base64,` prefix, so a data URI is sent without it. The task is
//!   queried under the same endpoint, so its id is kept as `image2video/{task_id}`;
//! - status: `GET /v1/videos/text2video/{task_id}`. `data.task_status` is `submitted`,
//!   `processing`, `succeed` or `failed`; on failure `task_status_msg` says why; on success
//!   `data.task_result.videos[0]` has `url` and `duration` (seconds, a string);
//! - every answer is an envelope `{code, message, request_id, data}`: `code` 0 is success, any
//!   other code is an error, whatever the HTTP status (the documented table pairs each code with
//!   a status, and the codes are honoured even inside a 200): authentication 1000–1004, account
//!   1100–1103, parameters 1200–1203, policy 1300–1301 are permanent; rate and concurrency limits
//!   1302–1304 and the account exceptions 1100–1102 (documented with HTTP 429: the account may be
//!   topped up) are transient, as are server errors 5000–5002. A non-2xx answer is classified by
//!   its HTTP status first, which agrees with that table.
//!
//! Progress: Kling reports none (`None` until success, then 100). Cancel: the API has no cancel
//! or delete endpoint (create and query only), so cancel is [`CancelOutcome::Unsupported`].
//!
//! URL expiry: Kling documents that generated images and videos are cleared after 30 days, so a
//! finished video's `video_url_expires_at` is the task's `updated_at` (when it finished) + 30 days.
//!
//! Idempotency: `external_task_id` is a client-set id, unique per account, by which a task can be
//! queried (`GET /v1/videos/text2video/{external_task_id}`: the documented path takes either the
//! task id or the external id). We send the attempt's id there, so a submit whose answer was lost
//! is resolved by [`VideoProvider::find_submitted`]: found when the query answers the task, absent
//! only when Kling answers code 1203 ("the requested resource does not exist", HTTP 404), and an
//! error (hence unknowable) for anything else.

use std::sync::{Arc, Mutex, PoisonError};

use chrono::{DateTime, TimeDelta, Utc};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::header::{HeaderMap, HeaderValue};
use reqwest::{Method, StatusCode};
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};

use super::transport::{
    bad_body, path_segment, unknown_status, Auth, HttpTransport, Operation, Request, TokenSource,
};
use super::{
    CancelOutcome, ProviderConfigError, ProviderError, ProviderSettings, ProviderState,
    ProviderStatus, ProviderTask, SubmitLookup, SubmitRequest, VideoProvider,
};

/// How long Kling keeps generated videos ("cleared after 30 days").
pub const OUTPUT_RETENTION: TimeDelta = TimeDelta::days(30);

/// Lifetime of a signed token (`exp` − now), as in Kling's example.
pub const TOKEN_LIFETIME_SECS: i64 = 1800;

/// `nbf` is set this far in the past, against clock skew, as in Kling's example.
pub const NOT_BEFORE_SKEW_SECS: i64 = 5;

/// A cached token is signed again when less than this remains of it.
pub const TOKEN_REFRESH_MARGIN_SECS: i64 = 300;

/// "The requested resource does not exist": the code that proves a task id is unknown.
pub const NOT_FOUND_CODE: i64 = 1203;

const TASKS_PATH: &str = "/v1/videos/text2video";
const IMAGE_TASKS_PATH: &str = "/v1/videos/image2video";
/// How the id of an image-to-video task starts: its queries go to [`IMAGE_TASKS_PATH`].
const IMAGE_TASK_PREFIX: &str = "image2video/";

const EXPECTED_STATUSES: &str = "submitted, processing, succeed or failed";

/// A provider speaking Kling's video tasks API.
#[derive(Debug)]
pub struct KlingProvider {
    transport: HttpTransport,
}

impl KlingProvider {
    /// Builds the adapter for provider `name`: `access_key` and `api_key` (the secret key) are
    /// both required.
    ///
    /// # Errors
    /// [`ProviderConfigError`] naming `providers.<name>.<key>` when a setting is unusable.
    pub fn new(name: &str, settings: &ProviderSettings) -> Result<Self, ProviderConfigError> {
        let access_key =
            ProviderSettings::required(name, "access_key", settings.access_key.as_ref())?;
        let secret = settings.api_key.expose_secret();
        if secret.is_empty() {
            return Err(ProviderSettings::invalid(
                name,
                "api_key",
                "is required for this kind (the secret key that signs the JWT)",
            ));
        }
        let tokens = KlingJwt::new(access_key.trim(), secret.as_bytes());
        Ok(Self {
            transport: HttpTransport::with_auth(
                name,
                settings,
                Auth::Dynamic(Arc::new(tokens)),
                HeaderMap::new(),
            )?,
        })
    }

    /// Where task `id` (ours: `image2video/…` for image-to-video tasks) is queried.
    fn task_path(id: &str) -> String {
        match id.strip_prefix(IMAGE_TASK_PREFIX) {
            Some(image_task) => format!("{IMAGE_TASKS_PATH}/{}", path_segment(image_task)),
            None => format!("{TASKS_PATH}/{}", path_segment(id)),
        }
    }

    /// The endpoint a request goes to, and how the ids of its tasks are written.
    fn endpoint(request: &SubmitRequest) -> (&'static str, &'static str) {
        if request.image_url.is_some() {
            (IMAGE_TASKS_PATH, IMAGE_TASK_PREFIX)
        } else {
            (TASKS_PATH, "")
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Authentication.

/// Signs Kling's JWTs and keeps the current one until it is close to expiry.
struct KlingJwt {
    access_key: String,
    key: EncodingKey,
    cached: Mutex<Option<CachedToken>>,
}

struct CachedToken {
    value: HeaderValue,
    expires_at: i64,
}

#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    exp: i64,
    nbf: i64,
}

impl std::fmt::Debug for KlingJwt {
    // Neither key is printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KlingJwt").finish_non_exhaustive()
    }
}

impl KlingJwt {
    fn new(access_key: &str, secret: &[u8]) -> Self {
        Self {
            access_key: access_key.to_owned(),
            key: EncodingKey::from_secret(secret),
            cached: Mutex::new(None),
        }
    }

    /// The `Authorization` value to send at unix time `now`: the cached token while more than
    /// [`TOKEN_REFRESH_MARGIN_SECS`] of it remain, otherwise a newly signed one.
    fn authorization_at(&self, now: i64) -> Result<HeaderValue, ProviderError> {
        let mut cached = self.cached.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(token) = cached.as_ref() {
            if token.expires_at - now > TOKEN_REFRESH_MARGIN_SECS {
                return Ok(token.value.clone());
            }
        }
        let expires_at = now + TOKEN_LIFETIME_SECS;
        let claims = Claims {
            iss: &self.access_key,
            exp: expires_at,
            nbf: now - NOT_BEFORE_SKEW_SECS,
        };
        // `Header::new` writes `{"typ":"JWT","alg":"HS256"}`.
        let jwt = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.key)
            .map_err(|e| ProviderError::permanent(format!("kling: cannot sign the JWT: {e}")))?;
        let mut value = HeaderValue::try_from(format!("Bearer {jwt}")).map_err(|_| {
            ProviderError::permanent("kling: the signed JWT is not a valid header value")
        })?;
        value.set_sensitive(true);
        *cached = Some(CachedToken {
            value: value.clone(),
            expires_at,
        });
        Ok(value)
    }
}

#[async_trait::async_trait]
impl TokenSource for KlingJwt {
    async fn authorization(&self) -> Result<HeaderValue, ProviderError> {
        self.authorization_at(Utc::now().timestamp())
    }
}

// ---------------------------------------------------------------------------------------------
// Bodies.

/// Every Kling answer: `{code, message, request_id, data}`.
#[derive(Debug, Deserialize)]
struct Envelope {
    code: i64,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    request_id: Option<String>,
    #[serde(default)]
    data: Option<serde_json::Value>,
}

/// A task, reduced to what we use.
#[derive(Debug, Deserialize)]
struct Task {
    task_id: String,
    task_status: String,
    #[serde(default)]
    task_status_msg: Option<String>,
    #[serde(default)]
    task_info: Option<TaskInfo>,
    #[serde(default)]
    task_result: Option<TaskResult>,
    #[serde(default)]
    created_at: Option<i64>,
    #[serde(default)]
    updated_at: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
struct TaskInfo {
    #[serde(default)]
    external_task_id: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct TaskResult {
    #[serde(default)]
    videos: Vec<TaskVideo>,
}

#[derive(Debug, Deserialize)]
struct TaskVideo {
    #[serde(default)]
    url: Option<String>,
    /// Seconds as a string (`"5"`); kept general in case a number is sent.
    #[serde(default)]
    duration: Option<serde_json::Value>,
}

/// The error a non-zero `code` stands for, classified by the documented code table.
#[must_use]
pub fn code_error(code: i64, message: Option<&str>, request_id: Option<&str>) -> ProviderError {
    let message = format!(
        "kling error code {code}: {}{}",
        message.filter(|m| !m.is_empty()).unwrap_or("(no message)"),
        request_id
            .filter(|r| !r.is_empty())
            .map(|r| format!(" (request_id {r})"))
            .unwrap_or_default()
    );
    let transient = match code {
        // Account exceptions (arrears, resource pack used up), documented with HTTP 429.
        1100..=1102
        // Rate limit, concurrency over the resource pack, IP policy (HTTP 429).
        | 1302..=1304
        // Server error, unavailable, timeout (HTTP 500, 503, 504).
        | 5000..=5999 => true,
        // Authentication (1000–1004), no permission (1103), parameters and resources
        // (1200–1203), content policy (1300–1301), and codes the table does not list.
        _ => false,
    };
    if transient {
        ProviderError::Transient {
            message,
            retry_after: None,
            unanswered: false,
        }
    } else {
        ProviderError::Permanent { message }
    }
}

fn envelope(body: &[u8], what: &str) -> Result<Envelope, ProviderError> {
    serde_json::from_slice(body).map_err(|e| bad_body(what, body, &e))
}

/// The `data` of a successful envelope as a task.
fn task_of(body: &[u8], what: &str) -> Result<Task, ProviderError> {
    let answer = envelope(body, what)?;
    if answer.code != 0 {
        return Err(code_error(
            answer.code,
            answer.message.as_deref(),
            answer.request_id.as_deref(),
        ));
    }
    let data = answer.data.unwrap_or(serde_json::Value::Null);
    serde_json::from_value(data).map_err(|e| bad_body(what, body, &e))
}

/// Parses the answer to `POST /v1/videos/text2video`.
///
/// # Errors
/// As [`code_error`] when `code` is not 0; permanent when the body is not an envelope with a
/// task id.
pub fn parse_created(body: &[u8]) -> Result<ProviderTask, ProviderError> {
    let task = task_of(body, "kling created task")?;
    if task.task_id.is_empty() {
        return Err(ProviderError::permanent(
            "kling created task: the task id is empty",
        ));
    }
    Ok(ProviderTask { id: task.task_id })
}

/// `image` as Kling takes it: a URL as given, a data URI as its bare base64 (Kling refuses the
/// `data:image/…;base64,` prefix).
#[must_use]
pub fn image_field(image: &str) -> &str {
    match image.split_once(";base64,") {
        Some((head, data)) if head.starts_with("data:") => data,
        _ => image,
    }
}

/// Parses a task query answer (the body of `GET /v1/videos/text2video/{id}`).
///
/// # Errors
/// As [`code_error`] when `code` is not 0; permanent when the body is not an envelope holding a
/// task; transient (and logged) when `task_status` is not one of the documented values.
pub fn parse_task(body: &[u8]) -> Result<ProviderStatus, ProviderError> {
    let task = task_of(body, "kling task")?;
    let state = match task.task_status.as_str() {
        "submitted" => ProviderState::Queued,
        "processing" => ProviderState::InProgress,
        "succeed" => ProviderState::Succeeded,
        "failed" => ProviderState::Failed,
        other => {
            return Err(unknown_status(
                "kling",
                &task.task_id,
                other,
                EXPECTED_STATUSES,
            ))
        }
    };
    let video = task
        .task_result
        .as_ref()
        .and_then(|result| result.videos.first())
        .filter(|_| state == ProviderState::Succeeded);
    let video_url = video
        .and_then(|v| v.url.clone())
        .filter(|url| !url.is_empty());
    let video_seconds = video.and_then(|v| match &v.duration {
        Some(serde_json::Value::String(s)) => s.trim().parse::<f64>().ok(),
        Some(serde_json::Value::Number(n)) => n.as_f64(),
        _ => None,
    });
    let video_url_expires_at = video_url
        .as_ref()
        .and(task.updated_at.or(task.created_at))
        .and_then(DateTime::<Utc>::from_timestamp_millis)
        .map(|finished| finished + OUTPUT_RETENTION);
    let error = (state == ProviderState::Failed).then(|| {
        task.task_status_msg
            .filter(|m| !m.trim().is_empty())
            .unwrap_or_else(|| "kling task failed (no task_status_msg given)".to_owned())
    });
    Ok(ProviderStatus {
        state,
        progress: (state == ProviderState::Succeeded).then_some(100),
        video_url,
        video_url_expires_at,
        video_seconds,
        error,
    })
}

/// Reads the answer to `GET /v1/videos/text2video/{external_task_id}` (a 404 included): the
/// task created with `external_id`, [`SubmitLookup::Absent`] when Kling answers code 1203.
///
/// # Errors
/// Permanent when the body is not Kling's envelope or answers a task with another external id;
/// as [`code_error`] for any other non-zero code.
pub fn parse_lookup(body: &[u8], external_id: &str) -> Result<SubmitLookup, ProviderError> {
    let what = "kling task lookup";
    let answer = envelope(body, what)?;
    if answer.code == NOT_FOUND_CODE {
        return Ok(SubmitLookup::Absent);
    }
    if answer.code != 0 {
        return Err(code_error(
            answer.code,
            answer.message.as_deref(),
            answer.request_id.as_deref(),
        ));
    }
    let data = answer.data.unwrap_or(serde_json::Value::Null);
    let task: Task = serde_json::from_value(data).map_err(|e| bad_body(what, body, &e))?;
    if task.task_id.is_empty() {
        return Err(ProviderError::permanent(format!(
            "{what}: the task found for external_task_id {external_id} has an empty id"
        )));
    }
    match task.task_info.and_then(|info| info.external_task_id) {
        Some(found) if !found.is_empty() && found != external_id => {
            Err(ProviderError::permanent(format!(
                "{what}: asked for external_task_id {external_id}, answered task {} of external_task_id {found}",
                task.task_id
            )))
        }
        _ => Ok(SubmitLookup::Found(ProviderTask { id: task.task_id })),
    }
}

/// Kling's `duration`: `"5"` or `"10"`, the nearer to the requested seconds.
fn duration_field(seconds: u32) -> &'static str {
    if seconds <= 7 {
        "5"
    } else {
        "10"
    }
}

/// Kling's `aspect_ratio` for a `WIDTHxHEIGHT` size (or a ratio given as is); `None` when the
/// size says nothing usable.
fn aspect_ratio_field(size: &str) -> Option<&'static str> {
    let size = size.trim();
    if let Some(ratio) = ["16:9", "9:16", "1:1"].into_iter().find(|r| *r == size) {
        return Some(ratio);
    }
    let (width, height) = size.split_once(['x', 'X', '*'])?;
    let width: u32 = width.trim().parse().ok()?;
    let height: u32 = height.trim().parse().ok()?;
    Some(match width.cmp(&height) {
        std::cmp::Ordering::Greater => "16:9",
        std::cmp::Ordering::Less => "9:16",
        std::cmp::Ordering::Equal => "1:1",
    })
}

#[async_trait::async_trait]
impl VideoProvider for KlingProvider {
    fn name(&self) -> &str {
        self.transport.name()
    }

    fn takes_image(&self) -> bool {
        true
    }

    async fn submit(&self, request: &SubmitRequest) -> Result<ProviderTask, ProviderError> {
        let mut body = serde_json::json!({
            "model_name": request.model,
            "prompt": request.prompt,
            "external_task_id": request.attempt_id,
        });
        if let Some(seconds) = request.duration_seconds {
            body["duration"] = serde_json::Value::from(duration_field(seconds));
        }
        match &request.image_url {
            Some(image) => body["image"] = serde_json::Value::from(image_field(image)),
            None => {
                if let Some(ratio) = request.size.as_deref().and_then(aspect_ratio_field) {
                    body["aspect_ratio"] = serde_json::Value::from(ratio);
                }
            }
        }
        let (path, prefix) = Self::endpoint(request);
        let mut created = self
            .transport
            .submit_with(path, &body, request.traceparent.as_deref(), parse_created)
            .await?;
        created.id = format!("{prefix}{}", created.id);
        tracing::debug!(provider = %self.transport.name(), request_id = %request.request_id, attempt_id = %request.attempt_id, task_id = %created.id, "kling task submitted");
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

    async fn cancel(&self, _task: &ProviderTask) -> Result<CancelOutcome, ProviderError> {
        // Kling documents no cancel or delete for video tasks.
        Ok(CancelOutcome::Unsupported)
    }

    async fn find_submitted(
        &self,
        request: &SubmitRequest,
        _attempted_at: DateTime<Utc>,
    ) -> Result<SubmitLookup, ProviderError> {
        let (endpoint, prefix) = Self::endpoint(request);
        let path = format!("{endpoint}/{}", path_segment(&request.attempt_id));
        let lookup = self
            .transport
            .send_parsed(
                Request::new(Operation::Status, Method::GET, &path)
                    .traceparent(request.traceparent.as_deref())
                    .accepting(&[StatusCode::NOT_FOUND]),
                |body| parse_lookup(body, &request.attempt_id),
            )
            .await?;
        let lookup = match lookup {
            SubmitLookup::Found(task) => SubmitLookup::Found(ProviderTask {
                id: format!("{prefix}{}", task.id),
            }),
            other => other,
        };
        tracing::debug!(provider = %self.transport.name(), request_id = %request.request_id, attempt_id = %request.attempt_id, ?lookup, "kling submit looked up by external_task_id");
        Ok(lookup)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims_of(value: &HeaderValue) -> serde_json::Value {
        let token = value
            .to_str()
            .expect("ascii")
            .strip_prefix("Bearer ")
            .expect("bearer");
        let mut validation = jsonwebtoken::Validation::new(Algorithm::HS256);
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.required_spec_claims.clear();
        jsonwebtoken::decode::<serde_json::Value>(
            token,
            &jsonwebtoken::DecodingKey::from_secret(b"secret"),
            &validation,
        )
        .expect("signed with the secret key")
        .claims
    }

    #[test]
    fn the_jwt_is_cached_until_five_minutes_remain() {
        let tokens = KlingJwt::new("ak", b"secret");
        let first = tokens.authorization_at(1_000_000).expect("signs");
        assert!(first.is_sensitive());
        assert_eq!(
            claims_of(&first),
            serde_json::json!({ "iss": "ak", "exp": 1_001_800, "nbf": 999_995 })
        );
        // 25 minutes later 5 minutes remain: still the same token.
        let later = tokens.authorization_at(1_001_500 - 1).expect("cached");
        assert_eq!(later, first);
        // With exactly 5 minutes left it is signed again, for 30 more minutes.
        let renewed = tokens.authorization_at(1_001_500).expect("renewed");
        assert_ne!(renewed, first);
        assert_eq!(claims_of(&renewed)["exp"], 1_003_300);
    }

    #[test]
    fn codes_are_classified_by_the_documented_table() {
        for code in [
            1000, 1001, 1002, 1003, 1004, 1103, 1200, 1201, 1202, 1203, 1301,
        ] {
            assert!(!code_error(code, None, None).is_transient(), "{code}");
        }
        for code in [1100, 1101, 1102, 1302, 1303, 1304, 5000, 5001, 5002] {
            assert!(code_error(code, None, None).is_transient(), "{code}");
        }
        let error = code_error(
            1303,
            Some("parallel task over resource pack limit"),
            Some("r-1"),
        );
        assert!(
            error.to_string().contains("1303")
                && error
                    .to_string()
                    .contains("parallel task over resource pack limit")
                && error.to_string().contains("r-1"),
            "{error}"
        );
    }

    #[test]
    fn duration_and_aspect_ratio_follow_the_request() {
        assert_eq!(duration_field(4), "5");
        assert_eq!(duration_field(7), "5");
        assert_eq!(duration_field(8), "10");
        assert_eq!(duration_field(30), "10");
        assert_eq!(aspect_ratio_field("1280x720"), Some("16:9"));
        assert_eq!(aspect_ratio_field("720x1280"), Some("9:16"));
        assert_eq!(aspect_ratio_field("1024x1024"), Some("1:1"));
        assert_eq!(aspect_ratio_field("9:16"), Some("9:16"));
        assert_eq!(aspect_ratio_field("large"), None);
    }

    #[test]
    fn a_lookup_answering_another_external_id_is_an_error() {
        let body = br#"{"code":0,"message":"SUCCEED","request_id":"r","data":{"task_id":"8","task_status":"submitted","task_info":{"external_task_id":"other"}}}"#;
        let error = parse_lookup(body, "mine").expect_err("mismatch");
        assert!(!error.is_transient());
        assert!(error.to_string().contains("other"), "{error}");
    }
}
