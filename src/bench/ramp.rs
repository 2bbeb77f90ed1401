//! The ramp the baseline and the service both climb: grow the population while the rate keeps up
//! with it, so the fastest step sits just past the knee.

use super::report::{HopWindow, ServiceWindow};

/// A rate at or above this share of `population / interval` is bound by the population, not by
/// the system: there is room for more.
const POPULATION_BOUND: f64 = 0.9;
/// Each step grows the population by this much (percent), from below, so the saturated step sits
/// just past the knee rather than under a backlog of seconds.
const RAMP_GROWTH_PCT: usize = 150;
/// A ramp stops after this many steps.
const MAX_RAMP_STEPS: usize = 6;

/// A measured window's throughput, per second.
pub(super) trait Rate {
    fn per_sec(&self) -> f64;
}

impl Rate for HopWindow {
    fn per_sec(&self) -> f64 {
        self.hops_per_sec
    }
}

impl Rate for ServiceWindow {
    fn per_sec(&self) -> f64 {
        self.checks_per_sec
    }
}

/// Runs `step(index, population)` from `first` messages or tasks, each cycling every
/// `interval_ms`, growing the population while the measured rate is bound by it; returns every
/// step's window.
pub(super) async fn climb<W: Rate>(
    first: usize,
    interval_ms: u64,
    mut step: impl AsyncFnMut(usize, usize) -> anyhow::Result<W>,
) -> anyhow::Result<Vec<W>> {
    let mut steps = Vec::new();
    let mut population = first;
    for index in 0..MAX_RAMP_STEPS {
        let window = step(index, population).await?;
        let bound =
            window.per_sec() >= POPULATION_BOUND * population as f64 * 1000.0 / interval_ms as f64;
        steps.push(window);
        if !bound {
            break;
        }
        population = population * RAMP_GROWTH_PCT / 100;
    }
    Ok(steps)
}

/// The step with the highest rate.
pub(super) fn fastest<W: Rate + Clone>(steps: &[W]) -> Option<W> {
    steps
        .iter()
        .max_by(|a, b| a.per_sec().total_cmp(&b.per_sec()))
        .cloned()
}
