//! The report: its JSON form (field names are stable) and its text form for people.

use std::collections::BTreeMap;

use serde::Serialize;

/// Scheduling lag, in milliseconds.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct LagMs {
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest seen (for histograms: upper bound of the highest bucket reached).
    pub max: f64,
    /// Checks or hops the figures are taken from.
    pub samples: u64,
}

/// CPU use over a window.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CpuWindow {
    /// Wall-clock seconds of the window.
    pub wall_secs: f64,
    /// CPU seconds of the service process (0 for baseline windows).
    pub service_cpu_secs: f64,
    /// CPU seconds of this process (the baseline loop, or the bench driver).
    pub driver_cpu_secs: f64,
    /// CPU seconds of RabbitMQ (`beam.smp`).
    pub broker_cpu_secs: f64,
    /// CPU seconds of every `postgres` process.
    pub postgres_cpu_secs: f64,
    /// CPU seconds of the simulated provider.
    pub sim_cpu_secs: f64,
    /// CPU seconds of everything else on the host (other engineers' builds and tests).
    pub other_cpu_secs: f64,
    /// Host CPU busy, percent of all cores.
    pub host_busy_pct: f64,
    /// Host CPU stolen by the hypervisor, percent of all cores.
    pub steal_pct: f64,
}

/// One measured window of the baseline loop.
#[derive(Debug, Clone, Serialize)]
pub struct HopWindow {
    /// Messages circulating.
    pub population: usize,
    /// Hops (consume → confirmed publish → ack) per second.
    pub hops_per_sec: f64,
    /// Processing time minus due time (exact, per message).
    pub lag_ms: LagMs,
    /// Client CPU seconds per 1,000 hops.
    pub client_cpu_seconds_per_1000_hops: f64,
    /// Broker CPU seconds per 1,000 hops.
    pub broker_cpu_seconds_per_1000_hops: f64,
    /// Publishes that failed or were nacked.
    pub failures: u64,
    /// CPU over the window.
    pub cpu: CpuWindow,
}

/// One measured window of the service.
#[derive(Debug, Clone, Serialize)]
pub struct ServiceWindow {
    /// Tasks with a live check chain.
    pub tracked_tasks: usize,
    /// Interval between a task's checks.
    pub interval_ms: u64,
    /// Checks that ran the full path, per second.
    pub checks_per_sec: f64,
    /// Share of those checks that published a progress event.
    pub progress_events_per_check: f64,
    /// `video_progress_checks_total` increments by outcome.
    pub outcomes: BTreeMap<String, u64>,
    /// From the service's histogram.
    pub lag_ms: LagMs,
    /// Service CPU seconds per 1,000 checks.
    pub cpu_seconds_per_1000_checks: f64,
    /// Broker CPU seconds per 1,000 checks.
    pub broker_cpu_seconds_per_1000_checks: f64,
    /// PostgreSQL CPU seconds per 1,000 checks.
    pub postgres_cpu_seconds_per_1000_checks: f64,
    /// Simulated provider CPU seconds per 1,000 checks (a real provider's cost is not ours).
    pub sim_cpu_seconds_per_1000_checks: f64,
    /// Broker reconnects of the service during the window (non-zero: the window is disturbed).
    pub broker_reconnects: u64,
    /// Largest service RSS sampled in the window.
    pub service_rss_mb: f64,
    /// Mean service RSS in the window.
    pub service_rss_mean_mb: f64,
    /// CPU over the window.
    pub cpu: CpuWindow,
}

/// One memory point.
#[derive(Debug, Clone, Serialize)]
pub struct MemoryPoint {
    /// Tasks tracked.
    pub tracked_tasks: usize,
    /// The service process's RSS peak since it started (`VmHWM`), seeding included.
    pub service_rss_hwm_mb: f64,
    /// The measured window.
    pub window: ServiceWindow,
    /// Chain integrity of this service process.
    pub integrity: Integrity,
}

/// Did every chain survive, once?
#[derive(Debug, Clone, Default, Serialize)]
pub struct Integrity {
    /// Tasks seeded into this service process.
    pub tasks: usize,
    /// Live chains that did not advance through a window longer than their interval.
    pub dead_chains: u64,
    /// Chains the sweeper had to re-arm.
    pub rearmed: u64,
    /// Checks dropped as stale (a duplicate or forked check arrived).
    pub stale: u64,
    /// Provider status calls beyond what the rows recorded (a check that ran twice).
    pub double_processed: u64,
    /// Checks that failed (provider or database), the chain going on.
    pub errors: u64,
    /// Publishes the service had to re-send.
    pub republished: u64,
}

