//! The console's headline figures, from this instance's own Prometheus recorder (the text
//! `/metrics` serves, parsed back): checks per second and the scheduling lag's p99 over the last
//! minute, and the orphaned checks, re-armed chains and parked messages since this process
//! started. They are this instance's only: with several instances, Prometheus (see
//! `deploy/grafana/`) is where they add up.
//!
//! A rate needs two readings: the console keeps the readings it took in the last minute (at
//! most one a second) and compares the newest with the oldest. Until a second reading exists
//! (the first second after the page opened) the rate and the p99 are `null`, not a guess.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use serde::Serialize;

/// How far back the rate and the p99 look.
const WINDOW: Duration = Duration::from_secs(60);
/// Readings closer together than this are not kept.
const MIN_SPACING: Duration = Duration::from_secs(1);

const CHECKS: &str = "video_progress_checks_total";
const LAG_BUCKET: &str = "video_progress_scheduling_lag_seconds_bucket";
const ORPHANED: &str = "video_progress_orphaned_checks_total";
const REARMED: &str = "video_progress_rearmed_total";
const PARKED: &str = "video_parked_messages_total";

/// Samples of a Prometheus text exposition.
#[derive(Debug, Clone, Default)]
pub struct MetricsText {
    samples: Vec<(String, String, f64)>,
}

impl MetricsText {
    /// Reads `name{labels} value` lines; comments and lines that do not parse are skipped.
    pub fn parse(text: &str) -> Self {
        let samples = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .filter_map(|line| {
                let (series, value) = line.rsplit_once(' ')?;
                let value = match value {
                    "+Inf" => f64::INFINITY,
                    "-Inf" => f64::NEG_INFINITY,
                    v => v.parse().ok()?,
                };
                let (name, labels) = match series.split_once('{') {
                    Some((name, rest)) => (name, rest.trim_end_matches('}')),
                    None => (series, ""),
                };
                Some((name.to_owned(), labels.to_owned(), value))
            })
            .collect();
        Self { samples }
    }

    /// The sum of every series of `name`.
    pub fn sum(&self, name: &str) -> f64 {
        self.samples
            .iter()
            .filter(|(n, _, _)| n == name)
            .map(|(_, _, v)| v)
            .sum()
    }

    /// The `le` buckets of histogram `{name}_bucket`, summed over its other labels, by bound.
    fn buckets(&self, bucket_name: &str) -> Vec<(f64, f64)> {
        let mut out: Vec<(f64, f64)> = Vec::new();
        for (_, labels, value) in self.samples.iter().filter(|(n, _, _)| n == bucket_name) {
            let Some(le) = label(labels, "le") else {
                continue;
            };
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                match le.parse::<f64>() {
                    Ok(le) => le,
                    Err(_) => continue,
                }
            };
            match out.iter_mut().find(|(b, _)| *b == le) {
                Some((_, count)) => *count += value,
                None => out.push((le, *value)),
            }
        }
        out.sort_by(|a, b| a.0.total_cmp(&b.0));
        out
    }
}

fn label<'a>(labels: &'a str, key: &str) -> Option<&'a str> {
    labels.split(',').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k.trim() == key).then(|| v.trim().trim_matches('"'))
    })
}

/// The `q` quantile of cumulative buckets (Prometheus's `histogram_quantile`: linear within the
/// bucket; the highest finite bound when it falls in `+Inf`). `None` without observations.
fn quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for &(le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                return Some(lower.0);
            }
            let within = count - lower.1;
            let fraction = if within > 0.0 {
                (rank - lower.1) / within
            } else {
                1.0
            };
            return Some(lower.0 + (le - lower.0) * fraction);
        }
        lower = (le, count);
    }
    Some(lower.0)
}

#[derive(Debug, Clone)]
struct Reading {
    at: Instant,
    checks: f64,
    lag: Vec<(f64, f64)>,
}

/// Readings of the last minute.
#[derive(Debug, Default)]
pub(super) struct Sampler {
    readings: VecDeque<Reading>,
}

/// What the console shows at the top.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Figures {
    /// Progress checks per second over `windowSeconds` (`null` before a second reading).
    pub checks_per_second: Option<f64>,
    /// The scheduling lag's p99 in seconds over `windowSeconds` (`null` without checks in it).
    pub lag_p99_seconds: Option<f64>,
    /// How far back the two figures above look.
    pub window_seconds: f64,
    /// Checks handled since this process started.
    pub checks_total: f64,
    /// Checks for a request id with no task row, since this process started.
    pub orphaned: f64,
    /// Check chains the sweeper re-armed, since this process started.
    pub rearmed: f64,
    /// Messages this process parked since it started.
    pub parked: f64,
}

