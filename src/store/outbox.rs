//! The transactional outbox: messages written in the transaction that caused them, published
//! by the relay, deleted once the broker confirmed them.

use sqlx::Row;

use super::{Store, StoreError, UnitOfWork};
use crate::messages::Envelope;

/// A claimed outbox row.
#[derive(Debug, Clone)]
pub struct OutboxRow {
    /// Row id.
    pub id: i64,
    /// Failed publishes so far.
    pub attempts: i32,
    /// The message.
    pub envelope: Envelope,
}

impl UnitOfWork {
    /// Writes a message to the outbox inside the caller's transaction.
    ///
    /// # Errors
    /// Database errors.
    pub async fn enqueue(&mut self, envelope: &Envelope) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO outbox (message_id, exchange, routing_key, message_type, correlation_id,
                 virtual_key, traceparent, mandatory, body)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(&envelope.message_id)
        .bind(&envelope.exchange)
        .bind(&envelope.routing_key)
        .bind(&envelope.message_type)
        .bind(&envelope.correlation_id)
        .bind(&envelope.virtual_key)
        .bind(&envelope.traceparent)
        .bind(envelope.mandatory)
        .bind(&envelope.body)
        .execute(self.conn())
        .await?;
        Ok(())
    }

    /// Locks up to `limit` unsent outbox rows, oldest first, skipping rows another relay holds.
    ///
    /// # Errors
    /// Database errors.
    pub async fn claim_outbox(&mut self, limit: i64) -> Result<Vec<OutboxRow>, StoreError> {
        // Due rows, unless an earlier row of the same task waits after a failure.
        let rows = sqlx::query(
            "SELECT * FROM outbox o
             WHERE o.next_attempt_at <= now()
               AND NOT EXISTS (SELECT 1 FROM outbox w
                               WHERE w.correlation_id = o.correlation_id AND w.id < o.id
                                 AND w.next_attempt_at > now())
             ORDER BY o.id LIMIT $1 FOR UPDATE OF o SKIP LOCKED",
        )
        .bind(limit)
        .fetch_all(self.conn())
        .await?;
        rows.into_iter()
            .map(|r| {
                Ok(OutboxRow {
                    id: r.try_get("id")?,
                    attempts: r.try_get("attempts")?,
                    envelope: Envelope {
                        exchange: r.try_get("exchange")?,
                        routing_key: r.try_get("routing_key")?,
                        body: r.try_get("body")?,
                        content_type: None,
                        message_id: r.try_get("message_id")?,
                        message_type: r.try_get("message_type")?,
                        correlation_id: r.try_get("correlation_id")?,
                        virtual_key: r.try_get("virtual_key")?,
                        traceparent: r.try_get("traceparent")?,
                        extra_headers: Vec::new(),
                        mandatory: r.try_get("mandatory")?,
                    },
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(StoreError::from)
    }

    /// Removes sent outbox rows.
    ///
    /// # Errors
    /// Database errors.
    pub async fn delete_outbox(&mut self, ids: &[i64]) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM outbox WHERE id = ANY($1)")
            .bind(ids)
            .execute(self.conn())
            .await?;
        Ok(())
    }

    /// Puts a row that failed to publish back for `delay`, with the error.
    ///
    /// # Errors
    /// Database errors.
    pub async fn defer_outbox(
        &mut self,
        id: i64,
        error: &str,
        delay: std::time::Duration,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE outbox SET attempts = attempts + 1, last_error = $2,
                 next_attempt_at = now() + make_interval(secs => $3)
             WHERE id = $1",
        )
        .bind(id)
        .bind(error)
        .bind(delay.as_secs_f64())
        .execute(self.conn())
        .await?;
        Ok(())
    }

    /// Moves an outbox row that can never be published into `parked_messages`, with the reason.
    ///
    /// # Errors
    /// Database errors.
    pub async fn park_outbox(&mut self, row: &OutboxRow, reason: &str) -> Result<(), StoreError> {
        let e = &row.envelope;
        // The layout a delivery parked by a consumer gets, so `parked --requeue` restores both.
        let headers = e.recorded_properties();
        sqlx::query(
            "INSERT INTO parked_messages
                 (message_id, original_queue, original_exchange, routing_key, reason, headers, body)
             VALUES ($1, 'outbox', $2, $3, $4, $5, $6)",
        )
        .bind(&e.message_id)
        .bind(&e.exchange)
        .bind(&e.routing_key)
        .bind(reason)
        .bind(headers)
        .bind(&e.body)
        .execute(self.conn())
        .await?;
        sqlx::query("DELETE FROM outbox WHERE id = $1")
            .bind(row.id)
            .execute(self.conn())
            .await?;
        Ok(())
    }
}

impl Store {
    /// Age of the oldest row in the outbox, in seconds (0 when empty).
    ///
    /// # Errors
    /// Database errors.
    pub async fn outbox_oldest_age_seconds(&self) -> Result<f64, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT COALESCE(EXTRACT(EPOCH FROM now() - min(created_at))::float8, 0) FROM outbox",
        )
        .fetch_one(&self.pool)
        .await?)
    }

    /// Rows waiting in the outbox.
    ///
    /// # Errors
    /// Database errors.
    pub async fn outbox_len(&self) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar("SELECT count(*) FROM outbox")
            .fetch_one(&self.pool)
            .await?)
    }
}
