//! Where a test can make the process die mid-work (`VIDEO_ORCHESTRATOR_CRASH_AT`), to prove that
//! a crash at each step loses nothing and doubles nothing. Unset in production: the check is one
//! environment read when a component is built.

/// A place the process aborts at when `VIDEO_ORCHESTRATOR_CRASH_AT` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashPoint {
    /// A check: after decoding, before anything else (`received`).
    Received,
    /// A check: after the next check is published and confirmed, before the row advances
    /// (`after_publish`).
    AfterPublish,
    /// A check: after the row advanced, before the ack (`after_advance`).
    AfterAdvance,
    /// A submit: after the provider accepted the job, before its id is recorded
    /// (`after_provider_accepted`): the attempt's outcome is then unknown.
    AfterProviderAccepted,
    /// A submit: after the provider's job id is recorded, before the task is marked processing
    /// (`after_job_recorded`): the next delivery resumes the job.
    AfterJobRecorded,
}

impl CrashPoint {
    /// The point named by `VIDEO_ORCHESTRATOR_CRASH_AT`, if any.
    #[must_use]
    pub fn from_env() -> Option<Self> {
        match std::env::var("VIDEO_ORCHESTRATOR_CRASH_AT").ok()?.as_str() {
            "received" => Some(Self::Received),
            "after_publish" => Some(Self::AfterPublish),
            "after_advance" => Some(Self::AfterAdvance),
            "after_provider_accepted" => Some(Self::AfterProviderAccepted),
            "after_job_recorded" => Some(Self::AfterJobRecorded),
            _ => None,
        }
    }
}

/// Aborts the process when `configured` is `here`.
pub(crate) fn crash_if(configured: Option<CrashPoint>, here: CrashPoint) {
    if configured == Some(here) {
        eprintln!("VIDEO_ORCHESTRATOR_CRASH_AT={here:?}: aborting the process");
        std::process::abort();
    }
}
