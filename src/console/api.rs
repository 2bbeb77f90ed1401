//! The console's admin API: every handler checks for an admin key first (see the module above).

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tracing::warn;

use super::{admin, error, ConsoleState, REQUEUE_TIMEOUT};
use crate::parking::RequeueError;
use crate::store::{
    ParkedMessage, PendingOutbox, StoreError, Task, TaskFilter, TaskStatus, TaskView,
    WebhookDelivery,
};

const DEFAULT_LIMIT: i64 = 50;
const MAX_LIMIT: i64 = 500;

fn unavailable(e: &StoreError) -> Response {
    warn!(error = %e, "console: database query failed");
    error(StatusCode::SERVICE_UNAVAILABLE, "database unavailable")
}

fn limit(asked: Option<i64>) -> i64 {
    asked.unwrap_or(DEFAULT_LIMIT).clamp(1, MAX_LIMIT)
}

/// `GET /v1/admin/tasks` query.
#[derive(Debug, Deserialize)]
pub(super) struct TasksQuery {
    /// One tenant (virtual key).
    tenant: Option<String>,
    status: Option<TaskStatus>,
    /// Part of a request id.
    q: Option<String>,
    limit: Option<i64>,
}

fn non_empty(s: Option<String>) -> Option<String> {
    s.map(|s| s.trim().to_owned()).filter(|s| !s.is_empty())
}

/// A task as the console lists it: the public view plus what an operator looks at.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct ConsoleTask {
    #[serde(flatten)]
    view: TaskView,
    progress_status: Option<String>,
    updated_at: DateTime<Utc>,
    last_check_at: Option<DateTime<Utc>>,
}

impl From<&Task> for ConsoleTask {
    fn from(t: &Task) -> Self {
        Self {
            view: TaskView::from(t),
            progress_status: t.progress_status.clone(),
            updated_at: t.updated_at,
            last_check_at: t.last_check_at,
        }
    }
}

pub(super) async fn tasks(
    State(state): State<ConsoleState>,
    headers: HeaderMap,
    Query(query): Query<TasksQuery>,
) -> Response {
    if let Err(refused) = admin(&state.store, &headers).await {
        return refused;
    }
    let filter = TaskFilter {
        virtual_key_id: non_empty(query.tenant),
        status: query.status,
        request_id_contains: non_empty(query.q),
        limit: limit(query.limit),
    };
    match state.store.console_tasks(&filter).await {
        Ok(list) => Json(serde_json::json!({
            "tasks": list.iter().map(ConsoleTask::from).collect::<Vec<_>>(),
        }))
        .into_response(),
        Err(e) => unavailable(&e),
    }
}

/// One line of a task's timeline.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct TimelineEntry {
    pub at: DateTime<Utc>,
    /// `received`, `submit`, `started`, `check`, `next-check`, `finished`, `outbox`, `webhook`,
    /// `parked`.
    pub kind: &'static str,
    pub detail: String,
}

/// What the store still records about a task, in time order. Published events are not kept
/// (the outbox row goes once the broker confirms it), so the events shown are the lifecycle
/// steps written on the task row, the outbox rows still waiting, the webhook deliveries (one per
/// event sent to the task's callback) and the task's parked messages.
pub(super) fn timeline(
    task: &Task,
    outbox: &[PendingOutbox],
    webhooks: &[WebhookDelivery],
    parked: &[ParkedMessage],
) -> Vec<TimelineEntry> {
    let mut out = vec![TimelineEntry {
        at: task.created_at,
        kind: "received",
        detail: format!(
            "request for {} from {}",
            if task.model.is_empty() {
                "?"
            } else {
                &task.model
            },
            task.virtual_key_id
        ),
    }];
    if let Some(at) = task.submit_attempted_at {
        out.push(TimelineEntry {
            at,
            kind: "submit",
            detail: format!("submitted to {}", task.provider),
        });
    }
    if let Some(at) = task.started_at {
        out.push(TimelineEntry {
            at,
            kind: "started",
            detail: format!(
                "accepted by {}: job {}",
                task.provider,
                task.provider_task_id.as_deref().unwrap_or("?")
            ),
        });
    }
    if let Some(at) = task.last_check_at {
        // The check that saw the provider finish records itself after publishing the outcome,
        // so its row write may land just after the task ended: it still came first.
        let at = task.finished_at.map_or(at, |finished| at.min(finished));
        out.push(TimelineEntry {
            at,
            kind: "check",
            detail: format!(
                "last of {} progress checks: {}%{}",
                task.checks_count,
                task.progress,
                task.progress_status
                    .as_deref()
                    .map(|s| format!(" ({s})"))
                    .unwrap_or_default()
            ),
        });
    }
    if let (Some(at), false) = (task.next_check_at, task.tracking_stopped) {
        if task.status == TaskStatus::Processing {
            out.push(TimelineEntry {
                at,
                kind: "next-check",
                detail: format!("next check due (sequence {})", task.check_sequence),
            });
        }
    }
    if let Some(at) = task.finished_at {
        let mut detail = task.status.as_str().to_owned();
        if let Some(e) = &task.error {
            detail.push_str(&format!(": {e}"));
        }
        out.push(TimelineEntry {
            at,
            kind: "finished",
            detail,
        });
    }
    for o in outbox {
        out.push(TimelineEntry {
            at: o.created_at,
            kind: "outbox",
            detail: format!(
                "{} waiting to be published ({} failed attempts{})",
                o.message_type,
                o.attempts,
                o.last_error
                    .as_deref()
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default()
            ),
        });
    }
    for w in webhooks {
        let state = match (&w.delivered_at, &w.last_error) {
            (Some(_), _) => "delivered".to_owned(),
            (None, Some(e)) => format!("not delivered yet: {e}"),
            (None, None) => "waiting".to_owned(),
        };
        out.push(TimelineEntry {
            at: w.delivered_at.unwrap_or(w.created_at),
            kind: "webhook",
            detail: format!(
                "{} to {}: {state} after {} attempts",
                w.event_type, w.url, w.attempts
            ),
        });
    }
    for p in parked {
        out.push(TimelineEntry {
            at: p.parked_at,
            kind: "parked",
            detail: format!("parked from {}: {}", p.original_queue, p.reason),
        });
    }
    out.sort_by_key(|e| e.at);
    out
}

