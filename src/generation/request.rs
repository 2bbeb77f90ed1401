//! `VideoGenerationRequested`: the task row, the submit (once: a job is money), then
//! `VideoGenerationStarted` and the first progress check, or a refusal.

use tracing::{info, warn};

use super::{GenerationOrchestrator, HandleError, RejectReason, Rejection};
use crate::messages::{
    self, Message, Meta, VideoGenerationFailed, VideoGenerationRequested, VideoGenerationStarted,
    VideoProgressCheckRequested,
};
use crate::providers::{ProviderTask, VideoProvider};
use crate::store::{Inserted, NewTask, TaskStatus, TransitionPatch};

impl GenerationOrchestrator {
    pub(super) async fn on_requested(
        &self,
        r: VideoGenerationRequested,
        traceparent: Option<String>,
        redelivered: bool,
    ) -> Result<(), HandleError> {
        let new_task = NewTask {
            request_id: r.request_id.clone(),
            virtual_key_id: r.virtual_key_id.clone(),
            model: r.model.clone(),
            prompt: r.prompt.clone(),
            duration_seconds: r.duration_seconds.and_then(|d| i32::try_from(d).ok()),
            size: r.size.clone(),
            provider: String::new(),
            callback_url: r.callback_url.clone(),
            image_url: r.image_url.clone(),
            metadata: r.metadata.clone(),
            traceparent: traceparent.clone(),
        };
        let provider = match self.validate(&r) {
            Ok(p) => p,
            Err(reason) => {
                // A refused callback URL must not receive the refusal either, and refused
                // metadata is not stored.
                let new_task = NewTask {
                    callback_url: None,
                    image_url: None,
                    metadata: None,
                    ..new_task
                };
                return self.reject_invalid(new_task, &reason, traceparent).await;
            }
        };
        let mut uow = self.store.begin().await?;
        let new_task = NewTask {
            provider: provider.name().to_owned(),
            ..new_task
        };
        let mut prior = None;
        match uow.insert_task(&new_task, TaskStatus::Pending).await? {
            Inserted::New => uow.commit().await?,
            Inserted::Exists(task) if task.virtual_key_id != r.virtual_key_id => {
                if !task.tombstone {
                    uow.rollback().await?;
                    warn!(owner = %task.virtual_key_id, "request refused: the request id is another tenant's");
                    let rejection = Rejection {
                        command: VideoGenerationRequested::NAME,
                        label: RejectReason::RequestIdTaken,
                        request_id: &r.request_id,
                        virtual_key_id: &r.virtual_key_id,
                        reason: "request_id_taken",
                    };
                    return self.reject(rejection, &traceparent).await;
                }
                // Another tenant's early cancel must not block this tenant's request.
                if uow.take_over_tombstone(&new_task).await?.is_none() {
                    uow.rollback().await?;
                    return Box::pin(self.on_requested(r, traceparent, redelivered)).await;
                }
                uow.commit().await?;
                info!(owner = %task.virtual_key_id, "another tenant's tombstone for this id gave way");
            }
            Inserted::Exists(task) if task.status == TaskStatus::Pending => {
                uow.commit().await?;
                // Resume only what nobody is submitting: our own message redelivered after a
                // crash, or a task idle past the grace period (claimed by one conditional
                // UPDATE). A duplicate arriving while another instance submits is acknowledged,
                // or the provider would get the job twice.
                let grace = self.settings.pending_grace();
                if !redelivered && !self.store.touch_pending(&r.request_id, grace).await? {
                    metrics::counter!("video_generation_duplicate_requests_total").increment(1);
                    info!("duplicate of a request being submitted elsewhere: ignored");
                    return Ok(());
                }
                info!("task still pending after an earlier attempt; resuming submission");
                prior = Some(*task);
            }
            Inserted::Exists(task)
                if task.status == TaskStatus::Cancelled && task.started_at.is_none() =>
            {
                uow.rollback().await?;
                let rejection = Rejection {
                    command: VideoGenerationRequested::NAME,
                    label: RejectReason::AlreadyCancelled,
                    request_id: &r.request_id,
                    virtual_key_id: &r.virtual_key_id,
                    reason: "the request was cancelled before it arrived",
                };
                self.reject(rejection, &traceparent).await?;
                info!("request refused: already cancelled");
                return Ok(());
            }
            Inserted::Exists(task) => {
                uow.rollback().await?;
                metrics::counter!("video_generation_duplicate_requests_total").increment(1);
                info!(status = task.status.as_str(), "duplicate request ignored");
                return Ok(());
            }
        }
        self.submit(&r, provider, traceparent, prior.as_ref()).await
    }

