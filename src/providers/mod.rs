//! Video providers: the external systems that actually render videos.
//!
//! A [`VideoProvider`] submits a job, reports its status and (where the protocol allows) cancels it.
//! Two adapters speak real HTTP protocols, one file each:
//!
//! - [`openai_videos`]: the OpenAI-compatible Videos API (`/v1/videos`), served by many gateways;
//! - [`replicate`]: Replicate's predictions API (`/v1/predictions`).
//!
//! [`sim`] is a simulated provider server speaking both protocols, a test double of the external
//! system used by the tests, the demo and the benchmarks.
//!
//! Errors are split the way callers branch: [`ProviderError::Transient`] (connection failure,
//! timeout, 429, 5xx — worth retrying, honouring `Retry-After`) versus [`ProviderError::Permanent`]
//! (any other 4xx, a body we cannot understand — retrying would only repeat the failure).
//!
//! [`Providers`] is the configured set, built once from settings, and the model → provider routing.
//!
//! This module knows HTTP and the providers' protocols, nothing of the broker, the store or the
//! orchestrators.

pub mod openai_videos;
pub mod replicate;
pub mod sim;

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION, RETRY_AFTER};
use reqwest::{Method, StatusCode};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

/// One configured provider (`providers.<name>` in the configuration).
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ProviderSettings {
    /// Which protocol the provider speaks.
    pub kind: ProviderKind,
    /// Base URL, without the `/v1` suffix (e.g. `https://api.openai.com`); a path prefix is kept,
    /// so a gateway at `https://gw.example.com/openai` works.
    pub base_url: String,
    /// Sent as `Authorization: Bearer <key>`; no header is sent when empty. Never logged:
    /// `SecretString`'s `Debug` prints `[REDACTED]`.
    #[serde(default, serialize_with = "crate::redact::secret_redacted")]
    pub api_key: SecretString,
    /// Per HTTP request timeout (connect + response), also the longest wait for a concurrency
    /// permit.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// At most this many requests in flight to this provider from this process.
    #[serde(default = "default_max_concurrency")]
    pub max_concurrency: usize,
    /// OpenAI-compatible protocol only: that protocol has no cancel, only `DELETE` (which removes
    /// the video); cancel deletes only when this is `true`.
    #[serde(default)]
    pub cancel_deletes: bool,
}

fn default_timeout_ms() -> u64 {
    10_000
}

fn default_max_concurrency() -> usize {
    64
}

/// The protocol a provider speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProviderKind {
    /// The OpenAI-compatible Videos API.
    OpenaiVideos,
    /// Replicate's predictions API.
    Replicate,
}

/// Which provider serves which model (the `routing` configuration section).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct RoutingSettings {
    /// Exact model name → provider name.
    #[serde(default)]
    pub models: Vec<ModelRoute>,
    /// Provider for models without a route; `None` makes such models unroutable.
    #[serde(default)]
    pub default_provider: Option<String>,
}

/// One model → provider route.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ModelRoute {
    /// The model name as requested (exact match).
    pub model: String,
    /// A name configured under `providers`.
    pub provider: String,
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct SubmitRequest {
    /// Our request id (for logs; the protocols have no place for it).
    pub request_id: String,
    /// Model name as the provider knows it.
    pub model: String,
    /// The prompt.
    pub prompt: String,
    /// Clip length, when the caller asked for one.
    pub duration_seconds: Option<u32>,
    /// Resolution such as `1280x720`, when the caller asked for one.
    pub size: Option<String>,
    /// Caller metadata; not sent (neither protocol has a field for it).
    pub metadata: Option<serde_json::Value>,
    /// W3C trace context, sent as the `traceparent` header.
    pub traceparent: Option<String>,
}

/// The provider's handle on a submitted job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderTask {
    /// The provider's job id.
    pub id: String,
}

/// A provider job's state, common to all protocols.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderState {
    /// Accepted, not running yet.
    Queued,
    /// Running.
    InProgress,
    /// Finished with a video.
    Succeeded,
    /// Finished without a video.
    Failed,
    /// Cancelled at the provider.
    Cancelled,
}

impl ProviderState {
    /// Whether the job will not change any more.
    #[must_use]
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }
}

