//! The HTTP side every adapter shares: the client, base URL, authentication, concurrency limit,
//! the status-call rate cap, how a response becomes a [`ProviderError`], and the metrics. Each
//! adapter only knows its paths, headers and bodies.

use std::fmt;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, AUTHORIZATION, RETRY_AFTER};
use reqwest::{Method, StatusCode};
use serde::Deserialize;
use tokio::sync::Semaphore;

use super::{ProviderConfigError, ProviderError, ProviderSettings, ProviderTask};
use crate::messages::truncate;

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

/// How a provider authenticates each request.
#[derive(Clone)]
pub(crate) enum Auth {
    /// `Authorization: Bearer <api_key>`; nothing when the key is empty.
    Bearer,
    /// `Authorization: Key <api_key>` (fal.ai).
    Key,
    /// The key alone in a header of its own (the Gemini API's `x-goog-api-key`).
    Header(HeaderName),
    /// An `Authorization` value made at run time (an OAuth2 access token, a signed JWT), asked
    /// for before every request so that the source can refresh it.
    Dynamic(Arc<dyn TokenSource>),
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Bearer => f.write_str("Bearer"),
            Self::Key => f.write_str("Key"),
            Self::Header(name) => write!(f, "Header({name})"),
            Self::Dynamic(source) => write!(f, "Dynamic({source:?})"),
        }
    }
}

/// A source of `Authorization` header values that change over time.
#[async_trait::async_trait]
pub(crate) trait TokenSource: Send + Sync + fmt::Debug {
    /// The value to send now (e.g. `Bearer ya29…`), marked sensitive.
    ///
    /// # Errors
    /// Transient when the token service could not be reached, permanent when it refused.
    async fn authorization(&self) -> Result<HeaderValue, ProviderError>;
}

/// One request to a provider: what to send, and which non-2xx statuses still count as success.
#[derive(Debug, Clone)]
pub(crate) struct Request<'a> {
    operation: Operation,
    method: Method,
    /// Starts with `/`; its variable segments are already escaped ([`path_segment`]).
    path: &'a str,
    body: Option<&'a serde_json::Value>,
    traceparent: Option<&'a str>,
    also_ok: &'a [StatusCode],
}

impl<'a> Request<'a> {
    pub(crate) fn new(operation: Operation, method: Method, path: &'a str) -> Self {
        Self {
            operation,
            method,
            path,
            body: None,
            traceparent: None,
            also_ok: &[],
        }
    }

    /// Sends `body` as JSON.
    pub(crate) fn json(mut self, body: &'a serde_json::Value) -> Self {
        self.body = Some(body);
        self
    }

    /// Sends the W3C trace context as the `traceparent` header, when there is one.
    pub(crate) fn traceparent(mut self, traceparent: Option<&'a str>) -> Self {
        self.traceparent = traceparent;
        self
    }

    /// Returns these non-2xx statuses as responses rather than errors (e.g. 404 on a delete that
    /// already happened).
    pub(crate) fn accepting(mut self, statuses: &'a [StatusCode]) -> Self {
        self.also_ok = statuses;
        self
    }

    /// `METHOD /path`, for error messages.
    pub(crate) fn describe(&self) -> String {
        format!("{} {}", self.method.as_str(), self.path)
    }
}

/// One provider's HTTP client and limits; see the module documentation.
pub(crate) struct HttpTransport {
    name: String,
    base_url: String,
    auth: Auth,
    /// `Authorization` (or the key header) for the static schemes; `None` when no key is set.
    authorization: Option<HeaderValue>,
    /// Sent with every request (e.g. `X-Runway-Version`).
    headers: HeaderMap,
    client: reqwest::Client,
    timeout: Duration,
    /// Why a semaphore and not only a connection pool limit: the pool limits idle connections,
    /// not requests in flight; the provider's own rate limits are about requests in flight.
    permits: Semaphore,
    max_concurrency: usize,
    /// `providers.<name>.max_retry_after_ms`: the longest `Retry-After` taken at its word.
    max_retry_after: Duration,
    /// `providers.<name>.max_status_rps`: status calls over it are not sent.
    status_limit: Option<(f64, DefaultDirectRateLimiter)>,
}

