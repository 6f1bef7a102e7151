//! The overhead governor: keeps deferprobe's probe cost within `--max-overhead` percent of one
//! CPU. Pure: hit counts and the calibrated cost per hit in, a duty cycle per sampled probe
//! family out; the session applies it by attaching families for that fraction of each tick.
//!
//! The probes pending defers are built from always stay on (heap defer registrations,
//! deferreturn in heap-defer frames, and goroutine exits once a heap defer has been seen: they
//! are what deferprobe is for). When the projected cost exceeds the budget, the others are
//! sampled: goroutine exits while no heap defer has been seen (then they only count exits),
//! stack-defer counting (a count that no finding depends on), then allocations, then map
//! writes. Rates are corrected for the slow-down the probes themselves caused while they were
//! measured, and observations too short to trust decide nothing.

use deferprobe_common::Gate;
use serde::Serialize;

use crate::plan::ProbeProgram;

/// Probe families the governor may sample, in the order they are degraded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SampledFamily {
    /// `runtime.goexit1`, until it is required (see [`Governor::require`]): before any heap
    /// defer it has no record to release and no cached goroutine id to forget, and only counts
    /// goroutine exits. A service that starts a goroutine per request (net/http does, for its
    /// background read) exits goroutines at its request rate.
    GoroutineExits,
    /// `runtime.deferprocStack`: stack defers can't pile up, so they are only counted.
    StackDefers,
    Allocations,
    MapWrites,
}

/// Number of [`SampledFamily`] values.
pub const SAMPLED_FAMILIES: usize = 4;

impl SampledFamily {
    /// In the order they are degraded.
    pub const ALL: [SampledFamily; SAMPLED_FAMILIES] = [
        SampledFamily::GoroutineExits,
        SampledFamily::StackDefers,
        SampledFamily::Allocations,
        SampledFamily::MapWrites,
    ];

    pub fn programs(self) -> &'static [ProbeProgram] {
        match self {
            SampledFamily::GoroutineExits => &[ProbeProgram::Goexit1],
            SampledFamily::StackDefers => &[ProbeProgram::DeferProcStack],
            SampledFamily::Allocations => &[
                ProbeProgram::Mallocgc,
                ProbeProgram::MallocgcSizeClass,
                ProbeProgram::ProfileAlloc,
            ],
            SampledFamily::MapWrites => &[ProbeProgram::MapAssign],
        }
    }

    /// Its probes' counting gate in the kernel.
    pub fn gate(self) -> Gate {
        match self {
            SampledFamily::GoroutineExits => Gate::GoroutineExits,
            SampledFamily::StackDefers => Gate::StackDefers,
            SampledFamily::Allocations => Gate::Allocations,
            SampledFamily::MapWrites => Gate::MapWrites,
        }
    }

    /// As in the report: `goroutine_exits`, `stack_defers`, `allocations`, `map_writes`.
    pub fn name(self) -> &'static str {
        match self {
            SampledFamily::GoroutineExits => "goroutine_exits",
            SampledFamily::StackDefers => "stack_defers",
            SampledFamily::Allocations => "allocations",
            SampledFamily::MapWrites => "map_writes",
        }
    }

    /// Its place in [`SampledFamily::ALL`] (and in every per-family array).
    pub fn index(self) -> usize {
        self as usize
    }
}

/// Duty cycles are chosen from these steps (fewer changes, less flapping).
const STEPS: [f64; 8] = [0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0];

/// A detached family (duty 0) is attached at [`REFRESH_DUTY`] in refresh ticks, so that its
/// hit rate, and with it the decision, stays current: in the tick it is detached and the next
/// two, then the 4th and 8th, then every this many ticks. The first ones catch the end of
/// what detached it (a start-up burst is often over within the second), and keep its
/// estimate measured there.
pub const REFRESH_EVERY_TICKS: u64 = 10;

/// Whether a family detached `ticks` ticks ago (0: in this tick) has a refresh window now.
fn is_refresh_tick(ticks: u64) -> bool {
    matches!(ticks, 0..=2 | 4 | 8) || ticks.is_multiple_of(REFRESH_EVERY_TICKS)
}

