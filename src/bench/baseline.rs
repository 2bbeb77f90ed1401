//! Phase 1, the baseline: a minimal lapin loop over the service's topology, whose hop rate is the
//! ceiling the service's check rate is divided by.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::procfs::{CpuSnapshot, Watched};
use super::ramp::{climb, fastest};
use super::report::HopWindow;
use super::seeding::tenant;
use super::stats::{lag_from_samples, per_1000, round2};
use super::{raw_connection, say, Ctx};
use crate::messages::{Envelope, VideoProgressCheckRequested};
use crate::topology::{Topology, VIRTUAL_KEY_HEADER};

/// Header the baseline loop carries its due time in (milliseconds since the epoch).
const DUE_HEADER: &str = "x-bench-due-ms";

#[derive(Debug, Clone)]
enum HopTarget {
    /// Into the delay tier of this many milliseconds.
    Tier(u64),
    /// Straight back into `video.progress`.
    Direct,
}

#[derive(Debug)]
struct RawState {
    hops: AtomicU64,
    failures: AtomicU64,
    measuring: AtomicBool,
    lags_ms: Mutex<Vec<f64>>,
    publishers: Vec<Channel>,
    next_publisher: AtomicUsize,
    exchange: String,
    routing_key: String,
    delay_ms: i64,
}

