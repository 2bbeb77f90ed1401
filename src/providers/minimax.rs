//! MiniMax (Hailuo) video generation, the V1 task API (`MiniMax-Hailuo-02`, `MiniMax-Hailuo-2.3`,
//! `T2V-01`, …).
//!
//! Sources: platform.minimax.io API reference (video generation, query, video download /
//! file retrieve, error codes; the OpenAPI document `api-reference/video/generation/api/openapi.json`)
//! and MiniMax's own clients (`MiniMax-AI/MiniMax-MCP` `client.py` / `server.py`, `MiniMax-AI/cli`).
//!
//! - auth: `Authorization: Bearer <api_key>` on every call;
//! - submit: `POST /v1/video_generation` with `{model, prompt, duration?, resolution?}`
//!   (`duration` in seconds, e.g. 6 or 10; `resolution` such as `768P` or `1080P`, from the
//!   request's `size`) → `{task_id, base_resp}`;
//! - status: `GET /v1/query/video_generation?task_id=…` → `{task_id, status, file_id?,
//!   video_width?, video_height?, base_resp}` with `status` one of `Preparing`, `Queueing`,
//!   `Processing`, `Success`, `Fail`. MiniMax's CLI spells the failure `Failed`, which is accepted
//!   too; anything else (the CLI also knows an undocumented `Unknown`) is an unknown status;
//! - output, two steps: on `Success` the query carries a `file_id`, and
//!   `GET /v1/files/retrieve?file_id=…` answers `{file: {file_id, bytes, created_at, filename,
//!   purpose, download_url}, base_resp}`. Current docs and MiniMax's own clients send no
//!   `GroupId`; older docs required `GroupId=<group id>` there, so it is sent when
//!   `providers.<name>.group_id` is set (accounts that still need it) and only then;
//! - **errors inside HTTP 200**: every answer carries `base_resp {status_code, status_msg}` and a
//!   non-zero `status_code` is a failed call even with HTTP 200 (a wrong key is
//!   `200 {base_resp: {status_code: 1004}}`). [`base_resp_error`] classifies the codes of
//!   MiniMax's error-code table the way HTTP statuses are classified; it is applied to every call
//!   (submit, query, files retrieve). Non-2xx answers are classified by the transport as usual.
//!   One exception on the query: the content-moderation codes (1026 input, 1027 output sensitive,
//!   the codes the query documents for its task) and any non-zero code next to `status: Fail`
//!   describe the job's outcome, so they are a [`ProviderState::Failed`] status with that
//!   message, not a failed call;
//! - the error text of a `Fail` is `base_resp.status_msg` (the only text the query carries);
//! - progress: MiniMax reports none, so progress is `None` until success (100): the caller
//!   estimates from elapsed time;
//! - URL expiry: "the valid period of the returned URL is 9 hours (32400 seconds) from the
//!   beginning of the URL return", so `video_url_expires_at` is the time of the files-retrieve
//!   answer + 9 h. Every status call on a finished task retrieves a fresh URL;
//! - the query gives the clip's `video_width`/`video_height` but not its length, and our status
//!   has no field for the size: `video_seconds` is `None`;
//! - cancel: the V1 API documents none (only the separate V2 API has `DELETE`), so cancel is
//!   [`CancelOutcome::Unsupported`];
//! - idempotency: no client-set id and no task listing in V1, so a submit whose answer was lost
//!   cannot be looked up: [`VideoProvider::find_submitted`] keeps its default (`Unknowable`).

use chrono::{DateTime, Utc};
use serde::Deserialize;

use super::transport::{bad_body, unknown_status, HttpTransport};
use super::{
    CancelOutcome, ProviderConfigError, ProviderError, ProviderSettings, ProviderState,
    ProviderStatus, ProviderTask, SubmitRequest, VideoProvider,
};

/// How long a `download_url` from `files/retrieve` stays valid after it was returned.
pub const DOWNLOAD_URL_VALIDITY: chrono::TimeDelta = chrono::TimeDelta::hours(9);

/// The `status` values the query documents, for error messages.
const DOCUMENTED_STATUSES: &str = "Preparing, Queueing, Processing, Success or Fail";

/// A provider speaking MiniMax's V1 video generation API.
#[derive(Debug)]
pub struct MinimaxProvider {
    transport: HttpTransport,
    group_id: Option<String>,
}