/// The duty cycle of a refresh window: 20 ms of a 1-second tick is thousands of hits in a busy
/// program, enough to measure a rate. What refresh windows cost is budgeted over the long run
/// (a detached family still takes `REFRESH_DUTY / REFRESH_EVERY_TICKS` of its full cost); the
/// first ones after a detach take `REFRESH_DUTY` each.
pub const REFRESH_DUTY: f64 = 0.02;

/// The governor plans with this multiple of the calibrated cost of a hit. Calibration times
/// hits on deferprobe's own thread, with an empty program; in a busy Go program a hit costs
/// more: the trap evicts the program's cache and TLB entries, and the real programs do more
/// than the empty one. In the benchmark's HTTP service a hit cost the server 0.86 – 1.78 × the
/// calibrated cost, depending on the probe family and the run (BENCHMARKS.md). A budget is a
/// cap: better to sample a little more than needed than to exceed it.
pub const HIT_COST_HEADROOM: f64 = 1.5;

/// An observation shorter than this decides nothing (its counts are too few to trust; e.g. a
/// tick that comes right after a between-ticks decision).
pub const MIN_OBSERVATION_SECS: f64 = 0.01;

/// A family's rate is measured only from observations in which it was attached at least this
/// long. Hits still arrive for a moment after a detach (until the link's breakpoints are gone);
/// divided by a fraction of a millisecond of attached time they would give absurd rates.
pub const MIN_ATTACHED_SECS: f64 = 0.01;

/// The largest share of a CPU the slow-down correction assumes the probes took (see
/// [`Governor::observe`]): rates are at most doubled.
const MAX_SLOWDOWN_SHARE: f64 = 0.5;

/// Raise a duty cycle only when the projection at the higher step stays under this share of
/// the budget (hysteresis).
const RAISE_BELOW: f64 = 0.8;

/// The cost per hit the governor plans with, from the calibrated one.
pub fn planned_hit_ns(calibrated_ns: f64) -> f64 {
    calibrated_ns * HIT_COST_HEADROOM
}

#[derive(Clone, Debug)]
pub struct Governor {
    /// Budget in probe-ns per second of wall time.
    budget_ns_per_s: f64,
    /// What the governor counts one probe hit as costing (the calibrated cost with
    /// [`HIT_COST_HEADROOM`]).
    hit_ns: f64,
    /// What a hit of each sampled family counts as costing, once measured on its own (else
    /// `hit_ns`).
    family_hit_ns: [Option<f64>; SAMPLED_FAMILIES],
    /// Current duty cycle per sampled family (1 = always attached).
    duty: [f64; SAMPLED_FAMILIES],
    /// Ticks each family has been detached for (None: attached, at some duty).
    detached_ticks: [Option<u64>; SAMPLED_FAMILIES],
    /// Families that must stay attached from now on (see [`Governor::require`]).
    required: [bool; SAMPLED_FAMILIES],
    /// Latest hits-per-second estimate per sampled family (None until observed).
    rate: [Option<f64>; SAMPLED_FAMILIES],
    /// The smallest fractional duty cycle; below it a family is detached.
    min_duty: f64,
    /// Whether the always-on defer probes alone cost more than the budget at the last tick.
    defers_over_budget: bool,
    /// Whether fractional duty cycles are possible (sampling in time windows); if not, a
    /// family is either attached or detached.
    windows: bool,
}

