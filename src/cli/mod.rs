//! Command-line interface: `serve`, `topology declare`, `schema`, `config check`, `submit`,
//! `cancel`, `status`, `parked`, `keys`, `sim-provider`, `demo` and `bench`, one function each. Each
//! command returns an exit code; `main` only maps errors to text.

mod keys;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::app::{shutdown_signal, Application, Role, StartError};
use crate::broker::{Broker, BrokerOptions, Publisher};
use crate::config::{LogFormat, Settings, Targets};
use crate::store::{Store, TaskView};
use crate::topology::Topology;

/// Runs long video-generation jobs at external providers and tracks their progress through
/// RabbitMQ.
#[derive(Debug, Parser)]
#[command(name = "video-orchestrator", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a demo against the local RabbitMQ and PostgreSQL: the service and the simulated
    /// provider in-process, live progress bars, a summary. Cleans up after itself.
    Demo {
        /// Requests to submit.
        #[arg(long, default_value_t = 20)]
        tasks: usize,
        /// Keep the demo's prefix and database afterwards.
        #[arg(long)]
        keep: bool,
        /// The protocol the simulated provider speaks to the service: any provider `kind`
        /// (openai_videos, replicate, fal, vertex_veo, gemini, runway, kling, seedance,
        /// dashscope, minimax, luma).
        #[arg(long, default_value = "openai_videos")]
        provider: crate::providers::ProviderKind,
    },
    /// Benchmark against the local RabbitMQ and PostgreSQL: the raw broker's hop rate, the
    /// service's check rate, scheduling lag and memory (service and simulator as child
    /// processes, a fresh prefix and database). See BENCHMARKS.md.
    Bench(BenchArgs),
    /// Run the service (every role unless --roles says otherwise).
    Serve {
        /// Comma list of generation, tracking, sweeper, relay.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "generation,tracking,sweeper,relay"
        )]
        roles: Vec<Role>,
    },
    /// Declare the exchanges and queues.
    Topology {
        #[command(subcommand)]
        action: TopologyAction,
    },
    /// Print the JSON Schema of every message, keyed by message name.
    Schema,
    /// Run the simulated video provider (every provider protocol; see README "Providers").
    SimProvider(SimProviderArgs),
    /// Inspect the configuration.
    Config {
        #[command(subcommand)]
        action: ConfigAction,
    },
    /// Publish a generation request and print its requestId.
    Submit(SubmitArgs),
    /// Ask to cancel a task.
    Cancel {
        /// The task's requestId.
        request_id: String,
        /// The tenant that owns it.
        #[arg(long)]
        virtual_key: String,
        /// Why the task is cancelled; the `VideoGenerationCancelled` event repeats it.
        #[arg(long)]
        reason: Option<String>,
    },
    /// List parked (poison or unprocessable) messages, or requeue one to where it was going.
    Parked {
        /// Republish this parked message (by id) to its original exchange and routing key.
        #[arg(long)]
        requeue: Option<i64>,
        /// How many to list.
        #[arg(long, default_value_t = 50)]
        limit: i64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Manage API keys and webhook signing secrets.
    Keys {
        #[command(subcommand)]
        action: keys::KeysAction,
    },
    /// Show a task from the database.
    Status {
        /// The task's requestId.
        request_id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
struct BenchArgs {
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Measured window of each phase, in seconds (default 30, quick 8).
    #[arg(long)]
    duration_secs: Option<u64>,
    /// Warm-up before each window, in seconds (default 10, quick 4).
    #[arg(long)]
    warmup_secs: Option<u64>,
    /// Tracked-task counts of the memory phases (default 1000,10000,100000; quick
    /// 1000,10000).
    #[arg(long, value_delimiter = ',')]
    tasks_list: Option<Vec<usize>>,
    /// A short run for development: figures are indicative only.
    #[arg(long)]
    quick: bool,
    /// Virtual keys (tenants) the tasks are spread over.
    #[arg(long, default_value_t = 64)]
    tenants: usize,
}

#[derive(Debug, Args)]
struct SimProviderArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8090")]
    listen: SocketAddr,
    /// Duration of a job in milliseconds.
    #[arg(long, default_value_t = 3000)]
    duration_ms: u64,
    /// Random extra duration per job, 0..=N milliseconds.
    #[arg(long, default_value_t = 0)]
    duration_jitter_ms: u64,
    /// Share of jobs that fail (0.0–1.0).
    #[arg(long, default_value_t = 0.0)]
    failure_rate: f64,
    /// Added latency per request in milliseconds.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
}

#[derive(Debug, Args)]
struct SubmitArgs {
    /// The tenant.
    #[arg(long)]
    virtual_key: String,
    /// Model name, routed to a provider by `routing.models`.
    #[arg(long)]
    model: String,
    /// What to generate.
    #[arg(long)]
    prompt: String,
    /// Clip length in seconds.
    #[arg(long)]
    duration_seconds: Option<u32>,
    /// Size, e.g. 1280x720.
    #[arg(long)]
    size: Option<String>,
    /// Request id (default: a fresh one).
    #[arg(long)]
    request_id: Option<String>,
    /// Follow the task with a progress bar; exit 0 completed, 3 failed or timed out, 4 cancelled.
    #[arg(long)]
    wait: bool,
}

#[derive(Debug, Subcommand)]
enum TopologyAction {
    /// Declare every exchange and queue (idempotent).
    Declare,
}

#[derive(Debug, Subcommand)]
enum ConfigAction {
    /// Print the effective configuration as TOML with secrets redacted; fail on invalid values.
    Check,
}

/// Runs the parsed command.
///
/// # Errors
/// Anything that stops the command; `main` prints the cause chain.
pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Schema => schema(),
        Command::Config {
            action: ConfigAction::Check,
        } => config_check(),
        Command::SimProvider(args) => sim_provider(args).await,
        Command::Topology {
            action: TopologyAction::Declare,
        } => topology_declare().await,
        Command::Status { request_id, json } => status(&request_id, json).await,
        Command::Submit(args) => submit(args).await,
        Command::Cancel {
            request_id,
            virtual_key,
            reason,
        } => cancel(&request_id, &virtual_key, reason).await,
        Command::Bench(args) => bench(args).await,
        Command::Demo {
            tasks,
            keep,
            provider,
        } => demo(tasks, keep, provider).await,
        Command::Parked {
            requeue: Some(id), ..
        } => parked_requeue(id).await,
        Command::Parked {
            requeue: None,
            limit,
            json,
        } => parked_list(limit, json).await,
        Command::Serve { roles } => serve(&roles).await,
        Command::Keys { action } => keys::keys(action).await,
    }
}

