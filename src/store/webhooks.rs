//! Webhook deliveries: rows written with the event they carry, claimed by any instance's
//! dispatcher, retried until delivered or past their give-up time.

use std::time::Duration;

use sqlx::Row;

use super::{Store, StoreError, UnitOfWork};
use crate::messages::Envelope;

/// A delivery claimed for sending.
#[derive(Debug, Clone)]
pub struct DueWebhook {
    /// Row id, for [`Store::mark_webhook_delivered`] and [`Store::defer_webhook`].
    pub id: i64,
    /// The event's `messageId` (sent as `X-Webhook-Id`, so receivers de-duplicate).
    pub message_id: String,
    /// The event's type name (`X-Webhook-Event`).
    pub event_type: String,
    /// Where to POST.
    pub url: String,
    /// The event's JSON body.
    pub body: Vec<u8>,
    /// Attempts including this one.
    pub attempts: i32,
    /// The tenant whose secrets sign it (absent on rows written before per-tenant secrets).
    pub virtual_key_id: Option<String>,
}

impl UnitOfWork {
    /// Records a delivery of `event` to `url`, given up `give_up_after` from now.
    ///
    /// # Errors
    /// Database errors.
    pub async fn enqueue_webhook(
        &mut self,
        request_id: &str,
        url: &str,
        event: &Envelope,
        give_up_after: Duration,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO webhook_deliveries (request_id, message_id, event_type, url, body, give_up_at,
                 virtual_key_id)
             VALUES ($1, $2, $3, $4, $5, now() + make_interval(secs => $6), $7)",
        )
        .bind(request_id)
        .bind(&event.message_id)
        .bind(&event.message_type)
        .bind(url)
        .bind(&event.body)
        .bind(give_up_after.as_secs_f64())
        .bind(&event.virtual_key)
        .execute(self.conn())
        .await?;
        Ok(())
    }
}

impl Store {
    /// Claims up to `limit` due deliveries, counting an attempt on each. Claiming pushes
    /// `next_attempt_at` forward by `lease`, which leases the row to this dispatcher: no other
    /// instance sends it meanwhile.
    ///
    /// # Errors
    /// Database errors.
    pub async fn claim_due_webhooks(
        &self,
        lease: Duration,
        limit: i64,
    ) -> Result<Vec<DueWebhook>, StoreError> {
        let rows = sqlx::query(
            "UPDATE webhook_deliveries SET attempts = attempts + 1,
                 next_attempt_at = now() + make_interval(secs => $1)
             WHERE id IN (SELECT id FROM webhook_deliveries
                          WHERE delivered_at IS NULL AND next_attempt_at <= now() AND give_up_at > now()
                          ORDER BY next_attempt_at LIMIT $2 FOR UPDATE SKIP LOCKED)
             RETURNING id, message_id, event_type, url, body, attempts, virtual_key_id",
        )
        .bind(lease.as_secs_f64())
        .bind(limit)
        .fetch_all(self.pool())
        .await?;
        rows.into_iter()
            .map(|r| {
                Ok(DueWebhook {
                    id: r.try_get("id")?,
                    message_id: r.try_get("message_id")?,
                    event_type: r.try_get("event_type")?,
                    url: r.try_get("url")?,
                    body: r.try_get("body")?,
                    attempts: r.try_get("attempts")?,
                    virtual_key_id: r.try_get("virtual_key_id")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(StoreError::from)
    }

    /// Marks a delivery done.
    ///
    /// # Errors
    /// Database errors.
    pub async fn mark_webhook_delivered(&self, id: i64) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE webhook_deliveries SET delivered_at = now(), last_error = NULL WHERE id = $1",
        )
        .bind(id)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Records a failed attempt and when to try again.
    ///
    /// # Errors
    /// Database errors.
    pub async fn defer_webhook(
        &self,
        id: i64,
        error: &str,
        retry_in: Duration,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE webhook_deliveries SET last_error = $2,
                 next_attempt_at = now() + make_interval(secs => $3)
             WHERE id = $1",
        )
        .bind(id)
        .bind(error)
        .bind(retry_in.as_secs_f64())
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Adds a signing secret for `virtual_key_id`; the tenant's earlier secrets keep signing for
    /// `overlap` more (zero: they stop at once).
    ///
    /// # Errors
    /// Database errors.
    pub async fn add_webhook_secret(
        &self,
        virtual_key_id: &str,
        secret: &str,
        overlap: Duration,
    ) -> Result<(), StoreError> {
        let mut uow = self.begin().await?;
        sqlx::query(
            "UPDATE webhook_secrets SET expires_at = now() + make_interval(secs => $2)
             WHERE virtual_key_id = $1 AND (expires_at IS NULL OR expires_at > now() + make_interval(secs => $2))",
        )
        .bind(virtual_key_id)
        .bind(overlap.as_secs_f64())
        .execute(uow.conn())
        .await?;
        sqlx::query("INSERT INTO webhook_secrets (virtual_key_id, secret) VALUES ($1, $2)")
            .bind(virtual_key_id)
            .bind(secret)
            .execute(uow.conn())
            .await?;
        uow.commit().await
    }

    /// The tenant's secrets that sign now, newest first.
    ///
    /// # Errors
    /// Database errors.
    pub async fn live_webhook_secrets(
        &self,
        virtual_key_id: &str,
    ) -> Result<Vec<String>, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT secret FROM webhook_secrets
             WHERE virtual_key_id = $1 AND (expires_at IS NULL OR expires_at > now())
             ORDER BY created_at DESC, id DESC",
        )
        .bind(virtual_key_id)
        .fetch_all(self.pool())
        .await?)
    }
}
