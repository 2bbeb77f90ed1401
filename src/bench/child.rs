//! Child processes: started with a log file, stopped with SIGTERM, killed if dropped.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;

/// A child process we started; killed if dropped, stopped with SIGTERM by [`ChildProc::stop`].
#[derive(Debug)]
pub(super) struct ChildProc {
    name: String,
    child: tokio::process::Child,
    pub(super) pid: u32,
    pub(super) log: PathBuf,
}

impl ChildProc {
    pub(super) fn spawn(
        name: &str,
        exe: &Path,
        args: &[&str],
        env: &[(String, String)],
        log: PathBuf,
    ) -> anyhow::Result<Self> {
        let file = std::fs::File::create(&log)
            .with_context(|| format!("creating the log file {}", log.display()))?;
        let child = tokio::process::Command::new(exe)
            .args(args)
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(file)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {name} ({})", exe.display()))?;
        let pid = child
            .id()
            .with_context(|| format!("{name} exited at once"))?;
        Ok(Self {
            name: name.to_owned(),
            child,
            pid,
            log,
        })
    }

    pub(super) fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    pub(super) fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// SIGTERM, then SIGKILL after `grace`.
    pub(super) async fn stop(mut self, grace: Duration) {
        if self.exited().is_some() {
            return;
        }
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status();
        match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(_) => {}
            Err(_) => {
                eprintln!(
                    "bench: {} (pid {}) did not stop within {grace:?}; killing it",
                    self.name, self.pid
                );
                let _ = self.child.kill().await;
            }
        }
    }
}

/// A port on the loopback interface nobody listens on (yet).
pub(super) fn free_port() -> anyhow::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?)
}