impl RawState {
    fn publisher(&self) -> &Channel {
        let i = self.next_publisher.fetch_add(1, Ordering::Relaxed) % self.publishers.len();
        &self.publishers[i]
    }
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn header_i64(props: &BasicProperties, name: &str) -> Option<i64> {
    let headers = props.headers().as_ref()?;
    match headers.inner().get(&ShortString::from(name))? {
        AMQPValue::LongLongInt(v) => Some(*v),
        AMQPValue::LongInt(v) => Some(i64::from(*v)),
        _ => None,
    }
}

/// The minimal self-scheduling loop: every partition consumed with the service's prefetch, at
/// most `concurrency` hops in flight, each publish awaiting its own confirm (many in flight on
/// the shared confirm channel), ack after the confirm.
#[derive(Debug)]
struct RawLoop {
    state: Arc<RawState>,
    stop: CancellationToken,
    tasks: TaskTracker,
    seeded: usize,
    tenants: usize,
    body: Vec<u8>,
}

impl RawLoop {
    async fn start(
        conn: &Connection,
        topology: &Topology,
        target: HopTarget,
        prefetch: u16,
        concurrency: usize,
        tenants: usize,
    ) -> anyhow::Result<Self> {
        topology
            .declare(conn)
            .await
            .context("declaring the baseline topology")?;
        // The service's shape: one confirm channel shared by every publish.
        let publisher = conn.create_channel().await?;
        publisher
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let (exchange, routing_key, delay_ms) = match target {
            HopTarget::Tier(ms) => (
                String::new(),
                topology.delay_queue(ms),
                i64::try_from(ms).unwrap_or(1000),
            ),
            HopTarget::Direct => (topology.progress_exchange(), String::new(), 0),
        };
        let state = Arc::new(RawState {
            hops: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            measuring: AtomicBool::new(false),
            lags_ms: Mutex::new(Vec::new()),
            publishers: vec![publisher],
            next_publisher: AtomicUsize::new(0),
            exchange,
            routing_key,
            delay_ms,
        });
        let stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        let limit = Arc::new(Semaphore::new(concurrency));
        for p in 0..topology.partitions() {
            let channel = conn.create_channel().await?;
            channel
                .basic_qos(prefetch, BasicQosOptions::default())
                .await?;
            let consumer = channel
                .basic_consume(
                    topology.partition_queue(p).as_str().into(),
                    "".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            tasks.spawn(raw_consume(
                channel,
                consumer,
                state.clone(),
                limit.clone(),
                stop.clone(),
                tasks.clone(),
            ));
        }
        let now = crate::messages::now();
        let sample = VideoProgressCheckRequested::first(
            uuid::Uuid::new_v4().to_string(),
            "vk-bench-000",
            0,
            now,
            now,
        );
        let body = Envelope::to_queue(topology.delay_queue(1000), &sample).body;
        Ok(Self {
            state,
            stop,
            tasks,
            seeded: 0,
            tenants,
            body,
        })
    }

    /// Adds `n` messages, spread over `pace` (so a closed loop through a tier is smooth).
    async fn add(&mut self, n: usize, pace: Duration) -> anyhow::Result<()> {
        let started = Instant::now();
        let tick = Duration::from_millis(20);
        let ticks = (pace.as_millis() / tick.as_millis()).max(1) as usize;
        let per_tick = n.div_ceil(ticks);
        let mut sent = 0;
        let mut i = 0u64;
        while sent < n {
            let batch = per_tick.min(n - sent);
            let mut confirms = Vec::with_capacity(batch);
            for _ in 0..batch {
                let index = self.seeded + sent;
                sent += 1;
                let mut headers = FieldTable::default();
                headers.insert(
                    VIRTUAL_KEY_HEADER.into(),
                    AMQPValue::LongString(tenant(index, self.tenants).as_str().into()),
                );
                headers.insert(
                    DUE_HEADER.into(),
                    AMQPValue::LongLongInt(now_ms() + self.state.delay_ms),
                );
                let props = BasicProperties::default()
                    .with_content_type("application/json".into())
                    .with_delivery_mode(2)
                    .with_message_id(uuid::Uuid::new_v4().to_string().as_str().into())
                    .with_type("VideoProgressCheckRequested".into())
                    .with_headers(headers);
                let confirm = self
                    .state
                    .publisher()
                    .basic_publish(
                        self.state.exchange.as_str().into(),
                        self.state.routing_key.as_str().into(),
                        BasicPublishOptions {
                            mandatory: true,
                            ..BasicPublishOptions::default()
                        },
                        &self.body,
                        props,
                    )
                    .await?;
                confirms.push(confirm);
            }
            for c in futures::future::join_all(confirms).await {
                c.context("seeding the baseline")?;
            }
            i += 1;
            let next = started + tick * u32::try_from(i).unwrap_or(u32::MAX);
            if let Some(wait) = next.checked_duration_since(Instant::now()) {
                tokio::time::sleep(wait).await;
            }
        }
        self.seeded += n;
        Ok(())
    }

    /// Adds messages until `population` circulate, spread over `pace`.
    async fn fill_to(&mut self, population: usize, pace: Duration) -> anyhow::Result<()> {
        self.add(population - self.seeded, pace).await
    }

    async fn measure(
        &self,
        warmup: Duration,
        duration: Duration,
        watched: Watched<'_>,
    ) -> HopWindow {
        tokio::time::sleep(warmup).await;
        self.state
            .lags_ms
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        let cpu_before = CpuSnapshot::take(watched);
        let hops_before = self.state.hops.load(Ordering::Relaxed);
        let failures_before = self.state.failures.load(Ordering::Relaxed);
        self.state.measuring.store(true, Ordering::Relaxed);
        tokio::time::sleep(duration).await;
        self.state.measuring.store(false, Ordering::Relaxed);
        let hops = self.state.hops.load(Ordering::Relaxed) - hops_before;
        let failures = self.state.failures.load(Ordering::Relaxed) - failures_before;
        let cpu = CpuSnapshot::take(watched).since(&cpu_before);
        let lags =
            std::mem::take(&mut *self.state.lags_ms.lock().unwrap_or_else(|e| e.into_inner()));
        let mut lag = lag_from_samples(lags);
        lag.p50 = round2(lag.p50);
        lag.p99 = round2(lag.p99);
        HopWindow {
            population: self.seeded,
            hops_per_sec: round2(hops as f64 / cpu.wall_secs.max(0.001)),
            lag_ms: lag,
            client_cpu_seconds_per_1000_hops: per_1000(cpu.driver_cpu_secs, hops as f64),
            broker_cpu_seconds_per_1000_hops: per_1000(cpu.broker_cpu_secs, hops as f64),
            failures,
            cpu,
        }
    }

    async fn shutdown(self) {
        self.stop.cancel();
        self.tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(20), self.tasks.wait()).await;
        for ch in &self.state.publishers {
            let _ = ch.close(200, "bench over".into()).await;
        }
    }
}

async fn raw_consume(
    channel: Channel,
    mut consumer: lapin::Consumer,
    state: Arc<RawState>,
    limit: Arc<Semaphore>,
    stop: CancellationToken,
    tasks: TaskTracker,
) {
    loop {
        let permit = tokio::select! {
            _ = stop.cancelled() => break,
            p = limit.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
        };
        let next = tokio::select! {
            _ = stop.cancelled() => break,
            n = consumer.next() => n,
        };
        let Some(Ok(delivery)) = next else { break };
        let state = state.clone();
        tasks.spawn(async move {
            let _permit = permit;
            raw_hop(&state, delivery).await;
        });
    }
    let _ = channel.close(200, "bench over".into()).await;
}

async fn raw_hop(state: &RawState, delivery: lapin::message::Delivery) {
    let now = now_ms();
    if state.measuring.load(Ordering::Relaxed) {
        if let Some(due) = header_i64(&delivery.properties, DUE_HEADER) {
            state
                .lags_ms
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((now - due) as f64);
        }
    }
    let mut headers = delivery.properties.headers().clone().unwrap_or_default();
    headers.insert(
        DUE_HEADER.into(),
        AMQPValue::LongLongInt(now + state.delay_ms),
    );
    let props = delivery.properties.clone().with_headers(headers);
    let published = match state
        .publisher()
        .basic_publish(
            state.exchange.as_str().into(),
            state.routing_key.as_str().into(),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            &delivery.data,
            props,
        )
        .await
    {
        Ok(confirm) => matches!(
            confirm.await,
            Ok(Confirmation::Ack(None) | Confirmation::NotRequested)
        ),
        Err(_) => false,
    };
    if published {
        let _ = delivery.ack(BasicAckOptions::default()).await;
        state.hops.fetch_add(1, Ordering::Relaxed);
    } else {
        // Counted and rejected, never requeued (a requeue would spin at the head of the queue and
        // skew the ceiling): the partition dead-letters it into the run's parking queue, and the
        // window reports `failures` beside its rate.
        state.failures.fetch_add(1, Ordering::Relaxed);
        let _ = delivery
            .nack(BasicNackOptions {
                requeue: false,
                ..BasicNackOptions::default()
            })
            .await;
    }
}

/// Messages circulating in the first step of the ramp through the tier.
const FIRST_POPULATION: usize = 2000;

/// What the raw broker does on this machine.
#[derive(Debug)]
pub(super) struct Baseline {
    /// The ramp through the shortest delay tier.
    pub(super) steps: Vec<HopWindow>,
    /// The fastest step: the ceiling the service's rate is divided by.
    pub(super) ceiling: HopWindow,
    /// Straight back into `video.progress`, no delay: for context.
    pub(super) direct: HopWindow,
}

/// Phase 1: the raw loop through the shortest tier, ramped to saturation, then the direct hop.
pub(super) async fn measure(ctx: &mut Ctx) -> anyhow::Result<Baseline> {
    let conn = raw_connection(&ctx.settings, "video-orchestrator-bench baseline").await?;
    let steps = ramp_through_tier(ctx, &conn).await?;
    let ceiling = fastest(&steps).context("no baseline step")?;
    let direct = direct_hop(ctx, &conn).await?;
    let _ = conn.close(200, "baseline over".into()).await;
    say(format!("direct hop: {:.0} hops/s", direct.hops_per_sec));
    Ok(Baseline {
        steps,
        ceiling,
        direct,
    })
}

async fn ramp_through_tier(ctx: &mut Ctx, conn: &Connection) -> anyhow::Result<Vec<HopWindow>> {
    let tier_ms = ctx.shortest_tier_ms();
    let mut raw = start_loop(ctx, conn, "raw", HopTarget::Tier(tier_ms)).await?;
    let ctx: &Ctx = ctx;
    let steps = climb(FIRST_POPULATION, tier_ms, async |step, population| {
        raw.fill_to(population, Duration::from_millis(tier_ms))
            .await?;
        let w = raw
            .measure(ctx.options.warmup, ctx.options.duration, ctx.watched(None))
            .await;
        ensure_connected(conn, "baseline")?;
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
        Ok(w)
    })
    .await?;
    raw.shutdown().await;
    Ok(steps)
}

async fn direct_hop(ctx: &mut Ctx, conn: &Connection) -> anyhow::Result<HopWindow> {
    let mut direct = start_loop(ctx, conn, "direct", HopTarget::Direct).await?;
    direct
        .add(
            ctx.settings.tracking.concurrency * 4,
            Duration::from_millis(20),
        )
        .await?;
    let window = direct
        .measure(
            ctx.options.warmup / 2,
            ctx.options.duration / 2,
            ctx.watched(None),
        )
        .await;
    ensure_connected(conn, "direct hop")?;
    direct.shutdown().await;
    Ok(window)
}

/// A raw loop on a fresh topology `bench-<run>-<name>.`, with the service's prefetch and
/// concurrency.
async fn start_loop(
    ctx: &mut Ctx,
    conn: &Connection,
    name: &str,
    target: HopTarget,
) -> anyhow::Result<RawLoop> {
    let topology = ctx.new_topology(name, None);
    let tracking = &ctx.settings.tracking;
    RawLoop::start(
        conn,
        &topology,
        target,
        tracking.prefetch,
        tracking.concurrency,
        ctx.tenants,
    )
    .await
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
