//! Partition ownership: one active consumer per `video.progress.p{i}` in the whole cluster,
//! balanced across live instances, failing over when one dies.
//!
//! RabbitMQ 3.10 never moves a single-active-consumer queue to another consumer while the first
//! is alive, so balancing is ours: leases in PostgreSQL with heartbeats and expiry. Every
//! heartbeat an instance renews its leases, counts the live instances, computes its fair share
//! (`partitions / live`, the first `partitions % live` instances by id taking one more), releases
//! extras and takes free or expired leases. It subscribes only to partitions it holds;
//! single-active-consumer stays on as the safety net for the moment two instances overlap.
//! On release the consumer stops pulling, finishes its in-flight checks, then cancels.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::Row;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::broker::{consume, Broker, ConsumerSpec, Publisher};
use crate::config::TrackingSettings;
use crate::progress_tracking::ProgressTracker;
use crate::store::{Store, StoreError};

/// Leases and the consumers they allow.
#[derive(Debug)]
pub struct PartitionManager {
    store: Store,
    broker: Arc<Broker>,
    publisher: Publisher,
    tracker: Arc<ProgressTracker>,
    settings: TrackingSettings,
    instance_id: String,
    limit: Arc<Semaphore>,
    owned: Arc<std::sync::Mutex<Vec<u16>>>,
}

struct Running {
    stop: CancellationToken,
    handle: JoinHandle<()>,
}

impl PartitionManager {
    /// A manager for `instance_id` (unique per process).
    pub fn new(
        store: Store,
        broker: Arc<Broker>,
        publisher: Publisher,
        tracker: Arc<ProgressTracker>,
        settings: TrackingSettings,
        instance_id: String,
    ) -> Self {
        Self {
            limit: Arc::new(Semaphore::new(settings.concurrency)),
            store,
            broker,
            publisher,
            tracker,
            settings,
            instance_id,
            owned: Arc::new(std::sync::Mutex::new(Vec::new())),
        }
    }

    /// Partitions this instance consumes now (shared view for `/metrics` and tests).
    pub fn owned_handle(&self) -> Arc<std::sync::Mutex<Vec<u16>>> {
        self.owned.clone()
    }

    fn prefix(&self) -> &str {
        self.broker.topology().prefix()
    }

    fn ttl_secs(&self) -> f64 {
        self.settings.lease_ttl_ms as f64 / 1000.0
    }

    /// Creates lease rows for every partition (idempotent).
    async fn seed(&self) -> Result<(), StoreError> {
        let n = i32::from(self.broker.topology().partitions());
        sqlx::query(
            "INSERT INTO partition_leases (topology_prefix, partition)
             SELECT $1, g FROM generate_series(0, $2 - 1) g ON CONFLICT DO NOTHING",
        )
        .bind(self.prefix())
        .bind(n)
        .execute(self.store.pool())
        .await?;
        Ok(())
    }

    /// One heartbeat: renew, rebalance. Returns the partitions held after it.
    async fn heartbeat(&self, running: &BTreeMap<u16, Running>) -> Result<Vec<u16>, StoreError> {
        let pool = self.store.pool();
        let ttl = self.ttl_secs();
        sqlx::query(
            "INSERT INTO service_instances (topology_prefix, instance_id, heartbeat_at) VALUES ($1, $2, now())
             ON CONFLICT (topology_prefix, instance_id) DO UPDATE SET heartbeat_at = now()",
        )
        .bind(self.prefix())
        .bind(&self.instance_id)
        .execute(pool)
        .await?;
        let live: Vec<String> = sqlx::query_scalar(
            "SELECT instance_id FROM service_instances
             WHERE topology_prefix = $1 AND heartbeat_at > now() - make_interval(secs => $2)
             ORDER BY instance_id",
        )
        .bind(self.prefix())
        .bind(ttl)
        .fetch_all(pool)
        .await?;
        let n = usize::from(self.broker.topology().partitions());
        let count = live.len().max(1);
        let index = live
            .iter()
            .position(|i| *i == self.instance_id)
            .unwrap_or(0);
        let target = n / count + usize::from(index < n % count);

        let mut held: Vec<u16> = sqlx::query(
            "UPDATE partition_leases SET expires_at = now() + make_interval(secs => $3)
             WHERE topology_prefix = $1 AND owner = $2 RETURNING partition",
        )
        .bind(self.prefix())
        .bind(&self.instance_id)
        .bind(ttl)
        .fetch_all(pool)
        .await?
        .iter()
        .filter_map(|r| r.try_get::<i32, _>("partition").ok())
        .filter_map(|p| u16::try_from(p).ok())
        .collect();
        held.sort_unstable();
        // Give back the extras: the ones not running first, then the highest.
        while held.len() > target {
            let pick = held
                .iter()
                .rev()
                .copied()
                .find(|p| !running.contains_key(p))
                .unwrap_or(held[held.len() - 1]);
            held.retain(|p| *p != pick);
        }
        if held.len() < target {
            let taken: Vec<u16> = sqlx::query(
                "UPDATE partition_leases SET owner = $2, expires_at = now() + make_interval(secs => $3)
                 WHERE topology_prefix = $1 AND partition IN (
                     SELECT partition FROM partition_leases
                     WHERE topology_prefix = $1 AND partition < $5
                       AND (owner IS NULL OR expires_at < now())
                     ORDER BY partition LIMIT $4 FOR UPDATE SKIP LOCKED)
                 RETURNING partition",
            )
            .bind(self.prefix())
            .bind(&self.instance_id)
            .bind(ttl)
            .bind(i64::try_from(target - held.len()).unwrap_or(0))
            .bind(i32::try_from(n).unwrap_or(i32::MAX))
            .fetch_all(pool)
            .await?
            .iter()
            .filter_map(|r| r.try_get::<i32, _>("partition").ok())
            .filter_map(|p| u16::try_from(p).ok())
            .collect();
            held.extend(taken);
            held.sort_unstable();
        }
        Ok(held)
    }

