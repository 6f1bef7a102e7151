//! What a probe hit really costs the target while it runs, measured rather than calibrated:
//! the target's CPU time against its probe hits, compared within each governor tick between
//! its parts. The sampler attaches each sampled family in windows (slices of the tick, each
//! closing at the family's duty cycle): marks at every attach and detach cut the tick into
//! segments, each with a known set of families attached. Segments with the same set are
//! pooled. In the same tick the program's own load is about the same in every part, so each
//! set's CPU time per second minus that of the set with the fewest families attached, against
//! the same difference in hits per second, is what the hits cost: the kernel handles a uprobe
//! trap in the target's context, on its CPU time.
//!
//! Two fits over the recent comparisons, both least squares through the origin with standard
//! errors from the scatter: one slope against all hits (one figure for every probe), and one
//! per sampled family against each family's hits (a multiple regression: families whose
//! windows closed at different times, or whose rates varied apart, are told apart).
//! Comparisons of one tick share their reference, so the errors are somewhat optimistic.
//! Pure: the sampler feeds it marks.

use std::collections::VecDeque;

use crate::governor::SAMPLED_FAMILIES;

/// Hit groups a mark counts: the always-on defer probes, then each sampled family in
/// [`crate::governor::SampledFamily::ALL`]'s order.
pub const GROUPS: usize = 1 + SAMPLED_FAMILIES;

/// Comparisons the fits run over (the most recent ones; a tick gives one per set of families
/// attached together, besides the reference).
const WINDOW_POINTS: usize = 240;
/// Comparisons before an estimate is given at all.
pub const MIN_TICKS: usize = 10;
/// Each set's segments must last this long together to be compared.
const MIN_PART_SECS: f64 = 0.1;

/// Which sampled families were attached during a segment.
pub type Attached = [bool; SAMPLED_FAMILIES];

/// The target's CPU time (ns) and the probes' hits per group at one moment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mark {
    pub at_ns: u64,
    pub cpu_ns: u64,
    pub hits: [u64; GROUPS],
}

/// The measured cost of a hit.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Measured {
    pub ns_per_hit: f64,
    /// One standard error.
    pub error_ns: f64,
    /// Comparisons it was fitted over (at least one per tick with windows).
    pub ticks: usize,
}

impl Measured {
    /// Good enough to keep the budget on: its error under a third of it.
    pub fn is_solid(&self) -> bool {
        self.ticks >= MIN_TICKS && self.ns_per_hit > 0.0 && self.error_ns < self.ns_per_hit / 3.0
    }
}

/// One set of families attached against the tick's reference set: CPU ns per second, hits
/// per second per group.
#[derive(Clone, Copy, Debug)]
struct Difference {
    cpu: f64,
    hits: [f64; GROUPS],
}

#[derive(Clone, Debug, Default)]
pub struct RealCost {
    differences: VecDeque<Difference>,
}

impl RealCost {
    /// One tick, as marks in time order, each with the families attached from it to the next
    /// (the last mark's are not used). Segments are pooled by the set attached; a set attached
    /// for less than [`MIN_PART_SECS`] in all is left out, and the one with the fewest families
    /// attached is the reference.
    pub fn tick(&mut self, marks: &[(Mark, Attached)]) {
        // Per set: seconds, CPU ns, hits.
        let mut sets: Vec<(Attached, f64, f64, [f64; GROUPS])> = Vec::new();
        for pair in marks.windows(2) {
            let ((from, attached), (to, _)) = (&pair[0], &pair[1]);
            let index = match sets.iter().position(|set| set.0 == *attached) {
                Some(index) => index,
                None => {
                    sets.push((*attached, 0.0, 0.0, [0.0; GROUPS]));
                    sets.len() - 1
                }
            };
            let set = &mut sets[index];
            set.1 += to.at_ns.saturating_sub(from.at_ns) as f64 / 1e9;
            set.2 += to.cpu_ns.saturating_sub(from.cpu_ns) as f64;
            for g in 0..GROUPS {
                set.3[g] += to.hits[g].saturating_sub(from.hits[g]) as f64;
            }
        }
        let rates: Vec<(usize, Difference)> = sets
            .iter()
            .filter(|(_, seconds, ..)| *seconds >= MIN_PART_SECS)
            .map(|(attached, seconds, cpu, hits)| {
                let count = attached.iter().filter(|a| **a).count();
                (count, Difference { cpu: cpu / seconds, hits: hits.map(|h| h / seconds) })
            })
            .collect();
        let Some(reference) = (0..rates.len()).min_by_key(|index| rates[*index].0) else {
            return;
        };
        let reference_rate = rates[reference].1;
        for (index, (_, rate)) in rates.iter().enumerate() {
            if index == reference {
                continue;
            }
            if self.differences.len() == WINDOW_POINTS {
                self.differences.pop_front();
            }
            self.differences.push_back(Difference {
                cpu: rate.cpu - reference_rate.cpu,
                hits: std::array::from_fn(|g| rate.hits[g] - reference_rate.hits[g]),
            });
        }
    }