pub(super) async fn task(
    State(state): State<ConsoleState>,
    headers: HeaderMap,
    Path(request_id): Path<String>,
) -> Response {
    if let Err(refused) = admin(&state.store, &headers).await {
        return refused;
    }
    let store = &state.store;
    let task = match store.get(&request_id).await {
        Ok(Some(t)) => t,
        Ok(None) => return error(StatusCode::NOT_FOUND, "not found"),
        Err(e) => return unavailable(&e),
    };
    let (outbox, webhooks, parked) = match tokio::try_join!(
        store.console_pending_outbox(&request_id),
        store.console_webhooks(&request_id),
        store.console_task_parked(&request_id),
    ) {
        Ok(all) => all,
        Err(e) => return unavailable(&e),
    };
    Json(serde_json::json!({
        "task": ConsoleTask::from(&task),
        "provider": {
            "name": task.provider,
            "jobId": task.provider_task_id,
            "submitAttemptId": task.submit_attempt_id,
            "submitAttemptedAt": task.submit_attempted_at,
        },
        "checks": {
            "count": task.checks_count,
            "lastAt": task.last_check_at,
            "nextAt": (!task.tracking_stopped).then_some(task.next_check_at).flatten(),
            "sequence": task.check_sequence,
            "trackingStopped": task.tracking_stopped,
        },
        "timeline": timeline(&task, &outbox, &webhooks, &parked),
        "outbox": outbox,
        "webhooks": webhooks,
        "parked": parked,
    }))
    .into_response()
}

pub(super) async fn instances(State(state): State<ConsoleState>, headers: HeaderMap) -> Response {
    if let Err(refused) = admin(&state.store, &headers).await {
        return refused;
    }
    match state.store.console_leases(&state.topology_prefix).await {
        Ok(map) => Json(serde_json::json!({
            "topologyPrefix": state.topology_prefix,
            "partitions": state.partitions,
            "instances": map.instances,
            "unowned": map.unowned,
        }))
        .into_response(),
        Err(e) => unavailable(&e),
    }
}

/// `GET /v1/admin/parked` query.
#[derive(Debug, Deserialize)]
pub(super) struct ParkedQuery {
    limit: Option<i64>,
    /// Also those already requeued.
    #[serde(default)]
    all: bool,
}

pub(super) async fn parked(
    State(state): State<ConsoleState>,
    headers: HeaderMap,
    Query(query): Query<ParkedQuery>,
) -> Response {
    if let Err(refused) = admin(&state.store, &headers).await {
        return refused;
    }
    match state
        .store
        .console_parked(limit(query.limit), query.all)
        .await
    {
        Ok(list) => Json(serde_json::json!({
            "parked": list.iter().map(parked_json).collect::<Vec<_>>(),
        }))
        .into_response(),
        Err(e) => unavailable(&e),
    }
}

/// A parked message with a short preview of its body (the body may be anything, of any size).
fn parked_json(p: &ParkedMessage) -> serde_json::Value {
    const PREVIEW: usize = 200;
    let text = String::from_utf8_lossy(&p.body);
    let mut preview: String = text.chars().take(PREVIEW).collect();
    if text.chars().count() > PREVIEW {
        preview.push('…');
    }
    let mut value = serde_json::to_value(p).unwrap_or_default();
    if let Some(map) = value.as_object_mut() {
        map.insert("bodyPreview".to_owned(), preview.into());
        map.insert("bodyBytes".to_owned(), p.body.len().into());
    }
    value
}

