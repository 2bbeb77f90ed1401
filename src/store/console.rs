//! What the operator console reads: tasks across tenants with filters, what is still recorded
//! about one task (outbox rows not yet published, webhook deliveries, parked messages), instances
//! and the partitions they hold, parked messages waiting for an operator.
//!
//! Read-only, and never on a hot path: the console is one operator's browser. The task list
//! sorts on `created_at` without an index of its own (retention keeps the table bounded, and an
//! index there would slow every insert for a page few people open).

use chrono::{DateTime, Utc};
use sqlx::Row;

use super::{ParkedMessage, Store, StoreError, Task, TaskStatus};

/// Which tasks to list.
#[derive(Debug, Clone, Default)]
pub struct TaskFilter {
    /// One tenant (virtual key) only.
    pub virtual_key_id: Option<String>,
    /// One status only.
    pub status: Option<TaskStatus>,
    /// Request ids containing this (case-insensitive).
    pub request_id_contains: Option<String>,
    /// At most this many, newest first.
    pub limit: i64,
}

/// An outbox row still waiting to be published.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PendingOutbox {
    #[allow(missing_docs)]
    pub message_id: String,
    /// The message type (`VideoGenerationProgress`, ...).
    pub message_type: String,
    #[allow(missing_docs)]
    pub routing_key: String,
    /// Failed publishes so far.
    pub attempts: i32,
    #[allow(missing_docs)]
    pub last_error: Option<String>,
    #[allow(missing_docs)]
    pub created_at: DateTime<Utc>,
    #[allow(missing_docs)]
    pub next_attempt_at: DateTime<Utc>,
}

/// A webhook delivery of one of the task's events.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WebhookDelivery {
    #[allow(missing_docs)]
    pub id: i64,
    /// The event's type name.
    pub event_type: String,
    #[allow(missing_docs)]
    pub url: String,
    /// Attempts so far.
    pub attempts: i32,
    #[allow(missing_docs)]
    pub delivered_at: Option<DateTime<Utc>>,
    #[allow(missing_docs)]
    pub last_error: Option<String>,
    #[allow(missing_docs)]
    pub next_attempt_at: DateTime<Utc>,
    #[allow(missing_docs)]
    pub give_up_at: DateTime<Utc>,
    #[allow(missing_docs)]
    pub created_at: DateTime<Utc>,
}

/// An instance of the topology and the partitions whose leases it holds.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct InstanceLeases {
    #[allow(missing_docs)]
    pub instance_id: String,
    /// Its last heartbeat (absent: it holds leases but no longer beats).
    pub heartbeat_at: Option<DateTime<Utc>>,
    /// Seconds since that heartbeat.
    pub heartbeat_age_seconds: Option<f64>,
    /// Partitions whose lease it holds and that has not expired, in order.
    pub partitions: Vec<u16>,
}

/// Who holds which partition of one topology.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LeaseMap {
    /// Instances that beat or hold a lease, in id order.
    pub instances: Vec<InstanceLeases>,
    /// Partitions with a lease row and no live owner.
    pub unowned: Vec<u16>,
}

fn pending_outbox(r: &sqlx::postgres::PgRow) -> Result<PendingOutbox, sqlx::Error> {
    Ok(PendingOutbox {
        message_id: r.try_get("message_id")?,
        message_type: r.try_get("message_type")?,
        routing_key: r.try_get("routing_key")?,
        attempts: r.try_get("attempts")?,
        last_error: r.try_get("last_error")?,
        created_at: r.try_get("created_at")?,
        next_attempt_at: r.try_get("next_attempt_at")?,
    })
}

fn webhook_delivery(r: &sqlx::postgres::PgRow) -> Result<WebhookDelivery, sqlx::Error> {
    Ok(WebhookDelivery {
        id: r.try_get("id")?,
        event_type: r.try_get("event_type")?,
        url: r.try_get("url")?,
        attempts: r.try_get("attempts")?,
        delivered_at: r.try_get("delivered_at")?,
        last_error: r.try_get("last_error")?,
        next_attempt_at: r.try_get("next_attempt_at")?,
        give_up_at: r.try_get("give_up_at")?,
        created_at: r.try_get("created_at")?,
    })
}

impl Store {
    /// Tasks matching `filter`, newest first (tombstones left by early cancels excluded).
    ///
    /// # Errors
    /// Database errors.
    pub async fn console_tasks(&self, filter: &TaskFilter) -> Result<Vec<Task>, StoreError> {
        let pattern = filter.request_id_contains.as_deref().map(|q| {
            let escaped = q
                .replace('\\', "\\\\")
                .replace('%', "\\%")
                .replace('_', "\\_");
            format!("%{escaped}%")
        });
        Ok(sqlx::query_as::<_, Task>(
            "SELECT * FROM video_tasks
             WHERE NOT tombstone
               AND ($1::text IS NULL OR virtual_key_id = $1)
               AND ($2::text IS NULL OR status = $2)
               AND ($3::text IS NULL OR request_id ILIKE $3)
             ORDER BY created_at DESC, request_id LIMIT $4",
        )
        .bind(&filter.virtual_key_id)
        .bind(filter.status.map(TaskStatus::as_str))
        .bind(pattern)
        .bind(filter.limit)
        .fetch_all(&self.pool)
        .await?)
    }