/// One status observation of a provider job.
#[derive(Debug, Clone, PartialEq)]
pub struct ProviderStatus {
    /// Where the job is.
    pub state: ProviderState,
    /// Percentage 0–100 when the provider reports one (`None` means unknown, not zero).
    pub progress: Option<u8>,
    /// The finished video, on success.
    pub video_url: Option<String>,
    /// When `video_url` stops working, when known.
    pub video_url_expires_at: Option<chrono::DateTime<chrono::Utc>>,
    /// Length of the clip in seconds, when known.
    pub video_seconds: Option<f64>,
    /// The provider's error text, on failure.
    pub error: Option<String>,
}

/// What a cancel achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelOutcome {
    /// The provider accepted the cancel (or deleted the job). A job that had already finished
    /// keeps its final state; ask [`VideoProvider::status`] to know.
    Cancelled,
    /// The provider cannot cancel; the caller should simply stop tracking the job.
    Unsupported,
}

/// Why a provider call failed, split the way callers branch.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// Worth retrying: connection failure, timeout, 429, 5xx.
    #[error("transient provider error: {message}")]
    Transient {
        /// What happened, for logs.
        message: String,
        /// The provider's `Retry-After`, when it sent one.
        retry_after: Option<Duration>,
    },
    /// Retrying would repeat the failure: other 4xx, a body we cannot understand.
    #[error("permanent provider error: {message}")]
    Permanent {
        /// What happened, for logs.
        message: String,
    },
}

impl ProviderError {
    /// Whether a retry may succeed.
    #[must_use]
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Transient { .. })
    }

    /// How long the provider asked us to wait, when it said.
    #[must_use]
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Transient { retry_after, .. } => *retry_after,
            Self::Permanent { .. } => None,
        }
    }

    pub(crate) fn permanent(message: impl Into<String>) -> Self {
        Self::Permanent {
            message: message.into(),
        }
    }

    /// The same error with `prefix: ` before its message (e.g. the provider name).
    pub(crate) fn context(self, prefix: &str) -> Self {
        match self {
            Self::Transient {
                message,
                retry_after,
            } => Self::Transient {
                message: format!("{prefix}: {message}"),
                retry_after,
            },
            Self::Permanent { message } => Self::Permanent {
                message: format!("{prefix}: {message}"),
            },
        }
    }

    fn kind_label(&self) -> &'static str {
        if self.is_transient() {
            "transient"
        } else {
            "permanent"
        }
    }
}

/// An external video generation service.
#[async_trait::async_trait]
pub trait VideoProvider: Send + Sync + fmt::Debug {
    /// The configuration name, e.g. `"sim"`.
    fn name(&self) -> &str;

    /// Starts a job.
    ///
    /// # Errors
    /// [`ProviderError::Transient`] when a retry may succeed, [`ProviderError::Permanent`] when
    /// the provider refused the request or answered something we cannot read.
    async fn submit(&self, request: &SubmitRequest) -> Result<ProviderTask, ProviderError>;

    /// Asks where a job is.
    ///
    /// # Errors
    /// As for [`VideoProvider::submit`]; an unknown job is permanent.
    async fn status(
        &self,
        task: &ProviderTask,
        traceparent: Option<&str>,
    ) -> Result<ProviderStatus, ProviderError>;

    /// Cancels a job, where the protocol allows.
    ///
    /// # Errors
    /// As for [`VideoProvider::submit`].
    async fn cancel(&self, task: &ProviderTask) -> Result<CancelOutcome, ProviderError>;
}

/// A configuration mistake in `providers` or `routing`; the message names the offending key.
#[derive(Debug, thiserror::Error)]
pub enum ProviderConfigError {
    /// A setting has an unusable value.
    #[error("{key}: {reason}")]
    Invalid {
        /// The configuration key, e.g. `providers.sim.base_url`.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A route names a provider that is not configured.
    #[error("{key}: provider \"{provider}\" is not configured under `providers` (configured: {configured})")]
    UnknownProvider {
        /// The configuration key, e.g. `routing.default_provider`.
        key: String,
        /// The name it gave.
        provider: String,
        /// The names that are configured, comma separated.
        configured: String,
    },
    /// The HTTP client could not be built (TLS backend initialisation).
    #[error("providers.{name}: cannot build the HTTP client: {source}")]
    HttpClient {
        /// The provider's name.
        name: String,
        /// The cause.
        #[source]
        source: reqwest::Error,
    },
}

/// The configured providers and the routing between them. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Providers {
    by_name: HashMap<String, Arc<dyn VideoProvider>>,
    routes: HashMap<String, String>,
    default_provider: Option<String>,
}

