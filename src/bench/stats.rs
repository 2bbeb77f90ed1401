//! Percentiles of samples and quantiles of Prometheus histograms.

use super::report::LagMs;

/// Nearest-rank percentile of sorted samples (`q` in 0–1); 0 when empty.
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q.clamp(0.0, 1.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Lag figures from raw samples in milliseconds.
pub fn lag_from_samples(mut samples: Vec<f64>) -> LagMs {
    samples.sort_by(f64::total_cmp);
    LagMs {
        p50: percentile(&samples, 0.50),
        p99: percentile(&samples, 0.99),
        max: samples.last().copied().unwrap_or(0.0),
        samples: samples.len() as u64,
    }
}

/// A quantile of a cumulative histogram (`(upper bound, cumulative count)`, ascending, the last
/// bound possibly infinite), interpolated linearly inside the bucket as Prometheus does. A
/// quantile in the `+Inf` bucket answers the highest finite bound.
pub fn histogram_quantile(buckets: &[(f64, f64)], q: f64) -> f64 {
    let Some(&(_, total)) = buckets.last() else {
        return 0.0;
    };
    if total <= 0.0 {
        return 0.0;
    }
    let rank = q.clamp(0.0, 1.0) * total;
    let mut lower = 0.0;
    let mut below = 0.0;
    for &(bound, cumulative) in buckets {
        if cumulative >= rank && cumulative > below {
            if bound.is_infinite() {
                return lower;
            }
            return lower + (bound - lower) * (rank - below) / (cumulative - below);
        }
        if bound.is_finite() {
            lower = bound;
        }
        below = cumulative;
    }
    lower
}

/// Upper bound of the highest bucket that holds anything (the highest finite bound when that is
/// `+Inf`); 0 when empty.
pub fn histogram_max(buckets: &[(f64, f64)]) -> f64 {
    let mut below = 0.0;
    let mut max = 0.0;
    let mut last_finite = 0.0;
    for &(bound, cumulative) in buckets {
        if cumulative > below {
            max = if bound.is_finite() {
                bound
            } else {
                last_finite
            };
        }
        if bound.is_finite() {
            last_finite = bound;
        }
        below = cumulative;
    }
    max
}

/// Lag from a delta of the lag histogram (seconds), in milliseconds.
pub(super) fn lag_from_histogram(buckets: &[(f64, f64)]) -> LagMs {
    LagMs {
        p50: round2(histogram_quantile(buckets, 0.50) * 1000.0),
        p99: round2(histogram_quantile(buckets, 0.99) * 1000.0),
        max: round2(histogram_max(buckets) * 1000.0),
        samples: buckets.last().map_or(0, |b| b.1 as u64),
    }
}

pub(super) fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

pub(super) fn per_1000(cpu_secs: f64, count: f64) -> f64 {
    if count <= 0.0 {
        0.0
    } else {
        (cpu_secs / count * 1000.0 * 10_000.0).round() / 10_000.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_is_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 50.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&v, 1.0), 100.0);
        assert_eq!(percentile(&v, 0.0), 1.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
        assert_eq!(percentile(&[7.0], 0.99), 7.0);
    }

    #[test]
    fn lag_from_samples_sorts_first() {
        let lag = lag_from_samples(vec![5.0, 1.0, 3.0, 2.0, 4.0]);
        assert_eq!(lag.p50, 3.0);
        assert_eq!(lag.max, 5.0);
        assert_eq!(lag.samples, 5);
    }

    #[test]
    fn histogram_quantile_interpolates_inside_buckets() {
        // 100 observations: 50 in (0, 0.01], 40 in (0.01, 0.05], 10 in (0.05, 0.1].
        let b = [
            (0.01, 50.0),
            (0.05, 90.0),
            (0.1, 100.0),
            (f64::INFINITY, 100.0),
        ];
        assert!((histogram_quantile(&b, 0.5) - 0.01).abs() < 1e-9);
        assert!((histogram_quantile(&b, 0.7) - 0.03).abs() < 1e-9);
        assert!((histogram_quantile(&b, 0.99) - 0.095).abs() < 1e-9);
        assert_eq!(histogram_max(&b), 0.1);
        assert_eq!(histogram_quantile(&[], 0.5), 0.0);
        assert_eq!(
            histogram_quantile(&[(0.1, 0.0), (f64::INFINITY, 0.0)], 0.5),
            0.0
        );
    }

    #[test]
    fn histogram_overflow_answers_the_highest_finite_bound() {
        let b = [(0.01, 1.0), (30.0, 1.0), (f64::INFINITY, 3.0)];
        assert_eq!(histogram_quantile(&b, 0.99), 30.0);
        assert_eq!(histogram_max(&b), 30.0);
    }
}
