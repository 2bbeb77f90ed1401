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

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::StreamExt;
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ConnectionProperties};
use secrecy::ExposeSecret;
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use video_orchestrator::broker::{Broker, BrokerOptions};
use video_orchestrator::client::{new_request, Client};
use video_orchestrator::store::{Task, TaskStatus};

use crate::helpers::TestEnv;

/// The binary under test.
pub const BINARY: &str = env!("CARGO_BIN_EXE_video-orchestrator");
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

/// Prints a figure line where `cargo test` shows it even for a passing test (straight to the
/// process's stderr, past the test harness's capture) and appends it to
/// `target/tmp/reliability-figures.txt`.
pub fn figure(line: &str) {
    let line = format!("RELIABILITY {line}");
    let _ = writeln!(std::io::stderr(), "{line}");
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join("reliability-figures.txt");
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = writeln!(f, "{} {line}", Utc::now().format("%Y-%m-%dT%H:%M:%SZ"));
    }
}

/// Progress notes while a run waits (captured; shown when the test fails).
pub fn note(run: &str, text: &str) {
    eprintln!("[{run} {}] {text}", Utc::now().format("%H:%M:%S%.3f"));
}

fn spawn(args: &[&str], vars: &[(String, String)], log: &Path) -> Child {
    let file =
        std::fs::File::create(log).unwrap_or_else(|e| panic!("create log {}: {e}", log.display()));
    Command::new(BINARY)
        .args(args)
        .envs(vars.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(file))
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("start {BINARY}: {e}"))
}

/// The last lines of a log, for panic messages.
pub fn tail(log: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Waits until the child logs `message` (JSON logs) and returns that line's string `field`.
async fn logged_field(child: &mut Child, log: &Path, message: &str, field: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(text) = tokio::fs::read_to_string(log).await {
            for line in text.lines() {
                let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                    continue;
                };
                if v["message"] == message {
                    if let Some(s) = v[field].as_str() {
                        return s.to_owned();
                    }
                }
            }
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "{} exited ({status}) before logging `{message}`:\n{}",
                log.display(),
                tail(log, 20)
            );
        }
        assert!(
            Instant::now() < deadline,
            "{} did not log `{message}` within 60 s:\n{}",
            log.display(),
            tail(log, 20)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn terminate(child: &mut Child, pid: u32, within: Duration) -> Option<ExitStatus> {
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    match tokio::time::timeout(within, child.wait()).await {
        Ok(Ok(status)) => Some(status),
        _ => {
            let _ = child.start_kill();
            let _ = child.wait().await;
            None
        }
    }
}

/// Counters summed over Prometheus text (`name{labels} value` lines).
#[derive(Debug, Clone, Default)]
pub struct Counters(BTreeMap<String, f64>);

impl Counters {
    /// Adds every sample of a `/metrics` page.
    pub fn add_page(&mut self, text: &str) {
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            if let Some((series, value)) = line.rsplit_once(' ') {
                if let Ok(v) = value.parse::<f64>() {
                    *self.0.entry(series.to_owned()).or_default() += v;
                }
            }
        }
    }

    /// Adds another sum.
    pub fn add(&mut self, other: &Counters) {
        for (k, v) in &other.0 {
            *self.0.entry(k.clone()).or_default() += v;
        }
    }

    /// The sum of every series of `name` whose labels contain `label` (`""` for all).
    pub fn sum(&self, name: &str, label: &str) -> u64 {
        let total: f64 = self
            .0
            .iter()
            .filter(|(series, _)| {
                (series.as_str() == name || series.starts_with(&format!("{name}{{")))
                    && series.contains(label)
            })
            .map(|(_, v)| *v)
            .sum();
        total.round() as u64
    }
}

/// The simulated provider, run as `video-orchestrator sim-provider`.
#[derive(Debug)]
pub struct SimProcess {
    child: Child,
    pid: u32,
    /// Where it listens.
    pub addr: SocketAddr,
    http: reqwest::Client,
}