fn schema() -> anyhow::Result<ExitCode> {
    let all: serde_json::Map<String, serde_json::Value> = crate::messages::schemas()
        .into_iter()
        .map(|(name, key, mut schema)| {
            if let Some(obj) = schema.as_object_mut() {
                obj.insert("x-routing-key".to_owned(), key.into());
            }
            (name.to_owned(), schema)
        })
        .collect();
    println!("{}", serde_json::to_string_pretty(&all)?);
    Ok(ExitCode::SUCCESS)
}

fn config_check() -> anyhow::Result<ExitCode> {
    let settings = load_settings()?;
    let toml = settings
        .redacted()
        .context("writing the configuration as TOML")?;
    // Comments only around the TOML, so stdout stays a loadable config file.
    println!("# Effective configuration, secrets redacted: put back the `***` passwords");
    println!("# and `[REDACTED]` values before loading this as a config file.\n");
    print!("{toml}");
    println!(
        "\n# configuration OK (environment `{}`)",
        settings.environment
    );
    Ok(ExitCode::SUCCESS)
}

async fn sim_provider(args: SimProviderArgs) -> anyhow::Result<ExitCode> {
    // The simulator runs without a valid configuration; it only borrows the log format.
    let settings = Settings::load().ok();
    crate::telemetry::init(
        settings.as_ref().map_or(LogFormat::Json, |s| s.log.format),
        "info",
    );
    let sim = crate::providers::sim::SimSettings {
        duration_ms: args.duration_ms,
        duration_jitter_ms: args.duration_jitter_ms,
        failure_rate: args.failure_rate,
        latency_ms: args.latency_ms,
        ..crate::providers::sim::SimSettings::default()
    };
    crate::providers::sim::run(args.listen, sim, shutdown_signal())
        .await
        .with_context(|| format!("simulated provider on {}", args.listen))?;
    Ok(ExitCode::SUCCESS)
}

async fn topology_declare() -> anyhow::Result<ExitCode> {
    let settings = load_settings()?;
    crate::telemetry::init(settings.log.format, crate::telemetry::DEFAULT_FILTER);
    let topology = Topology::from_settings(&settings);
    // Connecting declares the whole topology.
    let broker = Broker::connect(BrokerOptions::from_settings(&settings), topology.clone())
        .await
        .context("declaring the topology")?;
    drop(broker);
    for name in topology
        .all_exchanges()
        .iter()
        .chain(topology.all_queues().iter())
    {
        println!("{name}");
    }
    Ok(ExitCode::SUCCESS)
}

