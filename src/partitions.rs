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

use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::broker::{consume, Broker, ConsumerSpec, Publisher};
use crate::config::TrackingSettings;
use crate::progress_tracking::ProgressTracker;
use crate::store::{LeaseScope, Store, StoreError};

/// Leases and the consumers they allow.
#[derive(Debug)]
pub struct PartitionManager {
    store: Store,
    broker: Arc<Broker>,
    publisher: Publisher,
    tracker: Arc<ProgressTracker>,
    settings: TrackingSettings,
    scope: LeaseScope,
    limit: Arc<Semaphore>,
}

struct Running {
    stop: CancellationToken,
    handle: JoinHandle<()>,
}

/// The leases an instance keeps out of those it renewed, and the extras over its share.
#[derive(Debug, PartialEq, Eq)]
struct Share {
    held: Vec<u16>,
    extra: Vec<u16>,
}

/// Splits `renewed` into `target` to keep and the rest to give back: the ones not running first
/// (no hand-over needed), then the highest.
fn share(mut renewed: Vec<u16>, running: impl Fn(u16) -> bool, target: usize) -> Share {
    renewed.sort_unstable();
    let mut extra = Vec::new();
    while renewed.len() > target {
        let pick = renewed
            .iter()
            .rev()
            .copied()
            .find(|p| !running(*p))
            .unwrap_or(renewed[renewed.len() - 1]);
        renewed.retain(|p| *p != pick);
        extra.push(pick);
    }
    extra.sort_unstable();
    Share {
        held: renewed,
        extra,
    }
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
        let scope = LeaseScope {
            topology_prefix: broker.topology().prefix().to_owned(),
            instance_id,
        };
        Self {
            limit: Arc::new(Semaphore::new(settings.concurrency)),
            store,
            broker,
            publisher,
            tracker,
            scope,
            settings,
        }
    }

    fn ttl(&self) -> Duration {
        self.settings.lease_ttl()
    }

    /// Creates lease rows for every partition (idempotent).
    async fn seed(&self) -> Result<(), StoreError> {
        let n = self.broker.topology().partitions();
        self.store.seed_leases(&self.scope, n).await
    }

    /// One heartbeat: renew, rebalance. Returns the partitions held after it.
    async fn heartbeat(&self, running: &BTreeMap<u16, Running>) -> Result<Vec<u16>, StoreError> {
        let ttl = self.ttl();
        let live = self.store.heartbeat_instance(&self.scope, ttl).await?;
        let n = usize::from(self.broker.topology().partitions());
        let count = live.len().max(1);
        let index = live
            .iter()
            .position(|i| *i == self.scope.instance_id)
            .unwrap_or(0);
        let target = n / count + usize::from(index < n % count);

        let renewed = self.store.renew_leases(&self.scope, ttl).await?;
        let Share { mut held, extra } = share(renewed, |p| running.contains_key(&p), target);
        // An extra that runs here is stopped, then released, by the caller. One that does not
        // run (our consumers stopped while the database was away, and the cluster grew
        // meanwhile) is given back now: renewed at every beat and never consumed, it would keep
        // its partition from everyone.
        for p in extra.iter().copied().filter(|p| !running.contains_key(p)) {
            self.release(p).await;
            info!(partition = p, "lease given back");
        }
        if held.len() < target {
            let taken = self
                .store
                .take_free_leases(
                    &self.scope,
                    ttl,
                    target - held.len(),
                    self.broker.topology().partitions(),
                )
                .await?;
            held.extend(taken);
            held.sort_unstable();
        }
        Ok(held)
    }

    async fn release(&self, partition: u16) {
        let result = self.store.release_lease(&self.scope, partition).await;
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
        metrics::gauge!("video_progress_owned_partitions").set(running.len() as f64);
    }

    /// Holds leases and runs consumers until `stop`; then stops every consumer (in-flight checks
    /// finish) and releases the leases so another instance takes over at once.
    pub async fn run(self, stop: CancellationToken) {
        let mut running: BTreeMap<u16, Running> = BTreeMap::new();
        let every = self.settings.lease_heartbeat();
        let ttl = self.ttl();
        let mut last_renewed = Instant::now();
        let mut seeded = false;
        loop {
            if !seeded {
                seeded = self.seed().await.is_ok();
            }
            match self.heartbeat(&running).await {
                Ok(held) => {
                    last_renewed = Instant::now();
                    // A consumer ends only when told to; one that ended otherwise (a panic)
                    // would leave a leased partition unconsumed: start it again below.
                    running.retain(|p, r| {
                        let ended = r.handle.is_finished();
                        if ended {
                            warn!(
                                partition = *p,
                                "partition consumer ended by itself; restarting it"
                            );
                        }
                        !ended
                    });
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
        if let Err(e) = self.store.remove_instance(&self.scope).await {
            debug!(error = %e, "instance row not removed; it expires by itself");
        }
        info!("partition manager stopped; leases released");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn within_its_share_an_instance_keeps_everything_it_renewed() {
        let s = share(vec![3, 1, 2], |_| true, 4);
        assert_eq!(s.held, vec![1, 2, 3]);
        assert!(s.extra.is_empty());
    }

    #[test]
    fn extras_not_running_go_first_then_the_highest_running() {
        let running = |p: u16| p < 4 || p == 9;
        let s = share((0..10).collect(), running, 6);
        assert_eq!(s.held, vec![0, 1, 2, 3, 4, 9], "running ones kept");
        assert_eq!(s.extra, vec![5, 6, 7, 8]);
        let s = share((0..10).collect(), |_| true, 6);
        assert_eq!(s.extra, vec![6, 7, 8, 9], "all running: the highest go");
    }

    #[test]
    fn after_an_outage_the_leases_over_the_share_are_extras_to_give_back() {
        // All 16 renewed, none running (consumers stopped while the database was away), and a
        // second instance is live: 8 kept, 8 given back, none of them kept by renewal alone.
        let s = share((0..16).collect(), |_| false, 8);
        assert_eq!(s.held, (0..8).collect::<Vec<_>>());
        assert_eq!(s.extra, (8..16).collect::<Vec<_>>());
    }
}
