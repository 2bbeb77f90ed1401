//! API keys: who may read which tenant's tasks over HTTP. The secret itself is never stored, only
//! its SHA-256 (see `crate::auth`).

use chrono::{DateTime, Utc};
use sqlx::Row;

use super::{Store, StoreError};

/// An API key as stored (without its secret).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ApiKeyRecord {
    /// Public identifier (`keys revoke ID`); also the key's first part.
    pub id: String,
    /// The tenant the key acts for.
    pub virtual_key_id: String,
    /// A label for humans.
    pub name: String,
    /// An admin key reads every tenant's tasks.
    pub admin: bool,
    /// SHA-256 of the secret part.
    #[serde(skip)]
    pub secret_sha256: Vec<u8>,
    /// When it was created.
    pub created_at: DateTime<Utc>,
    /// Last successful use, to the minute.
    pub last_used_at: Option<DateTime<Utc>>,
    /// When it was revoked; a revoked key authenticates nobody.
    pub revoked_at: Option<DateTime<Utc>>,
}

impl<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> for ApiKeyRecord {
    fn from_row(r: &'r sqlx::postgres::PgRow) -> Result<Self, sqlx::Error> {
        Ok(Self {
            id: r.try_get("id")?,
            virtual_key_id: r.try_get("virtual_key_id")?,
            name: r.try_get("name")?,
            admin: r.try_get("admin")?,
            secret_sha256: r.try_get("secret_sha256")?,
            created_at: r.try_get("created_at")?,
            last_used_at: r.try_get("last_used_at")?,
            revoked_at: r.try_get("revoked_at")?,
        })
    }
}

impl Store {
    /// Stores a new key; returns the row as written.
    ///
    /// # Errors
    /// Database errors (an id that exists is a unique violation).
    pub async fn insert_api_key(
        &self,
        id: &str,
        virtual_key_id: &str,
        name: &str,
        admin: bool,
        secret_sha256: &[u8],
    ) -> Result<ApiKeyRecord, StoreError> {
        Ok(sqlx::query_as::<_, ApiKeyRecord>(
            "INSERT INTO api_keys (id, virtual_key_id, name, admin, secret_sha256)
             VALUES ($1, $2, $3, $4, $5) RETURNING *",
        )
        .bind(id)
        .bind(virtual_key_id)
        .bind(name)
        .bind(admin)
        .bind(secret_sha256)
        .fetch_one(self.pool())
        .await?)
    }

    /// One key by id, revoked or not.
    ///
    /// # Errors
    /// Database errors.
    pub async fn api_key(&self, id: &str) -> Result<Option<ApiKeyRecord>, StoreError> {
        Ok(
            sqlx::query_as::<_, ApiKeyRecord>("SELECT * FROM api_keys WHERE id = $1")
                .bind(id)
                .fetch_optional(self.pool())
                .await?,
        )
    }

    /// Every key, oldest first.
    ///
    /// # Errors
    /// Database errors.
    pub async fn list_api_keys(&self) -> Result<Vec<ApiKeyRecord>, StoreError> {
        Ok(
            sqlx::query_as::<_, ApiKeyRecord>("SELECT * FROM api_keys ORDER BY created_at, id")
                .fetch_all(self.pool())
                .await?,
        )
    }

    /// Revokes a key; false when there is no such key or it was revoked already.
    ///
    /// # Errors
    /// Database errors.
    pub async fn revoke_api_key(&self, id: &str) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE api_keys SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL",
        )
        .bind(id)
        .execute(self.pool())
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Records a use, at most once a minute per key (a read-heavy client costs no write per call).
    ///
    /// # Errors
    /// Database errors.
    pub async fn touch_api_key(&self, id: &str) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE api_keys SET last_used_at = now()
             WHERE id = $1 AND (last_used_at IS NULL OR last_used_at < now() - interval '1 minute')",
        )
        .bind(id)
        .execute(self.pool())
        .await?;
        Ok(())
    }
}
