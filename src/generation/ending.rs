//! How tasks end: cancels, provider outcomes, timeouts and failures, all through one sequence,
//! [`GenerationOrchestrator::end_task`]: compare-and-set transition → terminal event →
//! `VideoProgressTrackingCancelled` → webhook → commit → wake the relay.

use chrono::Utc;
use tracing::{debug, info, warn, Instrument};

use super::{GenerationOrchestrator, HandleError, RejectReason, Rejection};
use crate::messages::{
    self, Envelope, Message, Meta, TaskOutcome, VideoGenerationCancelRequested,
    VideoGenerationCancelled, VideoGenerationCompleted, VideoGenerationFailed,
    VideoProgressTrackingCancelled, VideoProviderTaskFinished,
};
use crate::providers::{CancelOutcome, ProviderTask};
use crate::store::{Inserted, Task, TaskStatus, TransitionPatch, UnitOfWork};
use crate::webhooks;

/// A lifecycle ending: which transition, and why tracking stops.
pub(super) struct Ending<'a> {
    request_id: &'a str,
    /// The statuses the task may be in; in any other the ending does not happen.
    from: &'a [TaskStatus],
    to: TaskStatus,
    patch: TransitionPatch,
    /// `VideoProgressTrackingCancelled.reason`; for failures also the error.
    reason: &'a str,
}

impl<'a> Ending<'a> {
    pub(super) fn failure(
        request_id: &'a str,
        from: &'a [TaskStatus],
        error: &'a str,
        retryable: bool,
    ) -> Self {
        Self {
            request_id,
            from,
            to: TaskStatus::Failed,
            patch: TransitionPatch {
                error: Some(error.to_owned()),
                retryable: Some(retryable),
                ..TransitionPatch::default()
            },
            reason: error,
        }
    }

    fn timeout(request_id: &'a str) -> Self {
        Self {
            to: TaskStatus::TimedOut,
            ..Self::failure(request_id, &[TaskStatus::Processing], "timed out", true)
        }
    }

    fn cancellation(request_id: &'a str, from: &'a [TaskStatus], reason: &'a str) -> Self {
        Self {
            request_id,
            from,
            to: TaskStatus::Cancelled,
            patch: TransitionPatch {
                message: Some(reason.to_owned()),
                ..TransitionPatch::default()
            },
            reason,
        }
    }
}

impl GenerationOrchestrator {
    pub(super) async fn on_cancel(
        &self,
        c: VideoGenerationCancelRequested,
        traceparent: Option<String>,
    ) -> Result<(), HandleError> {
        let reason = c
            .reason
            .clone()
            .unwrap_or_else(|| "cancelled by request".to_owned());
        let Some(task) = self.store.get(&c.request_id).await? else {
            // Leave a tombstone so a request arriving later is refused.
            let mut uow = self.store.begin().await?;
            let inserted = uow
                .insert_tombstone(&c.request_id, &c.virtual_key_id, traceparent.as_deref())
                .await?;
            uow.commit().await?;
            if inserted == Inserted::New {
                info!("cancel for an unknown request: tombstone left");
                return Ok(());
            }
            // It appeared meanwhile: handle the cancel against it.
            return Box::pin(self.on_cancel(c, traceparent)).await;
        };
        if task.virtual_key_id != c.virtual_key_id {
            warn!(owner = %task.virtual_key_id, "cancel refused: virtual key does not own the task");
            let rejection = Rejection {
                command: VideoGenerationCancelRequested::NAME,
                label: RejectReason::VirtualKeyMismatch,
                request_id: &c.request_id,
                virtual_key_id: &c.virtual_key_id,
                reason: "the virtual key does not own this task",
            };
            return self.reject(rejection, &traceparent).await;
        }
        if task.status.is_terminal() {
            info!(
                status = task.status.as_str(),
                "cancel of a finished task: nothing to do"
            );
            return Ok(());
        }
        self.cancel_at_provider(&task).await;
        let from = [TaskStatus::Pending, TaskStatus::Processing];
        let ending = Ending::cancellation(&task.request_id, &from, &reason);
        if self.cancel(ending, &traceparent).await?.is_none() {
            info!("task finished before the cancel took effect");
            return Ok(());
        }
        info!("task cancelled");
        Ok(())
    }

