//! The `*_ms` keys as [`Duration`]s.

use std::time::Duration;

use super::{
    DatabaseSettings, GenerationSettings, OutboxSettings, RabbitSettings, RetentionSettings,
    ShutdownSettings, TrackingSettings, WebhookSettings,
};

/// For each `*_ms` key a method giving it as a [`Duration`], so no caller converts milliseconds
/// (the keys stay in milliseconds: they are the configuration's interface).
macro_rules! durations {
    ($($settings:ty { $($name:ident => $field:ident),+ $(,)? })+) => {
        $(impl $settings {
            $(
                #[doc = concat!("`", stringify!($field), "` as a duration.")]
                pub fn $name(&self) -> Duration {
                    Duration::from_millis(self.$field)
                }
            )+
        })+
    };
}

durations! {
    RabbitSettings {
        reconnect_initial => reconnect_initial_ms,
        reconnect_max => reconnect_max_ms,
        confirm_timeout => confirm_timeout_ms,
    }
    DatabaseSettings { acquire_timeout => acquire_timeout_ms }
    GenerationSettings {
        pending_grace => pending_grace_ms,
        submit_backoff_initial => submit_backoff_initial_ms,
        submit_backoff_max => submit_backoff_max_ms,
        retry_max => retry_max_ms,
    }
    TrackingSettings {
        max_duration => max_duration_ms,
        sweeper_grace => sweeper_grace_ms,
        sweeper_interval => sweeper_interval_ms,
        lease_ttl => lease_ttl_ms,
        lease_heartbeat => lease_heartbeat_ms,
    }
    OutboxSettings { poll_interval => poll_interval_ms }
    WebhookSettings {
        timeout => timeout_ms,
        max_retry => max_retry_ms,
    }
    RetentionSettings { interval => interval_ms }
    ShutdownSettings { grace => grace_ms }
}
