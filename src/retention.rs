//! Data lifecycle: finished tasks, webhook deliveries, parked messages, tombstones and stale
//! instance rows older than `[retention]` says are removed, oldest first, a bounded batch per
//! statement, by the sweeper role (any number of instances may run it: `SKIP LOCKED`).

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::RetentionSettings;
use crate::store::{Retained, Store, StoreError};

/// Removes what is past its retention (see the module docs).
#[derive(Debug, Clone)]
pub struct RetentionCleaner {
    store: Store,
    settings: RetentionSettings,
}

/// Rounds per rule and cleanup: a backlog larger than this goes on at the next interval, so one
/// cleanup never monopolises the database.
const MAX_BATCHES_PER_RULE: usize = 10;

impl RetentionCleaner {
    /// A cleaner of `store` under `settings`.
    pub fn new(store: Store, settings: RetentionSettings) -> Self {
        Self { store, settings }
    }

    fn keep_for(&self, rule: Retained) -> Option<Duration> {
        let days = match rule {
            Retained::TerminalTasks => self.settings.terminal_tasks_days,
            Retained::WebhookDeliveries => self.settings.webhook_deliveries_days,
            Retained::ParkedMessages => self.settings.parked_messages_days,
            Retained::Tombstones => self.settings.tombstones_days,
            Retained::StaleInstances => self.settings.stale_instances_days,
        };
        (days > 0).then(|| Duration::from_secs(u64::from(days) * 86_400))
    }

    /// One cleanup: each rule removes batches until one comes back short. Returns the rows
    /// removed per rule.
    ///
    /// # Errors
    /// Database errors (what was removed before stays removed).
    pub async fn clean_once(&self) -> Result<Vec<(Retained, u64)>, StoreError> {
        self.clean_older_than(|rule| self.keep_for(rule)).await
    }

    /// [`RetentionCleaner::clean_once`] with the ages given by `keep_for` instead of the
    /// settings (tests use seconds where the settings say days).
    ///
    /// # Errors
    /// Database errors.
    pub async fn clean_older_than(
        &self,
        keep_for: impl Fn(Retained) -> Option<Duration>,
    ) -> Result<Vec<(Retained, u64)>, StoreError> {
        let mut removed = Vec::new();
        for rule in Retained::ALL {
            let Some(age) = keep_for(rule) else {
                continue;
            };
            let mut total = 0;
            for _ in 0..MAX_BATCHES_PER_RULE {
                let n = self
                    .store
                    .remove_expired(rule, age, self.settings.batch_size)
                    .await?;
                total += n;
                metrics::counter!("video_retention_removed_rows_total", "kind" => rule.as_str())
                    .increment(n);
                if n < u64::try_from(self.settings.batch_size).unwrap_or(u64::MAX) {
                    break;
                }
            }
            if total > 0 {
                info!(
                    kind = rule.as_str(),
                    rows = total,
                    "retention: old rows removed"
                );
            }
            removed.push((rule, total));
        }
        Ok(removed)
    }

    /// Cleans every `retention.interval_ms` until `stop`.
    pub async fn run(self, stop: CancellationToken) {
        let every = self.settings.interval();
        loop {
            if let Err(e) = self.clean_once().await {
                warn!(error = %e, "retention cleanup failed; trying again next interval");
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
        }
    }
}
