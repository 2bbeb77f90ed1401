//! Fault 2: RabbitMQ restarted mid-run (`rabbitmqctl stop_app` / `start_app` on this machine's
//! broker). Every instance reconnects, redeclares and resumes; publishes that were not confirmed
//! when the connection dropped are sent again; nothing is lost.

use crate::outage::{outage_run, Dependency};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rabbitmq_restart_mid_run_loses_nothing() {
    outage_run("broker_restart", Dependency::RabbitMq).await;
}
