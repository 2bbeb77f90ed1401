//! A simulated video provider: an HTTP server speaking every provider protocol on one address
//! (the OpenAI-compatible Videos API and Replicate's at the root, every later kind under
//! `/{kind}`).
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
//! MiniMax: `POST /minimax/v1/video_generation`, `GET /minimax/v1/query/video_generation`, `GET /minimax/v1/files/retrieve`, `GET /minimax/files/{file_id}.mp4` (errors in HTTP 200 `base_resp`).
//! Runway (Bearer + `X-Runway-Version`): `POST /runway/v1/text_to_video`, `GET|DELETE /runway/v1/tasks/{id}`, `GET /runway/files/{id}.mp4`.
//! Seedance: `POST|GET|DELETE /seedance/api/v3/contents/generations/tasks[/{id}]`, `GET /seedance/files/{id}.mp4`.
//! DashScope: `POST /dashscope/api/v1/services/aigc/video-generation/video-synthesis`, `GET /dashscope/api/v1/tasks/{id}`, `POST …/cancel`, `GET /dashscope/files/{id}.mp4`.
//! Kling: `POST /kling/v1/videos/text2video`, `GET /kling/v1/videos/text2video/{task or external id}` (JWT bearer), files at `GET /kling/files/{id}.mp4`.
//! Luma: `POST /luma/generations/video`, `GET|DELETE /luma/generations/{id}`, files at `GET /luma/files/{id}.mp4`.
//! Vertex Veo: `POST /vertex_veo/v1/projects/{p}/locations/{l}/publishers/{pub}/models/{m}:predictLongRunning|:fetchPredictOperation`, `POST /vertex_veo/token` (OAuth2 JWT grant);
//! Gemini API Veo: `POST /gemini/v1beta/models/{m}:predictLongRunning`, `GET /gemini/v1beta/models/{m}/operations/{id}`, `GET /gemini/v1beta/files/{id}:download`.
//! fal (Key auth): `POST /fal/{model_id}`, `GET /fal/{app}/requests/{id}[/status]`, `PUT …/cancel`.
//!
//! # Layout
//! One file per protocol (`openai_videos`, `replicate`, `fal`, …), each with its routes; `control` for
//! `/sim/*`; `state` for the jobs and counters; `http` for what the protocols share (auth,
//! faults, error shapes). A new protocol is one more file and one `merge` in `router`.

mod control;
mod dashscope;
mod fal;
mod gemini;
mod http;
mod kling;
mod luma;
mod minimax;
mod openai_videos;
mod replicate;
mod runway;
mod seedance;
mod state;
mod vertex_veo;

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use secrecy::ExposeSecret;
use state::{lock, SimState};

use crate::providers::{ProviderKind, ProviderSettings};

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
    /// Answer 429 with `Retry-After` ([`SimFaults::retry_after`]).
    pub rate_limit_rate: f64,
    /// Answer 403 (a key that may not use the resource).
    pub forbidden_rate: f64,
    /// The `Retry-After` value of a 429, verbatim (default `1`): tests send a day, or a number
    /// of seconds no date can hold.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<String>,
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
            ("forbiddenRate", self.forbidden_rate),
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
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SimStats {
    /// Jobs currently held (an OpenAI-style delete removes one).
    pub jobs: u64,
    /// Of those, the ones submitted with an input image (image to video).
    #[serde(default)]
    pub image_jobs: u64,
    /// Submit requests received, including refused ones.
    pub submits: u64,
    /// Status requests received, including refused ones.
    pub status_calls: u64,
    /// Status requests received per existing job.
    pub status_calls_by_job: HashMap<String, u64>,
}

/// Starts the simulated provider: [`SimProvider::start`] returns the [`SimHandle`] that owns
/// the server.
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
    /// The address actually bound (with the port the system chose when `listen` had port 0).
    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`, the base URL to configure a provider with.
    #[must_use]
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Settings for a provider of `kind` served by this simulator (base URL, and whatever
    /// credentials that protocol needs), with every other setting at its default.
    #[must_use]
    pub fn provider_settings(&self, kind: ProviderKind) -> ProviderSettings {
        let base = self.base_url();
        let mut settings = match kind {
            ProviderKind::OpenaiVideos => openai_videos::provider_settings(&base),
            ProviderKind::Replicate => replicate::provider_settings(&base),
            ProviderKind::Fal => fal::provider_settings(&base),
            ProviderKind::VertexVeo => vertex_veo::provider_settings(&base),
            ProviderKind::Gemini => gemini::provider_settings(&base),
            ProviderKind::Runway => runway::provider_settings(&base),
            ProviderKind::Kling => kling::provider_settings(&base),
            ProviderKind::Seedance => seedance::provider_settings(&base),
            ProviderKind::Dashscope => dashscope::provider_settings(&base),
            ProviderKind::Minimax => minimax::provider_settings(&base),
            ProviderKind::Luma => luma::provider_settings(&base),
        };
        if settings.api_key.expose_secret().is_empty() {
            settings.api_key = self
                .state
                .settings
                .api_key
                .clone()
                .unwrap_or_else(|| "sim-key".to_owned())
                .into();
        }
        settings
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
            forbidden_rate: clamp(faults.forbidden_rate),
            latency_ms: faults.latency_ms,
            hang_rate: clamp(faults.hang_rate),
            retry_after: faults.retry_after,
        };
        *lock(&self.state.faults) = faults;
    }

    /// The faults in force, as last set through [`SimHandle::set_faults`] or `POST /sim/faults`.
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

/// A model name a provider of `kind` accepts, for the demo and tests (fal's model ids are
/// `owner/app[/path]`; the other protocols take any name).
#[must_use]
pub fn model_for(kind: ProviderKind) -> &'static str {
    match kind {
        ProviderKind::Fal => "fal-ai/veo3",
        _ => "sim-video-1",
    }
}

type Shared = Arc<SimState>;

fn router(state: Shared) -> Router {
    Router::new()
        .merge(openai_videos::routes())
        .merge(replicate::routes())
        .merge(fal::routes())
        .merge(vertex_veo::routes())
        .merge(gemini::routes())
        .merge(runway::routes())
        .merge(kling::routes())
        .merge(seedance::routes())
        .merge(dashscope::routes())
        .merge(minimax::routes())
        .merge(luma::routes())
        .merge(control::routes())
        .with_state(state)
}
