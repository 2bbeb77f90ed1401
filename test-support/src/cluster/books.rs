//! The books of a run (DESIGN §6): what every task should have come to, and what the database,
//! the events and the provider say it did.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::StreamExt;
use lapin::options::BasicCancelOptions;
use video_orchestrator::store::{Task, TaskStatus};

use super::{Cluster, MIN_INTERVAL_MS};
use crate::events::consume_unacked;
use crate::prometheus::Counters;

/// A fault and how long the system took to get over it, for the per-task allowance of status
/// calls and for the figures.
#[derive(Debug, Clone)]
pub struct FaultWindow {
    /// When it began.
    pub from: DateTime<Utc>,
    /// When the system was back (ready again).
    pub to: DateTime<Utc>,
}

impl FaultWindow {
    /// Seconds from the fault to recovery.
    pub fn recovery_s(&self) -> f64 {
        (self.to - self.from).num_milliseconds() as f64 / 1000.0
    }
}

/// A submitted task and what the books expect of it.
#[derive(Debug, Clone)]
pub struct Expectation {
    /// Its `requestId`.
    pub request_id: String,
    /// Refused by validation (Failed, `retryable: false`, no provider job, CommandRejected)
    /// rather than run at the provider.
    pub refused: bool,
}

/// One event read from the books queue.
#[derive(Debug, Clone)]
pub struct BookEvent {
    /// Routing key.
    pub routing_key: String,
    /// `message_id` property (the body's `messageId` when the property is missing).
    pub message_id: String,
    /// The body's `requestId`.
    pub request_id: String,
    /// The body.
    pub body: serde_json::Value,
}

const TERMINAL_KEYS: [&str; 3] = [
    "video.generation.completed",
    "video.generation.failed",
    "video.generation.cancelled",
];

/// The outcome of the audit.
#[derive(Debug, Default)]
pub struct Books {
    /// Tasks audited.
    pub tasks: usize,
    /// Outcomes by status.
    pub by_status: BTreeMap<String, usize>,
    /// Missing or not terminal.
    pub lost: Vec<String>,
    /// Terminal state differs from the provider's outcome.
    pub wrong_outcome: Vec<String>,
    /// Not exactly one distinct terminal event, or of the wrong kind.
    pub bad_terminal_events: Vec<String>,
    /// Not exactly one distinct `VideoProgressTrackingCancelled`.
    pub bad_tracking_cancelled: Vec<String>,
    /// Event deliveries whose `messageId` was already seen (at-least-once re-sends).
    pub duplicates_dropped: usize,
    /// Every distinct event, in arrival order.
    pub events: Vec<BookEvent>,
    /// Delay or partition queues still holding checks.
    pub zombie_queues: Vec<(String, u32)>,
    /// Tasks whose provider saw more status calls than one chain can make.
    pub forked: Vec<String>,
    /// Status calls over all tasks.
    pub status_calls: u64,
    /// The largest `calls / allowance` seen, for the figure.
    pub tightest: f64,
    /// Provider jobs no task points at (a crash between submit and recording it).
    pub orphan_provider_jobs: u64,
    /// Tasks failed as "submission outcome unknown" with no job recorded: each may have left one
    /// job at the provider that no task points at.
    pub unknown_submits: u64,
}

impl Books {
    /// Everything that breaks a promise, one line each.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        let mut list = |what: &str, v: &[String]| {
            if !v.is_empty() {
                p.push(format!(
                    "{what}: {} (e.g. {:?})",
                    v.len(),
                    &v[..v.len().min(5)]
                ));
            }
        };
        list("lost (not terminal)", &self.lost);
        list("outcome differs from the provider's", &self.wrong_outcome);
        list("not exactly one terminal event", &self.bad_terminal_events);
        list(
            "not exactly one tracking-cancelled event",
            &self.bad_tracking_cancelled,
        );
        list("forked chains (too many status calls)", &self.forked);
        // Provider jobs == tasks that reached the provider: every job is some task's, except at
        // most one per task whose submit's outcome is unknown (it may or may not have created one).
        if self.orphan_provider_jobs > self.unknown_submits {
            p.push(format!(
                "provider jobs no task points at: {} (only {} submits of unknown outcome could explain one each): a job submitted twice",
                self.orphan_provider_jobs, self.unknown_submits
            ));
        }
        if !self.zombie_queues.is_empty() {
            p.push(format!("checks left in queues: {:?}", self.zombie_queues));
        }
        p
    }
}

impl Expectation {
    /// Every one of `ids` run at the provider (none refused).
    pub fn all_run(ids: &[String]) -> Vec<Expectation> {
        ids.iter()
            .map(|id| Expectation {
                request_id: id.clone(),
                refused: false,
            })
            .collect()
    }

