//! [`TestEnv`]: every test gets its own topology prefix on the real broker and its own database
//! on the real PostgreSQL. The database URL of the settings names the maintenance database: each
//! test creates `vo_test_<hex>` next to it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Confirmation, Connection, ConnectionProperties};
use secrecy::ExposeSecret;
use video_orchestrator::broker::{Broker, BrokerOptions};
use video_orchestrator::config::Settings;
use video_orchestrator::store::Store;
use video_orchestrator::topology::Topology;

use crate::events::EventCollector;
use crate::scratch::{create_database, with_database, CleanupPlan};
/// A fresh topology prefix and a fresh database on the real services.
#[derive(Debug)]
pub struct TestEnv {
    /// `t-<8 hex>.`, prepended to every exchange and queue of this test.
    pub prefix: String,
    /// `vo_test_<hex>`, dropped at clean-up.
    pub database_name: String,
    /// The service's settings: real defaults, this test's prefix and database, overrides.
    pub settings: Settings,
    /// Connected to this test's database, migrations run.
    pub store: Store,
    /// A raw broker connection for inspecting queues (not the service's own).
    pub connection: Arc<Connection>,
    /// Topologies other than [`TestEnv::topology`] that a test declared (deleted at clean-up).
    extra_topologies: Mutex<Vec<Topology>>,
    rabbitmq_url: String,
    maintenance_db_url: String,
    cleaned_up: bool,
}

impl TestEnv {
    /// A fresh environment with the default configuration.
    pub async fn new() -> TestEnv {
        Self::with_env(&[]).await
    }

