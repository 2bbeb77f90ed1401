//! Scratch databases beside the configured one: the demo and the bench each run in a database of
//! their own, created at start and dropped at the end, so they never touch real tasks.

use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use sqlx::{Connection as _, PgConnection};

use super::{connect_options, StoreError};
use crate::config::DatabaseSettings;

/// A database created next to the configured one; [`ScratchDatabase::remove`] removes it.
#[derive(Debug)]
pub struct ScratchDatabase {
    settings: DatabaseSettings,
    name: String,
}

impl ScratchDatabase {
    /// True when the configured server accepts a connection within `timeout`.
    pub async fn server_answers(settings: &DatabaseSettings, timeout: Duration) -> bool {
        let Ok(opts) = connect_options(settings) else {
            return false;
        };
        match tokio::time::timeout(timeout, PgConnection::connect_with(&opts)).await {
            Ok(Ok(c)) => {
                let _ = c.close().await;
                true
            }
            _ => false,
        }
    }

    /// Creates the database `name` on the configured server.
    ///
    /// # Errors
    /// When the server is unreachable or refuses (the name exists, no privilege).
    pub async fn create(settings: &DatabaseSettings, name: &str) -> Result<Self, StoreError> {
        let mut conn = PgConnection::connect_with(&connect_options(settings)?).await?;
        sqlx::query(&format!(r#"CREATE DATABASE "{name}""#))
            .execute(&mut conn)
            .await?;
        let _ = conn.close().await;
        Ok(Self {
            settings: settings.clone(),
            name: name.to_owned(),
        })
    }

    /// The database's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The configured URL with this database's name in its path.
    ///
    /// # Errors
    /// When the configured URL does not parse.
    pub fn url(&self) -> Result<SecretString, StoreError> {
        let mut url = url::Url::parse(self.settings.url.expose_secret())
            .map_err(|e| StoreError::Corrupt(format!("database.url is not a URL: {e}")))?;
        url.set_path(&format!("/{}", self.name));
        Ok(SecretString::from(url.to_string()))
    }

    /// Drops the database, disconnecting whoever is still in it; best effort (a server that is
    /// gone keeps it, and the next run uses a new name).
    pub async fn remove(&self) {
        let Ok(opts) = connect_options(&self.settings) else {
            return;
        };
        if let Ok(mut conn) = PgConnection::connect_with(&opts).await {
            let _ = sqlx::query(&format!(
                r#"DROP DATABASE IF EXISTS "{}" WITH (FORCE)"#,
                self.name
            ))
            .execute(&mut conn)
            .await;
            let _ = conn.close().await;
        }
    }
}
