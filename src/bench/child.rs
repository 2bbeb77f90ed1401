//! Child processes (the simulated provider, the service): started with a log file, stopped with
//! SIGTERM, killed if dropped.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::{say, Ctx};

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

/// Starts the simulated provider, out of process so its CPU and memory are not the service's,
/// and waits until it answers; records its address and pid in `ctx`.
pub(super) async fn start_sim_provider(ctx: &mut Ctx) -> anyhow::Result<ChildProc> {
    let sim_addr = free_port()?;
    let mut sim = ChildProc::spawn(
        "sim-provider",
        &ctx.exe,
        &[
            "sim-provider",
            "--listen",
            &sim_addr.to_string(),
            "--duration-ms",
            "3600000",
        ],
        &[("RUST_LOG".to_owned(), "warn".to_owned())],
        ctx.workdir.join("sim-provider.log"),
    )?;
    ctx.sim_url = format!("http://{sim_addr}");
    ctx.sim_pid = Some(sim.pid);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = sim.exited() {
            bail!(
                "the simulated provider exited ({status}):\n{}",
                sim.log_tail()
            );
        }
        let up = ctx
            .http
            .get(format!("{}/sim/stats", ctx.sim_url))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        if up {
            break;
        }
        if Instant::now() > deadline {
            bail!("the simulated provider did not answer within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    say(format!(
        "simulated provider pid {} on {}",
        sim.pid, ctx.sim_url
    ));
    Ok(sim)
}