impl Providers {
    /// Builds every configured provider and checks the routing against them.
    ///
    /// # Errors
    /// [`ProviderConfigError`] naming the key when a base URL is not an http(s) URL, a timeout or
    /// concurrency limit is zero, a route is duplicated, or a route or the default provider names
    /// a provider that is not configured.
    pub fn from_settings(
        settings: &HashMap<String, ProviderSettings>,
        routing: &RoutingSettings,
    ) -> Result<Self, ProviderConfigError> {
        let mut by_name: HashMap<String, Arc<dyn VideoProvider>> = HashMap::new();
        for (name, provider) in settings {
            let built: Arc<dyn VideoProvider> = match provider.kind {
                ProviderKind::OpenaiVideos => {
                    Arc::new(openai_videos::OpenAiVideosProvider::new(name, provider)?)
                }
                ProviderKind::Replicate => {
                    Arc::new(replicate::ReplicateProvider::new(name, provider)?)
                }
            };
            by_name.insert(name.clone(), built);
        }
        let configured = || {
            let mut names: Vec<&str> = settings.keys().map(String::as_str).collect();
            names.sort_unstable();
            if names.is_empty() {
                "none".to_owned()
            } else {
                names.join(", ")
            }
        };
        let mut routes = HashMap::new();
        let mut first_index: HashMap<&str, usize> = HashMap::new();
        for (index, route) in routing.models.iter().enumerate() {
            if !settings.contains_key(&route.provider) {
                return Err(ProviderConfigError::UnknownProvider {
                    key: format!("routing.models[{index}].provider"),
                    provider: route.provider.clone(),
                    configured: configured(),
                });
            }
            if let Some(first) = first_index.insert(route.model.as_str(), index) {
                return Err(ProviderConfigError::Invalid {
                    key: format!("routing.models[{index}].model"),
                    reason: format!(
                        "model \"{}\" is already routed by routing.models[{first}]",
                        route.model
                    ),
                });
            }
            routes.insert(route.model.clone(), route.provider.clone());
        }
        if let Some(default) = &routing.default_provider {
            if !settings.contains_key(default) {
                return Err(ProviderConfigError::UnknownProvider {
                    key: "routing.default_provider".to_owned(),
                    provider: default.clone(),
                    configured: configured(),
                });
            }
        }
        Ok(Self {
            by_name,
            routes,
            default_provider: routing.default_provider.clone(),
        })
    }

    /// The provider for a request: the requested one if given (and `None` if it is not
    /// configured, rather than silently sending elsewhere), otherwise the model's route, otherwise
    /// the default provider.
    #[must_use]
    pub fn route(
        &self,
        model: &str,
        requested_provider: Option<&str>,
    ) -> Option<Arc<dyn VideoProvider>> {
        if let Some(requested) = requested_provider {
            return self.get(requested);
        }
        let name = self.routes.get(model).or(self.default_provider.as_ref())?;
        self.get(name)
    }

    /// The provider configured under `name`.
    #[must_use]
    pub fn get(&self, name: &str) -> Option<Arc<dyn VideoProvider>> {
        self.by_name.get(name).cloned()
    }

    /// The configured provider names, sorted.
    #[must_use]
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.by_name.keys().cloned().collect();
        names.sort_unstable();
        names
    }
}

/// The provider call being made, for metrics labels and error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Operation {
    Submit,
    Status,
    Cancel,
}

impl Operation {
    fn label(self) -> &'static str {
        match self {
            Self::Submit => "submit",
            Self::Status => "status",
            Self::Cancel => "cancel",
        }
    }
}

/// A successful (2xx, or explicitly accepted) response, body fully read.
#[derive(Debug)]
pub(crate) struct HttpResponse {
    pub(crate) body: Vec<u8>,
}

