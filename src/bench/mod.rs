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
//!
//! # Layout
//! - this file: options, the run's context, set-up and clean-up, the phases in order;
//! - `baseline`, `throughput`, `memory`: the three phases (the first also holds the raw
//!   loop); `ramp`: the population ramp the first two climb; `summary`: the report from them;
//! - `service`, `child`: the service and the simulated provider as child processes;
//!   `seeding`: jobs, rows and first checks; `integrity`: lost and duplicate checks;
//!   `db`: every SQL statement;
//! - `procfs`, `scrape`, `stats`: CPU and memory from `/proc`, the service's metrics,
//!   percentiles; `report`: the report's JSON fields and text.

mod baseline;
mod child;
mod integrity;
mod memory;
mod procfs;
mod ramp;
mod report;
mod scrape;
mod seeding;
mod service;
mod stats;
mod summary;
mod throughput;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use lapin::{Connection, ConnectionProperties};
use secrecy::ExposeSecret;

use crate::config::Settings;
use crate::store::{ScratchDatabase, Store};
use crate::topology::Topology;

pub use memory::{memory_interval_ms, memory_tiers};
use procfs::{broker_pid, Watched};
pub use report::{
    render_human, BenchReport, CpuWindow, HopWindow, Integrity, LagMs, MachineInfo, MemoryPoint,
    RunConfig, ServiceWindow, Targets,
};
pub use stats::{histogram_max, histogram_quantile, lag_from_samples, percentile};
use summary::{Phases, RunStart};

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

/// What every phase shares.
#[derive(Debug)]
struct Ctx {
    /// The bench's settings: the configuration with the run's database.
    settings: Settings,
    /// The run's own database, dropped at the end.
    scratch: ScratchDatabase,
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
    /// Every topology the run declared (or was about to), deleted at the end.
    topologies: Vec<Topology>,
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

    /// GETs `url`; a status other than success is an error.
    async fn get(&self, url: String) -> reqwest::Result<reqwest::Response> {
        self.http.get(url).send().await?.error_for_status()
    }

    /// The bench's settings on topology prefix `prefix`.
    fn settings_on(&self, prefix: &str) -> Settings {
        let mut settings = self.settings.clone();
        settings.topology.prefix = prefix.to_owned();
        settings
    }

    /// A fresh topology `bench-<run>-<name>.`, with `delay_tiers_ms` instead of the configured
    /// tiers when given; recorded for clean-up.
    fn new_topology(&mut self, name: &str, delay_tiers_ms: Option<&[u64]>) -> Topology {
        let mut settings = self.settings_on(&format!("bench-{}-{name}.", self.run_id));
        if let Some(tiers) = delay_tiers_ms {
            settings.tracking.delay_tiers_ms = tiers.to_vec();
        }
        let topology = Topology::from_settings(&settings);
        self.topologies.push(topology.clone());
        topology
    }

    /// The shortest delay tier: the service's interval in the throughput phases, and the tier
    /// every first check goes through.
    fn shortest_tier_ms(&self) -> u64 {
        self.settings.tracking.delay_tiers_ms[0]
    }
}

fn say(msg: impl AsRef<str>) {
    eprintln!("bench: {}", msg.as_ref());
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
            settings.targets().rabbitmq
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
    if !ScratchDatabase::server_answers(&settings.database, Duration::from_secs(5)).await {
        anyhow::bail!(
            "PostgreSQL is not reachable at {} (start it, or set APP__DATABASE__URL)",
            &settings.targets().database
        );
    }
    let scratch = ScratchDatabase::create(&settings.database, &database)
        .await
        .with_context(|| format!("creating the bench database {database}"))?;
    let mut bench_settings = settings.clone();
    bench_settings.database.url = scratch.url()?;
    let store = match Store::connect(&bench_settings.database).await {
        Ok(s) => s,
        Err(e) => {
            scratch.remove().await;
            return Err(e).context("connecting to the bench database");
        }
    };
    let mut ctx = Ctx {
        tenants: options.tenants.max(1),
        settings: bench_settings,
        scratch,
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
        topologies: Vec::new(),
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
        for topology in &ctx.topologies {
            let _ = topology.delete(&conn).await;
        }
        let _ = conn.close(200, "bench over".into()).await;
    }
    ctx.store.close().await;
    ctx.scratch.remove().await;
}

/// The phases in order, with the simulated provider up for all of them.
async fn phases(ctx: &mut Ctx) -> anyhow::Result<BenchReport> {
    let start = RunStart::now(ctx);
    if !start.concurrent_builds.is_empty() {
        say(format!(
            "warning: {} build/test processes are running; figures will be skewed",
            start.concurrent_builds.len()
        ));
    }
    let sim = child::start_sim_provider(ctx).await?;
    let report = measure_all(ctx)
        .await
        .map(|phases| summary::report(ctx, start, phases));
    sim.stop(Duration::from_secs(10)).await;
    report
}

async fn measure_all(ctx: &mut Ctx) -> anyhow::Result<Phases> {
    // Jobs for the throughput phase, created first so they are under way by the time the service
    // runs.
    let (job_secs, pool_size) = if ctx.options.quick {
        (300, 6000)
    } else {
        (900, 12000)
    };
    say(format!(
        "creating {pool_size} simulated jobs of {job_secs} s"
    ));
    let jobs = seeding::JobPool::create(ctx, pool_size, job_secs).await?;
    let baseline = baseline::measure(ctx).await?;
    let throughput = throughput::measure(ctx, baseline.ceiling.hops_per_sec, jobs).await?;
    let memory = memory::measure(ctx, throughput.half_rate.checks_per_sec.max(100.0)).await?;
    Ok(Phases {
        baseline,
        throughput,
        memory,
    })
}

#[cfg(test)]
mod tests {
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