/// Machine state around the run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MachineInfo {
    /// Cores.
    pub cpus: usize,
    /// `/proc/loadavg` at the start.
    pub loadavg_start: String,
    /// `/proc/loadavg` at the end.
    pub loadavg_end: String,
    /// Cargo, rustc or test binaries running at the start (other engineers' work).
    pub concurrent_builds_start: Vec<String>,
    /// The same at the end.
    pub concurrent_builds_end: Vec<String>,
    /// CPU steal over the whole run, percent.
    pub steal_pct: f64,
    /// Host CPU used by processes outside the bench during the measured windows, percent of all
    /// cores.
    pub other_cpu_pct: f64,
}

/// The settings the run used.
#[derive(Debug, Clone, Serialize)]
pub struct RunConfig {
    /// Progress partitions.
    pub partitions: u16,
    /// Prefetch per partition consumer.
    pub prefetch: u16,
    /// Checks in flight per instance.
    pub concurrency: usize,
    /// Checks in flight per virtual key.
    pub per_key_concurrency: usize,
    /// Delay tiers.
    pub delay_tiers_ms: Vec<u64>,
    /// Virtual keys.
    pub tenants: usize,
    /// Warm-up per phase.
    pub warmup_secs: f64,
    /// Measured window per phase.
    pub duration_secs: f64,
    /// `--quick`.
    pub quick: bool,
    /// Duration of the simulated jobs of the throughput phases.
    pub throughput_job_duration_secs: u64,
}

/// Pass/fail against the targets (measured, never asserted).
#[derive(Debug, Clone, Serialize)]
pub struct Targets {
    /// `ratio >= 0.6`.
    pub ratio_at_least_0_6: bool,
    /// `lag_ms.p99 <= 50` at half of the saturated rate.
    pub lag_p99_at_most_50ms: bool,
    /// RSS within 20 % from the smallest to the largest task count.
    pub rss_flat_within_20pct: bool,
    /// RSS under 100 MB at every task count.
    pub rss_under_100mb: bool,
    /// No lost and no duplicate checks.
    pub no_lost_or_duplicate_checks: bool,
}

/// Everything the run measured. Field names are stable.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// Report format version.
    pub version: u32,
    /// When the run started (RFC 3339).
    pub started_at: String,
    /// How long the run took.
    pub elapsed_secs: f64,
    /// The raw broker's ceiling: hops per second through the shortest delay tier.
    pub baseline_hops_per_sec: f64,
    /// The raw broker's direct hop (no delay), for context.
    pub direct_hops_per_sec: f64,
    /// The service's checks per second at saturation.
    pub checks_per_sec: f64,
    /// `checks_per_sec / baseline_hops_per_sec`.
    pub ratio: f64,
    /// Scheduling lag at half of the saturated rate.
    pub lag_ms: LagMs,
    /// Check rate of the half-rate phase.
    pub half_rate_checks_per_sec: f64,
    /// Task counts of the memory phases.
    pub tracked_tasks: Vec<usize>,
    /// Service RSS (largest in the window) at each task count, same order.
    pub service_rss_mb: Vec<f64>,
    /// Dead chains plus sweeper re-arms, over every service process.
    pub lost_checks: u64,
    /// Stale drops plus double-processed checks, over every service process.
    pub duplicate_checks: u64,
    /// Service CPU seconds per 1,000 checks at saturation.
    pub cpu_seconds_per_1000_checks: f64,
    /// Service CPU seconds per 1,000 checks at half rate.
    pub cpu_seconds_per_1000_checks_half_rate: f64,
    /// Baseline client CPU seconds per 1,000 hops (same unit, for comparison).
    pub baseline_cpu_seconds_per_1000_hops: f64,
    /// CPU steal over the whole run, percent.
    pub steal_pct: f64,
    /// Pass/fail.
    pub targets: Targets,
    /// Machine state.
    pub machine: MachineInfo,
    /// Settings.
    pub config: RunConfig,
    /// Baseline ramp steps through the tier.
    pub baseline_steps: Vec<HopWindow>,
    /// The direct hop.
    pub direct: HopWindow,
    /// Service saturation ramp steps.
    pub saturation_steps: Vec<ServiceWindow>,
    /// The half-rate window.
    pub half_rate: ServiceWindow,
    /// Integrity of the throughput service process.
    pub throughput_integrity: Integrity,
    /// Memory points.
    pub memory: Vec<MemoryPoint>,
}