    /// The task's outbox rows not yet published (a published row is deleted), oldest first.
    ///
    /// # Errors
    /// Database errors.
    pub async fn console_pending_outbox(
        &self,
        request_id: &str,
    ) -> Result<Vec<PendingOutbox>, StoreError> {
        let rows = sqlx::query(
            "SELECT message_id, message_type, routing_key, attempts, last_error, created_at, next_attempt_at
             FROM outbox WHERE correlation_id = $1 ORDER BY id",
        )
        .bind(request_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(pending_outbox)
            .collect::<Result<_, _>>()
            .map_err(StoreError::from)
    }

    /// The task's webhook deliveries, oldest first.
    ///
    /// # Errors
    /// Database errors.
    pub async fn console_webhooks(
        &self,
        request_id: &str,
    ) -> Result<Vec<WebhookDelivery>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, event_type, url, attempts, delivered_at, last_error, next_attempt_at, give_up_at, created_at
             FROM webhook_deliveries WHERE request_id = $1 ORDER BY id",
        )
        .bind(request_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(webhook_delivery)
            .collect::<Result<_, _>>()
            .map_err(StoreError::from)
    }

    /// Parked messages whose correlation id is the task's, oldest first.
    ///
    /// # Errors
    /// Database errors.
    pub async fn console_task_parked(
        &self,
        request_id: &str,
    ) -> Result<Vec<ParkedMessage>, StoreError> {
        Ok(sqlx::query_as::<_, ParkedMessage>(
            "SELECT * FROM parked_messages WHERE headers->>'correlationId' = $1 ORDER BY id",
        )
        .bind(request_id)
        .fetch_all(&self.pool)
        .await?)
    }

    /// The most recent parked messages, newest first; those already requeued only when
    /// `include_requeued`.
    ///
    /// # Errors
    /// Database errors.
    pub async fn console_parked(
        &self,
        limit: i64,
        include_requeued: bool,
    ) -> Result<Vec<ParkedMessage>, StoreError> {
        Ok(sqlx::query_as::<_, ParkedMessage>(
            "SELECT * FROM parked_messages WHERE $2 OR requeued_at IS NULL ORDER BY id DESC LIMIT $1",
        )
        .bind(limit)
        .bind(include_requeued)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Parked messages not requeued.
    ///
    /// # Errors
    /// Database errors.
    pub async fn console_parked_waiting(&self) -> Result<i64, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT count(*) FROM parked_messages WHERE requeued_at IS NULL")
                .fetch_one(&self.pool)
                .await?,
        )
    }

    /// Instances of `topology_prefix` and the partitions each holds a live lease on.
    ///
    /// # Errors
    /// Database errors.
    pub async fn console_leases(&self, topology_prefix: &str) -> Result<LeaseMap, StoreError> {
        let instances = sqlx::query(
            "SELECT instance_id, heartbeat_at,
                    EXTRACT(EPOCH FROM now() - heartbeat_at)::float8 AS age
             FROM service_instances WHERE topology_prefix = $1 ORDER BY instance_id",
        )
        .bind(topology_prefix)
        .fetch_all(&self.pool)
        .await?;
        let leases = sqlx::query(
            "SELECT partition, CASE WHEN expires_at > now() THEN owner END AS owner
             FROM partition_leases WHERE topology_prefix = $1 ORDER BY partition",
        )
        .bind(topology_prefix)
        .fetch_all(&self.pool)
        .await?;
        let mut map = LeaseMap {
            instances: Vec::new(),
            unowned: Vec::new(),
        };
        for r in &instances {
            map.instances.push(InstanceLeases {
                instance_id: r.try_get("instance_id")?,
                heartbeat_at: r.try_get("heartbeat_at")?,
                heartbeat_age_seconds: r.try_get("age")?,
                partitions: Vec::new(),
            });
        }
        for r in &leases {
            let partition: i32 = r.try_get("partition")?;
            let Ok(partition) = u16::try_from(partition) else {
                continue;
            };
            let owner: Option<String> = r.try_get("owner")?;
            let Some(owner) = owner else {
                map.unowned.push(partition);
                continue;
            };
            match map.instances.iter_mut().find(|i| i.instance_id == owner) {
                Some(instance) => instance.partitions.push(partition),
                None => map.instances.push(InstanceLeases {
                    instance_id: owner,
                    heartbeat_at: None,
                    heartbeat_age_seconds: None,
                    partitions: vec![partition],
                }),
            }
        }
        map.instances
            .sort_by(|a, b| a.instance_id.cmp(&b.instance_id));
        Ok(map)
    }
}