impl fmt::Debug for HttpTransport {
    // Written by hand so the key can never appear, whatever `HeaderValue` prints in the future.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpTransport")
            .field("name", &self.name)
            .field("base_url", &self.base_url)
            .field("auth", &self.auth)
            .field(
                "authorization",
                &self.authorization.as_ref().map(|_| "[REDACTED]"),
            )
            .field("timeout", &self.timeout)
            .field("max_concurrency", &self.max_concurrency)
            .finish_non_exhaustive()
    }
}

/// The body of a response that creates a job, reduced to the job's id.
#[derive(Debug, Deserialize)]
struct Created {
    id: String,
}

impl HttpTransport {
    /// Validates the settings of provider `name` and builds its client.
    ///
    /// # Errors
    /// [`ProviderConfigError`] naming `providers.<name>.<key>`.
    pub(crate) fn new(
        name: &str,
        settings: &ProviderSettings,
    ) -> Result<Self, ProviderConfigError> {
        Self::with_auth(name, settings, Auth::Bearer, HeaderMap::new())
    }

    /// As [`HttpTransport::new`], authenticating with `auth` and sending `headers` with every
    /// request.
    ///
    /// # Errors
    /// [`ProviderConfigError`] naming `providers.<name>.<key>`.
    pub(crate) fn with_auth(
        name: &str,
        settings: &ProviderSettings,
        auth: Auth,
        headers: HeaderMap,
    ) -> Result<Self, ProviderConfigError> {
        settings.validate(name)?;
        let authorization = match &auth {
            Auth::Bearer => settings.authorization(name)?,
            Auth::Key => settings.key_header("Key ", name)?,
            Auth::Header(_) => settings.key_header("", name)?,
            Auth::Dynamic(_) => None,
        };
        let status_limit = settings
            .max_status_rps()
            .map(|rps| (rps, status_limiter(rps)));
        let timeout = settings.timeout();
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
            auth,
            authorization,
            headers,
            client,
            timeout,
            permits: Semaphore::new(settings.max_concurrency),
            max_concurrency: settings.max_concurrency,
            max_retry_after: settings.max_retry_after(),
            status_limit,
        })
    }

    /// The configuration name of the provider.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// The base URL without a trailing slash.
    pub(crate) fn base_url(&self) -> &str {
        &self.base_url
    }

    /// Sends one request and classifies the outcome, recording the duration and error metrics;
    /// returns the body of a successful response.
    ///
    /// Non-2xx statuses become errors here (with the provider's message when the body carries
    /// one), so adapters only parse success bodies.
    ///
    /// # Errors
    /// Transient for connection failures, timeouts (including waiting longer than the timeout for
    /// a concurrency permit), 408, 429 and 5xx; permanent for other non-2xx statuses.
    pub(crate) async fn send(&self, request: Request<'_>) -> Result<Vec<u8>, ProviderError> {
        let operation = request.operation;
        let result = self.send_within_limits(request).await;
        match &result {
            // Not sent: counted in video_provider_throttled_total, not as the provider's error.
            Err(ProviderError::Throttled { .. }) | Ok(_) => {}
            Err(error) => self.record_error(operation, error),
        }
        result
    }

    /// `POST path` with `body`, creating a job; the job is read from the answer with `parse`.
    ///
    /// # Errors
    /// As [`HttpTransport::send`], or the error of `parse`.
    pub(crate) async fn submit_with(
        &self,
        path: &str,
        body: &serde_json::Value,
        traceparent: Option<&str>,
        parse: impl FnOnce(&[u8]) -> Result<ProviderTask, ProviderError>,
    ) -> Result<ProviderTask, ProviderError> {
        let request = Request::new(Operation::Submit, Method::POST, path)
            .json(body)
            .traceparent(traceparent);
        self.send_parsed(request, parse).await
    }

    /// `POST path` with `body`, creating a job; returns the job's `id` from the answer.
    /// `created` names the job in errors ("video", "prediction").
    ///
    /// # Errors
    /// As [`HttpTransport::send`]; permanent when the answer has no id or an empty one.
    pub(crate) async fn submit(
        &self,
        path: &str,
        body: &serde_json::Value,
        traceparent: Option<&str>,
        created: &str,
    ) -> Result<ProviderTask, ProviderError> {
        let request = Request::new(Operation::Submit, Method::POST, path)
            .json(body)
            .traceparent(traceparent);
        let what = request.describe();
        self.send_parsed(request, |body| {
            let Created { id } =
                serde_json::from_slice(body).map_err(|e| bad_body(&what, body, &e))?;
            if id.is_empty() {
                return Err(ProviderError::permanent(format!(
                    "{what}: the created {created} has an empty id"
                )));
            }
            Ok(ProviderTask { id })
        })
        .await
    }

    /// `GET path`, the job's status, read from the answer with `parse`.
    ///
    /// # Errors
    /// As [`HttpTransport::send`], or the error of `parse`.
    pub(crate) async fn status<T>(
        &self,
        path: &str,
        traceparent: Option<&str>,
        parse: impl FnOnce(&[u8]) -> Result<T, ProviderError>,
    ) -> Result<T, ProviderError> {
        let request = Request::new(Operation::Status, Method::GET, path).traceparent(traceparent);
        self.send_parsed(request, parse).await
    }

    /// Sends one request and reads the success body with `parse`; a parse error is prefixed with
    /// the provider's name and counted like any other error.
    pub(crate) async fn send_parsed<T>(
        &self,
        request: Request<'_>,
        parse: impl FnOnce(&[u8]) -> Result<T, ProviderError>,
    ) -> Result<T, ProviderError> {
        let operation = request.operation;
        let body = self.send(request).await?;
        parse(&body).map_err(|error| {
            let error = error.context(&self.name);
            self.record_error(operation, &error);
            error
        })
    }

    fn record_error(&self, operation: Operation, error: &ProviderError) {
        metrics::counter!(
            "video_provider_errors_total",
            "provider" => self.name.clone(),
            "operation" => operation.label(),
            "kind" => error.kind_label(),
        )
        .increment(1);
        tracing::debug!(provider = %self.name, operation = operation.label(), %error, "provider call failed");
    }

    async fn send_within_limits(&self, request: Request<'_>) -> Result<Vec<u8>, ProviderError> {
        if request.operation == Operation::Status {
            if let Some((rps, limiter)) = &self.status_limit {
                if let Err(not_until) = limiter.check() {
                    let wait = not_until.wait_time_from(governor::clock::Clock::now(
                        &governor::clock::DefaultClock::default(),
                    ));
                    metrics::counter!("video_provider_throttled_total", "provider" => self.name.clone())
                        .increment(1);
                    return Err(ProviderError::Throttled {
                        message: format!(
                            "{}: {}: at max_status_rps={rps} on this instance",
                            self.name,
                            request.describe()
                        ),
                        retry_after: wait.max(Duration::from_millis(1)),
                    });
                }
            }
        }
        // Bounded wait: a saturated provider should surface as a retryable error, not as callers
        // piling up behind the semaphore forever.
        let _permit = match tokio::time::timeout(self.timeout, self.permits.acquire()).await {
            Ok(Ok(permit)) => permit,
            Ok(Err(_closed)) => {
                return Err(ProviderError::permanent(format!(
                    "{}: {}: provider is shut down",
                    self.name,
                    request.describe()
                )))
            }
            Err(_elapsed) => {
                return Err(ProviderError::Transient {
                    message: format!(
                        "{}: {}: no free slot among max_concurrency={} within {:?}",
                        self.name,
                        request.describe(),
                        self.max_concurrency,
                        self.timeout
                    ),
                    retry_after: None,
                    unanswered: false,
                })
            }
        };
        let operation = request.operation;
        let started = Instant::now();
        let result = self.exchange(request).await;
        metrics::histogram!(
            "video_provider_request_duration_seconds",
            "provider" => self.name.clone(),
            "operation" => operation.label(),
        )
        .record(started.elapsed().as_secs_f64());
        result
    }

    async fn exchange(&self, request: Request<'_>) -> Result<Vec<u8>, ProviderError> {
        let what = format!("{}: {}", self.name, request.describe());
        let mut url = String::with_capacity(self.base_url.len() + request.path.len());
        url.push_str(&self.base_url);
        url.push_str(request.path);
        let mut builder = self
            .client
            .request(request.method, url)
            .headers(self.headers.clone());
        match (&self.auth, &self.authorization) {
            (Auth::Dynamic(source), _) => {
                let value = source.authorization().await.map_err(|e| e.context(&what))?;
                builder = builder.header(AUTHORIZATION, value);
            }
            (Auth::Header(name), Some(value)) => {
                builder = builder.header(name.clone(), value.clone());
            }
            (Auth::Bearer | Auth::Key, Some(value)) => {
                builder = builder.header(AUTHORIZATION, value.clone());
            }
            (_, None) => {}
        }
        if let Some(traceparent) = request.traceparent {
            if let Ok(value) = HeaderValue::from_str(traceparent) {
                builder = builder.header("traceparent", value);
            }
        }
        if let Some(body) = request.body {
            builder = builder.json(body);
        }
        let response = builder
            .send()
            .await
            .map_err(|e| classify_reqwest(&what, &e))?;
        let status = response.status();
        let retry_after =
            parse_retry_after(response.headers()).map(|d| d.min(self.max_retry_after));
        let bytes = response
            .bytes()
            .await
            .map_err(|e| classify_reqwest(&what, &e))?;
        if status.is_success() || request.also_ok.contains(&status) {
            return Ok(bytes.to_vec());
        }
        let message = format!("{what}: HTTP {status}: {}", error_summary(&bytes));
        if is_transient_status(status) {
            Err(ProviderError::Transient {
                message,
                retry_after,
                unanswered: false,
            })
        } else {
            Err(ProviderError::Permanent { message })
        }
    }
}

