//! The generation orchestrator's database gate: while PostgreSQL is known to be down, deliveries
//! wait for it (probed once a second by one waiter) instead of each failing into a delayed retry.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::store::Store;

/// While the database is known to be down, handlers wait here for it instead of failing one
/// message after another (each failure would cost a delayed retry). One waiter probes at a time.
#[derive(Debug, Default)]
pub(super) struct DatabaseGate {
    down: AtomicBool,
    probe: tokio::sync::Mutex<()>,
}

/// How long a delivery waits at a closed gate before it goes to a delayed retry instead. Well
/// under RabbitMQ's `consumer_timeout` (30 min by default), which closes a channel that holds a
/// delivery unacknowledged for longer.
pub(super) const GATE_HOLD: Duration = Duration::from_secs(120);
/// Pause between probes of a database that is down.
const GATE_PROBE_EVERY: Duration = Duration::from_secs(1);

/// Why a delivery did not pass the gate.
pub(super) enum GateClosed {
    /// The process is stopping.
    Stopping,
    /// The database did not answer within the hold.
    StillDown,
}

impl DatabaseGate {
    pub(crate) fn close(&self) {
        if !self.down.swap(true, Ordering::Relaxed) {
            warn!("database unavailable; holding generation messages until it answers");
        }
    }

    /// Returns at once unless the database is known to be down; then waits until a probe
    /// succeeds, `stop` fires or `hold` has passed.
    pub(crate) async fn pass(
        &self,
        store: &Store,
        stop: &CancellationToken,
        hold: Duration,
    ) -> Result<(), GateClosed> {
        let deadline = tokio::time::Instant::now() + hold;
        while self.down.load(Ordering::Relaxed) {
            let probe = tokio::select! {
                _ = stop.cancelled() => return Err(GateClosed::Stopping),
                _ = tokio::time::sleep_until(deadline) => return Err(GateClosed::StillDown),
                guard = self.probe.lock() => guard,
            };
            if !self.down.load(Ordering::Relaxed) {
                break;
            }
            let up = tokio::time::timeout(Duration::from_secs(5), store.ping())
                .await
                .unwrap_or(false);
            if up {
                self.down.store(false, Ordering::Relaxed);
                info!("database answers again; handling generation messages");
                break;
            }
            tokio::select! {
                _ = stop.cancelled() => return Err(GateClosed::Stopping),
                _ = tokio::time::sleep_until(deadline) => return Err(GateClosed::StillDown),
                _ = tokio::time::sleep(GATE_PROBE_EVERY) => {}
            }
            drop(probe);
        }
        Ok(())
    }
}