/// `GET /sim/stats`.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SimStats {
    /// Jobs held.
    pub jobs: u64,
    /// Submit requests, refused ones included.
    pub submits: u64,
    /// Status requests, refused ones included.
    pub status_calls: u64,
    /// Status requests per job.
    pub status_calls_by_job: HashMap<String, u64>,
}

impl SimProcess {
    async fn start(log: &Path, duration_ms: u64, jitter_ms: u64) -> Self {
        let vars = vec![
            ("APP__LOG__FORMAT".to_owned(), "json".to_owned()),
            ("RUST_LOG".to_owned(), "info".to_owned()),
        ];
        let (d, j) = (duration_ms.to_string(), jitter_ms.to_string());
        let mut child = spawn(
            &[
                "sim-provider",
                "--listen",
                "127.0.0.1:0",
                "--duration-ms",
                &d,
                "--duration-jitter-ms",
                &j,
            ],
            &vars,
            log,
        );
        let pid = child.id().expect("sim pid");
        let addr = logged_field(&mut child, log, "simulated provider listening", "addr")
            .await
            .parse()
            .expect("sim address");
        Self {
            child,
            pid,
            addr,
            http: http_client(),
        }
    }

    /// `http://ADDR`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Replaces the injected faults (`POST /sim/faults`).
    pub async fn set_faults(&self, faults: serde_json::Value) {
        let r = self
            .http
            .post(format!("{}/sim/faults", self.base_url()))
            .json(&faults)
            .send()
            .await
            .expect("POST /sim/faults");
        assert!(r.status().is_success(), "POST /sim/faults: {}", r.status());
    }

    /// `GET /sim/stats`.
    pub async fn stats(&self) -> SimStats {
        self.http
            .get(format!("{}/sim/stats", self.base_url()))
            .send()
            .await
            .expect("GET /sim/stats")
            .json()
            .await
            .expect("sim stats parse")
    }

    /// The provider's own view of a job: `completed`, `failed`, `queued`, `in_progress`.
    pub async fn job_status(&self, job: &str) -> Option<String> {
        let r = self
            .http
            .get(format!("{}/v1/videos/{job}", self.base_url()))
            .bearer_auth("sim-key")
            .send()
            .await
            .ok()?;
        let v: serde_json::Value = r.json().await.ok()?;
        v["status"].as_str().map(str::to_owned)
    }

    async fn stop(mut self) {
        let pid = self.pid;
        terminate(&mut self.child, pid, Duration::from_secs(10)).await;
    }
}

fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(3))
        .build()
        .expect("HTTP client")
}

/// One `serve` process.
#[derive(Debug)]
pub struct ServeProcess {
    child: Child,
    /// Its pid.
    pub pid: u32,
    /// Its HTTP address.
    pub http: SocketAddr,
    /// Its id in the lease tables.
    pub instance_id: String,
    /// Its log file.
    pub log: PathBuf,
}

impl ServeProcess {
    async fn start(vars: &[(String, String)], log: PathBuf) -> Self {
        let mut child = spawn(&["serve"], vars, &log);
        let pid = child.id().expect("serve pid");
        let http = logged_field(&mut child, &log, "listening", "http")
            .await
            .parse()
            .expect("serve HTTP address");
        let instance_id =
            logged_field(&mut child, &log, "video-orchestrator running", "instance").await;
        Self {
            child,
            pid,
            http,
            instance_id,
            log,
        }
    }

    /// `GET /readyz` answered 200.
    pub async fn ready(&self, http: &reqwest::Client) -> bool {
        http.get(format!("http://{}/readyz", self.http))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
    }

    /// `GET /readyz` answered 503 (reachable, not ready).
    pub async fn not_ready(&self, http: &reqwest::Client) -> bool {
        http.get(format!("http://{}/readyz", self.http))
            .send()
            .await
            .is_ok_and(|r| r.status() == reqwest::StatusCode::SERVICE_UNAVAILABLE)
    }