/// A limiter allowing `rps` calls per second on average, in bursts of at most `max(1, rps)`.
fn status_limiter(rps: f64) -> DefaultDirectRateLimiter {
    let period = Duration::from_secs_f64((1.0 / rps).clamp(1e-9, 86_400.0));
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    // rps is finite and positive (validated); the burst is clamped into u32's range first.
    let burst =
        NonZeroU32::new(rps.clamp(1.0, f64::from(u32::MAX)) as u32).unwrap_or(NonZeroU32::MIN);
    let quota = Quota::with_period(period)
        .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
        .allow_burst(burst);
    RateLimiter::direct(quota)
}

/// A status value the protocol does not document: a transient error (the provider may have
/// added a state; the next check asks again), logged loudly so that the adapter gets updated.
pub(crate) fn unknown_status(
    provider: &str,
    job: &str,
    status: &str,
    expected: &str,
) -> ProviderError {
    let status = truncate(status, 50);
    tracing::warn!(provider, job, status = %status, expected, "the provider answered a status this adapter does not know; asking again later");
    ProviderError::Transient {
        message: format!("{provider} job {job}: unknown status \"{status}\" (expected {expected})"),
        retry_after: None,
        unanswered: false,
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
        // A connection that never opened carried nothing; anything later (a timeout waiting
        // for the answer, a reset mid-response) may have been acted on.
        ProviderError::Transient {
            message,
            retry_after: None,
            unanswered: !error.is_connect(),
        }
    }
}

/// `Retry-After` as delay-seconds or an HTTP date (RFC 9110 §10.2.3).
fn parse_retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    // Past u64 (a provider bug): as long as can be, and the caller's cap decides.
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        return Some(Duration::MAX);
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
            .or_else(|| value.pointer("/issues/0/message"))
            .or_else(|| value.pointer("/detail/0/msg"))
            .or_else(|| value.get("detail"))
            .or_else(|| value.get("error"))
            .or_else(|| value.get("title"))
            .or_else(|| value.get("message"))
            .or_else(|| value.pointer("/base_resp/status_msg"));
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

    proptest::proptest! {
        /// Whatever a provider writes in `Retry-After`, parsing never panics and the cap holds.
        #[test]
        fn any_retry_after_parses_without_panic_and_is_capped(value in "\\PC{0,40}|[0-9]{1,30}") {
            let mut headers = HeaderMap::new();
            if let Ok(v) = HeaderValue::from_str(&value) {
                headers.insert(RETRY_AFTER, v);
            }
            let cap = Duration::from_secs(300);
            if let Some(d) = parse_retry_after(&headers).map(|d| d.min(cap)) {
                proptest::prop_assert!(d <= cap);
            }
        }
    }
}
