//! Fault 3: PostgreSQL restarted mid-run (`pg_ctlcluster … stop` / `start`). Readiness goes
//! false, consumers return what they could not do to the queue instead of acknowledging it,
//! and everything resumes when the database is back; nothing is lost.

use crate::outage::{outage_run, Dependency};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgresql_restart_mid_run_loses_nothing() {
    outage_run("db_restart", Dependency::PostgreSql).await;
}