/// What one tick observed: hits per family during `seconds`, with the duty cycles that were
/// in force.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Observation {
    pub seconds: f64,
    /// Hits of the always-on defer probes (heap defers, deferreturn).
    pub defer_hits: u64,
    /// Hits of each sampled family, indexed like [`SampledFamily::ALL`].
    pub sampled_hits: [u64; SAMPLED_FAMILIES],
    /// The duty cycle each sampled family was attached at during the tick.
    pub duty_in_force: [f64; SAMPLED_FAMILIES],
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
    /// `max_overhead_percent` of one CPU; `hit_ns` what a hit counts as costing (see
    /// [`planned_hit_ns`]); `min_duty` 0 when families may be detached entirely, or a floor
    /// when they are sampled in windows; `windows` false when only on and off are possible.
    pub fn new(max_overhead_percent: f64, hit_ns: f64, min_duty: f64, windows: bool) -> Governor {
        Governor {
            budget_ns_per_s: max_overhead_percent / 100.0 * 1e9,
            hit_ns,
            family_hit_ns: [None; SAMPLED_FAMILIES],
            detached_ticks: [None; SAMPLED_FAMILIES],
            duty: [1.0; SAMPLED_FAMILIES],
            required: [false; SAMPLED_FAMILIES],
            rate: [None; SAMPLED_FAMILIES],
            min_duty: if windows { min_duty } else { 0.0 },
            defers_over_budget: false,
            windows,
        }
    }

    pub fn duty(&self, family: SampledFamily) -> f64 {
        self.duty[family.index()]
    }

    /// From now on `family` stays attached, and counts as always on: goroutine exits once a
    /// heap defer has been seen. Returns whether its duty cycle changed (to 1).
    pub fn require(&mut self, family: SampledFamily) -> bool {
        self.required[family.index()] = true;
        let changed = self.duty[family.index()] != 1.0;
        self.duty[family.index()] = 1.0;
        changed
    }

    /// `family` may be sampled again (it stays attached until the next decision lowers it).
    pub fn unrequire(&mut self, family: SampledFamily) {
        self.required[family.index()] = false;
    }

    pub fn is_required(&self, family: SampledFamily) -> bool {
        self.required[family.index()]
    }

    /// Of `sampled_hits` (indexed like [`SampledFamily::ALL`]), those of required families:
    /// always-on hits.
    pub fn required_hits(&self, sampled_hits: &[u64; SAMPLED_FAMILIES]) -> u64 {
        sampled_hits
            .iter()
            .zip(self.required)
            .filter(|(_, required)| *required)
            .map(|(h, _)| h)
            .sum()
    }

    /// The duty cycle to attach `family` at during the tick that starts now (called once per
    /// tick): its duty cycle, except that a detached family gets refresh windows (see
    /// [`REFRESH_EVERY_TICKS`]).
    pub fn duty_for_tick(&mut self, family: SampledFamily) -> f64 {
        let duty = self.duty(family);
        let detached = &mut self.detached_ticks[family.index()];
        *detached = (duty == 0.0).then(|| detached.map_or(0, |ticks| ticks + 1));
        match *detached {
            Some(ticks) if self.windows && is_refresh_tick(ticks) => REFRESH_DUTY,
            _ => duty,
        }
    }

    /// The latest estimate of `family`'s hits per second when fully attached.
    pub fn rate(&self, family: SampledFamily) -> Option<f64> {
        self.rate[family.index()]
    }

    /// What one hit counts as costing, in ns.
    pub fn hit_ns(&self) -> f64 {
        self.hit_ns
    }

    /// Keeps the budget on `hit_ns` from now on (the measured real cost of a hit).
    pub fn set_hit_ns(&mut self, hit_ns: f64) {
        self.hit_ns = hit_ns.max(1.0);
    }

    /// What a hit of `family` counts as costing: its own measured cost, or [`Self::hit_ns`].
    pub fn family_hit_ns(&self, family: SampledFamily) -> f64 {
        self.family_hit_ns[family.index()].unwrap_or(self.hit_ns)
    }

    /// Prices `family`'s hits at their own measured cost from now on (None: as every hit).
    pub fn set_family_hit_ns(&mut self, family: SampledFamily, hit_ns: Option<f64>) {
        self.family_hit_ns[family.index()] = hit_ns.map(|ns| ns.max(1.0));
    }

    /// Whether the always-on defer probes alone cost more than the budget at the last tick
    /// (then every sampled family is detached, and still the budget is not kept).
    pub fn defers_over_budget(&self) -> bool {
        self.defers_over_budget
    }

    /// Takes one tick's counts and returns the duty cycles that changed. An observation shorter
    /// than [`MIN_OBSERVATION_SECS`] changes nothing.
    pub fn observe(&mut self, observation: &Observation) -> Vec<Change> {
        if observation.seconds < MIN_OBSERVATION_SECS {
            return Vec::new();
        }
        // Probes slow down the program they trace: while they took a share f of a CPU, a
        // program doing its work on one CPU did only 1 − f of it, and every rate seen was that
        // much lower than it will be once families are degraded. Rates are scaled back up, so
        // that one decision lands within the budget instead of creeping down to it tick by
        // tick (a program on more CPUs slows down less: the correction then errs on the safe
        // side). A family sampled in a window is corrected for the share the probes took
        // during its window (windows start together at the tick: those of the other families
        // overlap it), far more than over the whole tick.
        let all_hits = observation.defer_hits + observation.sampled_hits.iter().sum::<u64>();
        let unslowed = |share: f64| 1.0 / (1.0 - share.min(MAX_SLOWDOWN_SHARE));
        let tick_share = all_hits as f64 * self.hit_ns / (observation.seconds * 1e9);
        let window_share = |duty: f64| {
            let hits_in_window = observation.defer_hits as f64 * duty
                + (observation.sampled_hits.iter().zip(observation.duty_in_force))
                    .filter(|(_, other)| *other > 0.0)
                    .map(|(hits, other)| *hits as f64 * (duty / other).min(1.0))
                    .sum::<f64>();
            hits_in_window * self.hit_ns / (duty * observation.seconds * 1e9)
        };
        for family in SampledFamily::ALL {
            let duty = observation.duty_in_force[family.index()];
            // A family attached for a fraction of the tick saw that fraction of its hits.
            if duty * observation.seconds >= MIN_ATTACHED_SECS {
                let hits = observation.sampled_hits[family.index()] as f64;
                let share = tick_share.max(window_share(duty));
                self.rate[family.index()] =
                    Some(hits / (duty * observation.seconds) * unslowed(share));
            }
        }
        let (rate, family_hit_ns, hit_ns) = (self.rate, self.family_hit_ns, self.hit_ns);
        let cost = |family: SampledFamily| {
            rate[family.index()].unwrap_or(0.0) * family_hit_ns[family.index()].unwrap_or(hit_ns)
        };
        let required = |family: SampledFamily| self.required[family.index()];
        let defer_cost = observation.defer_hits as f64 / observation.seconds
            * unslowed(tick_share)
            * self.hit_ns
            + SampledFamily::ALL.iter().filter(|f| required(**f)).map(|f| cost(*f)).sum::<f64>();
        let projected = defer_cost
            + SampledFamily::ALL.iter().filter(|f| !required(**f)).map(|f| cost(*f)).sum::<f64>();

        // Degrade in order: each family gets what the budget leaves after the always-on
        // probes and the families degraded after it (kept at full duty if they fit).
        let mut changes = Vec::new();
        self.defers_over_budget = defer_cost > self.budget_ns_per_s;
        let mut left = self.budget_ns_per_s - defer_cost;
        let later_cost = |index: usize| -> f64 {
            SampledFamily::ALL[index + 1..]
                .iter()
                .filter(|f| !required(**f))
                .map(|f| cost(*f))
                .sum()
        };
        for (index, family) in SampledFamily::ALL.into_iter().enumerate() {
            if required(family) {
                continue;
            }
            let wanted = if cost(family) == 0.0 {
                1.0
            } else {
                ((left - later_cost(index)) / cost(family)).clamp(0.0, 1.0)
            };
            let current = self.duty[family.index()];
            // The largest step that fits; 0 (detached) when not even the smallest does.
            let step = STEPS
                .iter()
                .copied()
                .filter(|step| self.windows || *step == 0.0 || *step == 1.0)
                .filter(|step| *step == 0.0 || *step >= self.min_duty)
                .filter(|step| *step <= wanted)
                .fold(0.0, f64::max);
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
            left -= self.mean_duty(next) * cost(family);
        }
        changes
    }

    /// The share of the time a family at `duty` is attached on average: a detached family
    /// still has its refresh windows.
    fn mean_duty(&self, duty: f64) -> f64 {
        match duty == 0.0 && self.windows {
            true => REFRESH_DUTY / REFRESH_EVERY_TICKS as f64,
            false => duty,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HIT_NS: f64 = 20_000.0; // this VM

    /// One second with `governor`'s duty cycles in force.
    fn tick(governor: &Governor, defers: u64, allocs: u64, maps: u64) -> Observation {
        Observation {
            seconds: 1.0,
            defer_hits: defers,
            sampled_hits: [0, 0, allocs, maps],
            duty_in_force: SampledFamily::ALL.map(|family| governor.duty(family)),
        }
    }

    /// `seconds` with every family attached throughout.
    fn attached_throughout(
        seconds: f64,
        defer_hits: u64,
        sampled_hits: [u64; SAMPLED_FAMILIES],
    ) -> Observation {
        Observation { seconds, defer_hits, sampled_hits, duty_in_force: [1.0; SAMPLED_FAMILIES] }
    }

    #[test]
    fn everything_on_within_budget() {
        // 5% of a CPU = 50 ms/s = 2500 hits/s at 20 µs.
        let mut governor = Governor::new(5.0, HIT_NS, 0.05, true);
        assert!(governor.observe(&tick(&governor, 500, 1000, 500)).is_empty());
        assert_eq!(governor.duty(SampledFamily::Allocations), 1.0);
        assert_eq!(governor.duty(SampledFamily::MapWrites), 1.0);
    }

    #[test]
    fn allocations_degrade_first() {
        let mut governor = Governor::new(5.0, HIT_NS, 0.05, true);
        // 400 defers + 8800 allocs + 800 maps per second: 20% of a CPU, so the program ran at
        // 80% of its speed: unslowed, 500 + 11000 + 1000 = 25%.
        let changes = governor.observe(&tick(&governor, 400, 8800, 800));
        assert_eq!(changes.len(), 1, "{changes:?}");
        assert_eq!(changes[0].family, SampledFamily::Allocations);
        assert!((changes[0].projected_percent - 25.0).abs() < 1e-6, "{changes:?}");
        // Budget left for allocations: 2500 - 500 - 1000 = 1000 hits/s of 11000 → 0.05.
        assert_eq!(governor.duty(SampledFamily::Allocations), 0.05);
        assert_eq!(governor.duty(SampledFamily::MapWrites), 1.0);
        // Next tick sees the sampled twentieth of the unslowed rate: stable.
        assert!(governor.observe(&tick(&governor, 500, 550, 1000)).is_empty());
    }

    /// Seen on the HTTP service: a family detached at a tick still had hits while its link's
    /// breakpoints went away (6,415 allocations over 0.3 ms of attached time, "22 M/s"); and a
    /// tick right after a between-ticks decision observed 0.3 ms. Neither may decide anything.
    #[test]
    fn slivers_of_time_measure_nothing() {
        let mut governor = Governor::new(10.0, 1000.0, 0.05, true);
        // 50 ms fully attached at 1 µs a hit: 20k defers/s, 4k stack defers/s, 360k
        // allocations/s, 116k map writes/s: half a CPU, so the rates unslowed are twice that.
        let first = attached_throughout(0.05, 1000, [0, 200, 18_000, 5800]);
        governor.observe(&first);
        let rates = SampledFamily::ALL.map(|family| governor.rate(family));
        assert_eq!(rates, [Some(0.0), Some(8000.0), Some(720_000.0), Some(232_000.0)]);
        let duties = SampledFamily::ALL.map(|family| governor.duty(family));
        // Defers take 4 % of the 10; no goroutine exits; allocations (72 %) can't fit, map
        // writes (23.2 %) at 0.2.
        assert_eq!(duties, [1.0, 0.0, 0.0, 0.2]);

        let sliver = Observation {
            seconds: 0.0003,
            defer_hits: 5,
            sampled_hits: [0, 0, 0, 30],
            duty_in_force: [1.0, 0.0, 0.0, 1.0],
        };
        assert!(governor.observe(&sliver).is_empty());
        let after_detach = Observation {
            seconds: 1.0,
            defer_hits: 40_000,
            sampled_hits: [0, 10, 6415, 46_400],
            duty_in_force: [1.0, 0.0002, 0.0003, 0.2],
        };
        governor.observe(&after_detach);
        let rates = SampledFamily::ALL.map(|family| governor.rate(family));
        assert_eq!(rates[1..3], [Some(8000.0), Some(720_000.0)]);
    }

    /// Stack-defer counting is degraded before allocations: no finding depends on it.
    #[test]
    fn stack_defers_degrade_first() {
        let mut governor = Governor::new(5.0, HIT_NS, 0.05, true);
        // 2500 hits/s budget: defers 450, stack defers 3600, allocations 680, maps 270: 10% of
        // a CPU, so unslowed (÷ 0.9) 500, 4000, 755.6, 300.
        let observation =
            Observation { sampled_hits: [0, 3600, 680, 270], ..tick(&governor, 450, 0, 0) };
        governor.observe(&observation);
        // 2000 left after defers: maps and allocations fit at full duty; stack defers get what
        // remains: 944 of 4000 → 0.24 → the 0.2 step.
        assert_eq!(governor.duty(SampledFamily::StackDefers), 0.2);
        assert_eq!(governor.duty(SampledFamily::Allocations), 1.0);
        assert_eq!(governor.duty(SampledFamily::MapWrites), 1.0);
    }

    #[test]
    fn map_writes_degrade_when_allocations_are_at_the_floor() {
        let mut governor = Governor::new(2.0, HIT_NS, 0.0, true);
        // 1000 hits/s budget; defers 480, allocs 7920, maps 1600: 20% of a CPU, so unslowed
        // (÷ 0.8) defers take 600, maps 2000, allocs 9900. Allocations are detached, and their
        // refresh windows (a fiftieth of every tenth second: 19.8 hits/s) are budgeted: 380.2
        // left for map writes, 0.19 of them: the 0.1 step (without the refresh windows, 0.2).
        governor.observe(&tick(&governor, 480, 7920, 1600));
        assert_eq!(governor.duty(SampledFamily::Allocations), 0.0);
        assert_eq!(governor.duty(SampledFamily::MapWrites), 0.1);
        // Defers stay on even if they alone exceed the budget.
        let mut governor = Governor::new(1.0, HIT_NS, 0.0, true);
        governor.observe(&tick(&governor, 5000, 10, 10));
        assert_eq!(governor.duty(SampledFamily::Allocations), 0.0);
        assert_eq!(governor.duty(SampledFamily::MapWrites), 0.0);
    }

    /// When what the budget leaves is less than the smallest window, a family is detached, not
    /// kept at the smallest window; when the defer probes alone exceed the budget, both are
    /// detached and the governor says so.
    #[test]
    fn detaches_below_the_smallest_window() {
        // 2500 hits/s budget: 2070 defers, 2880 allocations and 50 map writes are 10% of a
        // CPU; unslowed (÷ 0.9) defers take 2300, allocations would need 5% of 3200 = 160.
        let mut governor = Governor::new(5.0, HIT_NS, 0.05, true);
        governor.observe(&tick(&governor, 2070, 2880, 50));
        assert_eq!(governor.duty(SampledFamily::Allocations), 0.0);
        assert_eq!(governor.duty(SampledFamily::MapWrites), 1.0);
        assert!(!governor.defers_over_budget());
        governor.observe(&tick(&governor, 3000, 0, 50));
        assert_eq!(governor.duty(SampledFamily::MapWrites), 0.0);
        assert!(governor.defers_over_budget());
    }

    /// A detached family gets refresh windows in the tick it is detached and the next few,
    /// then every few ticks; what it sees there decides whether it comes back.
    #[test]
    fn detached_families_are_refreshed() {
        let mut governor = Governor::new(5.0, HIT_NS, 0.05, true);
        governor.observe(&tick(&governor, 2070, 2880, 50));
        assert_eq!(governor.duty(SampledFamily::Allocations), 0.0);
        let refreshes: Vec<bool> = (0..=20)
            .map(|_| governor.duty_for_tick(SampledFamily::Allocations) == REFRESH_DUTY)
            .collect();
        let refresh_ticks: Vec<usize> =
            refreshes.iter().enumerate().filter(|(_, r)| **r).map(|(tick, _)| tick).collect();
        assert_eq!(refresh_ticks, [0, 1, 2, 4, 8, 10, 20]);
        assert_eq!(governor.duty_for_tick(SampledFamily::MapWrites), 1.0);
        // In the refresh window (5% of a second) the program made 5 allocations: 100/s, and
        // the defers calmed down: allocations fit again.
        let observation =
            Observation { duty_in_force: [1.0, 1.0, 0.05, 1.0], ..tick(&governor, 500, 5, 50) };
        governor.observe(&observation);
        assert_eq!(governor.duty(SampledFamily::Allocations), 1.0);
    }

    /// Seen on the HTTP service: no heap defer, and a goroutine exit per request (net/http's
    /// background read). Before the first heap defer, exits are sampled first; from it on they
    /// are always on, and count against the budget like the defer probes.
    #[test]
    fn goroutine_exits_are_sampled_until_required() {
        let exits = SampledFamily::GoroutineExits;
        let mut governor = Governor::new(5.0, HIT_NS, 0.05, true);
        // 40,000 exits and 225 map writes per second: 80 % of a CPU, so unslowed (at most
        // doubled) 160 % for the exits, 0.9 % for the map writes: these fit in the 5 %, not even
        // a 5 % window of the exits does.
        let observation =
            Observation { sampled_hits: [40_000, 0, 0, 225], ..tick(&governor, 0, 0, 0) };
        governor.observe(&observation);
        assert_eq!(governor.duty(exits), 0.0);
        assert_eq!(governor.duty(SampledFamily::MapWrites), 1.0);
        assert!(!governor.defers_over_budget());

        // The first heap defer: exits are attached for good.
        assert!(governor.require(exits));
        assert!(governor.is_required(exits));
        governor.unrequire(exits);
        assert!(!governor.is_required(exits));
        assert!(governor.require(exits) || governor.is_required(exits));
        assert_eq!(governor.required_hits(&[7, 1, 2, 3]), 7);
        // Exits, at full duty now (3200/s: 6.8 % unslowed), alone exceed the budget: every other
        // family is detached.
        let observation =
            Observation { sampled_hits: [3200, 0, 0, 20], ..tick(&governor, 0, 0, 0) };
        let changes = governor.observe(&observation);
        assert_eq!(governor.duty(exits), 1.0, "{changes:?}");
        assert_eq!(governor.duty(SampledFamily::MapWrites), 0.0);
        assert!(governor.defers_over_budget());
    }

    /// Seen on the HTTP service at P = 10: map writes in a 5 % window took 60 % of the CPU
    /// while it was open. Corrected for the whole tick's 3 %, their rate read as half what it
    /// was, and the governor doubled their window (and the loss).
    #[test]
    fn a_window_is_corrected_for_its_own_slowdown() {
        let maps = SampledFamily::MapWrites;
        let mut governor = Governor::new(10.0, 1000.0, 0.05, true);
        // Fully attached: 600k map writes/s at 1 µs, 60 % of a CPU: at most doubled, 1.2 M/s
        // (120 %), of which 10 % fit: the 0.05 step.
        let full = attached_throughout(1.0, 0, [0, 0, 0, 600_000]);
        governor.observe(&full);
        assert_eq!(governor.duty(maps), 0.05);
        assert_eq!(governor.rate(maps), Some(1_200_000.0));
        // The window: 30k writes in 50 ms, the same 60 % while it was open (3 % of the tick).
        let window = Observation {
            sampled_hits: [0, 0, 0, 30_000],
            duty_in_force: [0.0, 0.0, 0.0, 0.05],
            ..full
        };
        assert!(governor.observe(&window).is_empty());
        assert_eq!(governor.duty(maps), 0.05);
        assert_eq!(governor.rate(maps), Some(1_200_000.0));
    }

    #[test]
    fn without_windows_a_family_is_on_or_off() {
        let mut governor = Governor::new(5.0, HIT_NS, 0.05, false);
        governor.observe(&tick(&governor, 700, 3000, 1300));
        assert_eq!(governor.duty(SampledFamily::Allocations), 0.0);
        assert_eq!(governor.duty(SampledFamily::MapWrites), 1.0);
    }

    #[test]
    fn recovers_when_the_load_drops() {
        let mut governor = Governor::new(5.0, HIT_NS, 0.05, true);
        governor.observe(&tick(&governor, 400, 8800, 800));
        assert_eq!(governor.duty(SampledFamily::Allocations), 0.05);
        // The program calms down: the sampled window sees 10 allocations (200/s).
        let changes = governor.observe(&tick(&governor, 100, 10, 100));
        assert_eq!(governor.duty(SampledFamily::Allocations), 1.0, "{changes:?}");
    }
}
