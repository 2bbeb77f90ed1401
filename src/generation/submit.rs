//! The submit, once per task: a job is money. The intent is recorded before each POST, the
//! provider's job id the moment it is known (retried until it sticks: the job exists), and a
//! task with a recorded job resumes from it instead of submitting again. An attempt whose
//! outcome is unknown (no answer after sending; a crash before the job was recorded) is not
//! simply sent again: `generation.ambiguous_submit` decides. Where the provider can look an
//! attempt up by a client-set id (Kling's `external_task_id`), it is asked first, and a "no such
//! job" is asked again after a pause that lets a request still in flight there land; then the
//! next POST reuses the attempt's id, so a provider that keeps those ids unique cannot create a
//! second job under it, and a refusal of that POST is looked up once more before it counts.

use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tracing::{error, info, warn, Instrument};

use super::ending::Ending;
use super::{GenerationOrchestrator, HandleError};
use crate::config::AmbiguousSubmit;
use crate::crash::{crash_if, CrashPoint};
use crate::messages::VideoGenerationRequested;
use crate::providers::{ProviderError, ProviderTask, SubmitLookup, SubmitRequest, VideoProvider};
use crate::store::{Task, TaskStatus};

/// How long a recorded job id may take to stick while the database is down: under RabbitMQ's
/// `consumer_timeout` (30 min by default), which would take the delivery back meanwhile.
const RECORD_JOB_FOR: Duration = Duration::from_secs(20 * 60);

/// Pause between an unanswered submit and asking the provider about it: a request that reached
/// the provider just before our timeout may still be turning into a job.
const LOOKUP_SETTLE: Duration = Duration::from_secs(2);

/// The error of a task failed because its submit's outcome is unknown.
pub(super) const AMBIGUOUS_ERROR: &str = "submission outcome unknown";

/// `outcome` of `video_provider_submissions_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Submission {
    /// The provider created the job and its id is recorded.
    Accepted,
    /// A job recorded earlier: tracking resumes, nothing is submitted.
    Resumed,
    /// Outcome unknown; the task failed (`ambiguous_submit = "fail"`).
    AmbiguousFailed,
    /// Outcome unknown; submitted again (`ambiguous_submit = "resubmit"`).
    AmbiguousResubmitted,
    /// Outcome unknown to us, but the provider found the attempt's job (a client-set id):
    /// recorded and tracked, nothing submitted again.
    AmbiguousResolved,
}

impl Submission {
    /// Every outcome, for metrics that exist from the first scrape.
    pub(crate) const ALL: [Submission; 5] = [
        Self::Accepted,
        Self::Resumed,
        Self::AmbiguousFailed,
        Self::AmbiguousResubmitted,
        Self::AmbiguousResolved,
    ];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Accepted => "accepted",
            Self::Resumed => "resumed",
            Self::AmbiguousFailed => "ambiguous_failed",
            Self::AmbiguousResubmitted => "ambiguous_resubmitted",
            Self::AmbiguousResolved => "ambiguous_resolved",
        }
    }

    pub(super) fn count(self, provider: &str) {
        metrics::counter!("video_provider_submissions_total", "provider" => provider.to_owned(), "outcome" => self.as_str())
            .increment(1);
    }
}

/// What asking the provider about an unanswered attempt leaves us with.
enum Looked {
    /// Its job, recorded.
    Found(ProviderTask),
    /// Its job, but the task left `pending` meanwhile: nothing more to do.
    Done,
    /// No job: submit.
    Absent,
    /// The provider cannot tell: the policy decides.
    Unknowable,
}

fn submit_request(
    r: &VideoGenerationRequested,
    attempt_id: &str,
    traceparent: &Option<String>,
) -> SubmitRequest {
    SubmitRequest {
        request_id: r.request_id.clone(),
        attempt_id: attempt_id.to_owned(),
        model: r.model.clone(),
        prompt: r.prompt.clone(),
        duration_seconds: r.duration_seconds,
        size: r.size.clone(),
        image_url: r.image_url.clone(),
        metadata: r.metadata.clone(),
        traceparent: traceparent.clone(),
    }
}

