//! Test harness: every test gets its own topology prefix on the real broker and its own
//! database on the real PostgreSQL, and gives both back when it ends — also when it fails.
//!
//! The services come from `APP__RABBITMQ__URL` and `APP__DATABASE__URL` when set, else from the
//! defaults in `config/default.toml` (the local broker and PostgreSQL that `.ci/run` starts).
//! The database URL names the maintenance database: each test creates `vo_test_<hex>` next to
//! it. Set `TEST_LOG=1` to see the service's logs.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Confirmation, Connection, ConnectionProperties};
use secrecy::ExposeSecret;
use sqlx::Connection as _;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use video_orchestrator::broker::{Broker, BrokerOptions};
use video_orchestrator::config::Settings;
use video_orchestrator::store::Store;
use video_orchestrator::topology::Topology;

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

/// What clean-up deletes; owned, so it can run on another thread.
#[derive(Debug)]
struct CleanupPlan {
    topologies: Vec<Topology>,
    database_name: String,
    rabbitmq_url: String,
    maintenance_db_url: String,
}

impl CleanupPlan {
    /// Best effort: reports failures on stderr and never panics (it may run while unwinding).
    async fn run(self) {
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

async fn create_database(maintenance_url: &str, name: &str) {
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
fn with_database(url: &str, database: &str) -> String {
    let mut parsed = url::Url::parse(url).expect("database URL parses");
    parsed.set_path(&format!("/{database}"));
    parsed.to_string()
}

/// A string header of a delivery.
pub fn header(delivery: &Delivery, name: &str) -> Option<String> {
    let headers = delivery.properties.headers().as_ref()?;
    match headers.inner().get(&ShortString::from(name))? {
        AMQPValue::LongString(s) => Some(s.to_string()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        _ => None,
    }
}

/// One message seen on `video.events`.
#[derive(Debug, Clone)]
pub struct Event {
    /// Routing key, e.g. `video.generation.completed`.
    pub routing_key: String,
    /// The AMQP `type` property, e.g. `VideoGenerationCompleted`.
    pub message_type: Option<String>,
    /// The AMQP `message_id` property.
    pub message_id: Option<String>,
    /// The AMQP `correlation_id` property (the request id).
    pub correlation_id: Option<String>,
    /// The `x-virtual-key` header.
    pub virtual_key: Option<String>,
    /// The `traceparent` header.
    pub traceparent: Option<String>,
    /// The body; a body that is not JSON is kept as a JSON string.
    pub body: serde_json::Value,
}

impl Event {
    /// The body's `requestId`.
    pub fn request_id(&self) -> Option<&str> {
        self.body.get("requestId")?.as_str()
    }

    /// True for `routing_key` about `request_id`.
    pub fn is(&self, routing_key: &str, request_id: &str) -> bool {
        self.routing_key == routing_key && self.request_id() == Some(request_id)
    }

    fn from_delivery(delivery: &Delivery) -> Self {
        let body = serde_json::from_slice(&delivery.data).unwrap_or_else(|_| {
            serde_json::Value::String(String::from_utf8_lossy(&delivery.data).into_owned())
        });
        let props = &delivery.properties;
        Self {
            routing_key: delivery.routing_key.to_string(),
            message_type: props.kind().as_ref().map(ToString::to_string),
            message_id: props.message_id().as_ref().map(ToString::to_string),
            correlation_id: props.correlation_id().as_ref().map(ToString::to_string),
            virtual_key: header(delivery, video_orchestrator::topology::VIRTUAL_KEY_HEADER),
            traceparent: header(delivery, video_orchestrator::broker::TRACEPARENT_HEADER),
            body,
        }
    }
}

/// Collects every event published to one `video.events` exchange, through an exclusive,
/// auto-delete queue bound with `#`.
///
/// The consumer runs in a task this collector owns: [`EventCollector::close`] stops it and
/// waits for it; dropping the collector aborts it.
#[derive(Debug)]
pub struct EventCollector {
    events: Arc<Mutex<Vec<Event>>>,
    arrived: watch::Receiver<usize>,
    channel: lapin::Channel,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl EventCollector {
    async fn start(connection: &Connection, exchange: &str) -> Self {
        let channel = connection.create_channel().await.expect("channel");
        let queue = channel
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("declare the collector's queue");
        let queue = queue.name().to_string();
        channel
            .queue_bind(
                queue.as_str().into(),
                exchange.into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind the collector's queue");
        let mut consumer = channel
            .basic_consume(
                queue.as_str().into(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("consume the collector's queue");
        let events = Arc::new(Mutex::new(Vec::new()));
        let (arrived_tx, arrived) = watch::channel(0usize);
        let stop = CancellationToken::new();
        let task = tokio::spawn({
            let events = events.clone();
            let stop = stop.clone();
            async move {
                loop {
                    let next = tokio::select! {
                        _ = stop.cancelled() => return,
                        next = consumer.next() => next,
                    };
                    let Some(Ok(delivery)) = next else { return };
                    let event = Event::from_delivery(&delivery);
                    let count = {
                        let mut all = events
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner);
                        all.push(event);
                        all.len()
                    };
                    arrived_tx.send_replace(count);
                }
            }
        });
        Self {
            events,
            arrived,
            channel,
            stop,
            task: Some(task),
        }
    }

    /// Everything received so far, in arrival order.
    pub fn all(&self) -> Vec<Event> {
        self.events
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The first event (received so far or within `timeout`) that satisfies `pred`.
    pub async fn wait_for(
        &self,
        pred: impl Fn(&Event) -> bool,
        timeout: Duration,
    ) -> Option<Event> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut arrived = self.arrived.clone();
        loop {
            // Mark as seen before looking, so an event pushed after the look wakes us.
            arrived.borrow_and_update();
            if let Some(found) = self.all().into_iter().find(|e| pred(e)) {
                return Some(found);
            }
            tokio::select! {
                changed = arrived.changed() => if changed.is_err() { return None },
                _ = tokio::time::sleep_until(deadline) => return None,
            }
        }
    }

    /// Waits until at least `n` events with `routing_key` about `request_id` arrived, or
    /// `timeout` passed; returns the matching events either way (check the length).
    pub async fn wait_count(
        &self,
        routing_key: &str,
        request_id: &str,
        n: usize,
        timeout: Duration,
    ) -> Vec<Event> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut arrived = self.arrived.clone();
        loop {
            arrived.borrow_and_update();
            let matching: Vec<Event> = self
                .all()
                .into_iter()
                .filter(|e| e.is(routing_key, request_id))
                .collect();
            if matching.len() >= n {
                return matching;
            }
            tokio::select! {
                changed = arrived.changed() => if changed.is_err() { return matching },
                _ = tokio::time::sleep_until(deadline) => return matching,
            }
        }
    }

    /// Stops the consumer, waits for its task and closes the channel (deleting the queue).
    pub async fn close(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        let _ = self.channel.close(200, "collector closed".into()).await;
    }
}

impl Drop for EventCollector {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}
