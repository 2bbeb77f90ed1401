//! The progress tracker's self-scheduled check: each check, when it runs, publishes the next one
//! into a delay tier, so a task's checks form one chain.

use chrono::{DateTime, Utc};

use super::Meta;

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

impl VideoProgressCheckRequested {
    /// The first check of a chain, due at `scheduled_at`: the one the generation orchestrator
    /// sends when the provider accepts the task (`sequence` 0), or the sweeper's fresh check for
    /// a lost chain (`sequence` is then the task row's `check_sequence`).
    pub fn first(
        request_id: impl Into<String>,
        virtual_key_id: impl Into<String>,
        sequence: i64,
        start_time: DateTime<Utc>,
        scheduled_at: DateTime<Utc>,
    ) -> Self {
        Self {
            meta: Meta::new(),
            request_id: request_id.into(),
            virtual_key_id: virtual_key_id.into(),
            scheduled_at,
            interval_index: 0,
            start_time,
            sequence,
        }
    }

    /// The check after this one in its chain, due at `scheduled_at`.
    #[must_use]
    pub fn next(&self, sequence: i64, scheduled_at: DateTime<Utc>) -> Self {
        Self {
            meta: Meta::new(),
            scheduled_at,
            interval_index: self.interval_index + 1,
            sequence,
            ..self.clone()
        }
    }

    /// This check again under a new message id: one that arrived before it was due goes round
    /// again.
    #[must_use]
    pub fn resent(&self) -> Self {
        Self {
            meta: Meta::new(),
            ..self.clone()
        }
    }
}
