//! Clean-up of a [`crate::TestEnv`]: the scratch database and the topologies it declared.

use std::time::Duration;

use lapin::{Connection, ConnectionProperties};
use sqlx::Connection as _;
use video_orchestrator::topology::Topology;

/// What clean-up deletes; owned, so it can run on another thread.
#[derive(Debug)]
pub(crate) struct CleanupPlan {
    pub(crate) topologies: Vec<Topology>,
    pub(crate) database_name: String,
    pub(crate) rabbitmq_url: String,
    pub(crate) maintenance_db_url: String,
}

impl CleanupPlan {
    /// Best effort: reports failures on stderr and never panics (it may run while unwinding).
    pub(crate) async fn run(self) {
        let connect = Connection::connect(&self.rabbitmq_url, ConnectionProperties::default());
        match tokio::time::timeout(Duration::from_secs(10), connect).await {
            Ok(Ok(connection)) => {
                for topology in &self.topologies {
                    if let Err(e) = topology.delete(&connection).await {
                        eprintln!("test clean-up: deleting `{}`: {e}", topology.prefix());
                    }
                }
                let _ = connection.close(200, "cleaned up".into()).await;
            }
            Ok(Err(e)) => eprintln!("test clean-up: broker: {e}"),
            Err(_) => eprintln!("test clean-up: broker did not answer"),
        }
        match sqlx::PgConnection::connect(&self.maintenance_db_url).await {
            Ok(mut db) => {
                let drop = format!(
                    r#"DROP DATABASE IF EXISTS "{}" WITH (FORCE)"#,
                    self.database_name
                );
                if let Err(e) = sqlx::query(&drop).execute(&mut db).await {
                    eprintln!("test clean-up: {drop}: {e}");
                }
                let _ = db.close().await;
            }
            Err(e) => eprintln!("test clean-up: database: {e}"),
        }
    }
}

pub(crate) async fn create_database(maintenance_url: &str, name: &str) {
    let mut db = sqlx::PgConnection::connect(maintenance_url)
        .await
        .unwrap_or_else(|e| panic!("cannot reach PostgreSQL (is it running? see .ci/run): {e}"));
    sqlx::query(&format!(r#"CREATE DATABASE "{name}""#))
        .execute(&mut db)
        .await
        .unwrap_or_else(|e| panic!("CREATE DATABASE {name}: {e}"));
    let _ = db.close().await;
}

/// The same server and credentials, another database.
pub(crate) fn with_database(url: &str, database: &str) -> String {
    let mut parsed = url::Url::parse(url).expect("database URL parses");
    parsed.set_path(&format!("/{database}"));
    parsed.to_string()
}