impl Sampler {
    /// Takes a reading of `text` at `now` and computes the figures.
    pub(super) fn figures(&mut self, text: &MetricsText, now: Instant) -> Figures {
        let reading = Reading {
            at: now,
            checks: text.sum(CHECKS),
            lag: text.buckets(LAG_BUCKET),
        };
        while self
            .readings
            .front()
            .is_some_and(|r| now.saturating_duration_since(r.at) > WINDOW)
        {
            self.readings.pop_front();
        }
        let oldest = self.readings.front().cloned();
        let (checks_per_second, lag_p99_seconds, window) = match &oldest {
            Some(old) if now.saturating_duration_since(old.at) >= MIN_SPACING => {
                let dt = now.saturating_duration_since(old.at).as_secs_f64();
                let delta: Vec<(f64, f64)> = reading
                    .lag
                    .iter()
                    .map(|&(le, count)| {
                        let before = old
                            .lag
                            .iter()
                            .find(|(b, _)| *b == le)
                            .map_or(0.0, |(_, c)| *c);
                        (le, (count - before).max(0.0))
                    })
                    .collect();
                (
                    Some((reading.checks - old.checks).max(0.0) / dt),
                    quantile(0.99, &delta),
                    dt,
                )
            }
            _ => (None, None, 0.0),
        };
        let keep = self
            .readings
            .back()
            .is_none_or(|last| now.saturating_duration_since(last.at) >= MIN_SPACING);
        let checks_total = reading.checks;
        if keep {
            self.readings.push_back(reading);
        }
        Figures {
            checks_per_second,
            lag_p99_seconds,
            window_seconds: window,
            checks_total,
            orphaned: text.sum(ORPHANED),
            rearmed: text.sum(REARMED),
            parked: text.sum(PARKED),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(checks: u32, fast: u32, slow: u32) -> MetricsText {
        let total = fast + slow;
        MetricsText::parse(&format!(
            "# HELP {CHECKS} x\n# TYPE {CHECKS} counter\n\
             {CHECKS}{{outcome=\"progress\"}} {checks}\n{CHECKS}{{outcome=\"completed\"}} 1\n\
             {LAG_BUCKET}{{le=\"0.01\"}} {fast}\n{LAG_BUCKET}{{le=\"0.1\"}} {fast}\n\
             {LAG_BUCKET}{{le=\"1\"}} {total}\n{LAG_BUCKET}{{le=\"+Inf\"}} {total}\n\
             {ORPHANED} 2\n{REARMED} 3\n{PARKED}{{queue=\"a\"}} 4\n{PARKED}{{queue=\"b\"}} 1\n"
        ))
    }

    #[test]
    fn counters_sum_over_their_labels() {
        let t = text(9, 0, 0);
        assert_eq!(t.sum(CHECKS), 10.0);
        assert_eq!(t.sum(PARKED), 5.0);
        assert_eq!(t.sum("absent"), 0.0);
    }

    #[test]
    fn the_rate_and_p99_need_a_second_reading_and_cover_only_the_window() {
        let mut sampler = Sampler::default();
        let t0 = Instant::now();
        let first = sampler.figures(&text(0, 1000, 0), t0);
        assert_eq!(first.checks_per_second, None);
        assert_eq!(first.lag_p99_seconds, None);
        assert_eq!(
            (first.orphaned, first.rearmed, first.parked),
            (2.0, 3.0, 5.0)
        );
        // 100 more checks in 4 s, all of them slow (0.1 s to 1 s): the 1000 fast observations
        // before the window must not pull the p99 down.
        let later = sampler.figures(&text(100, 1000, 100), t0 + Duration::from_secs(4));
        assert_eq!(later.checks_per_second, Some(25.0));
        let p99 = later.lag_p99_seconds.expect("observations in the window");
        assert!((0.1..=1.0).contains(&p99), "{p99}");
        assert_eq!(later.window_seconds, 4.0);
    }

    #[test]
    fn the_quantile_interpolates_within_its_bucket() {
        let buckets = [(0.1, 50.0), (0.2, 100.0), (f64::INFINITY, 100.0)];
        assert_eq!(quantile(0.5, &buckets), Some(0.1));
        let p75 = quantile(0.75, &buckets).unwrap();
        assert!((p75 - 0.15).abs() < 1e-9, "{p75}");
        assert_eq!(quantile(0.99, &[(0.1, 0.0), (f64::INFINITY, 0.0)]), None);
        assert_eq!(
            quantile(0.99, &[(0.1, 0.0), (f64::INFINITY, 5.0)]),
            Some(0.1)
        );
    }
}
