//! Command-line interface: `serve`, `topology declare`, `schema`, `sim-provider`, `config check`,
//! `status`. Each command returns an exit code; `main` only maps errors to text.

use std::net::SocketAddr;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::app::{describe_targets, shutdown_signal, Application, Role, StartError};
use crate::config::Settings;

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
    /// Exchanges and queues.
    Topology {
        #[command(subcommand)]
        action: TopologyAction,
    },
    /// Print the JSON Schema of every message, keyed by message name.
    Schema,
    /// Run the simulated video provider (OpenAI Videos and Replicate protocols).
    SimProvider {
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
    },
    /// Configuration.
    Config {
        #[command(subcommand)]
        action: ConfigAction,
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

#[derive(Debug, Subcommand)]
enum TopologyAction {
    /// Declare every exchange and queue (idempotent).
    Declare,
}

#[derive(Debug, Subcommand)]
enum ConfigAction {
    /// Print the effective configuration with secrets redacted; fail on invalid values.
    Check,
}

fn load_settings() -> anyhow::Result<Settings> {
    Settings::load().context("invalid configuration")
}

fn start_hint(e: &StartError, settings: &Settings) -> String {
    let (rabbit, db) = describe_targets(settings);
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

/// Runs the parsed command.
///
/// # Errors
/// Anything that stops the command; `main` prints the cause chain.
pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Schema => {
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
        Command::Config {
            action: ConfigAction::Check,
        } => {
            let settings = load_settings()?;
            println!("{}", settings.redacted());
            println!("configuration OK (environment `{}`)", settings.environment);
            Ok(ExitCode::SUCCESS)
        }
        Command::SimProvider {
            listen,
            duration_ms,
            duration_jitter_ms,
            failure_rate,
            latency_ms,
        } => {
            let settings = Settings::load().ok();
            crate::telemetry::init(
                settings
                    .as_ref()
                    .map_or(crate::config::LogFormat::Json, |s| s.log.format),
                "info",
            );
            let sim = crate::providers::sim::SimSettings {
                duration_ms,
                duration_jitter_ms,
                failure_rate,
                latency_ms,
                ..crate::providers::sim::SimSettings::default()
            };
            crate::providers::sim::run(listen, sim, shutdown_signal())
                .await
                .with_context(|| format!("simulated provider on {listen}"))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Topology {
            action: TopologyAction::Declare,
        } => {
            let settings = load_settings()?;
            crate::telemetry::init(settings.log.format, "info");
            let topology = crate::topology::Topology::from_settings(&settings);
            let broker = crate::broker::Broker::connect(
                crate::broker::BrokerOptions::from_settings(&settings),
                topology.clone(),
            )
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
        Command::Status { request_id, json } => {
            let settings = load_settings()?;
            let store = crate::store::Store::connect(&settings.database)
                .await
                .with_context(|| format!("PostgreSQL at {}", describe_targets(&settings).1))?;
            let Some(task) = store.get(&request_id).await? else {
                eprintln!("no task with requestId `{request_id}`");
                return Ok(ExitCode::from(1));
            };
            let view = crate::store::TaskView::from(&task);
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
        Command::Serve { roles } => {
            let settings = load_settings()?;
            crate::telemetry::init(settings.log.format, "info");
            let app = match Application::build(settings.clone(), &roles).await {
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
    }
}

impl clap::builder::ValueParserFactory for Role {
    type Parser = clap::builder::ValueParser;
    fn value_parser() -> Self::Parser {
        clap::builder::ValueParser::new(|s: &str| s.parse::<Role>())
    }
}
