//! A simulated video provider: an HTTP server speaking both the OpenAI-compatible Videos API and
//! Replicate's predictions API on one address.
//!
//! It is a test double of an external system, used by the tests, the demo and the benchmarks, so
//! it keeps its jobs in memory and never renders anything: a job's state is computed from the
//! time elapsed since it was submitted, on every read. That keeps status calls cheap (one shard
//! lock, one small JSON body), which matters because benchmarks poll thousands of jobs a second
//! on a small machine.
//!
//! # Behaviour
//! - A job is queued (`queued` / `starting`) for the first 10% of its duration, then running
//!   (`in_progress` / `processing`) with progress growing linearly, then `completed` /
//!   `succeeded`, or `failed` with the error `simulated failure`. Replicate-style responses carry
//!   tqdm-like `logs` so the adapter's log parsing is exercised.
//! - Duration: [`SimSettings::duration_ms`] plus a random `0..=duration_jitter_ms`.
//! - The prompt steers a job: `[fail]` fails it, `[slow]` multiplies its duration by ten,
//!   `[duration=NNN]` sets it to NNN ms, `[reject]` makes submit answer 400, `[unavailable]` makes
//!   submit answer 503 every time, `[flaky]` makes the first two submits of that exact prompt
//!   answer 503.
//! - Every protocol request needs `Authorization: Bearer <non-empty>` (the exact key when
//!   [`SimSettings::api_key`] is set), else 401.
//! - Faults ([`SimFaults`]), changeable at run time through [`SimHandle::set_faults`] or
//!   `POST /sim/faults`: added latency, 500s, 429s with `Retry-After: 1`, and hangs of 60 s.
//! - Counters: `GET /sim/stats` or [`SimHandle::stats`].
//!
//! # Endpoints
//! `POST /v1/videos`, `GET|DELETE /v1/videos/{id}`, `GET /v1/videos/{id}/content`;
//! `POST /v1/predictions`, `POST /v1/models/{owner}/{name}/predictions`,
//! `GET /v1/predictions/{id}`, `POST /v1/predictions/{id}/cancel`; `GET /sim/files/{id}.mp4`
//! (Replicate-style output, no auth); `GET /sim/stats`, `GET|POST /sim/faults`.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::hash::{BuildHasher, RandomState};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE, HOST, RETRY_AFTER};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use chrono::{DateTime, SecondsFormat, TimeDelta, Utc};
use rand::Rng;
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How the simulated provider behaves (fixed for the server's life; see [`SimFaults`] for what
/// can change at run time).
#[derive(Debug, Clone)]
pub struct SimSettings {
    /// Base duration of a job.
    pub duration_ms: u64,
    /// A random `0..=duration_jitter_ms` is added to each job's duration.
    pub duration_jitter_ms: u64,
    /// Share of jobs (0.0–1.0) that end in failure without being asked to.
    pub failure_rate: f64,
    /// Initial [`SimFaults::latency_ms`].
    pub latency_ms: u64,
    /// Initial [`SimFaults::rate_limit_rate`].
    pub rate_limit_rate: f64,
    /// When set, the exact bearer token required; otherwise any non-empty one is accepted.
    pub api_key: Option<String>,
}

impl Default for SimSettings {
    fn default() -> Self {
        Self {
            duration_ms: 3000,
            duration_jitter_ms: 0,
            failure_rate: 0.0,
            latency_ms: 0,
            rate_limit_rate: 0.0,
            api_key: None,
        }
    }
}

/// Faults injected into every protocol request (not into `/sim/*`), changeable at run time.
/// Rates are probabilities per request, 0.0–1.0.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct SimFaults {
    /// Answer 500.
    pub error_rate: f64,
    /// Answer 429 with `Retry-After: 1`.
    pub rate_limit_rate: f64,
    /// Delay added before answering.
    pub latency_ms: u64,
    /// Sleep 60 s before answering (503), to trigger client timeouts.
    pub hang_rate: f64,
}

impl SimFaults {
    fn validate(&self) -> Result<(), String> {
        for (name, rate) in [
            ("errorRate", self.error_rate),
            ("rateLimitRate", self.rate_limit_rate),
            ("hangRate", self.hang_rate),
        ] {
            if !(0.0..=1.0).contains(&rate) {
                return Err(format!("{name} must be between 0.0 and 1.0, got {rate}"));
            }
        }
        Ok(())
    }
}

/// Counters, for tests and benchmarks.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SimStats {
    /// Jobs currently held (an OpenAI-style delete removes one).
    pub jobs: u64,
    /// Submit requests received, including refused ones.
    pub submits: u64,
    /// Status requests received, including refused ones.
    pub status_calls: u64,
    /// Status requests received per existing job.
    pub status_calls_by_job: HashMap<String, u64>,
}

