//! The check-interval policy: when the next check is due, which delay tier carries it, and the
//! progress figure a check publishes. Pure functions of the settings, the topology and the clock
//! readings passed in.

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::config::TrackingSettings;
use crate::messages;
use crate::topology::Topology;

/// When the next check is due and which tier carries it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    /// Delay tier queue to publish into.
    pub tier_ms: u64,
    /// When the check is due (`scheduledAt`).
    pub delay_ms: u64,
}

impl Schedule {
    /// When a check published now on this schedule is due. Saturates instead of overflowing:
    /// no delay, however it was computed, can panic here.
    pub fn due_at(self) -> DateTime<Utc> {
        let now = messages::now();
        i64::try_from(self.delay_ms)
            .ok()
            .and_then(chrono::TimeDelta::try_milliseconds)
            .and_then(|delay| now.checked_add_signed(delay))
            .unwrap_or(DateTime::<Utc>::MAX_UTC)
    }

    /// This schedule, brought forward so the check is due within `limit` (the task's deadline):
    /// the largest tier not above the limit carries it, the shortest when the limit is below
    /// every tier. A schedule within the limit is unchanged.
    pub fn within(self, topology: &Topology, limit: Duration) -> Schedule {
        let limit_ms = u64::try_from(limit.as_millis()).unwrap_or(u64::MAX);
        if self.delay_ms <= limit_ms {
            return self;
        }
        let tier = topology.tier_at_most(limit_ms);
        Schedule {
            tier_ms: tier,
            delay_ms: limit_ms.max(tier),
        }
    }
}

/// The interval policy: short at first, doubling every few checks for long stable tasks up to
/// `max_interval_ms`, and shrinking again when the predicted completion is near.
pub fn next_interval(
    settings: &TrackingSettings,
    interval_index: u32,
    elapsed: Duration,
    predicted_total: Option<Duration>,
) -> Duration {
    let min = settings.min_interval_ms;
    let max = settings.max_interval_ms.max(min);
    // Five checks at the minimum, then double every four checks.
    let doublings = interval_index.saturating_sub(4) / 4;
    let grown = min.saturating_mul(1u64 << doublings.min(20)).min(max);
    let mut interval = Duration::from_millis(grown);
    if let Some(total) = predicted_total {
        let remaining = total.saturating_sub(elapsed);
        if remaining < interval {
            interval = remaining.max(Duration::from_millis(min));
        }
    }
    interval
}

/// Maps a wanted delay onto the tiers: the largest tier not above it, so checks are never late
/// by policy; a delay longer than the longest tier rides the longest tier and goes round again
/// on arrival; `at_least` (a provider's `Retry-After`) rounds up instead.
pub fn schedule(topology: &Topology, wanted: Duration, at_least: Option<Duration>) -> Schedule {
    let wanted_ms = u64::try_from(wanted.as_millis()).unwrap_or(u64::MAX);
    let longest = topology.longest_tier_ms();
    match at_least {
        Some(min) if u64::try_from(min.as_millis()).unwrap_or(u64::MAX) >= wanted_ms => {
            let min_ms = u64::try_from(min.as_millis()).unwrap_or(u64::MAX);
            if min_ms > longest {
                Schedule {
                    tier_ms: longest,
                    delay_ms: min_ms,
                }
            } else {
                let tier = topology.tier_at_least(min_ms);
                Schedule {
                    tier_ms: tier,
                    delay_ms: tier,
                }
            }
        }
        _ if wanted_ms > longest => Schedule {
            tier_ms: longest,
            delay_ms: wanted_ms,
        },
        _ => {
            let mut tier = topology.tier_at_most(wanted_ms);
            // The largest tier under the wanted delay may still be under the floor: then the
            // smallest one over the floor (it exists: the floor is under `wanted` ≤ longest).
            if let Some(min) = at_least {
                let min_ms = u64::try_from(min.as_millis()).unwrap_or(u64::MAX);
                if tier < min_ms {
                    tier = topology.tier_at_least(min_ms);
                }
            }
            Schedule {
                tier_ms: tier,
                delay_ms: tier,
            }
        }
    }
}

/// What a check publishes as the task's progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublishedProgress {
    /// 0–99: 100 is only ever the provider's word that the video is done.
    pub percent: u8,
    /// How long the whole task is expected to take, from its start.
    pub predicted_total: Option<Duration>,
}

