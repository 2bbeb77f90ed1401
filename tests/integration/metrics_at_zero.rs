//! Monitoring from the first scrape: a freshly started instance (the real binary, a child process
//! on a fresh prefix and database, so no other test's metrics are in its recorder) exposes every
//! metric README.md lists, with `# HELP` text, at zero for every known label value; and the
//! dashboards and alert rules in `deploy/` only query metrics README.md lists.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use test_support::app::{env_with, fast_vars, start_sim};
use test_support::process::{logged_field, spawn_logging_to, target_tmp_dir, terminate};
use video_orchestrator::messages::{
    Message, VideoGenerationCancelRequested, VideoGenerationRequested, VideoProviderTaskFinished,
};
use video_orchestrator::progress_tracking::CheckOutcome;
use video_orchestrator::store::{Retained, TaskStatus};

fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// The metrics README.md's "Metrics" bullet lists, with their label names (`name{a,b}`).
pub(crate) fn readme_metrics() -> BTreeMap<String, Vec<String>> {
    let readme = std::fs::read_to_string(repo_file("README.md")).expect("read README.md");
    let bullet = readme
        .split("- **Metrics**:")
        .nth(1)
        .and_then(|rest| rest.split("\n- **").next())
        .expect("README.md has a Metrics bullet");
    bullet
        .split('`')
        .skip(1)
        .step_by(2)
        .filter(|token| token.starts_with("video_") || token.starts_with("process_"))
        .map(|token| match token.split_once('{') {
            Some((name, labels)) => (
                name.to_owned(),
                labels
                    .trim_end_matches('}')
                    .split(',')
                    .map(str::to_owned)
                    .collect(),
            ),
            None => (token.to_owned(), Vec::new()),
        })
        .collect()
}

/// One sample line: series name (with `_bucket`/`_sum`/`_count`), labels, value.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// A `/metrics` page: `# HELP` text and `# TYPE` by family, and every sample.
#[derive(Debug, Default)]
struct Page {
    help: BTreeMap<String, String>,
    kind: BTreeMap<String, String>,
    samples: Vec<Sample>,
}

fn parse(text: &str) -> Page {
    let mut page = Page::default();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            page.help.insert(name.to_owned(), help.to_owned());
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("a TYPE line names a type");
            page.kind.insert(name.to_owned(), kind.to_owned());
        } else if !line.starts_with('#') {
            let (series, value) = line.rsplit_once(' ').expect("a sample has a value");
            let (name, labels) = match series.split_once('{') {
                Some((name, labels)) => {
                    let labels = labels
                        .trim_end_matches('}')
                        .split(',')
                        .filter(|pair| !pair.is_empty())
                        .map(|pair| {
                            let (k, v) = pair.split_once('=').expect("label=value");
                            (k.to_owned(), v.trim_matches('"').to_owned())
                        })
                        .collect();
                    (name, labels)
                }
                None => (series, BTreeMap::new()),
            };
            page.samples.push(Sample {
                name: name.to_owned(),
                labels,
                value: value.parse().expect("a numeric value"),
            });
        }
    }
    page
}

