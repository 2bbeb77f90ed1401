use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use super::*;

fn topology() -> Topology {
    Topology::new("", 4, vec![1000])
}

fn providers() -> Vec<String> {
    vec!["sim".to_owned(), "rep".to_owned()]
}

/// One `counter!(` / `gauge!(` / `histogram!(` call with a literal name.
#[derive(Debug)]
struct Recorded {
    at: String,
    name: String,
    kind: Kind,
    /// Label names, with the value when it is a literal.
    labels: Vec<(String, Option<String>)>,
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src/") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The string literal at the start of `text` (after whitespace), and what follows it.
fn literal(text: &str) -> Option<(&str, &str)> {
    let rest = text.trim_start().strip_prefix('"')?;
    let end = rest.find('"')?;
    Some((&rest[..end], &rest[end + 1..]))
}

/// The text of a macro's arguments: from after `(` to its matching `)`.
fn arguments(text: &str) -> &str {
    let mut depth = 1;
    let mut in_string = false;
    for (i, c) in text.char_indices() {
        match c {
            '"' => in_string = !in_string,
            '(' if !in_string => depth += 1,
            ')' if !in_string => {
                depth -= 1;
                if depth == 0 {
                    return &text[..i];
                }
            }
            _ => {}
        }
    }
    text
}

/// Every metric recorded in `src/` outside this module, read from the sources.
fn recorded_in_sources() -> Vec<Recorded> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut found = Vec::new();
    for file in files {
        if file.starts_with(src.join("metrics")) || file == src.join("metrics.rs") {
            continue;
        }
        let text = std::fs::read_to_string(&file).expect("read a source file");
        for (macro_name, kind) in [
            ("counter!(", Kind::Counter),
            ("gauge!(", Kind::Gauge),
            ("histogram!(", Kind::Histogram),
        ] {
            for (at, _) in text.match_indices(macro_name) {
                if text[..at].ends_with("describe_") {
                    continue;
                }
                let args = arguments(&text[at + macro_name.len()..]);
                let Some((name, rest)) = literal(args) else {
                    continue;
                };
                let mut labels = Vec::new();
                let mut pairs = rest.split("=>");
                let mut before = pairs.next().unwrap_or_default();
                for after in pairs {
                    let key = before
                        .trim_end()
                        .strip_suffix('"')
                        .and_then(|k| k.rsplit_once('"'))
                        .map(|(_, k)| k.to_owned())
                        .unwrap_or_else(|| panic!("a label name before => in {args}"));
                    let value = literal(after).map(|(v, _)| v.to_owned());
                    labels.push((key, value));
                    before = after;
                }
                let line = text[..at].lines().count();
                found.push(Recorded {
                    at: format!("{}:{line}", file.display()),
                    name: name.to_owned(),
                    kind,
                    labels,
                });
            }
        }
    }
    found
}

#[test]
fn every_metric_the_code_records_is_described_with_its_labels_and_literal_values() {
    let recorded = recorded_in_sources();
    assert!(
        recorded.len() > 30,
        "the source scan found only {} metric calls",
        recorded.len()
    );
    let series = zero_series(&topology(), &providers());
    for r in &recorded {
        let m = metric(&r.name).unwrap_or_else(|| {
            panic!(
                "{}: {} is recorded but not in metrics::METRICS",
                r.at, r.name
            )
        });
        assert_eq!(
            m.kind, r.kind,
            "{}: {} recorded as {:?}",
            r.at, r.name, r.kind
        );
        let names: Vec<&str> = r.labels.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(names, m.labels, "{}: labels of {}", r.at, r.name);
        for (key, value) in &r.labels {
            let Some(value) = value else { continue };
            assert!(
                series
                    .iter()
                    .any(|s| s.name == m.name
                        && s.labels.iter().any(|(k, v)| k == key && v == value)),
                "{}: {}{{{key}=\"{value}\"}} is recorded but not registered at zero",
                r.at,
                r.name
            );
        }
    }
    // And nothing described is dead.
    for m in METRICS {
        assert!(
            recorded.iter().any(|r| r.name == m.name) || m.name == "video_progress_partitions",
            "{} is in METRICS but nothing records it",
            m.name
        );
    }
}

