//! The end of a run's load: every task terminal, the outbox empty, the longest tier passed; and
//! what the broker itself still holds.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use super::{Cluster, LONGEST_TIER_MS};
use crate::app::eventually;
use crate::figures::note;
use crate::process::run_tool;

/// What [`Cluster::drain`] waited for.
#[derive(Debug, Clone, Copy)]
pub struct Drained {
    /// When the last task ended (`finished_at`).
    pub last_finished: DateTime<Utc>,
    /// How long the drain took, seconds (for the figures).
    pub seconds: f64,
}

impl Cluster {
    /// How many of `ids` are terminal (None while the database does not answer).
    async fn terminal_count(&self, ids: &[String]) -> Option<i64> {
        sqlx::query_scalar(
            "SELECT count(*) FROM video_tasks WHERE request_id = ANY($1)
               AND status NOT IN ('pending', 'processing')",
        )
        .bind(ids)
        .fetch_one(self.env.store.pool())
        .await
        .ok()
    }

    /// Each partition that holds checks without a consumer, with its lease: what a stuck drain
    /// needs to say first (a partition leased but not consumed, or not leased at all).
    async fn partition_report(&self) -> String {
        let conn = self.connect().await;
        let Ok(channel) = conn.create_channel().await else {
            return "partitions: no channel to inspect them".to_owned();
        };
        let leases: Vec<(i32, Option<String>, DateTime<Utc>)> = sqlx::query_as(
            "SELECT partition, owner, expires_at FROM partition_leases
             WHERE topology_prefix = $1 ORDER BY partition",
        )
        .bind(&self.env.prefix)
        .fetch_all(self.env.store.pool())
        .await
        .unwrap_or_default();
        let mut idle = Vec::new();
        for p in 0..self.env.topology().partitions() {
            let queue = self.env.topology().partition_queue(p);
            let declared = channel
                .queue_declare(
                    queue.as_str().into(),
                    lapin::options::QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    lapin::types::FieldTable::default(),
                )
                .await;
            let Ok(q) = declared else { continue };
            if q.message_count() > 0 && q.consumer_count() == 0 {
                let lease = leases
                    .iter()
                    .find(|(n, _, _)| *n == i32::from(p))
                    .map(|(_, owner, until)| format!("{owner:?} until {until}"))
                    .unwrap_or_else(|| "no lease row".to_owned());
                idle.push(format!(
                    "p{p}: {} checks, leased to {lease}",
                    q.message_count()
                ));
            }
        }
        let _ = channel.close(200, "inspected".into()).await;
        if idle.is_empty() {
            "every partition holding checks has a consumer".to_owned()
        } else {
            format!(
                "partitions holding checks with no consumer: {}",
                idle.join("; ")
            )
        }
    }

    /// Waits until every task in `ids` is terminal and the outbox is empty, then until the
    /// longest tier has elapsed after the last terminal transition (plus a margin), so any
    /// zombie check would be sitting in a queue.
    ///
    /// # Panics
    /// When the tasks are not all terminal within `timeout` (the books then name them).
    pub async fn drain(&self, ids: &[String], timeout: Duration) -> Drained {
        let began = Instant::now();
        let t = Instant::now();
        let mut last_note = Instant::now();
        loop {
            let done = self.terminal_count(ids).await.unwrap_or(-1);
            if done == ids.len() as i64 {
                break;
            }
            if t.elapsed() > timeout {
                note(
                    self.name,
                    &format!("only {done}/{} tasks terminal after {timeout:?}", ids.len()),
                );
                note(self.name, &self.partition_report().await);
                break;
            }
            if last_note.elapsed() > Duration::from_secs(10) {
                note(self.name, &format!("{done}/{} tasks terminal", ids.len()));
                last_note = Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        eventually(Duration::from_secs(30), || async {
            (self.env.store.outbox_len().await.unwrap_or(1) == 0).then_some(())
        })
        .await;
        let last: Option<DateTime<Utc>> = sqlx::query_scalar(
            "SELECT max(finished_at) FROM video_tasks WHERE request_id = ANY($1)",
        )
        .bind(ids)
        .fetch_one(self.env.store.pool())
        .await
        .expect("last finish");
        let last = last.unwrap_or_else(Utc::now);
        let quiet_until = last
            + chrono::Duration::milliseconds(i64::try_from(LONGEST_TIER_MS).unwrap_or(0) + 2000);
        let wait = (quiet_until - Utc::now()).to_std().unwrap_or_default();
        tokio::time::sleep(wait).await;
        Drained {
            last_finished: last,
            seconds: began.elapsed().as_secs_f64(),
        }
    }

    /// Messages the broker holds in this run's delay and partition queues that a passive
    /// declare does not count (`rabbitmqctl list_queues` `messages` minus `messages_ready`:
    /// held by a quorum queue's dead-letter worker, or unacknowledged). Empty when `rabbitmqctl`
    /// is not available.
    pub async fn broker_held(&self) -> Vec<(String, u64)> {
        let prefix = format!("{}video.progress.", self.env.prefix);
        let (ok, out) = tokio::task::spawn_blocking(|| {
            run_tool(
                "timeout",
                &[
                    "60",
                    "rabbitmqctl",
                    "-q",
                    "list_queues",
                    "name",
                    "messages",
                    "messages_ready",
                    "--no-table-headers",
                ],
            )
        })
        .await
        .unwrap_or((false, String::new()));
        if !ok {
            return Vec::new();
        }
        out.lines()
            .filter_map(|line| {
                let mut f = line.split_whitespace();
                let (name, total, ready) = (f.next()?, f.next()?, f.next()?);
                let held = total
                    .parse::<u64>()
                    .ok()?
                    .saturating_sub(ready.parse::<u64>().ok()?);
                (name.starts_with(&prefix) && held > 0).then(|| (name.to_owned(), held))
            })
            .collect()
    }
}

/// Lines of the broker under test's logs (`/var/log/rabbitmq/*.log`, or `VO_RABBITMQ_LOG_DIR`
/// for the RabbitMQ 4.0 pass) that contain both needles.
pub fn rabbit_log_lines(a: &str, b: &str) -> usize {
    let dir = std::env::var("VO_RABBITMQ_LOG_DIR").unwrap_or_else(|_| "/var/log/rabbitmq".into());
    let Ok(dir) = std::fs::read_dir(dir) else {
        return 0;
    };
    dir.flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".log"))
        .map(|e| {
            std::fs::read_to_string(e.path())
                .unwrap_or_default()
                .lines()
                .filter(|l| l.contains(a) && l.contains(b))
                .count()
        })
        .sum()
}
