//! What the test binaries of video-orchestrator share (`integration`, `reliability`, `faults`,
//! `cluster`), compiled once instead of once per binary.
//!
//! - [`TestEnv`]: a topology prefix of the test's own on the real broker and a scratch database on
//!   the real PostgreSQL, both given back when the test ends (also when it fails);
//!   [`EventCollector`] reads what the service publishes on `video.events`.
//! - [`app`]: the service in process ([`spawn_app`], [`Instance`]) beside the simulated provider on
//!   loopback, with settings that make a test fast.
//! - [`process`]: the real binary as a child process (one spawner for every suite).
//! - [`cluster`]: the reliability suite's harness: `serve` instances and the simulated provider
//!   as child processes, a load, faults, and the books checked at the end ([`cluster::books`]).
//! - [`prometheus`]: counters read from `/metrics`.
//!
//! The services come from `APP__RABBITMQ__URL` and `APP__DATABASE__URL` when set, else from the
//! defaults in `config/default.toml` (the local broker and PostgreSQL that `.ci/run` starts).
//! Set `TEST_LOG=1` to see the service's logs.

#![warn(missing_docs)]

pub mod app;
pub mod cluster;
mod env;
mod events;
pub mod figures;
pub mod process;
pub mod prometheus;
mod scratch;

pub use app::{eventually, spawn_app, Instance, TestApp};
pub use env::TestEnv;
pub use events::{consume_unacked, header, Event, EventCollector};