/// `{a="x",b="y"}` label sets, in one canonical order.
fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// What must be on a fresh instance's page: every series of each label value the service can
/// record, as the interface (README.md and the enums that name the values) defines them.
fn expected_series(
    providers: &[String],
    queues: &[String],
    generation_queue: &str,
) -> Vec<(&'static str, BTreeMap<String, String>)> {
    let mut out: Vec<(&'static str, BTreeMap<String, String>)> = Vec::new();
    for outcome in CheckOutcome::LABEL_VALUES {
        out.push((
            "video_progress_checks_total",
            labels(&[("outcome", outcome.as_str())]),
        ));
    }
    for statement in ["load", "advance"] {
        out.push((
            "video_progress_db_batch_size",
            labels(&[("statement", statement)]),
        ));
    }
    for provider in providers {
        let p = provider.as_str();
        for operation in ["submit", "status", "cancel"] {
            out.push((
                "video_provider_request_duration_seconds",
                labels(&[("provider", p), ("operation", operation)]),
            ));
            for kind in ["transient", "permanent"] {
                out.push((
                    "video_provider_errors_total",
                    labels(&[("provider", p), ("operation", operation), ("kind", kind)]),
                ));
            }
        }
        for outcome in [
            "accepted",
            "resumed",
            "ambiguous_failed",
            "ambiguous_resubmitted",
            "ambiguous_resolved",
        ] {
            out.push((
                "video_provider_submissions_total",
                labels(&[("provider", p), ("outcome", outcome)]),
            ));
        }
        out.push(("video_provider_throttled_total", labels(&[("provider", p)])));
        out.push(("video_generation_started_total", labels(&[("provider", p)])));
    }
    for queue in queues {
        out.push(("video_parked_messages_total", labels(&[("queue", queue)])));
        out.push(("video_message_deliveries", labels(&[("queue", queue)])));
    }
    out.push((
        "video_message_retries_total",
        labels(&[("queue", generation_queue)]),
    ));
    for consumer in ["generation", "progress"] {
        out.push((
            "video_poison_messages_total",
            labels(&[("queue", consumer)]),
        ));
    }
    for status in TaskStatus::TERMINAL {
        out.push((
            "video_generation_terminal_total",
            labels(&[("status", status.as_str())]),
        ));
    }
    let requested = VideoGenerationRequested::NAME;
    let cancel = VideoGenerationCancelRequested::NAME;
    let finished = VideoProviderTaskFinished::NAME;
    for (command, reason) in [
        (requested, "publisher_not_allowed"),
        (cancel, "publisher_not_allowed"),
        (finished, "publisher_not_allowed"),
        (requested, "request_id_taken"),
        (requested, "already_cancelled"),
        (requested, "invalid"),
        (cancel, "virtual_key_mismatch"),
        (finished, "virtual_key_mismatch"),
        (finished, "provider_task_mismatch"),
    ] {
        out.push((
            "video_generation_commands_rejected_total",
            labels(&[("command", command), ("reason", reason)]),
        ));
    }
    for kind in ["database", "data"] {
        out.push(("video_generation_errors_total", labels(&[("kind", kind)])));
    }
    for outcome in ["delivered", "failed"] {
        out.push((
            "video_webhook_deliveries_total",
            labels(&[("outcome", outcome)]),
        ));
    }
    for rule in Retained::ALL {
        out.push((
            "video_retention_removed_rows_total",
            labels(&[("kind", rule.as_str())]),
        ));
    }
    out
}

#[tokio::test]
async fn a_fresh_instance_exposes_every_documented_metric_at_zero_with_help() {
    const PARTITIONS: &str = "4";
    let sim = start_sim(1000).await;
    let env = env_with(&sim, &[("APP__TOPOLOGY__PARTITIONS", PARTITIONS)]).await;
    let mut vars = fast_vars(&sim);
    vars.extend(env.child_vars());
    vars.push(("APP__TOPOLOGY__PARTITIONS".into(), PARTITIONS.into()));
    vars.push(("APP__LOG__FORMAT".into(), "json".into()));
    std::fs::create_dir_all(target_tmp_dir()).expect("create target/tmp");
    let log = target_tmp_dir().join(format!(
        "metrics-at-zero-{}.log",
        env.prefix.trim_end_matches('.')
    ));
    let mut child = spawn_logging_to(&["serve"], &vars, &log);
    let pid = child.id().expect("serve pid");
    let http = logged_field(&mut child, &log, "listening", "http").await;
    let text = reqwest::get(format!("http://{http}/metrics"))
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("the /metrics body");
    let exit = terminate(&mut child, pid, Duration::from_secs(30)).await;
    assert!(
        exit.is_some_and(|s| s.success()),
        "serve did not stop cleanly on SIGTERM ({exit:?})"
    );
    let page = parse(&text);

    // Every documented metric has HELP text, its type, a sample, and exactly its labels.
    let documented = readme_metrics();
    assert!(documented.len() > 30, "README lists {}", documented.len());
    for (name, label_names) in &documented {
        let help = page.help.get(name);
        assert!(
            help.is_some_and(|h| !h.trim().is_empty()),
            "{name}: no # HELP text on a fresh instance"
        );
        let kind = page
            .kind
            .get(name)
            .unwrap_or_else(|| panic!("{name}: no # TYPE"));
        let own: Vec<&Sample> = page
            .samples
            .iter()
            .filter(|s| {
                s.name == *name
                    || (kind == "histogram"
                        && ["_bucket", "_sum", "_count"]
                            .iter()
                            .any(|suffix| s.name == format!("{name}{suffix}")))
            })
            .collect();
        assert!(!own.is_empty(), "{name}: no sample on a fresh instance");
        let mut expected: Vec<&str> = label_names.iter().map(String::as_str).collect();
        if kind == "histogram" {
            // `le` on the buckets only.
            for s in own.iter().filter(|s| s.name.ends_with("_bucket")) {
                assert!(s.labels.contains_key("le"), "{name}: a bucket without le");
            }
        }
        expected.sort_unstable();
        for s in own.iter().filter(|s| !s.name.ends_with("_bucket")) {
            let keys: Vec<&str> = s.labels.keys().map(String::as_str).collect();
            assert_eq!(keys, expected, "{name}: labels of {s:?}");
        }
        // Nothing has happened yet: every counter and every histogram is at zero.
        if kind == "counter" && name.starts_with("video_") {
            for s in &own {
                assert_eq!(
                    s.value, 0.0,
                    "{name} is not zero on a fresh instance: {s:?}"
                );
            }
        }
        if kind == "histogram" {
            for s in &own {
                assert_eq!(
                    s.value, 0.0,
                    "{name} has observations on a fresh instance: {s:?}"
                );
            }
        }
    }
    // Nothing undocumented.
    for name in page.help.keys() {
        assert!(
            documented.contains_key(name),
            "/metrics has {name}, which README.md's Metrics bullet does not list"
        );
    }

    // Every known label value has its series.
    let topology = env.topology();
    let queues: Vec<String> = std::iter::once(topology.generation_queue())
        .chain((0..topology.partitions()).map(|p| topology.partition_queue(p)))
        .collect();
    assert_eq!(queues.len(), 5, "video.generation and 4 partitions");
    let providers: Vec<String> = env.settings.providers.keys().cloned().collect();
    assert!(
        providers.len() >= 2,
        "the fast settings configure sim and rep: {providers:?}"
    );
    let series = expected_series(&providers, &queues, &topology.generation_queue());
    let present: BTreeSet<(String, BTreeMap<String, String>)> = page
        .samples
        .iter()
        .map(|s| {
            let name = s
                .name
                .strip_suffix("_count")
                .filter(|base| page.kind.get(*base).is_some_and(|k| k == "histogram"))
                .unwrap_or(&s.name);
            (name.to_owned(), s.labels.clone())
        })
        .collect();
    let missing: Vec<String> = series
        .iter()
        .filter(|(name, labels)| !present.contains(&((*name).to_owned(), labels.clone())))
        .map(|(name, labels)| format!("{name}{labels:?}"))
        .collect();
    assert!(
        missing.is_empty(),
        "series missing on a fresh instance:\n{}",
        missing.join("\n")
    );

    // The gauge the "partition without an owner" alert compares with.
    let partitions = page
        .samples
        .iter()
        .find(|s| s.name == "video_progress_partitions")
        .expect("video_progress_partitions");
    assert_eq!(partitions.value, 4.0);

    env.cleanup().await;
    sim.shutdown().await;
}

/// Every `video_…` metric name an expression mentions (histogram suffixes stripped).
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("video_") {
        let boundary = rest[..at]
            .chars()
            .last()
            .is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '_'));
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        if boundary {
            let name = &tail[..end];
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .unwrap_or(name);
            names.push(base.to_owned());
        }
        rest = &tail[end..];
    }
    names
}

