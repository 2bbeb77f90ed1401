//! The generation orchestrator: the only component that changes a task's lifecycle status and
//! publishes lifecycle events.
//!
//! It consumes `video.generation` (requests, cancels, provider outcomes). Every state change and
//! the events it causes are written in one PostgreSQL transaction (the outbox); the relay
//! publishes them. Nothing about running tasks is held in memory: any instance can handle any
//! message, so a cancel works wherever it lands.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use rand::Rng;
use sqlx::{Postgres, Transaction};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use crate::broker::{delivery_span, Handler, Incoming, Outcome};
use crate::config::{GenerationSettings, TrackingSettings, WebhookSettings};
use crate::database_gate::{DatabaseGate, GateClosed, GATE_HOLD};
use crate::messages::{
    self, Envelope, GenerationCommand, Message, Meta, TaskOutcome, VideoGenerationCancelRequested,
    VideoGenerationCancelled, VideoGenerationCommandRejected, VideoGenerationCompleted,
    VideoGenerationFailed, VideoGenerationRequested, VideoGenerationStarted,
    VideoProgressCheckRequested, VideoProgressTrackingCancelled, VideoProviderTaskFinished,
};
use crate::providers::{
    CancelOutcome, ProviderError, ProviderTask, Providers, SubmitRequest, VideoProvider,
};
use crate::store::{Inserted, NewTask, Store, StoreError, Task, TaskStatus, TransitionPatch};
use crate::topology::Topology;
use crate::webhooks;

/// Everything the orchestrator needs.
#[derive(Debug)]
pub struct GenerationOrchestrator {
    store: Store,
    providers: Providers,
    topology: Topology,
    settings: GenerationSettings,
    tracking: TrackingSettings,
    webhooks: WebhookSettings,
    relay_wake: Arc<Notify>,
    stop: CancellationToken,
    gate: DatabaseGate,
}

/// Why a message could not be handled now.
#[derive(Debug, thiserror::Error)]
enum HandleError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("shutting down")]
    Shutdown,
    /// A well-formed message the orchestrator will not act on: parked with this reason.
    #[error("{0}")]
    Refused(String),
}

impl From<sqlx::Error> for HandleError {
    fn from(e: sqlx::Error) -> Self {
        Self::Store(StoreError::Database(e))
    }
}

