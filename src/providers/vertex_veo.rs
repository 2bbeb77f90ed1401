//! Google Veo on Vertex AI (`veo-3.1-generate-001` and the other Veo models).
//!
//! Sources: the Vertex AI Veo pages ("Generate videos with Veo from text", the Veo model
//! reference), the REST reference of `projects.locations.publishers.models.predictLongRunning`
//! and `.fetchPredictOperation`, the google-genai Python SDK (`operations.py`: the Vertex path
//! polls `{model}:fetchPredictOperation`, the model being the operation name before
//! `/operations/`; `models.py` `_Video_from_vertex`), and Google's "OAuth 2.0 for Server to
//! Server Applications" for the service-account flow.
//!
//! - base URL: `https://{location}-aiplatform.googleapis.com` (`https://aiplatform.googleapis.com`
//!   for the `global` location); `project` and `location` are required settings;
//! - submit: `POST /v1/projects/{project}/locations/{location}/publishers/google/models/{model}:predictLongRunning`
//!   with `{"instances":[{"prompt"}],"parameters":{"sampleCount":1,"storageUri",
//!   "durationSeconds"?,"aspectRatio"?,"resolution"?}}`, answered `{"name":
//!   "projects/…/publishers/google/models/{model}/operations/{uuid}"}`: that name is the task id;
//! - status: `POST /v1/{model resource}:fetchPredictOperation` with `{"operationName": name}`,
//!   the model resource taken from the name (the generic `GET /v1/{name}` fails: Veo's operation
//!   ids are UUIDs, "Operation ID must be a Long"). The answer is an operation: no status enum,
//!   `done` (absent while false) then `error` (`google.rpc.Status`) or `response` with
//!   `videos[]` (`gcsUri`, `mimeType`) and `raiMediaFilteredCount`/`raiMediaFilteredReasons`;
//!   - not done → `InProgress`, progress `None` (Veo reports none);
//!   - done with `error` → `Failed` with its message (`CANCELLED`, code 1, → `Cancelled`);
//!   - done with videos → `Succeeded`, `video_url` = the first `gcsUri`;
//!   - done with inline `bytesBase64Encoded` (what Veo does without `storageUri`) → Failed with
//!     a message naming `providers.<name>.storage_uri`: we never carry video bytes;
//!   - done with no video and `raiMediaFilteredCount > 0` → Failed with the filter's reasons;
//!   - done with neither `error` nor `response` → a transient error (logged);
//! - `storage_uri` is required (`new` refuses without it): without `storageUri` Veo answers the
//!   bytes inline, which would make every job fail after it was paid for. Videos land under it
//!   (`{storage_uri}/{timestamped folder}/sample_0.mp4`);
//! - URL expiry: none. The `gs://` URI is in the user's own bucket and lives as long as the
//!   bucket's lifecycle rules say; it is not an HTTP URL (read it with Cloud Storage
//!   credentials, or sign it);
//! - cancel: no cancel is documented for Veo operations (neither the Veo pages nor the SDKs have
//!   one, and the generic operations endpoints do not take Veo's UUID operation ids), so cancel
//!   is [`CancelOutcome::Unsupported`];
//! - idempotency: none. `predictLongRunning` has no client-set id and there is no listing to
//!   match on, so a submit whose answer was lost is unknowable (the default `find_submitted`);
//! - auth: `Authorization: Bearer <OAuth2 access token>`, from exactly one of
//!   `access_token` (sent as is, never refreshed) or `service_account_key_file` (a JSON key:
//!   an RS256 JWT with `iss` = `client_email`, `scope` = cloud-platform, `aud` = `token_uri`,
//!   `kid` = `private_key_id`, one hour long, exchanged at `token_uri` for an access token that is
//!   cached until five minutes before it expires; one refresh at a time, callers waiting for it
//!   share its outcome). `api_key` is not used.
//!   Tokens are never logged.
//!
//! Errors come as `{"error":{"code","message","status"}}`, which the transport already reads.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::header::{HeaderMap, HeaderValue};
use reqwest::{Method, StatusCode};
use secrecy::ExposeSecret;
use serde::Serialize;

