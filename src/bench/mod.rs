//! `video-orchestrator bench`: progress-check throughput, scheduling lag and memory, measured
//! against the raw broker in one run, reported as ratios that hold on a noisy shared machine.
//!
//! # What runs
//! - The **simulated provider**, as a child process (`sim-provider`), so its memory and CPU are
//!   not counted as the service's.
//! - **Baseline**, in this process: a minimal lapin loop over the same topology (a prefix of its
//!   own), one self-scheduling hop per message — consume from the partition queues, publish with a
//!   pipelined confirm into the shortest delay tier, ack after the confirm — with the service's
//!   prefetch, concurrency, partition count and tier layout. Its rate is the ceiling `ratio`
//!   divides by. The direct hop (straight back into `video.progress`, no delay) is measured too.
//! - **The service**, as a child process (`serve --roles tracking,sweeper`) on a fresh prefix and
//!   the run's fresh database `vo_bench_<hex>`. Tasks are seeded straight into `video_tasks` as
//!   `processing` rows whose provider task ids are real jobs at the simulator; their first checks
//!   are published into the shortest tier, spread over one interval so the load is smooth.
//!
//! # Phases
//! 1. Baseline through the 1 s tier: a population of messages circulates; from 2,000, it grows by
//!    half while the rate is bound by the population (rate ≥ 90 % of population per second), up
//!    to six steps; the best step is the ceiling. Then the direct hop.
//! 2. Service at saturation: tasks at a 1 s interval, from half the baseline rate of them, growing
//!    by half while the rate is population-bound; the best step is `checks_per_sec`. Then half of
//!    that rate (chains beyond it are stopped through `tracking_stopped`, as the generation
//!    orchestrator does) for the lag.
//! 3. Memory: a fresh service process per task count (`--tasks-list`), at the shortest tier
//!    interval that keeps the check rate at or under the half-rate phase's (1k at 1 s, 10k at
//!    10 s, 100k at 120 s on this machine: a memory point's topology gets longer tiers when the
//!    configured ones are too short), RSS sampled through a window longer than one interval.
//!
//! # How figures are taken
//! Checks per second from `video_progress_checks_total` deltas (outcomes `progressed`,
//! `unchanged`, `finished`); lag from the `video_progress_scheduling_lag_seconds` histogram deltas
//! (interpolated inside buckets; `max` is the upper bound of the highest bucket reached) — for the
//! baseline it is exact, per message; CPU from `/proc/<pid>/stat`, RSS from `/proc/<pid>/status`,
//! steal and host load from `/proc/stat`. Lost checks: live chains that did not advance during a
//! window longer than their interval, plus sweeper re-arms. Duplicate checks: stale drops plus
//! provider status calls beyond the checks a task's row recorded (`checks_count`).

mod baseline;
mod child;
mod db;
mod procfs;
mod report;
mod scrape;
mod service;
mod stats;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures::StreamExt;
use lapin::{Connection, ConnectionProperties};
use secrecy::{ExposeSecret, SecretString};
use tokio_util::sync::CancellationToken;

use crate::broker::{Broker, BrokerOptions, Publisher};
use crate::config::Settings;
use crate::messages::{Meta, VideoProgressCheckRequested};
use crate::store::Store;
use crate::topology::Topology;

use baseline::{HopTarget, RawLoop};
use child::{free_port, ChildProc};
use procfs::{broker_pid, concurrent_builds, loadavg, CpuSnapshot, Watched};
pub use report::{
    render_human, BenchReport, CpuWindow, HopWindow, Integrity, LagMs, MachineInfo, MemoryPoint,
    RunConfig, ServiceWindow, Targets,
};
use service::{ServiceCounters, ServiceProc};
use stats::round2;
pub use stats::{histogram_max, histogram_quantile, lag_from_samples, percentile};

/// A rate at or above this share of `population / interval` is bound by the population, not by
/// the system: there is room for more.
const POPULATION_BOUND: f64 = 0.9;
/// Baseline and saturation ramps grow the population by this much (percent) per step, from
/// below, so the saturated step sits just past the knee rather than under a backlog of seconds.
const RAMP_GROWTH_PCT: usize = 150;
/// Baseline and saturation ramps stop after this many steps.
const MAX_RAMP_STEPS: usize = 6;

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Measured window of each phase.
    pub duration: Duration,
    /// Warm-up before each measured window.
    pub warmup: Duration,
    /// Tracked-task counts of the memory phases.
    pub tasks_list: Vec<usize>,
    /// A short run for development (one baseline step; figures are indicative only).
    pub quick: bool,
    /// Virtual keys (tenants) the tasks are spread over.
    pub tenants: usize,
}