/// Entry point of the simulated provider.
#[derive(Debug)]
pub struct SimProvider;

impl SimProvider {
    /// Binds `listen` (use `127.0.0.1:0` in tests) and serves until [`SimHandle::shutdown`] (or
    /// until the handle is dropped). The server task is owned by the handle.
    ///
    /// # Errors
    /// The bind error.
    pub async fn start(listen: SocketAddr, settings: SimSettings) -> std::io::Result<SimHandle> {
        let listener = tokio::net::TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let token = CancellationToken::new();
        let state = Arc::new(SimState::new(settings, addr, token.clone()));
        let app = router(Arc::clone(&state));
        let stop = token.clone();
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await
        });
        Ok(SimHandle {
            addr,
            state,
            token,
            task: Some(task),
        })
    }
}

/// A running simulated provider. Dropping it stops the server abruptly; prefer
/// [`SimHandle::shutdown`].
pub struct SimHandle {
    addr: SocketAddr,
    state: Arc<SimState>,
    token: CancellationToken,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

impl fmt::Debug for SimHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimHandle")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl SimHandle {
    /// The bound address.
    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`, the base URL to configure a provider with.
    #[must_use]
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A snapshot of the counters.
    #[must_use]
    pub fn stats(&self) -> SimStats {
        self.state.stats()
    }

    /// Replaces the current faults. Rates outside 0.0–1.0 are clamped.
    pub fn set_faults(&self, faults: SimFaults) {
        let clamp = |rate: f64| {
            if rate.is_nan() {
                0.0
            } else {
                rate.clamp(0.0, 1.0)
            }
        };
        let faults = SimFaults {
            error_rate: clamp(faults.error_rate),
            rate_limit_rate: clamp(faults.rate_limit_rate),
            latency_ms: faults.latency_ms,
            hang_rate: clamp(faults.hang_rate),
        };
        *lock(&self.state.faults) = faults;
    }

    /// The current faults.
    #[must_use]
    pub fn faults(&self) -> SimFaults {
        lock(&self.state.faults).clone()
    }

    /// Stops accepting, ends in-flight requests (hangs and latency are cut short) and waits for
    /// the server task to finish.
    pub async fn shutdown(mut self) {
        self.token.cancel();
        if let Some(task) = self.task.take() {
            log_server_end(task.await);
        }
    }
}

impl Drop for SimHandle {
    fn drop(&mut self) {
        // No task outlives its owner: without this a dropped handle would leave a server running.
        self.token.cancel();
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

fn log_server_end(result: Result<std::io::Result<()>, tokio::task::JoinError>) {
    match result {
        Ok(Ok(())) => tracing::debug!("simulated provider stopped"),
        Ok(Err(error)) => tracing::error!(%error, "simulated provider server failed"),
        Err(error) if error.is_cancelled() => {}
        Err(error) => tracing::error!(%error, "simulated provider server task panicked"),
    }
}

/// Serves the simulated provider on `listen` until `shutdown` resolves (the
/// `video-orchestrator sim-provider` command).
///
/// # Errors
/// The bind error, or the server's error if it stops on its own.
pub async fn run(
    listen: SocketAddr,
    settings: SimSettings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let mut handle = SimProvider::start(listen, settings).await?;
    tracing::info!(addr = %handle.addr(), "simulated provider listening");
    let Some(mut task) = handle.task.take() else {
        return Ok(());
    };
    tokio::select! {
        () = shutdown => {
            handle.token.cancel();
            log_server_end((&mut task).await);
            Ok(())
        }
        result = &mut task => match result {
            Ok(outcome) => outcome,
            Err(error) => Err(std::io::Error::other(error)),
        },
    }
}

// ---------------------------------------------------------------------------------------------
// State

/// Why sharded `std::sync::Mutex`es: critical sections are a hash lookup and a small
/// serialisation, never an await, so a blocking lock is cheaper than an async one, and 16 shards
/// keep two cores from queueing on one lock.
const SHARDS: usize = 16;

/// The share of a job's duration spent queued.
const QUEUED_FRACTION: u32 = 10;

struct SimState {
    settings: SimSettings,
    addr: SocketAddr,
    faults: Mutex<SimFaults>,
    shards: Box<[Mutex<HashMap<String, Job>>]>,
    hasher: RandomState,
    submits: AtomicU64,
    status_calls: AtomicU64,
    /// Submit attempts per `[flaky]` prompt.
    flaky_attempts: Mutex<HashMap<String, u32>>,
    /// Cancelled on shutdown, so sleeping requests (latency, hangs) end promptly.
    token: CancellationToken,
}

/// Locks, ignoring poisoning: the data is counters and job records that stay consistent even if a
/// holder panicked, and a test double should keep answering.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Queued,
    Running,
    Succeeded,
    Failed,
    Canceled,
}

impl Phase {
    fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Canceled)
    }
}

struct Job {
    model: String,
    /// Replicate `version` as submitted (None for `model`-style and OpenAI-style submits).
    version: Option<String>,
    prompt: String,
    /// Requested clip length.
    clip_seconds: Option<u32>,
    size: Option<String>,
    created_at: DateTime<Utc>,
    created: Instant,
    duration: Duration,
    fail: bool,
    /// Time since creation at which it was cancelled.
    cancelled_after: Option<Duration>,
    status_calls: u64,
}

/// A job as seen at one instant.
struct View {
    phase: Phase,
    progress: u8,
    started_at: Option<DateTime<Utc>>,
    completed_at: Option<DateTime<Utc>>,
    /// Seconds spent running (queued time excluded), for Replicate's `metrics`.
    predict_time: f64,
    total_time: f64,
}

impl Job {
    fn view(&self, now: Instant) -> View {
        let elapsed = now.saturating_duration_since(self.created);
        let queued_for = self.duration / QUEUED_FRACTION;
        let at = |offset: Duration| {
            self.created_at + TimeDelta::from_std(offset).unwrap_or(TimeDelta::zero())
        };
        let percent = |t: Duration| -> u8 {
            if self.duration.is_zero() {
                return 100;
            }
            let ratio = (t.as_secs_f64() / self.duration.as_secs_f64()).clamp(0.0, 1.0);
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            // 0..=100 after the clamp.
            let p = (ratio * 100.0).floor() as u8;
            p
        };
        let (phase, progress, end) = if let Some(cancelled) = self.cancelled_after {
            (Phase::Canceled, percent(cancelled).min(99), Some(cancelled))
        } else if elapsed >= self.duration {
            if self.fail {
                (Phase::Failed, 99, Some(self.duration))
            } else {
                (Phase::Succeeded, 100, Some(self.duration))
            }
        } else if elapsed < queued_for {
            (Phase::Queued, 0, None)
        } else {
            (Phase::Running, percent(elapsed).min(99), None)
        };
        let reached = end.unwrap_or(elapsed);
        View {
            phase,
            progress,
            started_at: (reached >= queued_for).then(|| at(queued_for)),
            completed_at: end.map(at),
            predict_time: reached.saturating_sub(queued_for).as_secs_f64(),
            total_time: reached.as_secs_f64(),
        }
    }
}

impl SimState {
    fn new(settings: SimSettings, addr: SocketAddr, token: CancellationToken) -> Self {
        let faults = SimFaults {
            error_rate: 0.0,
            rate_limit_rate: settings.rate_limit_rate.clamp(0.0, 1.0),
            latency_ms: settings.latency_ms,
            hang_rate: 0.0,
        };
        Self {
            settings,
            addr,
            faults: Mutex::new(faults),
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
            submits: AtomicU64::new(0),
            status_calls: AtomicU64::new(0),
            flaky_attempts: Mutex::new(HashMap::new()),
            token,
        }
    }

    fn shard(&self, id: &str) -> &Mutex<HashMap<String, Job>> {
        #[allow(clippy::cast_possible_truncation)]
        // Only the low bits pick a shard.
        let index = (self.hasher.hash_one(id) as usize) % SHARDS;
        &self.shards[index]
    }

    fn stats(&self) -> SimStats {
        let mut by_job = HashMap::new();
        for shard in &*self.shards {
            for (id, job) in lock(shard).iter() {
                by_job.insert(id.clone(), job.status_calls);
            }
        }
        SimStats {
            jobs: by_job.len() as u64,
            submits: self.submits.load(Ordering::Relaxed),
            status_calls: self.status_calls.load(Ordering::Relaxed),
            status_calls_by_job: by_job,
        }
    }

    /// Counts a status request, overall and for the job when it exists.
    fn count_status_call(&self, id: &str) {
        self.status_calls.fetch_add(1, Ordering::Relaxed);
        if let Some(job) = lock(self.shard(id)).get_mut(id) {
            job.status_calls += 1;
        }
    }

    /// Creates a job from an accepted submit (refusals are decided before, by
    /// [`SimState::submit_refusal`]), applying the prompt's duration and failure overrides.
    fn create_job(
        &self,
        id: String,
        model: String,
        version: Option<String>,
        prompt: String,
        clip_seconds: Option<u32>,
        size: Option<String>,
    ) -> String {
        let mut rng = rand::rng();
        let base = match duration_override(&prompt) {
            Some(ms) => ms,
            None => {
                let jitter = if self.settings.duration_jitter_ms > 0 {
                    rng.random_range(0..=self.settings.duration_jitter_ms)
                } else {
                    0
                };
                self.settings.duration_ms.saturating_add(jitter)
            }
        };
        let duration_ms = if prompt.contains("[slow]") {
            base.saturating_mul(10)
        } else {
            base
        };
        let fail = prompt.contains("[fail]") || roll(self.settings.failure_rate);
        let job = Job {
            model,
            version,
            prompt,
            clip_seconds,
            size,
            created_at: Utc::now(),
            created: Instant::now(),
            duration: Duration::from_millis(duration_ms),
            fail,
            cancelled_after: None,
            status_calls: 0,
        };
        lock(self.shard(&id)).insert(id.clone(), job);
        id
    }

    /// What a submit with this prompt must answer instead of creating a job, if anything.
    fn submit_refusal(&self, prompt: &str) -> Option<(StatusCode, &'static str)> {
        if prompt.contains("[reject]") {
            return Some((
                StatusCode::BAD_REQUEST,
                "simulated rejection: this prompt is refused",
            ));
        }
        if prompt.contains("[unavailable]") {
            return Some((
                StatusCode::SERVICE_UNAVAILABLE,
                "simulated unavailability: try again later",
            ));
        }
        if prompt.contains("[flaky]") {
            let mut attempts = lock(&self.flaky_attempts);
            let count = attempts.entry(prompt.to_owned()).or_insert(0);
            *count += 1;
            if *count <= 2 {
                return Some((
                    StatusCode::SERVICE_UNAVAILABLE,
                    "simulated flakiness: try again",
                ));
            }
        }
        None
    }
}

/// `[duration=NNN]` in a prompt: that job's duration in milliseconds.
fn duration_override(prompt: &str) -> Option<u64> {
    let start = prompt.find("[duration=")? + "[duration=".len();
    let rest = &prompt[start..];
    let end = rest.find(']')?;
    rest[..end].trim().parse().ok()
}

fn roll(rate: f64) -> bool {
    rate > 0.0 && (rate >= 1.0 || rand::rng().random::<f64>() < rate)
}

fn replicate_id() -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz234567";
    let mut rng = rand::rng();
    (0..26)
        .map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// HTTP

type Shared = Arc<SimState>;

fn router(state: Shared) -> Router {
    Router::new()
        .route("/v1/videos", post(openai_create))
        .route("/v1/videos/{id}", get(openai_get).delete(openai_delete))
        .route("/v1/videos/{id}/content", get(openai_content))
        .route("/v1/predictions", post(replicate_create))
        .route(
            "/v1/models/{owner}/{name}/predictions",
            post(replicate_create_for_model),
        )
        .route("/v1/predictions/{id}", get(replicate_get))
        .route("/v1/predictions/{id}/cancel", post(replicate_cancel))
        .route("/sim/files/{file}", get(sim_file))
        .route("/sim/stats", get(sim_stats))
        .route("/sim/faults", get(sim_faults_get).post(sim_faults_set))
        .with_state(state)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    OpenAi,
    Replicate,
}

fn json_response(status: StatusCode, body: Vec<u8>) -> Response {
    (
        status,
        [(CONTENT_TYPE, HeaderValue::from_static("application/json"))],
        body,
    )
        .into_response()
}

fn to_json<T: Serialize>(status: StatusCode, value: &T) -> Response {
    match serde_json::to_vec(value) {
        Ok(body) => json_response(status, body),
        Err(error) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot serialise response: {error}"),
        )
            .into_response(),
    }
}

/// An error in each protocol's own shape: OpenAI's `{"error": {...}}`, Replicate's problem
/// details `{"title", "detail", "status"}`.
fn error_response(protocol: Protocol, status: StatusCode, message: &str) -> Response {
    let body = match protocol {
        Protocol::OpenAi => serde_json::json!({
            "error": {
                "message": message,
                "type": if status.is_client_error() { "invalid_request_error" } else { "server_error" },
                "param": null,
                "code": null,
            }
        }),
        Protocol::Replicate => serde_json::json!({
            "title": status.canonical_reason().unwrap_or("Error"),
            "detail": message,
            "status": status.as_u16(),
        }),
    };
    to_json(status, &body)
}

/// Authentication and injected faults, common to every protocol request. `Some` is the response
/// to send instead of serving the request.
async fn guard(state: &SimState, headers: &HeaderMap, protocol: Protocol) -> Option<Response> {
    let token = headers
        .get(AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|token| !token.is_empty());
    let authorised = match (token, &state.settings.api_key) {
        (None, _) => false,
        (Some(_), None) => true,
        (Some(token), Some(expected)) => token == expected,
    };
    if !authorised {
        return Some(error_response(
            protocol,
            StatusCode::UNAUTHORIZED,
            "missing or invalid bearer token",
        ));
    }
    let faults = lock(&state.faults).clone();
    if faults.latency_ms > 0 {
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(faults.latency_ms)) => {}
            () = state.token.cancelled() => {
                return Some(error_response(protocol, StatusCode::SERVICE_UNAVAILABLE, "shutting down"));
            }
        }
    }
    if roll(faults.hang_rate) {
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(60)) => {}
            () = state.token.cancelled() => {}
        }
        return Some(error_response(
            protocol,
            StatusCode::SERVICE_UNAVAILABLE,
            "simulated hang",
        ));
    }
    if roll(faults.error_rate) {
        return Some(error_response(
            protocol,
            StatusCode::INTERNAL_SERVER_ERROR,
            "simulated server error",
        ));
    }
    if roll(faults.rate_limit_rate) {
        let mut response = error_response(
            protocol,
            StatusCode::TOO_MANY_REQUESTS,
            "simulated rate limit: retry after 1 second",
        );
        response
            .headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from_static("1"));
        return Some(response);
    }
    None
}

/// `http://host` as the client addressed us, for URLs in responses.
fn public_base(state: &SimState, headers: &HeaderMap) -> String {
    match headers.get(HOST).and_then(|host| host.to_str().ok()) {
        Some(host) => format!("http://{host}"),
        None => format!("http://{}", state.addr),
    }
}

/// The request body as a JSON object, or why not.
fn parse_body(body: &[u8]) -> Result<serde_json::Value, String> {
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(value) if value.is_object() => Ok(value),
        Ok(_) => Err("the request body must be a JSON object".to_owned()),
        Err(error) => Err(format!("the request body is not valid JSON: {error}")),
    }
}