impl MinimaxProvider {
    /// Builds the adapter for provider `name`.
    ///
    /// # Errors
    /// [`ProviderConfigError`] naming `providers.<name>.<key>` when a setting is unusable
    /// (`group_id`, when set, must not be blank).
    pub fn new(name: &str, settings: &ProviderSettings) -> Result<Self, ProviderConfigError> {
        let group_id = match settings.group_id.as_deref().map(str::trim) {
            None => None,
            Some("") => {
                return Err(ProviderSettings::invalid(
                    name,
                    "group_id",
                    "must not be empty when set (leave it out if the account needs none)",
                ))
            }
            Some(group) => Some(group.to_owned()),
        };
        Ok(Self {
            transport: HttpTransport::new(name, settings)?,
            group_id,
        })
    }

    fn query_path(task_id: &str) -> String {
        let query = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("task_id", task_id)
            .finish();
        format!("/v1/query/video_generation?{query}")
    }

    fn retrieve_path(&self, file_id: &str) -> String {
        let mut query = url::form_urlencoded::Serializer::new(String::new());
        if let Some(group) = &self.group_id {
            query.append_pair("GroupId", group);
        }
        query.append_pair("file_id", file_id);
        format!("/v1/files/retrieve?{}", query.finish())
    }
}

/// `base_resp`, present in every MiniMax answer.
#[derive(Debug, Default, Deserialize)]
pub struct BaseResp {
    /// 0 on success; otherwise a code from MiniMax's error-code table.
    #[serde(default)]
    pub status_code: i64,
    /// `success`, or what went wrong.
    #[serde(default)]
    pub status_msg: Option<String>,
}

/// How a retry of a call answered with a given `base_resp.status_code` would fare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CodeClass {
    /// `status_code` 0: not an error.
    Success,
    /// "Please retry your requests later" in MiniMax's table (internal errors, timeouts, limits).
    Transient,
    /// Retrying repeats the failure (auth, balance, content, parameters, plan quotas).
    Permanent,
}

/// The class of a `base_resp.status_code`, from MiniMax's error-code table
/// (platform.minimax.io/docs/api-reference/errorcode) and the codes MiniMax's own clients
/// handle. Codes the table does not list are permanent, as an unknown 4xx is.
#[must_use]
pub fn code_class(status_code: i64) -> CodeClass {
    match status_code {
        0 => CodeClass::Success,
        // 1000 unknown error, 1001 request timeout, 1002 rate limit, 1024 internal error,
        // 1033 system error / downstream failure, 1039 token limit, 1041 connection limit,
        // 2045 rate growth limit: the table's answer for each is to retry later.
        1000 | 1001 | 1002 | 1024 | 1033 | 1039 | 1041 | 2045 => CodeClass::Transient,
        // 1004 not authorized / token not match group, 2049 invalid API key, 1008 insufficient
        // balance, 1026 input sensitive, 1027 output sensitive, 1042 invisible-character ratio,
        // 2013 invalid params, 2038 real-name verification required (MiniMax-MCP), 1028/1030
        // quota exhausted and 2061 model not in the plan (MiniMax CLI), 2056 usage limit of the
        // 5-hour window (waiting hours is not a retry), and any code not in the table.
        _ => CodeClass::Permanent,
    }
}

/// The error a non-zero `base_resp.status_code` stands for, classified like an HTTP status;
/// `None` for 0. `what` names the call (`POST /v1/video_generation`).
#[must_use]
pub fn base_resp_error(what: &str, status_code: i64, status_msg: &str) -> Option<ProviderError> {
    let described = if status_msg.trim().is_empty() {
        "(no status_msg)"
    } else {
        status_msg.trim()
    };
    let message = format!("{what}: MiniMax status_code {status_code}: {described}");
    match code_class(status_code) {
        CodeClass::Success => None,
        CodeClass::Transient => Some(ProviderError::Transient {
            message,
            retry_after: None,
            unanswered: false,
        }),
        CodeClass::Permanent => Some(ProviderError::permanent(message)),
    }
}

fn check(what: &str, base_resp: Option<&BaseResp>) -> Result<(), ProviderError> {
    match base_resp {
        Some(resp) => match base_resp_error(
            what,
            resp.status_code,
            resp.status_msg.as_deref().unwrap_or(""),
        ) {
            Some(error) => Err(error),
            None => Ok(()),
        },
        None => Ok(()),
    }
}

/// An id MiniMax may send as a string or as a number (`file_id` is an int64 in the retrieve
/// schema, a string in the query's).
fn id_text(value: Option<&serde_json::Value>) -> Option<String> {
    match value? {
        serde_json::Value::String(text) if !text.trim().is_empty() => Some(text.trim().to_owned()),
        serde_json::Value::Number(number) => Some(number.to_string()),
        _ => None,
    }
}