/// Progress we publish: the provider's number when it has one, else an estimate from elapsed
/// time against the model's median duration; never backwards, never 100 before the provider
/// says done.
pub fn published_progress(
    previous: i16,
    provider_progress: Option<u8>,
    elapsed: Duration,
    median: Option<Duration>,
) -> PublishedProgress {
    let (raw, total) = match (provider_progress, median) {
        (Some(p), _) => {
            let total = if p > 0 {
                Some(elapsed.mul_f64(100.0 / f64::from(p)))
            } else {
                median
            };
            (p, total)
        }
        (None, Some(m)) if !m.is_zero() => {
            let est = (elapsed.as_secs_f64() / m.as_secs_f64() * 100.0).floor();
            (est.clamp(0.0, 95.0) as u8, Some(m))
        }
        (None, _) => (0, None),
    };
    let previous = u8::try_from(previous.clamp(0, 100)).unwrap_or(0);
    PublishedProgress {
        percent: raw.min(99).max(previous.min(99)),
        predicted_total: total,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> TrackingSettings {
        crate::config::Settings::load_from(&[]).unwrap().tracking
    }

    #[test]
    fn interval_starts_short_grows_and_caps() {
        let s = settings();
        let at = |i| next_interval(&s, i, Duration::from_secs(0), None).as_millis() as u64;
        assert_eq!(at(0), 2000);
        assert_eq!(at(4), 2000);
        assert_eq!(at(8), 4000);
        assert_eq!(at(12), 8000);
        assert_eq!(at(100), 30000);
    }

    #[test]
    fn interval_shrinks_near_predicted_completion() {
        let s = settings();
        let i = next_interval(
            &s,
            40,
            Duration::from_secs(100),
            Some(Duration::from_secs(105)),
        );
        assert_eq!(i, Duration::from_secs(5));
        let i = next_interval(
            &s,
            40,
            Duration::from_secs(100),
            Some(Duration::from_secs(100)),
        );
        assert_eq!(i, Duration::from_millis(2000), "never below the minimum");
    }

    #[test]
    fn schedule_snaps_to_tiers() {
        let t = Topology::new("", 16, vec![1000, 2000, 5000, 10000, 30000, 60000]);
        assert_eq!(
            schedule(&t, Duration::from_millis(4000), None),
            Schedule {
                tier_ms: 2000,
                delay_ms: 2000
            }
        );
        assert_eq!(
            schedule(&t, Duration::from_millis(500), None),
            Schedule {
                tier_ms: 1000,
                delay_ms: 1000
            }
        );
        assert_eq!(
            schedule(&t, Duration::from_secs(90), None),
            Schedule {
                tier_ms: 60000,
                delay_ms: 90000
            }
        );
        // Retry-After stretches the interval to at least that long.
        assert_eq!(
            schedule(
                &t,
                Duration::from_millis(2000),
                Some(Duration::from_millis(3000))
            ),
            Schedule {
                tier_ms: 5000,
                delay_ms: 5000
            }
        );
        // A floor under a longer wanted delay: the tier under the wanted delay is below the
        // floor, so the tier over the floor carries it.
        assert_eq!(
            schedule(
                &t,
                Duration::from_millis(8000),
                Some(Duration::from_millis(6000))
            ),
            Schedule {
                tier_ms: 10000,
                delay_ms: 10000
            }
        );
        assert_eq!(
            schedule(
                &t,
                Duration::from_millis(12000),
                Some(Duration::from_millis(5000))
            ),
            Schedule {
                tier_ms: 10000,
                delay_ms: 10000
            }
        );
    }

    #[test]
    fn published_progress_is_monotonic_and_never_complete() {
        assert_eq!(
            published_progress(40, Some(30), Duration::from_secs(3), None).percent,
            40
        );
        assert_eq!(
            published_progress(40, Some(100), Duration::from_secs(3), None).percent,
            99
        );
        let p = published_progress(
            0,
            None,
            Duration::from_secs(5),
            Some(Duration::from_secs(10)),
        );
        assert_eq!(p.percent, 50);
        assert_eq!(p.predicted_total, Some(Duration::from_secs(10)));
        assert_eq!(
            published_progress(
                0,
                None,
                Duration::from_secs(50),
                Some(Duration::from_secs(10))
            )
            .percent,
            95
        );
        assert_eq!(
            published_progress(0, None, Duration::from_secs(5), None).percent,
            0
        );
    }

    #[test]
    fn a_schedule_past_the_deadline_is_brought_forward_and_never_overflows() {
        let t = Topology::new("", 16, vec![1000, 2000, 5000, 10000, 30000, 60000]);
        let day = schedule(
            &t,
            Duration::from_secs(5),
            Some(Duration::from_secs(86_400)),
        );
        let bounded = day.within(&t, Duration::from_secs(20));
        assert_eq!(bounded.delay_ms, 20_000);
        assert!(bounded.tier_ms <= 20_000);
        assert_eq!(bounded.within(&t, Duration::from_secs(60)), bounded);
        let past = day.within(&t, Duration::ZERO);
        assert_eq!(
            past.tier_ms, past.delay_ms,
            "the shortest tier: due at once"
        );
        let huge = schedule(&t, Duration::from_secs(5), Some(Duration::MAX));
        assert!(huge.due_at() > messages::now());
        assert!(
            huge.within(&t, Duration::from_secs(20)).due_at()
                < messages::now() + chrono::TimeDelta::seconds(21)
        );
    }
}