    pub(super) async fn on_finished(
        &self,
        f: VideoProviderTaskFinished,
        traceparent: Option<String>,
    ) -> Result<(), HandleError> {
        let Some(task) = self.store.get(&f.request_id).await? else {
            warn!("provider outcome for an unknown task ignored");
            return Ok(());
        };
        // Only the tracker sends outcomes, and it copies both fields from the row. Anything else
        // is a forgery or a bug: park it for an operator instead of ending the task.
        let mismatch = if task.virtual_key_id != f.virtual_key_id {
            Some((
                RejectReason::VirtualKeyMismatch,
                "the virtual key does not own this task",
            ))
        } else if f
            .provider_task_id
            .as_deref()
            .is_some_and(|id| task.provider_task_id.as_deref() != Some(id))
        {
            Some((
                RejectReason::ProviderTaskMismatch,
                "the provider task id is not the task's",
            ))
        } else {
            None
        };
        if let Some((reason, text)) = mismatch {
            warn!(
                owner = %task.virtual_key_id,
                provider_task_id = ?f.provider_task_id,
                "provider outcome refused: {text}"
            );
            super::count_rejected(VideoProviderTaskFinished::NAME, reason);
            return Err(HandleError::Refused(format!(
                "provider outcome refused: {text}"
            )));
        }
        if task.status != TaskStatus::Processing {
            debug!(
                status = task.status.as_str(),
                "provider outcome for a task no longer processing: duplicate"
            );
            return Ok(());
        }
        let processing = [TaskStatus::Processing];
        match f.outcome {
            TaskOutcome::Succeeded => self.complete(&task, &f, &traceparent).await,
            TaskOutcome::Failed => {
                let error = f.error.as_deref().unwrap_or("provider reported failure");
                let ending = Ending::failure(&task.request_id, &processing, error, false);
                self.fail(ending, &traceparent).await
            }
            TaskOutcome::TimedOut => {
                self.cancel_at_provider(&task).await;
                self.fail(Ending::timeout(&task.request_id), &traceparent)
                    .await
            }
            TaskOutcome::Cancelled => {
                let reason = "cancelled at the provider";
                let ending = Ending::cancellation(&task.request_id, &processing, reason);
                self.cancel(ending, &traceparent).await?;
                Ok(())
            }
        }
    }

    async fn complete(
        &self,
        task: &Task,
        f: &VideoProviderTaskFinished,
        traceparent: &Option<String>,
    ) -> Result<(), HandleError> {
        let processing = [TaskStatus::Processing];
        let Some(url) = f.video_url.clone() else {
            let error = "provider reported success without a video URL";
            let ending = Ending::failure(&task.request_id, &processing, error, true);
            return self.fail(ending, traceparent).await;
        };
        let ending = Ending {
            request_id: &task.request_id,
            from: &processing,
            to: TaskStatus::Completed,
            patch: TransitionPatch {
                progress: Some(100),
                video_url: Some(url.clone()),
                video_url_expires_at: f.video_url_expires_at,
                video_seconds: f.video_seconds,
                ..TransitionPatch::default()
            },
            reason: "completed",
        };
        let mut duration_ms = 0;
        let completed = |row: &Task| {
            let completed_at = row.finished_at.unwrap_or_else(Utc::now);
            duration_ms = row
                .started_at
                .map(|s| (completed_at - s).num_milliseconds().max(0) as u64)
                .unwrap_or(0);
            self.topology.event(&VideoGenerationCompleted {
                meta: Meta::new(),
                request_id: row.request_id.clone(),
                virtual_key_id: row.virtual_key_id.clone(),
                video_url: url,
                video_url_expires_at: f.video_url_expires_at,
                video_seconds: f.video_seconds,
                duration_ms,
                completed_at,
            })
        };
        if self
            .end_task(ending, completed, traceparent)
            .await?
            .is_some()
        {
            metrics::histogram!("video_generation_duration_seconds")
                .record(duration_ms as f64 / 1000.0);
            info!(duration_ms, "generation completed");
        }
        Ok(())
    }

    /// Best-effort cancel of the task's provider job: tracking stops whatever the provider says.
    async fn cancel_at_provider(&self, task: &Task) {
        let (Some(provider), Some(id)) = (
            self.providers.get(&task.provider),
            task.provider_task_id.clone(),
        ) else {
            return;
        };
        match provider.cancel(&ProviderTask { id }).await {
            Ok(CancelOutcome::Cancelled) => debug!("provider job cancelled"),
            Ok(CancelOutcome::Unsupported) => {
                info!("provider cannot cancel; tracking stops, the job may run on")
            }
            Err(e) => warn!(error = %e, "provider cancel failed; tracking stops anyway"),
        }
    }