/// The report as text for people.
pub fn render_human(r: &BenchReport) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let yes = |b: bool| if b { "yes" } else { "NO" };
    let _ = writeln!(
        s,
        "video-orchestrator bench — {} ({:.0} s)",
        r.started_at, r.elapsed_secs
    );
    let _ = writeln!(
        s,
        "machine: {} cores, load {} → {}, steal {:.1} %, other processes {:.1} % of the host{}",
        r.machine.cpus,
        r.machine.loadavg_start,
        r.machine.loadavg_end,
        r.machine.steal_pct,
        r.machine.other_cpu_pct,
        if r.machine.concurrent_builds_start.is_empty()
            && r.machine.concurrent_builds_end.is_empty()
        {
            ", no concurrent builds".to_owned()
        } else {
            format!(
                ", concurrent builds/tests: {} at start, {} at end",
                r.machine.concurrent_builds_start.len(),
                r.machine.concurrent_builds_end.len()
            )
        }
    );
    let _ = writeln!(
        s,
        "config: {} partitions, prefetch {}, concurrency {}, tiers {:?} ms, {} tenants{}",
        r.config.partitions,
        r.config.prefetch,
        r.config.concurrency,
        r.config.delay_tiers_ms,
        r.config.tenants,
        if r.config.quick { ", QUICK run" } else { "" }
    );
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "baseline (raw lapin, 1 hop = consume → confirmed publish into the shortest tier → ack)"
    );
    for w in &r.baseline_steps {
        let _ = writeln!(
            s,
            "  {:>6} msgs  {:>7.0} hops/s  lag p50 {:>6.1} p99 {:>7.1} max {:>7.1} ms  client {:.3} / broker {:.3} CPU s per 1k  steal {:.1} %",
            w.population,
            w.hops_per_sec,
            w.lag_ms.p50,
            w.lag_ms.p99,
            w.lag_ms.max,
            w.client_cpu_seconds_per_1000_hops,
            w.broker_cpu_seconds_per_1000_hops,
            w.cpu.steal_pct
        );
    }
    let _ = writeln!(
        s,
        "  baseline_hops_per_sec {:.0}; direct hop (no delay) {:.0} hops/s",
        r.baseline_hops_per_sec, r.direct_hops_per_sec
    );
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "service (store, provider status, progress event, next check; 1 s interval)"
    );
    let row = |s: &mut String, label: &str, w: &ServiceWindow| {
        let _ = writeln!(
            s,
            "  {label:<11} {:>6} tasks  {:>7.0} checks/s  lag p50 {:>6.1} p99 {:>7.1} max ≤{:>7.1} ms  service {:.3} / broker {:.3} / pg {:.3} / sim {:.3} CPU s per 1k  events/check {:.2}  steal {:.1} %",
            w.tracked_tasks,
            w.checks_per_sec,
            w.lag_ms.p50,
            w.lag_ms.p99,
            w.lag_ms.max,
            w.cpu_seconds_per_1000_checks,
            w.broker_cpu_seconds_per_1000_checks,
            w.postgres_cpu_seconds_per_1000_checks,
            w.sim_cpu_seconds_per_1000_checks,
            w.progress_events_per_check,
            w.cpu.steal_pct
        );
    };
    for w in &r.saturation_steps {
        row(&mut s, "saturation", w);
    }
    row(&mut s, "half rate", &r.half_rate);
    let _ = writeln!(
        s,
        "  checks_per_sec {:.0}, ratio {:.2} (target ≥ 0.6: {}), lag p99 at half rate {:.1} ms (target ≤ 50: {})",
        r.checks_per_sec,
        r.ratio,
        yes(r.targets.ratio_at_least_0_6),
        r.lag_ms.p99,
        yes(r.targets.lag_p99_at_most_50ms)
    );
    let _ = writeln!(s);
    let _ = writeln!(s, "memory (service process only; simulator out of process)");
    for m in &r.memory {
        let _ = writeln!(
            s,
            "  {:>7} tasks at {:>5} ms  RSS {:>6.1} MB (mean {:.1}, peak since start {:.1})  {:>6.0} checks/s  lag p99 {:.1} ms",
            m.tracked_tasks,
            m.window.interval_ms,
            m.window.service_rss_mb,
            m.window.service_rss_mean_mb,
            m.service_rss_hwm_mb,
            m.window.checks_per_sec,
            m.window.lag_ms.p99
        );
    }
    let _ = writeln!(
        s,
        "  flat within 20 %: {}, under 100 MB: {}",
        yes(r.targets.rss_flat_within_20pct),
        yes(r.targets.rss_under_100mb)
    );
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "integrity: lost_checks {}, duplicate_checks {} (target 0/0: {})",
        r.lost_checks,
        r.duplicate_checks,
        yes(r.targets.no_lost_or_duplicate_checks)
    );
    let _ = writeln!(
        s,
        "cpu: {:.3} service CPU s per 1,000 checks at saturation, {:.3} at half rate; raw client {:.3} per 1,000 hops",
        r.cpu_seconds_per_1000_checks,
        r.cpu_seconds_per_1000_checks_half_rate,
        r.baseline_cpu_seconds_per_1000_hops
    );
    s
}
