//! Fault 5: a broker without the consistent-hash plugin, as on a fresh machine. The README's
//! first command (the demo) turns it on by itself on a local broker and reaches its summary;
//! `topology declare` says in one line what is missing and how to fix it.

use std::process::Stdio;
use std::time::Duration;

use test_support::figures::figure;
use test_support::process::{command, run_tool};

use crate::shared_services::exclusive;

const PLUGIN: &str = "rabbitmq_consistent_hash_exchange";

/// Enables the plugin again when dropped, whatever the test did.
struct PluginBack;

impl Drop for PluginBack {
    fn drop(&mut self) {
        let _ = run_tool(
            "timeout",
            &["120", "rabbitmq-plugins", "-q", "enable", PLUGIN],
        );
    }
}

fn disable_plugin() {
    let (ok, out) = run_tool(
        "timeout",
        &["120", "rabbitmq-plugins", "-q", "disable", PLUGIN],
    );
    assert!(ok, "rabbitmq-plugins disable: {out}");
}

async fn run_binary(args: &[&str], timeout: Duration) -> (bool, String, String) {
    let child = command(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the binary");
    let out = tokio::time::timeout(timeout, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{args:?} did not finish within {timeout:?}"))
        .expect("wait for the binary");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_plugin_topology_declare_says_how_and_the_demo_enables_it_and_finishes() {
    let _exclusive = exclusive("first_run").await;
    let _back = PluginBack;

    disable_plugin();
    let prefix = format!("flt-{}.", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let (ok, _, stderr) = run_binary_with_prefix(&prefix).await;
    assert!(!ok, "topology declare fails without the plugin");
    let error_lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(error_lines.len(), 1, "one error line: {stderr}");
    assert!(
        error_lines[0].contains(&format!("rabbitmq-plugins enable {PLUGIN}")),
        "{stderr}"
    );
    assert_eq!(
        error_lines[0].matches("consistent-hash").count(),
        1,
        "the cause is printed once: {stderr}"
    );

    let (ok, stdout, stderr) =
        run_binary(&["demo", "--tasks", "3"], Duration::from_secs(180)).await;
    assert!(ok, "the demo succeeds:\n{stdout}\n{stderr}");
    assert!(
        stdout.contains(&format!("rabbitmq-plugins enable {PLUGIN}")),
        "the demo says what it did: {stdout}"
    );
    assert!(
        stdout.contains("│ completed"),
        "the demo reaches its summary: {stdout}"
    );
    figure("first_run: demo enabled the plugin and finished 3 tasks");
}

async fn run_binary_with_prefix(prefix: &str) -> (bool, String, String) {
    // `topology declare` on a throwaway prefix (nothing is created: the exchange type is
    // probed before anything is declared).
    std::env::set_var("APP__TOPOLOGY__PREFIX", prefix);
    let result = run_binary(&["topology", "declare"], Duration::from_secs(60)).await;
    std::env::remove_var("APP__TOPOLOGY__PREFIX");
    result
}