    /// The cost per hit of every probe alike, over the recent segments, once there are
    /// [`MIN_TICKS`] of them and the hit rates differed.
    pub fn measured(&self) -> Option<Measured> {
        let points: Vec<(f64, [f64; 1])> =
            self.differences.iter().map(|d| (d.cpu, [d.hits.iter().sum()])).collect();
        fit(&points).map(|[measured]| measured)
    }

    /// The cost per hit of each sampled family (indexed like
    /// [`crate::governor::SampledFamily::ALL`]): None for a family that was never sampled in
    /// windows, or whose hits can't be told apart from the others'.
    pub fn by_family(&self) -> [Option<Measured>; SAMPLED_FAMILIES] {
        let contrast = |family: usize| {
            self.differences.iter().filter(|d| d.hits[1 + family] != 0.0).count() >= MIN_TICKS
        };
        let families: Vec<usize> = (0..SAMPLED_FAMILIES).filter(|f| contrast(*f)).collect();
        let mut result = [None; SAMPLED_FAMILIES];
        if families.is_empty() {
            return result;
        }
        let points: Vec<(f64, Vec<f64>)> = self
            .differences
            .iter()
            .map(|d| (d.cpu, families.iter().map(|f| d.hits[1 + f]).collect()))
            .collect();
        if let Some(fitted) = fit_dyn(&points, families.len()) {
            for (family, measured) in families.into_iter().zip(fitted) {
                result[family] = Some(measured);
            }
        }
        result
    }
}

/// Least squares through the origin of `y` on `K` regressors.
fn fit<const K: usize>(points: &[(f64, [f64; K])]) -> Option<[Measured; K]> {
    let dynamic: Vec<(f64, Vec<f64>)> = points.iter().map(|(y, x)| (*y, x.to_vec())).collect();
    let fitted = fit_dyn(&dynamic, K)?;
    fitted.try_into().ok()
}

/// Least squares through the origin of `y` on `k` regressors, by the normal equations (k is
/// at most a handful); None with fewer than [`MIN_TICKS`] points, or regressors that can't
/// be told apart (a singular system).
fn fit_dyn(points: &[(f64, Vec<f64>)], k: usize) -> Option<Vec<Measured>> {
    let n = points.len();
    if n < MIN_TICKS.max(k + 1) {
        return None;
    }
    let mut xtx = vec![vec![0.0; k]; k];
    let mut xty = vec![0.0; k];
    for (y, x) in points {
        for i in 0..k {
            xty[i] += x[i] * y;
            for j in 0..k {
                xtx[i][j] += x[i] * x[j];
            }
        }
    }
    let inverse = invert(xtx)?;
    let coefficients: Vec<f64> =
        (0..k).map(|i| (0..k).map(|j| inverse[i][j] * xty[j]).sum()).collect();
    let residuals: f64 = points
        .iter()
        .map(|(y, x)| {
            let predicted: f64 = (0..k).map(|i| coefficients[i] * x[i]).sum();
            (y - predicted) * (y - predicted)
        })
        .sum();
    let variance = residuals / (n - k) as f64;
    Some(
        (0..k)
            .map(|i| Measured {
                ns_per_hit: coefficients[i],
                error_ns: (variance * inverse[i][i]).max(0.0).sqrt(),
                ticks: n,
            })
            .collect(),
    )
}

