//! The overhead governor: keeps deferprobe's probe cost within `--max-overhead` percent of one
//! CPU. Pure: hit counts and the calibrated cost per hit in, a duty cycle per sampled probe
//! family out; the session applies it by attaching families for that fraction of each tick.
//!
//! Defer probes always stay on (they are what deferprobe is for). When the projected cost
//! exceeds the budget, allocation probes are sampled first, then map writes.

use serde::Serialize;

use crate::plan::ProbeProgram;

/// Probe families the governor may sample, most expensive-to-keep first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SampledFamily {
    Allocations,
    MapWrites,
}

impl SampledFamily {
    /// In the order they are degraded.
    pub const ALL: [SampledFamily; 2] = [SampledFamily::Allocations, SampledFamily::MapWrites];

    pub fn programs(self) -> &'static [ProbeProgram] {
        match self {
            SampledFamily::Allocations => {
                &[ProbeProgram::Mallocgc, ProbeProgram::MallocgcSizeClass]
            }
            SampledFamily::MapWrites => &[ProbeProgram::MapAssign],
        }
    }

    /// As in the report: `allocations`, `map_writes`.
    pub fn name(self) -> &'static str {
        match self {
            SampledFamily::Allocations => "allocations",
            SampledFamily::MapWrites => "map_writes",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Duty cycles are chosen from these steps (fewer changes, less flapping).
const STEPS: [f64; 8] = [0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0];

/// Raise a duty cycle only when the projection at the higher step stays under this share of
/// the budget (hysteresis).
const RAISE_BELOW: f64 = 0.8;

#[derive(Clone, Debug)]
pub struct Governor {
    /// Budget in probe-ns per second of wall time.
    budget_ns_per_s: f64,
    /// Calibrated cost of one probe hit.
    hit_ns: f64,
    /// Current duty cycle per sampled family (1 = always attached).
    duty: [f64; 2],
    /// Latest hits-per-second estimate per sampled family (None until observed).
    rate: [Option<f64>; 2],
    /// Never go below this duty cycle (0 allows detaching a family entirely).
    min_duty: f64,
    /// Whether fractional duty cycles are possible (sampling in time windows); if not, a
    /// family is either attached or detached.
    windows: bool,
}

/// What one tick observed: hits per family during `seconds`, with the duty cycles that were
/// in force.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Observation {
    pub seconds: f64,
    /// Hits of the always-on defer probes.
    pub defer_hits: u64,
    /// Hits of each sampled family, indexed like [`SampledFamily::ALL`].
    pub sampled_hits: [u64; 2],
}

/// A duty cycle that changed, for the log.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Change {
    pub family: SampledFamily,
    pub from: f64,
    pub to: f64,
    /// Projected share of one CPU (percent) with every family fully on.
    pub projected_percent: f64,
}

impl Governor {
    /// `max_overhead_percent` of one CPU; `hit_ns` from calibration; `min_duty` 0 when families
    /// may be detached entirely, or a floor when they are sampled in windows; `windows` false
    /// when only on and off are possible.
    pub fn new(max_overhead_percent: f64, hit_ns: f64, min_duty: f64, windows: bool) -> Governor {
        Governor {
            budget_ns_per_s: max_overhead_percent / 100.0 * 1e9,
            hit_ns,
            duty: [1.0; 2],
            rate: [None; 2],
            min_duty: if windows { min_duty } else { 0.0 },
            windows,
        }
    }

    pub fn duty(&self, family: SampledFamily) -> f64 {
        self.duty[family.index()]
    }

