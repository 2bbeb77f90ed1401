//! # video-orchestrator
//!
//! Runs long video-generation jobs at external providers and tracks their progress through
//! RabbitMQ, with no fire-and-forget background work: every task the service spawns is owned and
//! awaited on shutdown, and every piece of state lives in PostgreSQL or in the broker.
//!
//! ## Layout
//! - [`config`]: typed settings (`config/default.toml`, `APP_ENVIRONMENT`, `APP__SECTION__KEY`).
//! - [`telemetry`]: JSON logs, `RUST_LOG`.
//! - [`messages`]: the message contract (pure data).
//! - [`topology`]: exchanges and queues, declared at every start.
//! - [`broker`]: connection with reconnect, confirmed publisher, consumer loop with parking and
//!   delayed retries (never a requeue).
//! - [`store`]: PostgreSQL tasks, outbox, leases.
//! - [`providers`]: the `VideoProvider` trait, its HTTP adapters and the simulated provider.
//! - [`generation`]: the generation orchestrator (lifecycle, outbox writes), which waits at a
//!   database gate while PostgreSQL is down.
//! - [`progress_tracking`]: the self-scheduling check chain; [`partitions`]: who consumes which
//!   partition; [`sweeper`]: re-arms lost chains.
//! - [`relay`]: publishes the outbox; [`webhooks`]: signed callbacks.
//! - [`http`]: health, readiness, metrics, task lookup; [`app`]: roles, start-up and shutdown;
//!   [`cli`]: the commands; [`bench`]: the benchmark against the raw broker.

#![warn(missing_docs, missing_debug_implementations, rust_2018_idioms)]

pub mod app;
pub mod auth;
pub mod batching;
pub mod bench;
pub mod broker;
pub mod cli;
pub mod client;
pub mod config;
pub mod demo;
pub mod generation;
pub mod http;
pub mod messages;
pub mod partitions;
pub mod progress_tracking;
pub mod providers;
mod redact;
pub mod relay;
pub mod store;
pub mod sweeper;
pub mod telemetry;
pub mod topology;
pub mod webhooks;