impl GenerationOrchestrator {
    /// Builds the orchestrator. `relay_wake` is notified after every commit that wrote to the
    /// outbox; `stop` interrupts submit backoff (the message goes back to the queue).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: Store,
        providers: Providers,
        topology: Topology,
        settings: GenerationSettings,
        tracking: TrackingSettings,
        webhooks: WebhookSettings,
        relay_wake: Arc<Notify>,
        stop: CancellationToken,
    ) -> Self {
        Self {
            store,
            providers,
            topology,
            settings,
            tracking,
            webhooks,
            relay_wake,
            stop,
            gate: DatabaseGate::default(),
        }
    }

    async fn dispatch(
        &self,
        command: GenerationCommand,
        traceparent: Option<String>,
        redelivered: bool,
    ) -> Result<(), HandleError> {
        match command {
            GenerationCommand::Requested(r) => self.on_requested(r, traceparent, redelivered).await,
            GenerationCommand::CancelRequested(c) => self.on_cancel(c, traceparent).await,
            GenerationCommand::ProviderTaskFinished(f) => self.on_finished(f, traceparent).await,
        }
    }

    /// Why a request cannot be accepted, or the provider it goes to.
    fn validate(&self, r: &VideoGenerationRequested) -> Result<Arc<dyn VideoProvider>, String> {
        if r.request_id.trim().is_empty() {
            return Err("requestId must not be empty".to_owned());
        }
        if r.virtual_key_id.trim().is_empty() {
            return Err("virtualKeyId must not be empty".to_owned());
        }
        if r.prompt.trim().is_empty() {
            return Err("prompt must not be empty".to_owned());
        }
        let chars = r.prompt.chars().count();
        if chars > self.settings.max_prompt_length {
            return Err(format!(
                "prompt is {chars} characters long; the limit is {}",
                self.settings.max_prompt_length
            ));
        }
        if r.model.trim().is_empty() {
            return Err("model must not be empty".to_owned());
        }
        if let Some(metadata) = &r.metadata {
            let bytes = serde_json::to_vec(metadata).map_or(0, |b| b.len());
            if bytes > self.settings.max_metadata_bytes {
                return Err(format!(
                    "metadata is {bytes} bytes as JSON; the limit is {} (generation.max_metadata_bytes)",
                    self.settings.max_metadata_bytes
                ));
            }
        }
        if let Some(d) = r.duration_seconds {
            if d == 0 || d > self.settings.max_duration_seconds {
                return Err(format!(
                    "durationSeconds must be between 1 and {}, got {d}",
                    self.settings.max_duration_seconds
                ));
            }
        }
        if let Some(size) = &r.size {
            let ok = size
                .split_once('x')
                .and_then(|(w, h)| Some((w.parse::<u32>().ok()?, h.parse::<u32>().ok()?)))
                .is_some_and(|(w, h)| (16..=8192).contains(&w) && (16..=8192).contains(&h));
            if !ok {
                return Err(format!(
                    "size must be WIDTHxHEIGHT between 16 and 8192, got `{size}`"
                ));
            }
        }
        if let Some(url) = &r.callback_url {
            webhooks::validate_url(url, &self.webhooks.allowed_hosts)
                .map_err(|e| format!("callbackUrl: {e}"))?;
        }
        self.providers
            .route(&r.model, r.provider.as_deref())
            .ok_or_else(|| match &r.provider {
                Some(p) => format!("provider `{p}` is not configured"),
                None => format!(
                    "model `{}` is not routed to any configured provider",
                    r.model
                ),
            })
    }

    async fn on_requested(
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
                    metadata: None,
                    ..new_task
                };
                return self.reject_invalid(new_task, &reason, traceparent).await;
            }
        };
        let mut tx = self.store.begin().await?;
        let new_task = NewTask {
            provider: provider.name().to_owned(),
            ..new_task
        };
        match Store::insert(&mut tx, &new_task, TaskStatus::Pending).await? {
            Inserted::New => tx.commit().await?,
            Inserted::Exists(task) if task.status == TaskStatus::Pending => {
                tx.commit().await?;
                // Resume only what nobody is submitting: our own message redelivered after a
                // crash, or a task idle past the grace period (claimed by one conditional
                // UPDATE). A duplicate arriving while another instance submits is acknowledged,
                // or the provider would get the job twice.
                let grace = std::time::Duration::from_millis(self.settings.pending_grace_ms);
                if !redelivered && !self.store.touch_pending(&r.request_id, grace).await? {
                    metrics::counter!("video_generation_duplicate_requests_total").increment(1);
                    info!("duplicate of a request being submitted elsewhere: ignored");
                    return Ok(());
                }
                info!("task still pending after an earlier attempt; resuming submission");
            }
            Inserted::Exists(task)
                if task.status == TaskStatus::Cancelled && task.started_at.is_none() =>
            {
                let reject = VideoGenerationCommandRejected {
                    meta: Meta::new(),
                    request_id: r.request_id.clone(),
                    virtual_key_id: r.virtual_key_id.clone(),
                    command: VideoGenerationRequested::NAME.to_owned(),
                    reason: "the request was cancelled before it arrived".to_owned(),
                };
                self.enqueue(&mut tx, &self.topology.event(&reject), &traceparent)
                    .await?;
                tx.commit().await?;
                self.relay_wake.notify_one();
                count_rejected(VideoGenerationRequested::NAME, "already_cancelled");
                info!("request refused: already cancelled");
                return Ok(());
            }
            Inserted::Exists(task) => {
                tx.rollback().await?;
                metrics::counter!("video_generation_duplicate_requests_total").increment(1);
                info!(status = task.status.as_str(), "duplicate request ignored");
                return Ok(());
            }
        }
        self.submit(&r, provider, traceparent).await
    }

    async fn reject_invalid(
        &self,
        task: NewTask,
        reason: &str,
        traceparent: Option<String>,
    ) -> Result<(), HandleError> {
        warn!(%reason, "invalid request");
        let mut tx = self.store.begin().await?;
        if let Inserted::Exists(existing) =
            Store::insert(&mut tx, &task, TaskStatus::Failed).await?
        {
            tx.rollback().await?;
            info!(
                status = existing.status.as_str(),
                "invalid duplicate of an existing task ignored"
            );
            return Ok(());
        }
        sqlx::query("UPDATE video_tasks SET error = $2, retryable = false WHERE request_id = $1")
            .bind(&task.request_id)
            .bind(reason)
            .execute(&mut *tx)
            .await?;
        let reject = VideoGenerationCommandRejected {
            meta: Meta::new(),
            request_id: task.request_id.clone(),
            virtual_key_id: task.virtual_key_id.clone(),
            command: VideoGenerationRequested::NAME.to_owned(),
            reason: reason.to_owned(),
        };
        self.enqueue(&mut tx, &self.topology.event(&reject), &traceparent)
            .await?;
        let failed = VideoGenerationFailed {
            meta: Meta::new(),
            request_id: task.request_id.clone(),
            virtual_key_id: task.virtual_key_id.clone(),
            error: reason.to_owned(),
            retryable: false,
            failed_at: messages::now(),
        };
        let row = self.store_task_in(&mut tx, &task.request_id).await?;
        self.enqueue_terminal(
            &mut tx,
            &row,
            &self.topology.event(&failed),
            "request refused",
            &traceparent,
        )
        .await?;
        tx.commit().await?;
        self.relay_wake.notify_one();
        count_rejected(VideoGenerationRequested::NAME, "invalid");
        metrics::counter!("video_generation_terminal_total", "status" => "failed").increment(1);
        Ok(())
    }

    async fn store_task_in(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        request_id: &str,
    ) -> Result<Task, HandleError> {
        Ok(
            sqlx::query_as::<_, Task>("SELECT * FROM video_tasks WHERE request_id = $1")
                .bind(request_id)
                .fetch_one(&mut **tx)
                .await?,
        )
    }

    /// Submits with bounded exponential backoff and jitter on transient errors.
    async fn submit(
        &self,
        r: &VideoGenerationRequested,
        provider: Arc<dyn VideoProvider>,
        traceparent: Option<String>,
    ) -> Result<(), HandleError> {
        let request = SubmitRequest {
            request_id: r.request_id.clone(),
            model: r.model.clone(),
            prompt: r.prompt.clone(),
            duration_seconds: r.duration_seconds,
            size: r.size.clone(),
            metadata: r.metadata.clone(),
            traceparent: traceparent.clone(),
        };
        let mut backoff = Duration::from_millis(self.settings.submit_backoff_initial_ms);
        let mut attempt = 0;
        let result = loop {
            attempt += 1;
            match provider.submit(&request).await {
                Ok(task) => break Ok(task),
                Err(e) if e.is_transient() && attempt < self.settings.submit_max_attempts => {
                    let wait = e.retry_after().unwrap_or(backoff).max(backoff);
                    let wait = wait.mul_f64(rand::rng().random_range(0.8..1.2));
                    warn!(attempt, error = %e, retry_in_ms = wait.as_millis() as u64, "submit failed; retrying");
                    tokio::select! {
                        _ = self.stop.cancelled() => return Err(HandleError::Shutdown),
                        _ = tokio::time::sleep(wait) => {}
                    }
                    backoff = (backoff * 2)
                        .min(Duration::from_millis(self.settings.submit_backoff_max_ms));
                }
                Err(e) => break Err(e),
            }
        };
        match result {
            Ok(provider_task) => {
                self.on_submitted(r, provider.as_ref(), provider_task, traceparent)
                    .await
            }
            Err(e) => {
                let retryable = e.is_transient();
                warn!(error = %e, retryable, attempts = attempt, "submit failed for good");
                let error = match &e {
                    ProviderError::Transient { message, .. } => {
                        format!("provider unavailable after {attempt} attempts: {message}")
                    }
                    ProviderError::Permanent { message } => {
                        format!("provider refused the request: {message}")
                    }
                };
                self.fail(
                    &r.request_id,
                    &error,
                    retryable,
                    TaskStatus::Failed,
                    &[TaskStatus::Pending],
                    &traceparent,
                )
                .await
            }
        }
    }

    async fn on_submitted(
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
        let mut tx = self.store.begin().await?;
        let patch = TransitionPatch {
            provider_task_id: Some(provider_task.id.clone()),
            start_tracking_at: Some(started_at),
            next_check_at: Some(first_check_at),
            ..TransitionPatch::default()
        };
        let Some(task) = Store::transition(
            &mut tx,
            &r.request_id,
            &[TaskStatus::Pending],
            TaskStatus::Processing,
            &patch,
        )
        .await?
        else {
            tx.rollback().await?;
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
        self.enqueue(&mut tx, &self.topology.event(&started), &traceparent)
            .await?;
        let check = VideoProgressCheckRequested {
            meta: Meta::new(),
            request_id: task.request_id.clone(),
            virtual_key_id: task.virtual_key_id.clone(),
            scheduled_at: first_check_at,
            interval_index: 0,
            start_time: started_at,
            sequence: 0,
        };
        self.enqueue(
            &mut tx,
            &self.topology.delayed_check(tier, &check),
            &traceparent,
        )
        .await?;
        tx.commit().await?;
        self.relay_wake.notify_one();
        metrics::counter!("video_generation_started_total", "provider" => provider.name().to_owned()).increment(1);
        info!(provider = provider.name(), provider_task_id = %provider_task.id, "generation started");
        Ok(())
    }

    async fn on_cancel(
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
            let mut tx = self.store.begin().await?;
            let tomb = NewTask {
                request_id: c.request_id.clone(),
                virtual_key_id: c.virtual_key_id.clone(),
                traceparent,
                ..NewTask::default()
            };
            let inserted = Store::insert(&mut tx, &tomb, TaskStatus::Cancelled).await?;
            tx.commit().await?;
            if inserted == Inserted::New {
                info!("cancel for an unknown request: tombstone left");
                return Ok(());
            }
            // It appeared meanwhile: handle the cancel against it.
            return Box::pin(self.on_cancel(c, tomb.traceparent)).await;
        };
        if task.virtual_key_id != c.virtual_key_id {
            warn!(owner = %task.virtual_key_id, "cancel refused: virtual key does not own the task");
            let reject = VideoGenerationCommandRejected {
                meta: Meta::new(),
                request_id: c.request_id.clone(),
                virtual_key_id: c.virtual_key_id.clone(),
                command: VideoGenerationCancelRequested::NAME.to_owned(),
                reason: "the virtual key does not own this task".to_owned(),
            };
            let mut tx = self.store.begin().await?;
            self.enqueue(&mut tx, &self.topology.event(&reject), &traceparent)
                .await?;
            tx.commit().await?;
            self.relay_wake.notify_one();
            count_rejected(VideoGenerationCancelRequested::NAME, "virtual_key_mismatch");
            return Ok(());
        }
        if task.status.is_terminal() {
            info!(
                status = task.status.as_str(),
                "cancel of a finished task: nothing to do"
            );
            return Ok(());
        }
        self.cancel_at_provider(&task).await;
        if !self
            .cancel(
                &task.request_id,
                &reason,
                &[TaskStatus::Pending, TaskStatus::Processing],
                &traceparent,
            )
            .await?
        {
            info!("task finished before the cancel took effect");
            return Ok(());
        }
        info!("task cancelled");
        Ok(())
    }

    async fn on_finished(
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
                "virtual_key_mismatch",
                "the virtual key does not own this task",
            ))
        } else if f
            .provider_task_id
            .as_deref()
            .is_some_and(|id| task.provider_task_id.as_deref() != Some(id))
        {
            Some((
                "provider_task_mismatch",
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
            count_rejected(VideoProviderTaskFinished::NAME, reason);
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
        match f.outcome {
            TaskOutcome::Succeeded => {
                let Some(url) = f.video_url.clone() else {
                    return self
                        .fail(
                            &task.request_id,
                            "provider reported success without a video URL",
                            true,
                            TaskStatus::Failed,
                            &[TaskStatus::Processing],
                            &traceparent,
                        )
                        .await;
                };
                let mut tx = self.store.begin().await?;
                let patch = TransitionPatch {
                    progress: Some(100),
                    video_url: Some(url.clone()),
                    video_url_expires_at: f.video_url_expires_at,
                    video_seconds: f.video_seconds,
                    ..TransitionPatch::default()
                };
                let Some(row) = Store::transition(
                    &mut tx,
                    &task.request_id,
                    &[TaskStatus::Processing],
                    TaskStatus::Completed,
                    &patch,
                )
                .await?
                else {
                    tx.rollback().await?;
                    return Ok(());
                };
                let completed_at = row.finished_at.unwrap_or_else(Utc::now);
                let duration_ms = row
                    .started_at
                    .map(|s| (completed_at - s).num_milliseconds().max(0) as u64)
                    .unwrap_or(0);
                let completed = VideoGenerationCompleted {
                    meta: Meta::new(),
                    request_id: row.request_id.clone(),
                    virtual_key_id: row.virtual_key_id.clone(),
                    video_url: url,
                    video_url_expires_at: f.video_url_expires_at,
                    video_seconds: f.video_seconds,
                    duration_ms,
                    completed_at,
                };
                self.enqueue_terminal(
                    &mut tx,
                    &row,
                    &self.topology.event(&completed),
                    "completed",
                    &traceparent,
                )
                .await?;
                tx.commit().await?;
                self.relay_wake.notify_one();
                metrics::counter!("video_generation_terminal_total", "status" => "completed")
                    .increment(1);
                metrics::histogram!("video_generation_duration_seconds")
                    .record(duration_ms as f64 / 1000.0);
                info!(duration_ms, "generation completed");
                Ok(())
            }
            TaskOutcome::Failed => {
                let error = f
                    .error
                    .clone()
                    .unwrap_or_else(|| "provider reported failure".to_owned());
                self.fail(
                    &task.request_id,
                    &error,
                    false,
                    TaskStatus::Failed,
                    &[TaskStatus::Processing],
                    &traceparent,
                )
                .await
            }
            TaskOutcome::TimedOut => {
                self.cancel_at_provider(&task).await;
                self.fail(
                    &task.request_id,
                    "timed out",
                    true,
                    TaskStatus::TimedOut,
                    &[TaskStatus::Processing],
                    &traceparent,
                )
                .await
            }
            TaskOutcome::Cancelled => {
                self.cancel(
                    &task.request_id,
                    "cancelled at the provider",
                    &[TaskStatus::Processing],
                    &traceparent,
                )
                .await?;
                Ok(())
            }
        }
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

    /// Moves the task to `cancelled` (tracking stopped) with its events, if it is still in
    /// `from`. Returns false when it was not.
    async fn cancel(
        &self,
        request_id: &str,
        reason: &str,
        from: &[TaskStatus],
        traceparent: &Option<String>,
    ) -> Result<bool, HandleError> {
        let mut tx = self.store.begin().await?;
        let patch = TransitionPatch {
            message: Some(reason.to_owned()),
            ..TransitionPatch::default()
        };
        let Some(row) =
            Store::transition(&mut tx, request_id, from, TaskStatus::Cancelled, &patch).await?
        else {
            tx.rollback().await?;
            return Ok(false);
        };
        let cancelled = VideoGenerationCancelled {
            meta: Meta::new(),
            request_id: row.request_id.clone(),
            virtual_key_id: row.virtual_key_id.clone(),
            reason: reason.to_owned(),
            cancelled_at: messages::now(),
        };
        self.enqueue_terminal(
            &mut tx,
            &row,
            &self.topology.event(&cancelled),
            reason,
            traceparent,
        )
        .await?;
        tx.commit().await?;
        self.relay_wake.notify_one();
        metrics::counter!("video_generation_terminal_total", "status" => "cancelled").increment(1);
        Ok(true)
    }

    /// Moves the task to a failed status with its events, if it is still in `from`.
    async fn fail(
        &self,
        request_id: &str,
        error: &str,
        retryable: bool,
        to: TaskStatus,
        from: &[TaskStatus],
        traceparent: &Option<String>,
    ) -> Result<(), HandleError> {
        let mut tx = self.store.begin().await?;
        let patch = TransitionPatch {
            error: Some(error.to_owned()),
            retryable: Some(retryable),
            ..TransitionPatch::default()
        };
        let Some(row) = Store::transition(&mut tx, request_id, from, to, &patch).await? else {
            tx.rollback().await?;
            return Ok(());
        };
        let failed = VideoGenerationFailed {
            meta: Meta::new(),
            request_id: row.request_id.clone(),
            virtual_key_id: row.virtual_key_id.clone(),
            error: error.to_owned(),
            retryable,
            failed_at: row.finished_at.unwrap_or_else(Utc::now),
        };
        self.enqueue_terminal(
            &mut tx,
            &row,
            &self.topology.event(&failed),
            error,
            traceparent,
        )
        .await?;
        tx.commit().await?;
        self.relay_wake.notify_one();
        metrics::counter!("video_generation_terminal_total", "status" => to.as_str()).increment(1);
        info!(status = to.as_str(), %error, retryable, "generation failed");
        Ok(())
    }

    /// The terminal event, `VideoProgressTrackingCancelled` after it, and the webhook, in the
    /// transaction that ended the task (which also set `tracking_stopped`).
    async fn enqueue_terminal(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        task: &Task,
        terminal: &Envelope,
        reason: &str,
        traceparent: &Option<String>,
    ) -> Result<(), HandleError> {
        self.enqueue(tx, terminal, traceparent).await?;
        let stop = VideoProgressTrackingCancelled {
            meta: Meta::new(),
            request_id: task.request_id.clone(),
            virtual_key_id: task.virtual_key_id.clone(),
            reason: reason.to_owned(),
        };
        self.enqueue(tx, &self.topology.event(&stop), traceparent)
            .await?;
        if let Some(url) = &task.callback_url {
            webhooks::enqueue(tx, &task.request_id, url, terminal, &self.webhooks).await?;
        }
        if let Some(started) = task.started_at {
            let tracked = (Utc::now() - started).num_milliseconds().max(0) as f64 / 1000.0;
            metrics::histogram!("video_progress_tracking_duration_seconds").record(tracked);
        }
        Ok(())
    }

    async fn enqueue(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        envelope: &Envelope,
        traceparent: &Option<String>,
    ) -> Result<(), HandleError> {
        let envelope = envelope.clone().with_traceparent(traceparent.clone());
        Store::enqueue(tx, &envelope).await?;
        Ok(())
    }
}

fn count_rejected(command: &'static str, reason: &'static str) {
    metrics::counter!("video_generation_commands_rejected_total", "command" => command, "reason" => reason)
        .increment(1);
}

impl Handler for GenerationOrchestrator {
    async fn handle(&self, incoming: Incoming) -> Outcome {
        let span = delivery_span(&incoming);
        async {
            if incoming.body.len() > self.settings.max_message_bytes {
                metrics::counter!("video_poison_messages_total", "queue" => "generation")
                    .increment(1);
                return Outcome::Park(format!(
                    "body is {} bytes; the limit is {} (generation.max_message_bytes)",
                    incoming.body.len(),
                    self.settings.max_message_bytes
                ));
            }
            let command = match GenerationCommand::decode(
                incoming.message_type.as_deref(),
                &incoming.routing_key,
                &incoming.body,
            ) {
                Ok(c) => c,
                Err(e) => {
                    metrics::counter!("video_poison_messages_total", "queue" => "generation")
                        .increment(1);
                    return Outcome::Park(e.to_string());
                }
            };
            let span = tracing::Span::current();
            span.record("request_id", command.request_id());
            span.record("virtual_key", command.virtual_key_id());
            span.record("message_type", command.name());
            match self.gate.pass(&self.store, &self.stop, GATE_HOLD).await {
                Ok(()) => {}
                Err(GateClosed::Stopping) => return Outcome::Return,
                Err(GateClosed::StillDown) => {
                    return Outcome::Retry("database unavailable".to_owned())
                }
            }
            let traceparent = crate::broker::child_traceparent(incoming.traceparent.as_deref());
            // A retry is our own message coming back: resume it like a redelivery.
            let redelivered = incoming.redelivered || incoming.retry_attempt > 0;
            match self.dispatch(command, Some(traceparent), redelivered).await {
                Ok(()) => Outcome::Ack,
                Err(HandleError::Shutdown) => Outcome::Return,
                Err(HandleError::Refused(reason)) => Outcome::Park(reason),
                Err(HandleError::Store(e)) if e.is_transient() => {
                    self.gate.close();
                    metrics::counter!("video_generation_errors_total", "kind" => "database")
                        .increment(1);
                    Outcome::Retry(format!("database unavailable: {e}"))
                }
                Err(HandleError::Store(e)) => {
                    metrics::counter!("video_generation_errors_total", "kind" => "data")
                        .increment(1);
                    Outcome::Park(format!("the database refused the message's data: {e}"))
                }
            }
        }
        .instrument(span)
        .await
    }
}