    async fn release(&self, partition: u16) {
        let result = sqlx::query(
            "UPDATE partition_leases SET owner = NULL, expires_at = 'epoch'
             WHERE topology_prefix = $1 AND partition = $2 AND owner = $3",
        )
        .bind(self.prefix())
        .bind(i32::from(partition))
        .bind(&self.instance_id)
        .execute(self.store.pool())
        .await;
        if let Err(e) = result {
            warn!(partition, error = %e, "could not release lease; it expires by itself");
        }
    }

    fn start(&self, partition: u16) -> Running {
        let stop = CancellationToken::new();
        let spec = ConsumerSpec {
            queue: self.broker.topology().partition_queue(partition),
            prefetch: self.settings.prefetch,
            limit: self.limit.clone(),
            retry_budget: None,
        };
        let handle = tokio::spawn(consume(
            self.broker.clone(),
            self.publisher.clone(),
            spec,
            self.tracker.clone(),
            stop.clone(),
        ));
        Running { stop, handle }
    }

    async fn stop_consumer(partition: u16, running: Running) {
        running.stop.cancel();
        if let Err(e) = running.handle.await {
            warn!(partition, error = %e, "partition consumer ended abnormally");
        }
    }

    fn publish_owned(&self, running: &BTreeMap<u16, Running>) {
        let owned: Vec<u16> = running.keys().copied().collect();
        metrics::gauge!("video_progress_owned_partitions").set(owned.len() as f64);
        *self.owned.lock().unwrap_or_else(|e| e.into_inner()) = owned;
    }

    /// Holds leases and runs consumers until `stop`; then stops every consumer (in-flight checks
    /// finish) and releases the leases so another instance takes over at once.
    pub async fn run(self, stop: CancellationToken) {
        let mut running: BTreeMap<u16, Running> = BTreeMap::new();
        let every = Duration::from_millis(self.settings.lease_heartbeat_ms);
        let ttl = Duration::from_millis(self.settings.lease_ttl_ms);
        let mut last_renewed = Instant::now();
        let mut seeded = false;
        loop {
            if !seeded {
                seeded = self.seed().await.is_ok();
            }
            match self.heartbeat(&running).await {
                Ok(held) => {
                    last_renewed = Instant::now();
                    let to_stop: Vec<u16> = running
                        .keys()
                        .filter(|p| !held.contains(p))
                        .copied()
                        .collect();
                    for p in to_stop {
                        if let Some(r) = running.remove(&p) {
                            Self::stop_consumer(p, r).await;
                        }
                        self.release(p).await;
                        info!(partition = p, "partition handed over");
                    }
                    for p in held {
                        if let std::collections::btree_map::Entry::Vacant(slot) = running.entry(p) {
                            slot.insert(self.start(p));
                            info!(partition = p, "partition acquired");
                        }
                    }
                    self.publish_owned(&running);
                }
                Err(e) => {
                    warn!(error = %e, "lease heartbeat failed");
                    // Our leases expire for everyone else: stop consuming before they can take over.
                    if last_renewed.elapsed() + every >= ttl && !running.is_empty() {
                        warn!("leases expiring without renewal; stopping partition consumers");
                        for (p, r) in std::mem::take(&mut running) {
                            Self::stop_consumer(p, r).await;
                        }
                        self.publish_owned(&running);
                    }
                }
            }
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(every) => {}
            }
        }
        for (p, r) in std::mem::take(&mut running) {
            Self::stop_consumer(p, r).await;
            self.release(p).await;
        }
        self.publish_owned(&running);
        let _ = sqlx::query(
            "DELETE FROM service_instances WHERE topology_prefix = $1 AND instance_id = $2",
        )
        .bind(self.prefix())
        .bind(&self.instance_id)
        .execute(self.store.pool())
        .await;
        info!("partition manager stopped; leases released");
    }
}