#[derive(Debug, Deserialize)]
struct Created {
    #[serde(default)]
    task_id: Option<serde_json::Value>,
    #[serde(default)]
    base_resp: Option<BaseResp>,
}

/// Parses the answer of `POST /v1/video_generation`.
///
/// # Errors
/// The [`base_resp_error`] of a non-zero `base_resp.status_code`; permanent when the body is
/// not JSON or has no `task_id`.
pub fn parse_submit(body: &[u8]) -> Result<ProviderTask, ProviderError> {
    const WHAT: &str = "POST /v1/video_generation";
    let created: Created = serde_json::from_slice(body).map_err(|e| bad_body(WHAT, body, &e))?;
    check(WHAT, created.base_resp.as_ref())?;
    match id_text(created.task_id.as_ref()) {
        Some(id) => Ok(ProviderTask { id }),
        None => Err(ProviderError::permanent(format!(
            "{WHAT}: the answer has no task_id: {}",
            crate::messages::truncate(&String::from_utf8_lossy(body), 200)
        ))),
    }
}

/// What the query says of a task.
#[derive(Debug, Clone, PartialEq)]
pub enum TaskQuery {
    /// Not finished, or finished without a video: the status to report as is.
    Status(ProviderStatus),
    /// `Success`: the video is file `file_id`, whose URL `files/retrieve` gives.
    Succeeded {
        /// The generated video's file.
        file_id: String,
        /// `video_width` in pixels, when given.
        width: Option<u32>,
        /// `video_height` in pixels, when given.
        height: Option<u32>,
    },
}

#[derive(Debug, Deserialize)]
struct Query {
    #[serde(default)]
    task_id: Option<serde_json::Value>,
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    file_id: Option<serde_json::Value>,
    #[serde(default)]
    video_width: Option<u32>,
    #[serde(default)]
    video_height: Option<u32>,
    #[serde(default)]
    base_resp: Option<BaseResp>,
}

/// The query's content-moderation codes: they describe the task, not the call.
fn is_task_outcome_code(code: i64) -> bool {
    matches!(code, 1026 | 1027)
}

fn is_fail_status(status: Option<&str>) -> bool {
    matches!(status, Some("Fail" | "Failed"))
}

fn failed(error: String) -> ProviderStatus {
    ProviderStatus {
        state: ProviderState::Failed,
        progress: None,
        video_url: None,
        video_url_expires_at: None,
        video_seconds: None,
        error: Some(error),
    }
}

fn pending(state: ProviderState) -> ProviderStatus {
    ProviderStatus {
        state,
        progress: None,
        video_url: None,
        video_url_expires_at: None,
        video_seconds: None,
        error: None,
    }
}

/// Parses the answer of `GET /v1/query/video_generation?task_id=…`.
///
/// # Errors
/// The [`base_resp_error`] of a non-zero `base_resp.status_code` (except the ones that
/// describe a failed task, see the module documentation); permanent when the body is not JSON,
/// has no `status`, or is `Success` without a `file_id`; transient (and logged) for a `status`
/// the query does not document.
pub fn parse_query(body: &[u8]) -> Result<TaskQuery, ProviderError> {
    const WHAT: &str = "GET /v1/query/video_generation";
    let query: Query = serde_json::from_slice(body).map_err(|e| bad_body(WHAT, body, &e))?;
    let status = query.status.as_deref().map(str::trim);
    if let Some(resp) = &query.base_resp {
        let code = resp.status_code;
        if code != 0 && (is_task_outcome_code(code) || is_fail_status(status)) {
            let text = resp
                .status_msg
                .as_deref()
                .map(str::trim)
                .filter(|m| !m.is_empty())
                .unwrap_or("video generation failed");
            return Ok(TaskQuery::Status(failed(format!("{text} ({code})"))));
        }
    }
    check(WHAT, query.base_resp.as_ref())?;
    let task = id_text(query.task_id.as_ref()).unwrap_or_else(|| "(no task_id)".to_owned());
    let Some(status) = status else {
        return Err(ProviderError::permanent(format!(
            "{WHAT}: task {task}: the answer has no status: {}",
            crate::messages::truncate(&String::from_utf8_lossy(body), 200)
        )));
    };
    Ok(TaskQuery::Status(match status {
        "Preparing" | "Queueing" => pending(ProviderState::Queued),
        "Processing" => pending(ProviderState::InProgress),
        "Success" => {
            let Some(file_id) = id_text(query.file_id.as_ref()) else {
                return Err(ProviderError::permanent(format!(
                    "{WHAT}: task {task} succeeded without a file_id"
                )));
            };
            return Ok(TaskQuery::Succeeded {
                file_id,
                width: query.video_width,
                height: query.video_height,
            });
        }
        // The docs spell it `Fail`; MiniMax's CLI checks for `Failed`.
        "Fail" | "Failed" => {
            let text = query
                .base_resp
                .as_ref()
                .and_then(|resp| resp.status_msg.as_deref())
                .map(str::trim)
                .filter(|m| !m.is_empty() && !m.eq_ignore_ascii_case("success"))
                .map_or_else(
                    || "video generation failed (no error given)".to_owned(),
                    str::to_owned,
                );
            failed(text)
        }
        other => return Err(unknown_status("minimax", &task, other, DOCUMENTED_STATUSES)),
    }))
}