/// A whole number of seconds given as a string (`"4"`, the OpenAI form) or a number.
fn seconds_field(value: Option<&serde_json::Value>) -> Option<u32> {
    match value? {
        serde_json::Value::String(s) => s.trim().parse().ok(),
        serde_json::Value::Number(n) => n.as_u64().and_then(|n| u32::try_from(n).ok()),
        _ => None,
    }
}

const FAILURE_MESSAGE: &str = "simulated failure";

// OpenAI-compatible Videos API -----------------------------------------------------------------

#[derive(Serialize)]
struct VideoBody<'a> {
    id: &'a str,
    object: &'static str,
    model: &'a str,
    status: &'static str,
    progress: u8,
    created_at: i64,
    completed_at: Option<i64>,
    expires_at: Option<i64>,
    prompt: &'a str,
    size: &'a str,
    seconds: String,
    remixed_from_video_id: Option<&'a str>,
    error: Option<VideoErrorBody>,
}

#[derive(Serialize)]
struct VideoErrorBody {
    code: &'static str,
    message: &'static str,
}

fn render_video(id: &str, job: &Job, now: Instant) -> Vec<u8> {
    let view = job.view(now);
    let (status, error) = match view.phase {
        Phase::Queued => ("queued", None),
        Phase::Running => ("in_progress", None),
        Phase::Succeeded => ("completed", None),
        Phase::Failed => (
            "failed",
            Some(VideoErrorBody {
                code: "simulated_failure",
                message: FAILURE_MESSAGE,
            }),
        ),
        // Only reachable for a job cancelled through the Replicate endpoint.
        Phase::Canceled => (
            "failed",
            Some(VideoErrorBody {
                code: "canceled",
                message: "canceled",
            }),
        ),
    };
    let completed_at = view.completed_at.map(|at| at.timestamp());
    let body = VideoBody {
        id,
        object: "video",
        model: &job.model,
        status,
        progress: view.progress,
        created_at: job.created_at.timestamp(),
        completed_at,
        expires_at: (view.phase == Phase::Succeeded)
            .then(|| completed_at.map(|at| at + 3600))
            .flatten(),
        prompt: &job.prompt,
        size: job.size.as_deref().unwrap_or("720x1280"),
        seconds: job.clip_seconds.unwrap_or(4).to_string(),
        remixed_from_video_id: None,
        error,
    };
    serde_json::to_vec(&body).unwrap_or_default()
}