/// What both adapters share: the HTTP client, base URL, key, concurrency limit, error
/// classification and metrics. Each adapter only knows its paths and bodies.
pub(crate) struct HttpTransport {
    name: String,
    base_url: String,
    /// `Bearer <key>`, built once and marked sensitive (kept out of any debug output); `None`
    /// when no key is configured.
    authorization: Option<HeaderValue>,
    client: reqwest::Client,
    timeout: Duration,
    /// Why a semaphore and not only a connection pool limit: the pool limits idle connections,
    /// not requests in flight; the provider's own rate limits are about requests in flight.
    permits: Semaphore,
    max_concurrency: usize,
}

impl fmt::Debug for HttpTransport {
    // Written by hand so the key can never appear, whatever `HeaderValue` prints in the future.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpTransport")
            .field("name", &self.name)
            .field("base_url", &self.base_url)
            .field(
                "authorization",
                &self.authorization.as_ref().map(|_| "[REDACTED]"),
            )
            .field("timeout", &self.timeout)
            .field("max_concurrency", &self.max_concurrency)
            .finish_non_exhaustive()
    }
}

impl HttpTransport {
    /// Validates the settings of provider `name` and builds its client.
    ///
    /// The `Authorization` value is built here, once: a key that cannot be a header value is a
    /// configuration error at start-up rather than a failure of every call.
    ///
    /// # Errors
    /// [`ProviderConfigError`] naming `providers.<name>.<key>`.
    pub(crate) fn new(
        name: &str,
        settings: &ProviderSettings,
    ) -> Result<Self, ProviderConfigError> {
        let key = |field: &str| format!("providers.{name}.{field}");
        let parsed =
            url::Url::parse(&settings.base_url).map_err(|e| ProviderConfigError::Invalid {
                key: key("base_url"),
                reason: format!("\"{}\" is not a URL: {e}", settings.base_url),
            })?;
        if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
            return Err(ProviderConfigError::Invalid {
                key: key("base_url"),
                reason: format!(
                    "\"{}\" must be an http:// or https:// URL with a host",
                    settings.base_url
                ),
            });
        }
        if parsed.query().is_some() || parsed.fragment().is_some() {
            return Err(ProviderConfigError::Invalid {
                key: key("base_url"),
                reason: format!(
                    "\"{}\" must not have a query or fragment",
                    settings.base_url
                ),
            });
        }
        if settings.timeout_ms == 0 {
            return Err(ProviderConfigError::Invalid {
                key: key("timeout_ms"),
                reason: "must be greater than 0".to_owned(),
            });
        }
        if settings.max_concurrency == 0 || settings.max_concurrency > Semaphore::MAX_PERMITS {
            return Err(ProviderConfigError::Invalid {
                key: key("max_concurrency"),
                reason: format!(
                    "must be between 1 and {}, got {}",
                    Semaphore::MAX_PERMITS,
                    settings.max_concurrency
                ),
            });
        }
        let secret = settings.api_key.expose_secret();
        let authorization = if secret.is_empty() {
            None
        } else {
            let mut value = HeaderValue::try_from(format!("Bearer {secret}")).map_err(|_| {
                // Never echo the value: it is the secret.
                ProviderConfigError::Invalid {
                    key: key("api_key"),
                    reason: "contains characters not allowed in an HTTP header".to_owned(),
                }
            })?;
            value.set_sensitive(true);
            Some(value)
        };
        let timeout = Duration::from_millis(settings.timeout_ms);
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .user_agent(concat!("video-orchestrator/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|source| ProviderConfigError::HttpClient {
                name: name.to_owned(),
                source,
            })?;
        Ok(Self {
            name: name.to_owned(),
            base_url: settings.base_url.trim_end_matches('/').to_owned(),
            authorization,
            client,
            timeout,
            permits: Semaphore::new(settings.max_concurrency),
            max_concurrency: settings.max_concurrency,
        })
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// The base URL without a trailing slash.
    pub(crate) fn base_url(&self) -> &str {
        &self.base_url
    }

    /// `{base_url}{path}`; `path` starts with `/` and its variable segments are already escaped.
    pub(crate) fn url(&self, path: &str) -> String {
        let mut url = String::with_capacity(self.base_url.len() + path.len());
        url.push_str(&self.base_url);
        url.push_str(path);
        url
    }

