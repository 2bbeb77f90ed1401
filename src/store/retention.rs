//! Data lifecycle: what is old enough to go, removed a bounded batch at a time, oldest first,
//! so a cleanup never holds locks long or competes with the service's own statements.

use std::time::Duration;

use super::{Store, StoreError};

/// What a retention rule removes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Retained {
    /// Finished tasks (completed, failed, cancelled, timed out), by `finished_at`; not
    /// tombstones, which have their own rule.
    TerminalTasks,
    /// Webhook deliveries that were delivered or given up, by `created_at`.
    WebhookDeliveries,
    /// Parked messages, by `parked_at`.
    ParkedMessages,
    /// Tombstones left by cancels that came before their request, by `finished_at`.
    Tombstones,
    /// Instance heartbeat rows of instances that stopped beating, by `heartbeat_at`.
    StaleInstances,
}

impl Retained {
    /// Every rule, for metrics that exist from the first scrape.
    pub const ALL: [Retained; 5] = [
        Self::TerminalTasks,
        Self::WebhookDeliveries,
        Self::ParkedMessages,
        Self::Tombstones,
        Self::StaleInstances,
    ];

    /// The `kind` label of `video_retention_removed_rows_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::TerminalTasks => "terminal_tasks",
            Self::WebhookDeliveries => "webhook_deliveries",
            Self::ParkedMessages => "parked_messages",
            Self::Tombstones => "tombstones",
            Self::StaleInstances => "stale_instances",
        }
    }

    fn statement(self) -> &'static str {
        match self {
            Self::TerminalTasks => {
                "DELETE FROM video_tasks WHERE request_id IN (
                     SELECT request_id FROM video_tasks
                     WHERE status NOT IN ('pending', 'processing') AND NOT tombstone
                       AND finished_at < now() - make_interval(secs => $1)
                     ORDER BY finished_at LIMIT $2 FOR UPDATE SKIP LOCKED)"
            }
            Self::WebhookDeliveries => {
                "DELETE FROM webhook_deliveries WHERE id IN (
                     SELECT id FROM webhook_deliveries
                     WHERE (delivered_at IS NOT NULL OR give_up_at < now())
                       AND created_at < now() - make_interval(secs => $1)
                     ORDER BY created_at LIMIT $2 FOR UPDATE SKIP LOCKED)"
            }
            Self::ParkedMessages => {
                "DELETE FROM parked_messages WHERE id IN (
                     SELECT id FROM parked_messages
                     WHERE parked_at < now() - make_interval(secs => $1)
                     ORDER BY parked_at LIMIT $2 FOR UPDATE SKIP LOCKED)"
            }
            Self::Tombstones => {
                "DELETE FROM video_tasks WHERE request_id IN (
                     SELECT request_id FROM video_tasks
                     WHERE tombstone AND finished_at < now() - make_interval(secs => $1)
                     ORDER BY finished_at LIMIT $2 FOR UPDATE SKIP LOCKED)"
            }
            Self::StaleInstances => {
                "DELETE FROM service_instances WHERE (topology_prefix, instance_id) IN (
                     SELECT topology_prefix, instance_id FROM service_instances
                     WHERE heartbeat_at < now() - make_interval(secs => $1)
                     ORDER BY heartbeat_at LIMIT $2 FOR UPDATE SKIP LOCKED)"
            }
        }
    }
}

impl Store {
    /// Removes at most `limit` rows of `what` older than `older_than`; returns how many went.
    ///
    /// # Errors
    /// Database errors.
    pub async fn remove_expired(
        &self,
        what: Retained,
        older_than: Duration,
        limit: i64,
    ) -> Result<u64, StoreError> {
        let done = sqlx::query(what.statement())
            .bind(older_than.as_secs_f64())
            .bind(limit)
            .execute(self.pool())
            .await?;
        Ok(done.rows_affected())
    }
}