use super::google_operation::{
    self, created_operation, match_name, veo_parameters, GeneratedVideo, LongRunningOperation,
    Stage, VideoResult,
};
use super::transport::{path_segment, Auth, HttpTransport, Operation, Request, TokenSource};
use super::{
    CancelOutcome, ProviderConfigError, ProviderError, ProviderSettings, ProviderStatus,
    ProviderTask, SubmitRequest, VideoProvider,
};
use crate::messages::truncate;

/// The OAuth2 scope asked for: Vertex AI accepts the cloud-platform scope.
pub const CLOUD_PLATFORM_SCOPE: &str = "https://www.googleapis.com/auth/cloud-platform";

/// The token endpoint when a key file names none.
pub const DEFAULT_TOKEN_URI: &str = "https://oauth2.googleapis.com/token";

/// The grant type of the JWT bearer flow (RFC 7523).
pub const JWT_BEARER_GRANT: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";

/// How long before its expiry a cached access token is replaced (at most half its lifetime,
/// for short-lived tokens).
pub const TOKEN_REFRESH_MARGIN: Duration = Duration::from_secs(300);

/// The lifetime of the signed JWT (Google's maximum, one hour).
const ASSERTION_LIFETIME_SECS: i64 = 3600;

/// The shape of an operation name: project, location, publisher, model, operation id.
const OPERATION_NAME: &str = "projects/*/locations/*/publishers/*/models/*/operations/*";

/// A provider speaking Google Veo on Vertex AI.
#[derive(Debug)]
pub struct VertexVeoProvider {
    transport: HttpTransport,
    project: String,
    location: String,
    storage_uri: String,
}

impl VertexVeoProvider {
    /// Builds the adapter for provider `name`; reads the service-account key file when one is
    /// configured.
    ///
    /// # Errors
    /// [`ProviderConfigError`] naming `providers.<name>.<key>` when a setting is unusable:
    /// `project`, `location` or `storage_uri` unset, `storage_uri` not a `gs://` URI, neither or
    /// both of `access_token` and `service_account_key_file`, or a key file that cannot be read
    /// or is not a service-account key.
    pub fn new(name: &str, settings: &ProviderSettings) -> Result<Self, ProviderConfigError> {
        settings.validate(name)?;
        let project =
            ProviderSettings::required(name, "project", settings.project.as_ref())?.trim();
        let location =
            ProviderSettings::required(name, "location", settings.location.as_ref())?.trim();
        let storage_uri =
            ProviderSettings::required(name, "storage_uri", settings.storage_uri.as_ref())?.trim();
        let bucket = storage_uri.strip_prefix("gs://").unwrap_or_default();
        if bucket.is_empty() || bucket.starts_with('/') {
            return Err(ProviderSettings::invalid(
                name,
                "storage_uri",
                format!(
                    "\"{storage_uri}\" must be a Cloud Storage URI such as gs://my-bucket/veo/ (Veo writes the videos there)"
                ),
            ));
        }
        let token = settings
            .access_token
            .as_ref()
            .map(|token| token.expose_secret().trim())
            .filter(|token| !token.is_empty());
        let key_file = settings
            .service_account_key_file
            .as_deref()
            .map(str::trim)
            .filter(|path| !path.is_empty());
        let source: Arc<dyn TokenSource> = match (token, key_file) {
            (Some(token), None) => Arc::new(StaticToken::new(name, token)?),
            (None, Some(path)) => Arc::new(ServiceAccountTokens::from_key_file(
                name,
                path,
                settings.timeout(),
            )?),
            (Some(_), Some(_)) => {
                return Err(ProviderSettings::invalid(
                    name,
                    "access_token",
                    format!(
                        "set exactly one of providers.{name}.access_token and providers.{name}.service_account_key_file, not both"
                    ),
                ))
            }
            (None, None) => {
                return Err(ProviderSettings::invalid(
                    name,
                    "access_token",
                    format!(
                        "one of providers.{name}.access_token or providers.{name}.service_account_key_file is required"
                    ),
                ))
            }
        };
        Ok(Self {
            transport: HttpTransport::with_auth(
                name,
                settings,
                Auth::Dynamic(source),
                HeaderMap::new(),
            )?,
            project: project.to_owned(),
            location: location.to_owned(),
            storage_uri: storage_uri.to_owned(),
        })
    }
}