pub(super) async fn requeue(
    State(state): State<ConsoleState>,
    headers: HeaderMap,
    Path(id): Path<i64>,
) -> Response {
    let caller = match admin(&state.store, &headers).await {
        Ok(caller) => caller,
        Err(refused) => return refused,
    };
    let requeue = crate::parking::requeue(&state.store, &state.publisher, id);
    match tokio::time::timeout(REQUEUE_TIMEOUT, requeue).await {
        Ok(Ok(parked)) => {
            tracing::info!(key_id = %caller.key_id, parked_id = id, "console: requeued");
            Json(serde_json::json!({
                "requeued": id,
                "exchange": parked.original_exchange,
                "routingKey": parked.routing_key,
            }))
            .into_response()
        }
        Ok(Err(RequeueError::NotFound(_))) => error(StatusCode::NOT_FOUND, "not found"),
        Ok(Err(RequeueError::Store(e))) => unavailable(&e),
        Ok(Err(e @ RequeueError::Broker(_))) => {
            warn!(parked_id = id, error = %e, "console: requeue failed");
            error(StatusCode::BAD_GATEWAY, &e.to_string())
        }
        Err(_) => error(
            StatusCode::GATEWAY_TIMEOUT,
            "the broker did not confirm the publish in time: the message is still listed as \
             parked, but may have been published; check before requeuing it again",
        ),
    }
}

pub(super) async fn figures(State(state): State<ConsoleState>, headers: HeaderMap) -> Response {
    if let Err(refused) = admin(&state.store, &headers).await {
        return refused;
    }
    let text = super::MetricsText::parse(&crate::http::metrics_handle().render());
    let figures = match state.sampler.lock() {
        Ok(mut sampler) => sampler.figures(&text, std::time::Instant::now()),
        Err(poisoned) => poisoned
            .into_inner()
            .figures(&text, std::time::Instant::now()),
    };
    let waiting = match state.store.console_parked_waiting().await {
        Ok(n) => n,
        Err(e) => return unavailable(&e),
    };
    let mut value = serde_json::to_value(&figures).unwrap_or_default();
    if let Some(map) = value.as_object_mut() {
        map.insert("parkedWaiting".to_owned(), waiting.into());
    }
    Json(value).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task() -> Task {
        let t0 = DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let s = |n| t0 + chrono::Duration::seconds(n);
        Task {
            request_id: "r-1".into(),
            virtual_key_id: "vk-1".into(),
            model: "sora-2".into(),
            prompt: String::new(),
            duration_seconds: None,
            size: None,
            provider: "openai".into(),
            provider_task_id: Some("job-9".into()),
            callback_url: None,
            image_url: None,
            metadata: None,
            status: TaskStatus::Completed,
            progress: 100,
            progress_status: Some("in_progress".into()),
            message: None,
            video_url: None,
            video_url_expires_at: None,
            video_seconds: None,
            error: None,
            retryable: None,
            traceparent: None,
            created_at: s(0),
            updated_at: s(9),
            started_at: Some(s(2)),
            finished_at: Some(s(9)),
            check_sequence: 4,
            checks_count: 4,
            next_check_at: Some(s(10)),
            last_check_at: Some(s(8)),
            tracking_stopped: true,
            tombstone: false,
            submit_attempt_id: Some("a".into()),
            submit_attempted_at: Some(s(1)),
        }
    }

    #[test]
    fn a_finished_task_reads_in_time_order_without_a_next_check() {
        let t = task();
        let webhook = WebhookDelivery {
            id: 1,
            event_type: "VideoGenerationCompleted".into(),
            url: "https://example.test/hook".into(),
            attempts: 2,
            delivered_at: Some(t.finished_at.unwrap() + chrono::Duration::seconds(3)),
            last_error: None,
            next_attempt_at: t.created_at,
            give_up_at: t.created_at,
            created_at: t.finished_at.unwrap(),
        };
        let kinds: Vec<&str> = timeline(&t, &[], &[webhook], &[])
            .iter()
            .map(|e| e.kind)
            .collect();
        assert_eq!(
            kinds,
            ["received", "submit", "started", "check", "finished", "webhook"]
        );
        let entries = timeline(&t, &[], &[], &[]);
        assert!(entries[2].detail.contains("job-9"), "{entries:?}");
        assert!(
            entries[3].detail.contains("4 progress checks"),
            "{entries:?}"
        );
    }

    #[test]
    fn the_last_check_comes_before_the_end_it_saw_even_when_written_after_it() {
        let mut t = task();
        t.last_check_at = Some(t.finished_at.unwrap() + chrono::Duration::milliseconds(40));
        let kinds: Vec<&str> = timeline(&t, &[], &[], &[]).iter().map(|e| e.kind).collect();
        assert_eq!(
            kinds,
            ["received", "submit", "started", "check", "finished"]
        );
    }

    #[test]
    fn a_tracked_task_shows_when_its_next_check_is_due() {
        let mut t = task();
        t.status = TaskStatus::Processing;
        t.finished_at = None;
        t.tracking_stopped = false;
        let last = timeline(&t, &[], &[], &[]).pop().unwrap();
        assert_eq!(last.kind, "next-check");
        assert_eq!(Some(last.at), t.next_check_at);
    }

    #[test]
    fn limits_are_clamped() {
        assert_eq!(limit(None), DEFAULT_LIMIT);
        assert_eq!(limit(Some(0)), 1);
        assert_eq!(limit(Some(10_000)), MAX_LIMIT);
    }
}