    /// A fresh environment with extra `APP__…` overrides, e.g.
    /// `[("APP__TOPOLOGY__PARTITIONS", "4")]`.
    ///
    /// # Panics
    /// When the broker or the database cannot be reached (run `.ci/run`, or start them).
    pub async fn with_env(vars: &[(&str, &str)]) -> TestEnv {
        video_orchestrator::telemetry::init_for_tests();
        let defaults = Settings::load_from(&[]).expect("the default configuration loads");
        let rabbitmq_url = std::env::var("APP__RABBITMQ__URL")
            .unwrap_or_else(|_| defaults.rabbitmq.url.expose_secret().to_owned());
        let maintenance_db_url = std::env::var("APP__DATABASE__URL")
            .unwrap_or_else(|_| defaults.database.url.expose_secret().to_owned());

        let hex = uuid::Uuid::new_v4().simple().to_string();
        let prefix = format!("t-{}.", &hex[..8]);
        let database_name = format!("vo_test_{hex}");
        create_database(&maintenance_db_url, &database_name).await;
        let database_url = with_database(&maintenance_db_url, &database_name);

        let mut all: Vec<(String, String)> = vec![
            ("APP__TOPOLOGY__PREFIX".into(), prefix.clone()),
            ("APP__DATABASE__URL".into(), database_url),
            ("APP__RABBITMQ__URL".into(), rabbitmq_url.clone()),
        ];
        all.extend(vars.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
        let settings = Settings::load_from(&all).expect("test settings are valid");

        let store = Store::connect(&settings.database)
            .await
            .expect("connect to the test database and run migrations");
        let connection = Connection::connect(
            &rabbitmq_url,
            ConnectionProperties::default()
                .with_connection_name(format!("vo-test {prefix}").as_str().into()),
        )
        .await
        .unwrap_or_else(|e| panic!("cannot reach RabbitMQ (is it running? see .ci/run): {e}"));

        TestEnv {
            prefix,
            database_name,
            settings,
            store,
            connection: Arc::new(connection),
            extra_topologies: Mutex::new(Vec::new()),
            rabbitmq_url,
            maintenance_db_url,
            cleaned_up: false,
        }
    }

    /// This test's topology (prefix, partitions and tiers from its settings).
    pub fn topology(&self) -> Topology {
        Topology::from_settings(&self.settings)
    }

    /// The broker URL the test uses.
    pub fn rabbitmq_url(&self) -> &str {
        &self.rabbitmq_url
    }

    /// The `APP__…` variables that put a child process of the binary on this test's prefix,
    /// database and broker (they override whatever settings come before them).
    pub fn child_vars(&self) -> Vec<(String, String)> {
        vec![
            ("APP__TOPOLOGY__PREFIX".into(), self.prefix.clone()),
            (
                "APP__DATABASE__URL".into(),
                self.settings.database.url.expose_secret().to_owned(),
            ),
            ("APP__RABBITMQ__URL".into(), self.rabbitmq_url.clone()),
        ]
    }

    /// Remembers another topology a test declares, so clean-up deletes it too.
    pub fn adopt(&self, topology: &Topology) {
        self.extra_topologies
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(topology.clone());
    }

    /// The service's broker on this test's topology (declared by connecting). Its connection
    /// closes when the last handle is dropped.
    ///
    /// # Panics
    /// When it cannot connect or declare.
    pub async fn broker(&self) -> Arc<Broker> {
        Broker::connect(
            BrokerOptions::from_settings(&self.settings),
            self.topology(),
        )
        .await
        .expect("broker connects and declares the test topology")
    }

    /// Starts collecting every message published to this test's `video.events` (declaring the
    /// topology first).
    ///
    /// # Panics
    /// On broker errors.
    pub async fn events(&self) -> EventCollector {
        self.topology()
            .declare(&self.connection)
            .await
            .expect("declare the test topology");
        EventCollector::start(&self.connection, &self.topology().events_exchange()).await
    }

    /// Consumes `queue` for `window`, acks everything that arrived and returns it.
    ///
    /// A consumer rather than `basic.get`, which single-active-consumer quorum queues refuse.
    /// While another consumer is active on a single-active-consumer queue this sees nothing.
    ///
    /// # Panics
    /// On broker errors (a missing queue included).
    pub async fn drain_queue(&self, queue: &str, window: Duration) -> Vec<Delivery> {
        let channel = self.connection.create_channel().await.expect("channel");
        channel
            .basic_qos(1000, BasicQosOptions::default())
            .await
            .expect("qos");
        let mut consumer = channel
            .basic_consume(
                queue.into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap_or_else(|e| panic!("consume from `{queue}`: {e}"));
        let deadline = tokio::time::Instant::now() + window;
        let mut seen = Vec::new();
        while let Ok(Some(delivery)) = tokio::time::timeout_at(deadline, consumer.next()).await {
            let delivery = delivery.unwrap_or_else(|e| panic!("delivery from `{queue}`: {e}"));
            delivery
                .ack(BasicAckOptions::default())
                .await
                .expect("ack drained delivery");
            seen.push(delivery);
        }
        let _ = channel
            .basic_cancel(consumer.tag(), BasicCancelOptions::default())
            .await;
        let _ = channel.close(200, "drained".into()).await;
        seen
    }

    /// Ready messages in `queue` (a passive declare's message count).
    ///
    /// # Panics
    /// When the queue does not exist.
    pub async fn queue_depth(&self, queue: &str) -> u32 {
        video_orchestrator::topology::queue_depth(&self.connection, queue)
            .await
            .expect("passive declare")
            .unwrap_or_else(|| panic!("queue `{queue}` does not exist"))
    }

    /// Asserts that no check waits in any delay tier or partition queue of this test: run it
    /// after the longest tier has passed and the service is stopped.
    ///
    /// # Panics
    /// Naming the first queue that holds one.
    pub async fn assert_no_checks_left(&self) {
        let topology = self.topology();
        for tier in topology.delay_tiers_ms() {
            let q = topology.delay_queue(*tier);
            assert_eq!(self.queue_depth(&q).await, 0, "a check was left in {q}");
        }
        for p in 0..topology.partitions() {
            let q = topology.partition_queue(p);
            assert_eq!(self.queue_depth(&q).await, 0, "a check was left in {q}");
        }
    }

    /// Publishes one raw message on a fresh confirm channel and waits for the broker's ack.
    ///
    /// # Panics
    /// When the broker nacks or returns it.
    pub async fn publish_raw(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) {
        let channel = self.connection.create_channel().await.expect("channel");
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirm_select");
        let confirmation = channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                body,
                properties,
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
        assert_eq!(
            confirmation,
            Confirmation::Ack(None),
            "publish to `{exchange}` / `{routing_key}` was not accepted"
        );
        let _ = channel.close(200, "published".into()).await;
    }

    /// Deletes this test's exchanges and queues and drops its database. Call it at the end of
    /// every test; when a test fails before, [`Drop`] does the same.
    pub async fn cleanup(mut self) {
        self.cleaned_up = true;
        self.store.pool().close().await;
        let _ = self.connection.close(200, "test over".into()).await;
        self.cleanup_plan().run().await;
    }

    fn cleanup_plan(&self) -> CleanupPlan {
        let mut topologies = vec![self.topology()];
        topologies.extend(
            self.extra_topologies
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .iter()
                .cloned(),
        );
        CleanupPlan {
            topologies,
            database_name: self.database_name.clone(),
            rabbitmq_url: self.rabbitmq_url.clone(),
            maintenance_db_url: self.maintenance_db_url.clone(),
        }
    }
}

impl Drop for TestEnv {
    /// A test that failed (or forgot `cleanup`) still leaves nothing behind: the clean-up runs
    /// on its own thread with its own runtime and connections, because the test's runtime may
    /// be the one unwinding, and this waits for it.
    fn drop(&mut self) {
        if self.cleaned_up {
            return;
        }
        let plan = self.cleanup_plan();
        let done = std::thread::spawn(move || {
            match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime.block_on(plan.run()),
                Err(e) => eprintln!("test clean-up: no runtime: {e}"),
            }
        })
        .join();
        if done.is_err() {
            eprintln!("test clean-up panicked");
        }
    }
}
