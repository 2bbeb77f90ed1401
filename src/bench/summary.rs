//! The report from the phases' windows: headline figures, targets, machine state.

use std::time::Instant;

use super::baseline::Baseline;
use super::procfs::{concurrent_builds, loadavg, CpuSnapshot};
use super::report::{
    BenchReport, CpuWindow, Integrity, MachineInfo, MemoryPoint, RunConfig, ServiceWindow, Targets,
};
use super::stats::round2;
use super::throughput::Throughput;
use super::Ctx;

/// The clock and the machine when the run began.
#[derive(Debug)]
pub(super) struct RunStart {
    started_at: chrono::DateTime<chrono::Utc>,
    started: Instant,
    loadavg: String,
    /// Other engineers' builds and tests running at the start.
    pub(super) concurrent_builds: Vec<String>,
    cpu: CpuSnapshot,
}

impl RunStart {
    pub(super) fn now(ctx: &Ctx) -> Self {
        Self {
            started_at: chrono::Utc::now(),
            started: Instant::now(),
            loadavg: loadavg(),
            concurrent_builds: concurrent_builds(),
            cpu: CpuSnapshot::take(ctx.watched(None)),
        }
    }
}

/// Everything the phases measured.
#[derive(Debug)]
pub(super) struct Phases {
    pub(super) baseline: Baseline,
    pub(super) throughput: Throughput,
    pub(super) memory: Vec<MemoryPoint>,
}

/// The report: the headline figures from the phases' best windows, and the targets.
pub(super) fn report(ctx: &Ctx, start: RunStart, phases: Phases) -> BenchReport {
    let Phases {
        baseline,
        throughput,
        memory,
    } = phases;
    let run_cpu = CpuSnapshot::take(ctx.watched(None)).since(&start.cpu);
    let all_integrity: Vec<&Integrity> = std::iter::once(&throughput.integrity)
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
    let saturated = &throughput.saturated;
    let half = &throughput.half_rate;
    let ceiling = &baseline.ceiling;
    let ratio = (saturated.checks_per_sec / ceiling.hops_per_sec.max(1.0) * 100.0).round() / 100.0;
    let rss: Vec<f64> = memory.iter().map(|m| m.window.service_rss_mb).collect();
    let targets = targets(ratio, half, &rss, lost_checks, duplicate_checks);
    let other_cpu_pct = other_cpu_pct(&baseline, &throughput, &memory);
    let tracking = &ctx.settings.tracking;
    let options = &ctx.options;
    BenchReport {
        version: 1,
        started_at: crate::messages::rfc3339(start.started_at),
        elapsed_secs: round2(start.started.elapsed().as_secs_f64()),
        baseline_hops_per_sec: ceiling.hops_per_sec,
        direct_hops_per_sec: baseline.direct.hops_per_sec,
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
        baseline_cpu_seconds_per_1000_hops: ceiling.client_cpu_seconds_per_1000_hops,
        steal_pct: run_cpu.steal_pct,
        targets,
        machine: MachineInfo {
            cpus: std::thread::available_parallelism().map_or(0, usize::from),
            loadavg_start: start.loadavg,
            loadavg_end: loadavg(),
            concurrent_builds_start: start.concurrent_builds,
            concurrent_builds_end: concurrent_builds(),
            steal_pct: run_cpu.steal_pct,
            other_cpu_pct,
        },
        config: RunConfig {
            partitions: ctx.settings.topology.partitions,
            prefetch: tracking.prefetch,
            concurrency: tracking.concurrency,
            per_key_concurrency: tracking.per_key_concurrency,
            delay_tiers_ms: tracking.delay_tiers_ms.clone(),
            tenants: ctx.tenants,
            warmup_secs: options.warmup.as_secs_f64(),
            duration_secs: options.duration.as_secs_f64(),
            quick: options.quick,
            throughput_job_duration_secs: throughput.job_duration_secs,
        },
        baseline_steps: baseline.steps,
        direct: baseline.direct,
        saturation_steps: throughput.saturation_steps,
        half_rate: throughput.half_rate,
        throughput_integrity: throughput.integrity,
        memory,
    }
}

fn targets(
    ratio: f64,
    half_rate: &ServiceWindow,
    rss: &[f64],
    lost_checks: u64,
    duplicate_checks: u64,
) -> Targets {
    let rss_min = rss.iter().copied().fold(f64::INFINITY, f64::min);
    let rss_max = rss.iter().copied().fold(0.0, f64::max);
    Targets {
        ratio_at_least_0_6: ratio >= 0.6,
        lag_p99_at_most_50ms: half_rate.lag_ms.p99 <= 50.0,
        rss_flat_within_20pct: !rss.is_empty() && rss_max <= rss_min * 1.2,
        rss_under_100mb: !rss.is_empty() && rss_max < 100.0,
        no_lost_or_duplicate_checks: lost_checks == 0 && duplicate_checks == 0,
    }
}

/// Host CPU used by processes outside the bench, percent of all cores, over the measured
/// windows (where every process of ours is attributed).
fn other_cpu_pct(baseline: &Baseline, throughput: &Throughput, memory: &[MemoryPoint]) -> f64 {
    let cpus = std::thread::available_parallelism().map_or(1, usize::from) as f64;
    let windows: Vec<&CpuWindow> = baseline
        .steps
        .iter()
        .map(|w| &w.cpu)
        .chain(std::iter::once(&baseline.direct.cpu))
        .chain(throughput.saturation_steps.iter().map(|w| &w.cpu))
        .chain(std::iter::once(&throughput.half_rate.cpu))
        .chain(memory.iter().map(|m| &m.window.cpu))
        .collect();
    let wall: f64 = windows.iter().map(|c| c.wall_secs).sum();
    let other: f64 = windows.iter().map(|c| c.other_cpu_secs).sum();
    if wall > 0.0 {
        round2(other / (wall * cpus) * 100.0)
    } else {
        0.0
    }
}
