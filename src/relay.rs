//! The outbox relay: publishes rows the generation orchestrator committed, with confirms, and
//! deletes them once confirmed.
//!
//! At-least-once: a crash between the broker's confirm and the delete re-sends the row after
//! restart with the same `messageId`, so consumers de-duplicate. Any number of instances may run
//! a relay; `FOR UPDATE SKIP LOCKED` keeps two from publishing the same row at once.
//!
//! With `interop.masstransit` on, the publisher sends an event row together with its MassTransit
//! copy and the row is deleted only once both are confirmed: one row, two messages, so the copy
//! needs no outbox row of its own and is as atomic, at-least-once and ordered per task as the row.

use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::broker::{BrokerError, Publisher};
use crate::config::OutboxSettings;
use crate::messages::truncate;
use crate::store::{OutboxRow, Store, StoreError};

/// An unroutable mandatory row (a queue that is gone) is tried this often before it is parked:
/// a redeclare may bring the queue back.
const MAX_UNROUTABLE: i32 = 10;
/// How old the oldest outbox row may get before the relay warns that it is stuck.
const STUCK_AFTER_SECS: f64 = 60.0;

/// What happened to one task's rows in a round.
#[derive(Debug, Default)]
struct TaskRows<'a> {
    sent: Vec<i64>,
    parked: Vec<(&'a OutboxRow, String)>,
    deferred: Option<(&'a OutboxRow, String)>,
}

/// Wait before a failed row is tried again: 1 s, doubling, at most a minute.
fn retry_delay(attempts: i32) -> Duration {
    Duration::from_secs(1u64 << attempts.clamp(0, 6).unsigned_abs()).min(Duration::from_secs(60))
}

/// Relay errors.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// Database.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Publishes the outbox.
#[derive(Debug, Clone)]
pub struct OutboxRelay {
    store: Store,
    publisher: Publisher,
    settings: OutboxSettings,
    wake: Arc<Notify>,
}

impl OutboxRelay {
    /// A relay; `wake` is notified by local commits so events leave without waiting for a poll.
    pub fn new(
        store: Store,
        publisher: Publisher,
        settings: OutboxSettings,
        wake: Arc<Notify>,
    ) -> Self {
        Self {
            store,
            publisher,
            settings,
            wake,
        }
    }

    /// Publishes one batch. Returns how many rows were sent.
    ///
    /// A row the broker refuses waits (backoff per row) while other tasks' rows go on; the rows
    /// of its own task wait behind it. A row that can never be published is parked with the
    /// reason in `parked_messages`.
    ///
    /// # Errors
    /// Database errors.
    pub async fn flush_once(&self) -> Result<usize, RelayError> {
        let mut uow = self.store.begin().await?;
        let rows = uow.claim_outbox(self.settings.batch_size).await?;
        if rows.is_empty() {
            uow.commit().await?;
            return Ok(0);
        }
        // Tasks in parallel (one confirm channel, many confirms in flight), each task's rows in
        // the order they were written: a terminal event always precedes its
        // `VideoProgressTrackingCancelled`. After a failure, a task's later rows wait.
        let mut by_task: Vec<(&str, Vec<&OutboxRow>)> = Vec::new();
        for row in &rows {
            match by_task
                .iter_mut()
                .find(|(k, _)| *k == row.envelope.correlation_id)
            {
                Some((_, list)) => list.push(row),
                None => by_task.push((row.envelope.correlation_id.as_str(), vec![row])),
            }
        }
        let results = join_all(
            by_task
                .into_iter()
                .map(|(_, list)| self.publish_in_order(list)),
        )
        .await;
        let mut sent = Vec::with_capacity(rows.len());
        for result in results {
            sent.extend(result.sent);
            for (row, reason) in result.parked {
                uow.park_outbox(row, &reason).await?;
            }
            if let Some((row, error)) = result.deferred {
                uow.defer_outbox(row.id, &error, retry_delay(row.attempts))
                    .await?;
            }
        }
        uow.delete_outbox(&sent).await?;
        uow.commit().await?;
        metrics::counter!("video_outbox_published_total").increment(sent.len() as u64);
        Ok(sent.len())
    }

    /// One task's rows, in order, until one fails.
    async fn publish_in_order<'a>(&self, list: Vec<&'a OutboxRow>) -> TaskRows<'a> {
        let mut out = TaskRows::default();
        for row in list {
            match self.publisher.publish(&row.envelope).await {
                Ok(()) => out.sent.push(row.id),
                Err(e @ BrokerError::Unpublishable { .. }) => {
                    warn!(message_id = %truncate(&row.envelope.message_id, 80), error = %e, "outbox row parked: it can never be published");
                    metrics::counter!("video_outbox_parked_total").increment(1);
                    out.parked.push((row, e.to_string()));
                }
                Err(e @ BrokerError::Unroutable { .. }) if row.attempts + 1 >= MAX_UNROUTABLE => {
                    warn!(message_id = %truncate(&row.envelope.message_id, 80), error = %e, "outbox row parked: still unroutable");
                    metrics::counter!("video_outbox_parked_total").increment(1);
                    out.parked
                        .push((row, format!("{e} ({MAX_UNROUTABLE} attempts)")));
                }
                Err(BrokerError::Shutdown) => break,
                Err(e) => {
                    warn!(message_id = %truncate(&row.envelope.message_id, 80), attempts = row.attempts + 1, error = %e, "outbox row not published; it waits, other tasks go on");
                    out.deferred = Some((row, e.to_string()));
                    break;
                }
            }
        }
        out
    }

    /// Publishes until the outbox is empty (or an error).
    ///
    /// # Errors
    /// As [`Self::flush_once`].
    pub async fn drain(&self) -> Result<usize, RelayError> {
        let mut total = 0;
        loop {
            let n = self.flush_once().await?;
            total += n;
            if n == 0 {
                return Ok(total);
            }
        }
    }

    /// Runs until `stop`, then flushes what is left (bounded by `grace`).
    pub async fn run(self, stop: CancellationToken, grace: Duration) {
        let poll = self.settings.poll_interval();
        let mut backoff = Duration::from_millis(100);
        let mut age_checked = tokio::time::Instant::now() - Duration::from_secs(1);
        let mut warned_stuck = false;
        loop {
            if age_checked.elapsed() >= Duration::from_secs(1) {
                age_checked = tokio::time::Instant::now();
                if let Ok(age) = self.store.outbox_oldest_age_seconds().await {
                    metrics::gauge!("video_outbox_oldest_age_seconds").set(age);
                    if age > STUCK_AFTER_SECS && !warned_stuck {
                        warn!(
                            oldest_age_s = age.round(),
                            "outbox relay is behind: its oldest row waits"
                        );
                    }
                    warned_stuck = age > STUCK_AFTER_SECS;
                }
            }
            match self.drain().await {
                Ok(n) => {
                    if n > 0 {
                        debug!(published = n, "outbox relayed");
                    }
                    backoff = Duration::from_millis(100);
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = self.wake.notified() => {}
                        _ = tokio::time::sleep(poll) => {}
                    }
                }
                Err(e) => {
                    warn!(error = %e, "outbox relay round failed; retrying");
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        // Flush what the last handlers committed before they finished.
        match tokio::time::timeout(grace, self.drain()).await {
            Ok(Ok(n)) => debug!(published = n, "outbox flushed on shutdown"),
            Ok(Err(e)) => {
                warn!(error = %e, "outbox flush on shutdown failed; rows stay for the next relay")
            }
            Err(_) => warn!("outbox flush on shutdown timed out; rows stay for the next relay"),
        }
    }
}