/// Whether `name` is a Veo operation name (`projects/…/models/…/operations/…`).
fn is_operation_name(name: &str) -> bool {
    match_name(name, OPERATION_NAME).is_some()
}

/// The `fetchPredictOperation` path of operation `name`: its model resource, escaped segment
/// by segment, as the SDK derives it.
fn fetch_path(name: &str) -> Option<String> {
    let parts = match_name(name, OPERATION_NAME)?;
    Some(format!(
        "/v1/projects/{}/locations/{}/publishers/{}/models/{}:fetchPredictOperation",
        path_segment(parts[0]),
        path_segment(parts[1]),
        path_segment(parts[2]),
        path_segment(parts[3])
    ))
}

/// Parses a Veo operation (the body of `fetchPredictOperation`) of provider `provider` (the
/// configuration name, for the inline-bytes message).
///
/// # Errors
/// [`ProviderError::Permanent`] when the body is not an operation; transient (and logged) when
/// it is done with neither `error` nor `response`.
pub fn parse_operation(body: &[u8], provider: &str) -> Result<ProviderStatus, ProviderError> {
    let operation = LongRunningOperation::parse("vertex_veo operation", body)?;
    match operation.stage("vertex_veo")? {
        Stage::Running => Ok(google_operation::running()),
        Stage::Failed(error) => Ok(google_operation::failed(error)),
        Stage::Finished(response) => {
            let videos = response
                .get("videos")
                .and_then(serde_json::Value::as_array)
                .map(|videos| videos.iter().map(generated_video).collect())
                .unwrap_or_default();
            Ok(VideoResult::with_filters(videos, response).into_status(&format!(
                "Veo returned the video inline; set providers.{provider}.storage_uri so it writes to Cloud Storage"
            )))
        }
    }
}

/// One entry of `response.videos`: `gcsUri` or `bytesBase64Encoded`, with `mimeType`.
fn generated_video(video: &serde_json::Value) -> GeneratedVideo {
    if let Some(uri) = video
        .get("gcsUri")
        .and_then(serde_json::Value::as_str)
        .filter(|uri| !uri.is_empty())
    {
        GeneratedVideo::Uri(uri.to_owned())
    } else if video
        .get("bytesBase64Encoded")
        .and_then(serde_json::Value::as_str)
        .is_some_and(|bytes| !bytes.is_empty())
    {
        GeneratedVideo::Inline
    } else {
        GeneratedVideo::Empty
    }
}

#[async_trait::async_trait]
impl VideoProvider for VertexVeoProvider {
    fn name(&self) -> &str {
        self.transport.name()
    }

    async fn submit(&self, request: &SubmitRequest) -> Result<ProviderTask, ProviderError> {
        let mut parameters = veo_parameters(request).map_err(|e| e.context(self.name()))?;
        parameters.insert("storageUri".to_owned(), self.storage_uri.clone().into());
        let body = serde_json::json!({
            "instances": [{ "prompt": request.prompt }],
            "parameters": parameters,
        });
        let path = format!(
            "/v1/projects/{}/locations/{}/publishers/google/models/{}:predictLongRunning",
            path_segment(&self.project),
            path_segment(&self.location),
            path_segment(&request.model)
        );
        let created = self
            .transport
            .submit_with(&path, &body, request.traceparent.as_deref(), |body| {
                created_operation("vertex_veo operation", body, is_operation_name)
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
        let Some(path) = fetch_path(&task.id) else {
            return Err(ProviderError::permanent(format!(
                "{}: \"{}\" is not a Veo operation name ({OPERATION_NAME})",
                self.name(),
                truncate(&task.id, 200)
            )));
        };
        let body = serde_json::json!({ "operationName": task.id });
        let request = Request::new(Operation::Status, Method::POST, &path)
            .json(&body)
            .traceparent(traceparent);
        let provider = self.name();
        self.transport
            .send_parsed(request, |body| parse_operation(body, provider))
            .await
    }

    async fn cancel(&self, _task: &ProviderTask) -> Result<CancelOutcome, ProviderError> {
        Ok(CancelOutcome::Unsupported)
    }
}

// ---------------------------------------------------------------------------------------------
// Access tokens.

/// `providers.<name>.access_token`, sent as `Bearer <token>`; never refreshed (a token from
/// `gcloud auth print-access-token` lasts an hour).
struct StaticToken(HeaderValue);

impl StaticToken {
    fn new(name: &str, token: &str) -> Result<Self, ProviderConfigError> {
        let mut value = HeaderValue::try_from(format!("Bearer {token}")).map_err(|_| {
            ProviderSettings::invalid(
                name,
                "access_token",
                "contains characters not allowed in an HTTP header",
            )
        })?;
        value.set_sensitive(true);
        Ok(Self(value))
    }
}

impl fmt::Debug for StaticToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("StaticToken([REDACTED])")
    }
}

