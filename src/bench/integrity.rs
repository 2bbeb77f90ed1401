//! Did every chain of a service process survive, once? Counted when the process is done.

use std::time::Duration;

use anyhow::Context;

use super::report::Integrity;
use super::service::ServiceProc;
use super::{say, Ctx};

/// Counts dead chains, reads the service's counters, stops it (SIGTERM: in-flight checks finish),
/// compares provider calls with the rows, and retires the tasks.
pub(super) async fn finish_service(
    ctx: &Ctx,
    service: ServiceProc,
    tag: &str,
    tasks: usize,
    window_start: chrono::DateTime<chrono::Utc>,
) -> anyhow::Result<Integrity> {
    let dead = dead_chains(ctx, tag, window_start).await?;
    let counters = service.counters(ctx).await?;
    let prefix = service.prefix.clone();
    service.proc.stop(Duration::from_secs(45)).await;
    let double = double_processed(ctx, tag).await?;
    retire(ctx, tag).await?;
    let integrity = Integrity {
        tasks,
        dead_chains: dead,
        rearmed: counters.rearmed,
        stale: counters.stale,
        double_processed: double,
        errors: counters.errors,
        republished: counters.republished,
    };
    say(format!(
        "{prefix}: {} tasks, {} dead chains, {} re-armed, {} stale, {} double-processed, {} errors",
        tasks, dead, integrity.rearmed, integrity.stale, double, integrity.errors
    ));
    Ok(integrity)
}

/// Live chains of `tag` that did not run since `since`.
async fn dead_chains(
    ctx: &Ctx,
    tag: &str,
    since: chrono::DateTime<chrono::Utc>,
) -> anyhow::Result<u64> {
    let n = ctx.store.count_stalled_chains(tag, since).await?;
    Ok(u64::try_from(n).unwrap_or(0))
}

/// Provider status calls beyond what each task's row recorded. A task the bench stopped may show
/// one call more (the check read the row before the stop and could not advance it after).
async fn double_processed(ctx: &Ctx, tag: &str) -> anyhow::Result<u64> {
    let stats: serde_json::Value = ctx
        .get(format!("{}/sim/stats", ctx.sim_url))
        .await?
        .json()
        .await?;
    let calls = stats["statusCallsByJob"]
        .as_object()
        .context("/sim/stats without statusCallsByJob")?;
    let mut extra = 0u64;
    for row in ctx.store.recorded_checks(tag).await? {
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
    ctx.store.stop_tracking_tag(tag).await?;
    Ok(())
}