/// Gauss–Jordan inverse of a symmetric positive semi-definite matrix; None if a pivot is
/// negligible against its diagonal (regressors that move together).
fn invert(mut a: Vec<Vec<f64>>) -> Option<Vec<Vec<f64>>> {
    let k = a.len();
    let scale: Vec<f64> = (0..k).map(|i| a[i][i]).collect();
    let mut inverse: Vec<Vec<f64>> =
        (0..k).map(|i| (0..k).map(|j| f64::from(u8::from(i == j))).collect()).collect();
    for column in 0..k {
        let pivot_row =
            (column..k).max_by(|r, s| a[*r][column].abs().total_cmp(&a[*s][column].abs()))?;
        let pivot = a[pivot_row][column];
        // (NaN pivots fail too.)
        if pivot.abs().partial_cmp(&(1e-9 * scale[column])) != Some(std::cmp::Ordering::Greater) {
            return None;
        }
        a.swap(column, pivot_row);
        inverse.swap(column, pivot_row);
        for j in 0..k {
            a[column][j] /= pivot;
            inverse[column][j] /= pivot;
        }
        for row in 0..k {
            if row != column {
                let factor = a[row][column];
                for j in 0..k {
                    a[row][j] -= factor * a[column][j];
                    inverse[row][j] -= factor * inverse[column][j];
                }
            }
        }
    }
    Some(inverse)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A program's own CPU time, its probes' hits per group, and what they cost it.
    struct Program {
        at_ms: f64,
        cpu_ms: f64,
        hits: [u64; GROUPS],
        cost_ns: [f64; GROUPS],
    }

    impl Program {
        fn mark(&self) -> Mark {
            Mark {
                at_ns: (self.at_ms * 1e6) as u64,
                cpu_ns: (self.cpu_ms * 1e6) as u64,
                hits: self.hits,
            }
        }

        /// `ms` of wall time at `load` ms of CPU a second, with `rates` hits per second.
        fn run(&mut self, ms: f64, load: f64, rates: [f64; GROUPS]) -> Mark {
            self.at_ms += ms;
            self.cpu_ms += load * ms / 1000.0;
            for ((rate, total), cost_ns) in rates.iter().zip(&mut self.hits).zip(self.cost_ns) {
                let hits = (rate * ms / 1000.0) as u64;
                *total += hits;
                self.cpu_ms += hits as f64 * cost_ns / 1e6;
            }
            self.mark()
        }
    }

    const NONE: Attached = [false; SAMPLED_FAMILIES];
    const ALLOCATIONS: Attached = [false, false, true, false];
    const MAPS: Attached = [false, false, false, true];
    const BOTH: Attached = [false, false, true, true];

    fn noise(tick: u64) -> f64 {
        ((tick * 7919) % 41) as f64 - 20.0
    }

    /// A program using 300 ms of CPU a second of its own, ± noise, and 20,000 hits/s while
    /// the families are attached (2,000/s of always-on probes otherwise) at 800 ns a hit.
    #[test]
    fn recovers_the_cost_per_hit_from_windows() {
        let mut cost = RealCost::default();
        let mut program =
            Program { at_ms: 0.0, cpu_ms: 0.0, hits: [0; GROUPS], cost_ns: [800.0; GROUPS] };
        for tick in 0..40u64 {
            let load = 300.0 + noise(tick);
            let start = program.mark();
            let window = program.run(400.0, load, [2000.0, 0.0, 0.0, 18_000.0, 0.0]);
            let end = program.run(600.0, load, [2000.0, 0.0, 0.0, 0.0, 0.0]);
            cost.tick(&[(start, ALLOCATIONS), (window, NONE), (end, NONE)]);
        }
        let measured = cost.measured().unwrap();
        assert!((measured.ns_per_hit - 800.0).abs() < 40.0, "{measured:?}");
        assert!(measured.is_solid(), "{measured:?}");
        assert_eq!(measured.ticks, 40);
    }

    /// Allocations at 600 ns a hit at duty 0.2, map writes at 1,500 ns at 0.5, in two slices
    /// per tick, the rates wandering from tick to tick: each family's cost comes out on its
    /// own.
    #[test]
    fn tells_families_apart_by_their_windows() {
        let mut cost = RealCost::default();
        let mut program = Program {
            at_ms: 0.0,
            cpu_ms: 0.0,
            hits: [0; GROUPS],
            cost_ns: [1000.0, 1000.0, 1000.0, 600.0, 1500.0],
        };
        for tick in 0..30u64 {
            let load = 300.0 + noise(tick);
            let allocs = 50_000.0 + 300.0 * noise(tick + 3);
            let maps = 20_000.0 + 200.0 * noise(tick + 11);
            // In two slices of half a second each.
            let mut marks = Vec::new();
            for _ in 0..2 {
                marks.push((program.mark(), BOTH));
                program.run(100.0, load, [1000.0, 0.0, 0.0, allocs, maps]);
                marks.push((program.mark(), MAPS));
                program.run(150.0, load, [1000.0, 0.0, 0.0, 0.0, maps]);
                marks.push((program.mark(), NONE));
                program.run(250.0, load, [1000.0, 0.0, 0.0, 0.0, 0.0]);
            }
            marks.push((program.mark(), NONE));
            cost.tick(&marks);
        }
        let by_family = cost.by_family();
        let allocations = by_family[2].expect("allocations measured");
        let maps = by_family[3].expect("map writes measured");
        assert!((allocations.ns_per_hit - 600.0).abs() < 60.0, "{allocations:?}");
        assert!((maps.ns_per_hit - 1500.0).abs() < 150.0, "{maps:?}");
        assert!(allocations.is_solid() && maps.is_solid(), "{by_family:?}");
        assert_eq!(allocations.ticks, 60, "two comparisons a tick");
        // Never sampled: unknown, not zero.
        assert_eq!(by_family[0], None);
        assert_eq!(by_family[1], None);
    }

    /// Two families always in the same window at the same ratio of rates can't be told apart:
    /// neither gets a figure of its own (the overall one still comes).
    #[test]
    fn families_that_move_together_stay_unknown() {
        let mut cost = RealCost::default();
        let mut program =
            Program { at_ms: 0.0, cpu_ms: 0.0, hits: [0; GROUPS], cost_ns: [900.0; GROUPS] };
        for tick in 0..20u64 {
            let load = 300.0 + noise(tick);
            let start = program.mark();
            let window = program.run(300.0, load, [0.0, 0.0, 0.0, 40_000.0, 10_000.0]);
            let end = program.run(700.0, load, [0.0; GROUPS]);
            cost.tick(&[(start, BOTH), (window, NONE), (end, NONE)]);
        }
        assert_eq!(cost.by_family(), [None; SAMPLED_FAMILIES]);
        assert!(cost.measured().unwrap().is_solid());
    }

    #[test]
    fn nothing_without_enough_ticks_or_contrast() {
        let mark = |at_ms: u64, cpu_ms: f64, hits: u64| Mark {
            at_ns: at_ms * 1_000_000,
            cpu_ns: (cpu_ms * 1e6) as u64,
            hits: [hits, 0, 0, 0, 0],
        };
        let segments =
            |start: Mark, window: Mark, end: Mark| [(start, MAPS), (window, NONE), (end, NONE)];
        let mut cost = RealCost::default();
        for n in 0..(MIN_TICKS as u64 - 1) {
            let t = n * 1000;
            cost.tick(&segments(
                mark(t, 0.0, 0),
                mark(t + 500, 100.0, 500),
                mark(t + 1000, 150.0, 600),
            ));
        }
        assert_eq!(cost.measured(), None);
        // Sets attached too briefly to compare are left out.
        cost.tick(&segments(mark(0, 0.0, 0), mark(50, 10.0, 100), mark(1000, 50.0, 200)));
        assert_eq!(cost.measured(), None);
        // The same hit rate in every part says nothing.
        let mut flat = RealCost::default();
        for n in 0..20u64 {
            let t = n * 1000;
            flat.tick(&segments(
                mark(t, 0.0, 0),
                mark(t + 500, 100.0, 500),
                mark(t + 1000, 200.0, 1000),
            ));
        }
        assert_eq!(flat.measured(), None);
    }
}
