//! Stopping and starting this machine's RabbitMQ and PostgreSQL, safely.
//!
//! - One test at a time: a process-wide async mutex, plus a lock directory so a second `cargo test`
//!   started meanwhile (another engineer's) waits for this one.
//! - Never under someone else's feet: before stopping anything, wait until no other test binary
//!   of this project runs (`pgrep`), for up to five minutes.
//! - Always restored: [`Services`] starts whatever it stopped when dropped — also when the test
//!   panics — synchronously, and waits until the service answers, so the next test (and the next
//!   `.ci/run`) finds both up. Create it after the run's `Cluster`, so it drops first and the
//!   cluster's clean-up finds the services running.

use std::time::{Duration, Instant};

use test_support::figures::note;
use test_support::process::run_tool;

/// Held for a whole test.
#[derive(Debug)]
pub struct Exclusive {
    _local: tokio::sync::MutexGuard<'static, ()>,
    _file: MachineLock,
}

/// Anything else of this project that may be using the broker or the database: a test binary
/// (`target/*/deps/<name>-<hash>`) or the service binary itself (a `serve`, `bench`, `demo` or
/// `sim-provider` someone runs). This process is left out by pid.
const OTHERS: &str =
    "target/(debug|release)/(deps/[A-Za-z0-9_]+-[0-9a-f]{16}|video-orchestrator)( |$)";

/// Pids of [`OTHERS`], this process excluded.
fn others() -> Vec<u32> {
    let (_, out) = run_tool("pgrep", &["-f", OTHERS]);
    out.lines()
        .filter_map(|l| l.trim().parse::<u32>().ok())
        .filter(|pid| *pid != std::process::id())
        .collect()
}

