//! The simulated provider's state: its jobs in sharded maps, the counters, and how a job's
//! phase and progress follow from the time since it was submitted.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use chrono::{DateTime, TimeDelta, Utc};
use rand::Rng;
use tokio_util::sync::CancellationToken;

use super::{SimFaults, SimSettings, SimStats};

/// The error text of every failed job, in both protocols.
pub(super) const FAILURE_MESSAGE: &str = "simulated failure";

/// Why sharded `std::sync::Mutex`es: critical sections are a hash lookup and a small
/// serialisation, never an await, so a blocking lock is cheaper than an async one, and 16 shards
/// keep two cores from queueing on one lock.
const SHARDS: usize = 16;

/// How long after its POST a `[late]` prompt's job appears: past a test client's timeout.
pub(super) const LATE_BY: Duration = Duration::from_millis(1500);

/// The share of a job's duration spent queued.
const QUEUED_FRACTION: u32 = 10;

/// Everything the simulated provider holds: its settings, the faults in force, the jobs and the
/// counters.
pub(super) struct SimState {
    pub(super) settings: SimSettings,
    pub(super) addr: SocketAddr,
    pub(super) faults: Mutex<SimFaults>,
    shards: Box<[Mutex<HashMap<String, Job>>]>,
    hasher: RandomState,
    pub(super) submits: AtomicU64,
    status_calls: AtomicU64,
    /// Submit attempts per `[flaky]` prompt.
    flaky_attempts: Mutex<HashMap<String, u32>>,
    /// Cancelled on shutdown, so sleeping requests (latency, hangs) end promptly.
    pub(super) token: CancellationToken,
}

/// Locks, ignoring poisoning: the data is counters and job records that stay consistent even if a
/// holder panicked, and a test double should keep answering.
pub(super) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    Queued,
    Running,
    Succeeded,
    Failed,
    Canceled,
}

impl Phase {
    pub(super) fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Canceled)
    }
}

/// What a submit asked for, in either protocol.
pub(super) struct JobRequest {
    pub(super) model: String,
    /// Replicate `version` as submitted (None for `model`-style and OpenAI-style submits).
    pub(super) version: Option<String>,
    pub(super) prompt: String,
    /// Requested clip length.
    pub(super) clip_seconds: Option<u32>,
    pub(super) size: Option<String>,
    /// A client-set id (Kling's `external_task_id`), by which the job can be found again.
    pub(super) external_id: Option<String>,
    /// The input image of an image-to-video submit.
    pub(super) image: Option<String>,
}

/// One simulated job; its state is computed from the time since `created`.
pub(super) struct Job {
    pub(super) request: JobRequest,
    pub(super) created_at: DateTime<Utc>,
    pub(super) created: Instant,
    duration: Duration,
    fail: bool,
    /// Time since creation at which it was cancelled.
    pub(super) cancelled_after: Option<Duration>,
    status_calls: u64,
    /// Before this a lookup by its client-set id does not find it (`[late]`).
    visible_from: Instant,
}

/// A job as seen at one instant.
pub(super) struct View {
    pub(super) phase: Phase,
    pub(super) progress: u8,
    pub(super) started_at: Option<DateTime<Utc>>,
    pub(super) completed_at: Option<DateTime<Utc>>,
    /// Seconds spent running (queued time excluded), for Replicate's `metrics`.
    pub(super) predict_time: f64,
    pub(super) total_time: f64,
}

impl Job {
    fn new(request: JobRequest, duration: Duration, fail: bool) -> Self {
        Self {
            request,
            created_at: Utc::now(),
            created: Instant::now(),
            duration,
            fail,
            cancelled_after: None,
            status_calls: 0,
            visible_from: Instant::now(),
        }
    }