    /// Sends one request and classifies the outcome, recording the duration and error metrics.
    ///
    /// Non-2xx statuses become errors here (with the provider's message when the body carries
    /// one), so adapters only parse success bodies.
    ///
    /// # Errors
    /// Transient for connection failures, timeouts (including waiting longer than the timeout for
    /// a concurrency permit), 408, 429 and 5xx; permanent for other non-2xx statuses.
    pub(crate) async fn send(
        &self,
        operation: Operation,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
        traceparent: Option<&str>,
    ) -> Result<HttpResponse, ProviderError> {
        self.send_accepting(operation, method, path, body, traceparent, &[])
            .await
    }

    /// As [`HttpTransport::send`], but the non-2xx statuses in `also_ok` are returned as
    /// responses rather than errors (e.g. 404 on a delete that already happened).
    ///
    /// # Errors
    /// As [`HttpTransport::send`].
    pub(crate) async fn send_accepting(
        &self,
        operation: Operation,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
        traceparent: Option<&str>,
        also_ok: &[StatusCode],
    ) -> Result<HttpResponse, ProviderError> {
        let result = self
            .send_inner(operation, method, path, body, traceparent, also_ok)
            .await;
        if let Err(error) = &result {
            self.record_error(operation, error);
        }
        result
    }

    /// Counts an error found after [`HttpTransport::send`] returned (a body that does not parse).
    pub(crate) fn record_error(&self, operation: Operation, error: &ProviderError) {
        metrics::counter!(
            "video_provider_errors_total",
            "provider" => self.name.clone(),
            "operation" => operation.label(),
            "kind" => error.kind_label(),
        )
        .increment(1);
        tracing::debug!(provider = %self.name, operation = operation.label(), %error, "provider call failed");
    }

    async fn send_inner(
        &self,
        operation: Operation,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
        traceparent: Option<&str>,
        also_ok: &[StatusCode],
    ) -> Result<HttpResponse, ProviderError> {
        // Bounded wait: a saturated provider should surface as a retryable error, not as callers
        // piling up behind the semaphore forever.
        let _permit = match tokio::time::timeout(self.timeout, self.permits.acquire()).await {
            Ok(Ok(permit)) => permit,
            Ok(Err(_closed)) => {
                return Err(ProviderError::permanent(format!(
                    "{}: {} {path}: provider is shut down",
                    self.name,
                    method.as_str()
                )))
            }
            Err(_elapsed) => {
                return Err(ProviderError::Transient {
                    message: format!(
                        "{}: {} {path}: no free slot among max_concurrency={} within {:?}",
                        self.name,
                        method.as_str(),
                        self.max_concurrency,
                        self.timeout
                    ),
                    retry_after: None,
                })
            }
        };
        let started = Instant::now();
        let result = self
            .exchange(method, path, body, traceparent, also_ok)
            .await;
        metrics::histogram!(
            "video_provider_request_duration_seconds",
            "provider" => self.name.clone(),
            "operation" => operation.label(),
        )
        .record(started.elapsed().as_secs_f64());
        result
    }

    async fn exchange(
        &self,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
        traceparent: Option<&str>,
        also_ok: &[StatusCode],
    ) -> Result<HttpResponse, ProviderError> {
        let what = format!("{}: {} {path}", self.name, method.as_str());
        let mut request = self.client.request(method, self.url(path));
        if let Some(authorization) = &self.authorization {
            request = request.header(AUTHORIZATION, authorization.clone());
        }
        if let Some(traceparent) = traceparent {
            if let Ok(value) = HeaderValue::from_str(traceparent) {
                request = request.header("traceparent", value);
            }
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request
            .send()
            .await
            .map_err(|e| classify_reqwest(&what, &e))?;
        let status = response.status();
        let retry_after = parse_retry_after(response.headers());
        let bytes = response
            .bytes()
            .await
            .map_err(|e| classify_reqwest(&what, &e))?;
        if status.is_success() || also_ok.contains(&status) {
            return Ok(HttpResponse {
                body: bytes.to_vec(),
            });
        }
        let message = format!("{what}: HTTP {status}: {}", error_summary(&bytes));
        if is_transient_status(status) {
            Err(ProviderError::Transient {
                message,
                retry_after,
            })
        } else {
            Err(ProviderError::Permanent { message })
        }
    }
}

fn is_transient_status(status: StatusCode) -> bool {
    status == StatusCode::TOO_MANY_REQUESTS
        || status == StatusCode::REQUEST_TIMEOUT
        || status.is_server_error()
}

/// Everything reqwest reports while sending or reading is a network-level failure (connect,
/// timeout, reset mid-body) and so worth retrying, except a request we could not even build.
fn classify_reqwest(what: &str, error: &reqwest::Error) -> ProviderError {
    // `{:#}`-like chain: reqwest's Display hides the cause (e.g. "connection refused").
    let mut message = format!("{what}: {error}");
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    if error.is_builder() {
        ProviderError::Permanent { message }
    } else {
        ProviderError::Transient {
            message,
            retry_after: None,
        }
    }
}

/// `Retry-After` as delay-seconds or an HTTP date (RFC 9110 §10.2.3).
pub(crate) fn parse_retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    let delta = at.with_timezone(&chrono::Utc) - chrono::Utc::now();
    Some(delta.to_std().unwrap_or(Duration::ZERO))
}

