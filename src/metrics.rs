//! Every metric the service records, in one table: the Prometheus recorder, each metric's
//! `# HELP` text, and the series that exist from the first scrape.
//!
//! A series Prometheus has never seen is not zero but missing: a dashboard shows "no data", a
//! `rate()` over it is empty, and `increase(video_progress_orphaned_checks_total[15m]) > 0` cannot
//! fire for the first orphan (the series would appear at 1 with no earlier sample, so no increase).
//! So [`handle`] installs the recorder with a description of every metric in [`METRICS`], and
//! [`register_zero`] (at start, [`crate::app::Application::build`]) creates every counter and
//! histogram, and the gauges, at zero for each label value the code can record: outcomes,
//! statuses, reasons and retention kinds from the enums that name them, queues from the topology,
//! providers from the configuration, and the few values call sites write as literals from the
//! lists below (a test reads the sources and fails on a literal missing here).
//!
//! A histogram that was registered but never observed renders with zero counts in every bucket
//! (`metrics-exporter-prometheus` creates its distribution when it drains the registry), so
//! registering it is enough.

use std::sync::OnceLock;

use ::metrics::{KeyName, Label, Recorder, SharedString};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::generation::{RejectReason, Submission};
use crate::progress_tracking::CheckOutcome;
use crate::store::{Retained, TaskStatus};
use crate::topology::Topology;

/// What Prometheus calls the metric's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up (`_total`).
    Counter,
    /// Set to the current value.
    Gauge,
    /// Observations in buckets (`_bucket`, `_sum`, `_count`).
    Histogram,
}

/// One metric the service records.
#[derive(Debug, Clone, Copy)]
pub struct Metric {
    /// The Prometheus name (an external interface: dashboards, alerts, README.md).
    pub name: &'static str,
    /// Its type.
    pub kind: Kind,
    /// Its label names, in README.md's order.
    pub labels: &'static [&'static str],
    /// The `# HELP` text.
    pub help: &'static str,
}

const fn counter(
    name: &'static str,
    labels: &'static [&'static str],
    help: &'static str,
) -> Metric {
    Metric {
        name,
        kind: Kind::Counter,
        labels,
        help,
    }
}

const fn gauge(name: &'static str, help: &'static str) -> Metric {
    Metric {
        name,
        kind: Kind::Gauge,
        labels: &[],
        help,
    }
}

const fn histogram(
    name: &'static str,
    labels: &'static [&'static str],
    help: &'static str,
) -> Metric {
    Metric {
        name,
        kind: Kind::Histogram,
        labels,
        help,
    }
}

/// Every metric the service records (the `process_*` ones are read from `/proc` at each scrape
/// by [`crate::http`], not recorded).
pub const METRICS: &[Metric] = &[
    // Progress tracking.
    counter("video_progress_checks_total", &["outcome"], "Progress checks handled, by how each ended."),
    histogram("video_progress_scheduling_lag_seconds", &[], "Seconds between a check's due time and the moment a tracker started it."),
    histogram("video_progress_tracking_duration_seconds", &[], "Seconds from a task's start at the provider to the end of its tracking."),
    counter("video_progress_orphaned_checks_total", &[], "Checks for a request id with no task row."),
    counter("video_progress_stale_checks_total", &[], "Checks dropped because their sequence was below the task's (duplicates, redeliveries)."),
    counter("video_progress_rearmed_total", &[], "Overdue check chains the sweeper re-armed."),
    counter("video_progress_checks_recirculated_total", &[], "Checks that arrived before they were due (a delay longer than the longest tier) and went round again."),
    histogram("video_progress_db_batch_size", &["statement"], "Checks served by one combined load or advance statement."),
    gauge("video_progress_owned_partitions", "Partition queues this instance consumes (holds the lease of)."),
    gauge("video_progress_partitions", "Partition queues of the topology (topology.partitions): what the instances' video_progress_owned_partitions sum to when every partition has an owner."),
    // Providers.
    histogram("video_provider_request_duration_seconds", &["provider", "operation"], "Seconds per HTTP call to a provider."),
    counter("video_provider_errors_total", &["provider", "operation", "kind"], "Failed provider calls, by kind (transient, permanent); a status call not sent at max_status_rps is not one (video_provider_throttled_total)."),
    counter("video_provider_submissions_total", &["provider", "outcome"], "Submissions to a provider, by outcome."),
    counter("video_provider_throttled_total", &["provider"], "Status calls not sent because this instance was at the provider's max_status_rps."),
    // Messages and the broker.
    counter("video_parked_messages_total", &["queue"], "Messages moved to video.parking, by the queue they came from."),
    counter("video_poison_messages_total", &["queue"], "Messages that could not be decoded, by consumer (generation, progress)."),
    counter("video_message_retries_total", &["queue"], "Messages moved to a delayed retry queue (a dependency was down)."),
    histogram("video_message_deliveries", &["queue"], "Times each message was handed to a consumer, retries included."),
    counter("video_broker_reconnects_total", &[], "Broker connections re-established after a loss."),
    counter("video_broker_published_total", &[], "Messages published and confirmed by the broker."),
    counter("video_broker_republished_total", &[], "Publishes sent again after a missing or negative confirm."),
    // Generation.
    counter("video_generation_terminal_total", &["status"], "Tasks that reached a terminal status."),
    counter("video_generation_commands_rejected_total", &["command", "reason"], "Commands refused with VideoGenerationCommandRejected."),
    counter("video_generation_errors_total", &["kind"], "Generation messages that failed: database (retried later) or data (parked)."),
    counter("video_generation_started_total", &["provider"], "Tasks accepted by a provider and tracked."),
    counter("video_generation_duplicate_requests_total", &[], "Requests for a request id that already had a task."),
    counter("video_generation_redriven_total", &[], "Requests stuck in pending that the sweeper published again."),
    histogram("video_generation_duration_seconds", &[], "Seconds from a task's start at the provider to its completed video (completed tasks only)."),
    // Outbox, webhooks, retention.
    counter("video_outbox_published_total", &[], "Outbox rows the relay published."),
    counter("video_outbox_parked_total", &[], "Outbox rows that could never be published, moved to parked_messages."),
    gauge("video_outbox_oldest_age_seconds", "Age in seconds of the oldest outbox row not yet published (0: empty)."),
    counter("video_webhook_deliveries_total", &["outcome"], "Webhook delivery attempts, by outcome."),
    counter("video_retention_removed_rows_total", &["kind"], "Rows removed by retention, by kind."),
];

