//! `[http]`: the one HTTP listener, and how it treats live streams and clients that stop reading.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{ensure, ConfigError};

/// `[http]`: the one HTTP listener (health, metrics, the task API, live events).
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct HttpSettings {
    /// Address of `/healthz`, `/readyz`, `/metrics`, `/v1/tasks` and `/v1/events`.
    pub listen: SocketAddr,
    /// Interval of the `: keep-alive` comment on an idle event stream (proxies close streams
    /// that stay silent; nginx after 60 s by default). A task's stream also re-reads its task
    /// this often, so an event the broker never delivered is made up for.
    pub sse_heartbeat_ms: u64,
    /// Events one event-stream client may have waiting: a client this far behind is dropped
    /// with a final `dropped` event instead of holding anything up.
    pub sse_buffer: usize,
    /// A connection whose client accepts no bytes for this long is closed: a stalled
    /// event-stream client is disconnected, and cannot hold up graceful shutdown.
    pub send_timeout_ms: u64,
}

impl HttpSettings {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        ensure(
            (100..=3_600_000).contains(&self.sse_heartbeat_ms),
            "http.sse_heartbeat_ms",
            "must be between 100 and 3600000",
        )?;
        ensure(
            (1..=1_000_000).contains(&self.sse_buffer),
            "http.sse_buffer",
            "must be between 1 and 1000000",
        )?;
        ensure(
            self.send_timeout_ms >= 100,
            "http.send_timeout_ms",
            "must be at least 100",
        )
    }

    /// `sse_heartbeat_ms` as a duration.
    pub fn sse_heartbeat(&self) -> Duration {
        Duration::from_millis(self.sse_heartbeat_ms)
    }

    /// `send_timeout_ms` as a duration.
    pub fn send_timeout(&self) -> Duration {
        Duration::from_millis(self.send_timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::super::Settings;

    fn load(var: &str, value: &str) -> Result<Settings, String> {
        Settings::load_from(&[(var.to_owned(), value.to_owned())]).map_err(|e| e.to_string())
    }

    #[test]
    fn live_stream_keys_have_defaults_and_overrides() {
        let s = Settings::load_from(&[]).expect("defaults are valid");
        assert_eq!(s.http.sse_heartbeat_ms, 15_000);
        assert_eq!(s.http.sse_buffer, 256);
        assert_eq!(s.http.send_timeout_ms, 10_000);
        let s = load("APP__HTTP__SSE_HEARTBEAT_MS", "500").expect("valid");
        assert_eq!(s.http.sse_heartbeat().as_millis(), 500);
    }

    #[test]
    fn bad_live_stream_values_name_their_key() {
        for (var, value, key) in [
            ("APP__HTTP__SSE_HEARTBEAT_MS", "0", "http.sse_heartbeat_ms"),
            (
                "APP__HTTP__SSE_HEARTBEAT_MS",
                "often",
                "http.sse_heartbeat_ms",
            ),
            ("APP__HTTP__SSE_BUFFER", "0", "http.sse_buffer"),
            ("APP__HTTP__SEND_TIMEOUT_MS", "5", "http.send_timeout_ms"),
        ] {
            let err = load(var, value).expect_err(var);
            assert!(
                err.contains(key),
                "{var}={value}: `{err}` does not name `{key}`"
            );
        }
    }
}