#[derive(Debug, Deserialize)]
struct Retrieved {
    #[serde(default)]
    file: Option<FileObject>,
    #[serde(default)]
    base_resp: Option<BaseResp>,
}

#[derive(Debug, Deserialize)]
struct FileObject {
    #[serde(default)]
    download_url: Option<String>,
}

/// Parses the answer of `GET /v1/files/retrieve?file_id=…`, read at `retrieved_at`: the
/// succeeded status with the `download_url`, valid for [`DOWNLOAD_URL_VALIDITY`] from then.
///
/// # Errors
/// The [`base_resp_error`] of a non-zero `base_resp.status_code`; permanent when the body is
/// not JSON or has no `file.download_url`.
pub fn parse_file(
    body: &[u8],
    retrieved_at: DateTime<Utc>,
) -> Result<ProviderStatus, ProviderError> {
    const WHAT: &str = "GET /v1/files/retrieve";
    let retrieved: Retrieved =
        serde_json::from_slice(body).map_err(|e| bad_body(WHAT, body, &e))?;
    check(WHAT, retrieved.base_resp.as_ref())?;
    let url = retrieved
        .file
        .and_then(|file| file.download_url)
        .map(|url| url.trim().to_owned())
        .filter(|url| !url.is_empty());
    let Some(url) = url else {
        return Err(ProviderError::permanent(format!(
            "{WHAT}: the file has no download_url: {}",
            crate::messages::truncate(&String::from_utf8_lossy(body), 200)
        )));
    };
    Ok(ProviderStatus {
        state: ProviderState::Succeeded,
        progress: Some(100),
        video_url: Some(url),
        video_url_expires_at: Some(retrieved_at + DOWNLOAD_URL_VALIDITY),
        video_seconds: None,
        error: None,
    })
}

/// MiniMax's `resolution` for our `size`: `1280x720` → `720P` (the short side), `1080p` →
/// `1080P`; anything else is sent as given, for MiniMax to accept or refuse (2013).
fn resolution(size: &str) -> String {
    let size = size.trim();
    if let Some((w, h)) = size.split_once(['x', 'X', '*']) {
        if let (Ok(w), Ok(h)) = (w.trim().parse::<u32>(), h.trim().parse::<u32>()) {
            return format!("{}P", w.min(h));
        }
    }
    if let Some(lines) = size.strip_suffix(['p', 'P']) {
        if lines.parse::<u32>().is_ok() {
            return format!("{lines}P");
        }
    }
    size.to_owned()
}

#[async_trait::async_trait]
impl VideoProvider for MinimaxProvider {
    fn name(&self) -> &str {
        self.transport.name()
    }

    async fn submit(&self, request: &SubmitRequest) -> Result<ProviderTask, ProviderError> {
        let mut body = serde_json::json!({
            "model": request.model,
            "prompt": request.prompt,
        });
        if let Some(duration) = request.duration_seconds {
            body["duration"] = serde_json::Value::from(duration);
        }
        if let Some(size) = &request.size {
            body["resolution"] = serde_json::Value::String(resolution(size));
        }
        let created = self
            .transport
            .submit_with(
                "/v1/video_generation",
                &body,
                request.traceparent.as_deref(),
                parse_submit,
            )
            .await?;
        tracing::debug!(provider = %self.transport.name(), request_id = %request.request_id, task_id = %created.id, "minimax video task submitted");
        Ok(created)
    }

    async fn status(
        &self,
        task: &ProviderTask,
        traceparent: Option<&str>,
    ) -> Result<ProviderStatus, ProviderError> {
        let query = self
            .transport
            .status(&Self::query_path(&task.id), traceparent, parse_query)
            .await?;
        match query {
            TaskQuery::Status(status) => Ok(status),
            TaskQuery::Succeeded {
                file_id,
                width,
                height,
            } => {
                tracing::debug!(provider = %self.transport.name(), task_id = %task.id, %file_id, ?width, ?height, "minimax video ready; retrieving its file");
                self.transport
                    .status(&self.retrieve_path(&file_id), traceparent, |body| {
                        parse_file(body, Utc::now())
                    })
                    .await
            }
        }
    }

