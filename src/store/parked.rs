//! Parked messages: what could never be processed, with the reason, until an operator requeues it.

use chrono::{DateTime, Utc};
use sqlx::Row;

use super::{Store, StoreError};

/// A parked message as recorded in `parked_messages`.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ParkedMessage {
    /// Row id (`parked --requeue ID`).
    pub id: i64,
    #[allow(missing_docs)]
    pub message_id: Option<String>,
    /// The queue it was consumed from.
    pub original_queue: String,
    /// The exchange it was published to (empty: the default exchange).
    pub original_exchange: String,
    #[allow(missing_docs)]
    pub routing_key: String,
    #[allow(missing_docs)]
    pub reason: String,
    /// Its AMQP properties and headers.
    pub headers: serde_json::Value,
    /// The body, as it arrived.
    #[serde(skip)]
    pub body: Vec<u8>,
    #[allow(missing_docs)]
    pub parked_at: DateTime<Utc>,
    #[allow(missing_docs)]
    pub requeued_at: Option<DateTime<Utc>>,
}

impl<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> for ParkedMessage {
    fn from_row(r: &'r sqlx::postgres::PgRow) -> Result<Self, sqlx::Error> {
        Ok(Self {
            id: r.try_get("id")?,
            message_id: r.try_get("message_id")?,
            original_queue: r.try_get("original_queue")?,
            original_exchange: r.try_get("original_exchange")?,
            routing_key: r.try_get("routing_key")?,
            reason: r.try_get("reason")?,
            headers: r.try_get("headers")?,
            body: r.try_get("body")?,
            parked_at: r.try_get("parked_at")?,
            requeued_at: r.try_get("requeued_at")?,
        })
    }
}

impl Store {
    /// Records a parked message; returns its id.
    ///
    /// # Errors
    /// Database errors.
    pub async fn record_parked(&self, parked: &ParkedMessage) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar(
            "INSERT INTO parked_messages (message_id, original_queue, original_exchange, routing_key, reason, headers, body)
             VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
        )
        .bind(&parked.message_id)
        .bind(&parked.original_queue)
        .bind(&parked.original_exchange)
        .bind(&parked.routing_key)
        .bind(&parked.reason)
        .bind(&parked.headers)
        .bind(&parked.body)
        .fetch_one(&self.pool)
        .await?)
    }

    /// The most recent parked messages, newest first.
    ///
    /// # Errors
    /// Database errors.
    pub async fn list_parked(&self, limit: i64) -> Result<Vec<ParkedMessage>, StoreError> {
        Ok(sqlx::query_as::<_, ParkedMessage>(
            "SELECT * FROM parked_messages ORDER BY id DESC LIMIT $1",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }

    /// One parked message.
    ///
    /// # Errors
    /// Database errors.
    pub async fn get_parked(&self, id: i64) -> Result<Option<ParkedMessage>, StoreError> {
        Ok(
            sqlx::query_as::<_, ParkedMessage>("SELECT * FROM parked_messages WHERE id = $1")
                .bind(id)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    /// Marks a parked message as requeued.
    ///
    /// # Errors
    /// Database errors.
    pub async fn mark_requeued(&self, id: i64) -> Result<(), StoreError> {
        sqlx::query("UPDATE parked_messages SET requeued_at = now() WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}
