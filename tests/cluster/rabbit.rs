//! A three-node RabbitMQ cluster of the test's own, beside the machine's broker and never
//! touching it: nodes `vo1@localhost`, `vo2@localhost`, `vo3@localhost` on free ports below the
//! ephemeral range (AMQP and Erlang distribution bound to 127.0.0.1, no management or
//! Prometheus listener: the only plugin enabled is the consistent-hash exchange), each with its
//! own configuration, data and log folders under one temp dir, joined with
//! `rabbitmqctl join_cluster`.
//!
//! Isolation from the machine's node `rabbit@localhost`:
//! - its own Erlang cookie (`HOME` points at the temp dir, which holds `.erlang.cookie`), so
//!   neither these nodes nor the CLI calls made here can even authenticate to the machine's
//!   node; its own `rabbitmq-env.conf`, `rabbitmq.conf` and `enabled_plugins`, so nothing under
//!   `/etc/rabbitmq` applies; every CLI call names its node with `-n voN@localhost`;
//! - the scripts under `/usr/lib/rabbitmq/bin` run as the current user (the Debian wrappers in
//!   `/usr/sbin` would switch to the `rabbitmq` user and its home and cookie);
//! - the only processes ever signalled are the `beam.smp` processes whose command line carries
//!   `-home <this temp dir>`, found by their pid files (and, as a last resort at clean-up, by that
//!   exact marker).
//!
//! [`RabbitCluster`] stops the nodes, kills what is left of them and removes the temp dir when
//! dropped, also when the test panics. `epmd` (shared with the machine's node) is left alone.
//!
//! `VO_RABBITMQ_SBIN` overrides where `rabbitmq-server` and `rabbitmqctl` are found (default
//! `/usr/lib/rabbitmq/bin` when it exists, else `PATH`).

use std::collections::HashSet;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rand::Rng;

/// The node names, fixed so operators recognise them.
pub const NODE_NAMES: [&str; 3] = ["vo1@localhost", "vo2@localhost", "vo3@localhost"];

/// One node of the cluster.
#[derive(Debug)]
pub struct Node {
    /// `voN@localhost`.
    pub name: String,
    /// AMQP listener on 127.0.0.1.
    pub amqp_port: u16,
    /// Erlang distribution listener on 127.0.0.1.
    pub dist_port: u16,
    dir: PathBuf,
    /// `kill -9`ed by the test.
    pub killed: bool,
}

impl Node {
    /// `amqp://guest:guest@127.0.0.1:PORT/%2f`.
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.amqp_port)
    }

    fn pid_file(&self) -> PathBuf {
        self.dir.join("pid")
    }
}

/// A quorum queue as `rabbitmqctl list_queues` sees it.
#[derive(Debug, Clone)]
pub struct QueueInfo {
    /// Queue name.
    pub name: String,
    /// Node of the current leader (empty while there is none).
    pub leader: String,
    /// Nodes holding a replica.
    pub members: Vec<String>,
    /// Replicas that are up.
    pub online: Vec<String>,
    /// Messages, ready or not (a delay tier's dead-letter backlog included).
    pub messages: u64,
}

/// The running cluster; stopped and removed on drop.
#[derive(Debug)]
pub struct RabbitCluster {
    /// Its temp dir (cookie, configuration, data, logs).
    pub dir: PathBuf,
    sbin: PathBuf,
    /// The three nodes, `vo1` first.
    pub nodes: Vec<Node>,
}