async fn openai_create(State(state): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    state.submits.fetch_add(1, Ordering::Relaxed);
    if let Some(response) = guard(&state, &headers, Protocol::OpenAi).await {
        return response;
    }
    let request = match parse_body(&body) {
        Ok(request) => request,
        Err(reason) => return error_response(Protocol::OpenAi, StatusCode::BAD_REQUEST, &reason),
    };
    let Some(prompt) = request.get("prompt").and_then(|p| p.as_str()) else {
        return error_response(
            Protocol::OpenAi,
            StatusCode::BAD_REQUEST,
            "missing required parameter: prompt",
        );
    };
    if let Some((status, message)) = state.submit_refusal(prompt) {
        return error_response(Protocol::OpenAi, status, message);
    }
    let model = request
        .get("model")
        .and_then(|m| m.as_str())
        .unwrap_or("sora-2")
        .to_owned();
    let size = request
        .get("size")
        .and_then(|s| s.as_str())
        .map(str::to_owned);
    let clip_seconds = seconds_field(request.get("seconds"));
    let id = format!("video_{}", uuid::Uuid::new_v4().simple());
    let id = state.create_job(id, model, None, prompt.to_owned(), clip_seconds, size);
    let now = Instant::now();
    let shard = lock(state.shard(&id));
    match shard.get(&id) {
        Some(job) => json_response(StatusCode::OK, render_video(&id, job, now)),
        None => error_response(Protocol::OpenAi, StatusCode::NOT_FOUND, "video vanished"),
    }
}

