//! The outbox relay: publishes rows the generation orchestrator committed, with confirms, and
//! deletes them once confirmed.
//!
//! At-least-once: a crash between the broker's confirm and the delete re-sends the row after
//! restart with the same `messageId`, so consumers de-duplicate. Any number of instances may run
//! a relay; `FOR UPDATE SKIP LOCKED` keeps two from publishing the same row at once.

use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::broker::Publisher;
use crate::config::OutboxSettings;
use crate::store::{OutboxRow, Store, StoreError};

/// Relay errors.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// Database.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Some rows could not be published; they stay in the outbox.
    #[error("{0} outbox rows not confirmed by the broker; will retry")]
    Unconfirmed(usize),
}

impl From<sqlx::Error> for RelayError {
    fn from(e: sqlx::Error) -> Self {
        Self::Store(StoreError::Database(e))
    }
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
    /// # Errors
    /// Database errors, or [`RelayError::Unconfirmed`] when the broker did not confirm some rows
    /// (those stay and are retried).
    pub async fn flush_once(&self) -> Result<usize, RelayError> {
        let mut tx = self.store.begin().await?;
        let rows = Store::claim_outbox(&mut tx, self.settings.batch_size).await?;
        if rows.is_empty() {
            tx.commit().await?;
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
        let results = join_all(by_task.into_iter().map(|(_, list)| async move {
            let mut sent = Vec::with_capacity(list.len());
            let mut failed = 0;
            for (i, row) in list.iter().enumerate() {
                match self.publisher.publish(&row.envelope).await {
                    Ok(()) => sent.push(row.id),
                    Err(e) => {
                        failed += list.len() - i;
                        warn!(message_id = %row.envelope.message_id, error = %e, "outbox row not published");
                        break;
                    }
                }
            }
            (sent, failed)
        }))
        .await;
        let mut sent = Vec::with_capacity(rows.len());
        let mut failed = 0;
        for (ok, bad) in results {
            sent.extend(ok);
            failed += bad;
        }
        Store::delete_outbox(&mut tx, &sent).await?;
        tx.commit().await?;
        metrics::counter!("video_outbox_published_total").increment(sent.len() as u64);
        if failed > 0 {
            return Err(RelayError::Unconfirmed(failed));
        }
        Ok(sent.len())
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
        let poll = Duration::from_millis(self.settings.poll_interval_ms);
        let mut backoff = Duration::from_millis(100);
        loop {
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
