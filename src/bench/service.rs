//! The service under test, as a child process: start-up, measured windows, integrity counters.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::bail;
use secrecy::ExposeSecret;

use super::child::{free_port, ChildProc};
use super::procfs::{pid_status_kb, rss_mb, CpuSnapshot};
use super::report::ServiceWindow;
use super::scrape::{histogram_delta, Scrape};
use super::stats::{lag_from_histogram, per_1000, round2};
use super::Ctx;

/// Outcomes of `video_progress_checks_total` that ran the whole check path.
const FULL_PATH_OUTCOMES: [&str; 3] = ["progressed", "unchanged", "finished"];

/// The service as a child process.
#[derive(Debug)]
pub(super) struct ServiceProc {
    pub(super) proc: ChildProc,
    pub(super) http: SocketAddr,
    pub(super) prefix: String,
}

impl ServiceProc {
    /// `tiers`: the delay tiers of this service's (fresh) topology, when not the configured ones.
    pub(super) async fn start(
        ctx: &Ctx,
        prefix: &str,
        interval_ms: u64,
        tiers: Option<&[u64]>,
        label: &str,
    ) -> anyhow::Result<Self> {
        let http = free_port()?;
        let mut env: Vec<(String, String)> = vec![
            ("APP__TOPOLOGY__PREFIX".into(), prefix.to_owned()),
            (
                "APP__DATABASE__URL".into(),
                ctx.settings.database.url.expose_secret().to_owned(),
            ),
            ("APP__HTTP__LISTEN".into(), http.to_string()),
            ("APP__PROVIDERS__SIM__BASE_URL".into(), ctx.sim_url.clone()),
            (
                "APP__TRACKING__MIN_INTERVAL_MS".into(),
                interval_ms.to_string(),
            ),
            (
                "APP__TRACKING__MAX_INTERVAL_MS".into(),
                interval_ms.to_string(),
            ),
            (
                "APP__RABBITMQ__CONNECTION_NAME".into(),
                format!("video-orchestrator-bench {label}"),
            ),
            (
                "RUST_LOG".into(),
                std::env::var("VO_BENCH_SERVICE_LOG")
                    .unwrap_or_else(|_| crate::telemetry::DEFAULT_FILTER.to_owned()),
            ),
        ];
        if let Some(tiers) = tiers {
            let list: Vec<String> = tiers.iter().map(u64::to_string).collect();
            env.push(("APP__TRACKING__DELAY_TIERS_MS".into(), list.join(",")));
        }
        if ctx.settings.rabbitmq.urls.is_empty() {
            env.push((
                "APP__RABBITMQ__URL".into(),
                ctx.settings.rabbitmq.url.expose_secret().to_owned(),
            ));
        }
        let proc = ChildProc::spawn(
            &format!("service {label}"),
            &ctx.exe,
            &["serve", "--roles", "tracking,sweeper"],
            &env,
            ctx.workdir.join(format!("service-{label}.log")),
        )?;
        let mut service = Self {
            proc,
            http,
            prefix: prefix.to_owned(),
        };
        service.wait_ready(ctx).await?;
        Ok(service)
    }

    pub(super) fn pid(&self) -> u32 {
        self.proc.pid
    }

