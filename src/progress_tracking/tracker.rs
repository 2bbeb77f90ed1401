//! The progress tracker: runs one check against the task row and the provider, then schedules
//! the next one (the order of the steps is the module's guarantee, see [`super`]).

use std::collections::HashMap;
use std::sync::Mutex as StdMutex;
use std::time::{Duration, Instant};

use chrono::Utc;
use tracing::{debug, info, warn, Instrument};

use crate::broker::{delivery_span, BrokerError, Handler, Incoming, Outcome, Publisher};
use crate::config::{SerializeBy, TrackingSettings, WebhookSettings};
use crate::crash::{crash_if, CrashPoint};
use crate::messages::{
    self, Meta, ProgressStatus, TaskOutcome, VideoGenerationProgress, VideoProgressCheckRequested,
    VideoProviderTaskFinished,
};
use crate::providers::{ProviderError, ProviderState, ProviderStatus, ProviderTask, Providers};
use crate::store::{CheckAdvance, Store, Task, TaskStatus};
use crate::topology::Topology;

use super::limiter::KeyedLimiter;
use super::outcome::CheckOutcome;
use super::policy::{next_interval, published_progress, schedule, PublishedProgress};

/// The tracker: a [`Handler`] for partition queues.
#[derive(Debug)]
pub struct ProgressTracker {
    store: Store,
    providers: Providers,
    topology: Topology,
    publisher: Publisher,
    settings: TrackingSettings,
    webhooks: WebhookSettings,
    per_key: KeyedLimiter,
    serial: KeyedLimiter,
    medians: StdMutex<HashMap<String, (Option<Duration>, Instant)>>,
    crash_at: Option<CrashPoint>,
}

impl ProgressTracker {
    /// A tracker that reads task rows from `store`, asks `providers` for status and publishes
    /// checks and progress through `publisher`.
    pub fn new(
        store: Store,
        providers: Providers,
        topology: Topology,
        publisher: Publisher,
        settings: TrackingSettings,
        webhooks: WebhookSettings,
    ) -> Self {
        Self {
            per_key: KeyedLimiter::new(settings.per_key_concurrency),
            serial: KeyedLimiter::new(1),
            store,
            providers,
            topology,
            publisher,
            settings,
            webhooks,
            medians: StdMutex::new(HashMap::new()),
            crash_at: CrashPoint::from_env(),
        }
    }

    async fn median(&self, model: &str) -> Option<Duration> {
        {
            let cache = self.medians.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((m, at)) = cache.get(model) {
                if at.elapsed() < Duration::from_secs(60) {
                    return *m;
                }
            }
        }
        let m = self.store.median_duration(model).await.ok().flatten();
        self.medians
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(model.to_owned(), (m, Instant::now()));
        m
    }

