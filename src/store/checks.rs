//! The progress tracker's statements: load a task for a check and advance its chain, each
//! combined across concurrent checks, and the sweeper's re-arm of overdue chains.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use super::{Store, StoreError, Task};
use crate::batching::Combiner;

/// What a tracker's check writes when it advances the chain.
#[derive(Debug, Clone)]
pub struct CheckAdvance {
    /// The sequence of the check that ran.
    pub sequence: i64,
    /// When the next check is due (None when the chain ends here).
    pub next_check_at: Option<DateTime<Utc>>,
    /// Progress published (kept monotonic by the query).
    pub progress: Option<i16>,
    /// Status published.
    pub progress_status: Option<String>,
}

/// The progress tracker's two statements per check, each combined across concurrent checks
/// (see [`crate::batching`]): one round trip reads or advances many rows.
#[derive(Debug)]
pub(super) struct CheckBatches {
    loads: Combiner<String, Result<Option<Task>, String>>,
    advances: Combiner<(String, CheckAdvance), Result<bool, String>>,
}

/// Batches at most this many checks; two batches of a kind run at once.
const CHECK_BATCH_MAX: usize = 128;
const CHECK_BATCH_EXECUTORS: usize = 2;

impl CheckBatches {
    pub(super) fn new() -> Self {
        Self {
            loads: Combiner::new(CHECK_BATCH_EXECUTORS, CHECK_BATCH_MAX),
            advances: Combiner::new(CHECK_BATCH_EXECUTORS, CHECK_BATCH_MAX),
        }
    }
}

impl Store {
    /// Reads one task for a progress check: like [`Store::get`], but combined with the reads of
    /// concurrent checks into one `= ANY($1)` query.
    ///
    /// # Errors
    /// Database errors.
    pub async fn get_for_check(&self, request_id: &str) -> Result<Option<Task>, StoreError> {
        let pool = &self.pool;
        let answer = self
            .checks
            .loads
            .run(request_id.to_owned(), |ids| async move {
                metrics::histogram!("video_progress_db_batch_size", "statement" => "load")
                    .record(ids.len() as f64);
                let rows = sqlx::query_as::<_, Task>(
                    "SELECT * FROM video_tasks WHERE request_id = ANY($1)",
                )
                .bind(&ids)
                .fetch_all(pool)
                .await;
                match rows {
                    Ok(rows) => {
                        let by_id: HashMap<String, Task> = rows
                            .into_iter()
                            .map(|t| (t.request_id.clone(), t))
                            .collect();
                        ids.iter().map(|id| Ok(by_id.get(id).cloned())).collect()
                    }
                    Err(e) => ids.iter().map(|_| Err(e.to_string())).collect(),
                }
            })
            .await;
        batched(answer)
    }
    /// Advances the check chain: succeeds for exactly one check whose `sequence` is not below the
    /// row's, while the task is processing and tracked. Progress only moves forward.
    /// Returns false when another check won, or the task stopped meanwhile.
    ///
    /// # Errors
    /// Database errors.
    pub async fn advance_check(
        &self,
        request_id: &str,
        advance: &CheckAdvance,
    ) -> Result<bool, StoreError> {
        let pool = &self.pool;
        let answer = self
            .checks
            .advances
            .run((request_id.to_owned(), advance.clone()), |ops| async move {
                advance_checks(pool, ops).await
            })
            .await;
        batched(answer)
    }

