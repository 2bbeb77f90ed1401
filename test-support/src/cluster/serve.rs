//! One `serve` process of a run.

use std::net::SocketAddr;
use std::path::PathBuf;

use tokio::process::Child;

use crate::process::{logged_field, spawn_logging_to};

/// One `serve` process.
#[derive(Debug)]
pub struct ServeProcess {
    pub(crate) child: Child,
    /// Its pid.
    pub pid: u32,
    /// Its HTTP address.
    pub http: SocketAddr,
    /// Its id in the lease tables.
    pub instance_id: String,
    /// Its log file.
    pub log: PathBuf,
}

impl ServeProcess {
    /// Starts `serve` with `vars`, logging to `log`; returns once it listens and logged its
    /// instance id.
    pub(crate) async fn start(vars: &[(String, String)], log: PathBuf) -> Self {
        let mut child = spawn_logging_to(&["serve"], vars, &log);
        let pid = child.id().expect("serve pid");
        let http = logged_field(&mut child, &log, "listening", "http")
            .await
            .parse()
            .expect("serve HTTP address");
        let instance_id =
            logged_field(&mut child, &log, "video-orchestrator running", "instance").await;
        Self {
            child,
            pid,
            http,
            instance_id,
            log,
        }
    }

    /// `GET /readyz` answered 200.
    pub async fn ready(&self, http: &reqwest::Client) -> bool {
        http.get(format!("http://{}/readyz", self.http))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
    }

    /// `GET /readyz` answered 503 (reachable, not ready).
    pub async fn not_ready(&self, http: &reqwest::Client) -> bool {
        http.get(format!("http://{}/readyz", self.http))
            .send()
            .await
            .is_ok_and(|r| r.status() == reqwest::StatusCode::SERVICE_UNAVAILABLE)
    }

    /// `GET /metrics`.
    pub async fn metrics(&self, http: &reqwest::Client) -> Option<String> {
        http.get(format!("http://{}/metrics", self.http))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()
    }

    /// Still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}
