//! Startup and shutdown: builds the roles a process runs and owns every task they spawn.
//!
//! `Application::build` connects (failing fast with a clear error), declares the topology, runs
//! migrations and binds the HTTP port; `Application::run(shutdown)` runs until the given future
//! resolves (SIGTERM in the binary, anything in tests), then drains in order: consumers stop
//! pulling and finish in-flight messages (live event streams end at once), the relay flushes the
//! outbox, then HTTP and the broker connection close. No task outlives `run`.

use std::collections::BTreeSet;
use std::future::Future;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use secrecy::ExposeSecret;
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::broker::{consume, Broker, BrokerError, BrokerOptions, ConsumerSpec, Publisher};
use crate::config::Settings;
use crate::generation::{GenerationDeps, GenerationOrchestrator};
use crate::interop::masstransit::{HostInfo, MassTransit};
use crate::live::{Live, StallGuard};
use crate::partitions::PartitionManager;
use crate::progress_tracking::ProgressTracker;
use crate::providers::{ProviderConfigError, Providers};
use crate::relay::OutboxRelay;
use crate::retention::RetentionCleaner;
use crate::store::{Store, StoreError};
use crate::sweeper::Sweeper;
use crate::telemetry::TraceExport;
use crate::topology::Topology;
use crate::webhooks::WebhookDispatcher;

/// A part of the service a process can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Consumes `video.generation`.
    Generation,
    /// Holds partition leases and consumes their queues.
    Tracking,
    /// Re-arms overdue tasks and re-drives stale pending ones.
    Sweeper,
    /// Publishes the outbox and delivers webhooks.
    Relay,
}

