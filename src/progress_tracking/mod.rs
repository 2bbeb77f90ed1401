//! The progress-tracking orchestrator: one self-scheduling chain of checks per task.
//!
//! A check (`VideoProgressCheckRequested`) arrives from a partition queue, is checked against the
//! task row, asks the provider for status, publishes progress, and schedules the next check into
//! a delay tier. The order of the steps is the chain's guarantee:
//!
//! 1. publish the next check (or `VideoProviderTaskFinished`) and the progress event, confirmed;
//! 2. advance the row's `check_sequence` past this check's sequence (one conditional UPDATE);
//! 3. acknowledge.
//!
//! A crash before 1 redelivers the check, which runs again (it never ran). A crash between 1 and
//! 3 leaves a duplicate next check beside the redelivered one: whichever runs first advances the
//! row and the other is stale on arrival. So the chain never dies and never forks for longer than
//! one hop. A check runs only when its `sequence` is not below the row's `check_sequence`, and
//! running it moves the row past it, so every older or duplicate check is dropped.
//!
//! Layout: `policy` (intervals, delay tiers, published progress), `limiter` (per-key
//! concurrency), `outcome` (a check's [`CheckOutcome`], also its metric label), `tracker` (the
//! [`ProgressTracker`] that runs a check).

mod limiter;
mod outcome;
mod policy;
mod tracker;

pub use crate::crash::CrashPoint;
pub use outcome::CheckOutcome;
pub use policy::{next_interval, published_progress, schedule, PublishedProgress, Schedule};
pub use tracker::ProgressTracker;