async fn openai_get(
    State(state): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    state.count_status_call(&id);
    if let Some(response) = guard(&state, &headers, Protocol::OpenAi).await {
        return response;
    }
    let now = Instant::now();
    let shard = lock(state.shard(&id));
    match shard.get(&id) {
        Some(job) => json_response(StatusCode::OK, render_video(&id, job, now)),
        None => video_not_found(&id),
    }
}

fn video_not_found(id: &str) -> Response {
    error_response(
        Protocol::OpenAi,
        StatusCode::NOT_FOUND,
        &format!("Video with id '{id}' not found."),
    )
}

async fn openai_delete(
    State(state): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Some(response) = guard(&state, &headers, Protocol::OpenAi).await {
        return response;
    }
    let removed = lock(state.shard(&id)).remove(&id);
    match removed {
        Some(_) => to_json(
            StatusCode::OK,
            &serde_json::json!({ "id": id, "object": "video.deleted", "deleted": true }),
        ),
        None => video_not_found(&id),
    }
}

/// A few bytes standing in for an MP4 file (an `ftyp` box).
const FAKE_MP4: &[u8] = b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom";

fn file_response(state: &SimState, id: &str, protocol: Protocol) -> Response {
    let shard = lock(state.shard(id));
    let Some(job) = shard.get(id) else {
        return error_response(protocol, StatusCode::NOT_FOUND, "no such video");
    };
    if job.view(Instant::now()).phase != Phase::Succeeded {
        return error_response(protocol, StatusCode::CONFLICT, "the video is not ready");
    }
    (
        StatusCode::OK,
        [(CONTENT_TYPE, HeaderValue::from_static("video/mp4"))],
        FAKE_MP4,
    )
        .into_response()
}

