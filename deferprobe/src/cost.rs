//! What a probe hit really costs the target while it runs, measured rather than calibrated:
//! the target's CPU time against its probe hits, compared within each governor tick between
//! its sampling window (the sampled families attached) and the rest of the tick (detached). In
//! the same tick the program's own load is about the same in both parts, so the difference in
//! CPU time per second, against the difference in hits per second, is what the hits cost: the
//! kernel handles a uprobe trap in the target's context, on its CPU time. Over many ticks the
//! slope of those differences (a least-squares fit through the origin) is the cost per hit,
//! with a standard error from the scatter. Pure: the sampler feeds it.

use std::collections::VecDeque;

/// Ticks the estimate is fitted over (the most recent ones).
const WINDOW_TICKS: usize = 120;
/// Ticks before an estimate is given at all.
pub const MIN_TICKS: usize = 10;
/// Each part of a tick must last this long to be compared.
const MIN_PART_SECS: f64 = 0.1;

/// The target's CPU time (ns) and the probes' hits at one moment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mark {
    pub at_ns: u64,
    pub cpu_ns: u64,
    pub hits: u64,
}

/// The measured cost of a hit.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Measured {
    pub ns_per_hit: f64,
    /// One standard error.
    pub error_ns: f64,
    pub ticks: usize,
}

impl Measured {
    /// Good enough to keep the budget on: its error under a third of it.
    pub fn is_solid(&self) -> bool {
        self.ticks >= MIN_TICKS && self.ns_per_hit > 0.0 && self.error_ns < self.ns_per_hit / 3.0
    }
}

#[derive(Clone, Debug, Default)]
pub struct RealCost {
    /// Per tick: (CPU ns per second, hits per second), window part minus the rest.
    differences: VecDeque<(f64, f64)>,
}

impl RealCost {
    /// One tick: from its start to the end of its window (families attached), then to its end.
    pub fn tick(&mut self, start: Mark, window_end: Mark, end: Mark) {
        let rate = |from: Mark, to: Mark| {
            let seconds = to.at_ns.saturating_sub(from.at_ns) as f64 / 1e9;
            (seconds >= MIN_PART_SECS).then(|| {
                let cpu = to.cpu_ns.saturating_sub(from.cpu_ns) as f64 / seconds;
                let hits = to.hits.saturating_sub(from.hits) as f64 / seconds;
                (cpu, hits)
            })
        };
        let (Some((cpu_on, hits_on)), Some((cpu_off, hits_off))) =
            (rate(start, window_end), rate(window_end, end))
        else {
            return;
        };
        if self.differences.len() == WINDOW_TICKS {
            self.differences.pop_front();
        }
        self.differences.push_back((cpu_on - cpu_off, hits_on - hits_off));
    }

    /// The cost per hit over the recent ticks, once there are [`MIN_TICKS`] of them and the
    /// hit rates differed.
    pub fn measured(&self) -> Option<Measured> {
        let n = self.differences.len();
        let sxx: f64 = self.differences.iter().map(|(_, h)| h * h).sum();
        if n < MIN_TICKS || sxx <= 0.0 {
            return None;
        }
        let sxy: f64 = self.differences.iter().map(|(c, h)| c * h).sum();
        let slope = sxy / sxx;
        let residuals: f64 =
            self.differences.iter().map(|(c, h)| (c - slope * h) * (c - slope * h)).sum();
        let error = (residuals / (n - 1) as f64 / sxx).sqrt();
        Some(Measured { ns_per_hit: slope, error_ns: error, ticks: n })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mark(at_ms: u64, cpu_ms: f64, hits: u64) -> Mark {
        Mark { at_ns: at_ms * 1_000_000, cpu_ns: (cpu_ms * 1e6) as u64, hits }
    }

    /// A program using 300 ms of CPU a second of its own, ± noise, and 20,000 hits/s while
    /// the families are attached (2,000/s of always-on probes otherwise) at 800 ns a hit.
    #[test]
    fn recovers_the_cost_per_hit_from_windows() {
        let mut cost = RealCost::default();
        let (mut at, mut cpu, mut hits) = (0u64, 0.0f64, 0u64);
        for tick in 0..40u64 {
            let start = mark(at, cpu, hits);
            let load = 300.0 + ((tick * 7919) % 41) as f64 - 20.0; // ms of CPU per second
            // 400 ms window: 8,000 + 800 hits.
            let window_hits = 8_800;
            cpu += load * 0.4 + window_hits as f64 * 800e-6;
            hits += window_hits;
            at += 400;
            let window_end = mark(at, cpu, hits);
            let rest_hits = 1_200;
            cpu += load * 0.6 + rest_hits as f64 * 800e-6;
            hits += rest_hits;
            at += 600;
            cost.tick(start, window_end, mark(at, cpu, hits));
        }
        let measured = cost.measured().unwrap();
        assert!((measured.ns_per_hit - 800.0).abs() < 40.0, "{measured:?}");
        assert!(measured.is_solid(), "{measured:?}");
        assert_eq!(measured.ticks, 40);
    }

    #[test]
    fn nothing_without_enough_ticks_or_contrast() {
        let mut cost = RealCost::default();
        for tick in 0..(MIN_TICKS as u64 - 1) {
            let t = tick * 1000;
            cost.tick(mark(t, 0.0, 0), mark(t + 500, 100.0, 500), mark(t + 1000, 150.0, 600));
        }
        assert_eq!(cost.measured(), None);
        // Windows too short to compare are left out.
        cost.tick(mark(0, 0.0, 0), mark(50, 10.0, 100), mark(1000, 50.0, 200));
        assert_eq!(cost.measured(), None);
        // The same hit rate in both parts says nothing.
        let mut flat = RealCost::default();
        for tick in 0..20u64 {
            let t = tick * 1000;
            flat.tick(mark(t, 0.0, 0), mark(t + 500, 100.0, 500), mark(t + 1000, 200.0, 1000));
        }
        assert_eq!(flat.measured(), None);
    }
}
