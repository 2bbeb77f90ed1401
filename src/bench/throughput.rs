//! Phase 2: the service at saturation, then at half of that rate for the lag. One service
//! process, 1 s interval (the shortest tier).

use std::collections::HashSet;
use std::time::Duration;

use anyhow::Context;

use super::integrity::finish_service;
use super::ramp::{climb, fastest};
use super::report::{Integrity, ServiceWindow};
use super::seeding::{JobPool, Seeded, Seeder};
use super::service::ServiceProc;
use super::{say, Ctx};

/// Request ids of this phase's tasks are `thr-<index>`.
const TAG: &str = "thr";
/// The saturation ramp never starts below this many tasks.
const MIN_FIRST_TASKS: usize = 500;

/// What the service does on this machine.
#[derive(Debug)]
pub(super) struct Throughput {
    /// The saturation ramp.
    pub(super) saturation_steps: Vec<ServiceWindow>,
    /// The fastest step: `checks_per_sec`.
    pub(super) saturated: ServiceWindow,
    /// Half of the saturated rate, where the lag is taken.
    pub(super) half_rate: ServiceWindow,
    /// Chain integrity of the phase's service process.
    pub(super) integrity: Integrity,
    /// Duration of the simulated jobs the tasks track.
    pub(super) job_duration_secs: u64,
}

/// A measured half-rate window and when it began.
#[derive(Debug)]
struct HalfRate {
    window: ServiceWindow,
    started_at: chrono::DateTime<chrono::Utc>,
}

/// Phase 2: tasks from half the baseline's rate of them, growing while the rate keeps up; then
/// half of the fastest step's rate.
pub(super) async fn measure(
    ctx: &mut Ctx,
    baseline_hops_per_sec: f64,
    mut jobs: JobPool,
) -> anyhow::Result<Throughput> {
    let interval_ms = ctx.shortest_tier_ms();
    let prefix = ctx.new_topology("svc", None).prefix().to_owned();
    let ctx: &Ctx = ctx;
    let service = ServiceProc::start(ctx, &prefix, interval_ms, None, "throughput").await?;
    say(format!(
        "service pid {} (throughput, {} ms interval) on {}",
        service.pid(),
        interval_ms,
        service.http
    ));
    let seeder = Seeder::connect(ctx, &prefix).await?;
    let mut tasks = Vec::new();
    let saturation_steps = saturate(
        ctx,
        &service,
        &seeder,
        &mut jobs,
        &mut tasks,
        baseline_hops_per_sec,
    )
    .await?;
    let saturated = fastest(&saturation_steps).context("no saturation step")?;
    let half = half_rate(ctx, &service, &tasks, saturated.checks_per_sec).await?;
    let integrity = finish_service(ctx, service, TAG, tasks.len(), half.started_at).await?;
    seeder.stop();
    Ok(Throughput {
        saturation_steps,
        saturated,
        half_rate: half.window,
        integrity,
        job_duration_secs: jobs.duration_secs,
    })
}

/// The saturation ramp; every step's new tasks are added to `tasks`.
async fn saturate(
    ctx: &Ctx,
    service: &ServiceProc,
    seeder: &Seeder,
    jobs: &mut JobPool,
    tasks: &mut Vec<Seeded>,
    baseline_hops_per_sec: f64,
) -> anyhow::Result<Vec<ServiceWindow>> {
    let interval_ms = ctx.shortest_tier_ms();
    let first = ((baseline_hops_per_sec * 0.5) as usize).max(MIN_FIRST_TASKS);
    climb(first, interval_ms, async |step, population| {
        let new_jobs = jobs.take(ctx, population - tasks.len()).await?;
        let pace = Duration::from_millis(interval_ms);
        let new = seeder.seed(ctx, TAG, tasks.len(), &new_jobs, pace).await?;
        tasks.extend(new);
        tokio::time::sleep(ctx.options.warmup).await;
        let w = service
            .measure(ctx, ctx.options.duration, tasks.len(), interval_ms)
            .await?;
        say(format!(
            "service step {}: {} tasks → {:.0} checks/s (ratio {:.2}), lag p50 {:.1} ms p99 {:.1} ms, {:.3} CPU s/1k checks, steal {:.1} %, other {:.1} s CPU",
            step + 1,
            w.tracked_tasks,
            w.checks_per_sec,
            w.checks_per_sec / baseline_hops_per_sec.max(1.0),
            w.lag_ms.p50,
            w.lag_ms.p99,
            w.cpu_seconds_per_1000_checks,
            w.cpu.steal_pct,
            w.cpu.other_cpu_secs
        ));
        Ok(w)
    })
    .await
}

/// Keeps every k-th chain and stops the others through `tracking_stopped` (as the generation
/// orchestrator does), so the rate is half the saturated one; lets the backlog drain; measures.
async fn half_rate(
    ctx: &Ctx,
    service: &ServiceProc,
    tasks: &[Seeded],
    saturated_checks_per_sec: f64,
) -> anyhow::Result<HalfRate> {
    let interval_ms = ctx.shortest_tier_ms();
    let keep = ((saturated_checks_per_sec / 2.0 * interval_ms as f64 / 1000.0).round() as usize)
        .clamp(1, tasks.len());
    let stride = tasks.len() as f64 / keep as f64;
    let kept: HashSet<usize> = (0..keep).map(|i| (i as f64 * stride) as usize).collect();
    let stop_ids: Vec<String> = tasks
        .iter()
        .enumerate()
        .filter(|(i, _)| !kept.contains(i))
        .map(|(_, t)| t.request_id.clone())
        .collect();
    ctx.store.stop_tracking(&stop_ids).await?;
    // Stopped chains die on their next arrival; the backlog of saturation drains.
    tokio::time::sleep(ctx.options.warmup + Duration::from_secs(3)).await;
    let started_at = chrono::Utc::now();
    let window = service
        .measure(ctx, ctx.options.duration, keep, interval_ms)
        .await?;
    say(format!(
        "service at half rate: {} tasks → {:.0} checks/s, lag p50 {:.1} ms p99 {:.1} ms max ≤ {:.0} ms, {:.3} CPU s/1k checks, steal {:.1} %",
        keep,
        window.checks_per_sec,
        window.lag_ms.p50,
        window.lag_ms.p99,
        window.lag_ms.max,
        window.cpu_seconds_per_1000_checks,
        window.cpu.steal_pct
    ));
    Ok(HalfRate { window, started_at })
}