impl GenerationOrchestrator {
    /// Submits `r` (with bounded exponential backoff and jitter on transient errors), or resumes
    /// from what `prior` (the row of an earlier attempt) recorded.
    pub(super) async fn submit(
        &self,
        r: &VideoGenerationRequested,
        provider: Arc<dyn VideoProvider>,
        traceparent: Option<String>,
        prior: Option<&Task>,
    ) -> Result<(), HandleError> {
        let name = provider.name().to_owned();
        let mut reuse: Option<String> = None;
        if let Some(prior) = prior {
            if let Some(job) = &prior.provider_task_id {
                Submission::Resumed.count(&name);
                info!(provider_task_id = %job, "the provider's job was recorded earlier; resuming it, nothing submitted");
                let task = ProviderTask { id: job.clone() };
                return self
                    .on_submitted(r, provider.as_ref(), task, traceparent)
                    .await;
            }
            if let Some(attempt_id) = &prior.submit_attempt_id {
                let request = submit_request(r, attempt_id, &traceparent);
                let at = prior.submit_attempted_at.unwrap_or(prior.updated_at);
                match self.look_up(provider.as_ref(), &request, at).await? {
                    Looked::Found(job) => {
                        return self
                            .on_submitted(r, provider.as_ref(), job, traceparent)
                            .await
                    }
                    Looked::Done => return Ok(()),
                    Looked::Absent => reuse = Some(attempt_id.clone()),
                    Looked::Unknowable => {
                        if self.ambiguous(r, &name, &traceparent).await? == AmbiguousSubmit::Fail {
                            return Ok(());
                        }
                    }
                }
            }
        }
        let mut request = submit_request(r, "", &traceparent);
        let mut backoff = self.settings.submit_backoff_initial();
        let mut attempt = 0;
        let result = loop {
            attempt += 1;
            // An attempt the provider said it has no job for is sent again under its own id.
            let reused = reuse.is_some();
            let attempt_id = reuse
                .take()
                .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
            request.attempt_id.clone_from(&attempt_id);
            let attempted_at = chrono::Utc::now();
            if !self
                .store
                .record_submit_attempt(&r.request_id, &attempt_id)
                .await?
            {
                info!("the task no longer waits for a submit (cancelled, or its job recorded elsewhere)");
                return Ok(());
            }
            let span = tracing::info_span!(
                "provider submit",
                otel.kind = "client",
                provider = %name,
                attempt
            );
            // The provider's side of the call continues this span.
            request.traceparent =
                Some(span.in_scope(|| crate::broker::onward_traceparent(traceparent.as_deref())));
            let submitted = self
                .holding_claim(&request, provider.submit(&request).instrument(span))
                .await;
            let e = match submitted {
                Ok(job) => {
                    crash_if(self.crash_at, CrashPoint::AfterProviderAccepted);
                    if !self.record_job(&r.request_id, &attempt_id, &job.id).await? {
                        info!(provider_task_id = %job.id, "task left pending while submitting; cancelling the provider job");
                        if let Err(e) = provider.cancel(&job).await {
                            warn!(error = %e, "could not cancel the orphaned provider job");
                        }
                        return Ok(());
                    }
                    crash_if(self.crash_at, CrashPoint::AfterJobRecorded);
                    Submission::Accepted.count(&name);
                    break Ok(job);
                }
                Err(e) if e.unanswered() => {
                    warn!(attempt, error = %e, "submit sent but not answered: the provider may have created the job");
                    let mut looked = self
                        .holding_claim(
                            &request,
                            self.look_up(provider.as_ref(), &request, attempted_at),
                        )
                        .await?;
                    if matches!(looked, Looked::Absent) {
                        // Absent twice, a pause apart, before it counts.
                        tokio::select! {
                            _ = self.stop.cancelled() => return Err(HandleError::Shutdown),
                            _ = tokio::time::sleep(LOOKUP_SETTLE) => {}
                        }
                        looked = self
                            .holding_claim(
                                &request,
                                self.look_up(provider.as_ref(), &request, attempted_at),
                            )
                            .await?;
                    }
                    match looked {
                        Looked::Found(job) => break Ok(job),
                        Looked::Done => return Ok(()),
                        Looked::Absent => reuse = Some(attempt_id.clone()),
                        Looked::Unknowable => {
                            if self.ambiguous(r, &name, &traceparent).await?
                                == AmbiguousSubmit::Fail
                            {
                                return Ok(());
                            }
                        }
                    }
                    e
                }
                Err(e) if reused && !e.is_transient() => {
                    // Perhaps refused because the first POST under this id did land after all.
                    match self
                        .look_up(provider.as_ref(), &request, attempted_at)
                        .await?
                    {
                        Looked::Found(job) => break Ok(job),
                        Looked::Done => return Ok(()),
                        Looked::Absent | Looked::Unknowable => {
                            self.store
                                .clear_submit_attempt(&r.request_id, &attempt_id)
                                .await?;
                            e
                        }
                    }
                }
                Err(e) => {
                    self.store
                        .clear_submit_attempt(&r.request_id, &attempt_id)
                        .await?;
                    e
                }
            };
            if !e.is_transient() || attempt >= self.settings.submit_max_attempts {
                break Err(e);
            }
            let wait = e.retry_after().unwrap_or(backoff).max(backoff);
            let wait = wait.mul_f64(rand::rng().random_range(0.8..1.2));
            warn!(attempt, error = %e, retry_in_ms = wait.as_millis() as u64, "submit failed; retrying");
            tokio::select! {
                _ = self.stop.cancelled() => return Err(HandleError::Shutdown),
                _ = tokio::time::sleep(wait) => {}
            }
            backoff = (backoff * 2).min(self.settings.submit_backoff_max());
        };
        match result {
            Ok(job) => {
                self.on_submitted(r, provider.as_ref(), job, traceparent)
                    .await
            }
            Err(e) => {
                let retryable = e.is_transient();
                warn!(error = %e, retryable, attempts = attempt, "submit failed for good");
                let error = match &e {
                    ProviderError::Transient { message, .. }
                    | ProviderError::Throttled { message, .. } => {
                        format!("provider unavailable after {attempt} attempts: {message}")
                    }
                    ProviderError::Permanent { message } => {
                        format!("provider refused the request: {message}")
                    }
                };
                let ending =
                    Ending::failure(&r.request_id, &[TaskStatus::Pending], &error, retryable);
                self.fail(ending, &traceparent).await
            }
        }
    }