async fn status(request_id: &str, json: bool) -> anyhow::Result<ExitCode> {
    let settings = load_settings()?;
    let store = connect_store(&settings).await?;
    let Some(task) = store.get(request_id).await? else {
        eprintln!("no task with requestId `{request_id}`");
        return Ok(ExitCode::from(1));
    };
    let view = TaskView::from(&task);
    if json {
        println!("{}", serde_json::to_string_pretty(&view)?);
    } else {
        println!("request      {}", view.request_id);
        println!("virtual key  {}", view.virtual_key_id);
        println!("status       {}", view.status.as_str());
        println!("progress     {}%", view.progress);
        println!("model        {} via {}", view.model, view.provider);
        if let Some(url) = &view.video_url {
            println!("video        {url}");
        }
        if let Some(e) = &view.error {
            println!("error        {e}");
        }
        println!("checks       {}", view.checks);
    }
    Ok(ExitCode::SUCCESS)
}

async fn submit(args: SubmitArgs) -> anyhow::Result<ExitCode> {
    let settings = load_settings()?;
    let stop = CancellationToken::new();
    let broker = connect_broker(&settings).await?;
    let mut request = crate::client::new_request(&args.virtual_key, &args.model, &args.prompt);
    request.duration_seconds = args.duration_seconds;
    request.size = args.size;
    if let Some(id) = args.request_id {
        request.request_id = id;
    }
    // Subscribed before publishing, so no event of the task is missed.
    let mut events = if args.wait {
        let conn = broker.connection(&stop).await?;
        Some(
            crate::client::EventStream::subscribe(
                &conn,
                broker.topology(),
                &["video.generation.#"],
            )
            .await?,
        )
    } else {
        None
    };
    let client = crate::client::Client::new(broker, stop.clone());
    let id = client
        .submit(&request)
        .await
        .context("publishing the request")?;
    println!("{id}");
    let Some(events) = events.as_mut() else {
        return Ok(ExitCode::SUCCESS);
    };
    let code = follow(events, &id).await;
    stop.cancel();
    Ok(code)
}

async fn cancel(
    request_id: &str,
    virtual_key: &str,
    reason: Option<String>,
) -> anyhow::Result<ExitCode> {
    let settings = load_settings()?;
    let stop = CancellationToken::new();
    let broker = connect_broker(&settings).await?;
    let client = crate::client::Client::new(broker, stop.clone());
    client
        .cancel(request_id, virtual_key, reason)
        .await
        .context("publishing the cancel")?;
    println!("cancel requested for {request_id}");
    stop.cancel();
    Ok(ExitCode::SUCCESS)
}

async fn bench(args: BenchArgs) -> anyhow::Result<ExitCode> {
    let settings = load_settings()?;
    crate::telemetry::init(LogFormat::Pretty, "warn,lapin=off");
    let mut options = crate::bench::BenchOptions::defaults(args.quick);
    if let Some(d) = args.duration_secs {
        options.duration = std::time::Duration::from_secs(d.max(1));
    }
    if let Some(w) = args.warmup_secs {
        options.warmup = std::time::Duration::from_secs(w);
    }
    if let Some(list) = args.tasks_list {
        options.tasks_list = list;
    }
    options.tenants = args.tenants.max(1);
    let report = crate::bench::run(settings, options).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", crate::bench::render_human(&report));
    }
    Ok(ExitCode::SUCCESS)
}

async fn demo(
    tasks: usize,
    keep: bool,
    provider: crate::providers::ProviderKind,
) -> anyhow::Result<ExitCode> {
    let settings = load_settings()?;
    // Logs would tear the progress bars: errors only, unless RUST_LOG says otherwise.
    crate::telemetry::init(LogFormat::Pretty, "error,lapin=off");
    crate::demo::run(
        settings,
        crate::demo::DemoOptions {
            tasks,
            keep,
            provider,
        },
    )
    .await?;
    Ok(ExitCode::SUCCESS)
}

async fn parked_requeue(id: i64) -> anyhow::Result<ExitCode> {
    let settings = load_settings()?;
    let store = connect_store(&settings).await?;
    if store.get_parked(id).await?.is_none() {
        eprintln!("no parked message with id {id}");
        return Ok(ExitCode::from(1));
    }
    let broker = connect_broker(&settings).await?;
    let stop = CancellationToken::new();
    let publisher = Publisher::new(broker, stop.clone());
    let result = crate::parking::requeue(&store, &publisher, id).await;
    stop.cancel();
    let parked = match result {
        Ok(parked) => parked,
        Err(crate::parking::RequeueError::NotFound(_)) => {
            eprintln!("no parked message with id {id}");
            return Ok(ExitCode::from(1));
        }
        Err(e) => return Err(e.into()),
    };
    println!(
        "requeued parked message {id} to `{}` / `{}`",
        if parked.original_exchange.is_empty() {
            "(default exchange)"
        } else {
            &parked.original_exchange
        },
        parked.routing_key
    );
    Ok(ExitCode::SUCCESS)
}