    /// Ends the task as cancelled with `VideoGenerationCancelled`; `None` when it was no longer
    /// in the ending's `from`.
    async fn cancel(
        &self,
        ending: Ending<'_>,
        traceparent: &Option<String>,
    ) -> Result<Option<Task>, HandleError> {
        let reason = ending.reason;
        let cancelled = |row: &Task| {
            self.topology.event(&VideoGenerationCancelled {
                meta: Meta::new(),
                request_id: row.request_id.clone(),
                virtual_key_id: row.virtual_key_id.clone(),
                reason: reason.to_owned(),
                cancelled_at: messages::now(),
            })
        };
        self.end_task(ending, cancelled, traceparent).await
    }

    /// Ends the task as failed (or timed out) with `VideoGenerationFailed`, if it is still in
    /// the ending's `from`.
    pub(super) async fn fail(
        &self,
        ending: Ending<'_>,
        traceparent: &Option<String>,
    ) -> Result<(), HandleError> {
        let error = ending.reason;
        let retryable = ending.patch.retryable.unwrap_or(false);
        let to = ending.to;
        let failed = |row: &Task| {
            self.topology.event(&VideoGenerationFailed {
                meta: Meta::new(),
                request_id: row.request_id.clone(),
                virtual_key_id: row.virtual_key_id.clone(),
                error: error.to_owned(),
                retryable,
                failed_at: row.finished_at.unwrap_or_else(Utc::now),
            })
        };
        if self.end_task(ending, failed, traceparent).await?.is_some() {
            info!(status = to.as_str(), %error, retryable, "generation failed");
        }
        Ok(())
    }

    /// The one sequence every ending goes through, in one unit of work. Returns the ended row,
    /// or `None` when the task was not in `from` (someone else ended or moved it first).
    async fn end_task(
        &self,
        ending: Ending<'_>,
        terminal: impl FnOnce(&Task) -> Envelope,
        traceparent: &Option<String>,
    ) -> Result<Option<Task>, HandleError> {
        let span = tracing::info_span!("task terminal", status = ending.to.as_str());
        self.end_task_in_span(ending, terminal, traceparent)
            .instrument(span)
            .await
    }

    async fn end_task_in_span(
        &self,
        ending: Ending<'_>,
        terminal: impl FnOnce(&Task) -> Envelope,
        traceparent: &Option<String>,
    ) -> Result<Option<Task>, HandleError> {
        let mut uow = self.store.begin().await?;
        let Some(row) = uow
            .transition(ending.request_id, ending.from, ending.to, &ending.patch)
            .await?
        else {
            uow.rollback().await?;
            return Ok(None);
        };
        let event = terminal(&row);
        self.enqueue_terminal(&mut uow, &row, &event, ending.reason, traceparent)
            .await?;
        self.commit(uow).await?;
        metrics::counter!("video_generation_terminal_total", "status" => ending.to.as_str())
            .increment(1);
        Ok(Some(row))
    }

    /// The terminal event, `VideoProgressTrackingCancelled` after it, and the webhook, in the
    /// unit that ended the task (whose transition also set `tracking_stopped`).
    pub(super) async fn enqueue_terminal(
        &self,
        uow: &mut UnitOfWork,
        task: &Task,
        terminal: &Envelope,
        reason: &str,
        traceparent: &Option<String>,
    ) -> Result<(), HandleError> {
        self.enqueue(uow, terminal, traceparent).await?;
        let stop = VideoProgressTrackingCancelled {
            meta: Meta::new(),
            request_id: task.request_id.clone(),
            virtual_key_id: task.virtual_key_id.clone(),
            reason: reason.to_owned(),
        };
        self.enqueue(uow, &self.topology.event(&stop), traceparent)
            .await?;
        if let Some(url) = &task.callback_url {
            webhooks::enqueue(uow, &task.request_id, url, terminal, &self.webhooks).await?;
        }
        if let Some(started) = task.started_at {
            let tracked = (Utc::now() - started).num_milliseconds().max(0) as f64 / 1000.0;
            metrics::histogram!("video_progress_tracking_duration_seconds").record(tracked);
        }
        Ok(())
    }
}
