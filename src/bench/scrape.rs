//! Prometheus text format, as the service's `/metrics` serves it.

use std::collections::BTreeMap;

/// Label pairs of one sample.
type Labels = Vec<(String, String)>;

/// A scrape of `/metrics`: `(name, labels, value)` samples.
#[derive(Debug, Clone, Default)]
pub(super) struct Scrape {
    samples: Vec<(String, Labels, f64)>,
}

impl Scrape {
    pub(super) fn parse(text: &str) -> Self {
        let mut samples = Vec::new();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (series, value) = match line.rsplit_once(' ') {
                Some(x) => x,
                None => continue,
            };
            let Ok(value) = value.trim().parse::<f64>() else {
                continue;
            };
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, parse_labels(rest.trim_end_matches('}'))),
                None => (series, Vec::new()),
            };
            samples.push((name.trim().to_owned(), labels, value));
        }
        Self { samples }
    }

    /// Sum of the samples named `name` whose labels include every pair of `filter`.
    pub(super) fn sum(&self, name: &str, filter: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|(n, labels, _)| {
                n == name
                    && filter
                        .iter()
                        .all(|(k, v)| labels.iter().any(|(lk, lv)| lk == k && lv == v))
            })
            .map(|(_, _, v)| v)
            .sum()
    }

    /// Every value of label `label` on samples named `name`, with the sample.
    pub(super) fn by_label(&self, name: &str, label: &str) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        for (n, labels, v) in &self.samples {
            if n != name {
                continue;
            }
            if let Some((_, lv)) = labels.iter().find(|(k, _)| k == label) {
                *out.entry(lv.clone()).or_insert(0.0) += v;
            }
        }
        out
    }

    /// Cumulative buckets of histogram `name` (`name_bucket{le=…}`), ascending.
    pub(super) fn buckets(&self, name: &str) -> Vec<(f64, f64)> {
        let bucket = format!("{name}_bucket");
        let mut out: Vec<(f64, f64)> = self
            .samples
            .iter()
            .filter(|(n, _, _)| *n == bucket)
            .filter_map(|(_, labels, v)| {
                let le = labels.iter().find(|(k, _)| k == "le")?.1.as_str();
                let bound = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().ok()?
                };
                Some((bound, *v))
            })
            .collect();
        out.sort_by(|a, b| a.0.total_cmp(&b.0));
        out
    }
}

fn parse_labels(s: &str) -> Labels {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some((key, after)) = rest.split_once("=\"") {
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, n)) = chars.next() {
                        value.push(n);
                    }
                }
                '"' => {
                    end = i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        out.push((key.trim().trim_start_matches(',').trim().to_owned(), value));
        rest = &after[end.min(after.len())..];
    }
    out
}

/// Bucket-wise difference of two cumulative histograms with the same bounds.
pub(super) fn histogram_delta(before: &[(f64, f64)], after: &[(f64, f64)]) -> Vec<(f64, f64)> {
    after
        .iter()
        .map(|&(bound, count)| {
            let earlier = before
                .iter()
                .find(|(b, _)| *b == bound)
                .map_or(0.0, |(_, c)| *c);
            (bound, (count - earlier).max(0.0))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrape_parses_counters_and_histograms() {
        let text = r#"
# TYPE video_progress_checks_total counter
video_progress_checks_total{outcome="unchanged"} 10
video_progress_checks_total{outcome="progressed"} 5
video_progress_owned_partitions 16
video_progress_scheduling_lag_seconds_bucket{le="0.005"} 3
video_progress_scheduling_lag_seconds_bucket{le="+Inf"} 4
video_progress_scheduling_lag_seconds_bucket{le="0.05"} 4
"#;
        let s = Scrape::parse(text);
        assert_eq!(s.sum("video_progress_checks_total", &[]), 15.0);
        assert_eq!(
            s.sum("video_progress_checks_total", &[("outcome", "progressed")]),
            5.0
        );
        assert_eq!(s.sum("video_progress_owned_partitions", &[]), 16.0);
        let b = s.buckets("video_progress_scheduling_lag_seconds");
        assert_eq!(b, vec![(0.005, 3.0), (0.05, 4.0), (f64::INFINITY, 4.0)]);
        let d = histogram_delta(&[(0.005, 1.0), (0.05, 1.0), (f64::INFINITY, 1.0)], &b);
        assert_eq!(d, vec![(0.005, 2.0), (0.05, 3.0), (f64::INFINITY, 3.0)]);
        assert_eq!(
            parse_labels(r#"provider="sim",operation="status""#),
            vec![
                ("provider".to_owned(), "sim".to_owned()),
                ("operation".to_owned(), "status".to_owned())
            ]
        );
    }
}