    /// Runs one check to its outcome (the caller acks afterwards).
    pub async fn check(
        &self,
        check: &VideoProgressCheckRequested,
        traceparent: Option<String>,
    ) -> CheckOutcome {
        let now = Utc::now();
        // A delay longer than the longest tier goes round again until it is due.
        let early_ms = (check.scheduled_at - now).num_milliseconds();
        if early_ms > 250 {
            let early = Duration::from_millis(early_ms as u64);
            return self.recirculate(check, early, traceparent).await;
        }
        let lag = (now - check.scheduled_at).num_milliseconds() as f64 / 1000.0;
        metrics::histogram!("video_progress_scheduling_lag_seconds").record(lag.max(0.0));

        let _key_permit = self.per_key.acquire(&check.virtual_key_id).await;
        let serial_key = match self.settings.serialize_by {
            SerializeBy::Request => &check.request_id,
            SerializeBy::VirtualKey => &check.virtual_key_id,
        };
        let _serial = self.serial.acquire(serial_key).await;

        let task = match self.store.get_for_check(&check.request_id).await {
            Ok(Some(t)) => t,
            Ok(None) => {
                metrics::counter!("video_progress_orphaned_checks_total").increment(1);
                debug!("orphaned check: no such task");
                return CheckOutcome::Orphaned;
            }
            Err(e) => {
                // The row is unknown, so it was not advanced: the next check keeps this sequence.
                warn!(error = %e, "database error during a check; scheduling the next one");
                self.schedule_next(check, check.sequence, None, &traceparent, None)
                    .await;
                return CheckOutcome::Error;
            }
        };
        if task.status != TaskStatus::Processing || task.tracking_stopped {
            debug!(status = task.status.as_str(), "tracking stopped");
            return CheckOutcome::Stopped;
        }
        if check.sequence < task.check_sequence {
            metrics::counter!("video_progress_stale_checks_total").increment(1);
            debug!(
                sequence = check.sequence,
                row = task.check_sequence,
                "stale or duplicate check dropped"
            );
            return CheckOutcome::Stale;
        }
        let started = task.started_at.unwrap_or(check.start_time);
        let elapsed = (now - started).to_std().unwrap_or_default();
        if elapsed > self.settings.max_duration() {
            let finished = self.finished_message(&task, TaskOutcome::TimedOut, None);
            return self.finish(check, &task, finished, &traceparent).await;
        }

        let Some(provider) = self.providers.get(&task.provider) else {
            warn!(provider = %task.provider, "task's provider is not configured on this instance");
            self.schedule_next(check, check.sequence + 1, None, &traceparent, Some(&task))
                .await;
            return CheckOutcome::Error;
        };
        let provider_task = ProviderTask {
            id: task.provider_task_id.clone().unwrap_or_default(),
        };
        let span = tracing::info_span!(
            "provider status",
            otel.kind = "client",
            provider = %task.provider
        );
        // The provider's side of the call continues this span.
        let call_trace =
            span.in_scope(|| crate::broker::onward_traceparent(traceparent.as_deref()));
        let status = provider
            .status(&provider_task, Some(&call_trace))
            .instrument(span)
            .await;
        let status = match status {
            Ok(s) => s,
            Err(e @ ProviderError::Throttled { .. }) => {
                debug!(error = %e, "status call over max_status_rps; rescheduled");
                self.schedule_next(
                    check,
                    check.sequence + 1,
                    e.retry_after(),
                    &traceparent,
                    Some(&task),
                )
                .await;
                return CheckOutcome::Throttled;
            }
            Err(e) => {
                warn!(error = %e, transient = e.is_transient(), "provider status failed; the chain goes on");
                self.schedule_next(
                    check,
                    check.sequence + 1,
                    e.retry_after(),
                    &traceparent,
                    Some(&task),
                )
                .await;
                return CheckOutcome::Error;
            }
        };
        if status.state.is_terminal() {
            let result = match status.state {
                ProviderState::Succeeded => TaskOutcome::Succeeded,
                ProviderState::Cancelled => TaskOutcome::Cancelled,
                _ => TaskOutcome::Failed,
            };
            let finished = self.finished_message(&task, result, Some(&status));
            return self.finish(check, &task, finished, &traceparent).await;
        }
        self.progress(check, &task, &status, elapsed, &traceparent)
            .await
    }

    /// Time left before `tracking.max_duration_ms` since the task started.
    fn until_deadline(&self, elapsed: Duration) -> Duration {
        self.settings.max_duration().saturating_sub(elapsed)
    }

    /// Sends a check that arrived `early` round again, into the tier that brings it back closest
    /// to its due time without being late.
    async fn recirculate(
        &self,
        check: &VideoProgressCheckRequested,
        early: Duration,
        traceparent: Option<String>,
    ) -> CheckOutcome {
        let s = schedule(&self.topology, early, None);
        let envelope = self
            .topology
            .delayed_check(s.tier_ms, &check.resent())
            .with_traceparent(traceparent);
        if let Err(e) = self.publisher.publish(&envelope).await {
            warn!(error = %e, "could not send an early check round again; the sweeper will re-arm");
        }
        CheckOutcome::Recirculated
    }