async fn openai_content(
    State(state): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Some(response) = guard(&state, &headers, Protocol::OpenAi).await {
        return response;
    }
    file_response(&state, &id, Protocol::OpenAi)
}

async fn sim_file(State(state): State<Shared>, Path(file): Path<String>) -> Response {
    let id = file.strip_suffix(".mp4").unwrap_or(&file);
    file_response(&state, id, Protocol::Replicate)
}

// Replicate predictions API --------------------------------------------------------------------

#[derive(Serialize)]
struct PredictionBody<'a> {
    id: &'a str,
    model: &'a str,
    version: Option<&'a str>,
    input: PredictionInput<'a>,
    logs: String,
    output: Option<String>,
    data_removed: bool,
    error: Option<&'static str>,
    status: &'static str,
    created_at: String,
    started_at: Option<String>,
    completed_at: Option<String>,
    metrics: Option<PredictionMetrics>,
    urls: PredictionUrls,
}

#[derive(Serialize)]
struct PredictionInput<'a> {
    prompt: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    duration: Option<u32>,
}

#[derive(Serialize)]
struct PredictionMetrics {
    predict_time: f64,
    total_time: f64,
}

#[derive(Serialize)]
struct PredictionUrls {
    get: String,
    cancel: String,
    web: String,
}