    /// `GET /metrics`.
    pub async fn metrics(&self, http: &reqwest::Client) -> Option<String> {
        http.get(format!("http://{}/metrics", self.http))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()
    }

    /// Still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
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

/// A fault and how long the system took to get over it, for the per-task allowance of status
/// calls and for the figures.
#[derive(Debug, Clone)]
pub struct FaultWindow {
    /// When it began.
    pub from: DateTime<Utc>,
    /// When the system was back (ready again).
    pub to: DateTime<Utc>,
}

impl FaultWindow {
    /// Seconds from the fault to recovery.
    pub fn recovery_s(&self) -> f64 {
        (self.to - self.from).num_milliseconds() as f64 / 1000.0
    }
}

/// A submitted task and what the books expect of it.
#[derive(Debug, Clone)]
pub struct Expectation {
    /// Its `requestId`.
    pub request_id: String,
    /// Refused by validation (Failed, `retryable: false`, no provider job, CommandRejected)
    /// rather than run at the provider.
    pub refused: bool,
}

/// One event read from the books queue.
#[derive(Debug, Clone)]
pub struct BookEvent {
    /// Routing key.
    pub routing_key: String,
    /// `message_id` property (the body's `messageId` when the property is missing).
    pub message_id: String,
    /// The body's `requestId`.
    pub request_id: String,
    /// The body.
    pub body: serde_json::Value,
}

const TERMINAL_KEYS: [&str; 3] = [
    "video.generation.completed",
    "video.generation.failed",
    "video.generation.cancelled",
];

/// The outcome of the audit.
#[derive(Debug, Default)]
pub struct Books {
    /// Tasks audited.
    pub tasks: usize,
    /// Outcomes by status.
    pub by_status: BTreeMap<String, usize>,
    /// Missing or not terminal.
    pub lost: Vec<String>,
    /// Terminal state differs from the provider's outcome.
    pub wrong_outcome: Vec<String>,
    /// Not exactly one distinct terminal event, or of the wrong kind.
    pub bad_terminal_events: Vec<String>,
    /// Not exactly one distinct `VideoProgressTrackingCancelled`.
    pub bad_tracking_cancelled: Vec<String>,
    /// Event deliveries whose `messageId` was already seen (at-least-once re-sends).
    pub duplicates_dropped: usize,
    /// Every distinct event, in arrival order.
    pub events: Vec<BookEvent>,
    /// Delay or partition queues still holding checks.
    pub zombie_queues: Vec<(String, u32)>,
    /// Tasks whose provider saw more status calls than one chain can make.
    pub forked: Vec<String>,
    /// Status calls over all tasks.
    pub status_calls: u64,
    /// The largest `calls / allowance` seen, for the figure.
    pub tightest: f64,
    /// Provider jobs no task points at (a crash between submit and recording it).
    pub orphan_provider_jobs: u64,
}

impl Books {
    /// Everything that breaks a promise, one line each.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        let mut list = |what: &str, v: &[String]| {
            if !v.is_empty() {
                p.push(format!(
                    "{what}: {} (e.g. {:?})",
                    v.len(),
                    &v[..v.len().min(5)]
                ));
            }
        };
        list("lost (not terminal)", &self.lost);
        list("outcome differs from the provider's", &self.wrong_outcome);
        list("not exactly one terminal event", &self.bad_terminal_events);
        list(
            "not exactly one tracking-cancelled event",
            &self.bad_tracking_cancelled,
        );
        list("forked chains (too many status calls)", &self.forked);
        if !self.zombie_queues.is_empty() {
            p.push(format!("checks left in queues: {:?}", self.zombie_queues));
        }
        p
    }

    /// Distinct events with this routing key.
    pub fn count(&self, routing_key: &str) -> usize {
        self.events
            .iter()
            .filter(|e| e.routing_key == routing_key)
            .count()
    }
}