async fn parked_list(limit: i64, json: bool) -> anyhow::Result<ExitCode> {
    let settings = load_settings()?;
    let store = connect_store(&settings).await?;
    let list = store.list_parked(limit).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&list)?);
    } else if list.is_empty() {
        println!("no parked messages");
    } else {
        println!(
            "{:>6}  {:<20}  {:<28}  {:<9}  reason",
            "id", "parked at", "from queue", "requeued"
        );
        for p in &list {
            println!(
                "{:>6}  {:<20}  {:<28}  {:<9}  {}",
                p.id,
                p.parked_at.format("%Y-%m-%d %H:%M:%S"),
                p.original_queue,
                if p.requeued_at.is_some() { "yes" } else { "no" },
                p.reason
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn serve(roles: &[Role]) -> anyhow::Result<ExitCode> {
    let settings = load_settings()?;
    crate::telemetry::init(settings.log.format, crate::telemetry::DEFAULT_FILTER);
    let app = match Application::build(settings.clone(), roles).await {
        Ok(app) => app,
        Err(e) => {
            let hint = start_hint(&e, &settings);
            return Err(anyhow::Error::new(e).context(if hint.is_empty() {
                "cannot start".to_owned()
            } else {
                hint
            }));
        }
    };
    tracing::info!(http = %app.http_addr(), "listening");
    app.run(shutdown_signal()).await;
    Ok(ExitCode::SUCCESS)
}

fn load_settings() -> anyhow::Result<Settings> {
    Settings::load().context("invalid configuration")
}

fn start_hint(e: &StartError, settings: &Settings) -> String {
    let Targets {
        rabbitmq: rabbit,
        database: db,
    } = settings.targets();
    match e {
        StartError::Broker(crate::broker::BrokerError::Connect { .. }) => format!(
            "RabbitMQ is not reachable at {rabbit}.\n  Start it (`docker compose up -d rabbitmq`, or \
             `rabbitmq-server -detached` on this machine) or set APP__RABBITMQ__URL."
        ),
        StartError::Store(_) => format!(
            "PostgreSQL is not reachable at {db}.\n  Start it (`docker compose up -d postgres`, or \
             `pg_ctlcluster <version> main start`) or set APP__DATABASE__URL."
        ),
        _ => String::new(),
    }
}

async fn connect_broker(settings: &Settings) -> anyhow::Result<Arc<Broker>> {
    let topology = Topology::from_settings(settings);
    Broker::connect(BrokerOptions::from_settings(settings), topology)
        .await
        .with_context(|| {
            format!(
                "RabbitMQ at {} (start it with `docker compose up -d rabbitmq` or set APP__RABBITMQ__URL)",
                settings.targets().rabbitmq
            )
        })
}

async fn connect_store(settings: &Settings) -> anyhow::Result<Store> {
    Store::connect(&settings.database)
        .await
        .with_context(|| format!("PostgreSQL at {}", settings.targets().database))
}

impl clap::builder::ValueParserFactory for Role {
    type Parser = clap::builder::ValueParser;
    fn value_parser() -> Self::Parser {
        clap::builder::ValueParser::new(|s: &str| s.parse::<Role>())
    }
}

/// Follows one task's events with a progress bar; returns the exit code for its outcome.
async fn follow(events: &mut crate::client::EventStream, request_id: &str) -> ExitCode {
    let bar = indicatif::ProgressBar::new(100);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {prefix} [{bar:40}] {pos:>3}% {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_prefix(request_id.to_owned());
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    while let Some(event) = events.next().await {
        if event.request_id() != request_id {
            continue;
        }
        let body = &event.body;
        match event.routing_key.as_str() {
            "video.generation.started" => bar.set_message("started"),
            "video.generation.progress" => {
                bar.set_position(body["progress"].as_u64().unwrap_or(0));
                bar.set_message(body["status"].as_str().unwrap_or("").to_owned());
            }
            "video.generation.completed" => {
                bar.set_position(100);
                bar.finish_with_message(format!(
                    "completed: {}",
                    body["videoUrl"].as_str().unwrap_or("")
                ));
                return ExitCode::SUCCESS;
            }
            "video.generation.failed" => {
                bar.abandon_with_message(format!(
                    "failed: {}",
                    body["error"].as_str().unwrap_or("")
                ));
                return ExitCode::from(3);
            }
            "video.generation.cancelled" => {
                bar.abandon_with_message(format!(
                    "cancelled: {}",
                    body["reason"].as_str().unwrap_or("")
                ));
                return ExitCode::from(4);
            }
            "video.generation.command_rejected" => {
                bar.set_message(format!(
                    "rejected: {}",
                    body["reason"].as_str().unwrap_or("")
                ));
            }
            _ => {}
        }
    }
    bar.abandon_with_message("event stream ended");
    ExitCode::from(1)
}