    async fn wait_ready(&mut self, ctx: &Ctx) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(90);
        let partitions = f64::from(ctx.settings.topology.partitions);
        loop {
            if let Some(status) = self.proc.exited() {
                bail!(
                    "the service exited during start-up ({status}); its log ({}):\n{}",
                    self.proc.log.display(),
                    self.proc.log_tail()
                );
            }
            if let Ok(scrape) = self.scrape(ctx).await {
                if scrape.sum("video_progress_owned_partitions", &[]) >= partitions {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "the service did not take its {partitions} partitions within 90 s; its log ({}):\n{}",
                    self.proc.log.display(),
                    self.proc.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn scrape(&self, ctx: &Ctx) -> anyhow::Result<Scrape> {
        let text = ctx
            .get(format!("http://{}/metrics", self.http))
            .await?
            .text()
            .await?;
        Ok(Scrape::parse(&text))
    }

    pub(super) fn hwm_mb(&self) -> f64 {
        pid_status_kb(self.pid(), "VmHWM:").map_or(0.0, |kb| round2(kb as f64 / 1024.0))
    }

    /// One measured window: checks, lag and CPU deltas, RSS sampled every 250 ms.
    pub(super) async fn measure(
        &self,
        ctx: &Ctx,
        duration: Duration,
        tracked_tasks: usize,
        interval_ms: u64,
    ) -> anyhow::Result<ServiceWindow> {
        let before = self.scrape(ctx).await?;
        let cpu_before = CpuSnapshot::take(ctx.watched(Some(self.pid())));
        let end = Instant::now() + duration;
        let mut rss = Vec::new();
        while Instant::now() < end {
            if let Some(mb) = rss_mb(self.pid()) {
                rss.push(mb);
            }
            tokio::time::sleep(Duration::from_millis(250).min(end - Instant::now())).await;
        }
        let after = self.scrape(ctx).await?;
        let cpu = CpuSnapshot::take(ctx.watched(Some(self.pid()))).since(&cpu_before);
        if let Some(mb) = rss_mb(self.pid()) {
            rss.push(mb);
        }

        let b = before.by_label("video_progress_checks_total", "outcome");
        let a = after.by_label("video_progress_checks_total", "outcome");
        let outcomes: BTreeMap<String, u64> = a
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    (v - b.get(k).copied().unwrap_or(0.0)).max(0.0) as u64,
                )
            })
            .filter(|(_, v)| *v > 0)
            .collect();
        let full: u64 = FULL_PATH_OUTCOMES
            .iter()
            .map(|o| outcomes.get(*o).copied().unwrap_or(0))
            .sum();
        let progressed = outcomes.get("progressed").copied().unwrap_or(0);
        let lag = histogram_delta(
            &before.buckets("video_progress_scheduling_lag_seconds"),
            &after.buckets("video_progress_scheduling_lag_seconds"),
        );
        let wall = cpu.wall_secs.max(0.001);
        let full_f = full as f64;
        let reconnects = (after.sum("video_broker_reconnects_total", &[])
            - before.sum("video_broker_reconnects_total", &[]))
        .max(0.0) as u64;
        if reconnects > 0 {
            bail!(
                "the service reconnected to RabbitMQ during a measured window (was the broker \
                 restarted by another process?); rerun when the machine is quiet"
            );
        }
        Ok(ServiceWindow {
            tracked_tasks,
            interval_ms,
            checks_per_sec: round2(full_f / wall),
            progress_events_per_check: if full > 0 {
                round2(progressed as f64 / full_f)
            } else {
                0.0
            },
            outcomes,
            lag_ms: lag_from_histogram(&lag),
            cpu_seconds_per_1000_checks: per_1000(cpu.service_cpu_secs, full_f),
            broker_cpu_seconds_per_1000_checks: per_1000(cpu.broker_cpu_secs, full_f),
            postgres_cpu_seconds_per_1000_checks: per_1000(cpu.postgres_cpu_secs, full_f),
            sim_cpu_seconds_per_1000_checks: per_1000(cpu.sim_cpu_secs, full_f),
            broker_reconnects: reconnects,
            service_rss_mb: round2(rss.iter().copied().fold(0.0, f64::max)),
            service_rss_mean_mb: round2(rss.iter().sum::<f64>() / rss.len().max(1) as f64),
            cpu,
        })
    }

    /// Integrity counters from the service's metrics (read before it stops).
    pub(super) async fn counters(&self, ctx: &Ctx) -> anyhow::Result<ServiceCounters> {
        let s = self.scrape(ctx).await?;
        Ok(ServiceCounters {
            rearmed: s.sum("video_progress_rearmed_total", &[]) as u64,
            stale: s.sum("video_progress_checks_total", &[("outcome", "stale")]) as u64,
            errors: s.sum("video_progress_checks_total", &[("outcome", "error")]) as u64,
            republished: s.sum("video_broker_republished_total", &[]) as u64,
        })
    }
}

/// The service's own integrity counters since it started.
#[derive(Debug, Clone, Copy)]
pub(super) struct ServiceCounters {
    /// Chains the sweeper re-armed.
    pub(super) rearmed: u64,
    /// Checks dropped as stale.
    pub(super) stale: u64,
    /// Checks that failed.
    pub(super) errors: u64,
    /// Publishes re-sent.
    pub(super) republished: u64,
}