    fn finished_message(
        &self,
        task: &Task,
        outcome: TaskOutcome,
        status: Option<&ProviderStatus>,
    ) -> VideoProviderTaskFinished {
        VideoProviderTaskFinished {
            meta: Meta::new(),
            request_id: task.request_id.clone(),
            virtual_key_id: task.virtual_key_id.clone(),
            outcome,
            provider_task_id: task.provider_task_id.clone(),
            video_url: status.and_then(|s| s.video_url.clone()),
            video_url_expires_at: status.and_then(|s| s.video_url_expires_at),
            video_seconds: status.and_then(|s| s.video_seconds),
            error: match outcome {
                TaskOutcome::TimedOut => Some("timed out".to_owned()),
                _ => status.and_then(|s| s.error.clone()),
            },
        }
    }

    async fn finish(
        &self,
        check: &VideoProgressCheckRequested,
        task: &Task,
        finished: VideoProviderTaskFinished,
        traceparent: &Option<String>,
    ) -> CheckOutcome {
        let envelope = self
            .topology
            .event(&finished)
            .with_traceparent(traceparent.clone());
        if let Err(e) = self.publisher.publish(&envelope).await {
            // Not published: leave the row as it is so the sweeper re-arms the chain.
            warn!(error = %e, "could not publish the provider outcome; the sweeper will re-arm");
            return CheckOutcome::Error;
        }
        let advance = CheckAdvance {
            sequence: check.sequence,
            next_check_at: None,
            progress: None,
            progress_status: None,
        };
        if let Err(e) = self.store.advance_check(&task.request_id, &advance).await {
            // The outcome is out; the generation orchestrator stops tracking with it.
            debug!(error = %e, "could not record the last check");
        }
        info!(outcome = ?finished.outcome, "provider finished; tracking ends");
        CheckOutcome::Finished
    }

    async fn progress(
        &self,
        check: &VideoProgressCheckRequested,
        task: &Task,
        status: &ProviderStatus,
        elapsed: Duration,
        traceparent: &Option<String>,
    ) -> CheckOutcome {
        let median = if status.progress.is_none() {
            self.median(&task.model).await
        } else {
            None
        };
        let PublishedProgress {
            percent: progress,
            predicted_total,
        } = published_progress(task.progress, status.progress, elapsed, median);
        let progress_status = match status.state {
            ProviderState::Queued => ProgressStatus::Queued,
            _ => ProgressStatus::InProgress,
        };
        let changed = i16::from(progress) > task.progress
            || task.progress_status.as_deref() != Some(progress_status.as_str());
        let started = task.started_at.unwrap_or(check.start_time);
        let event = changed.then(|| VideoGenerationProgress {
            meta: Meta::new(),
            request_id: task.request_id.clone(),
            virtual_key_id: task.virtual_key_id.clone(),
            progress,
            status: progress_status,
            message: None,
            estimated_completion_at: predicted_total
                .and_then(|t| chrono::Duration::from_std(t).ok())
                .map(|t| started + t),
        });

        let interval = next_interval(
            &self.settings,
            check.interval_index + 1,
            elapsed,
            predicted_total,
        );
        // The provider's floor (Runway: 5 s) holds whatever the policy wanted.
        let floor = self.providers.min_status_interval(&task.provider);
        let s = schedule(&self.topology, interval, floor)
            .within(&self.topology, self.until_deadline(elapsed));
        let next = check.next(check.sequence + 1, s.due_at());
        let next_envelope = self
            .topology
            .delayed_check(s.tier_ms, &next)
            .with_traceparent(traceparent.clone());
        // Both publishes in flight at once; each waits for its own confirm.
        let progress_publish = async {
            match &event {
                Some(e) => {
                    self.publisher
                        .publish(&self.topology.event(e).with_traceparent(traceparent.clone()))
                        .await
                }
                None => Ok::<(), BrokerError>(()),
            }
        };
        let (next_result, progress_result) =
            tokio::join!(self.publisher.publish(&next_envelope), progress_publish);
        if let Err(e) = &progress_result {
            warn!(error = %e, "progress event not published");
        }
        if let Err(e) = next_result {
            warn!(error = %e, "next check not published; the sweeper will re-arm");
            return CheckOutcome::Error;
        }
        crash_if(self.crash_at, CrashPoint::AfterPublish);
        if changed && self.webhooks.include_progress {
            if let (Some(url), Some(e)) = (&task.callback_url, &event) {
                self.enqueue_progress_webhook(task, url, e).await;
            }
        }
        let advance = CheckAdvance {
            sequence: check.sequence,
            next_check_at: Some(next.scheduled_at),
            progress: event.as_ref().map(|_| i16::from(progress)),
            progress_status: event.as_ref().map(|_| progress_status.as_str().to_owned()),
        };
        let advanced = self.store.advance_check(&task.request_id, &advance).await;
        crash_if(self.crash_at, CrashPoint::AfterAdvance);
        match advanced {
            Ok(true) => {}
            Ok(false) => debug!("another check advanced the chain first; ours is a duplicate"),
            Err(e) => {
                // The next check is out and carries a sequence at or above the row's: the chain
                // goes on even though this write is lost.
                warn!(error = %e, "could not advance the check sequence");
                return CheckOutcome::Error;
            }
        }
        if changed {
            CheckOutcome::Progressed
        } else {
            CheckOutcome::Unchanged
        }
    }