fn timestamp(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// tqdm-like logs: a line per quarter passed, then the current percentage last, as a model's
/// progress bar would leave them.
fn prediction_logs(view: &View) -> String {
    let bar = |p: u8| {
        let filled = usize::from(p / 10);
        format!(
            "{p:>3}%|{}{}| {p}/100\n",
            "█".repeat(filled),
            " ".repeat(10 - filled)
        )
    };
    let mut logs = String::from("Starting video generation\n");
    if view.phase == Phase::Queued {
        return logs;
    }
    for quarter in [0_u8, 25, 50, 75] {
        if quarter < view.progress {
            logs.push_str(&bar(quarter));
        }
    }
    logs.push_str(&bar(view.progress));
    match view.phase {
        Phase::Succeeded => logs.push_str("Video saved\n"),
        Phase::Failed => {
            logs.push_str("Error: ");
            logs.push_str(FAILURE_MESSAGE);
            logs.push('\n');
        }
        Phase::Canceled => logs.push_str("Prediction canceled\n"),
        Phase::Queued | Phase::Running => {}
    }
    logs
}

fn render_prediction(id: &str, job: &Job, now: Instant, base: &str) -> Vec<u8> {
    let view = job.view(now);
    let status = match view.phase {
        Phase::Queued => "starting",
        Phase::Running => "processing",
        Phase::Succeeded => "succeeded",
        Phase::Failed => "failed",
        Phase::Canceled => "canceled",
    };
    let body = PredictionBody {
        id,
        model: job
            .model
            .split_once(':')
            .map_or(job.model.as_str(), |(model, _)| model),
        version: job.version.as_deref(),
        input: PredictionInput {
            prompt: &job.prompt,
            duration: job.clip_seconds,
        },
        logs: prediction_logs(&view),
        output: (view.phase == Phase::Succeeded).then(|| format!("{base}/sim/files/{id}.mp4")),
        data_removed: false,
        error: (view.phase == Phase::Failed).then_some(FAILURE_MESSAGE),
        status,
        created_at: timestamp(job.created_at),
        started_at: view.started_at.map(timestamp),
        completed_at: view.completed_at.map(timestamp),
        metrics: view.phase.is_terminal().then_some(PredictionMetrics {
            predict_time: view.predict_time,
            total_time: view.total_time,
        }),
        urls: PredictionUrls {
            get: format!("{base}/v1/predictions/{id}"),
            cancel: format!("{base}/v1/predictions/{id}/cancel"),
            web: format!("{base}/p/{id}"),
        },
    };
    serde_json::to_vec(&body).unwrap_or_default()
}

async fn replicate_create(
    State(state): State<Shared>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    create_prediction(&state, &headers, &body, None).await
}

async fn replicate_create_for_model(
    State(state): State<Shared>,
    Path((owner, name)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    create_prediction(&state, &headers, &body, Some(format!("{owner}/{name}"))).await
}

async fn create_prediction(
    state: &SimState,
    headers: &HeaderMap,
    body: &[u8],
    path_model: Option<String>,
) -> Response {
    state.submits.fetch_add(1, Ordering::Relaxed);
    if let Some(response) = guard(state, headers, Protocol::Replicate).await {
        return response;
    }
    let request = match parse_body(body) {
        Ok(request) => request,
        Err(reason) => {
            return error_response(Protocol::Replicate, StatusCode::BAD_REQUEST, &reason)
        }
    };
    let version = request
        .get("version")
        .and_then(|v| v.as_str())
        .map(str::to_owned);
    let model = path_model
        .or_else(|| {
            request
                .get("model")
                .and_then(|m| m.as_str())
                .map(str::to_owned)
        })
        .or_else(|| version.clone());
    let Some(model) = model else {
        return error_response(
            Protocol::Replicate,
            StatusCode::UNPROCESSABLE_ENTITY,
            "either version or model is required",
        );
    };
    let input = request.get("input");
    let Some(prompt) = input.and_then(|i| i.get("prompt")).and_then(|p| p.as_str()) else {
        return error_response(
            Protocol::Replicate,
            StatusCode::UNPROCESSABLE_ENTITY,
            "input.prompt is required",
        );
    };
    if let Some((status, message)) = state.submit_refusal(prompt) {
        return error_response(Protocol::Replicate, status, message);
    }
    let clip_seconds = seconds_field(input.and_then(|i| i.get("duration")));
    let id = state.create_job(
        replicate_id(),
        model,
        version,
        prompt.to_owned(),
        clip_seconds,
        None,
    );
    let base = public_base(state, headers);
    let now = Instant::now();
    let shard = lock(state.shard(&id));
    match shard.get(&id) {
        Some(job) => json_response(StatusCode::CREATED, render_prediction(&id, job, now, &base)),
        None => prediction_not_found(),
    }
}

fn prediction_not_found() -> Response {
    error_response(Protocol::Replicate, StatusCode::NOT_FOUND, "Not found.")
}

async fn replicate_get(
    State(state): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    state.count_status_call(&id);
    if let Some(response) = guard(&state, &headers, Protocol::Replicate).await {
        return response;
    }
    let base = public_base(&state, &headers);
    let now = Instant::now();
    let shard = lock(state.shard(&id));
    match shard.get(&id) {
        Some(job) => json_response(StatusCode::OK, render_prediction(&id, job, now, &base)),
        None => prediction_not_found(),
    }
}

async fn replicate_cancel(
    State(state): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Some(response) = guard(&state, &headers, Protocol::Replicate).await {
        return response;
    }
    let base = public_base(&state, &headers);
    let now = Instant::now();
    let mut shard = lock(state.shard(&id));
    let Some(job) = shard.get_mut(&id) else {
        return prediction_not_found();
    };
    // Like Replicate: cancelling a finished prediction changes nothing and still answers 200.
    if !job.view(now).phase.is_terminal() {
        job.cancelled_after = Some(now.saturating_duration_since(job.created));
    }
    json_response(StatusCode::OK, render_prediction(&id, job, now, &base))
}

// Control --------------------------------------------------------------------------------------

async fn sim_stats(State(state): State<Shared>) -> Response {
    to_json(StatusCode::OK, &state.stats())
}

async fn sim_faults_get(State(state): State<Shared>) -> Response {
    let faults = lock(&state.faults).clone();
    to_json(StatusCode::OK, &faults)
}

async fn sim_faults_set(State(state): State<Shared>, body: Bytes) -> Response {
    let faults: SimFaults = match serde_json::from_slice(&body) {
        Ok(faults) => faults,
        Err(error) => {
            return to_json(
                StatusCode::BAD_REQUEST,
                &serde_json::json!({ "error": format!("invalid faults: {error}") }),
            )
        }
    };
    if let Err(reason) = faults.validate() {
        return to_json(
            StatusCode::BAD_REQUEST,
            &serde_json::json!({ "error": reason }),
        );
    }
    *lock(&state.faults) = faults.clone();
    to_json(StatusCode::OK, &faults)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(duration_ms: u64, fail: bool) -> Job {
        Job {
            model: "m".to_owned(),
            version: None,
            prompt: "p".to_owned(),
            clip_seconds: None,
            size: None,
            created_at: Utc::now(),
            created: Instant::now(),
            duration: Duration::from_millis(duration_ms),
            fail,
            cancelled_after: None,
            status_calls: 0,
        }
    }

    #[test]
    fn a_job_is_queued_then_runs_linearly_then_ends() {
        let job = job(1000, false);
        let at = |ms| job.view(job.created + Duration::from_millis(ms));
        assert_eq!(at(50).phase, Phase::Queued);
        let running = at(500);
        assert_eq!(running.phase, Phase::Running);
        assert_eq!(running.progress, 50);
        assert!(running.started_at.is_some() && running.completed_at.is_none());
        let done = at(1000);
        assert_eq!(done.phase, Phase::Succeeded);
        assert_eq!(done.progress, 100);
        assert!(done.completed_at.is_some());
    }

    #[test]
    fn a_failing_job_fails_at_the_end() {
        let job = job(100, true);
        assert_eq!(
            job.view(job.created + Duration::from_millis(99)).phase,
            Phase::Running
        );
        assert_eq!(
            job.view(job.created + Duration::from_millis(100)).phase,
            Phase::Failed
        );
    }

    #[test]
    fn duration_override_is_read_from_the_prompt() {
        assert_eq!(duration_override("a cat [duration=250] [fail]"), Some(250));
        assert_eq!(duration_override("a cat [duration=]"), None);
        assert_eq!(duration_override("a cat"), None);
    }

    #[test]
    fn replicate_ids_look_like_replicates() {
        let id = replicate_id();
        assert_eq!(id.len(), 26);
        assert!(id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || (b'2'..=b'7').contains(&b)));
    }

    #[test]
    fn running_logs_end_with_the_current_percentage() {
        let job = job(1000, false);
        let logs = prediction_logs(&job.view(job.created + Duration::from_millis(630)));
        assert_eq!(
            crate::providers::replicate::last_log_percentage(&logs),
            Some(63),
            "{logs}"
        );
    }
}
