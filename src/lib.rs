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
//! - [`broker`]: connection with reconnect, confirmed publisher, consumer loop with parking.
//! - [`store`]: PostgreSQL tasks, outbox, leases.
//! - [`providers`]: the `VideoProvider` trait, its HTTP adapters and the simulated provider.

#![warn(missing_docs, missing_debug_implementations, rust_2018_idioms)]

pub mod broker;
pub mod config;
pub mod messages;
pub mod providers;
pub mod store;
pub mod telemetry;
pub mod topology;