    async fn enqueue_progress_webhook(
        &self,
        task: &Task,
        url: &str,
        event: &VideoGenerationProgress,
    ) {
        let envelope = self.topology.event(event);
        let result = async {
            let mut tx = self.store.begin().await?;
            crate::webhooks::enqueue(&mut tx, &task.request_id, url, &envelope, &self.webhooks)
                .await?;
            tx.commit().await
        }
        .await;
        if let Err(e) = result {
            debug!(error = %e, "progress webhook not recorded");
        }
    }

    /// Schedules the next check after a failed one, advancing the row when we can.
    async fn schedule_next(
        &self,
        check: &VideoProgressCheckRequested,
        sequence: i64,
        retry_after: Option<Duration>,
        traceparent: &Option<String>,
        task: Option<&Task>,
    ) {
        let elapsed = (Utc::now() - check.start_time).to_std().unwrap_or_default();
        let interval = next_interval(&self.settings, check.interval_index + 1, elapsed, None);
        // A provider's Retry-After (capped by its max_retry_after_ms) never pushes the next
        // check past the deadline, where that check times the task out.
        let floor = task.and_then(|t| self.providers.min_status_interval(&t.provider));
        let at_least = match (retry_after, floor) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        let s = schedule(&self.topology, interval, at_least)
            .within(&self.topology, self.until_deadline(elapsed));
        let next = check.next(sequence, s.due_at());
        let envelope = self
            .topology
            .delayed_check(s.tier_ms, &next)
            .with_traceparent(traceparent.clone());
        if let Err(e) = self.publisher.publish(&envelope).await {
            warn!(error = %e, "next check not published; the sweeper will re-arm");
            return;
        }
        if let Some(task) = task {
            let advance = CheckAdvance {
                sequence: check.sequence,
                next_check_at: Some(next.scheduled_at),
                progress: None,
                progress_status: None,
            };
            if let Err(e) = self.store.advance_check(&task.request_id, &advance).await {
                debug!(error = %e, "could not advance after a failed check");
            }
        }
    }
}

impl Handler for ProgressTracker {
    async fn handle(&self, incoming: Incoming) -> Outcome {
        let span = delivery_span(&incoming);
        span.record("otel.name", "progress check");
        crate::broker::continue_trace(&span, incoming.traceparent.as_deref());
        async {
            let check: VideoProgressCheckRequested = match messages::decode(&incoming.body) {
                Ok(c) => c,
                Err(e) => {
                    metrics::counter!("video_poison_messages_total", "queue" => "progress")
                        .increment(1);
                    return Outcome::Park(e.to_string());
                }
            };
            let span = tracing::Span::current();
            span.record("request_id", check.request_id.as_str());
            span.record("virtual_key", check.virtual_key_id.as_str());
            crash_if(self.crash_at, CrashPoint::Received);
            let traceparent = crate::broker::onward_traceparent(incoming.traceparent.as_deref());
            self.check(&check, Some(traceparent)).await.record();
            Outcome::Ack
        }
        .instrument(span)
        .await
    }
}