    pub(super) fn view(&self, now: Instant) -> View {
        let elapsed = now.saturating_duration_since(self.created);
        let queued_for = self.duration / QUEUED_FRACTION;
        let at = |offset: Duration| {
            self.created_at + TimeDelta::from_std(offset).unwrap_or(TimeDelta::zero())
        };
        let percent = |t: Duration| -> u8 {
            if self.duration.is_zero() {
                return 100;
            }
            let ratio = (t.as_secs_f64() / self.duration.as_secs_f64()).clamp(0.0, 1.0);
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            // 0..=100 after the clamp.
            let p = (ratio * 100.0).floor() as u8;
            p
        };
        let (phase, progress, end) = if let Some(cancelled) = self.cancelled_after {
            (Phase::Canceled, percent(cancelled).min(99), Some(cancelled))
        } else if elapsed >= self.duration {
            if self.fail {
                (Phase::Failed, 99, Some(self.duration))
            } else {
                (Phase::Succeeded, 100, Some(self.duration))
            }
        } else if elapsed < queued_for {
            (Phase::Queued, 0, None)
        } else {
            (Phase::Running, percent(elapsed).min(99), None)
        };
        let reached = end.unwrap_or(elapsed);
        View {
            phase,
            progress,
            started_at: (reached >= queued_for).then(|| at(queued_for)),
            completed_at: end.map(at),
            predict_time: reached.saturating_sub(queued_for).as_secs_f64(),
            total_time: reached.as_secs_f64(),
        }
    }
}

impl SimState {
    pub(super) fn new(settings: SimSettings, addr: SocketAddr, token: CancellationToken) -> Self {
        let faults = SimFaults {
            error_rate: 0.0,
            rate_limit_rate: settings.rate_limit_rate.clamp(0.0, 1.0),
            forbidden_rate: 0.0,
            latency_ms: settings.latency_ms,
            hang_rate: 0.0,
            retry_after: None,
        };
        Self {
            settings,
            addr,
            faults: Mutex::new(faults),
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
            submits: AtomicU64::new(0),
            status_calls: AtomicU64::new(0),
            flaky_attempts: Mutex::new(HashMap::new()),
            token,
        }
    }

    pub(super) fn shard(&self, id: &str) -> &Mutex<HashMap<String, Job>> {
        #[allow(clippy::cast_possible_truncation)]
        // Only the low bits pick a shard.
        let index = (self.hasher.hash_one(id) as usize) % SHARDS;
        &self.shards[index]
    }

    pub(super) fn stats(&self) -> SimStats {
        let mut by_job = HashMap::new();
        let mut image_jobs = 0;
        for shard in &*self.shards {
            for (id, job) in lock(shard).iter() {
                by_job.insert(id.clone(), job.status_calls);
                image_jobs += u64::from(job.request.image.is_some());
            }
        }
        SimStats {
            jobs: by_job.len() as u64,
            image_jobs,
            submits: self.submits.load(Ordering::Relaxed),
            status_calls: self.status_calls.load(Ordering::Relaxed),
            status_calls_by_job: by_job,
        }
    }

    /// Counts a status request, overall and for the job when it exists.
    pub(super) fn count_status_call(&self, id: &str) {
        self.status_calls.fetch_add(1, Ordering::Relaxed);
        if let Some(job) = lock(self.shard(id)).get_mut(id) {
            job.status_calls += 1;
        }
    }

    /// Job `id` as `render` shows it at this instant; `None` when there is no such job.
    pub(super) fn render(
        &self,
        id: &str,
        render: impl FnOnce(&Job, Instant) -> Vec<u8>,
    ) -> Option<Vec<u8>> {
        let now = Instant::now();
        lock(self.shard(id)).get(id).map(|job| render(job, now))
    }

    /// Creates a job from an accepted submit (refusals are decided before, by
    /// [`SimState::submit_refusal`]), applying the prompt's duration and failure overrides.
    pub(super) fn create_job(&self, id: String, request: JobRequest) -> String {
        let mut rng = rand::rng();
        let base = match duration_override(&request.prompt) {
            Some(ms) => ms,
            None => {
                let jitter = if self.settings.duration_jitter_ms > 0 {
                    rng.random_range(0..=self.settings.duration_jitter_ms)
                } else {
                    0
                };
                self.settings.duration_ms.saturating_add(jitter)
            }
        };
        let duration_ms = if request.prompt.contains("[slow]") {
            base.saturating_mul(10)
        } else {
            base
        };
        let fail = request.prompt.contains("[fail]") || roll(self.settings.failure_rate);
        let mut job = Job::new(request, Duration::from_millis(duration_ms), fail);
        if job.request.prompt.contains("[late]") {
            job.visible_from += LATE_BY;
        }
        lock(self.shard(&id)).insert(id.clone(), job);
        id
    }