#[async_trait::async_trait]
impl TokenSource for StaticToken {
    async fn authorization(&self) -> Result<HeaderValue, ProviderError> {
        Ok(self.0.clone())
    }
}

/// Access tokens from a service-account key: a signed JWT exchanged at the key's `token_uri`,
/// cached until [`TOKEN_REFRESH_MARGIN`] before it expires.
struct ServiceAccountTokens {
    provider: String,
    client_email: String,
    key_id: Option<String>,
    token_uri: String,
    key: EncodingKey,
    client: reqwest::Client,
    /// Held across a refresh, so that one refresh runs at a time and the others wait for it.
    state: tokio::sync::Mutex<TokenState>,
}

#[derive(Default)]
struct TokenState {
    cached: Option<CachedToken>,
    /// The last refresh's failure: callers that were waiting for that refresh share it rather
    /// than each trying again in turn (which would hold the last one for many timeouts).
    failure: Option<RefreshFailure>,
}

struct CachedToken {
    value: HeaderValue,
    refresh_at: Instant,
}

struct RefreshFailure {
    at: Instant,
    message: String,
    transient: bool,
}

impl RefreshFailure {
    fn error(&self) -> ProviderError {
        if self.transient {
            ProviderError::Transient {
                message: self.message.clone(),
                retry_after: None,
                unanswered: false,
            }
        } else {
            ProviderError::permanent(self.message.clone())
        }
    }
}

impl fmt::Debug for ServiceAccountTokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceAccountTokens")
            .field("client_email", &self.client_email)
            .field("token_uri", &self.token_uri)
            .finish_non_exhaustive()
    }
}

/// The JWT claims of the token request.
#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    scope: &'a str,
    aud: &'a str,
    iat: i64,
    exp: i64,
}