impl BenchOptions {
    /// Defaults for a full run (`quick = false`) or a quick one, before command-line overrides.
    pub fn defaults(quick: bool) -> Self {
        if quick {
            Self {
                duration: Duration::from_secs(8),
                warmup: Duration::from_secs(4),
                tasks_list: vec![1000, 10000],
                quick,
                tenants: 64,
            }
        } else {
            Self {
                duration: Duration::from_secs(30),
                warmup: Duration::from_secs(10),
                tasks_list: vec![1000, 10000, 100000],
                quick,
                tenants: 64,
            }
        }
    }
}

/// The configured tiers, plus longer ones (doubling the longest, up to 16×) until one keeps
/// `tasks` checks under `budget` checks per second. A memory point's service runs on a topology
/// of its own, so it can have tiers the deployment does not.
pub fn memory_tiers(tasks: usize, budget_per_sec: f64, tiers: &[u64]) -> Vec<u64> {
    let mut tiers = tiers.to_vec();
    for _ in 0..4 {
        let Some(&longest) = tiers.last() else { break };
        if tasks as f64 * 1000.0 / longest as f64 <= budget_per_sec {
            break;
        }
        tiers.push(longest * 2);
    }
    tiers
}

/// The shortest tier whose interval keeps `tasks` checks under `budget` checks per second (the
/// longest tier when none does).
pub fn memory_interval_ms(tasks: usize, budget_per_sec: f64, tiers: &[u64]) -> u64 {
    tiers
        .iter()
        .copied()
        .find(|t| tasks as f64 * 1000.0 / *t as f64 <= budget_per_sec)
        .unwrap_or_else(|| tiers.last().copied().unwrap_or(1000))
}

fn tenant(index: usize, tenants: usize) -> String {
    format!("vk-bench-{:03}", index % tenants.max(1))
}

// ---------------------------------------------------------------------------------------------
// Seeding the service

/// A seeded task.
#[derive(Debug, Clone)]
struct Seeded {
    request_id: String,
    virtual_key: String,
}

