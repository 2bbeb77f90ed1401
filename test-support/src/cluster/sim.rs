//! The simulated provider as a child process (`video-orchestrator sim-provider`), so a run's
//! provider lives apart from the test process it measures.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use tokio::process::Child;
use video_orchestrator::providers::sim::{SimFaults, SimStats};

use crate::process::{logged_field, spawn_logging_to, terminate};

/// The simulated provider, run as `video-orchestrator sim-provider`.
#[derive(Debug)]
pub struct SimProcess {
    child: Child,
    pid: u32,
    /// Where it listens.
    pub addr: SocketAddr,
    http: reqwest::Client,
}

impl SimProcess {
    /// Starts it on a free loopback port, its jobs taking `duration_ms` plus a random
    /// `0..=jitter_ms`, logging to `log`; returns once it listens.
    pub(crate) async fn start(log: &Path, duration_ms: u64, jitter_ms: u64) -> Self {
        let vars = vec![
            ("APP__LOG__FORMAT".to_owned(), "json".to_owned()),
            ("RUST_LOG".to_owned(), "info".to_owned()),
        ];
        let (d, j) = (duration_ms.to_string(), jitter_ms.to_string());
        let mut child = spawn_logging_to(
            &[
                "sim-provider",
                "--listen",
                "127.0.0.1:0",
                "--duration-ms",
                &d,
                "--duration-jitter-ms",
                &j,
            ],
            &vars,
            log,
        );
        let pid = child.id().expect("sim pid");
        let addr = logged_field(&mut child, log, "simulated provider listening", "addr")
            .await
            .parse()
            .expect("sim address");
        Self {
            child,
            pid,
            addr,
            http: http_client(),
        }
    }

    /// `http://ADDR`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Replaces the injected faults (`POST /sim/faults`).
    pub async fn set_faults(&self, faults: &SimFaults) {
        let r = self
            .http
            .post(format!("{}/sim/faults", self.base_url()))
            .json(faults)
            .send()
            .await
            .expect("POST /sim/faults");
        assert!(r.status().is_success(), "POST /sim/faults: {}", r.status());
    }

    /// Its counters (`GET /sim/stats`).
    pub async fn stats(&self) -> SimStats {
        self.http
            .get(format!("{}/sim/stats", self.base_url()))
            .send()
            .await
            .expect("GET /sim/stats")
            .json()
            .await
            .expect("sim stats parse")
    }

    /// The provider's own view of a job: `completed`, `failed`, `queued`, `in_progress`.
    pub async fn job_status(&self, job: &str) -> Option<String> {
        let r = self
            .http
            .get(format!("{}/v1/videos/{job}", self.base_url()))
            .bearer_auth("sim-key")
            .send()
            .await
            .ok()?;
        let v: serde_json::Value = r.json().await.ok()?;
        v["status"].as_str().map(str::to_owned)
    }

    pub(crate) async fn stop(mut self) {
        let pid = self.pid;
        terminate(&mut self.child, pid, Duration::from_secs(10)).await;
    }
}

/// For `/readyz`, `/metrics` and the simulator's API: short timeouts, so a hung child fails a
/// wait instead of holding it.
pub(crate) fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(3))
        .build()
        .expect("HTTP client")
}