/// The metric named `name`.
pub fn metric(name: &str) -> Option<&'static Metric> {
    METRICS.iter().find(|m| m.name == name)
}

// Label values call sites write as literals (the tests read the sources to hold them to these).
/// `statement` of `video_progress_db_batch_size` (src/store/checks.rs).
const BATCH_STATEMENTS: [&str; 2] = ["load", "advance"];
/// `kind` of `video_generation_errors_total` (src/generation/mod.rs).
const GENERATION_ERROR_KINDS: [&str; 2] = ["database", "data"];
/// `outcome` of `video_webhook_deliveries_total` (src/webhooks/mod.rs).
const WEBHOOK_OUTCOMES: [&str; 2] = ["delivered", "failed"];
/// `queue` of `video_poison_messages_total`: the consumer, not the queue name.
const POISON_CONSUMERS: [&str; 2] = ["generation", "progress"];
/// `operation` of the provider metrics: `providers::transport::Operation::label` (private there).
const PROVIDER_OPERATIONS: [&str; 3] = ["submit", "status", "cancel"];
/// `kind` of `video_provider_errors_total` for every operation: `ProviderError::kind_label`.
const PROVIDER_ERROR_KINDS: [&str; 2] = ["transient", "permanent"];

/// One series of a metric: its name and label values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Series {
    /// The metric.
    pub name: &'static str,
    /// Label name and value pairs, in the metric's label order.
    pub labels: Vec<(&'static str, String)>,
}

/// Every series of the cross product of `values` (one list per label of `name`).
fn product(out: &mut Vec<Series>, name: &'static str, values: &[&[String]]) {
    let metric = metric(name).unwrap_or_else(|| panic!("{name} is not in METRICS"));
    assert_eq!(
        metric.labels.len(),
        values.len(),
        "{name}: one value list per label"
    );
    let mut rows: Vec<Vec<(&'static str, String)>> = vec![Vec::new()];
    for (label, list) in metric.labels.iter().zip(values) {
        rows = rows
            .into_iter()
            .flat_map(|row| {
                list.iter().map(move |v| {
                    let mut row = row.clone();
                    row.push((*label, v.clone()));
                    row
                })
            })
            .collect();
    }
    out.extend(rows.into_iter().map(|labels| Series { name, labels }));
}

fn strings<'a>(values: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    values.into_iter().map(str::to_owned).collect()
}

