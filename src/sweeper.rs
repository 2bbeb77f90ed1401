//! The sweeper: the last net under the check chains.
//!
//! - A processing task whose next check is overdue by more than `tracking.sweeper_grace_ms` gets
//!   its sequence bumped (so any late check of the old chain is stale on arrival) and a fresh
//!   check, published straight to `video.progress` (`video_progress_rearmed_total`). This also
//!   covers a first check never published, and a delay tier the broker holds.
//! - A task still `pending` after `generation.pending_grace_ms` (a crash between insert and
//!   submit) is re-driven by re-publishing its request; the generation orchestrator resumes it.
//!
//! Any instance may sweep; row locks (`FOR UPDATE SKIP LOCKED`) make one sweeper act on a task.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::broker::Publisher;
use crate::config::{GenerationSettings, TrackingSettings};
use crate::messages::{
    Envelope, Message, Meta, VideoGenerationRequested, VideoProgressCheckRequested,
};
use crate::store::{Store, StoreError};
use crate::topology::Topology;

/// Re-arms lost check chains and re-drives stuck pending tasks (see the module docs).
#[derive(Debug, Clone)]
pub struct Sweeper {
    store: Store,
    publisher: Publisher,
    topology: Topology,
    tracking: TrackingSettings,
    generation: GenerationSettings,
}

/// What one [`Sweeper::sweep_once`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sweep {
    /// Overdue tasks that got a fresh check.
    pub rearmed: usize,
    /// Stale pending tasks whose request was published again.
    pub redriven: usize,
}

impl Sweeper {
    /// A sweeper acting on `store` and publishing through `publisher`; `tracking` and
    /// `generation` give its grace periods and its interval.
    pub fn new(
        store: Store,
        publisher: Publisher,
        topology: Topology,
        tracking: TrackingSettings,
        generation: GenerationSettings,
    ) -> Self {
        Self {
            store,
            publisher,
            topology,
            tracking,
            generation,
        }
    }

    /// One pass: what it re-armed and re-drove.
    ///
    /// # Errors
    /// Database errors.
    pub async fn sweep_once(&self) -> Result<Sweep, StoreError> {
        let grace = self.tracking.sweeper_grace();
        let tier = self.topology.tier_at_most(self.tracking.min_interval_ms);
        let rearmed = self
            .store
            .rearm_overdue(grace, Duration::from_millis(tier), 500)
            .await?;
        for task in &rearmed {
            // Due now and straight into the partitions, not through a delay tier: the task is overdue
            // already, and the tier may be what holds its check. After a broker restart,
            // RabbitMQ 3.10 can hold a tier's dead-lettering for
            // `dead_letter_worker_publisher_confirm_timeout` (2 min by default) when the tier
            // expired messages before the broker had recovered `video.progress`; a re-arm into
            // that tier would wait behind them (RELIABILITY.md, broker restart).
            let check = VideoProgressCheckRequested::first(
                &task.request_id,
                &task.virtual_key_id,
                task.check_sequence,
                task.started_at.unwrap_or(task.created_at),
                crate::messages::now(),
            );
            let mut envelope = Envelope::new(
                self.topology.progress_exchange(),
                VideoProgressCheckRequested::ROUTING_KEY,
                &check,
            )
            .with_traceparent(task.traceparent.clone());
            envelope.mandatory = true;
            match self.publisher.publish(&envelope).await {
                Ok(()) => {
                    metrics::counter!("video_progress_rearmed_total").increment(1);
                    info!(request_id = %task.request_id, virtual_key = %task.virtual_key_id,
                        sequence = check.sequence, "overdue task re-armed");
                }
                // next_check_at was pushed forward: the task is overdue again after the grace.
                Err(e) => warn!(request_id = %task.request_id, error = %e, "re-arm not published"),
            }
        }
        let pending_grace = self.generation.pending_grace();
        let mut redriven = 0;
        // The generation orchestrator claims the task when the re-driven request arrives.
        for task in self.store.claim_stale_pending(pending_grace, 100).await? {
            let request = VideoGenerationRequested {
                meta: Meta::new(),
                request_id: task.request_id.clone(),
                virtual_key_id: task.virtual_key_id.clone(),
                model: task.model.clone(),
                prompt: task.prompt.clone(),
                duration_seconds: task.duration_seconds.and_then(|d| u32::try_from(d).ok()),
                size: task.size.clone(),
                provider: (!task.provider.is_empty()).then(|| task.provider.clone()),
                callback_url: task.callback_url.clone(),
                image_url: task.image_url.clone(),
                metadata: task.metadata.clone(),
            };
            let envelope = self
                .topology
                .event(&request)
                .with_traceparent(task.traceparent.clone());
            match self.publisher.publish(&envelope).await {
                Ok(()) => {
                    redriven += 1;
                    metrics::counter!("video_generation_redriven_total").increment(1);
                    info!(request_id = %task.request_id, "pending task re-driven");
                }
                Err(e) => {
                    warn!(request_id = %task.request_id, error = %e, "re-drive not published")
                }
            }
        }
        Ok(Sweep {
            rearmed: rearmed.len(),
            redriven,
        })
    }

    /// Sweeps every `tracking.sweeper_interval_ms` until `stop`.
    pub async fn run(self, stop: CancellationToken) {
        let every = self.tracking.sweeper_interval();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            if let Err(e) = self.sweep_once().await {
                warn!(error = %e, "sweep failed");
            }
        }
    }
}