    /// Records the refused request as a failed task (so a retry with the same id is refused too)
    /// with `VideoGenerationCommandRejected` and the terminal events.
    async fn reject_invalid(
        &self,
        task: NewTask,
        reason: &str,
        traceparent: Option<String>,
    ) -> Result<(), HandleError> {
        warn!(%reason, "invalid request");
        let mut uow = self.store.begin().await?;
        if let Inserted::Exists(existing) = uow.insert_task(&task, TaskStatus::Failed).await? {
            uow.rollback().await?;
            info!(
                status = existing.status.as_str(),
                "invalid duplicate of an existing task ignored"
            );
            return Ok(());
        }
        uow.record_refusal(&task.request_id, reason).await?;
        let rejection = Rejection {
            command: VideoGenerationRequested::NAME,
            label: RejectReason::Invalid,
            request_id: &task.request_id,
            virtual_key_id: &task.virtual_key_id,
            reason,
        };
        self.enqueue(
            &mut uow,
            &self.topology.event(&rejection.event()),
            &traceparent,
        )
        .await?;
        let failed = VideoGenerationFailed {
            meta: Meta::new(),
            request_id: task.request_id.clone(),
            virtual_key_id: task.virtual_key_id.clone(),
            error: reason.to_owned(),
            retryable: false,
            failed_at: messages::now(),
        };
        let row = uow.task(&task.request_id).await?;
        self.enqueue_terminal(
            &mut uow,
            &row,
            &self.topology.event(&failed),
            "request refused",
            &traceparent,
        )
        .await?;
        self.commit(uow).await?;
        rejection.count();
        metrics::counter!("video_generation_terminal_total", "status" => TaskStatus::Failed.as_str())
            .increment(1);
        Ok(())
    }

    pub(super) async fn on_submitted(
        &self,
        r: &VideoGenerationRequested,
        provider: &dyn VideoProvider,
        provider_task: ProviderTask,
        traceparent: Option<String>,
    ) -> Result<(), HandleError> {
        let started_at = messages::now();
        let tier = self.topology.tier_at_most(self.tracking.min_interval_ms);
        let first_check_at =
            started_at + chrono::Duration::milliseconds(i64::try_from(tier).unwrap_or(i64::MAX));
        let mut uow = self.store.begin().await?;
        let patch = TransitionPatch {
            provider_task_id: Some(provider_task.id.clone()),
            start_tracking_at: Some(started_at),
            next_check_at: Some(first_check_at),
            ..TransitionPatch::default()
        };
        let Some(task) = uow
            .transition(
                &r.request_id,
                &[TaskStatus::Pending],
                TaskStatus::Processing,
                &patch,
            )
            .await?
        else {
            uow.rollback().await?;
            // Cancelled (or finished by a racing instance) while we submitted: do not leave a
            // job running at the provider for nobody.
            info!(provider_task_id = %provider_task.id, "task left pending meanwhile; cancelling the provider job");
            if let Err(e) = provider.cancel(&provider_task).await {
                warn!(error = %e, "could not cancel orphaned provider job");
            }
            return Ok(());
        };
        let started = VideoGenerationStarted {
            meta: Meta::new(),
            request_id: task.request_id.clone(),
            virtual_key_id: task.virtual_key_id.clone(),
            provider: provider.name().to_owned(),
            provider_task_id: provider_task.id.clone(),
            started_at,
        };
        self.enqueue(&mut uow, &self.topology.event(&started), &traceparent)
            .await?;
        let check = VideoProgressCheckRequested::first(
            &task.request_id,
            &task.virtual_key_id,
            0,
            started_at,
            first_check_at,
        );
        self.enqueue(
            &mut uow,
            &self.topology.delayed_check(tier, &check),
            &traceparent,
        )
        .await?;
        self.commit(uow).await?;
        metrics::counter!("video_generation_started_total", "provider" => provider.name().to_owned()).increment(1);
        info!(provider = provider.name(), provider_task_id = %provider_task.id, "generation started");
        Ok(())
    }
}