    /// Whether job `id` was submitted with an input image; `None` when there is no such job.
    pub(super) fn made_from_image(&self, id: &str) -> Option<bool> {
        lock(self.shard(id))
            .get(id)
            .map(|job| job.request.image.is_some())
    }

    /// The id of the job created with client-set id `external_id`, if any.
    pub(super) fn find_external(&self, external_id: &str) -> Option<String> {
        self.shards.iter().find_map(|shard| {
            let now = Instant::now();
            lock(shard).iter().find_map(|(id, job)| {
                (job.request.external_id.as_deref() == Some(external_id) && job.visible_from <= now)
                    .then(|| id.clone())
            })
        })
    }

    /// After creating a job: a `[lost]` prompt never gets its answer (the connection hangs for
    /// 60 s, cut short by shutdown), as when a network drops the response to a POST that the
    /// provider acted on. A `[late]` one neither, and its job is found by its client-set id
    /// only [`LATE_BY`] after the POST: the request landed as the client gave up. True when the
    /// answer is lost; the handler then answers 503, which the client, having timed out, never
    /// reads.
    pub(super) async fn answer_lost(&self, prompt: &str) -> bool {
        if !prompt.contains("[lost]") && !prompt.contains("[late]") {
            return false;
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(60)) => {}
            () = self.token.cancelled() => {}
        }
        true
    }

    /// What a submit with this prompt must answer instead of creating a job, if anything.
    pub(super) fn submit_refusal(&self, prompt: &str) -> Option<(StatusCode, &'static str)> {
        if prompt.contains("[reject]") {
            return Some((
                StatusCode::BAD_REQUEST,
                "simulated rejection: this prompt is refused",
            ));
        }
        if prompt.contains("[unavailable]") {
            return Some((
                StatusCode::SERVICE_UNAVAILABLE,
                "simulated unavailability: try again later",
            ));
        }
        if prompt.contains("[flaky]") {
            let mut attempts = lock(&self.flaky_attempts);
            let count = attempts.entry(prompt.to_owned()).or_insert(0);
            *count += 1;
            if *count <= 2 {
                return Some((
                    StatusCode::SERVICE_UNAVAILABLE,
                    "simulated flakiness: try again",
                ));
            }
        }
        None
    }
}

/// `[duration=NNN]` in a prompt: that job's duration in milliseconds.
fn duration_override(prompt: &str) -> Option<u64> {
    let start = prompt.find("[duration=")? + "[duration=".len();
    let rest = &prompt[start..];
    let end = rest.find(']')?;
    rest[..end].trim().parse().ok()
}

/// `true` with probability `rate`.
pub(super) fn roll(rate: f64) -> bool {
    rate > 0.0 && (rate >= 1.0 || rand::rng().random::<f64>() < rate)
}

/// A job of `duration_ms`, created now, for unit tests.
#[cfg(test)]
pub(super) fn test_job(duration_ms: u64, fail: bool) -> Job {
    let request = JobRequest {
        model: "m".to_owned(),
        version: None,
        prompt: "p".to_owned(),
        clip_seconds: None,
        size: None,
        external_id: None,
        image: None,
    };
    Job::new(request, Duration::from_millis(duration_ms), fail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_is_queued_then_runs_linearly_then_ends() {
        let job = test_job(1000, false);
        let at = |ms| job.view(job.created + Duration::from_millis(ms));
        assert_eq!(at(50).phase, Phase::Queued);
        let running = at(500);
        assert_eq!(running.phase, Phase::Running);
        assert_eq!(running.progress, 50);
        assert!(running.started_at.is_some() && running.completed_at.is_none());
        let done = at(1000);
        assert_eq!(done.phase, Phase::Succeeded);
        assert_eq!(done.progress, 100);
        assert!(done.completed_at.is_some());
    }

    #[test]
    fn a_failing_job_fails_at_the_end() {
        let job = test_job(100, true);
        assert_eq!(
            job.view(job.created + Duration::from_millis(99)).phase,
            Phase::Running
        );
        assert_eq!(
            job.view(job.created + Duration::from_millis(100)).phase,
            Phase::Failed
        );
    }

    #[test]
    fn duration_override_is_read_from_the_prompt() {
        assert_eq!(duration_override("a cat [duration=250] [fail]"), Some(250));
        assert_eq!(duration_override("a cat [duration=]"), None);
        assert_eq!(duration_override("a cat"), None);
    }
}