/// The load driver's own broker connection (supervised, so it rides out a broker restart) and a
/// client on it.
#[derive(Debug)]
pub struct Driver {
    /// Publishes requests and cancels.
    pub client: Client,
    stop: CancellationToken,
    supervisor: JoinHandle<()>,
}

impl Driver {
    /// Stops the supervisor and waits for it.
    pub async fn close(self) {
        self.stop.cancel();
        let _ = self.supervisor.await;
    }
}

/// Submits `n` requests at `per_second`, every `fail_every`-th with the `[fail]` directive,
/// spread over 24 virtual keys. Returns the request ids in order.
pub async fn submit_load(
    client: Client,
    run: &'static str,
    n: usize,
    per_second: f64,
    fail_every: usize,
) -> Vec<String> {
    let mut ids = Vec::with_capacity(n);
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / per_second));
    for i in 0..n {
        tick.tick().await;
        let fail = fail_every > 0 && i % fail_every == fail_every - 1;
        let prompt = format!("{run} task {i}{}", if fail { " [fail]" } else { "" });
        let request = new_request(&format!("vk-{run}-{}", i % 24), "sora-2", &prompt);
        let id = client
            .submit(&request)
            .await
            .unwrap_or_else(|e| panic!("{run}: request {i} not published: {e}"));
        ids.push(id);
    }
    ids
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
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
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
        vars.push(("APP__TOPOLOGY__PREFIX".into(), env.prefix.clone()));
        vars.push((
            "APP__DATABASE__URL".into(),
            env.settings.database.url.expose_secret().to_owned(),
        ));
        vars.push(("APP__RABBITMQ__URL".into(), env.rabbitmq_url().to_owned()));

        // The topology first, then the books queue bound to it, so no event is missed.
        env.topology()
            .declare(&env.connection)
            .await
            .expect("declare the run's topology");
        let books_queue = format!("{}reliability.books", env.prefix);
        let channel = env.connection.create_channel().await.expect("channel");
        let mut args = FieldTable::default();
        // Gone by itself 15 minutes after a failed run stopped using it.
        args.insert("x-expires".into(), AMQPValue::LongInt(900_000));
        channel
            .queue_declare(
                books_queue.as_str().into(),
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
                books_queue.as_str().into(),
                env.topology().events_exchange().as_str().into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind the books queue");
        let _ = channel.close(200, "declared".into()).await;

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

    async fn spawn_instance(&mut self) -> ServeProcess {
        self.spawned += 1;
        let log = self.dir.join(format!("serve-{}.log", self.spawned));
        ServeProcess::start(&self.vars, log).await
    }

    /// Waits until the instance in `slot` answers `/readyz` with 200; returns how long it took.
    pub async fn wait_ready(&self, slot: usize, timeout: Duration) -> Option<Duration> {
        let t = Instant::now();
        let p = self.slots[slot].as_ref()?;
        while t.elapsed() < timeout {
            if p.ready(&self.http).await {
                return Some(t.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        None
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
        let t = Instant::now();
        while t.elapsed() < timeout {
            if self.partitions_covered().await {
                return Some(Utc::now());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        None
    }

    /// A driver: its own supervised broker connection and a client.
    pub async fn driver(&self) -> Driver {
        let broker = Broker::connect(
            BrokerOptions::from_settings(&self.env.settings),
            self.env.topology(),
        )
        .await
        .expect("driver connects");
        let stop = CancellationToken::new();
        let supervisor = tokio::spawn(broker.clone().supervise(stop.clone()));
        Driver {
            client: Client::new(broker, stop.clone()),
            stop,
            supervisor,
        }
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

    /// How many of `ids` are terminal (None while the database does not answer).
    pub async fn terminal_count(&self, ids: &[String]) -> Option<i64> {
        sqlx::query_scalar(
            "SELECT count(*) FROM video_tasks WHERE request_id = ANY($1)
               AND status NOT IN ('pending', 'processing')",
        )
        .bind(ids)
        .fetch_one(self.env.store.pool())
        .await
        .ok()
    }

    /// Waits until every task in `ids` is terminal and the outbox is empty, then until the
    /// longest tier has elapsed after the last terminal transition (plus a margin), so any
    /// zombie check would be sitting in a queue. Returns the time the last task ended.
    ///
    /// # Panics
    /// When the tasks are not all terminal within `timeout` (the books then name them).
    pub async fn drain(&self, ids: &[String], timeout: Duration) -> DateTime<Utc> {
        let t = Instant::now();
        let mut last_note = Instant::now();
        loop {
            let done = self.terminal_count(ids).await.unwrap_or(-1);
            if done == ids.len() as i64 {
                break;
            }
            if t.elapsed() > timeout {
                note(
                    self.name,
                    &format!("only {done}/{} tasks terminal after {timeout:?}", ids.len()),
                );
                break;
            }
            if last_note.elapsed() > Duration::from_secs(10) {
                note(self.name, &format!("{done}/{} tasks terminal", ids.len()));
                last_note = Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(30) {
            if self.env.store.outbox_len().await.unwrap_or(1) == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let last: Option<DateTime<Utc>> = sqlx::query_scalar(
            "SELECT max(finished_at) FROM video_tasks WHERE request_id = ANY($1)",
        )
        .bind(ids)
        .fetch_one(self.env.store.pool())
        .await
        .expect("last finish");
        let last = last.unwrap_or_else(Utc::now);
        let quiet_until = last
            + chrono::Duration::milliseconds(i64::try_from(LONGEST_TIER_MS).unwrap_or(0) + 2000);
        let wait = (quiet_until - Utc::now()).to_std().unwrap_or_default();
        tokio::time::sleep(wait).await;
        last
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

    /// Reads every event from the books queue.
    async fn read_events(&self) -> Vec<BookEvent> {
        let conn = self.connect().await;
        let expected = self.depth(&conn, &self.books_queue).await as usize;
        let channel = conn.create_channel().await.expect("channel");
        let mut consumer = channel
            .basic_consume(
                self.books_queue.as_str().into(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("consume the books queue");
        let mut events = Vec::with_capacity(expected);
        let idle = Duration::from_millis(if expected == 0 { 300 } else { 2000 });
        while let Ok(Some(Ok(d))) = tokio::time::timeout(idle, consumer.next()).await {
            let body: serde_json::Value =
                serde_json::from_slice(&d.data).unwrap_or(serde_json::Value::Null);
            let message_id = d
                .properties
                .message_id()
                .as_ref()
                .map(ToString::to_string)
                .or_else(|| body["messageId"].as_str().map(str::to_owned))
                .unwrap_or_default();
            events.push(BookEvent {
                routing_key: d.routing_key.to_string(),
                message_id,
                request_id: body["requestId"].as_str().unwrap_or_default().to_owned(),
                body,
            });
            if events.len() >= expected {
                break;
            }
        }
        let _ = channel
            .basic_cancel(consumer.tag(), BasicCancelOptions::default())
            .await;
        let _ = conn.close(200, "read".into()).await;
        assert_eq!(
            events.len(),
            expected,
            "{}: read {} of the {expected} events in the books queue",
            self.name,
            events.len()
        );
        events
    }

    /// Messages the broker holds in this run's delay and partition queues that a passive
    /// declare does not count (`rabbitmqctl list_queues` `messages` minus `messages_ready`:
    /// held by a quorum queue's dead-letter worker, or unacknowledged). Empty when `rabbitmqctl`
    /// is not available.
    pub async fn broker_held(&self) -> Vec<(String, u64)> {
        let prefix = format!("{}video.progress.", self.env.prefix);
        let (ok, out) = tokio::task::spawn_blocking(|| {
            run_tool(
                "timeout",
                &[
                    "60",
                    "rabbitmqctl",
                    "-q",
                    "list_queues",
                    "name",
                    "messages",
                    "messages_ready",
                    "--no-table-headers",
                ],
            )
        })
        .await
        .unwrap_or((false, String::new()));
        if !ok {
            return Vec::new();
        }
        out.lines()
            .filter_map(|line| {
                let mut f = line.split_whitespace();
                let (name, total, ready) = (f.next()?, f.next()?, f.next()?);
                let held = total
                    .parse::<u64>()
                    .ok()?
                    .saturating_sub(ready.parse::<u64>().ok()?);
                (name.starts_with(&prefix) && held > 0).then(|| (name.to_owned(), held))
            })
            .collect()
    }

    /// Checks the books for `expected` (call after [`Cluster::drain`] and
    /// [`Cluster::stop_all`]). `faults` widen each task's allowance of status calls by one per
    /// fault overlapping its life.
    pub async fn books(&self, expected: &[Expectation], faults: &[FaultWindow]) -> Books {
        let ids: Vec<String> = expected.iter().map(|e| e.request_id.clone()).collect();
        let rows: HashMap<String, Task> =
            sqlx::query_as::<_, Task>("SELECT * FROM video_tasks WHERE request_id = ANY($1)")
                .bind(&ids)
                .fetch_all(self.env.store.pool())
                .await
                .expect("read the tasks")
                .into_iter()
                .map(|t| (t.request_id.clone(), t))
                .collect();
        // Status calls first: asking the provider for the outcome below counts as calls too.
        let stats = self.sim.stats().await;
        let jobs: Vec<String> = rows
            .values()
            .filter_map(|t| t.provider_task_id.clone())
            .collect();
        let http = &self.sim;
        let outcomes: HashMap<String, Option<String>> = futures::stream::iter(jobs.clone())
            .map(|job| async move {
                let s = http.job_status(&job).await;
                (job, s)
            })
            .buffer_unordered(16)
            .collect()
            .await;

        let mut books = Books {
            tasks: expected.len(),
            orphan_provider_jobs: stats.jobs.saturating_sub(jobs.len() as u64),
            ..Books::default()
        };
        let mut seen = HashSet::new();
        for e in self.read_events().await {
            if !seen.insert(e.message_id.clone()) {
                books.duplicates_dropped += 1;
                continue;
            }
            books.events.push(e);
        }
        let mut per_task: HashMap<&str, Vec<&BookEvent>> = HashMap::new();
        for e in &books.events {
            per_task.entry(e.request_id.as_str()).or_default().push(e);
        }

        let conn = self.connect().await;
        let topology = self.env.topology();
        let mut queues: Vec<String> = topology
            .delay_tiers_ms()
            .iter()
            .map(|t| topology.delay_queue(*t))
            .collect();
        queues.extend((0..topology.partitions()).map(|p| topology.partition_queue(p)));
        for q in queues {
            let n = self.depth(&conn, &q).await;
            if n > 0 {
                books.zombie_queues.push((q, n));
            }
        }
        let _ = conn.close(200, "inspected".into()).await;
        // What AMQP cannot see: messages the broker holds for dead-lettering.
        for (q, n) in self.broker_held().await {
            books
                .zombie_queues
                .push((format!("{q} (held by the broker)"), n as u32));
        }

        for exp in expected {
            let id = exp.request_id.as_str();
            let Some(task) = rows.get(id) else {
                books.lost.push(format!("{id}: no row"));
                continue;
            };
            *books
                .by_status
                .entry(task.status.as_str().to_owned())
                .or_default() += 1;
            if !task.status.is_terminal() {
                books
                    .lost
                    .push(format!("{id}: still {}", task.status.as_str()));
                continue;
            }
            // The provider's outcome, or what a refusal / a failed submit must look like.
            let right = match (&task.provider_task_id, exp.refused) {
                (_, true) => {
                    task.status == TaskStatus::Failed
                        && task.retryable == Some(false)
                        && task.provider_task_id.is_none()
                }
                (Some(job), false) => match outcomes.get(job).cloned().flatten().as_deref() {
                    Some("completed") => task.status == TaskStatus::Completed,
                    Some("failed") => task.status == TaskStatus::Failed,
                    _ => false,
                },
                // Never accepted by the provider: submit retries ran out.
                (None, false) => task.status == TaskStatus::Failed && task.retryable == Some(true),
            };
            if !right {
                books.wrong_outcome.push(format!(
                    "{id}: {} (retryable {:?}, job {:?} → {:?}, error {:?})",
                    task.status.as_str(),
                    task.retryable,
                    task.provider_task_id,
                    task.provider_task_id
                        .as_ref()
                        .and_then(|j| outcomes.get(j).cloned().flatten()),
                    task.error
                ));
            }
            let events = per_task.get(id).cloned().unwrap_or_default();
            let terminal: Vec<&str> = events
                .iter()
                .filter(|e| TERMINAL_KEYS.contains(&e.routing_key.as_str()))
                .map(|e| e.routing_key.as_str())
                .collect();
            let want = match task.status {
                TaskStatus::Completed => "video.generation.completed",
                TaskStatus::Cancelled => "video.generation.cancelled",
                _ => "video.generation.failed",
            };
            if terminal != [want] {
                books.bad_terminal_events.push(format!(
                    "{id}: {} but events {terminal:?}",
                    task.status.as_str()
                ));
            }
            let stops = events
                .iter()
                .filter(|e| e.routing_key == "video.progress.tracking_cancelled")
                .count();
            if stops != 1 {
                books
                    .bad_tracking_cancelled
                    .push(format!("{id}: {stops} tracking-cancelled events"));
            }
            if let (Some(job), Some(started), Some(finished)) =
                (&task.provider_task_id, task.started_at, task.finished_at)
            {
                let calls = stats.status_calls_by_job.get(job).copied().unwrap_or(0);
                books.status_calls += calls;
                let tracked = (finished - started).num_milliseconds().max(0) as u64;
                let overlapping = faults
                    .iter()
                    .filter(|f| f.from <= finished && f.to >= task.created_at)
                    .count() as u64;
                let allowance = tracked / MIN_INTERVAL_MS + 1 + overlapping;
                books.tightest = books.tightest.max(calls as f64 / allowance as f64);
                if calls > allowance {
                    books.forked.push(format!(
                        "{id}: {calls} status calls in {tracked} ms ({overlapping} faults; allowance {allowance})"
                    ));
                }
            }
        }
        books
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

/// Asserts the books are clean, naming every broken promise and where the logs are.
pub fn assert_clean(cluster: &Cluster, books: &Books) {
    let problems = books.problems();
    assert!(
        problems.is_empty(),
        "{}: the books do not balance (logs kept in {}):\n  {}",
        cluster.name,
        cluster.dir.display(),
        problems.join("\n  ")
    );
}

/// Runs a blocking command (a service control tool) and returns whether it succeeded, with its
/// output for messages.
pub fn run_tool(program: &str, args: &[&str]) -> (bool, String) {
    match std::process::Command::new(program).args(args).output() {
        Ok(out) => (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        ),
        Err(e) => (false, format!("cannot run {program}: {e}")),
    }
}

/// Lines of the broker under test's logs (`/var/log/rabbitmq/*.log`, or `VO_RABBITMQ_LOG_DIR`
/// for the RabbitMQ 4.0 pass) that contain both needles.
pub fn rabbit_log_lines(a: &str, b: &str) -> usize {
    let dir = std::env::var("VO_RABBITMQ_LOG_DIR").unwrap_or_else(|_| "/var/log/rabbitmq".into());
    let Ok(dir) = std::fs::read_dir(dir) else {
        return 0;
    };
    dir.flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".log"))
        .map(|e| {
            std::fs::read_to_string(e.path())
                .unwrap_or_default()
                .lines()
                .filter(|l| l.contains(a) && l.contains(b))
                .count()
        })
        .sum()
}
