//! A unit of work: several statements that commit together (a lifecycle transition and the
//! outbox rows and webhook deliveries it causes, or an outbox batch and its bookkeeping).

use sqlx::{PgConnection, Postgres, Transaction};

use super::StoreError;

/// An open transaction. Its statements are the methods in the aggregate files (`tasks`,
/// `outbox`, `webhooks`); nothing of it is visible until [`UnitOfWork::commit`], and dropping it
/// rolls back.
#[derive(Debug)]
pub struct UnitOfWork {
    tx: Transaction<'static, Postgres>,
}

impl UnitOfWork {
    pub(super) fn new(tx: Transaction<'static, Postgres>) -> Self {
        Self { tx }
    }

    pub(super) fn conn(&mut self) -> &mut PgConnection {
        &mut self.tx
    }

    /// Makes every statement of the unit durable at once.
    ///
    /// # Errors
    /// Database errors (nothing of the unit is kept then).
    pub async fn commit(self) -> Result<(), StoreError> {
        Ok(self.tx.commit().await?)
    }

    /// Discards every statement of the unit.
    ///
    /// # Errors
    /// Database errors (the server discards the work anyway when the connection ends).
    pub async fn rollback(self) -> Result<(), StoreError> {
        Ok(self.tx.rollback().await?)
    }
}