#[test]
fn every_metric_has_series_at_zero_with_exactly_its_labels() {
    let topology = topology();
    let series = zero_series(&topology, &providers());
    for m in METRICS {
        let own: Vec<&Series> = series.iter().filter(|s| s.name == m.name).collect();
        assert!(!own.is_empty(), "{} has no series at zero", m.name);
        for s in &own {
            let keys: Vec<&str> = s.labels.iter().map(|(k, _)| *k).collect();
            assert_eq!(keys, m.labels, "labels of a series of {}", m.name);
        }
    }
    let distinct: BTreeSet<String> = series.iter().map(|s| format!("{s:?}")).collect();
    assert_eq!(distinct.len(), series.len(), "a series is registered twice");

    // Spot checks of the values the lists come from.
    let values = |name: &str, key: &str| -> BTreeSet<String> {
        series
            .iter()
            .filter(|s| s.name == name)
            .flat_map(|s| {
                s.labels
                    .iter()
                    .filter(|(k, _)| *k == key)
                    .map(|(_, v)| v.clone())
            })
            .collect()
    };
    assert_eq!(values("video_progress_checks_total", "outcome").len(), 8);
    assert_eq!(
        values("video_generation_terminal_total", "status"),
        strings(["completed", "failed", "cancelled", "timed_out"])
            .into_iter()
            .collect()
    );
    let queues = values("video_parked_messages_total", "queue");
    assert!(queues.contains("video.generation") && queues.contains("video.progress.p3"));
    assert_eq!(queues.len(), 5, "the generation queue and 4 partitions");
    assert_eq!(
        values("video_provider_throttled_total", "provider").len(),
        2
    );
    let rejected = series
        .iter()
        .filter(|s| s.name == "video_generation_commands_rejected_total")
        .count();
    assert_eq!(rejected, 9, "(command, reason) pairs");
    assert!(
        !series
            .iter()
            .any(|s| s.name == "video_provider_errors_total"
                && s.labels.contains(&("kind", "throttled".to_owned()))),
        "a throttled status call is not a provider error"
    );
}

/// `name{a,b}` tokens of README.md's "Metrics" bullet.
fn readme_metrics() -> BTreeMap<String, Vec<String>> {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("read README.md");
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

#[test]
fn readme_lists_every_metric_with_its_labels() {
    let documented = readme_metrics();
    for m in METRICS {
        let labels = documented
            .get(m.name)
            .unwrap_or_else(|| panic!("README.md's Metrics bullet does not list {}", m.name));
        assert_eq!(labels, m.labels, "README.md's labels of {}", m.name);
    }
    for name in documented.keys() {
        assert!(
            metric(name).is_some() || name.starts_with("process_"),
            "README.md lists {name}, which the service does not record"
        );
    }
}

#[test]
fn registered_metrics_render_with_help_and_zero_values() {
    let handle = handle();
    // A prefix of its own: no other test of this process records on these queues.
    let prefix = format!("zero-{}.", uuid::Uuid::new_v4().simple());
    let topology = Topology::new(prefix.clone(), 2, vec![1000]);
    register_zero(&topology, &["zero-provider".to_owned()]);
    let text = handle.render();
    for m in METRICS {
        let kind = match m.kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        };
        assert!(
            text.contains(&format!("# HELP {} {}\n", m.name, m.help)),
            "no HELP for {}",
            m.name
        );
        assert!(
            text.contains(&format!("# TYPE {} {kind}\n", m.name)),
            "no TYPE {kind} for {}",
            m.name
        );
    }
    for line in [
        format!("video_message_deliveries_count{{queue=\"{prefix}video.progress.p1\"}} 0"),
        format!("video_message_deliveries_bucket{{queue=\"{prefix}video.generation\",le=\"+Inf\"}} 0"),
        format!("video_parked_messages_total{{queue=\"{prefix}video.generation\"}} 0"),
        "video_provider_errors_total{provider=\"zero-provider\",operation=\"cancel\",kind=\"permanent\"} 0".to_owned(),
        "video_provider_request_duration_seconds_count{provider=\"zero-provider\",operation=\"submit\"} 0".to_owned(),
    ] {
        assert!(text.lines().any(|l| l == line), "missing `{line}`");
    }
}
