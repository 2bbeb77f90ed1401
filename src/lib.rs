//! # video-orchestrator
//!
//! Runs long video-generation jobs at external providers and tracks their progress through
//! RabbitMQ, with no fire-and-forget background work: every task the service spawns is owned and
//! awaited on shutdown, and every piece of state lives in PostgreSQL or in the broker.
//!
//! ## Layout
//! - [`config`]: typed settings (`config/default.toml`, `APP_ENVIRONMENT`, `APP__SECTION__KEY`);
//!   each section checks itself. `redact` keeps secrets out of logs and `config show`.
//! - [`telemetry`]: JSON logs, `RUST_LOG`.
//! - [`messages`]: the message contract, pure data (commands, events, checks, the envelope, the
//!   decoder and its limits); it imports nothing of ours.
//! - [`topology`]: exchanges and queues, declared at every start (MassTransit's in `masstransit`).
//! - [`interop`]: other frameworks' wire formats for our contract (MassTransit's envelope and raw
//!   JSON), translated at the edges so everything else sees only our contract.
//! - [`broker`]: connection with reconnect and confirmed publisher (`mod.rs`), the consumer loop
//!   with parking and delayed retries, never a requeue (`consumer`), trace context (`trace`).
//! - [`store`]: all of PostgreSQL, one file per aggregate (tasks, outbox, checks, parked messages,
//!   leases, webhooks, API keys, retention, scratch databases); callers get domain methods and a
//!   [`store::UnitOfWork`], never sqlx types.
//! - [`providers`]: the `VideoProvider` trait; `settings`, `registry` (adapters by kind) and the
//!   HTTP `transport`; one file per protocol; `sim/` speaks each protocol on loopback, one file
//!   per protocol plus the control API.
//! - [`generation`]: the generation orchestrator: `request` (validate, record, submit once,
//!   start tracking), `ending` (every terminal transition through one sequence), its database gate.
//! - [`progress_tracking`]: the self-scheduling check chain (`tracker`, the interval `policy`, the
//!   per-key `limiter`, `CheckOutcome`); [`partitions`]: who consumes which partition;
//!   [`sweeper`]: re-arms lost chains.
//! - [`relay`]: publishes the outbox; [`webhooks`]: signed callbacks and their address checks;
//!   [`retention`]: removes what is past `[retention]`.
//! - [`metrics`]: every metric's name, help and labels, the recorder, and the series that exist
//!   at zero from the first scrape.
//! - [`parking`]: requeues a parked message (the CLI and the console).
//! - [`auth`]: API keys; [`http`]: health, readiness, metrics, task lookup; [`live`]: live task
//!   events over server-sent events (the hub on `video.events`, the streams); [`console`]: the
//!   operator console at `/console` and its admin API; [`app`]: roles,
//!   start-up and shutdown; [`cli`]: one function per command; [`demo`]; [`bench`](mod@bench): the
//!   benchmark against the raw broker, one file per phase.
//!
//! `generation` and `progress_tracking` never import each other: they talk only through
//! messages, as two instances on two machines would.

#![warn(missing_docs, missing_debug_implementations, rust_2018_idioms)]

pub mod app;
pub mod auth;
pub mod batching;
pub mod bench;
pub mod broker;
pub mod cli;
pub mod client;
pub mod config;
pub mod console;
pub mod crash;
pub mod demo;
pub mod generation;
pub mod http;
pub mod interop;
pub mod live;
pub mod messages;
pub mod metrics;
pub mod parking;
pub mod partitions;
pub mod progress_tracking;
pub mod providers;
mod redact;
pub mod relay;
pub mod retention;
pub mod store;
pub mod sweeper;
pub mod telemetry;
pub mod topology;
pub mod webhooks;
