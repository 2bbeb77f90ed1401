//! Phase 3: memory at each task count, one fresh service process each, at a rate no higher than
//! the half-rate phase's (where the lag was measured): memory should follow the task count, not a
//! backlog.

use std::time::Duration;

use super::integrity::finish_service;
use super::report::MemoryPoint;
use super::seeding::{create_jobs, Seeder};
use super::service::ServiceProc;
use super::{say, Ctx};

/// The memory points' jobs outlast any window: every check sees a job in progress.
const JOB_DURATION_MS: u64 = 3_600_000;
/// A memory window lasts at least one interval plus this, so every chain runs in it.
const WINDOW_BEYOND_INTERVAL: Duration = Duration::from_secs(15);

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

/// A memory point per `--tasks-list` entry, each at no more than `budget_per_sec` checks per
/// second.
pub(super) async fn measure(
    ctx: &mut Ctx,
    budget_per_sec: f64,
) -> anyhow::Result<Vec<MemoryPoint>> {
    let mut memory = Vec::new();
    for n in ctx.options.tasks_list.clone() {
        memory.push(measure_point(ctx, n, budget_per_sec).await?);
    }
    Ok(memory)
}

async fn measure_point(
    ctx: &mut Ctx,
    n: usize,
    budget_per_sec: f64,
) -> anyhow::Result<MemoryPoint> {
    let configured = ctx.settings.tracking.delay_tiers_ms.clone();
    let tiers = memory_tiers(n, budget_per_sec, &configured);
    let interval = memory_interval_ms(n, budget_per_sec, &tiers);
    let tag = format!("m{n}");
    let extra_tiers = (tiers != configured).then_some(tiers.as_slice());
    let prefix = ctx.new_topology(&tag, extra_tiers).prefix().to_owned();
    let ctx: &Ctx = ctx;
    say(format!(
        "memory: {n} tasks at {interval} ms — creating jobs"
    ));
    let jobs = create_jobs(ctx, n, JOB_DURATION_MS).await?;
    if let Some(t) = extra_tiers {
        say(format!(
            "memory: {n} tasks get longer tiers on their own topology: {t:?} ms"
        ));
    }
    let service = ServiceProc::start(ctx, &prefix, interval, extra_tiers, &tag).await?;
    say(format!("service pid {} ({n} tasks)", service.pid()));
    let seeder = Seeder::connect(ctx, &prefix).await?;
    // First checks spread over one interval: a steady rate.
    let pace = Duration::from_millis(interval);
    seeder.seed(ctx, &tag, 0, &jobs, pace).await?;
    tokio::time::sleep(ctx.options.warmup).await;
    let window = ctx.options.duration.max(pace + WINDOW_BEYOND_INTERVAL);
    let window_start = chrono::Utc::now();
    let w = service.measure(ctx, window, n, interval).await?;
    let hwm = service.hwm_mb();
    say(format!(
        "memory: {n} tasks → RSS {:.1} MB (mean {:.1}, peak since start {:.1}), {:.0} checks/s, lag p99 {:.1} ms",
        w.service_rss_mb, w.service_rss_mean_mb, hwm, w.checks_per_sec, w.lag_ms.p99
    ));
    let integrity = finish_service(ctx, service, &tag, n, window_start).await?;
    seeder.stop();
    Ok(MemoryPoint {
        tracked_tasks: n,
        service_rss_hwm_mb: hwm,
        window: w,
        integrity,
    })
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
}
