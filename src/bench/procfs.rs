//! CPU, memory and machine state from `/proc`.

use std::time::Instant;

use super::report::CpuWindow;
use super::stats::round2;

/// Linux `USER_HZ`: `/proc` CPU times are in these ticks.
const TICKS_PER_SEC: f64 = 100.0;

#[derive(Debug, Clone, Copy, Default)]
struct HostCpu {
    busy: u64,
    steal: u64,
    total: u64,
}

fn parse_proc_stat(text: &str) -> HostCpu {
    let Some(line) = text.lines().find(|l| l.starts_with("cpu ")) else {
        return HostCpu::default();
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let get = |i: usize| v.get(i).copied().unwrap_or(0);
    // user nice system idle iowait irq softirq steal (guest is already inside user)
    let busy = get(0) + get(1) + get(2) + get(5) + get(6);
    let idle = get(3) + get(4);
    let steal = get(7);
    HostCpu {
        busy,
        steal,
        total: busy + idle + steal,
    }
}

fn host_cpu() -> HostCpu {
    parse_proc_stat(&std::fs::read_to_string("/proc/stat").unwrap_or_default())
}

/// utime + stime of a process, in ticks, with its command name.
fn pid_stat(pid: u32) -> Option<(String, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat[open + 1..close].to_owned();
    let fields: Vec<&str> = stat[close + 2..].split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((comm, utime + stime))
}

pub(super) fn pid_status_kb(pid: u32, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| {
        l.strip_prefix(key)?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()
    })
}

pub(super) fn rss_mb(pid: u32) -> Option<f64> {
    pid_status_kb(pid, "VmRSS:").map(|kb| kb as f64 / 1024.0)
}

#[derive(Debug, Clone, Copy, Default)]
pub(super) struct CpuSnapshot {
    at: Option<Instant>,
    host: HostCpu,
    service: u64,
    driver: u64,
    broker: u64,
    postgres: u64,
    sim: u64,
}

/// The processes a snapshot attributes CPU to.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Watched<'a> {
    pub(super) service: Option<u32>,
    pub(super) sim: Option<u32>,
    /// The RabbitMQ node (not the short-lived `rabbitmqctl` VMs, which are `beam.smp` too).
    pub(super) broker: Option<u32>,
    /// The bench's database: only its backends (and the server's own processes) are ours.
    pub(super) database: &'a str,
}

/// Every process now (none when `/proc` cannot be read).
fn pids() -> impl Iterator<Item = u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
}

/// The command line, arguments separated by spaces ("" once the process is gone).
fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

/// The RabbitMQ node's pid: the `beam.smp` booting `rabbit`, else the busiest `beam.smp`. With
/// two nodes on the machine (the RabbitMQ 4.0 one of `scripts/rabbitmq4` runs in a chroot beside
/// the system's), `VO_BENCH_BROKER_ROOT` names the root directory of the one under test (default
/// `/`).
pub(super) fn broker_pid() -> Option<u32> {
    let wanted = std::path::PathBuf::from(
        std::env::var("VO_BENCH_BROKER_ROOT").unwrap_or_else(|_| "/".to_owned()),
    );
    let mut best: Option<(u32, u64, bool)> = None;
    for pid in pids() {
        let Some((comm, ticks)) = pid_stat(pid) else {
            continue;
        };
        if comm != "beam.smp" {
            continue;
        }
        if std::fs::read_link(format!("/proc/{pid}/root"))
            .ok()
            .as_ref()
            != Some(&wanted)
        {
            continue;
        }
        let node = cmdline(pid).contains("rabbit boot");
        let better = match best {
            None => true,
            Some((_, t, n)) => (node, ticks) > (n, t),
        };
        if better {
            best = Some((pid, ticks, node));
        }
    }
    best.map(|(pid, _, _)| pid)
}

/// Is this `postgres` process ours: a backend of `database`, or the server's own (postmaster,
/// WAL writer, checkpointer…)? Other databases' backends are other engineers' tests.
fn postgres_is_ours(cmdline: &str, database: &str) -> bool {
    if !database.is_empty() && cmdline.contains(database) {
        return true;
    }
    match cmdline.strip_prefix("postgres: ") {
        // "postgres: 15/main: walwriter" is the server's; "postgres: user db host state" a client's.
        Some(rest) => rest.contains(": "),
        None => true,
    }
}

