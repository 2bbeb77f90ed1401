//! The reliability harness: runs the **real binary** as child processes — `serve` instances and
//! the simulated provider — on a fresh prefix and database, drives a load of tasks, lets a test
//! inject faults, waits for the system to drain, then checks the books (DESIGN §6):
//!
//! - every submitted task reached exactly one terminal state, matching the provider's outcome;
//! - every terminal task got exactly one terminal event and one `VideoProgressTrackingCancelled`
//!   (de-duplicated by `messageId`, as a consumer would);
//! - no check is left in any delay or partition queue once the longest tier has elapsed after the
//!   last terminal event (no zombie chains);
//! - no forked chains: per task, the provider saw no more status calls than its tracked time
//!   divided by the shortest interval, plus one, plus one per fault that overlapped the task.
//!
//! Events are collected on a durable queue of the test's own, bound to `video.events` with `#`,
//! and read at the end: unlike an exclusive queue it survives a broker restart.
//!
//! Each child writes its JSON log to a file under `target/tmp/reliability/<run>/`; the directory
//! is removed when the run passes and kept (its path is in the panic message) when it fails.
//! Children are killed when dropped, so a failing test leaves no process behind.

pub mod books;
mod drain;
mod load;
mod serve;
mod sim;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use lapin::options::{QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ConnectionProperties};

pub use books::{assert_clean, Audit, BookEvent, Books, Expectation, FaultWindow};
pub use drain::{rabbit_log_lines, Drained};
pub use load::{submit_load, Driver};
pub use serve::ServeProcess;
pub use sim::SimProcess;

use crate::app::eventually;
use crate::env::TestEnv;
use crate::figures::note;
use crate::process::{tail, target_tmp_dir, terminate};
use crate::prometheus::Counters;
use sim::http_client;

/// `tracking.min_interval_ms` of every run: the shortest gap between two checks of one task.
pub const MIN_INTERVAL_MS: u64 = 1000;
/// The longest delay tier of every run.
pub const LONGEST_TIER_MS: u64 = 5000;

/// One chaos run at a time in this process: two runs side by side on two cores would measure
/// each other, not the faults.
pub async fn one_at_a_time() -> tokio::sync::MutexGuard<'static, ()> {
    static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    SERIAL.lock().await
}