/// The provider's own words from an error body: OpenAI's `error.message`, Replicate's
/// `detail`/`title`, or else the start of the raw body.
fn error_summary(body: &[u8]) -> String {
    if let Ok(value) = serde_json::from_slice::<serde_json::Value>(body) {
        let message = value
            .pointer("/error/message")
            .or_else(|| value.get("detail"))
            .or_else(|| value.get("error"))
            .or_else(|| value.get("title"))
            .or_else(|| value.get("message"));
        match message {
            Some(serde_json::Value::String(text)) => return truncate(text, 500),
            Some(serde_json::Value::Null) | None => {}
            Some(other) => return truncate(&other.to_string(), 500),
        }
    }
    if body.is_empty() {
        return "(empty body)".to_owned();
    }
    truncate(&String::from_utf8_lossy(body), 200)
}

pub(crate) use crate::messages::truncate;

/// A body that did not parse: permanent (asking again gets the same body), and descriptive.
pub(crate) fn bad_body(what: &str, body: &[u8], error: &serde_json::Error) -> ProviderError {
    ProviderError::permanent(format!(
        "{what}: unexpected response body ({error}): {}",
        if body.is_empty() {
            "(empty body)".to_owned()
        } else {
            truncate(&String::from_utf8_lossy(body), 200)
        }
    ))
}

/// Escapes a provider id for use as one path segment, so an odd id cannot change the path.
pub(crate) fn path_segment(id: &str) -> String {
    url::form_urlencoded::byte_serialize(id.as_bytes())
        .collect::<String>()
        .replace('+', "%20")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_accepts_seconds_and_http_dates() {
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, HeaderValue::from_static("7"));
        assert_eq!(parse_retry_after(&headers), Some(Duration::from_secs(7)));

        let later = chrono::Utc::now() + chrono::Duration::seconds(30);
        let date = later.format("%a, %d %b %Y %H:%M:%S GMT").to_string();
        headers.insert(RETRY_AFTER, HeaderValue::from_str(&date).expect("header"));
        let parsed = parse_retry_after(&headers).expect("date parses");
        assert!(parsed > Duration::from_secs(25) && parsed <= Duration::from_secs(30));

        headers.insert(RETRY_AFTER, HeaderValue::from_static("soon"));
        assert_eq!(parse_retry_after(&headers), None);
    }

    #[test]
    fn error_summary_prefers_the_providers_message() {
        assert_eq!(
            error_summary(br#"{"error":{"message":"bad size","type":"invalid_request_error"}}"#),
            "bad size"
        );
        assert_eq!(
            error_summary(
                br#"{"title":"Invalid version","detail":"no such version","status":422}"#
            ),
            "no such version"
        );
        assert_eq!(error_summary(b"<html>oops</html>"), "<html>oops</html>");
        assert_eq!(error_summary(b""), "(empty body)");
    }

    #[test]
    fn path_segments_are_escaped() {
        assert_eq!(path_segment("video_abc"), "video_abc");
        assert_eq!(path_segment("a/b c"), "a%2Fb%20c");
    }

    #[test]
    fn truncate_respects_char_boundaries() {
        assert_eq!(truncate("héllo", 2), "h…");
        assert_eq!(truncate("abc", 5), "abc");
    }
}