    /// Every one of `ids` refused by validation.
    pub fn all_refused(ids: &[String]) -> Vec<Expectation> {
        ids.iter()
            .map(|id| Expectation {
                request_id: id.clone(),
                refused: true,
            })
            .collect()
    }
}

/// How a run ended: the instances' counters (read while they ran) and the books.
#[derive(Debug)]
pub struct Audit {
    /// Summed over every instance, those killed during the run included.
    pub counters: Counters,
    /// The books of the expected tasks.
    pub books: Books,
}

impl Cluster {
    /// The end of every run, after [`Cluster::drain`]: reads the counters, stops every instance
    /// (asserting each exits 0) and checks the books for `expected` ([`Cluster::books`]).
    pub async fn audit(&mut self, expected: &[Expectation], faults: &[FaultWindow]) -> Audit {
        let counters = self.counters().await;
        self.stop_all().await;
        let books = self.books(expected, faults).await;
        Audit { counters, books }
    }

    /// Reads every event from the books queue.
    async fn read_events(&self) -> Vec<BookEvent> {
        let conn = self.connect().await;
        let expected = self.depth(&conn, &self.books_queue).await as usize;
        let channel = conn.create_channel().await.expect("channel");
        let mut consumer = consume_unacked(&channel, &self.books_queue)
            .await
            .expect("consume the books queue");
        let mut events = Vec::with_capacity(expected);
        let idle = Duration::from_millis(if expected == 0 { 300 } else { 2000 });
        while let Ok(Some(Ok(d))) = tokio::time::timeout(idle, consumer.next()).await {
            let body: serde_json::Value =
                serde_json::from_slice(&d.data).unwrap_or(serde_json::Value::Null);
            let message_id = d
                .properties
                .message_id()
                .as_ref()
                .map(ToString::to_string)
                .or_else(|| body["messageId"].as_str().map(str::to_owned))
                .unwrap_or_default();
            events.push(BookEvent {
                routing_key: d.routing_key.to_string(),
                message_id,
                request_id: body["requestId"].as_str().unwrap_or_default().to_owned(),
                body,
            });
            if events.len() >= expected {
                break;
            }
        }
        let _ = channel
            .basic_cancel(consumer.tag(), BasicCancelOptions::default())
            .await;
        let _ = conn.close(200, "read".into()).await;
        assert_eq!(
            events.len(),
            expected,
            "{}: read {} of the {expected} events in the books queue",
            self.name,
            events.len()
        );
        events
    }

