//! Counters read from the service's `/metrics` (Prometheus text).

use std::collections::BTreeMap;

/// Counters summed over Prometheus text (`name{labels} value` lines).
#[derive(Debug, Clone, Default)]
pub struct Counters(BTreeMap<String, f64>);

impl Counters {
    /// Adds every sample of a `/metrics` page.
    pub fn add_page(&mut self, text: &str) {
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            if let Some((series, value)) = line.rsplit_once(' ') {
                if let Ok(v) = value.parse::<f64>() {
                    *self.0.entry(series.to_owned()).or_default() += v;
                }
            }
        }
    }

    /// The sum of every series of `name` whose labels contain `label` (`""` for all).
    pub fn sum(&self, name: &str, label: &str) -> u64 {
        let total: f64 = self
            .0
            .iter()
            .filter(|(series, _)| {
                (series.as_str() == name || series.starts_with(&format!("{name}{{")))
                    && series.contains(label)
            })
            .map(|(_, v)| *v)
            .sum();
        total.round() as u64
    }
}