    /// Awaits `call` (a POST or a lookup of `request`'s attempt) while keeping the task's claim
    /// alive every third of `generation.pending_grace_ms`, so the sweeper never re-drives a
    /// submit in progress however long the provider takes to answer. No task is spawned: the
    /// refresh runs between polls of `call`.
    async fn holding_claim<T>(
        &self,
        request: &SubmitRequest,
        call: impl std::future::Future<Output = T>,
    ) -> T {
        let every = (self.settings.pending_grace() / 3).max(Duration::from_millis(100));
        let mut refresh = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(call);
        loop {
            tokio::select! {
                out = &mut call => return out,
                _ = refresh.tick() => {
                    if let Err(e) = self
                        .store
                        .keep_submit_claim(&request.request_id, &request.attempt_id)
                        .await
                    {
                        warn!(error = %e, "the submit's claim was not refreshed");
                    }
                }
            }
        }
    }

    /// Asks the provider what became of an attempt we got no answer to. A found job is
    /// recorded (`Done` when the task left `pending` meanwhile); a failed lookup counts as
    /// unknowable.
    async fn look_up(
        &self,
        provider: &dyn VideoProvider,
        request: &SubmitRequest,
        attempted_at: chrono::DateTime<chrono::Utc>,
    ) -> Result<Looked, HandleError> {
        match provider.find_submitted(request, attempted_at).await {
            Ok(SubmitLookup::Found(job)) => {
                info!(provider_task_id = %job.id, attempt_id = %request.attempt_id, "the provider found the job of the unanswered attempt");
                if !self
                    .record_job(&request.request_id, &request.attempt_id, &job.id)
                    .await?
                {
                    info!(provider_task_id = %job.id, "task left pending meanwhile; cancelling the provider job");
                    if let Err(e) = provider.cancel(&job).await {
                        warn!(error = %e, "could not cancel the orphaned provider job");
                    }
                    return Ok(Looked::Done);
                }
                Submission::AmbiguousResolved.count(provider.name());
                Ok(Looked::Found(job))
            }
            Ok(SubmitLookup::Absent) => {
                info!(attempt_id = %request.attempt_id, "the provider has no job for the unanswered attempt; submitting is safe");
                Ok(Looked::Absent)
            }
            Ok(SubmitLookup::Unknowable) => Ok(Looked::Unknowable),
            Err(e) => {
                warn!(error = %e, "could not ask the provider about the unanswered attempt");
                Ok(Looked::Unknowable)
            }
        }
    }

