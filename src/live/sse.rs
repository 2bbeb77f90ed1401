//! The two endpoints: `GET /v1/tasks/{requestId}/events` and `GET /v1/events`.
//!
//! Each subscribes to the hub *before* it reads the store, so a change committed after the read
//! is in the subscription's buffer; what the read already covers is filtered out by rank.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use futures::Stream;
use tracing::{debug, warn};

use super::hub::{Filter, HubMessage, Next, Subscription};
use super::{Live, LiveEvent, RESUME_LIMIT, RESUME_OVERLAP, TERMINAL_RANK};
use crate::http::{caller, error};
use crate::store::Task;

/// How long a new stream waits for the hub's consumer before it reads the store anyway (the
/// consumer's opening is then caught up with by a resync).
const READY_WAIT: Duration = Duration::from_secs(3);

/// `GET /v1/tasks/{requestId}/events`: the task's current state, then its events as they
/// happen; closes after the terminal one. `Last-Event-ID` (a rank) resumes.
pub async fn task_events(
    State(live): State<Live>,
    Path(request_id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let caller = match caller(&live.store, &headers).await {
        Ok(caller) => caller,
        Err(response) => return response,
    };
    let last_id = match last_event_id::<u32>(&headers) {
        Ok(id) => id,
        Err(bad) => return bad.into_response(),
    };
    let virtual_key_id = match live.store.get(&request_id).await {
        Ok(Some(t)) if caller.may_read(&t.virtual_key_id) => t.virtual_key_id,
        Ok(_) => return error(StatusCode::NOT_FOUND, "not found"),
        Err(e) => return unavailable(&e),
    };
    let mut subscription = live.hub.subscribe(Filter::Task(request_id.clone()));
    let synced_epoch = subscription.ready(READY_WAIT).await;
    let first = match live.store.get(&request_id).await {
        Ok(Some(t)) => t,
        Ok(None) => return error(StatusCode::NOT_FOUND, "not found"),
        Err(e) => return unavailable(&e),
    };
    debug!(request_id = %request_id, virtual_key_id = %virtual_key_id, last_id, "task event stream opened");
    let mut reread =
        tokio::time::interval_at(tokio::time::Instant::now() + live.heartbeat, live.heartbeat);
    reread.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let stream = TaskStream {
        first: Some(first),
        request_id,
        virtual_key_id,
        subscription,
        synced_epoch,
        last_rank: last_id,
        reread,
        done: false,
        live: live.clone(),
    };
    let stream = futures::stream::unfold(stream, |mut s| async move {
        let event = s.next().await?;
        Some((Ok::<_, Infallible>(event), s))
    });
    sse(live.heartbeat, stream)
}

/// `GET /v1/events`: the caller's tenant's events (an admin's: every tenant's) as they happen.
/// `Last-Event-ID` (a time in milliseconds) resumes with the tasks changed since.
pub async fn all_events(State(live): State<Live>, headers: HeaderMap) -> Response {
    let caller = match caller(&live.store, &headers).await {
        Ok(caller) => caller,
        Err(response) => return response,
    };
    let last_id = match last_event_id::<i64>(&headers) {
        Ok(id) => id,
        Err(bad) => return bad.into_response(),
    };
    let tenant = (!caller.admin).then(|| caller.virtual_key_id.clone());
    let filter = match &tenant {
        Some(vk) => Filter::Tenant(vk.clone()),
        None => Filter::All,
    };
    let opened_at = Utc::now();
    let mut subscription = live.hub.subscribe(filter);
    let synced_epoch = subscription.ready(READY_WAIT).await;
    let mut stream = AllStream {
        tenant,
        subscription,
        synced_epoch,
        opened_at,
        last_ms: last_id.unwrap_or(0),
        backlog: VecDeque::new(),
        resumed: HashMap::new(),
        done: false,
        live: live.clone(),
    };
    if let Some(ms) = last_id {
        let since = DateTime::from_timestamp_millis(ms).unwrap_or(opened_at);
        if let Err(e) = stream.load_since(since).await {
            return unavailable(&e);
        }
    }
    debug!(key_id = %caller.key_id, admin = caller.admin, last_id, "event stream opened");
    let stream = futures::stream::unfold(stream, |mut s| async move {
        let event = s.next().await?;
        Some((Ok::<_, Infallible>(event), s))
    });
    sse(live.heartbeat, stream)
}

/// `Last-Event-ID` as this stream's id type; `Err` (answered with `400`) when it is not one.
fn last_event_id<T: std::str::FromStr>(headers: &HeaderMap) -> Result<Option<T>, BadLastEventId> {
    let Some(value) = headers.get("last-event-id") else {
        return Ok(None);
    };
    match value.to_str().map(str::trim) {
        Ok("") => Ok(None),
        Ok(s) => s.parse().map(Some).map_err(|_| BadLastEventId),
        Err(_) => Err(BadLastEventId),
    }
}

/// A `Last-Event-ID` that is not an id of the stream asked for.
#[derive(Debug)]
struct BadLastEventId;

impl IntoResponse for BadLastEventId {
    fn into_response(self) -> Response {
        error(
            StatusCode::BAD_REQUEST,
            "Last-Event-ID is not an id of this stream",
        )
    }
}

fn unavailable(e: &crate::store::StoreError) -> Response {
    warn!(error = %e, "task lookup failed");
    error(StatusCode::SERVICE_UNAVAILABLE, "database unavailable")
}

/// The response: `text/event-stream` with heartbeat comments.
fn sse<S>(heartbeat: Duration, stream: S) -> Response
where
    S: Stream<Item = Result<Event, Infallible>> + Send + 'static,
{
    let mut response = Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(heartbeat).text("keep-alive"))
        .into_response();
    // nginx buffers responses unless told not to.
    response
        .headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

fn event(e: &LiveEvent, id: String) -> Event {
    Event::default()
        .event(e.kind.as_str())
        .id(id)
        .data(e.data.as_ref())
}

fn dropped(buffer: usize) -> Event {
    let data = serde_json::json!({
        "reason": format!("the client fell behind: more than {buffer} events were waiting for it"),
        "buffer": buffer,
    });
    Event::default().event("dropped").data(data.to_string())
}

struct TaskStream {
    live: Live,
    request_id: String,
    virtual_key_id: String,
    subscription: Subscription,
    /// The row read when the stream opened, sent first.
    first: Option<Task>,
    /// The consumer the stream has caught up with.
    synced_epoch: Option<u64>,
    /// The last rank sent (or `Last-Event-ID`).
    last_rank: Option<u32>,
    reread: tokio::time::Interval,
    done: bool,
}

impl TaskStream {
    /// `e` if it is newer than what was sent; the stream ends after a terminal one.
    fn offer(&mut self, e: &LiveEvent) -> Option<Event> {
        if e.virtual_key_id != self.virtual_key_id || self.last_rank.is_some_and(|r| e.rank <= r) {
            return None;
        }
        self.last_rank = Some(e.rank);
        self.done = e.kind.is_terminal();
        Some(event(e, e.rank.to_string()))
    }

    async fn reread(&mut self) -> Option<Event> {
        match self.live.store.get(&self.request_id).await {
            Ok(Some(task)) => self.offer(&LiveEvent::from_task(&task)),
            Ok(None) => None,
            Err(e) => {
                debug!(request_id = %self.request_id, error = %e, "task not re-read");
                None
            }
        }
    }

    async fn next(&mut self) -> Option<Event> {
        if let Some(task) = self.first.take() {
            if let Some(e) = self.offer(&LiveEvent::from_task(&task)) {
                return Some(e);
            }
        }
        loop {
            if self.done || self.last_rank.is_some_and(|r| r >= TERMINAL_RANK) {
                return None;
            }
            tokio::select! {
                biased;
                _ = self.live.stop.cancelled() => return None,
                next = self.subscription.recv() => match next {
                    Next::Message(HubMessage::Event(e)) => {
                        if let Some(e) = self.offer(&e) {
                            return Some(e);
                        }
                    }
                    Next::Message(HubMessage::Resync { epoch, .. }) => {
                        if self.synced_epoch != Some(epoch) {
                            self.synced_epoch = Some(epoch);
                            if let Some(e) = self.reread().await {
                                return Some(e);
                            }
                        }
                    }
                    Next::Dropped => {
                        self.done = true;
                        return Some(dropped(self.live.hub.buffer()));
                    }
                    Next::Closed => return None,
                },
                _ = self.reread.tick() => {
                    if let Some(e) = self.reread().await {
                        return Some(e);
                    }
                }
            }
        }
    }
}

struct AllStream {
    live: Live,
    /// `None` for an admin: every tenant.
    tenant: Option<String>,
    subscription: Subscription,
    synced_epoch: Option<u64>,
    opened_at: DateTime<Utc>,
    /// The last id sent (or `Last-Event-ID`): ids never go back.
    last_ms: i64,
    /// States read from the store, to send before live events.
    backlog: VecDeque<Task>,
    /// The rank sent from the store for a task, until a live event passes it: an older event
    /// still in the buffer is not sent after a newer state.
    resumed: HashMap<String, u32>,
    done: bool,
}

impl AllStream {
    /// Queues the state of every task of the caller's changed since `since` minus the overlap.
    async fn load_since(&mut self, since: DateTime<Utc>) -> Result<(), crate::store::StoreError> {
        let overlap = chrono::Duration::from_std(RESUME_OVERLAP).unwrap_or_default();
        let from = since.checked_sub_signed(overlap).unwrap_or(since);
        let tasks = self
            .live
            .store
            .tasks_changed_since(self.tenant.as_deref(), from, RESUME_LIMIT)
            .await?;
        self.resumed.clear();
        self.backlog = tasks.into();
        Ok(())
    }

    fn id(&mut self, at: DateTime<Utc>) -> String {
        self.last_ms = self.last_ms.max(at.timestamp_millis());
        self.last_ms.to_string()
    }

    async fn next(&mut self) -> Option<Event> {
        loop {
            if self.done {
                return None;
            }
            if let Some(task) = self.backlog.pop_front() {
                let e = LiveEvent::from_task(&task);
                self.resumed.insert(e.request_id.clone(), e.rank);
                let id = self.id(e.received_at);
                return Some(event(&e, id));
            }
            tokio::select! {
                biased;
                _ = self.live.stop.cancelled() => return None,
                next = self.subscription.recv() => match next {
                    Next::Message(HubMessage::Event(e)) => {
                        if let Some(rank) = self.resumed.get(&e.request_id) {
                            if e.rank <= *rank {
                                continue;
                            }
                            self.resumed.remove(&e.request_id);
                        }
                        let id = self.id(e.received_at);
                        return Some(event(&e, id));
                    }
                    Next::Message(HubMessage::Resync { epoch, gap_start }) => {
                        if self.synced_epoch == Some(epoch) {
                            continue;
                        }
                        self.synced_epoch = Some(epoch);
                        let since = gap_start.max(self.opened_at);
                        if let Err(e) = self.load_since(since).await {
                            warn!(error = %e, "event stream not caught up after the hub reconnected");
                        }
                    }
                    Next::Dropped => {
                        self.done = true;
                        return Some(dropped(self.live.hub.buffer()));
                    }
                    Next::Closed => return None,
                },
            }
        }
    }
}
