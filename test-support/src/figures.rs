//! What the fault suites report: figure lines kept in a file under `target/tmp`, and progress
//! notes while a run waits.

use std::io::Write as _;

use chrono::Utc;

use crate::process::target_tmp_dir;

/// Prints `TAG line` where `cargo test` shows it even for a passing test (straight to the
/// process's stderr, past the test harness's capture) and appends it, time-stamped, to
/// `target/tmp/<file>`.
pub fn record(tag: &str, file: &str, line: &str) {
    let line = format!("{tag} {line}");
    let _ = writeln!(std::io::stderr(), "{line}");
    let dir = target_tmp_dir();
    let _ = std::fs::create_dir_all(&dir);
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(file))
    {
        let _ = writeln!(f, "{} {line}", Utc::now().format("%Y-%m-%dT%H:%M:%SZ"));
    }
}

/// A figure of the reliability suite: `RELIABILITY …`, kept in
/// `target/tmp/reliability-figures.txt` (RELIABILITY.md quotes them).
pub fn figure(line: &str) {
    record("RELIABILITY", "reliability-figures.txt", line);
}

/// A progress note while a run waits (captured; shown when the test fails).
pub fn note(run: &str, text: &str) {
    eprintln!("[{run} {}] {text}", Utc::now().format("%H:%M:%S%.3f"));
}