    /// Processing tasks whose next check is overdue by more than `grace`: each gets its sequence
    /// bumped (so any late check of the old chain is stale) and its next check pushed to
    /// `now + next_in`. Returns the tasks with their new `check_sequence`. `FOR UPDATE SKIP
    /// LOCKED` makes sure one sweeper re-arms a given task.
    ///
    /// # Errors
    /// Database errors.
    pub async fn rearm_overdue(
        &self,
        grace: Duration,
        next_in: Duration,
        limit: i64,
    ) -> Result<Vec<Task>, StoreError> {
        let rows = sqlx::query_as::<_, Task>(
            "WITH due AS (
                 SELECT request_id FROM video_tasks
                 WHERE status = 'processing' AND NOT tracking_stopped
                   AND COALESCE(next_check_at, started_at, created_at) < now() - make_interval(secs => $1)
                 ORDER BY next_check_at
                 LIMIT $3
                 FOR UPDATE SKIP LOCKED)
             UPDATE video_tasks t SET
                 check_sequence = t.check_sequence + 1,
                 next_check_at = now() + make_interval(secs => $2),
                 updated_at = now()
             FROM due WHERE t.request_id = due.request_id
             RETURNING t.*",
        )
        .bind(grace.as_secs_f64())
        .bind(next_in.as_secs_f64())
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }
}

/// A combined statement's answer as a store result (`None`: the caller running the batch was
/// cancelled before it answered).
fn batched<T>(answer: Option<Result<T, String>>) -> Result<T, StoreError> {
    answer
        .unwrap_or_else(|| Err("the batch was cancelled".to_owned()))
        .map_err(StoreError::Batch)
}

/// Advances many check chains in one statement per round; a request id that appears twice
/// (never in one process, whose checks of a task are serial, but cheap to allow) goes in a later
/// round, so each operation is answered for its own row. One answer per operation, in order.
async fn advance_checks(
    pool: &PgPool,
    ops: Vec<(String, CheckAdvance)>,
) -> Vec<Result<bool, String>> {
    let mut answers: Vec<Option<Result<bool, String>>> = vec![None; ops.len()];
    let mut left: Vec<usize> = (0..ops.len()).collect();
    metrics::histogram!("video_progress_db_batch_size", "statement" => "advance")
        .record(ops.len() as f64);
    while !left.is_empty() {
        let mut seen = HashSet::new();
        let (round, later): (Vec<usize>, Vec<usize>) =
            left.iter().partition(|&&i| seen.insert(ops[i].0.as_str()));
        let ids: Vec<&str> = round.iter().map(|&i| ops[i].0.as_str()).collect();
        let sequences: Vec<i64> = round.iter().map(|&i| ops[i].1.sequence).collect();
        let next: Vec<Option<DateTime<Utc>>> =
            round.iter().map(|&i| ops[i].1.next_check_at).collect();
        let progress: Vec<Option<i16>> = round.iter().map(|&i| ops[i].1.progress).collect();
        let statuses: Vec<Option<&str>> = round
            .iter()
            .map(|&i| ops[i].1.progress_status.as_deref())
            .collect();
        let advanced = sqlx::query_scalar::<_, String>(
            "UPDATE video_tasks t SET
                 check_sequence = u.sequence + 1,
                 checks_count = t.checks_count + 1,
                 last_check_at = now(),
                 next_check_at = u.next_check_at,
                 progress = GREATEST(t.progress, COALESCE(u.progress, t.progress)),
                 progress_status = COALESCE(u.progress_status, t.progress_status),
                 updated_at = now()
             FROM unnest($1::text[], $2::int8[], $3::timestamptz[], $4::int2[], $5::text[])
                  AS u(request_id, sequence, next_check_at, progress, progress_status)
             WHERE t.request_id = u.request_id AND t.check_sequence <= u.sequence
               AND t.status = 'processing' AND NOT t.tracking_stopped
             RETURNING t.request_id",
        )
        .bind(&ids)
        .bind(&sequences)
        .bind(&next)
        .bind(&progress)
        .bind(&statuses)
        .fetch_all(pool)
        .await;
        match advanced {
            Ok(rows) => {
                let rows: HashSet<String> = rows.into_iter().collect();
                for &i in &round {
                    answers[i] = Some(Ok(rows.contains(&ops[i].0)));
                }
            }
            Err(e) => {
                for &i in &round {
                    answers[i] = Some(Err(e.to_string()));
                }
            }
        }
        left = later;
    }
    answers
        .into_iter()
        .map(|a| a.unwrap_or_else(|| Err("not run".to_owned())))
        .collect()
}