/// Creates `n` jobs at the simulator (OpenAI protocol) lasting `duration_ms` each.
async fn create_jobs(ctx: &Ctx, n: usize, duration_ms: u64) -> anyhow::Result<Vec<String>> {
    let url = format!("{}/v1/videos", ctx.sim_url);
    let body = serde_json::json!({
        "model": "sim-bench",
        "prompt": format!("benchmark job [duration={duration_ms}]"),
    });
    let ids: Vec<anyhow::Result<String>> = futures::stream::iter(0..n)
        .map(|_| {
            let request = ctx
                .http
                .post(&url)
                .bearer_auth("sim-key")
                .json(&body)
                .send();
            async move {
                let v: serde_json::Value = request.await?.error_for_status()?.json().await?;
                v["id"]
                    .as_str()
                    .map(str::to_owned)
                    .context("the simulator answered without an id")
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    ids.into_iter().collect()
}

/// Inserts `processing` rows for `jobs` (request ids `{tag}-{index}`), each first check due at
/// `now + offsets[i]`.
async fn insert_tasks(
    ctx: &Ctx,
    tag: &str,
    first_index: usize,
    jobs: &[String],
    offsets_secs: &[f64],
) -> anyhow::Result<Vec<Seeded>> {
    let mut seeded = Vec::with_capacity(jobs.len());
    for (chunk_no, chunk) in jobs.chunks(5000).enumerate() {
        let base = first_index + chunk_no * 5000;
        let ids: Vec<String> = (0..chunk.len())
            .map(|i| format!("{tag}-{:07}", base + i))
            .collect();
        let keys: Vec<String> = (0..chunk.len())
            .map(|i| tenant(base + i, ctx.tenants))
            .collect();
        let offsets: Vec<f64> =
            offsets_secs[chunk_no * 5000..chunk_no * 5000 + chunk.len()].to_vec();
        db::insert_processing_tasks(&ctx.store, &ids, &keys, chunk, &offsets)
            .await
            .context("seeding video_tasks")?;
        seeded.extend(
            ids.into_iter()
                .zip(keys)
                .map(|(request_id, virtual_key)| Seeded {
                    request_id,
                    virtual_key,
                }),
        );
    }
    Ok(seeded)
}

/// Offsets (seconds from now) at which `n` first checks spread over `pace` fall due through the
/// `tier_ms` tier.
fn first_check_offsets(n: usize, pace: Duration, tier_ms: u64) -> Vec<f64> {
    let step = pace.as_secs_f64() / n.max(1) as f64;
    (0..n)
        .map(|i| i as f64 * step + tier_ms as f64 / 1000.0)
        .collect()
}

/// Publishes the first check of each task into the `tier_ms` tier, spread evenly over `pace`.
async fn publish_first_checks(
    publisher: &Publisher,
    topology: &Topology,
    tasks: &[Seeded],
    tier_ms: u64,
    pace: Duration,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let tick = Duration::from_millis(20);
    let ticks = (pace.as_millis() / tick.as_millis()).max(1) as usize;
    let per_tick = tasks.len().div_ceil(ticks).max(1);
    for (i, chunk) in tasks.chunks(per_tick).enumerate() {
        let publishes = chunk.iter().map(|t| {
            let now = crate::messages::now();
            let check = VideoProgressCheckRequested {
                meta: Meta::new(),
                request_id: t.request_id.clone(),
                virtual_key_id: t.virtual_key.clone(),
                scheduled_at: now
                    + chrono::Duration::milliseconds(i64::try_from(tier_ms).unwrap_or(1000)),
                interval_index: 0,
                start_time: now,
                sequence: 0,
            };
            let envelope = topology.delayed_check(tier_ms, &check);
            async move { publisher.publish(&envelope).await }
        });
        for r in futures::future::join_all(publishes).await {
            r.context("publishing a first check")?;
        }
        let next = started + tick * u32::try_from(i + 1).unwrap_or(u32::MAX);
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            tokio::time::sleep(wait).await;
        }
    }
    Ok(())
}

/// Fails the run when the broker connection dropped during a phase: on this shared machine that
/// means someone restarted RabbitMQ, and the window's figures are meaningless.
fn ensure_connected(conn: &Connection, phase: &str) -> anyhow::Result<()> {
    if conn.status().connected() {
        Ok(())
    } else {
        bail!(
            "the RabbitMQ connection dropped during the {phase} phase (was the broker restarted by \
             another process?); rerun when the machine is quiet"
        )
    }
}

/// A broker handle and publisher on `prefix` (declares its topology).
async fn publisher_for(
    ctx: &Ctx,
    prefix: &str,
) -> anyhow::Result<(Arc<Broker>, Publisher, CancellationToken)> {
    let mut settings = ctx.settings.clone();
    settings.topology.prefix = prefix.to_owned();
    settings.rabbitmq.connection_name = "video-orchestrator-bench seeder".to_owned();
    let topology = Topology::from_settings(&settings);
    let broker = Broker::connect(BrokerOptions::from_settings(&settings), topology)
        .await
        .context("connecting the seeder")?;
    let stop = CancellationToken::new();
    let publisher = Publisher::new(broker.clone(), stop.clone());
    Ok((broker, publisher, stop))
}

/// Live chains of `tag` that did not run since `since`.
async fn dead_chains(
    ctx: &Ctx,
    tag: &str,
    since: chrono::DateTime<chrono::Utc>,
) -> anyhow::Result<u64> {
    let n = db::count_stalled_chains(&ctx.store, tag, since).await?;
    Ok(u64::try_from(n).unwrap_or(0))
}

/// Provider status calls beyond what each task's row recorded. A task the bench stopped may show
/// one call more (the check read the row before the stop and could not advance it after).
async fn double_processed(ctx: &Ctx, tag: &str) -> anyhow::Result<u64> {
    let stats: serde_json::Value = ctx
        .http
        .get(format!("{}/sim/stats", ctx.sim_url))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let calls = stats["statusCallsByJob"]
        .as_object()
        .context("/sim/stats without statusCallsByJob")?;
    let mut extra = 0u64;
    for row in db::recorded_checks(&ctx.store, tag).await? {
        let Some(job) = row.provider_task_id else {
            continue;
        };
        let made = calls
            .get(&job)
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0);
        let allowed =
            u64::try_from(row.checks_count).unwrap_or(0) + u64::from(row.tracking_stopped);
        extra += made.saturating_sub(allowed);
    }
    Ok(extra)
}

/// Stops every chain of `tag` (as a terminal transition would), so later sweepers leave them.
async fn retire(ctx: &Ctx, tag: &str) -> anyhow::Result<()> {
    db::stop_tracking_tag(&ctx.store, tag).await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The run

/// What every phase shares.
#[derive(Debug)]
struct Ctx {
    /// The bench's settings: the configuration with the run's database.
    settings: Settings,
    /// The configuration as loaded (maintenance database), for clean-up.
    base_settings: Settings,
    options: BenchOptions,
    tenants: usize,
    run_id: String,
    exe: PathBuf,
    workdir: PathBuf,
    database: String,
    store: Store,
    http: reqwest::Client,
    sim_url: String,
    sim_pid: Option<u32>,
    broker_pid: Option<u32>,
    prefixes: Vec<String>,
    /// Prefixes whose topology has tiers other than the configured ones (memory points).
    prefix_tiers: Vec<(String, Vec<u64>)>,
}

impl Ctx {
    fn watched(&self, service: Option<u32>) -> Watched<'_> {
        Watched {
            service,
            sim: self.sim_pid,
            broker: self.broker_pid,
            database: &self.database,
        }
    }
}

fn say(msg: impl AsRef<str>) {
    eprintln!("bench: {}", msg.as_ref());
}

fn database_url(settings: &Settings, name: &str) -> anyhow::Result<String> {
    let mut url = url::Url::parse(settings.database.url.expose_secret())
        .context("database.url is not a URL")?;
    url.set_path(&format!("/{name}"));
    Ok(url.to_string())
}

async fn create_database(settings: &Settings, name: &str) -> anyhow::Result<()> {
    let opts = crate::store::connect_options(&settings.database)?;
    let mut conn = db::ServerConnection::open(&opts).await.with_context(|| {
        format!(
            "PostgreSQL is not reachable at {} (start it, or set APP__DATABASE__URL)",
            crate::app::describe_targets(settings).1
        )
    })?;
    conn.create_database(name)
        .await
        .with_context(|| format!("creating the bench database {name}"))?;
    conn.close().await;
    Ok(())
}

async fn drop_database(settings: &Settings, name: &str) {
    if let Ok(opts) = crate::store::connect_options(&settings.database) {
        if let Ok(mut conn) = db::ServerConnection::open(&opts).await {
            let _ = conn.drop_database(name).await;
            conn.close().await;
        }
    }
}

async fn raw_connection(settings: &Settings, name: &str) -> anyhow::Result<Connection> {
    let url = settings.rabbitmq.node_urls()[0].clone();
    Connection::connect(
        url.expose_secret(),
        ConnectionProperties::default().with_connection_name(name.into()),
    )
    .await
    .with_context(|| {
        format!(
            "RabbitMQ is not reachable at {} (start it, or set APP__RABBITMQ__URL)",
            crate::app::describe_targets(settings).0
        )
    })
}

/// Runs every phase and returns the report. Cleans up its prefixes, database and child
/// processes whatever happens.
///
/// # Errors
/// When RabbitMQ or PostgreSQL is unreachable, a child process cannot start, or a phase fails.
pub async fn run(settings: Settings, options: BenchOptions) -> anyhow::Result<BenchReport> {
    let hex = uuid::Uuid::new_v4().simple().to_string();
    let run_id = hex[..8].to_owned();
    let database = format!("vo_bench_{}", &hex[..12]);
    let workdir = std::env::temp_dir().join(format!("vo-bench-{run_id}"));
    std::fs::create_dir_all(&workdir).with_context(|| format!("creating {}", workdir.display()))?;
    // Fail fast with the hint before creating anything.
    let probe = raw_connection(&settings, "video-orchestrator-bench probe").await?;
    let _ = probe.close(200, "probe".into()).await;
    create_database(&settings, &database).await?;
    let mut bench_settings = settings.clone();
    bench_settings.database.url = SecretString::from(database_url(&settings, &database)?);
    let store = match Store::connect(&bench_settings.database).await {
        Ok(s) => s,
        Err(e) => {
            drop_database(&settings, &database).await;
            return Err(e).context("connecting to the bench database");
        }
    };
    let mut ctx = Ctx {
        tenants: options.tenants.max(1),
        settings: bench_settings,
        base_settings: settings,
        options,
        run_id,
        exe: std::env::current_exe().context("locating this executable")?,
        workdir,
        database,
        store,
        http: reqwest::Client::builder()
            .pool_max_idle_per_host(128)
            .timeout(Duration::from_secs(60))
            .build()?,
        sim_url: String::new(),
        sim_pid: None,
        broker_pid: broker_pid(),
        prefixes: Vec::new(),
        prefix_tiers: Vec::new(),
    };
    say(format!(
        "run {} — database {}, logs in {}",
        ctx.run_id,
        ctx.database,
        ctx.workdir.display()
    ));
    let result = phases(&mut ctx).await;
    cleanup(&ctx).await;
    result
}

async fn cleanup(ctx: &Ctx) {
    if let Ok(conn) = raw_connection(&ctx.settings, "video-orchestrator-bench cleanup").await {
        for prefix in &ctx.prefixes {
            let mut settings = ctx.settings.clone();
            settings.topology.prefix = prefix.clone();
            if let Some((_, tiers)) = ctx.prefix_tiers.iter().find(|(p, _)| p == prefix) {
                settings.tracking.delay_tiers_ms = tiers.clone();
            }
            let _ = Topology::from_settings(&settings).delete(&conn).await;
        }
        let _ = conn.close(200, "bench over".into()).await;
    }
    db::close(&ctx.store).await;
    drop_database(&ctx.base_settings, &ctx.database).await;
}

async fn phases(ctx: &mut Ctx) -> anyhow::Result<BenchReport> {
    let started_at = chrono::Utc::now();
    let started = Instant::now();
    let machine_start = (loadavg(), concurrent_builds());
    let run_cpu_before = CpuSnapshot::take(ctx.watched(None));
    if !machine_start.1.is_empty() {
        say(format!(
            "warning: {} build/test processes are running; figures will be skewed",
            machine_start.1.len()
        ));
    }

    // The simulated provider, out of process.
    let sim_addr = free_port()?;
    let mut sim = ChildProc::spawn(
        "sim-provider",
        &ctx.exe,
        &[
            "sim-provider",
            "--listen",
            &sim_addr.to_string(),
            "--duration-ms",
            "3600000",
        ],
        &[("RUST_LOG".to_owned(), "warn".to_owned())],
        ctx.workdir.join("sim-provider.log"),
    )?;
    ctx.sim_url = format!("http://{sim_addr}");
    ctx.sim_pid = Some(sim.pid);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = sim.exited() {
            bail!(
                "the simulated provider exited ({status}):\n{}",
                sim.log_tail()
            );
        }
        let up = ctx
            .http
            .get(format!("{}/sim/stats", ctx.sim_url))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        if up {
            break;
        }
        if Instant::now() > deadline {
            bail!("the simulated provider did not answer within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    say(format!(
        "simulated provider pid {} on {}",
        sim.pid, ctx.sim_url
    ));

    let result = measure_all(ctx, started_at, started, machine_start, run_cpu_before).await;
    sim.stop(Duration::from_secs(10)).await;
    result
}

async fn measure_all(
    ctx: &mut Ctx,
    started_at: chrono::DateTime<chrono::Utc>,
    started: Instant,
    machine_start: (String, Vec<String>),
    run_cpu_before: CpuSnapshot,
) -> anyhow::Result<BenchReport> {
    let opts = ctx.options.clone();
    let tracking = ctx.settings.tracking.clone();
    let shortest = tracking.delay_tiers_ms[0];

    // Jobs for the throughput phases, created first so they are past their queued tenth (and
    // report moving progress) by the time the service runs. They outlive the run.
    let job_secs: u64 = if opts.quick { 300 } else { 900 };
    let pool_size = if opts.quick { 6000 } else { 12000 };
    say(format!(
        "creating {pool_size} simulated jobs of {job_secs} s"
    ));
    let mut job_pool = create_jobs(ctx, pool_size, job_secs * 1000).await?;

    // 1. Baseline.
    let conn = raw_connection(&ctx.settings, "video-orchestrator-bench baseline").await?;
    let mut settings = ctx.settings.clone();
    settings.topology.prefix = format!("bench-{}-raw.", ctx.run_id);
    ctx.prefixes.push(settings.topology.prefix.clone());
    let raw_topology = Topology::from_settings(&settings);
    let mut raw = RawLoop::start(
        &conn,
        &raw_topology,
        HopTarget::Tier(shortest),
        tracking.prefetch,
        tracking.concurrency,
        ctx.tenants,
    )
    .await?;
    let mut steps = Vec::new();
    let mut population = 2000;
    let mut added = 0;
    for step in 0..MAX_RAMP_STEPS {
        raw.add(population - added, Duration::from_millis(shortest))
            .await?;
        added = population;
        let w = raw
            .measure(opts.warmup, opts.duration, ctx.watched(None))
            .await;
        ensure_connected(&conn, "baseline")?;
        say(format!(
            "baseline step {}: {} messages → {:.0} hops/s, lag p50 {:.1} ms p99 {:.1} ms, steal {:.1} %, other {:.1} s CPU",
            step + 1,
            w.population,
            w.hops_per_sec,
            w.lag_ms.p50,
            w.lag_ms.p99,
            w.cpu.steal_pct,
            w.cpu.other_cpu_secs
        ));
        let bound =
            w.hops_per_sec >= POPULATION_BOUND * population as f64 * 1000.0 / shortest as f64;
        steps.push(w);
        if !bound {
            break;
        }
        population = population * RAMP_GROWTH_PCT / 100;
    }
    raw.shutdown().await;
    let baseline = steps
        .iter()
        .max_by(|a, b| a.hops_per_sec.total_cmp(&b.hops_per_sec))
        .cloned()
        .context("no baseline step")?;

    settings.topology.prefix = format!("bench-{}-direct.", ctx.run_id);
    ctx.prefixes.push(settings.topology.prefix.clone());
    let direct_topology = Topology::from_settings(&settings);
    let mut direct = RawLoop::start(
        &conn,
        &direct_topology,
        HopTarget::Direct,
        tracking.prefetch,
        tracking.concurrency,
        ctx.tenants,
    )
    .await?;
    direct
        .add(tracking.concurrency * 4, Duration::from_millis(20))
        .await?;
    let direct_window = direct
        .measure(opts.warmup / 2, opts.duration / 2, ctx.watched(None))
        .await;
    ensure_connected(&conn, "direct hop")?;
    direct.shutdown().await;
    let _ = conn.close(200, "baseline over".into()).await;
    say(format!(
        "direct hop: {:.0} hops/s",
        direct_window.hops_per_sec
    ));

    // 2. The service at saturation, then at half of it.
    let tag = "thr";
    let prefix = format!("bench-{}-svc.", ctx.run_id);
    ctx.prefixes.push(prefix.clone());
    let service = ServiceProc::start(ctx, &prefix, shortest, None, "throughput").await?;
    say(format!(
        "service pid {} (throughput, {} ms interval) on {}",
        service.pid(),
        shortest,
        service.http
    ));
    let (_broker, publisher, publisher_stop) = publisher_for(ctx, &prefix).await?;
    let topology = {
        let mut s = ctx.settings.clone();
        s.topology.prefix = prefix.clone();
        Topology::from_settings(&s)
    };
    let mut tasks: Vec<Seeded> = Vec::new();
    let mut target = ((baseline.hops_per_sec * 0.5) as usize).max(500);
    let mut saturation_steps = Vec::new();
    for step in 0..MAX_RAMP_STEPS {
        let n = target - tasks.len();
        let mut jobs: Vec<String> = job_pool.drain(..n.min(job_pool.len())).collect();
        if jobs.len() < n {
            jobs.extend(create_jobs(ctx, n - jobs.len(), job_secs * 1000).await?);
        }
        let pace = Duration::from_millis(shortest);
        let offsets = first_check_offsets(n, pace, shortest);
        let new = insert_tasks(ctx, tag, tasks.len(), &jobs, &offsets).await?;
        publish_first_checks(&publisher, &topology, &new, shortest, pace).await?;
        tasks.extend(new);
        tokio::time::sleep(opts.warmup).await;
        let w = service
            .measure(ctx, opts.duration, tasks.len(), shortest)
            .await?;
        say(format!(
            "service step {}: {} tasks → {:.0} checks/s (ratio {:.2}), lag p50 {:.1} ms p99 {:.1} ms, {:.3} CPU s/1k checks, steal {:.1} %, other {:.1} s CPU",
            step + 1,
            w.tracked_tasks,
            w.checks_per_sec,
            w.checks_per_sec / baseline.hops_per_sec.max(1.0),
            w.lag_ms.p50,
            w.lag_ms.p99,
            w.cpu_seconds_per_1000_checks,
            w.cpu.steal_pct,
            w.cpu.other_cpu_secs
        ));
        let bound =
            w.checks_per_sec >= POPULATION_BOUND * tasks.len() as f64 * 1000.0 / shortest as f64;
        saturation_steps.push(w);
        if !bound {
            break;
        }
        target = tasks.len() * RAMP_GROWTH_PCT / 100;
    }
    let saturated = saturation_steps
        .iter()
        .max_by(|a, b| a.checks_per_sec.total_cmp(&b.checks_per_sec))
        .cloned()
        .context("no saturation step")?;

    // Half of the saturated rate: keep every k-th chain, stop the others.
    let keep = ((saturated.checks_per_sec / 2.0 * shortest as f64 / 1000.0).round() as usize)
        .clamp(1, tasks.len());
    let stride = tasks.len() as f64 / keep as f64;
    let kept: std::collections::HashSet<usize> =
        (0..keep).map(|i| (i as f64 * stride) as usize).collect();
    let stop_ids: Vec<String> = tasks
        .iter()
        .enumerate()
        .filter(|(i, _)| !kept.contains(i))
        .map(|(_, t)| t.request_id.clone())
        .collect();
    db::stop_tracking(&ctx.store, &stop_ids).await?;
    // Stopped chains die on their next arrival; the backlog of saturation drains.
    tokio::time::sleep(opts.warmup + Duration::from_secs(3)).await;
    let window_start = chrono::Utc::now();
    let half = service.measure(ctx, opts.duration, keep, shortest).await?;
    say(format!(
        "service at half rate: {} tasks → {:.0} checks/s, lag p50 {:.1} ms p99 {:.1} ms max ≤ {:.0} ms, {:.3} CPU s/1k checks, steal {:.1} %",
        keep,
        half.checks_per_sec,
        half.lag_ms.p50,
        half.lag_ms.p99,
        half.lag_ms.max,
        half.cpu_seconds_per_1000_checks,
        half.cpu.steal_pct
    ));
    let throughput_integrity = finish_service(ctx, service, tag, tasks.len(), window_start).await?;
    publisher_stop.cancel();
    drop(publisher);

    // 3. Memory at each task count, one fresh service process each, at a rate no higher than
    // the half-rate phase's (where the lag was measured): memory should follow the task count,
    // not a backlog.
    let budget = half.checks_per_sec.max(100.0);
    let mut memory = Vec::new();
    for &n in &opts.tasks_list {
        let tiers = memory_tiers(n, budget, &tracking.delay_tiers_ms);
        let interval = memory_interval_ms(n, budget, &tiers);
        let tag = format!("m{n}");
        let prefix = format!("bench-{}-m{n}.", ctx.run_id);
        ctx.prefixes.push(prefix.clone());
        say(format!(
            "memory: {n} tasks at {interval} ms — creating jobs"
        ));
        let jobs = create_jobs(ctx, n, 3_600_000).await?;
        let extra_tiers = (tiers != tracking.delay_tiers_ms).then_some(tiers.as_slice());
        if let Some(t) = extra_tiers {
            ctx.prefix_tiers.push((prefix.clone(), t.to_vec()));
            say(format!(
                "memory: {n} tasks get longer tiers on their own topology: {t:?} ms"
            ));
        }
        let service = ServiceProc::start(ctx, &prefix, interval, extra_tiers, &tag).await?;
        say(format!("service pid {} ({n} tasks)", service.pid()));
        let (_broker, publisher, publisher_stop) = publisher_for(ctx, &prefix).await?;
        let topology = {
            let mut s = ctx.settings.clone();
            s.topology.prefix = prefix.clone();
            Topology::from_settings(&s)
        };
        // First checks through the shortest tier, spread over one interval: a steady rate.
        let pace = Duration::from_millis(interval);
        let offsets = first_check_offsets(n, pace, shortest);
        let seeded = insert_tasks(ctx, &tag, 0, &jobs, &offsets).await?;
        publish_first_checks(&publisher, &topology, &seeded, shortest, pace).await?;
        tokio::time::sleep(opts.warmup).await;
        let window = opts.duration.max(pace + Duration::from_secs(15));
        let window_start = chrono::Utc::now();
        let w = service.measure(ctx, window, n, interval).await?;
        let hwm = service.hwm_mb();
        say(format!(
            "memory: {n} tasks → RSS {:.1} MB (mean {:.1}, peak since start {:.1}), {:.0} checks/s, lag p99 {:.1} ms",
            w.service_rss_mb, w.service_rss_mean_mb, hwm, w.checks_per_sec, w.lag_ms.p99
        ));
        let integrity = finish_service(ctx, service, &tag, n, window_start).await?;
        publisher_stop.cancel();
        memory.push(MemoryPoint {
            tracked_tasks: n,
            service_rss_hwm_mb: hwm,
            window: w,
            integrity,
        });
    }

    let run_cpu = CpuSnapshot::take(ctx.watched(None)).since(&run_cpu_before);
    let all_integrity: Vec<&Integrity> = std::iter::once(&throughput_integrity)
        .chain(memory.iter().map(|m| &m.integrity))
        .collect();
    let lost_checks: u64 = all_integrity
        .iter()
        .map(|i| i.dead_chains + i.rearmed)
        .sum();
    let duplicate_checks: u64 = all_integrity
        .iter()
        .map(|i| i.stale + i.double_processed)
        .sum();
    let ratio = (saturated.checks_per_sec / baseline.hops_per_sec.max(1.0) * 100.0).round() / 100.0;
    let rss: Vec<f64> = memory.iter().map(|m| m.window.service_rss_mb).collect();
    let rss_min = rss.iter().copied().fold(f64::INFINITY, f64::min);
    let rss_max = rss.iter().copied().fold(0.0, f64::max);
    let targets = Targets {
        ratio_at_least_0_6: ratio >= 0.6,
        lag_p99_at_most_50ms: half.lag_ms.p99 <= 50.0,
        rss_flat_within_20pct: !rss.is_empty() && rss_max <= rss_min * 1.2,
        rss_under_100mb: !rss.is_empty() && rss_max < 100.0,
        no_lost_or_duplicate_checks: lost_checks == 0 && duplicate_checks == 0,
    };
    Ok(BenchReport {
        version: 1,
        started_at: crate::messages::rfc3339(started_at),
        elapsed_secs: round2(started.elapsed().as_secs_f64()),
        baseline_hops_per_sec: baseline.hops_per_sec,
        direct_hops_per_sec: direct_window.hops_per_sec,
        checks_per_sec: saturated.checks_per_sec,
        ratio,
        lag_ms: half.lag_ms.clone(),
        half_rate_checks_per_sec: half.checks_per_sec,
        tracked_tasks: memory.iter().map(|m| m.tracked_tasks).collect(),
        service_rss_mb: rss,
        lost_checks,
        duplicate_checks,
        cpu_seconds_per_1000_checks: saturated.cpu_seconds_per_1000_checks,
        cpu_seconds_per_1000_checks_half_rate: half.cpu_seconds_per_1000_checks,
        baseline_cpu_seconds_per_1000_hops: baseline.client_cpu_seconds_per_1000_hops,
        steal_pct: run_cpu.steal_pct,
        targets,
        machine: MachineInfo {
            cpus: std::thread::available_parallelism().map_or(0, usize::from),
            loadavg_start: machine_start.0,
            loadavg_end: loadavg(),
            concurrent_builds_start: machine_start.1,
            concurrent_builds_end: concurrent_builds(),
            steal_pct: run_cpu.steal_pct,
            other_cpu_pct: {
                // Over the measured windows, where every process of ours is attributed.
                let cpus = std::thread::available_parallelism().map_or(1, usize::from) as f64;
                let windows: Vec<&CpuWindow> = steps
                    .iter()
                    .map(|w| &w.cpu)
                    .chain(std::iter::once(&direct_window.cpu))
                    .chain(saturation_steps.iter().map(|w| &w.cpu))
                    .chain(std::iter::once(&half.cpu))
                    .chain(memory.iter().map(|m| &m.window.cpu))
                    .collect();
                let wall: f64 = windows.iter().map(|c| c.wall_secs).sum();
                let other: f64 = windows.iter().map(|c| c.other_cpu_secs).sum();
                if wall > 0.0 {
                    round2(other / (wall * cpus) * 100.0)
                } else {
                    0.0
                }
            },
        },
        config: RunConfig {
            partitions: ctx.settings.topology.partitions,
            prefetch: tracking.prefetch,
            concurrency: tracking.concurrency,
            per_key_concurrency: tracking.per_key_concurrency,
            delay_tiers_ms: tracking.delay_tiers_ms.clone(),
            tenants: ctx.tenants,
            warmup_secs: opts.warmup.as_secs_f64(),
            duration_secs: opts.duration.as_secs_f64(),
            quick: opts.quick,
            throughput_job_duration_secs: job_secs,
        },
        baseline_steps: steps,
        direct: direct_window,
        saturation_steps,
        half_rate: half,
        throughput_integrity,
        memory,
    })
}

/// Counts dead chains, reads the service's counters, stops it (SIGTERM: in-flight checks finish),
/// compares provider calls with the rows, and retires the tasks.
async fn finish_service(
    ctx: &Ctx,
    service: ServiceProc,
    tag: &str,
    tasks: usize,
    window_start: chrono::DateTime<chrono::Utc>,
) -> anyhow::Result<Integrity> {
    let dead = dead_chains(ctx, tag, window_start).await?;
    let ServiceCounters {
        rearmed,
        stale,
        errors,
        republished,
    } = service.counters(ctx).await?;
    let prefix = service.prefix.clone();
    service.proc.stop(Duration::from_secs(45)).await;
    let double = double_processed(ctx, tag).await?;
    retire(ctx, tag).await?;
    let integrity = Integrity {
        tasks,
        dead_chains: dead,
        rearmed,
        stale,
        double_processed: double,
        errors,
        republished,
    };
    say(format!(
        "{prefix}: {} tasks, {} dead chains, {} re-armed, {} stale, {} double-processed, {} errors",
        tasks, dead, rearmed, stale, double, errors
    ));
    Ok(integrity)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_intervals_keep_the_rate_under_budget() {
        let tiers = [1000, 2000, 5000, 10000, 30000, 60000];
        assert_eq!(memory_interval_ms(1000, 1750.0, &tiers), 1000);
        assert_eq!(memory_interval_ms(10000, 1750.0, &tiers), 10000);
        assert_eq!(memory_interval_ms(100000, 1750.0, &tiers), 60000);
        assert_eq!(memory_interval_ms(1_000_000, 1750.0, &tiers), 60000);
    }

    #[test]
    fn memory_tiers_grow_only_when_the_longest_is_too_busy() {
        let tiers = [1000, 2000, 5000, 10000, 30000, 60000];
        assert_eq!(memory_tiers(10_000, 1500.0, &tiers), tiers.to_vec());
        let longer = memory_tiers(100_000, 1500.0, &tiers);
        assert_eq!(longer.last(), Some(&120_000));
        assert_eq!(memory_interval_ms(100_000, 1500.0, &longer), 120_000);
        // Capped at 16× the longest configured tier.
        assert_eq!(
            memory_tiers(100_000_000, 1.0, &tiers).last(),
            Some(&960_000)
        );
    }

    #[test]
    fn first_checks_are_spread_over_the_pace() {
        let o = first_check_offsets(4, Duration::from_secs(2), 1000);
        assert_eq!(o, vec![1.0, 1.5, 2.0, 2.5]);
    }

    /// A short end-to-end run against the local RabbitMQ and PostgreSQL (`cargo test -- --ignored
    /// quick_bench`); needs the built binary, so it runs `cargo run -- bench --quick` instead of
    /// this test binary (which cannot serve).
    #[tokio::test]
    #[ignore = "needs RabbitMQ, PostgreSQL and minutes of an idle machine"]
    async fn quick_bench_runs_end_to_end() {
        let status = tokio::process::Command::new(env!("CARGO"))
            .args(["run", "--release", "--", "bench", "--quick", "--json"])
            .stdout(std::process::Stdio::piped())
            .output()
            .await
            .expect("cargo runs");
        assert!(status.status.success(), "bench failed");
        let report: serde_json::Value =
            serde_json::from_slice(&status.stdout).expect("one JSON object");
        for field in [
            "baseline_hops_per_sec",
            "checks_per_sec",
            "ratio",
            "lag_ms",
            "tracked_tasks",
            "service_rss_mb",
            "lost_checks",
            "duplicate_checks",
            "cpu_seconds_per_1000_checks",
        ] {
            assert!(report.get(field).is_some(), "missing {field}");
        }
    }
}
