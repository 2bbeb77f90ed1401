//! Partition leases and instance heartbeats (see `crate::partitions` for the balancing they
//! serve). Every statement is scoped to one topology prefix, so test runs and deployments that
//! share a database never see each other's leases.

use std::time::Duration;

use sqlx::Row;

use super::{Store, StoreError};

/// Whose leases: one instance of one topology.
#[derive(Debug, Clone)]
pub struct LeaseScope {
    /// The topology prefix the partitions belong to.
    pub topology_prefix: String,
    /// The instance holding leases (unique per process).
    pub instance_id: String,
}

fn partitions(rows: &[sqlx::postgres::PgRow]) -> Vec<u16> {
    rows.iter()
        .filter_map(|r| r.try_get::<i32, _>("partition").ok())
        .filter_map(|p| u16::try_from(p).ok())
        .collect()
}

impl Store {
    /// Creates a lease row for each of `count` partitions (idempotent).
    ///
    /// # Errors
    /// Database errors.
    pub async fn seed_leases(&self, scope: &LeaseScope, count: u16) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO partition_leases (topology_prefix, partition)
             SELECT $1, g FROM generate_series(0, $2 - 1) g ON CONFLICT DO NOTHING",
        )
        .bind(&scope.topology_prefix)
        .bind(i32::from(count))
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Records this instance's heartbeat and returns the ids of the instances that beat within
    /// `ttl`, in id order (this one included).
    ///
    /// # Errors
    /// Database errors.
    pub async fn heartbeat_instance(
        &self,
        scope: &LeaseScope,
        ttl: Duration,
    ) -> Result<Vec<String>, StoreError> {
        sqlx::query(
            "INSERT INTO service_instances (topology_prefix, instance_id, heartbeat_at) VALUES ($1, $2, now())
             ON CONFLICT (topology_prefix, instance_id) DO UPDATE SET heartbeat_at = now()",
        )
        .bind(&scope.topology_prefix)
        .bind(&scope.instance_id)
        .execute(self.pool())
        .await?;
        Ok(sqlx::query_scalar(
            "SELECT instance_id FROM service_instances
             WHERE topology_prefix = $1 AND heartbeat_at > now() - make_interval(secs => $2)
             ORDER BY instance_id",
        )
        .bind(&scope.topology_prefix)
        .bind(ttl.as_secs_f64())
        .fetch_all(self.pool())
        .await?)
    }

    /// Extends every lease this instance holds by `ttl`; returns those partitions.
    ///
    /// # Errors
    /// Database errors.
    pub async fn renew_leases(
        &self,
        scope: &LeaseScope,
        ttl: Duration,
    ) -> Result<Vec<u16>, StoreError> {
        let rows = sqlx::query(
            "UPDATE partition_leases SET expires_at = now() + make_interval(secs => $3)
             WHERE topology_prefix = $1 AND owner = $2 RETURNING partition",
        )
        .bind(&scope.topology_prefix)
        .bind(&scope.instance_id)
        .bind(ttl.as_secs_f64())
        .fetch_all(self.pool())
        .await?;
        Ok(partitions(&rows))
    }

    /// Takes up to `want` free or expired leases among partitions `0..count`, lowest first;
    /// returns those taken. `SKIP LOCKED` lets two instances take different ones at once.
    ///
    /// # Errors
    /// Database errors.
    pub async fn take_free_leases(
        &self,
        scope: &LeaseScope,
        ttl: Duration,
        want: usize,
        count: u16,
    ) -> Result<Vec<u16>, StoreError> {
        let rows = sqlx::query(
            "UPDATE partition_leases SET owner = $2, expires_at = now() + make_interval(secs => $3)
             WHERE topology_prefix = $1 AND partition IN (
                 SELECT partition FROM partition_leases
                 WHERE topology_prefix = $1 AND partition < $5
                   AND (owner IS NULL OR expires_at < now())
                 ORDER BY partition LIMIT $4 FOR UPDATE SKIP LOCKED)
             RETURNING partition",
        )
        .bind(&scope.topology_prefix)
        .bind(&scope.instance_id)
        .bind(ttl.as_secs_f64())
        .bind(i64::try_from(want).unwrap_or(0))
        .bind(i32::from(count))
        .fetch_all(self.pool())
        .await?;
        Ok(partitions(&rows))
    }

    /// Gives a lease back at once (expired, so another instance takes it on its next beat).
    ///
    /// # Errors
    /// Database errors.
    pub async fn release_lease(
        &self,
        scope: &LeaseScope,
        partition: u16,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE partition_leases SET owner = NULL, expires_at = 'epoch'
             WHERE topology_prefix = $1 AND partition = $2 AND owner = $3",
        )
        .bind(&scope.topology_prefix)
        .bind(i32::from(partition))
        .bind(&scope.instance_id)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Forgets this instance's heartbeat (at shutdown), so the others rebalance without waiting
    /// for it to expire.
    ///
    /// # Errors
    /// Database errors.
    pub async fn remove_instance(&self, scope: &LeaseScope) -> Result<(), StoreError> {
        sqlx::query(
            "DELETE FROM service_instances WHERE topology_prefix = $1 AND instance_id = $2",
        )
        .bind(&scope.topology_prefix)
        .bind(&scope.instance_id)
        .execute(self.pool())
        .await?;
        Ok(())
    }
}