    /// A submit whose outcome is unknown: under `"fail"` the task fails (retryable) here; under
    /// `"resubmit"` the caller submits again. Returns the policy applied.
    async fn ambiguous(
        &self,
        r: &VideoGenerationRequested,
        provider: &str,
        traceparent: &Option<String>,
    ) -> Result<AmbiguousSubmit, HandleError> {
        let policy = self.settings.ambiguous_submit;
        match policy {
            AmbiguousSubmit::Fail => {
                Submission::AmbiguousFailed.count(provider);
                warn!("submission outcome unknown; failing the task (generation.ambiguous_submit = \"fail\")");
                let ending =
                    Ending::failure(&r.request_id, &[TaskStatus::Pending], AMBIGUOUS_ERROR, true);
                self.fail(ending, traceparent).await?;
            }
            AmbiguousSubmit::Resubmit => {
                Submission::AmbiguousResubmitted.count(provider);
                warn!("submission outcome unknown; submitting again (generation.ambiguous_submit = \"resubmit\")");
            }
        }
        Ok(policy)
    }

    /// Records the provider's job, retrying while the database fails: the job exists, so it must
    /// not be forgotten. False when the task left `pending` meanwhile.
    async fn record_job(
        &self,
        request_id: &str,
        attempt_id: &str,
        job_id: &str,
    ) -> Result<bool, HandleError> {
        let started = tokio::time::Instant::now();
        let mut wait = Duration::from_millis(200);
        loop {
            match self
                .store
                .record_provider_job(request_id, attempt_id, job_id)
                .await
            {
                Ok(stuck) => return Ok(stuck),
                Err(e) if e.is_transient() && started.elapsed() < RECORD_JOB_FOR => {
                    warn!(provider_task_id = job_id, error = %e, "the provider's job is not recorded yet; retrying");
                    tokio::select! {
                        _ = self.stop.cancelled() => {
                            error!(provider_task_id = job_id, "shutting down before the provider's job was recorded: its outcome will count as unknown");
                            return Err(HandleError::Shutdown);
                        }
                        _ = tokio::time::sleep(wait) => {}
                    }
                    wait = (wait * 2).min(Duration::from_secs(5));
                }
                Err(e) => {
                    error!(provider_task_id = job_id, error = %e, "the provider's job could not be recorded: its outcome will count as unknown");
                    return Err(e.into());
                }
            }
        }
    }
}
