//! How one check ended, which is also the `outcome` label of `video_progress_checks_total`.

/// How one check ended. The label values are an external interface (dashboards, alerts,
/// README.md's metrics section): [`CheckOutcome::as_str`] must not change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CheckOutcome {
    /// Published new progress and scheduled the next check.
    Progressed,
    /// Nothing changed; scheduled the next check.
    Unchanged,
    /// The provider finished (or the task timed out); the chain ends.
    Finished,
    /// No task row has the check's request id.
    Orphaned,
    /// Sequence below the row's: duplicate, redelivered after the chain moved on, or forked.
    Stale,
    /// The task is no longer processing or tracking was cancelled.
    Stopped,
    /// The provider or the database failed; the chain goes on with the next check.
    Error,
    /// Not asked: this instance was at the provider's `max_status_rps`; the check was
    /// rescheduled for when a call is allowed.
    Throttled,
    /// Arrived before it was due (its delay was longer than the longest tier) and was sent round
    /// again without running: counted in `video_progress_checks_recirculated_total`, not under
    /// the `outcome` label.
    Recirculated,
}

impl CheckOutcome {
    /// Every value of the `outcome` label of `video_progress_checks_total`, in README.md's
    /// order (every outcome but [`CheckOutcome::Recirculated`]).
    pub const LABEL_VALUES: [Self; 8] = [
        Self::Progressed,
        Self::Unchanged,
        Self::Finished,
        Self::Orphaned,
        Self::Stale,
        Self::Stopped,
        Self::Error,
        Self::Throttled,
    ];

    /// The metric label value (and the name logs use).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Progressed => "progressed",
            Self::Unchanged => "unchanged",
            Self::Finished => "finished",
            Self::Orphaned => "orphaned",
            Self::Stale => "stale",
            Self::Stopped => "stopped",
            Self::Error => "error",
            Self::Throttled => "throttled",
            Self::Recirculated => "recirculated",
        }
    }

    /// Counts the check in its metric.
    pub(crate) fn record(self) {
        match self {
            Self::Recirculated => {
                metrics::counter!("video_progress_checks_recirculated_total").increment(1);
            }
            counted => {
                metrics::counter!("video_progress_checks_total", "outcome" => counted.as_str())
                    .increment(1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_label_values_are_the_ones_readme_documents() {
        let readme = include_str!("../../README.md");
        let documented = readme
            .split("`video_progress_checks_total{outcome}` (")
            .nth(1)
            .and_then(|rest| rest.split(')').next())
            .expect("README.md documents video_progress_checks_total{outcome}");
        let labels: Vec<String> = CheckOutcome::LABEL_VALUES
            .iter()
            .map(|o| format!("`{}`", o.as_str()))
            .collect();
        assert_eq!(
            documented.split_whitespace().collect::<String>(),
            labels.join(",")
        );
    }
}
