//! PostgreSQL: every SQL statement and every transaction of the service lives here, one file per
//! aggregate: [`tasks`](Store::get) (lifecycle rows), the transactional outbox, progress checks,
//! parked messages, partition leases, webhook deliveries, and scratch databases for the demo
//! and the bench.
//!
//! Every lifecycle transition is a compare-and-set in one statement, so a terminal state never
//! changes again whatever instance races. The tracker's `check_sequence` only moves forward, by
//! one conditional UPDATE that exactly one check can win. Callers never see sqlx types: they get
//! domain methods on [`Store`] and, for several statements that must commit together, a
//! [`UnitOfWork`].

mod api_keys;
mod bench;
mod checks;
mod console;
mod leases;
mod outbox;
mod parked;
mod retention;
mod scratch;
mod task;
mod tasks;
mod unit_of_work;
mod webhooks;

use std::sync::Arc;

use secrecy::ExposeSecret;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

use crate::config::DatabaseSettings;

pub use api_keys::ApiKeyRecord;
pub use bench::RecordedChecks;
pub use checks::CheckAdvance;
use checks::CheckBatches;
pub use console::{InstanceLeases, LeaseMap, PendingOutbox, TaskFilter, WebhookDelivery};
pub use leases::LeaseScope;
pub use outbox::OutboxRow;
pub use parked::ParkedMessage;
pub use retention::Retained;
pub use scratch::ScratchDatabase;
pub use task::{Inserted, NewTask, Task, TaskStatus, TaskView, TransitionPatch};
pub use unit_of_work::UnitOfWork;
pub use webhooks::DueWebhook;

/// Embedded migrations, run at start.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Database failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be reached or answered with an error.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// Migrations failed.
    #[error("database migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A row holds a value this build does not know.
    #[error("database row: {0}")]
    Corrupt(String),
    /// A batched statement (several checks' reads or writes in one) failed, or the caller that
    /// ran it was cancelled.
    #[error("database (batched): {0}")]
    Batch(String),
}

impl StoreError {
    /// True when the same statement may work later: the database is unreachable, restarting,
    /// overloaded, or lost a serialisation race. False for what it will never accept: data
    /// exceptions (SQLSTATE class 22, e.g. `0x00` in text), integrity violations (23) and
    /// statements this build got wrong (42); retrying those would only loop.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Database(e) => match e {
                sqlx::Error::Database(db) => {
                    let code = db.code();
                    let class = code.as_deref().map(|c| &c[..c.len().min(2)]);
                    !matches!(class, Some("22" | "23" | "42" | "0A" | "2B" | "44"))
                }
                sqlx::Error::Io(_)
                | sqlx::Error::Tls(_)
                | sqlx::Error::Protocol(_)
                | sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::WorkerCrashed
                | sqlx::Error::BeginFailed => true,
                _ => false,
            },
            Self::Migrate(_) | Self::Batch(_) => true,
            Self::Corrupt(_) => false,
        }
    }
}

/// The database handle. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    pool: PgPool,
    checks: Arc<CheckBatches>,
}

/// Connect options from a settings URL.
///
/// # Errors
/// When the URL does not parse.
pub fn connect_options(settings: &DatabaseSettings) -> Result<PgConnectOptions, StoreError> {
    settings
        .url
        .expose_secret()
        .parse::<PgConnectOptions>()
        .map_err(StoreError::Database)
}

impl Store {
    /// Connects and runs the embedded migrations.
    ///
    /// # Errors
    /// When the database is unreachable or a migration fails.
    pub async fn connect(settings: &DatabaseSettings) -> Result<Self, StoreError> {
        let pool = PgPoolOptions::new()
            .max_connections(settings.max_connections)
            .acquire_timeout(settings.acquire_timeout())
            // sqlx already pings every connection as it goes back to the pool; a second ping on
            // acquire added one more round trip to every query (a third of the database work of
            // a progress check, see BENCHMARKS.md). A connection that died while idle fails its
            // query, which every caller already handles as a database error.
            .test_before_acquire(false)
            .connect_with(connect_options(settings)?)
            .await?;
        MIGRATOR.run(&pool).await?;
        Ok(Self::from_pool(pool))
    }

    /// Wraps an existing pool (migrations must have run).
    pub fn from_pool(pool: PgPool) -> Self {
        Self {
            pool,
            checks: Arc::new(CheckBatches::new()),
        }
    }

    /// The connection pool, for tests and audits that read the tables directly; the service
    /// itself goes through the methods of this module.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// True when a trivial query answers.
    pub async fn ping(&self) -> bool {
        sqlx::query("SELECT 1").execute(&self.pool).await.is_ok()
    }

    /// Starts a unit of work: statements that commit together or not at all. Dropping it
    /// without [`UnitOfWork::commit`] rolls back.
    ///
    /// # Errors
    /// Database errors.
    pub async fn begin(&self) -> Result<UnitOfWork, StoreError> {
        Ok(UnitOfWork::new(self.pool.begin().await?))
    }

    /// Closes every connection (at shutdown, after the last user is done).
    pub async fn close(&self) {
        self.pool.close().await;
    }
}