/// Takes the locks, waits until no other test binary runs and makes sure both services are up.
///
/// # Panics
/// When other test binaries keep running for five minutes.
pub async fn exclusive(run: &str) -> Exclusive {
    static LOCAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let local = LOCAL.lock().await;
    let file = MachineLock::acquire().await;
    let t = Instant::now();
    let mut noted = false;
    loop {
        let pids = others();
        if pids.is_empty() {
            break;
        }
        if !noted {
            note(
                run,
                &format!("waiting for other test binaries and services to finish (pids {pids:?})"),
            );
            noted = true;
        }
        assert!(
            t.elapsed() < Duration::from_secs(300),
            "{run}: other test binaries or services kept running for 5 minutes (pids {pids:?}); \
             not stopping the shared RabbitMQ/PostgreSQL under them"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    tokio::task::spawn_blocking(|| {
        ensure_rabbit_up();
        ensure_postgres_up();
    })
    .await
    .expect("services up");
    Exclusive {
        _local: local,
        _file: file,
    }
}

/// One holder on the machine: a directory created atomically, holding the owner's pid (a lock
/// whose owner died is taken over). `File::lock` would do, but it is newer than this crate's
/// `rust-version`.
#[derive(Debug)]
struct MachineLock(std::path::PathBuf);

impl MachineLock {
    async fn acquire() -> Self {
        let dir = std::env::temp_dir().join("video-orchestrator-shared-services.lock");
        loop {
            match std::fs::create_dir(&dir) {
                Ok(()) => {
                    let _ = std::fs::write(dir.join("pid"), std::process::id().to_string());
                    return Self(dir);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let owner = std::fs::read_to_string(dir.join("pid"))
                        .ok()
                        .and_then(|p| p.trim().parse::<u32>().ok());
                    let young = std::fs::metadata(&dir)
                        .and_then(|m| m.modified())
                        .is_ok_and(|t| t.elapsed().unwrap_or_default() < Duration::from_secs(10));
                    let dead = match owner {
                        Some(pid) => !std::path::Path::new(&format!("/proc/{pid}")).exists(),
                        // Being written, or left by a process killed in between.
                        None => !young,
                    };
                    if dead {
                        // (A plain file of that name is left over too.)
                        let _ =
                            std::fs::remove_dir_all(&dir).or_else(|_| std::fs::remove_file(&dir));
                        continue;
                    }
                }
                Err(e) => panic!("lock {}: {e}", dir.display()),
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

impl Drop for MachineLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Stops and starts the services; starts them again when dropped.
#[derive(Debug, Default)]
pub struct Services {
    _private: (),
}

impl Services {
    /// The guard.
    pub fn guard() -> Self {
        Self::default()
    }

    /// `rabbitmqctl stop_app`: the node stays, the broker application (and every connection)
    /// stops; durable queues and their messages stay on disk.
    pub async fn stop_rabbit(&self) {
        let (ok, out) = tokio::task::spawn_blocking(|| {
            run_tool("timeout", &["120", "rabbitmqctl", "-q", "stop_app"])
        })
        .await
        .expect("stop_app task");
        assert!(ok, "rabbitmqctl stop_app failed: {out}");
    }

    /// `rabbitmqctl start_app` and wait until it is fully booted.
    pub async fn start_rabbit(&self) {
        tokio::task::spawn_blocking(ensure_rabbit_up)
            .await
            .expect("start_app task");
    }

    /// `pg_ctlcluster … stop` (fast shutdown: sessions are terminated).
    pub async fn stop_postgres(&self) {
        let (ok, out) = tokio::task::spawn_blocking(|| {
            let version = pg_version();
            run_tool(
                "pg_ctlcluster",
                &["--skip-systemctl-redirect", &version, "main", "stop"],
            )
        })
        .await
        .expect("pg stop task");
        assert!(ok, "pg_ctlcluster stop failed: {out}");
    }

    /// `pg_ctlcluster … start` and wait until it accepts connections.
    pub async fn start_postgres(&self) {
        tokio::task::spawn_blocking(ensure_postgres_up)
            .await
            .expect("pg start task");
    }
}

impl Drop for Services {
    fn drop(&mut self) {
        // Synchronous on purpose: this may run while the test unwinds, and nothing after it may
        // find the services down.
        ensure_rabbit_up();
        ensure_postgres_up();
    }
}

fn rabbit_running() -> bool {
    run_tool(
        "timeout",
        &["30", "rabbitmq-diagnostics", "-q", "check_running"],
    )
    .0
}

/// Starts the broker application (or the whole node) unless it runs, and waits for it.
pub fn ensure_rabbit_up() {
    if rabbit_running() {
        return;
    }
    let node_up = run_tool("timeout", &["30", "rabbitmq-diagnostics", "-q", "ping"]).0;
    let (ok, out) = if node_up {
        run_tool("timeout", &["120", "rabbitmqctl", "-q", "start_app"])
    } else {
        run_tool("rabbitmq-server", &["-detached"])
    };
    if !ok {
        eprintln!("starting RabbitMQ: {out}");
    }
    for _ in 0..12 {
        if run_tool(
            "timeout",
            &[
                "150",
                "rabbitmqctl",
                "-q",
                "await_startup",
                "--timeout",
                "120",
            ],
        )
        .0
        {
            return;
        }
        std::thread::sleep(Duration::from_secs(5));
    }
    eprintln!("RabbitMQ did not come back; run .ci/run to start it");
}

fn pg_ready() -> bool {
    run_tool("pg_isready", &["-q", "-h", "127.0.0.1", "-p", "5432"]).0
}

fn pg_version() -> String {
    let mut versions: Vec<String> = std::fs::read_dir("/etc/postgresql")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    versions.sort_by_key(|v| v.parse::<f64>().unwrap_or(0.0) as u64);
    versions.pop().unwrap_or_else(|| "15".to_owned())
}

/// Starts the cluster unless it accepts connections, and waits for it.
pub fn ensure_postgres_up() {
    if pg_ready() {
        return;
    }
    let version = pg_version();
    let (ok, out) = run_tool(
        "pg_ctlcluster",
        &["--skip-systemctl-redirect", &version, "main", "start"],
    );
    if !ok {
        eprintln!("starting PostgreSQL: {out}");
    }
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(60) {
        if pg_ready() {
            return;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    eprintln!("PostgreSQL did not come back; run .ci/run to start it");
}