impl CpuSnapshot {
    pub(super) fn take(w: Watched<'_>) -> Self {
        let host = host_cpu();
        let postgres = pids()
            .filter_map(|pid| {
                let (comm, ticks) = pid_stat(pid)?;
                (comm.starts_with("postgres") && postgres_is_ours(&cmdline(pid), w.database))
                    .then_some(ticks)
            })
            .sum();
        let ticks = |pid: Option<u32>| pid.and_then(pid_stat).map_or(0, |(_, t)| t);
        Self {
            at: Some(Instant::now()),
            host,
            service: ticks(w.service),
            driver: ticks(Some(std::process::id())),
            broker: ticks(w.broker),
            postgres,
            sim: ticks(w.sim),
        }
    }

    pub(super) fn since(&self, before: &Self) -> CpuWindow {
        let secs = |a: u64, b: u64| a.saturating_sub(b) as f64 / TICKS_PER_SEC;
        let wall = match (self.at, before.at) {
            (Some(a), Some(b)) => a.duration_since(b).as_secs_f64(),
            _ => 0.0,
        };
        let total = self.host.total.saturating_sub(before.host.total) as f64;
        let busy = self.host.busy.saturating_sub(before.host.busy) as f64;
        let steal = self.host.steal.saturating_sub(before.host.steal) as f64;
        let service = secs(self.service, before.service);
        let driver = secs(self.driver, before.driver);
        let broker = secs(self.broker, before.broker);
        let postgres = secs(self.postgres, before.postgres);
        let sim = secs(self.sim, before.sim);
        let known = service + driver + broker + postgres + sim;
        let pct = |x: f64| {
            if total > 0.0 {
                round2(x / total * 100.0)
            } else {
                0.0
            }
        };
        CpuWindow {
            wall_secs: round2(wall),
            service_cpu_secs: round2(service),
            driver_cpu_secs: round2(driver),
            broker_cpu_secs: round2(broker),
            postgres_cpu_secs: round2(postgres),
            sim_cpu_secs: round2(sim),
            other_cpu_secs: round2((busy / TICKS_PER_SEC - known).max(0.0)),
            host_busy_pct: pct(busy),
            steal_pct: pct(steal),
        }
    }
}

/// Cargo, rustc and test binaries running now: other engineers' work that skews figures.
pub(super) fn concurrent_builds() -> Vec<String> {
    let me = std::process::id();
    let mut out = Vec::new();
    for pid in pids().filter(|pid| *pid != me) {
        let cmd = cmdline(pid);
        let first = cmd.split_whitespace().next().unwrap_or("");
        let exe = first.rsplit('/').next().unwrap_or("");
        if exe == "cargo" || exe == "rustc" || cmd.contains("target/debug/deps") {
            let mut short: String = cmd.chars().take(120).collect();
            short = short.trim().to_owned();
            out.push(format!("{pid} {short}"));
        }
    }
    out
}

pub(super) fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .trim()
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_counts_steal_apart() {
        let h = parse_proc_stat("cpu  100 5 50 1000 10 1 2 7 0 0\ncpu0 1 2 3\n");
        assert_eq!(h.busy, 158);
        assert_eq!(h.steal, 7);
        assert_eq!(h.total, 158 + 1010 + 7);
    }

    #[test]
    fn only_the_bench_database_backends_and_the_server_count_as_postgres() {
        let db = "vo_bench_0123456789ab";
        assert!(postgres_is_ours(
            "postgres: postgres vo_bench_0123456789ab 127.0.0.1(5000) idle",
            db
        ));
        assert!(postgres_is_ours("postgres: 15/main: walwriter ", db));
        assert!(postgres_is_ours(
            "/usr/lib/postgresql/15/bin/postgres -D /var/lib/postgresql/15/main",
            db
        ));
        assert!(!postgres_is_ours(
            "postgres: postgres vo_test_ffff 127.0.0.1(5001) UPDATE",
            db
        ));
    }
}