fn panels(value: &serde_json::Value, out: &mut Vec<serde_json::Value>) {
    if let Some(list) = value["panels"].as_array() {
        for panel in list {
            out.push(panel.clone());
            panels(panel, out);
        }
    }
}

#[test]
fn the_dashboard_and_the_alert_rules_query_only_documented_metrics() {
    let documented = readme_metrics();
    let known = |name: &str| {
        documented.contains_key(name) || documented.contains_key(name.trim_end_matches("_bucket"))
    };

    let path = repo_file("deploy/grafana/dashboards/video-orchestrator.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("read the dashboard"))
            .expect("the dashboard is JSON");
    assert_eq!(dashboard["uid"], "video-orchestrator");
    let mut all = Vec::new();
    panels(&dashboard, &mut all);
    let mut queried = BTreeSet::new();
    let mut graphs = 0;
    for panel in &all {
        if panel["type"] == "row" {
            continue;
        }
        graphs += 1;
        let title = panel["title"].as_str().unwrap_or("?").to_owned();
        let targets = panel["targets"]
            .as_array()
            .unwrap_or_else(|| panic!("panel `{title}` has no targets"));
        assert!(!targets.is_empty(), "panel `{title}` has no targets");
        for target in targets {
            let expr = target["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("a target of `{title}` has no expr"));
            let names = metric_names(expr);
            assert!(
                !names.is_empty(),
                "`{title}`: `{expr}` queries no metric of ours"
            );
            for name in names {
                assert!(
                    known(&name),
                    "`{title}` queries {name}, which README.md's Metrics bullet does not list"
                );
                queried.insert(name);
            }
        }
    }
    assert!(graphs >= 9, "only {graphs} panels");
    // The signals the dashboard is for.
    for name in [
        "video_progress_checks_total",
        "video_progress_tracking_duration_seconds",
        "video_progress_orphaned_checks_total",
        "video_progress_scheduling_lag_seconds",
        "video_parked_messages_total",
        "video_progress_rearmed_total",
        "video_provider_errors_total",
        "video_outbox_oldest_age_seconds",
        "video_broker_reconnects_total",
    ] {
        assert!(queried.contains(name), "no panel shows {name}");
    }

    // The rules and their unit tests (whose input series must be real metrics, or the tests
    // prove nothing): every `video_…` name anywhere in them.
    for file in [
        "deploy/prometheus/alerts.yml",
        "deploy/prometheus/alerts_test.yml",
    ] {
        let text = std::fs::read_to_string(repo_file(file)).expect("read the alert rules");
        let mentioned: BTreeSet<String> = metric_names(&text).into_iter().collect();
        assert!(mentioned.len() >= 6, "{file} mentions only {mentioned:?}");
        for name in &mentioned {
            assert!(
                known(name),
                "{file} queries {name}, which README.md's Metrics bullet does not list"
            );
        }
    }
}