    async fn cancel(&self, _task: &ProviderTask) -> Result<CancelOutcome, ProviderError> {
        Ok(CancelOutcome::Unsupported)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_documented_code_class_is_classified() {
        assert_eq!(code_class(0), CodeClass::Success);
        assert!(base_resp_error("x", 0, "success").is_none());
        for code in [1000, 1001, 1002, 1024, 1033, 1039, 1041, 2045] {
            let error = base_resp_error("POST /v1/video_generation", code, "busy").expect("error");
            assert!(error.is_transient(), "{code}: {error}");
            assert!(!error.unanswered(), "{code}");
            assert!(error.to_string().contains(&code.to_string()), "{error}");
        }
        for code in [
            1004, 2049, 1008, 1026, 1027, 1042, 2013, 2038, 1028, 1030, 2056, 2061, 424_242,
        ] {
            let error = base_resp_error("GET /v1/files/retrieve", code, "no").expect("error");
            assert!(!error.is_transient(), "{code}: {error}");
            assert!(
                error.to_string().contains("GET /v1/files/retrieve"),
                "{error}"
            );
        }
        let blank = base_resp_error("x", 1004, " ").expect("error");
        assert!(blank.to_string().contains("(no status_msg)"), "{blank}");
    }

    #[test]
    fn sizes_become_minimax_resolutions() {
        assert_eq!(resolution("1920x1080"), "1080P");
        assert_eq!(resolution("720x1280"), "720P");
        assert_eq!(resolution("1366*768"), "768P");
        assert_eq!(resolution("768p"), "768P");
        assert_eq!(resolution("1080P"), "1080P");
        assert_eq!(resolution("hd"), "hd");
    }

    #[test]
    fn ids_may_be_strings_or_numbers() {
        assert_eq!(
            id_text(Some(&serde_json::json!(176_844_028_768_320_u64))).as_deref(),
            Some("176844028768320")
        );
        assert_eq!(
            id_text(Some(&serde_json::json!("106916112212032"))).as_deref(),
            Some("106916112212032")
        );
        assert_eq!(id_text(Some(&serde_json::json!(""))), None);
        assert_eq!(id_text(None), None);
    }

    #[test]
    fn a_fail_with_a_code_is_a_failed_task_not_a_failed_call() {
        let status = parse_query(
            br#"{"task_id":"1","status":"Fail","base_resp":{"status_code":1000,"status_msg":"unknown error"}}"#,
        )
        .expect("parses");
        assert_eq!(
            status,
            TaskQuery::Status(failed("unknown error (1000)".to_owned()))
        );
        // Without `Fail`, the same code is the query call failing (transient).
        let error =
            parse_query(br#"{"base_resp":{"status_code":1000,"status_msg":"unknown error"}}"#)
                .expect_err("call failed");
        assert!(error.is_transient(), "{error}");
    }

    #[test]
    fn the_group_id_is_sent_only_when_configured() {
        let plain = MinimaxProvider::new(
            "mm",
            &ProviderSettings::new(
                super::super::ProviderKind::Minimax,
                "https://api.minimax.io",
            ),
        )
        .expect("valid");
        assert_eq!(plain.retrieve_path("42"), "/v1/files/retrieve?file_id=42");
        let grouped = MinimaxProvider::new(
            "mm",
            &ProviderSettings {
                group_id: Some("19 48".to_owned()),
                ..ProviderSettings::new(
                    super::super::ProviderKind::Minimax,
                    "https://api.minimax.io",
                )
            },
        )
        .expect("valid");
        assert_eq!(
            grouped.retrieve_path("42"),
            "/v1/files/retrieve?GroupId=19+48&file_id=42"
        );
        assert_eq!(
            MinimaxProvider::query_path("a&b"),
            "/v1/query/video_generation?task_id=a%26b"
        );
        let blank = MinimaxProvider::new(
            "mm",
            &ProviderSettings {
                group_id: Some("  ".to_owned()),
                ..ProviderSettings::new(
                    super::super::ProviderKind::Minimax,
                    "https://api.minimax.io",
                )
            },
        )
        .expect_err("blank group id");
        assert!(
            blank.to_string().contains("providers.mm.group_id"),
            "{blank}"
        );
    }
}