/// Settings of every child: 1 s checks, tiers 1/2/5 s, fast leases and sweeper.
pub fn chaos_vars(sim_url: &str) -> Vec<(String, String)> {
    [
        ("APP__HTTP__LISTEN", "127.0.0.1:0"),
        ("APP__LOG__FORMAT", "json"),
        ("APP__PROVIDERS__SIM__BASE_URL", sim_url),
        ("APP__TRACKING__MIN_INTERVAL_MS", "1000"),
        ("APP__TRACKING__MAX_INTERVAL_MS", "2000"),
        ("APP__TRACKING__DELAY_TIERS_MS", "1000,2000,5000"),
        ("APP__TRACKING__SWEEPER_GRACE_MS", "4000"),
        ("APP__TRACKING__SWEEPER_INTERVAL_MS", "1000"),
        ("APP__TRACKING__LEASE_HEARTBEAT_MS", "500"),
        ("APP__TRACKING__LEASE_TTL_MS", "3000"),
        ("APP__TRACKING__PREFETCH", "64"),
        ("APP__GENERATION__PENDING_GRACE_MS", "10000"),
        ("APP__DATABASE__ACQUIRE_TIMEOUT_MS", "2000"),
        ("APP__OUTBOX__POLL_INTERVAL_MS", "200"),
        ("APP__SHUTDOWN__GRACE_MS", "10000"),
        ("RUST_LOG", "info,lapin=error"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

/// What a run starts with.
#[derive(Debug, Clone)]
pub struct Options {
    /// Name in figures, notes and the log directory.
    pub name: &'static str,
    /// `serve` instances.
    pub instances: usize,
    /// The simulated provider's job duration.
    pub sim_duration_ms: u64,
    /// Plus a random `0..=jitter`.
    pub sim_jitter_ms: u64,
    /// Extra `APP__…` settings for the instances.
    pub extra: Vec<(&'static str, String)>,
}

/// A run: the database and prefix, the simulated provider and the `serve` instances.
#[derive(Debug)]
pub struct Cluster {
    /// The run's name.
    pub name: &'static str,
    /// Fresh prefix and database.
    pub env: TestEnv,
    /// The simulated provider.
    pub sim: SimProcess,
    /// The environment of every `serve` child.
    pub vars: Vec<(String, String)>,
    /// Instance slots (empty while one is down).
    pub slots: Vec<Option<ServeProcess>>,
    /// Counters scraped from instances just before they were killed.
    pub scraped: Counters,
    /// Where the logs are.
    pub dir: PathBuf,
    /// For `/readyz`, `/metrics`.
    pub http: reqwest::Client,
    spawned: usize,
    books_queue: String,
    /// When the run started.
    pub started: Instant,
}

impl Cluster {
    /// Starts the simulated provider and `options.instances` instances on a fresh prefix and
    /// database, waits until every instance is ready.
    pub async fn start(options: Options) -> Cluster {
        let started = Instant::now();
        let run_id = &uuid::Uuid::new_v4().simple().to_string()[..8];
        let dir = target_tmp_dir()
            .join("reliability")
            .join(format!("{}-{run_id}", options.name));
        std::fs::create_dir_all(&dir).expect("log directory");
        let sim = SimProcess::start(
            &dir.join("sim.log"),
            options.sim_duration_ms,
            options.sim_jitter_ms,
        )
        .await;
        let mut vars = chaos_vars(&sim.base_url());
        vars.extend(
            options
                .extra
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone())),
        );
        let borrowed: Vec<(&str, &str)> =
            vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let env = TestEnv::with_env(&borrowed).await;
        vars.extend(env.child_vars());

        // The topology first, then the books queue bound to it, so no event is missed.
        env.topology()
            .declare(&env.connection)
            .await
            .expect("declare the run's topology");
        let books_queue = format!("{}reliability.books", env.prefix);
        declare_books_queue(&env, &env.connection, &books_queue, FieldTable::default()).await;

        let mut cluster = Cluster {
            name: options.name,
            env,
            sim,
            vars,
            slots: Vec::new(),
            scraped: Counters::default(),
            dir,
            http: http_client(),
            spawned: 0,
            books_queue,
            started,
        };
        for _ in 0..options.instances {
            let p = cluster.spawn_instance().await;
            cluster.slots.push(Some(p));
        }
        for slot in 0..cluster.slots.len() {
            cluster
                .wait_ready(slot, Duration::from_secs(60))
                .await
                .unwrap_or_else(|| panic!("{}: instance {slot} never became ready", options.name));
        }
        note(
            cluster.name,
            &format!(
                "{} instances ready in {:.1} s; logs in {}",
                options.instances,
                started.elapsed().as_secs_f64(),
                cluster.dir.display()
            ),
        );
        cluster
    }

    /// The durable queue of `video.events` the books are read from.
    pub fn books_queue(&self) -> &str {
        &self.books_queue
    }

    async fn spawn_instance(&mut self) -> ServeProcess {
        self.spawned += 1;
        let log = self.dir.join(format!("serve-{}.log", self.spawned));
        ServeProcess::start(&self.vars, log).await
    }

    /// Waits until the instance in `slot` answers `/readyz` with 200; returns how long it took.
    pub async fn wait_ready(&self, slot: usize, timeout: Duration) -> Option<Duration> {
        let t = Instant::now();
        let p = self.slots[slot].as_ref()?;
        eventually(timeout, || async {
            p.ready(&self.http).await.then(|| t.elapsed())
        })
        .await
    }

    /// Waits until every instance is ready; returns when they all were.
    pub async fn wait_all_ready(&self, timeout: Duration) -> Option<DateTime<Utc>> {
        for slot in 0..self.slots.len() {
            self.wait_ready(slot, timeout).await?;
        }
        Some(Utc::now())
    }

    /// True when every partition is leased, unexpired, to a live instance: tracking has failed
    /// over completely (false while the database does not answer).
    pub async fn partitions_covered(&self) -> bool {
        let live: Vec<String> = self
            .slots
            .iter()
            .flatten()
            .map(|p| p.instance_id.clone())
            .collect();
        let covered: Option<i64> = sqlx::query_scalar(
            "SELECT count(*) FROM partition_leases
             WHERE topology_prefix = $1 AND expires_at > now() AND owner = ANY($2)",
        )
        .bind(&self.env.prefix)
        .bind(&live)
        .fetch_one(self.env.store.pool())
        .await
        .ok();
        covered == Some(i64::from(self.env.topology().partitions()))
    }

    /// Waits until [`Cluster::partitions_covered`]; returns when it was.
    pub async fn wait_covered(&self, timeout: Duration) -> Option<DateTime<Utc>> {
        eventually(timeout, || async {
            self.partitions_covered().await.then(Utc::now)
        })
        .await
    }

    /// `kill -9` of the instance in `slot` (its counters scraped first). Returns when it died.
    pub async fn kill9(&mut self, slot: usize) -> DateTime<Utc> {
        let mut p = self.slots[slot].take().expect("a running instance");
        if let Some(page) = p.metrics(&self.http).await {
            self.scraped.add_page(&page);
        }
        let at = Utc::now();
        p.child.start_kill().expect("SIGKILL");
        let status = p.child.wait().await.expect("reap");
        assert!(
            !status.success(),
            "a SIGKILLed process exits unsuccessfully"
        );
        at
    }

    /// Starts a new instance in an empty `slot`; returns when it is ready.
    pub async fn restart(&mut self, slot: usize) -> DateTime<Utc> {
        let p = self.spawn_instance().await;
        self.slots[slot] = Some(p);
        self.wait_ready(slot, Duration::from_secs(60))
            .await
            .unwrap_or_else(|| {
                panic!(
                    "{}: restarted instance {slot} never became ready",
                    self.name
                )
            });
        Utc::now()
    }

    /// A fresh connection for inspection (the test's own may have died with a broker restart).
    pub async fn connect(&self) -> Connection {
        Connection::connect(self.env.rabbitmq_url(), ConnectionProperties::default())
            .await
            .expect("inspection connection")
    }

    /// Ready messages in `queue`.
    pub async fn depth(&self, conn: &Connection, queue: &str) -> u32 {
        video_orchestrator::topology::queue_depth(conn, queue)
            .await
            .expect("passive declare")
            .unwrap_or_else(|| panic!("queue `{queue}` does not exist"))
    }

    /// Counters of the live instances plus those scraped before kills.
    pub async fn counters(&self) -> Counters {
        let mut c = self.scraped.clone();
        for p in self.slots.iter().flatten() {
            if let Some(page) = p.metrics(&self.http).await {
                c.add_page(&page);
            }
        }
        c
    }

    /// Lines containing `needle` over every instance log.
    pub fn log_lines(&self, needle: &str) -> usize {
        let Ok(dir) = std::fs::read_dir(&self.dir) else {
            return 0;
        };
        dir.flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("serve-"))
            .map(|e| {
                std::fs::read_to_string(e.path())
                    .unwrap_or_default()
                    .lines()
                    .filter(|l| l.contains(needle))
                    .count()
            })
            .sum()
    }

    /// SIGTERM to every instance; asserts each exits 0 within the grace period.
    pub async fn stop_all(&mut self) {
        for (slot, p) in self.slots.iter_mut().enumerate() {
            let Some(mut p) = p.take() else { continue };
            let pid = p.pid;
            let status = terminate(&mut p.child, pid, Duration::from_secs(20)).await;
            assert!(
                status.is_some_and(|s| s.success()),
                "{}: instance {slot} (pid {pid}) did not exit 0 on SIGTERM ({status:?}):\n{}",
                self.name,
                tail(&p.log, 20)
            );
        }
    }

    /// Deletes the books queue, the prefix and the database, stops the provider and removes
    /// the logs. Only called when the run passed; a failing run leaves its logs.
    pub async fn cleanup(mut self) {
        self.stop_all().await;
        let conn = self.connect().await;
        if let Ok(ch) = conn.create_channel().await {
            let _ = ch
                .queue_delete(
                    self.books_queue.as_str().into(),
                    QueueDeleteOptions::default(),
                )
                .await;
        }
        let _ = conn.close(200, "cleaned up".into()).await;
        let Cluster { env, sim, dir, .. } = self;
        env.cleanup().await;
        sim.stop().await;
        // `RELIABILITY_KEEP_LOGS=1` keeps them for reading.
        if std::env::var_os("RELIABILITY_KEEP_LOGS").is_none() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }

    /// Ready instances right now.
    pub async fn ready_count(&self) -> usize {
        let mut n = 0;
        for p in self.slots.iter().flatten() {
            if p.ready(&self.http).await {
                n += 1;
            }
        }
        n
    }

    /// The instances' pids.
    pub fn pids(&self) -> Vec<u32> {
        self.slots.iter().flatten().map(|p| p.pid).collect()
    }

    /// All instances still running (none exited or crashed).
    pub fn all_alive(&mut self) -> bool {
        self.slots.iter_mut().flatten().all(ServeProcess::alive)
    }
}

/// Declares the books queue `name` (durable, with `args`) on `connection` and binds it to the
/// run's `video.events` with `#`, so it sees every event.
///
/// # Panics
/// On broker errors.
pub async fn declare_books_queue(
    env: &TestEnv,
    connection: &Connection,
    name: &str,
    mut args: FieldTable,
) {
    let channel = connection.create_channel().await.expect("channel");
    // Gone by itself 15 minutes after a failed run stopped using it.
    args.insert("x-expires".into(), AMQPValue::LongInt(900_000));
    channel
        .queue_declare(
            name.into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            args,
        )
        .await
        .expect("declare the books queue");
    channel
        .queue_bind(
            name.into(),
            env.topology().events_exchange().as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind the books queue");
    let _ = channel.close(200, "declared".into()).await;
}