    /// Checks the books for `expected` (call after [`Cluster::drain`] and
    /// [`Cluster::stop_all`]). `faults` widen each task's allowance of status calls by one per
    /// fault overlapping its life.
    pub async fn books(&self, expected: &[Expectation], faults: &[FaultWindow]) -> Books {
        let ids: Vec<String> = expected.iter().map(|e| e.request_id.clone()).collect();
        let rows: HashMap<String, Task> =
            sqlx::query_as::<_, Task>("SELECT * FROM video_tasks WHERE request_id = ANY($1)")
                .bind(&ids)
                .fetch_all(self.env.store.pool())
                .await
                .expect("read the tasks")
                .into_iter()
                .map(|t| (t.request_id.clone(), t))
                .collect();
        // Status calls first: asking the provider for the outcome below counts as calls too.
        let stats = self.sim.stats().await;
        let jobs: Vec<String> = rows
            .values()
            .filter_map(|t| t.provider_task_id.clone())
            .collect();
        let http = &self.sim;
        let outcomes: HashMap<String, Option<String>> = futures::stream::iter(jobs.clone())
            .map(|job| async move {
                let s = http.job_status(&job).await;
                (job, s)
            })
            .buffer_unordered(16)
            .collect()
            .await;

        // Every job some task of this run (its own database) points at, expected or not (a
        // cancelled task's too); and the submits that may have left a job no task points at.
        let (recorded_jobs, unknown_submits): (i64, i64) = sqlx::query_as(
            "SELECT count(DISTINCT provider_task_id),
                    count(*) FILTER (WHERE provider_task_id IS NULL AND error = 'submission outcome unknown')
             FROM video_tasks",
        )
        .fetch_one(self.env.store.pool())
        .await
        .expect("count the recorded jobs");
        // A job created for a task cancelled while it was submitted is written on the ended row
        // too (`record_provider_job`), so it counts among the recorded ones.
        let mut books = Books {
            tasks: expected.len(),
            orphan_provider_jobs: stats
                .jobs
                .saturating_sub(u64::try_from(recorded_jobs).unwrap_or(0)),
            unknown_submits: u64::try_from(unknown_submits).unwrap_or(0),
            ..Books::default()
        };
        let mut seen = HashSet::new();
        for e in self.read_events().await {
            if !seen.insert(e.message_id.clone()) {
                books.duplicates_dropped += 1;
                continue;
            }
            books.events.push(e);
        }
        let mut per_task: HashMap<&str, Vec<&BookEvent>> = HashMap::new();
        for e in &books.events {
            per_task.entry(e.request_id.as_str()).or_default().push(e);
        }

        let conn = self.connect().await;
        let topology = self.env.topology();
        let mut queues: Vec<String> = topology
            .delay_tiers_ms()
            .iter()
            .map(|t| topology.delay_queue(*t))
            .collect();
        queues.extend((0..topology.partitions()).map(|p| topology.partition_queue(p)));
        for q in queues {
            let n = self.depth(&conn, &q).await;
            if n > 0 {
                books.zombie_queues.push((q, n));
            }
        }
        let _ = conn.close(200, "inspected".into()).await;
        // What AMQP cannot see: messages the broker holds for dead-lettering.
        for (q, n) in self.broker_held().await {
            books
                .zombie_queues
                .push((format!("{q} (held by the broker)"), n as u32));
        }

        for exp in expected {
            let id = exp.request_id.as_str();
            let Some(task) = rows.get(id) else {
                books.lost.push(format!("{id}: no row"));
                continue;
            };
            *books
                .by_status
                .entry(task.status.as_str().to_owned())
                .or_default() += 1;

            if !task.status.is_terminal() {
                books
                    .lost
                    .push(format!("{id}: still {}", task.status.as_str()));
                continue;
            }
            // The provider's outcome, or what a refusal / a failed submit must look like.
            let right = match (&task.provider_task_id, exp.refused) {
                (_, true) => {
                    task.status == TaskStatus::Failed
                        && task.retryable == Some(false)
                        && task.provider_task_id.is_none()
                }
                (Some(job), false) => match outcomes.get(job).cloned().flatten().as_deref() {
                    Some("completed") => task.status == TaskStatus::Completed,
                    Some("failed") => task.status == TaskStatus::Failed,
                    _ => false,
                },
                // Never accepted by the provider: submit retries ran out.
                (None, false) => task.status == TaskStatus::Failed && task.retryable == Some(true),
            };
            if !right {
                books.wrong_outcome.push(format!(
                    "{id}: {} (retryable {:?}, job {:?} → {:?}, error {:?})",
                    task.status.as_str(),
                    task.retryable,
                    task.provider_task_id,
                    task.provider_task_id
                        .as_ref()
                        .and_then(|j| outcomes.get(j).cloned().flatten()),
                    task.error
                ));
            }
            let events = per_task.get(id).cloned().unwrap_or_default();
            let terminal: Vec<&str> = events
                .iter()
                .filter(|e| TERMINAL_KEYS.contains(&e.routing_key.as_str()))
                .map(|e| e.routing_key.as_str())
                .collect();
            let want = match task.status {
                TaskStatus::Completed => "video.generation.completed",
                TaskStatus::Cancelled => "video.generation.cancelled",
                _ => "video.generation.failed",
            };
            if terminal != [want] {
                books.bad_terminal_events.push(format!(
                    "{id}: {} but events {terminal:?}",
                    task.status.as_str()
                ));
            }
            let stops = events
                .iter()
                .filter(|e| e.routing_key == "video.progress.tracking_cancelled")
                .count();
            if stops != 1 {
                books
                    .bad_tracking_cancelled
                    .push(format!("{id}: {stops} tracking-cancelled events"));
            }
            if let (Some(job), Some(started), Some(finished)) =
                (&task.provider_task_id, task.started_at, task.finished_at)
            {
                let calls = stats.status_calls_by_job.get(job).copied().unwrap_or(0);
                books.status_calls += calls;
                let tracked = (finished - started).num_milliseconds().max(0) as u64;
                let overlapping = faults
                    .iter()
                    .filter(|f| f.from <= finished && f.to >= task.created_at)
                    .count() as u64;
                let allowance = tracked / MIN_INTERVAL_MS + 1 + overlapping;
                books.tightest = books.tightest.max(calls as f64 / allowance as f64);
                if calls > allowance {
                    books.forked.push(format!(
                        "{id}: {calls} status calls in {tracked} ms ({overlapping} faults; allowance {allowance})"
                    ));
                }
            }
        }
        books
    }
}

/// Asserts the books are clean, naming every broken promise and where the logs are.
pub fn assert_clean(cluster: &Cluster, books: &Books) {
    let problems = books.problems();
    assert!(
        problems.is_empty(),
        "{}: the books do not balance (logs kept in {}):\n  {}",
        cluster.name,
        cluster.dir.display(),
        problems.join("\n  ")
    );
}
