//! The progress tracker's self-scheduled check: each check, when it runs, publishes the next one
//! into a delay tier, so a task's checks form one chain.

use chrono::{DateTime, Utc};

message! {
    /// One self-scheduled progress check.
    VideoProgressCheckRequested = "video.progress.check_requested" {
        request_id,
        virtual_key_id,
        /// When the check is due (lag = processing start − this).
        pub scheduled_at: DateTime<Utc>,
        /// How many checks came before in this chain (drives the interval policy).
        pub interval_index: u32,
        /// When tracking started.
        pub start_time: DateTime<Utc>,
        /// Runs only when not below the task row's `check_sequence`; a lower one is stale.
        pub sequence: i64,
    }
}
