//! Which functions keep their `CALL runtime.deferreturn` probes. Every return of a function
//! with a heap defer site calls `runtime.deferreturn`, whether or not the site ever registered:
//! a function whose site never runs (a loop that stays empty, an error path) costs a probe hit
//! per return and releases nothing. Every function's probes are on from the start, so that
//! releases are counted exactly; after [`IDLE_AFTER`] of tracing, the functions that never had
//! a heap defer pending (registered while traced, or found by a snapshot) lose theirs, and a
//! function gets them back at its next heap defer. Pure: the trace loop attaches and detaches
//! what this returns.

use std::{collections::HashSet, time::Duration};

use crate::plan::{ProbePlan, ProbeProgram};

/// How long every function keeps its deferreturn probes before the idle ones lose them.
pub(super) const IDLE_AFTER: Duration = Duration::from_secs(10);

pub(super) struct FrameArming {
    /// `[start, end)` ELF addresses of the functions that have deferreturn probes, sorted.
    functions: Vec<(u64, u64)>,
    /// Runtime address − ELF address.
    bias: u64,
    /// Functions whose probes are on (all of them at first).
    armed: HashSet<u64>,
    /// Functions that had a heap defer pending.
    active: HashSet<u64>,
    /// Functions whose probes went off, and how many of those got them back.
    pub(super) idled: usize,
    pub(super) rearmed: usize,
}

impl FrameArming {
    pub(super) fn new(plan: &ProbePlan, bias: u64) -> FrameArming {
        let mut functions: Vec<(u64, u64)> = plan
            .probes_of(ProbeProgram::DeferReturn)
            .map(|probe| (probe.address, probe.address + probe.size))
            .collect();
        functions.sort_unstable();
        functions.dedup();
        let armed = functions.iter().map(|(start, _)| *start).collect();
        FrameArming { functions, bias, armed, active: HashSet::new(), idled: 0, rearmed: 0 }
    }

    /// Notes the functions holding `sites` (runtime return addresses of defer sites with a
    /// record pending) as active; returns those whose probes are off (ELF addresses), which
    /// count as on from now on.
    pub(super) fn needed(&mut self, sites: impl IntoIterator<Item = u64>) -> Vec<u64> {
        let mut needed = Vec::new();
        for site in sites {
            let pc = site.wrapping_sub(self.bias);
            let at = self.functions.partition_point(|(start, _)| *start <= pc);
            let Some(&(start, end)) = at.checked_sub(1).and_then(|i| self.functions.get(i)) else {
                continue;
            };
            if pc < end && self.active.insert(start) && self.armed.insert(start) {
                needed.push(start);
            }
        }
        self.rearmed += needed.len();
        needed
    }

    /// The functions whose probes are on but never had a heap defer pending; they count as
    /// off from now on.
    pub(super) fn take_idle(&mut self) -> Vec<u64> {
        let idle: Vec<u64> =
            self.armed.iter().filter(|function| !self.active.contains(function)).copied().collect();
        for function in &idle {
            self.armed.remove(function);
        }
        self.idled += idle.len();
        idle
    }

    /// Attaching `functions` failed: they count as off again.
    pub(super) fn not_armed(&mut self, functions: &[u64]) {
        for function in functions {
            self.armed.remove(function);
            self.active.remove(function);
        }
        self.rearmed -= functions.len().min(self.rearmed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arming(functions: &[(u64, u64)], bias: u64) -> FrameArming {
        FrameArming {
            functions: functions.to_vec(),
            bias,
            armed: functions.iter().map(|(start, _)| *start).collect(),
            active: HashSet::new(),
            idled: 0,
            rearmed: 0,
        }
    }

    #[test]
    fn idle_functions_lose_their_probes_and_get_them_back() {
        let mut frames = arming(&[(0x1000, 0x1100), (0x2000, 0x2040), (0x3000, 0x3010)], 0x10_0000);
        // Everything is on at first: a registration needs nothing attached.
        assert_eq!(frames.needed([0x10_1010, 0x10_1020]), Vec::<u64>::new());
        // Outside every function (the runtime, another module, 0): nothing.
        assert_eq!(frames.needed([0x10_1100, 0x10_0fff, 0, u64::MAX]), Vec::<u64>::new());
        let mut idle = frames.take_idle();
        idle.sort();
        assert_eq!(idle, [0x2000, 0x3000]);
        assert_eq!(frames.take_idle(), Vec::<u64>::new());
        // A heap defer in an idle function brings its probes back, once.
        assert_eq!(frames.needed([0x10_2039, 0x10_2000]), [0x2000]);
        assert_eq!(frames.needed([0x10_2039]), Vec::<u64>::new());
        assert_eq!((frames.idled, frames.rearmed), (2, 1));
        // Attaching failed: asked again at the next heap defer.
        frames.not_armed(&[0x2000]);
        assert_eq!(frames.needed([0x10_2001]), [0x2000]);
        assert_eq!(frames.take_idle(), Vec::<u64>::new());
    }
}