/// Every series that exists from the first scrape of an instance on `topology` with the
/// configured `providers` (by name): each metric of [`METRICS`] with every label value it can
/// have (whichever roles the instance runs, so that sums across instances never miss one).
pub fn zero_series(topology: &Topology, providers: &[String]) -> Vec<Series> {
    let mut out: Vec<Series> = METRICS
        .iter()
        .filter(|m| m.labels.is_empty())
        .map(|m| Series {
            name: m.name,
            labels: Vec::new(),
        })
        .collect();
    let operations = strings(PROVIDER_OPERATIONS);
    let generation_queue = [topology.generation_queue()];
    let consumed: Vec<String> = std::iter::once(topology.generation_queue())
        .chain((0..topology.partitions()).map(|p| topology.partition_queue(p)))
        .collect();
    let outcomes = strings(CheckOutcome::LABEL_VALUES.map(CheckOutcome::as_str));
    let submissions = strings(Submission::ALL.map(Submission::as_str));
    let terminal = strings(TaskStatus::TERMINAL.map(TaskStatus::as_str));
    let retained = strings(Retained::ALL.map(Retained::as_str));
    let error_kinds = strings(PROVIDER_ERROR_KINDS);
    let statements = strings(BATCH_STATEMENTS);
    let generation_errors = strings(GENERATION_ERROR_KINDS);
    let webhook_outcomes = strings(WEBHOOK_OUTCOMES);
    let poison_consumers = strings(POISON_CONSUMERS);
    let products: [(&'static str, Vec<&[String]>); 15] = [
        ("video_progress_checks_total", vec![&outcomes]),
        ("video_progress_db_batch_size", vec![&statements]),
        (
            "video_provider_request_duration_seconds",
            vec![providers, &operations],
        ),
        (
            "video_provider_errors_total",
            vec![providers, &operations, &error_kinds],
        ),
        (
            "video_provider_submissions_total",
            vec![providers, &submissions],
        ),
        ("video_provider_throttled_total", vec![providers]),
        ("video_parked_messages_total", vec![&consumed]),
        ("video_poison_messages_total", vec![&poison_consumers]),
        // Only the generation consumer has a retry budget; the tracker never retries a check.
        ("video_message_retries_total", vec![&generation_queue]),
        ("video_message_deliveries", vec![&consumed]),
        ("video_generation_terminal_total", vec![&terminal]),
        ("video_generation_errors_total", vec![&generation_errors]),
        ("video_generation_started_total", vec![providers]),
        ("video_webhook_deliveries_total", vec![&webhook_outcomes]),
        ("video_retention_removed_rows_total", vec![&retained]),
    ];
    for (name, values) in products {
        product(&mut out, name, &values);
    }
    // Not a full product: each reason goes with the commands it can refuse.
    for reason in RejectReason::ALL {
        let commands = strings(reason.commands().iter().copied());
        let reason = [reason.as_str().to_owned()];
        product(
            &mut out,
            "video_generation_commands_rejected_total",
            &[&commands, &reason],
        );
    }
    out
}

/// Creates every series of [`zero_series`] in the process's recorder without changing a value
/// (counters and gauges are incremented by zero, histograms registered), and sets
/// `video_progress_partitions`. Idempotent: tests start many instances in one process.
pub fn register_zero(topology: &Topology, providers: &[String]) {
    for series in zero_series(topology, providers) {
        let labels: Vec<Label> = series
            .labels
            .iter()
            .map(|(k, v)| Label::new(*k, v.clone()))
            .collect();
        match metric(series.name).map(|m| m.kind) {
            Some(Kind::Counter) => ::metrics::counter!(series.name, labels).increment(0),
            Some(Kind::Gauge) => ::metrics::gauge!(series.name, labels).increment(0.0),
            Some(Kind::Histogram) => drop(::metrics::histogram!(series.name, labels)),
            None => {}
        }
    }
    ::metrics::gauge!("video_progress_partitions").set(f64::from(topology.partitions()));
}

/// The process-wide Prometheus recorder (installed once; tests and the demo share it), with
/// every metric of [`METRICS`] described.
pub fn handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = builder().build_recorder();
            for m in METRICS {
                let name = KeyName::from_const_str(m.name);
                let help = SharedString::const_str(m.help);
                match m.kind {
                    Kind::Counter => recorder.describe_counter(name, None, help),
                    Kind::Gauge => recorder.describe_gauge(name, None, help),
                    Kind::Histogram => recorder.describe_histogram(name, None, help),
                }
            }
            let handle = recorder.handle();
            // Another recorder may already be installed (embedding); then ours only renders.
            let _ = ::metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// Buckets: every histogram is a Prometheus histogram (summaries cannot be summed across
/// instances).
fn builder() -> PrometheusBuilder {
    PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full("video_progress_scheduling_lag_seconds".to_owned()),
            // Fine below 100 ms, where the lag target lives (a superset of the earlier buckets,
            // so existing queries keep working).
            &[
                0.001, 0.002, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.035, 0.05, 0.075, 0.1,
                0.15, 0.25, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0, 30.0,
            ],
        )
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full("video_progress_db_batch_size".to_owned()),
                &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0],
            )
        })
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full("video_message_deliveries".to_owned()),
                &[1.0, 2.0, 3.0, 4.0, 5.0, 10.0, 20.0],
            )
        })
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Suffix("_seconds".to_owned()),
                &[
                    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
                    600.0, 1800.0,
                ],
            )
        })
        .unwrap_or_else(|_| PrometheusBuilder::new())
}

#[cfg(test)]
mod tests;