impl ServiceAccountTokens {
    /// Reads and checks the key file at `path` (a service-account JSON key).
    fn from_key_file(
        name: &str,
        path: &str,
        timeout: Duration,
    ) -> Result<Self, ProviderConfigError> {
        let invalid = |reason: String| {
            ProviderSettings::invalid(
                name,
                "service_account_key_file",
                format!("\"{path}\": {reason}"),
            )
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| invalid(format!("cannot read the key file: {e}")))?;
        // Read as a value and pick fields by hand: typed deserialisation errors could quote
        // values, and this file holds a private key.
        let value: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| invalid(format!("not a JSON key file: {e}")))?;
        let field = |key: &str| {
            value
                .get(key)
                .and_then(serde_json::Value::as_str)
                .map(str::trim)
                .filter(|v| !v.is_empty())
        };
        if let Some(kind) = field("type") {
            if kind != "service_account" {
                return Err(invalid(format!(
                    "a \"{}\" credential, not a service-account key",
                    truncate(kind, 40)
                )));
            }
        }
        let client_email = field("client_email")
            .ok_or_else(|| invalid("no client_email in the key file".to_owned()))?;
        let private_key = field("private_key")
            .ok_or_else(|| invalid("no private_key in the key file".to_owned()))?;
        let key = EncodingKey::from_rsa_pem(private_key.as_bytes()).map_err(|e| {
            invalid(format!(
                "private_key is not an RSA private key in PEM form ({e})"
            ))
        })?;
        // Parsing the PEM does not parse the key itself: sign once, here rather than at the
        // first request.
        jsonwebtoken::encode(&Header::new(Algorithm::RS256), &serde_json::json!({}), &key)
            .map_err(|e| invalid(format!("private_key cannot sign an RS256 JWT ({e})")))?;
        let token_uri = field("token_uri").unwrap_or(DEFAULT_TOKEN_URI);
        match url::Url::parse(token_uri) {
            Ok(url) if matches!(url.scheme(), "http" | "https") && url.host_str().is_some() => {}
            _ => {
                return Err(invalid(format!(
                    "token_uri \"{}\" is not an http(s) URL",
                    truncate(token_uri, 200)
                )))
            }
        }
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
            provider: name.to_owned(),
            client_email: client_email.to_owned(),
            key_id: field("private_key_id").map(str::to_owned),
            token_uri: token_uri.to_owned(),
            key,
            client,
            state: tokio::sync::Mutex::default(),
        })
    }

    /// Signs a JWT and exchanges it for an access token.
    async fn fetch(&self) -> Result<CachedToken, ProviderError> {
        // Counted from before the request, so the cache never outlives the token.
        let requested_at = Instant::now();
        let iat = chrono::Utc::now().timestamp();
        let mut header = Header::new(Algorithm::RS256);
        header.kid.clone_from(&self.key_id);
        let claims = Claims {
            iss: &self.client_email,
            scope: CLOUD_PLATFORM_SCOPE,
            aud: &self.token_uri,
            iat,
            exp: iat + ASSERTION_LIFETIME_SECS,
        };
        let what = format!("{}: token request to {}", self.provider, self.token_uri);
        let assertion = jsonwebtoken::encode(&header, &claims, &self.key)
            .map_err(|e| ProviderError::permanent(format!("{what}: cannot sign the JWT: {e}")))?;
        let transient = |message: String| ProviderError::Transient {
            message,
            retry_after: None,
            // The provider request this token was for has not been sent.
            unanswered: false,
        };
        let response = self
            .client
            .post(&self.token_uri)
            .form(&[("grant_type", JWT_BEARER_GRANT), ("assertion", &assertion)])
            .send()
            .await
            .map_err(|e| transient(format!("{what}: {}", error_chain(&e))))?;
        let status = response.status();
        let body = response
            .bytes()
            .await
            .map_err(|e| transient(format!("{what}: {}", error_chain(&e))))?;
        if !status.is_success() {
            let message = format!("{what}: HTTP {status}: {}", oauth_error(&body));
            return Err(
                if status == StatusCode::TOO_MANY_REQUESTS
                    || status == StatusCode::REQUEST_TIMEOUT
                    || status.is_server_error()
                {
                    transient(message)
                } else {
                    ProviderError::Permanent { message }
                },
            );
        }
        // Picked by hand, never echoing the body: it holds the token.
        let answer: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|_| ProviderError::permanent(format!("{what}: the answer is not JSON")))?;
        let token = answer
            .get("access_token")
            .and_then(serde_json::Value::as_str)
            .filter(|token| !token.is_empty())
            .ok_or_else(|| {
                ProviderError::permanent(format!("{what}: the answer has no access_token"))
            })?;
        let lifetime = match answer.get("expires_in") {
            Some(serde_json::Value::Number(n)) => n.as_u64(),
            Some(serde_json::Value::String(s)) => s.trim().parse().ok(),
            _ => None,
        }
        // Google's tokens last an hour; an answer without expires_in is taken as one.
        .map_or(Duration::from_secs(3600), Duration::from_secs);
        let mut value = HeaderValue::try_from(format!("Bearer {token}")).map_err(|_| {
            ProviderError::permanent(format!(
                "{what}: the access token has characters an HTTP header cannot hold"
            ))
        })?;
        value.set_sensitive(true);
        let margin = TOKEN_REFRESH_MARGIN.min(lifetime / 2);
        tracing::debug!(provider = %self.provider, lifetime_s = lifetime.as_secs(), "obtained an access token");
        Ok(CachedToken {
            value,
            refresh_at: requested_at + lifetime.saturating_sub(margin),
        })
    }
}

