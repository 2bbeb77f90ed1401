//! Seeding the service: jobs at the simulator, `processing` rows for them, and each chain's first
//! check, as the generation orchestrator would leave them.

use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use super::Ctx;
use crate::broker::{Broker, BrokerOptions, Publisher};
use crate::messages::VideoProgressCheckRequested;
use crate::topology::Topology;

/// A seeded task.
#[derive(Debug, Clone)]
pub(super) struct Seeded {
    pub(super) request_id: String,
    virtual_key: String,
}

/// The virtual key of the `index`-th task (and of the baseline's `index`-th message).
pub(super) fn tenant(index: usize, tenants: usize) -> String {
    format!("vk-bench-{:03}", index % tenants.max(1))
}

/// Jobs at the simulator, created ahead of the phases that take them so they are past their
/// queued tenth (and report moving progress) by the time the service checks them. They outlive
/// the run.
#[derive(Debug)]
pub(super) struct JobPool {
    ids: Vec<String>,
    /// How long each job runs at the simulator.
    pub(super) duration_secs: u64,
}

impl JobPool {
    pub(super) async fn create(ctx: &Ctx, n: usize, duration_secs: u64) -> anyhow::Result<Self> {
        let ids = create_jobs(ctx, n, duration_secs * 1000).await?;
        Ok(Self { ids, duration_secs })
    }

    /// `n` jobs from the pool, creating more when it runs short.
    pub(super) async fn take(&mut self, ctx: &Ctx, n: usize) -> anyhow::Result<Vec<String>> {
        let mut jobs: Vec<String> = self.ids.drain(..n.min(self.ids.len())).collect();
        if jobs.len() < n {
            jobs.extend(create_jobs(ctx, n - jobs.len(), self.duration_secs * 1000).await?);
        }
        Ok(jobs)
    }
}

/// Creates `n` jobs at the simulator (OpenAI protocol) lasting `duration_ms` each.
pub(super) async fn create_jobs(
    ctx: &Ctx,
    n: usize,
    duration_ms: u64,
) -> anyhow::Result<Vec<String>> {
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
        ctx.store
            .insert_processing_tasks(&ids, &keys, chunk, &offsets)
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

/// Publishes first checks on one prefix, confirmed, as the generation orchestrator does.
#[derive(Debug)]
pub(super) struct Seeder {
    publisher: Publisher,
    stop: CancellationToken,
}

impl Seeder {
    /// Connects on `prefix`, declaring its topology with the configured tiers (a memory point's
    /// service declares its longer ones itself; first checks go through the shortest, which
    /// both have).
    pub(super) async fn connect(ctx: &Ctx, prefix: &str) -> anyhow::Result<Self> {
        let mut settings = ctx.settings_on(prefix);
        settings.rabbitmq.connection_name = "video-orchestrator-bench seeder".to_owned();
        let topology = Topology::from_settings(&settings);
        let broker = Broker::connect(BrokerOptions::from_settings(&settings), topology)
            .await
            .context("connecting the seeder")?;
        let stop = CancellationToken::new();
        let publisher = Publisher::new(broker, stop.clone());
        Ok(Self { publisher, stop })
    }

    /// Inserts a `processing` row per job (request ids `{tag}-{first_index + i}`) and publishes
    /// each task's first check through the shortest tier, the checks spread evenly over `pace`:
    /// a steady rate from the start.
    pub(super) async fn seed(
        &self,
        ctx: &Ctx,
        tag: &str,
        first_index: usize,
        jobs: &[String],
        pace: Duration,
    ) -> anyhow::Result<Vec<Seeded>> {
        let tier_ms = ctx.shortest_tier_ms();
        let offsets = first_check_offsets(jobs.len(), pace, tier_ms);
        let tasks = insert_tasks(ctx, tag, first_index, jobs, &offsets).await?;
        self.publish_first_checks(&tasks, tier_ms, pace).await?;
        Ok(tasks)
    }

    /// Publishes the first check of each task into the `tier_ms` tier, spread evenly over `pace`.
    async fn publish_first_checks(
        &self,
        tasks: &[Seeded],
        tier_ms: u64,
        pace: Duration,
    ) -> anyhow::Result<()> {
        let topology = self.publisher.broker().topology();
        let publisher = &self.publisher;
        let started = Instant::now();
        let tick = Duration::from_millis(20);
        let ticks = (pace.as_millis() / tick.as_millis()).max(1) as usize;
        let per_tick = tasks.len().div_ceil(ticks).max(1);
        for (i, chunk) in tasks.chunks(per_tick).enumerate() {
            let publishes = chunk.iter().map(|t| {
                let now = crate::messages::now();
                let due =
                    now + chrono::Duration::milliseconds(i64::try_from(tier_ms).unwrap_or(1000));
                let check =
                    VideoProgressCheckRequested::first(&t.request_id, &t.virtual_key, 0, now, due);
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

    /// Stops publishing and closes the seeder's connection.
    pub(super) fn stop(self) {
        self.stop.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_checks_are_spread_over_the_pace() {
        let o = first_check_offsets(4, Duration::from_secs(2), 1000);
        assert_eq!(o, vec![1.0, 1.5, 2.0, 2.5]);
    }
}
