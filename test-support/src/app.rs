//! The whole service in process against a test's prefix and database, with the simulated
//! provider on loopback. Each [`Instance`] is owned by the test: `stop` resolves its shutdown
//! future and awaits it, the same path SIGTERM takes. [`spawn_app`] starts the usual set: the
//! provider, an environment, the event collector, one instance with every role and a client.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use video_orchestrator::app::{Application, Role};
use video_orchestrator::client::Client;
use video_orchestrator::config::Settings;
use video_orchestrator::messages::VideoGenerationRequested;
use video_orchestrator::providers::sim::{SimHandle, SimProvider, SimSettings};
use video_orchestrator::providers::ProviderSettings;
use video_orchestrator::store::Task;

use crate::env::TestEnv;
use crate::events::EventCollector;
/// A simulated provider whose jobs take `duration_ms`.
pub async fn start_sim(duration_ms: u64) -> SimHandle {
    SimProvider::start(
        "127.0.0.1:0".parse().expect("addr"),
        SimSettings {
            duration_ms,
            ..SimSettings::default()
        },
    )
    .await
    .expect("simulated provider starts")
}

/// Settings that make a test fast: 1 s checks, short tiers, a quick sweeper and leases, the
/// simulated provider (as `sim`, OpenAI protocol, and `rep`, Replicate protocol), webhooks to
/// loopback allowed.
pub fn fast_vars(sim: &SimHandle) -> Vec<(String, String)> {
    let url = sim.base_url();
    [
        ("APP__HTTP__LISTEN", "127.0.0.1:0".to_owned()),
        ("APP__PROVIDERS__SIM__BASE_URL", url.clone()),
        ("APP__PROVIDERS__REP__KIND", "replicate".to_owned()),
        ("APP__PROVIDERS__REP__BASE_URL", url),
        ("APP__PROVIDERS__REP__API_KEY", "rep-key".to_owned()),
        ("APP__TRACKING__MIN_INTERVAL_MS", "1000".to_owned()),
        ("APP__TRACKING__MAX_INTERVAL_MS", "2000".to_owned()),
        ("APP__TRACKING__DELAY_TIERS_MS", "1000,2000,5000".to_owned()),
        ("APP__TRACKING__SWEEPER_GRACE_MS", "4000".to_owned()),
        ("APP__TRACKING__SWEEPER_INTERVAL_MS", "1000".to_owned()),
        ("APP__TRACKING__LEASE_HEARTBEAT_MS", "500".to_owned()),
        ("APP__TRACKING__LEASE_TTL_MS", "3000".to_owned()),
        ("APP__TRACKING__PREFETCH", "64".to_owned()),
        (
            "APP__GENERATION__SUBMIT_BACKOFF_INITIAL_MS",
            "50".to_owned(),
        ),
        ("APP__GENERATION__SUBMIT_BACKOFF_MAX_MS", "200".to_owned()),
        ("APP__GENERATION__SUBMIT_MAX_ATTEMPTS", "3".to_owned()),
        ("APP__OUTBOX__POLL_INTERVAL_MS", "200".to_owned()),
        ("APP__WEBHOOKS__ALLOWED_HOSTS", "127.0.0.1".to_owned()),
        ("APP__WEBHOOKS__SECRET", "test-webhook-secret".to_owned()),
        ("APP__SHUTDOWN__GRACE_MS", "10000".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// A test environment with the fast settings plus `extra` overrides.
pub async fn env_with(sim: &SimHandle, extra: &[(&str, &str)]) -> TestEnv {
    let mut vars = fast_vars(sim);
    vars.extend(
        extra
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    );
    let borrowed: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    TestEnv::with_env(&borrowed).await
}

/// One running service instance.
#[derive(Debug)]
pub struct Instance {
    stop: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<()>>,
    /// Its HTTP address.
    pub http: SocketAddr,
    /// Its id in the lease table.
    pub instance_id: String,
}

impl Instance {
    /// Builds and runs an instance with `roles`.
    pub async fn start(settings: &Settings, roles: &[Role]) -> Instance {
        let app = Application::build(settings.clone(), roles)
            .await
            .expect("service starts");
        Self::run(app)
    }

    /// Runs an instance built beforehand (a test may prepare the database for its id first).
    pub fn run(app: Application) -> Instance {
        let http = app.http_addr();
        let instance_id = app.instance_id().to_owned();
        let (tx, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(app.run(async move {
            let _ = rx.await;
        }));
        Instance {
            stop: Some(tx),
            handle: Some(handle),
            http,
            instance_id,
        }
    }

    /// Every role.
    pub async fn start_all(settings: &Settings) -> Instance {
        Self::start(settings, &Role::ALL).await
    }

    /// Graceful stop, awaited (bounded so a hung shutdown fails the test instead of hanging it).
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(handle) = self.handle.take() {
            tokio::time::timeout(Duration::from_secs(30), handle)
                .await
                .expect("service stops within 30 s")
                .expect("service task did not panic");
        }
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        if let Some(handle) = self.handle.take() {
            handle.abort();
        }
    }
}

/// Polls `f` every 100 ms until it returns `Some`, or `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What most tests run against: the simulated provider, a fresh environment, the event collector
/// (subscribed before anything is published), one instance with every role, and a client.
#[derive(Debug)]
pub struct TestApp {
    /// The simulated provider the instance calls.
    pub sim: SimHandle,
    /// The test's prefix and database.
    pub env: TestEnv,
    /// Everything published on the test's `video.events`.
    pub events: EventCollector,
    /// The service, every role.
    pub service: Instance,
    /// Publishes requests and cancels on its own broker connection.
    pub client: Client,
    client_stop: CancellationToken,
}

/// [`TestApp`] with the fast settings; the simulated provider's jobs take `sim_duration_ms`.
pub async fn spawn_app(sim_duration_ms: u64) -> TestApp {
    spawn_app_with(sim_duration_ms, &[]).await
}

/// [`spawn_app`] with `extra` `APP__…` overrides.
pub async fn spawn_app_with(sim_duration_ms: u64, extra: &[(&str, &str)]) -> TestApp {
    let sim = start_sim(sim_duration_ms).await;
    let env = env_with(&sim, extra).await;
    assemble(sim, env).await
}

/// [`spawn_app`] with more providers beside `sim`: `providers` gets the simulator (for
/// [`SimHandle::provider_settings`]) and returns `(name, settings)` pairs.
pub async fn spawn_app_with_providers(
    sim_duration_ms: u64,
    providers: impl FnOnce(&SimHandle) -> Vec<(String, ProviderSettings)>,
) -> TestApp {
    let sim = start_sim(sim_duration_ms).await;
    let mut env = env_with(&sim, &[]).await;
    env.settings.providers.extend(providers(&sim));
    assemble(sim, env).await
}

/// The event collector, one instance with every role and a client on `env`.
async fn assemble(sim: SimHandle, env: TestEnv) -> TestApp {
    let events = env.events().await;
    let service = Instance::start_all(&env.settings).await;
    let client_stop = CancellationToken::new();
    let client = Client::new(env.broker().await, client_stop.clone());
    TestApp {
        sim,
        env,
        events,
        service,
        client,
        client_stop,
    }
}

impl TestApp {
    /// Publishes `request`; returns its `requestId` once the broker confirmed it.
    pub async fn submit(&self, request: &VideoGenerationRequested) -> String {
        self.client
            .submit(request)
            .await
            .expect("the broker confirms the request")
    }

    /// The task row of `request_id`.
    ///
    /// # Panics
    /// When there is none.
    pub async fn task(&self, request_id: &str) -> Task {
        self.env
            .store
            .get(request_id)
            .await
            .expect("read the task")
            .unwrap_or_else(|| panic!("no task row for {request_id}"))
    }

    /// Stops everything this app started, then gives the environment back.
    pub async fn stop(self) {
        self.client_stop.cancel();
        drop(self.client);
        self.events.close().await;
        self.service.stop().await;
        self.sim.shutdown().await;
        self.env.cleanup().await;
    }

    /// [`TestApp::stop`], asserting once the service is down (its prefetched checks back in
    /// their queues) that no check is left in any delay tier or partition.
    pub async fn stop_leaving_no_checks(self) {
        self.client_stop.cancel();
        drop(self.client);
        self.service.stop().await;
        self.env.assert_no_checks_left().await;
        self.events.close().await;
        self.sim.shutdown().await;
        self.env.cleanup().await;
    }
}
