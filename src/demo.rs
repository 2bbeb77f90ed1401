//! `video-orchestrator demo`: the whole service, in-process, against the local RabbitMQ and
//! PostgreSQL on a fresh prefix and a fresh database, with the simulated provider on loopback.
//! Progress bars are fed only by `video.events`, as a real client would see them.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use rand::Rng;
use secrecy::ExposeSecret;
use tokio_util::sync::CancellationToken;

use crate::app::{Application, Role};
use crate::client::{new_request, Client, EventStream};
use crate::config::{Settings, Targets};
use crate::providers::sim::{model_for, SimProvider, SimSettings};
use crate::providers::ProviderKind;
use crate::store::ScratchDatabase;
use crate::topology::Topology;

/// Demo options.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Requests to submit.
    pub tasks: usize,
    /// Keep the prefix and database afterwards.
    pub keep: bool,
    /// The protocol the simulated provider speaks (`demo --provider KIND`).
    pub provider: ProviderKind,
}

#[derive(Debug, Default)]
struct TaskState {
    outcome: Option<&'static str>,
    duration_ms: Option<u64>,
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

async fn check_dependencies(settings: &Settings) -> anyhow::Result<()> {
    let Targets {
        rabbitmq: rabbit,
        database: db,
    } = settings.targets();
    let url = settings.rabbitmq.node_urls()[0].clone();
    let reachable = tokio::time::timeout(
        Duration::from_secs(5),
        lapin::Connection::connect(url.expose_secret(), lapin::ConnectionProperties::default()),
    )
    .await;
    match reachable {
        Ok(Ok(c)) => {
            let _ = c.close(200, "probe".into()).await;
            ensure_consistent_hash(url.expose_secret()).await?;
        }
        _ => anyhow::bail!(
            "RabbitMQ is not reachable at {rabbit}.\n  Start it with `docker compose up -d rabbitmq` \
             (docker-compose.yml in this repository; it enables the consistent-hash plugin), or on \
             this machine `rabbitmq-server -detached`, or point APP__RABBITMQ__URL at your broker."
        ),
    }
    if ScratchDatabase::server_answers(&settings.database, Duration::from_secs(5)).await {
        return Ok(());
    }
    anyhow::bail!(
        "PostgreSQL is not reachable at {db}.\n  Start it with `docker compose up -d postgres`, or \
         on this machine `pg_ctlcluster <version> main start`, or point APP__DATABASE__URL at your \
         database."
    )
}

const PLUGIN: &str = "rabbitmq_consistent_hash_exchange";

/// The demo, and only the demo, turns the consistent-hash plugin on by itself: on a broker on
/// this machine's loopback, with `rabbitmq-plugins` on PATH (a fresh machine runs RabbitMQ
/// without it). `serve` and `topology declare` only say how.
async fn ensure_consistent_hash(url: &str) -> anyhow::Result<()> {
    // A failed probe closes its connection (a hard error): each probe gets a new one.
    let probe = || async {
        let c = lapin::Connection::connect(url, lapin::ConnectionProperties::default()).await?;
        let found = crate::topology::has_consistent_hash(&c).await;
        let _ = c.close(200, "probe".into()).await;
        anyhow::Ok(found?)
    };
    if probe().await? {
        return Ok(());
    }
    let fix = format!("rabbitmq-plugins enable {PLUGIN}");
    let local = url::Url::parse(url)
        .ok()
        .and_then(|u| u.host_str().map(str::to_owned))
        .is_some_and(|h| {
            h == "localhost"
                || h.trim_matches(['[', ']'])
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        });
    if !local {
        anyhow::bail!(
            "RabbitMQ lacks the consistent-hash exchange type: run `{fix}` on the broker \
             (docker-compose.yml in this repository enables it)"
        );
    }
    println!(
        "RabbitMQ lacks the consistent-hash exchange type; enabling it on the local broker: {fix}"
    );
    let output = tokio::process::Command::new("rabbitmq-plugins")
        .args(["-q", "enable", PLUGIN])
        .output()
        .await;
    match output {
        Ok(o) if o.status.success() => {}
        Ok(o) => anyhow::bail!(
            "`{fix}` failed ({}): {}; run it yourself (as the broker's user, e.g. with sudo)",
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => anyhow::bail!(
            "RabbitMQ lacks the consistent-hash exchange type and `rabbitmq-plugins` could not be \
             run ({e}): run `{fix}` on the broker"
        ),
    }
    // The plugin registers its exchange type a moment after the command returns.
    for _ in 0..50 {
        if probe().await? {
            println!("enabled {PLUGIN}");
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    anyhow::bail!("`{fix}` ran, but the broker still lacks the exchange type after 10 s")
}

/// Runs the demo; returns when every task reached a terminal state.
///
/// # Errors
/// When the broker or the database is unreachable (with how to start them), or the service fails.
pub async fn run(mut settings: Settings, options: DemoOptions) -> anyhow::Result<()> {
    check_dependencies(&settings).await?;
    let hex = uuid::Uuid::new_v4().simple().to_string();
    let prefix = format!("demo-{}.", &hex[..8]);
    let database = format!("vo_demo_{}", &hex[..12]);
    let scratch = ScratchDatabase::create(&settings.database, &database)
        .await
        .with_context(|| format!("creating the demo database {database}"))?;
    settings.database.url = scratch.url()?;
    settings.topology.prefix = prefix.clone();
    settings.http.listen = "127.0.0.1:0".parse()?;
    settings.tracking.min_interval_ms = 1000;
    settings.tracking.max_interval_ms = 5000;
    settings.tracking.delay_tiers_ms = vec![1000, 2000, 5000, 10000, 30000, 60000];
    settings.outbox.poll_interval_ms = 200;

    let sim = SimProvider::start(
        "127.0.0.1:0".parse()?,
        SimSettings {
            duration_ms: 3000,
            duration_jitter_ms: 2000,
            ..SimSettings::default()
        },
    )
    .await
    .context("starting the simulated provider")?;
    // One provider, named after the protocol, speaking it to the simulator.
    let name = options.provider.as_str().to_owned();
    let mut provider = sim.provider_settings(options.provider);
    if let Some(configured) = settings.providers.get("sim") {
        provider.max_concurrency = configured.max_concurrency;
    }
    settings.providers.clear();
    settings.providers.insert(name.clone(), provider);
    settings.routing.models.clear();
    settings.routing.default_provider = Some(name);

    let result = run_inner(&settings, &options, &prefix).await;

    sim.shutdown().await;
    if options.keep {
        println!("kept prefix `{prefix}` and database `{database}`");
    } else {
        if let Ok(conn) = lapin::Connection::connect(
            settings.rabbitmq.node_urls()[0].expose_secret(),
            lapin::ConnectionProperties::default(),
        )
        .await
        {
            let _ = Topology::from_settings(&settings).delete(&conn).await;
            let _ = conn.close(200, "demo over".into()).await;
        }
        scratch.remove().await;
    }
    result
}

async fn run_inner(settings: &Settings, options: &DemoOptions, prefix: &str) -> anyhow::Result<()> {
    let app = Application::build(settings.clone(), &Role::ALL).await?;
    let store = app.store().clone();
    let broker = app.broker().clone();
    let stop_service = CancellationToken::new();
    let service = tokio::spawn({
        let stop = stop_service.clone();
        app.run(async move { stop.cancelled().await })
    });

    let client_stop = CancellationToken::new();
    let conn = broker.connection(&client_stop).await?;
    let mut events =
        EventStream::subscribe(&conn, broker.topology(), &["video.generation.#"]).await?;
    let client = Client::new(broker.clone(), client_stop.clone());

    let multi = MultiProgress::new();
    let style = ProgressStyle::with_template("{prefix:>22} [{bar:30.cyan/blue}] {pos:>3}% {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("█▉▊▋▌▍▎▏ ");
    println!(
        "demo: {} tasks on prefix `{prefix}`, service and simulated provider ({}) in-process",
        options.tasks, options.provider
    );
    let keys = [
        "tenant-alpha",
        "tenant-beta",
        "tenant-gamma",
        "tenant-delta",
    ];
    let mut bars: HashMap<String, ProgressBar> = HashMap::new();
    let mut states: HashMap<String, TaskState> = HashMap::new();
    let mut to_cancel: Option<(String, String)> = None;
    let started = Instant::now();
    for i in 0..options.tasks {
        let vk = keys[i % keys.len()];
        let duration = rand::rng().random_range(2000..9000);
        let prompt = match i {
            1 => "a storm that never ends [fail]".to_owned(),
            2 => "a film too long to wait for [duration=60000]".to_owned(),
            _ => format!("scene {i}: a paper boat on a river [duration={duration}]"),
        };
        let request = new_request(vk, model_for(options.provider), &prompt);
        let bar = multi.add(ProgressBar::new(100));
        bar.set_style(style.clone());
        bar.set_prefix(format!("{vk}/{}", &request.request_id[4..12]));
        bar.set_message("requested");
        bars.insert(request.request_id.clone(), bar);
        states.insert(request.request_id.clone(), TaskState::default());
        if i == 2 {
            to_cancel = Some((request.request_id.clone(), vk.to_owned()));
        }
        client.submit(&request).await?;
    }

    let deadline = Instant::now() + Duration::from_secs(180);
    while states.values().any(|s| s.outcome.is_none()) {
        let next = tokio::time::timeout_at(deadline.into(), events.next()).await;
        let Ok(Some(event)) = next else {
            anyhow::bail!("the demo did not finish within 3 minutes");
        };
        let id = event.request_id().to_owned();
        let (Some(bar), Some(state)) = (bars.get(&id), states.get_mut(&id)) else {
            continue;
        };
        let body = &event.body;
        match event.routing_key.as_str() {
            "video.generation.started" => {
                bar.set_message("started");
                if to_cancel.as_ref().is_some_and(|(c, _)| *c == id) {
                    let (c, vk) = to_cancel.take().unwrap_or_default();
                    client
                        .cancel(&c, &vk, Some("cancelled by the demo".to_owned()))
                        .await?;
                    bar.set_message("cancel requested");
                }
            }
            "video.generation.progress" => {
                bar.set_position(body["progress"].as_u64().unwrap_or(0));
                bar.set_message(
                    body["status"]
                        .as_str()
                        .unwrap_or_default()
                        .replace('_', " "),
                );
            }
            "video.generation.completed" => {
                state.outcome = Some("completed");
                state.duration_ms = body["durationMs"].as_u64();
                bar.set_position(100);
                bar.finish_with_message("✔ completed");
            }
            "video.generation.failed" => {
                state.outcome = Some("failed");
                bar.abandon_with_message(format!(
                    "✘ failed: {}",
                    body["error"].as_str().unwrap_or_default()
                ));
            }
            "video.generation.cancelled" => {
                state.outcome = Some("cancelled");
                bar.abandon_with_message("⊘ cancelled");
            }
            _ => {}
        }
    }
    let elapsed = started.elapsed();
    let mut checks = Vec::new();
    for id in states.keys() {
        if let Ok(Some(task)) = store.get(id).await {
            checks.push(task.checks_count);
        }
    }
    client_stop.cancel();
    stop_service.cancel();
    service.await.context("service task")?;

    let count = |o: &str| states.values().filter(|s| s.outcome == Some(o)).count();
    let mut durations: Vec<u64> = states.values().filter_map(|s| s.duration_ms).collect();
    durations.sort_unstable();
    let avg_checks = checks.iter().sum::<i64>() as f64 / checks.len().max(1) as f64;
    println!();
    println!("┌────────────────────────────┬──────────┐");
    println!("│ tasks                      │ {:>8} │", states.len());
    println!("│ completed                  │ {:>8} │", count("completed"));
    println!("│ failed                     │ {:>8} │", count("failed"));
    println!("│ cancelled                  │ {:>8} │", count("cancelled"));
    println!(
        "│ duration p50 (completed)   │ {:>6.1} s │",
        percentile(&durations, 50.0) as f64 / 1000.0
    );
    println!(
        "│ duration p95 (completed)   │ {:>6.1} s │",
        percentile(&durations, 95.0) as f64 / 1000.0
    );
    println!("│ progress checks per task   │ {avg_checks:>8.1} │");
    println!(
        "│ wall time                  │ {:>6.1} s │",
        elapsed.as_secs_f64()
    );
    println!("└────────────────────────────┴──────────┘");
    Ok(())
}