#[async_trait::async_trait]
impl TokenSource for ServiceAccountTokens {
    async fn authorization(&self) -> Result<HeaderValue, ProviderError> {
        let arrived = Instant::now();
        let mut state = self.state.lock().await;
        if let Some(token) = state.cached.as_ref() {
            if Instant::now() < token.refresh_at {
                return Ok(token.value.clone());
            }
        }
        if let Some(failure) = state.failure.as_ref() {
            if failure.at >= arrived {
                return Err(failure.error());
            }
        }
        match self.fetch().await {
            Ok(fresh) => {
                let value = fresh.value.clone();
                state.cached = Some(fresh);
                state.failure = None;
                Ok(value)
            }
            Err(error) => {
                state.failure = Some(RefreshFailure {
                    at: Instant::now(),
                    message: error.message().to_owned(),
                    transient: error.is_transient(),
                });
                Err(error)
            }
        }
    }
}

/// An OAuth2 error body (`{"error":"invalid_grant","error_description":"…"}`), or the start
/// of whatever came.
fn oauth_error(body: &[u8]) -> String {
    if let Ok(value) = serde_json::from_slice::<serde_json::Value>(body) {
        let error = value.get("error").and_then(serde_json::Value::as_str);
        let description = value
            .get("error_description")
            .and_then(serde_json::Value::as_str);
        match (error, description) {
            (Some(error), Some(description)) => {
                return truncate(&format!("{error}: {description}"), 300)
            }
            (Some(error), None) => return truncate(error, 300),
            _ => {}
        }
    }
    if body.is_empty() {
        "(empty body)".to_owned()
    } else {
        truncate(&String::from_utf8_lossy(body), 200)
    }
}

/// A reqwest error with its causes ("connection refused" is in the chain, not the top).
fn error_chain(error: &reqwest::Error) -> String {
    let mut message = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::{ProviderKind, ProviderState};

    fn settings() -> ProviderSettings {
        ProviderSettings {
            project: Some("my-project".to_owned()),
            location: Some("us-central1".to_owned()),
            access_token: Some("ya29.token".into()),
            storage_uri: Some("gs://bucket/veo/".to_owned()),
            ..ProviderSettings::new(
                ProviderKind::VertexVeo,
                "https://us-central1-aiplatform.googleapis.com",
            )
        }
    }

    #[test]
    fn the_fetch_path_is_the_model_of_the_operation_name() {
        let name = "projects/123/locations/us-central1/publishers/google/models/veo-3.1-generate-001/operations/a1b07c8e-7b5a-4aba-bb34-3e1ccb8afcc8";
        assert_eq!(
            fetch_path(name).as_deref(),
            Some("/v1/projects/123/locations/us-central1/publishers/google/models/veo-3.1-generate-001:fetchPredictOperation")
        );
        assert_eq!(fetch_path("operations/123"), None);
        assert_eq!(
            fetch_path("projects/p/locations/l/publishers/google/models/m/operations/o/../x"),
            None
        );
    }

    #[test]
    fn a_done_operation_without_a_result_is_transient() {
        let error = parse_operation(br#"{"name":"projects/p/x","done":true}"#, "veo")
            .expect_err("neither error nor response");
        assert!(error.is_transient(), "{error}");
        assert!(
            error.to_string().contains("done without error or response"),
            "{error}"
        );
    }

    #[test]
    fn a_running_operation_may_omit_done() {
        let status = parse_operation(br#"{"name":"projects/p/x"}"#, "veo").expect("running");
        assert_eq!(status.state, ProviderState::InProgress);
        assert_eq!(status.progress, None);
    }

    #[test]
    fn debug_output_shows_no_token() {
        let provider = VertexVeoProvider::new("veo", &settings()).expect("valid");
        let text = format!("{provider:?}");
        assert!(!text.contains("ya29"), "{text}");
    }

    #[test]
    fn exactly_one_credential_is_required() {
        let both = ProviderSettings {
            service_account_key_file: Some("/nonexistent.json".to_owned()),
            ..settings()
        };
        let neither = ProviderSettings {
            access_token: None,
            ..settings()
        };
        for settings in [both, neither] {
            let error = VertexVeoProvider::new("veo", &settings).expect_err("one credential");
            let text = error.to_string();
            assert!(
                text.contains("providers.veo.access_token")
                    && text.contains("providers.veo.service_account_key_file"),
                "{text}"
            );
        }
    }
}