    /// Takes one tick's counts and returns the duty cycles that changed.
    pub fn observe(&mut self, observation: &Observation) -> Vec<Change> {
        if observation.seconds <= 0.0 {
            return Vec::new();
        }
        for family in SampledFamily::ALL {
            let duty = self.duty[family.index()];
            // A family attached for a fraction of the tick saw that fraction of its hits.
            if duty > 0.0 {
                let hits = observation.sampled_hits[family.index()] as f64;
                self.rate[family.index()] = Some(hits / (duty * observation.seconds));
            }
        }
        let defer_cost = observation.defer_hits as f64 / observation.seconds * self.hit_ns;
        let cost = |family: SampledFamily| self.rate[family.index()].unwrap_or(0.0) * self.hit_ns;
        let projected = defer_cost + SampledFamily::ALL.iter().map(|f| cost(*f)).sum::<f64>();

        // Degrade in order: each family gets what the budget leaves after the always-on
        // probes and the families degraded after it (kept at full duty if they fit).
        let mut changes = Vec::new();
        let mut left = self.budget_ns_per_s - defer_cost;
        let later_cost = |index: usize| -> f64 {
            SampledFamily::ALL[index + 1..].iter().map(|f| cost(*f)).sum()
        };
        for (index, family) in SampledFamily::ALL.into_iter().enumerate() {
            let wanted = if cost(family) == 0.0 {
                1.0
            } else {
                ((left - later_cost(index)) / cost(family)).clamp(0.0, 1.0)
            };
            let current = self.duty[family.index()];
            let step = STEPS
                .iter()
                .copied()
                .filter(|step| self.windows || *step == 0.0 || *step == 1.0)
                .filter(|step| *step >= self.min_duty && *step <= wanted.max(self.min_duty))
                .fold(self.min_duty, f64::max);
            let next = if step > current {
                // Raise only with headroom, so the duty doesn't flap between two steps.
                let headroom = left - later_cost(index) - step * cost(family);
                if headroom >= (1.0 - RAISE_BELOW) * self.budget_ns_per_s
                    || step == 1.0 && wanted >= 1.0
                {
                    step
                } else {
                    current
                }
            } else {
                step
            };
            if next != current {
                self.duty[family.index()] = next;
                changes.push(Change {
                    family,
                    from: current,
                    to: next,
                    projected_percent: projected / 1e9 * 100.0,
                });
            }
            left -= next * cost(family);
        }
        changes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HIT_NS: f64 = 20_000.0; // this VM

    fn tick(defers: u64, allocs: u64, maps: u64) -> Observation {
        Observation { seconds: 1.0, defer_hits: defers, sampled_hits: [allocs, maps] }
    }

    #[test]
    fn everything_on_within_budget() {
        // 5% of a CPU = 50 ms/s = 2500 hits/s at 20 µs.
        let mut governor = Governor::new(5.0, HIT_NS, 0.05, true);
        assert!(governor.observe(&tick(500, 1000, 500)).is_empty());
        assert_eq!(governor.duty(SampledFamily::Allocations), 1.0);
        assert_eq!(governor.duty(SampledFamily::MapWrites), 1.0);
    }

    #[test]
    fn allocations_degrade_first() {
        let mut governor = Governor::new(5.0, HIT_NS, 0.05, true);
        // 700 defers + 1300 maps + 3000 allocs per second: 10% of a CPU.
        let changes = governor.observe(&tick(700, 3000, 1300));
        assert_eq!(changes.len(), 1, "{changes:?}");
        assert_eq!(changes[0].family, SampledFamily::Allocations);
        assert!((changes[0].projected_percent - 10.0).abs() < 1e-9);
        // Budget left for allocations: 2500 - 700 - 1300 = 500 hits/s of 3000: 1/6 → 0.1.
        assert_eq!(governor.duty(SampledFamily::Allocations), 0.1);
        assert_eq!(governor.duty(SampledFamily::MapWrites), 1.0);
        // Next tick sees only the sampled tenth, and the estimate stays the same: stable.
        assert!(governor.observe(&tick(700, 300, 1300)).is_empty());
    }

    #[test]
    fn map_writes_degrade_when_allocations_are_at_the_floor() {
        let mut governor = Governor::new(2.0, HIT_NS, 0.0, true);
        // 1000 hits/s budget; defers take 600, maps 2000, allocs 4000.
        governor.observe(&tick(600, 4000, 2000));
        assert_eq!(governor.duty(SampledFamily::Allocations), 0.0);
        assert_eq!(governor.duty(SampledFamily::MapWrites), 0.2);
        // Defers stay on even if they alone exceed the budget.
        let mut governor = Governor::new(1.0, HIT_NS, 0.0, true);
        governor.observe(&tick(5000, 10, 10));
        assert_eq!(governor.duty(SampledFamily::Allocations), 0.0);
        assert_eq!(governor.duty(SampledFamily::MapWrites), 0.0);
    }

    #[test]
    fn without_windows_a_family_is_on_or_off() {
        let mut governor = Governor::new(5.0, HIT_NS, 0.05, false);
        governor.observe(&tick(700, 3000, 1300));
        assert_eq!(governor.duty(SampledFamily::Allocations), 0.0);
        assert_eq!(governor.duty(SampledFamily::MapWrites), 1.0);
    }

    #[test]
    fn recovers_when_the_load_drops() {
        let mut governor = Governor::new(5.0, HIT_NS, 0.05, true);
        governor.observe(&tick(700, 3000, 1300));
        assert_eq!(governor.duty(SampledFamily::Allocations), 0.1);
        // The program calms down: the sampled window sees 10 allocations (100/s).
        let changes = governor.observe(&tick(100, 10, 100));
        assert_eq!(governor.duty(SampledFamily::Allocations), 1.0, "{changes:?}");
    }
}
