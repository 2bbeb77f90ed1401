//! The real binary (and service control tools) as child processes: one spawner for every suite.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

/// The name cargo gives the service binary's path in `CARGO_BIN_EXE_<name>`.
const BIN_ENV: &str = "CARGO_BIN_EXE_video-orchestrator";

/// The service binary `cargo test` built for this run.
///
/// Cargo passes `CARGO_BIN_EXE_video-orchestrator` to integration tests at compile time (and to
/// the test process at run time); a library such as this one only sees the second. A test binary
/// started by hand lacks it: then the binary is the one next to the test binary's `deps/`.
pub fn service_binary() -> PathBuf {
    if let Some(path) = std::env::var_os(BIN_ENV) {
        return path.into();
    }
    let test_binary = std::env::current_exe().expect("the test binary's path");
    let profile_dir = test_binary
        .parent()
        .and_then(Path::parent)
        .expect("the test binary lies in <target>/<profile>/deps");
    profile_dir.join("video-orchestrator")
}

/// `<target>/tmp`, where cargo's `CARGO_TARGET_TMPDIR` points integration tests: logs and
/// figures of the suites.
pub fn target_tmp_dir() -> PathBuf {
    let binary = service_binary();
    let target = binary
        .parent()
        .and_then(Path::parent)
        .expect("the binary lies in <target>/<profile>");
    target.join("tmp")
}

/// The service binary with `args`: no stdin, killed when the handle is dropped (so a failing test
/// leaves no process behind). Set its environment and outputs, then spawn it.
pub fn command(args: &[&str]) -> Command {
    let mut command = Command::new(service_binary());
    command.args(args).stdin(Stdio::null()).kill_on_drop(true);
    command
}

/// Starts the binary with `args` and `vars`, its stderr (the service logs there) to `log`.
///
/// # Panics
/// When the log file cannot be created or the binary cannot start.
pub fn spawn_logging_to(args: &[&str], vars: &[(String, String)], log: &Path) -> Child {
    let file =
        std::fs::File::create(log).unwrap_or_else(|e| panic!("create log {}: {e}", log.display()));
    command(args)
        .envs(vars.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdout(Stdio::null())
        .stderr(Stdio::from(file))
        .spawn()
        .unwrap_or_else(|e| panic!("start {}: {e}", service_binary().display()))
}

/// The last `lines` lines of a log, for panic messages.
pub fn tail(log: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Waits until the child logs `message` (JSON logs) and returns that line's string `field`.
///
/// # Panics
/// When the child exits first, or nothing is logged within 60 s.
pub async fn logged_field(child: &mut Child, log: &Path, message: &str, field: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(text) = tokio::fs::read_to_string(log).await {
            for line in text.lines() {
                let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                    continue;
                };
                if v["message"] == message {
                    if let Some(s) = v[field].as_str() {
                        return s.to_owned();
                    }
                }
            }
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "{} exited ({status}) before logging `{message}`:\n{}",
                log.display(),
                tail(log, 20)
            );
        }
        assert!(
            Instant::now() < deadline,
            "{} did not log `{message}` within 60 s:\n{}",
            log.display(),
            tail(log, 20)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `kill -TERM pid`, what an orchestrator sends a container it stops. Returns whether `kill`
/// succeeded.
pub fn sigterm(pid: u32) -> bool {
    std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .is_ok_and(|s| s.success())
}

/// SIGTERM, then the exit status if the child exits `within`; else SIGKILL and `None`.
pub async fn terminate(child: &mut Child, pid: u32, within: Duration) -> Option<ExitStatus> {
    sigterm(pid);
    match tokio::time::timeout(within, child.wait()).await {
        Ok(Ok(status)) => Some(status),
        _ => {
            let _ = child.start_kill();
            let _ = child.wait().await;
            None
        }
    }
}

/// Runs a blocking command (a service control tool) and returns whether it succeeded, with its
/// output for messages.
pub fn run_tool(program: &str, args: &[&str]) -> (bool, String) {
    match std::process::Command::new(program).args(args).output() {
        Ok(out) => (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        ),
        Err(e) => (false, format!("cannot run {program}: {e}")),
    }
}