impl Role {
    /// Every role.
    pub const ALL: [Role; 4] = [Role::Generation, Role::Tracking, Role::Sweeper, Role::Relay];
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "generation" => Ok(Self::Generation),
            "tracking" => Ok(Self::Tracking),
            "sweeper" => Ok(Self::Sweeper),
            "relay" => Ok(Self::Relay),
            other => Err(format!(
                "unknown role `{other}` (expected generation, tracking, sweeper or relay)"
            )),
        }
    }
}

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Broker unreachable or topology refused.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// Database unreachable or migrations failed.
    #[error("PostgreSQL: {0}")]
    Store(#[from] StoreError),
    /// Provider configuration.
    #[error(transparent)]
    Providers(#[from] ProviderConfigError),
    /// Span export (`telemetry.otlp_endpoint`).
    #[error(transparent)]
    Telemetry(#[from] crate::telemetry::ExportError),
    /// HTTP port.
    #[error("cannot listen on {addr} (http.listen): {source}")]
    Listen {
        /// The address.
        addr: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// A built, not yet running, service.
#[derive(Debug)]
pub struct Application {
    settings: Settings,
    roles: BTreeSet<Role>,
    broker: Arc<Broker>,
    store: Store,
    providers: Providers,
    listener: TcpListener,
    instance_id: String,
    trace_export: Option<TraceExport>,
}

impl Application {
    /// Connects to the database and the broker, declares the topology and binds HTTP.
    ///
    /// # Errors
    /// [`StartError`] saying which dependency failed and where.
    pub async fn build(settings: Settings, roles: &[Role]) -> Result<Self, StartError> {
        crate::metrics::handle();
        let providers = Providers::from_settings(&settings.providers, &settings.routing)?;
        let topology = Topology::from_settings(&settings);
        crate::metrics::register_zero(&topology, &providers.names());
        let store = Store::connect(&settings.database).await?;
        let broker = Broker::connect(BrokerOptions::from_settings(&settings), topology).await?;
        let listener = TcpListener::bind(settings.http.listen)
            .await
            .map_err(|source| StartError::Listen {
                addr: settings.http.listen.to_string(),
                source,
            })?;
        let instance_id = format!(
            "{}-{}-{}",
            hostname(),
            std::process::id(),
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let trace_export = TraceExport::from_settings(&settings.telemetry, &instance_id)?;
        Ok(Self {
            settings,
            roles: roles.iter().copied().collect(),
            broker,
            store,
            providers,
            listener,
            instance_id,
            trace_export,
        })
    }

    /// The bound HTTP address (tests bind port 0).
    pub fn http_addr(&self) -> std::net::SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or(self.settings.http.listen)
    }

    /// The database handle.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The broker.
    pub fn broker(&self) -> &Arc<Broker> {
        &self.broker
    }

    /// This process's id in leases and logs.
    pub fn instance_id(&self) -> &str {
        &self.instance_id
    }

    /// Runs until `shutdown` resolves, then drains (bounded by `shutdown.grace_ms`).
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) {
        let Self {
            settings,
            roles,
            broker,
            store,
            providers,
            listener,
            instance_id,
            trace_export,
        } = self;
        // Span export first and stopped last, so every span of the run is sent: the router
        // queues spans for it while registered; unregistering lets the task drain, send and
        // shut the exporter down (bounded by the grace period, then aborted).
        let traces = trace_export.map(|export| {
            let registration = export.register();
            (registration, tokio::spawn(export.run()))
        });
        let topology = broker.topology().clone();
        let grace = settings.shutdown.grace();

        let consumers_stop = CancellationToken::new();
        let relay_stop = CancellationToken::new();
        let infra_stop = CancellationToken::new();
        let consumers = TaskTracker::new();
        let relays = TaskTracker::new();
        let infra = TaskTracker::new();

        infra.spawn(broker.clone().supervise(infra_stop.clone()));
        let masstransit = settings.rabbitmq.node_urls().first().and_then(|url| {
            MassTransit::new(
                &topology,
                url.expose_secret(),
                HostInfo::of_this_process(&hostname()),
            )
            .map(Arc::new)
        });
        // Publishes keep retrying through reconnects until the broker itself shuts down.
        let publisher = Publisher::new(broker.clone(), infra_stop.clone())
            .with_park_sink(Arc::new(DbParkSink(store.clone())))
            .with_masstransit(masstransit.clone());
        let relay_wake = Arc::new(Notify::new());
        let consumers_running = Arc::new(AtomicBool::new(false));

        if roles.contains(&Role::Generation) {
            let orchestrator = Arc::new(GenerationOrchestrator::new(GenerationDeps {
                store: store.clone(),
                providers: providers.clone(),
                topology: topology.clone(),
                settings: settings.generation.clone(),
                tracking: settings.tracking.clone(),
                webhooks: settings.webhooks.clone(),
                relay_wake: relay_wake.clone(),
                stop: consumers_stop.clone(),
                security: settings.security.clone(),
                service_user: settings.rabbitmq.user(),
                masstransit: masstransit.clone(),
            }));
            let spec = ConsumerSpec {
                queue: topology.generation_queue(),
                prefetch: settings.generation.prefetch,
                limit: Arc::new(Semaphore::new(settings.generation.concurrency)),
                retry_budget: Some(settings.generation.retry_max()),
            };
            consumers.spawn(consume(
                broker.clone(),
                publisher.clone(),
                spec,
                orchestrator,
                consumers_stop.clone(),
            ));
        }
        if roles.contains(&Role::Tracking) {
            let tracker = Arc::new(ProgressTracker::new(
                store.clone(),
                providers.clone(),
                topology.clone(),
                publisher.clone(),
                settings.tracking.clone(),
                settings.webhooks.clone(),
            ));
            let manager = PartitionManager::new(
                store.clone(),
                broker.clone(),
                publisher.clone(),
                tracker,
                settings.tracking.clone(),
                instance_id.clone(),
            );
            consumers.spawn(manager.run(consumers_stop.clone()));
        }
        if roles.contains(&Role::Sweeper) {
            let sweeper = Sweeper::new(
                store.clone(),
                publisher.clone(),
                topology.clone(),
                settings.tracking.clone(),
                settings.generation.clone(),
            );
            consumers.spawn(sweeper.run(consumers_stop.clone()));
            let cleaner = RetentionCleaner::new(store.clone(), settings.retention.clone());
            consumers.spawn(cleaner.run(consumers_stop.clone()));
        }
        if roles.contains(&Role::Relay) {
            let relay = OutboxRelay::new(
                store.clone(),
                publisher.clone(),
                settings.outbox.clone(),
                relay_wake.clone(),
            );
            relays.spawn(relay.run(relay_stop.clone(), grace));
            match WebhookDispatcher::new(store.clone(), settings.webhooks.clone()) {
                Ok(dispatcher) => {
                    relays.spawn(dispatcher.run(relay_stop.clone()));
                }
                Err(e) => warn!(error = %e, "webhook dispatcher not started"),
            }
        }
        consumers_running.store(true, Ordering::Relaxed);

        // Live event streams end when shutdown starts: an open stream must not hold it up.
        let live_stop = CancellationToken::new();
        let live = Live::new(store.clone(), &settings.http, live_stop.clone());
        infra.spawn(live.clone().run(broker.clone()));
        let http_state = crate::http::HttpState {
            broker: broker.clone(),
            store: store.clone(),
            consumers_running: consumers_running.clone(),
            live,
        };
        let http_stop = infra_stop.clone();
        let listener = StallGuard::new(listener, settings.http.send_timeout());
        infra.spawn(async move {
            let server = axum::serve(listener, crate::http::router(http_state))
                .with_graceful_shutdown(async move { http_stop.cancelled().await });
            if let Err(e) = server.await {
                warn!(error = %e, "HTTP server failed");
            }
        });
        info!(
            instance = %instance_id,
            roles = ?roles,
            prefix = %topology.prefix(),
            partitions = topology.partitions(),
            masstransit = topology.masstransit_namespace().unwrap_or("off"),
            "video-orchestrator running"
        );

        shutdown.await;
        info!(
            grace_ms = grace.as_millis() as u64,
            "shutting down: draining in-flight work"
        );
        consumers_running.store(false, Ordering::Relaxed);
        live_stop.cancel();
        consumers_stop.cancel();
        consumers.close();
        if tokio::time::timeout(grace, consumers.wait()).await.is_err() {
            warn!("consumers did not finish within the grace period; unacked messages return to their queues");
        }
        relay_stop.cancel();
        relays.close();
        if tokio::time::timeout(grace, relays.wait()).await.is_err() {
            warn!(
                "outbox relay did not finish within the grace period; rows stay for the next relay"
            );
        }
        infra_stop.cancel();
        infra.close();
        infra.wait().await;
        store.close().await;
        if let Some((registration, mut task)) = traces {
            drop(registration);
            if tokio::time::timeout(grace, &mut task).await.is_err() {
                warn!("span export did not finish within the grace period; the rest is dropped");
                task.abort();
                let _ = task.await;
            }
        }
        info!("stopped");
    }
}

/// Records parked messages in `parked_messages`.
#[derive(Debug)]
struct DbParkSink(Store);

#[async_trait::async_trait]
impl crate::broker::ParkSink for DbParkSink {
    async fn record(&self, delivery: &crate::broker::Incoming, reason: &str) {
        let text = |s: &Option<String>| s.as_deref().map(pg_text);
        let parked = crate::store::ParkedMessage {
            id: 0,
            message_id: text(&delivery.message_id),
            original_queue: pg_text(&delivery.queue),
            original_exchange: pg_text(&delivery.exchange),
            routing_key: pg_text(&delivery.routing_key),
            // Capped like the `x-parked-reason` header: a decode error quotes the bad value,
            // which may be a huge string.
            reason: pg_text(&reason.chars().take(1000).collect::<String>()),
            headers: serde_json::json!({
                "messageId": text(&delivery.message_id),
                "type": text(&delivery.message_type),
                "correlationId": text(&delivery.correlation_id),
                "x-virtual-key": text(&delivery.virtual_key),
                "traceparent": text(&delivery.traceparent),
                "contentType": text(&delivery.content_type),
                "headers": crate::messages::record_headers(
                    &delivery
                        .headers
                        .iter()
                        .map(|(k, v)| (pg_text(k), pg_text(v)))
                        .collect::<Vec<_>>(),
                ),
                "redelivered": delivery.redelivered,
            }),
            body: delivery.body.clone(),
            parked_at: chrono::Utc::now(),
            requeued_at: None,
        };
        if let Err(e) = self.0.record_parked(&parked).await {
            warn!(error = %e, "parked message not recorded in the database (it is in the parking queue)");
        }
    }
}

/// PostgreSQL `TEXT` and `JSONB` cannot hold NUL, and a poison message can carry one into its
/// properties or into the decoder's error (which quotes the bad value): replace it, or the row is
/// refused and the parked message goes unrecorded.
fn pg_text(s: &str) -> String {
    s.replace('\0', "\u{FFFD}")
}

fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .unwrap_or_else(|| "host".to_owned())
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