impl RabbitCluster {
    /// Starts three nodes, joins `vo2` and `vo3` to `vo1` and waits until all three run.
    /// Blocking (it runs CLI tools): call it from `spawn_blocking`.
    ///
    /// # Panics
    /// When RabbitMQ is not installed, a node name is already registered with epmd (a
    /// previous run still running: its pids are in the message), or the cluster does not form
    /// within a few minutes. Whatever was started is cleaned up first.
    pub fn start() -> RabbitCluster {
        let sbin = sbin_dir();
        refuse_taken_names();
        let dir = std::env::temp_dir().join(format!(
            "vo-cluster-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        ));
        std::fs::create_dir_all(&dir).expect("create the cluster's temp dir");
        let mut cluster = RabbitCluster {
            dir,
            sbin,
            nodes: Vec::new(),
        };
        write_private(&cluster.dir.join(".erlang.cookie"), &cookie());
        let mut taken = HashSet::new();
        for name in NODE_NAMES {
            let short = name.split('@').next().unwrap_or(name);
            let dir = cluster.dir.join(short);
            for sub in ["mnesia", "log"] {
                std::fs::create_dir_all(dir.join(sub)).expect("node dirs");
            }
            cluster.nodes.push(Node {
                name: name.to_owned(),
                amqp_port: free_port(&mut taken),
                dist_port: free_port(&mut taken),
                dir,
                killed: false,
            });
        }
        let t = Instant::now();
        for i in 0..cluster.nodes.len() {
            cluster.start_node(i);
        }
        for node in &cluster.nodes {
            cluster.await_startup(&node.name, Duration::from_secs(180));
        }
        let first = cluster.nodes[0].name.clone();
        for node in &cluster.nodes[1..] {
            let long = Duration::from_secs(120);
            for args in [
                vec!["stop_app"],
                vec!["join_cluster", first.as_str()],
                vec!["start_app"],
            ] {
                cluster
                    .ctl(&node.name, &args, long)
                    .unwrap_or_else(|e| panic!("{}: rabbitmqctl {args:?}: {e}", node.name));
            }
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let running = cluster.running_nodes(&first);
            if NODE_NAMES.iter().all(|n| running.iter().any(|r| r == n)) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the cluster did not form: running {running:?} (logs under {})",
                cluster.dir.display()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
        eprintln!(
            "[cluster] {} formed in {:.1} s in {} (AMQP ports {:?})",
            NODE_NAMES.join(", "),
            t.elapsed().as_secs_f64(),
            cluster.dir.display(),
            cluster
                .nodes
                .iter()
                .map(|n| n.amqp_port)
                .collect::<Vec<_>>()
        );
        cluster
    }

    fn start_node(&self, i: usize) {
        let node = &self.nodes[i];
        let conf = format!(
            "# Written by tests/cluster/rabbit.rs for this test's own node.\n\
             listeners.tcp.1 = 127.0.0.1:{}\n\
             log.console = false\n\
             log.file.level = info\n",
            node.amqp_port
        );
        std::fs::write(node.dir.join("rabbitmq.conf"), conf).expect("rabbitmq.conf");
        std::fs::write(node.dir.join("rabbitmq-env.conf"), "").expect("rabbitmq-env.conf");
        // A quorum queue's at-least-once dead-letter worker re-sends what its targets have not
        // confirmed after this long (120 s by default); 5 s lets a delay tier that was held
        // while a node was down move again soon after the node is back (RELIABILITY.md).
        std::fs::write(
            node.dir.join("advanced.config"),
            "[{rabbit, [{dead_letter_worker_publisher_confirm_timeout, 5000}]}].\n",
        )
        .expect("advanced.config");
        std::fs::write(
            node.dir.join("enabled_plugins"),
            "[rabbitmq_consistent_hash_exchange].\n",
        )
        .expect("enabled_plugins");
        let out = self
            .command("rabbitmq-server")
            .arg("-detached")
            .env("RABBITMQ_CONF_ENV_FILE", node.dir.join("rabbitmq-env.conf"))
            .env("RABBITMQ_NODENAME", &node.name)
            .env("RABBITMQ_DIST_PORT", node.dist_port.to_string())
            .env("RABBITMQ_CONFIG_FILE", node.dir.join("rabbitmq.conf"))
            .env(
                "RABBITMQ_ADVANCED_CONFIG_FILE",
                node.dir.join("advanced.config"),
            )
            .env(
                "RABBITMQ_ENABLED_PLUGINS_FILE",
                node.dir.join("enabled_plugins"),
            )
            .env("RABBITMQ_MNESIA_BASE", node.dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", node.dir.join("log"))
            .env("RABBITMQ_PID_FILE", node.pid_file())
            .env(
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS",
                "-kernel inet_dist_use_interface {127,0,0,1}",
            )
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run rabbitmq-server (is RabbitMQ installed?): {e}"));
        assert!(
            out.status.success(),
            "{}: rabbitmq-server -detached failed: {}{}",
            node.name,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A command from the RabbitMQ scripts directory with this cluster's environment: its cookie
    /// (through `HOME`) and an empty `rabbitmq-env.conf`.
    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(self.sbin.join(program));
        command
            .current_dir(&self.dir)
            .env("HOME", &self.dir)
            .env("RABBITMQ_CONF_ENV_FILE", self.dir.join("cli-env.conf"))
            .env_remove("RABBITMQ_NODENAME")
            .env_remove("RABBITMQ_NODE_PORT")
            .env_remove("RABBITMQ_CONFIG_FILE")
            .env_remove("RABBITMQ_ERLANG_COOKIE");
        command
    }

    /// `rabbitmqctl -q -n NODE ARGS…`, killed after `timeout`. Returns stdout, or stdout and
    /// stderr as the error.
    ///
    /// # Errors
    /// When the tool fails or times out.
    pub fn ctl(&self, node: &str, args: &[&str], timeout: Duration) -> Result<String, String> {
        let mut child = self
            .command("rabbitmqctl")
            .arg("-q")
            .arg("-n")
            .arg(node)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run rabbitmqctl: {e}"))?;
        let deadline = Instant::now() + timeout;
        loop {
            match child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!("timed out after {timeout:?}"));
                }
            }
        }
        let out = child
            .wait_with_output()
            .map_err(|e| format!("rabbitmqctl output: {e}"))?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            Ok(stdout)
        } else {
            Err(format!(
                "{}: {stdout}{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    fn await_startup(&self, node: &str, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            // Refused until the node has registered with epmd: retry.
            match self.ctl(
                node,
                &["await_startup", "--timeout", "60"],
                Duration::from_secs(90),
            ) {
                Ok(_) => return,
                Err(e) => assert!(
                    Instant::now() < deadline,
                    "{node} did not start within {within:?}: {e} (logs under {})",
                    self.dir.display()
                ),
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    }

    /// The nodes `via` sees running (empty when it does not answer).
    pub fn running_nodes(&self, via: &str) -> Vec<String> {
        let Ok(out) = self.ctl(
            via,
            &["cluster_status", "--formatter", "json"],
            Duration::from_secs(30),
        ) else {
            return Vec::new();
        };
        let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
        strings(&v["running_nodes"])
    }

    /// The first node not killed.
    pub fn live_node(&self) -> &Node {
        self.nodes.iter().find(|n| !n.killed).expect("a live node")
    }

    /// Every quorum queue whose name starts with `prefix`, as a live node sees it.
    ///
    /// # Errors
    /// When the CLI call fails (e.g. while the cluster is busy electing leaders).
    pub fn queues(&self, prefix: &str) -> Result<Vec<QueueInfo>, String> {
        let out = self.ctl(
            &self.live_node().name,
            &[
                "list_queues",
                "name",
                "type",
                "leader",
                "members",
                "online",
                "messages",
                "--formatter",
                "json",
            ],
            Duration::from_secs(60),
        )?;
        let v: serde_json::Value =
            serde_json::from_str(&out).map_err(|e| format!("list_queues JSON: {e}: {out}"))?;
        Ok(v.as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter(|q| q["type"] == "quorum")
            .filter(|q| q["name"].as_str().is_some_and(|n| n.starts_with(prefix)))
            .map(|q| QueueInfo {
                name: q["name"].as_str().unwrap_or_default().to_owned(),
                leader: q["leader"].as_str().unwrap_or_default().to_owned(),
                members: strings(&q["members"]),
                online: strings(&q["online"]),
                messages: q["messages"].as_u64().unwrap_or(0),
            })
            .collect())
    }

    /// The node list for `rabbitmq.urls` (`APP__RABBITMQ__URLS`), `vo1` first.
    pub fn node_list(&self) -> String {
        self.nodes
            .iter()
            .map(Node::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The nodes' AMQP addresses, `vo1` first.
    pub fn amqp_addrs(&self) -> Vec<SocketAddr> {
        self.nodes
            .iter()
            .map(|n| SocketAddr::from(([127, 0, 0, 1], n.amqp_port)))
            .collect()
    }

    /// `kill -9` of node `i`'s `beam.smp`; returns once the process is gone.
    ///
    /// # Panics
    /// When its pid is unknown or the process does not die.
    pub fn kill9(&mut self, i: usize) {
        let pid = self
            .pid_of(i)
            .unwrap_or_else(|| panic!("{}: no live pid", self.nodes[i].name));
        let status = Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -9 {pid} failed");
        let deadline = Instant::now() + Duration::from_secs(30);
        while process_alive(pid) {
            assert!(Instant::now() < deadline, "pid {pid} did not die");
            std::thread::sleep(Duration::from_millis(20));
        }
        self.nodes[i].killed = true;
    }

    /// Starts node `i` again after a kill; it rejoins the cluster from its own data (quorum
    /// queue replicas on it catch up). Returns once the cluster sees it running.
    ///
    /// # Panics
    /// When it does not start or rejoin within a few minutes.
    pub fn restart(&mut self, i: usize) {
        self.start_node(i);
        let name = self.nodes[i].name.clone();
        self.await_startup(&name, Duration::from_secs(180));
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.running_nodes(&name).contains(&name) {
            assert!(Instant::now() < deadline, "{name} did not rejoin");
            std::thread::sleep(Duration::from_millis(500));
        }
        self.nodes[i].killed = false;
    }

    /// The pid of node `i`'s `beam.smp`, when it runs and is ours.
    fn pid_of(&self, i: usize) -> Option<u32> {
        let text = std::fs::read_to_string(self.nodes[i].pid_file()).ok()?;
        let pid: u32 = text.trim().parse().ok()?;
        self.is_ours(pid).then_some(pid)
    }

    /// True when `pid` is a live `beam.smp` started for this cluster (its command line carries
    /// `-home <dir>`).
    fn is_ours(&self, pid: u32) -> bool {
        let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            return false;
        };
        let args: Vec<String> = raw
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let home = self.dir.to_string_lossy();
        args.first().is_some_and(|a| a.ends_with("beam.smp"))
            && args.windows(2).any(|w| w[0] == "-home" && w[1] == home)
    }

    /// Every live process of this cluster (pid files, then a scan of `/proc` for the marker).
    fn our_pids(&self) -> Vec<u32> {
        let mut pids: Vec<u32> = (0..self.nodes.len())
            .filter_map(|i| self.pid_of(i))
            .collect();
        if let Ok(entries) = std::fs::read_dir("/proc") {
            for entry in entries.flatten() {
                if let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() {
                    if !pids.contains(&pid) && self.is_ours(pid) {
                        pids.push(pid);
                    }
                }
            }
        }
        pids
    }

    fn stop(&mut self) {
        for node in self.nodes.iter().filter(|n| !n.killed) {
            if let Err(e) = self.ctl(&node.name, &["stop"], Duration::from_secs(60)) {
                eprintln!("[cluster] {}: rabbitmqctl stop: {e}", node.name);
            }
        }
        // `rabbitmqctl stop` answers once the node has stopped; the OS process exits just after.
        let deadline = Instant::now() + Duration::from_secs(15);
        while !self.our_pids().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        for pid in self.our_pids() {
            eprintln!("[cluster] pid {pid} still running 15 s after stop: kill -9");
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.our_pids().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        if std::thread::panicking() {
            self.keep_logs();
        }
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            eprintln!("[cluster] remove {}: {e}", self.dir.display());
        }
    }
}

impl RabbitCluster {
    /// Copies the nodes' logs to `target/tmp/cluster/<temp dir name>/` (a failed run).
    fn keep_logs(&self) {
        let name = self.dir.file_name().unwrap_or_default();
        let kept = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join("cluster")
            .join(name);
        for node in &self.nodes {
            let short = node.name.split('@').next().unwrap_or(&node.name);
            let to = kept.join(short);
            let _ = std::fs::create_dir_all(&to);
            if let Ok(entries) = std::fs::read_dir(node.dir.join("log")) {
                for entry in entries.flatten() {
                    let _ = std::fs::copy(entry.path(), to.join(entry.file_name()));
                }
            }
        }
        eprintln!("[cluster] node logs kept in {}", kept.display());
    }
}

impl Drop for RabbitCluster {
    fn drop(&mut self) {
        self.stop();
    }
}

fn sbin_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("VO_RABBITMQ_SBIN") {
        return PathBuf::from(dir);
    }
    let debian = Path::new("/usr/lib/rabbitmq/bin");
    if debian.join("rabbitmq-server").exists() {
        return debian.to_owned();
    }
    // An empty path: `Command` then searches PATH for the bare program name.
    PathBuf::new()
}

/// Refuses to start when a node name is taken (a previous run that is still running).
fn refuse_taken_names() {
    let Ok(out) = Command::new("epmd").arg("-names").output() else {
        return;
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let taken: Vec<&str> = NODE_NAMES
        .iter()
        .map(|n| n.split('@').next().unwrap_or(n))
        .filter(|short| {
            text.lines()
                .any(|l| l.starts_with(&format!("name {short} at port")))
        })
        .collect();
    assert!(
        taken.is_empty(),
        "node names {taken:?} are already registered with epmd: another cluster test is running, \
         or a killed one left its nodes behind (find them with \
         `pgrep -af 'beam.smp.*vo-cluster-'` and stop them by pid)"
    );
}

fn cookie() -> String {
    let mut rng = rand::rng();
    (0..32)
        .map(|_| char::from(b'A' + rng.random_range(0..26u8)))
        .collect()
}

/// Writes a file only its owner may read (Erlang refuses a cookie others can read).
fn write_private(path: &Path, text: &str) {
    std::fs::write(path, text).expect("write the cookie");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o400))
            .expect("chmod the cookie");
    }
}

/// A free port on 127.0.0.1 below the ephemeral range (32768+), so no client socket of another
/// test can be holding it when the node binds it.
fn free_port(taken: &mut HashSet<u16>) -> u16 {
    let mut rng = rand::rng();
    for _ in 0..1000 {
        let port = rng.random_range(20_000..32_000);
        if port == 25_672 || taken.contains(&port) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            taken.insert(port);
            return port;
        }
    }
    panic!("no free port between 20000 and 32000");
}

fn process_alive(pid: u32) -> bool {
    // A zombie is dead for our purposes (its parent, init for a detached node, reaps it).
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

fn strings(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}
