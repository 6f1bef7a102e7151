//! The governor's hands: [`Sampler`] applies the duty cycles the [`Governor`] decides to the
//! tracer (attaching and detaching sampled families in windows), checks the budget between
//! ticks, and keeps the per-family figures the report presents sampled counts with.

use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

use deferprobe_common::{Counter, Counters};
use tracing::{debug, info, warn};

use crate::{
    cost::{Attached, GROUPS, Mark, Measured, RealCost},
    error::Result,
    estimate::{FamilyEstimate, Windows, slice_variance},
    governor::{
        Governor, MIN_OBSERVATION_SECS, Observation, SAMPLED_FAMILIES, SampledFamily,
        planned_hit_ns,
    },
    report::{GovernorReport, SamplingReport},
    state::monotonic_ns,
    target,
    tracer::{AttachMode, Tracer},
};

/// How often the governor re-evaluates, and the period its sampling windows divide.
pub(super) const GOVERNOR_TICK: Duration = Duration::from_secs(1);
/// A tick is cut into this many slices, and a family at duty d is attached for d of each, at
/// an offset drawn at random for each slice (the same for every family: their windows open
/// together, and close at their own duty). Spread over the tick, the windows see a rate that
/// changes within it (the end of a start-up burst) in proportion, where one window at the
/// tick's start would extrapolate the burst over the whole tick; at random offsets, they
/// don't keep in step with a program's own periodic work (a 10 ms batch loop seen always, or
/// never). An attach or detach takes ~50 µs of deferprobe's time.
pub(super) const SLICES_PER_TICK: u32 = 5;

/// Windows due this close together change in one go.
const WINDOW_SLACK: Duration = Duration::from_micros(100);
/// The first decision: every family is attached until then. Its observation is a
/// [`BUDGET_WINDOW`]: a start-up burst of a few milliseconds decides nothing on its own.
pub(super) const FIRST_GOVERNOR_TICK: Duration = BUDGET_WINDOW;
/// Between ticks, every this-long, the cost of the last [`BUDGET_WINDOW`] is checked; over
/// budget, the governor decides at once (degrading fast, raising only at the regular ticks).
pub(super) const BUDGET_CHECK_EVERY: Duration = Duration::from_millis(20);
/// What the budget is kept over between ticks: the probes' cost over this long must exceed it
/// (a burst shorter than this, such as a program's start-up, is absorbed by the rest).
pub(super) const BUDGET_WINDOW: Duration = Duration::from_millis(500);

/// Applies the governor's duty cycles to the tracer (a family with duty d is attached for d of
/// each of the tick's [`SLICES_PER_TICK`] slices, from a random offset, its window closing on
/// its own) and keeps what the report needs to present sampled counts as estimates.
pub(super) struct Sampler {
    governor: Governor,
    /// Sampling in windows needs cheap attach/detach (multi-uprobe links); otherwise a family
    /// is either on or off.
    windows: bool,
    last: Counters,
    last_tick: Instant,
    /// The counters at the last between-ticks budget check.
    last_check: (Counters, Instant),
    /// The duty cycle planned for the current tick, per family.
    planned: [f64; SAMPLED_FAMILIES],
    /// Since when each family is attached (None: detached), and for how long it was attached
    /// since the last tick: rates and estimates use the time really attached, not the plan.
    attached_since: [Option<Instant>; SAMPLED_FAMILIES],
    attached_secs: [f64; SAMPLED_FAMILIES],
    stats: [FamilyStats; SAMPLED_FAMILIES],
    max_overhead_percent: f64,
    hit_cost_ns: Option<u64>,
    calibrated_ns: Option<std::collections::BTreeMap<&'static str, u64>>,
    /// Regular ticks so far (refresh windows of detached families come every few).
    ticks: u64,
    /// Seconds traced, and the probe time the always-on defer probes took in them (ns).
    seconds: f64,
    defer_probe_ns: f64,
    /// Seconds in which the defer probes alone exceeded the budget.
    defers_over_budget_secs: f64,
    /// Whether some goroutine had heap defers pending at a budget check since the last tick.
    exits_needed: bool,
    /// The target, whose CPU time the real cost of a hit is measured against.
    pid: u32,
    /// The families sampled in windows this tick, at their duty for it (0: not in windows).
    windowed: [f64; SAMPLED_FAMILIES],
    /// When each family's window in the current slice closes (None: no window open).
    window_ends: [Option<tokio::time::Instant>; SAMPLED_FAMILIES],
    /// When the current tick started, and the next of its slices with when its windows open
    /// (None: it was the last).
    tick_start: tokio::time::Instant,
    next_slice: Option<(u32, tokio::time::Instant)>,
    random: fastrand::Rng,
    /// The real cost of a hit ([`RealCost`]): marks at the start of the current tick and at
    /// every attach and detach of its windows, each with the families attached from it on,
    /// taken only in ticks with windows; a tick whose families changed otherwise (a budget
    /// check detached one) is not compared.
    cost: RealCost,
    tick_marks: Vec<(Mark, Attached)>,
    tick_disturbed: bool,
    /// For the tick that just ended, what each family's windows showed (nothing: no windows,
    /// or not all of them marked).
    windows_seen: [Windows; SAMPLED_FAMILIES],
    measured: Option<Measured>,
    measured_by_family: [Option<Measured>; SAMPLED_FAMILIES],
    /// The target's threads at the last mark, sorted.
    threads: Vec<u32>,
    /// Since the last decision, each budget check's (seconds, probe cost in ns as planned).
    recent_checks: VecDeque<(f64, f64)>,
}

#[derive(Clone, Copy, Debug)]
pub(super) struct FamilyStats {
    sampled: bool,
    min_duty: f64,
    duty_seconds: f64,
    seconds: f64,
    observed: u64,
    observed_bytes: f64,
    /// Calls: those seen, scaled up by the duty cycle, and detached spans bridged.
    estimate: FamilyEstimate,
}

impl Default for FamilyStats {
    fn default() -> Self {
        FamilyStats {
            sampled: false,
            min_duty: 1.0,
            duty_seconds: 0.0,
            seconds: 0.0,
            observed: 0,
            observed_bytes: 0.0,
            estimate: FamilyEstimate::default(),
        }
    }
}

impl Sampler {
    /// Per-hit cost if calibration failed: what a uprobe hit costs on a slow virtual machine.
    const FALLBACK_HIT_COST: Duration = Duration::from_micros(20);

    pub(super) fn new(tracer: &Tracer, max_overhead_percent: f64, pid: u32) -> Result<Sampler> {
        let windows = tracer.mode() == AttachMode::Multi;
        let hit_cost = tracer.hit_cost();
        let calibration = tracer.calibration();
        match calibration {
            Some(calibration) => info!(
                hit_cost_ns = calibration.hit_cost().as_nanos() as u64,
                jbe_ns = calibration.jbe.as_nanos() as u64,
                call_ns = calibration.call.as_nanos() as u64,
                max_overhead_percent,
                "calibrated"
            ),
            None => warn!(
                assumed_hit_cost_ns = Self::FALLBACK_HIT_COST.as_nanos() as u64,
                "could not calibrate the cost of a probe hit"
            ),
        }
        let hit_ns = hit_cost.unwrap_or(Self::FALLBACK_HIT_COST).as_nanos() as f64;
        Ok(Sampler {
            governor: Governor::new(
                max_overhead_percent,
                planned_hit_ns(hit_ns),
                if windows { 0.05 } else { 0.0 },
                windows,
            ),
            windows,
            // The counters start at zero when the programs load.
            last: Counters::ZERO,
            last_tick: Instant::now(),
            last_check: (Counters::ZERO, Instant::now()),
            planned: [1.0; SAMPLED_FAMILIES],
            // The tracer attached every family.
            attached_since: [Some(Instant::now()); SAMPLED_FAMILIES],
            attached_secs: [0.0; SAMPLED_FAMILIES],
            stats: [FamilyStats::default(); SAMPLED_FAMILIES],
            max_overhead_percent,
            hit_cost_ns: hit_cost.map(|c| c.as_nanos() as u64),
            calibrated_ns: calibration.map(|c| {
                [("jbe", c.jbe), ("call", c.call)]
                    .map(|(class, cost)| (class, cost.as_nanos() as u64))
                    .into()
            }),
            ticks: 0,
            seconds: 0.0,
            defer_probe_ns: 0.0,
            defers_over_budget_secs: 0.0,
            exits_needed: false,
            pid,
            windowed: [0.0; SAMPLED_FAMILIES],
            window_ends: [None; SAMPLED_FAMILIES],
            tick_start: tokio::time::Instant::now(),
            next_slice: None,
            random: fastrand::Rng::new(),
            cost: RealCost::default(),
            tick_marks: Vec::new(),
            tick_disturbed: false,
            windows_seen: [Windows::default(); SAMPLED_FAMILIES],
            measured: None,
            measured_by_family: [None; SAMPLED_FAMILIES],
            threads: Vec::new(),
            recent_checks: VecDeque::new(),
        })
    }

    /// One governor tick: account for the tick that ended, decide, and open the next tick's
    /// first slice of windows. Returns when the first of them closes (None if nothing is
    /// sampled in windows).
    pub(super) fn tick(&mut self, tracer: &mut Tracer) -> Result<Option<tokio::time::Instant>> {
        self.measure(tracer)?;
        // The duties change: what budget checks saw before says nothing of what follows.
        self.recent_checks.clear();
        // A whole tick with no heap defer pending: goroutine exits release nothing, and may be
        // sampled again.
        let exits = SampledFamily::GoroutineExits;
        if self.governor.is_required(exits) && !std::mem::take(&mut self.exits_needed) {
            self.governor.unrequire(exits);
            info!("no heap defer pending for a second: goroutine exits may be sampled again");
        }
        self.decide(tracer)?;
        self.ticks += 1;
        self.tick_start = tokio::time::Instant::now();
        self.window_ends = [None; SAMPLED_FAMILIES];
        for (index, family) in SampledFamily::ALL.into_iter().enumerate() {
            let duty = self.governor.duty_for_tick(family);
            self.plan(index, duty);
            self.set_family(tracer, index, duty > 0.0)?;
            self.windowed[index] = match duty > 0.0 && duty < 1.0 && self.windows {
                true => duty,
                false => 0.0,
            };
        }
        // Only a tick with windows is compared into the real cost: only it is marked, once
        // its families are attached (a thread set from an older mark says nothing of it).
        self.tick_marks.clear();
        self.tick_disturbed = false;
        self.next_slice = None;
        if self.windowed.iter().any(|duty| *duty > 0.0) {
            // The first slice's windows open now: the families are attached already.
            self.next_slice = Some((0, self.tick_start));
            self.open_slice(tracer)?;
            self.push_mark(tracer)?;
        }
        Ok(self.next_window_event())
    }

    /// Opens the windows of the slice due: attaches each family (if it isn't), whose window
    /// closes its duty's share of a slice from then (an attach can wait several milliseconds
    /// for the kernel). Draws when the next slice's open.
    fn open_slice(&mut self, tracer: &mut Tracer) -> Result<()> {
        let Some((slice, _)) = self.next_slice else { return Ok(()) };
        let length = GOVERNOR_TICK / SLICES_PER_TICK;
        for index in 0..SAMPLED_FAMILIES {
            if self.windowed[index] > 0.0 {
                self.set_family(tracer, index, true)?;
                let opened = tokio::time::Instant::now();
                self.window_ends[index] = Some(opened + length.mul_f64(self.windowed[index]));
            }
        }
        let next = slice + 1;
        self.next_slice = (next < SLICES_PER_TICK).then(|| {
            let longest = self.windowed.iter().copied().fold(0.0, f64::max);
            let offset = length.mul_f64((1.0 - longest) * self.random.f64());
            (next, self.tick_start + length * next + offset)
        });
        Ok(())
    }

    /// When the next window of this tick closes or opens.
    fn next_window_event(&self) -> Option<tokio::time::Instant> {
        let next_open = self.next_slice.map(|(_, at)| at);
        self.window_ends.iter().flatten().copied().chain(next_open).min()
    }

    /// Between ticks, every [`BUDGET_CHECK_EVERY`]: when what the probes cost since the last
    /// check, carried over the tick, exceeds the budget (e.g. a service that was idle at the
    /// last tick is now under load), the governor decides at once, and families it degrades are
    /// detached until the next tick opens their windows. Never attaches anything.
    ///
    /// The always-on probes and fully attached families cost their rate since the last check;
    /// a family in its sampling window that rate for its duty cycle; a closed window nothing
    /// more.
    ///
    /// First of all, goroutine exits become required while some goroutine has heap defers
    /// pending (registered since the last check, or `pending`: pending as the events or the
    /// last snapshot say).
    pub(super) fn degrade_if_over_budget(
        &mut self,
        tracer: &mut Tracer,
        pending: bool,
    ) -> Result<()> {
        let (now, at) = (tracer.counters()?, Instant::now());
        let (last, last_at) = std::mem::replace(&mut self.last_check, (now, at));
        if pending || now.get(Counter::DeferProc) > last.get(Counter::DeferProc) {
            self.exits_needed = true;
            self.require_exits(tracer)?;
        }
        let seconds = at.duration_since(last_at).as_secs_f64();
        if seconds < MIN_OBSERVATION_SECS
            || self.last_tick.elapsed().as_secs_f64() < MIN_OBSERVATION_SECS
            || self.governor.defers_over_budget()
        {
            return Ok(());
        }
        let delta = |counter: Counter| now.get(counter) - last.get(counter);
        let mut cost_ns = defer_hits(&delta) as f64 * self.governor.hit_ns();
        for (family, family_hits) in SampledFamily::ALL.into_iter().zip(sampled_hits(&delta)) {
            if self.attached_since[family.index()].is_some() {
                cost_ns += family_hits as f64
                    * self.planned[family.index()]
                    * self.governor.family_hit_ns(family);
            }
        }
        // The cost over the last BUDGET_WINDOW of checks, since the last decision.
        self.recent_checks.push_back((seconds, cost_ns));
        let window = BUDGET_WINDOW.as_secs_f64();
        while self.recent_checks.len() > 1
            && self.recent_checks.iter().skip(1).map(|(s, _)| s).sum::<f64>() >= window
        {
            self.recent_checks.pop_front();
        }
        let (seconds, cost_ns) = self
            .recent_checks
            .iter()
            .fold((0.0, 0.0), |(seconds, cost), (s, c)| (seconds + s, cost + c));
        if seconds < window || cost_ns / seconds / 1e7 <= self.max_overhead_percent {
            return Ok(());
        }
        self.decide(tracer)?;
        self.recent_checks.clear();
        let mut detached = false;
        for (index, family) in SampledFamily::ALL.into_iter().enumerate() {
            let duty = self.governor.duty(family);
            if duty < self.planned[index] {
                self.tick_disturbed = true;
                self.plan(index, duty);
                (self.window_ends[index], self.windowed[index]) = (None, 0.0);
                self.set_family(tracer, index, false)?;
                detached = true;
            }
        }
        // The windows' ends are marked, for what they saw (the tick is not compared).
        if detached && !self.tick_marks.is_empty() {
            self.push_mark(tracer)?;
        }
        Ok(())
    }

    /// While some goroutine has heap defers pending, goexit1 stays attached with the
    /// goroutine-id cache on: it releases the records of goroutines that end in
    /// `runtime.Goexit`, and keeps the cache right. Otherwise it only counts exits.
    pub(super) fn require_exits(&mut self, tracer: &mut Tracer) -> Result<()> {
        let family = SampledFamily::GoroutineExits;
        if self.governor.is_required(family) {
            return Ok(());
        }
        self.governor.require(family);
        info!("a heap defer is pending: goroutine exits are probed, always on, while one is");
        let windowed = std::mem::take(&mut self.windowed[family.index()]) > 0.0;
        if windowed {
            self.window_ends[family.index()] = None;
            self.tick_disturbed = true;
        }
        self.plan(family.index(), 1.0);
        self.set_family(tracer, family.index(), true)?;
        if windowed && !self.tick_marks.is_empty() {
            self.push_mark(tracer)?;
        }
        Ok(())
    }

    /// Accounts for the time since the last tick and lets the governor decide; logs what
    /// changed.
    pub(super) fn decide(&mut self, tracer: &Tracer) -> Result<()> {
        let observation = self.account(tracer)?;
        let was_over_budget = self.governor.defers_over_budget();
        let changes = self.governor.observe(&observation);
        debug!(
            seconds = observation.seconds,
            defer_hits = observation.defer_hits,
            sampled_hits = ?observation.sampled_hits,
            attached = ?observation.duty_in_force,
            rates = ?SampledFamily::ALL.map(|family| self.governor.rate(family)),
            "governor observed"
        );
        if self.governor.defers_over_budget() {
            self.defers_over_budget_secs += observation.seconds;
        }
        if self.governor.defers_over_budget() != was_over_budget {
            let required_hits = self.governor.required_hits(&observation.sampled_hits);
            let percent = (observation.defer_hits + required_hits) as f64
                / observation.seconds.max(1e-9)
                * self.governor.hit_ns()
                / 1e7;
            match self.governor.defers_over_budget() {
                true => warn!(
                    defer_probes_percent = percent,
                    max_overhead_percent = self.max_overhead_percent,
                    "the defer probes alone cost more than --max-overhead: every sampled family \
                     is detached, and the budget is still exceeded (defer probes always stay on)"
                ),
                false => info!(
                    defer_probes_percent = percent,
                    max_overhead_percent = self.max_overhead_percent,
                    "the defer probes fit in --max-overhead again"
                ),
            }
        }
        for change in changes {
            info!(
                family = ?change.family,
                from = change.from,
                to = change.to,
                projected_percent = change.projected_percent,
                max_overhead_percent = self.max_overhead_percent,
                "governor changed a duty cycle"
            );
        }
        Ok(())
    }

    /// Records the duty cycle planned for a family, and in its report whether and how far it
    /// was sampled.
    pub(super) fn plan(&mut self, index: usize, duty: f64) {
        self.planned[index] = duty;
        if duty < 1.0 {
            let stats = &mut self.stats[index];
            stats.sampled = true;
            stats.min_duty = stats.min_duty.min(duty);
        }
    }

    /// Attaches or detaches a family, keeping count of the time it is attached.
    pub(super) fn set_family(
        &mut self,
        tracer: &mut Tracer,
        index: usize,
        attach: bool,
    ) -> Result<()> {
        let family = SampledFamily::ALL[index];
        // goexit1 is what makes the kernel forget cached goroutine ids: the cache is on exactly
        // while it is attached.
        let exits = family == SampledFamily::GoroutineExits;
        // The time attached is the time counted: from the gate's opening, once the probes are
        // on, to its closing, before they go (their breakpoints outlive the detach a while).
        if !attach {
            tracer.set_gate(family.gate(), false)?;
            if let Some(since) = self.attached_since[index].take() {
                self.attached_secs[index] += since.elapsed().as_secs_f64();
            }
            if exits {
                tracer.set_goroutine_id_cache(false)?;
            }
        }
        for program in family.programs() {
            tracer.set_attached(*program, attach)?;
        }
        if attach {
            if exits {
                tracer.set_goroutine_id_cache(true)?;
            }
            tracer.set_gate(family.gate(), true)?;
            if self.attached_since[index].is_none() {
                self.attached_since[index] = Some(Instant::now());
            }
        }
        Ok(())
    }

    /// Adds the hits since the last tick to the estimates, scaled by the fraction of the time
    /// each family was really attached, and returns them for the governor.
    pub(super) fn account(&mut self, tracer: &Tracer) -> Result<Observation> {
        let now = tracer.counters()?;
        let at = Instant::now();
        let seconds = at.duration_since(self.last_tick).as_secs_f64();
        let delta = |counter: Counter| now.get(counter) - self.last.get(counter);
        let sampled_hits = sampled_hits(&delta);
        let bytes = SampledFamily::ALL.map(|family| match family {
            SampledFamily::Allocations => delta(Counter::AllocBytes) as f64,
            _ => 0.0,
        });
        let mut attached = [0.0; SAMPLED_FAMILIES];
        for (index, stats) in self.stats.iter_mut().enumerate() {
            if let Some(since) = self.attached_since[index] {
                self.attached_secs[index] += at.duration_since(since).as_secs_f64();
                self.attached_since[index] = Some(at);
            }
            let fraction = (self.attached_secs[index] / seconds.max(1e-9)).min(1.0);
            self.attached_secs[index] = 0.0;
            attached[index] = fraction;
            stats.seconds += seconds;
            stats.duty_seconds += fraction * seconds;
            stats.observed += sampled_hits[index];
            stats.observed_bytes += bytes[index];
            let windows = std::mem::take(&mut self.windows_seen[index]);
            stats.estimate.tick_with_windows(seconds, fraction, sampled_hits[index], windows);
        }
        let defer_hits = defer_hits(&delta);
        let required_hits = self.governor.required_hits(&sampled_hits);
        self.seconds += seconds;
        self.defer_probe_ns += (defer_hits + required_hits) as f64 * self.governor.hit_ns();
        let observation =
            Observation { seconds, defer_hits, sampled_hits, duty_in_force: attached };
        self.last = now;
        self.last_tick = at;
        Ok(observation)
    }

    /// The target's CPU time and the probes' hits now (None if the target is gone). A thread
    /// that exited since the last mark takes its CPU time with it: the tick is then not
    /// compared.
    fn mark(&mut self, tracer: &Tracer) -> Result<Option<Mark>> {
        let counters = tracer.counters()?;
        let total = |counter: Counter| counters.get(counter);
        let sampled = sampled_hits(&total);
        let hits: [u64; GROUPS] =
            std::array::from_fn(|g| if g == 0 { defer_hits(&total) } else { sampled[g - 1] });
        let Some(threads) = target::thread_cpu_times(self.pid) else { return Ok(None) };
        let tids: Vec<u32> = threads.iter().map(|(tid, _)| *tid).collect();
        if self.threads.iter().any(|tid| tids.binary_search(tid).is_err()) {
            self.tick_disturbed = true;
        }
        self.threads = tids;
        let cpu_ns = threads.iter().map(|(_, ns)| ns).sum();
        Ok(Some(Mark { at_ns: monotonic_ns(), cpu_ns, hits }))
    }

    /// Marks the current segment's start into the tick's marks (dropping them if the target's
    /// threads can't be read).
    fn push_mark(&mut self, tracer: &Tracer) -> Result<()> {
        match self.mark(tracer)? {
            Some(mark) => {
                let attached = std::array::from_fn(|index| self.attached_since[index].is_some());
                self.tick_marks.push((mark, attached));
            }
            None => self.tick_marks.clear(),
        }
        Ok(())
    }

    /// At a tick: compares the tick that ended (its windows, then the rest) into the real cost
    /// of a hit; once that figure is solid, the budget is kept on it (plus its error), and on
    /// each family's own figure where that is solid too.
    fn measure(&mut self, tracer: &Tracer) -> Result<()> {
        // A window still open (the tick came early) leaves the tick uncompared.
        let complete = !self.tick_marks.is_empty() && self.next_window_event().is_none();
        if !complete {
            return Ok(());
        }
        self.push_mark(tracer)?;
        let marks = std::mem::take(&mut self.tick_marks);
        if marks.len() < 2 {
            return Ok(());
        }
        let costs = std::array::from_fn(|group| self.best_hit_ns(group));
        self.windows_seen = windows_seen(&marks, costs);
        // A tick whose families changed otherwise (a budget check detached one) or whose
        // threads changed is not compared into the real cost.
        if self.tick_disturbed {
            return Ok(());
        }
        self.cost.tick(&marks);
        self.measured = self.cost.measured();
        self.measured_by_family = self.cost.by_family();
        let Some(measured) = self.measured.filter(Measured::is_solid) else { return Ok(()) };
        let was = self.governor.hit_ns();
        // Never below the calibrated cost: that is the kernel's own path for a hit, which the
        // target pays whatever else it does. A figure under it means the target's CPU time
        // can't show the cost: a program using all the CPU it gets does less work while the
        // probes are on, rather than spending more time.
        let floor = self.hit_cost_ns.unwrap_or(0) as f64;
        let budget_ns = (measured.ns_per_hit + measured.error_ns).max(floor);
        self.governor.set_hit_ns(budget_ns);
        for family in SampledFamily::ALL {
            let own = self.measured_by_family[family.index()].filter(Measured::is_solid);
            let own = own.map(|m| (m.ns_per_hit + m.error_ns).max(floor));
            self.governor.set_family_hit_ns(family, own);
        }
        if (budget_ns - was).abs() > was / 4.0 {
            info!(
                ns_per_hit = measured.ns_per_hit.round(),
                error_ns = measured.error_ns.round(),
                ticks = measured.ticks,
                budget_hit_ns = budget_ns.round(),
                by_family = ?SampledFamily::ALL.map(|family| self.governor.family_hit_ns(family).round()),
                "measured what a probe hit really costs the target: the budget is kept on it"
            );
        }
        Ok(())
    }

    /// Each sampled family's duty cycle now (1: always attached).
    pub(super) fn duty_cycles(&self) -> [(SampledFamily, f64); SAMPLED_FAMILIES] {
        SampledFamily::ALL.map(|family| (family, self.governor.duty(family)))
    }

    /// The best figure for what a hit of a mark's hit group costs (see [`GROUPS`]): its own
    /// measured cost, else every probe's, else the calibrated one (no planning headroom).
    fn best_hit_ns(&self, group: usize) -> f64 {
        let own = group.checked_sub(1).and_then(|family| self.measured_by_family[family]);
        own.or(self.measured)
            .filter(Measured::is_solid)
            .map(|m| m.ns_per_hit)
            .or(self.hit_cost_ns.map(|ns| ns as f64))
            .unwrap_or(Self::FALLBACK_HIT_COST.as_nanos() as f64)
    }

    /// Closes the windows that are due (detaching their families), then opens the next slice's
    /// if it is due (attaching them), marking each change. Returns when the next window closes
    /// or opens (None: the tick has no more).
    pub(super) fn advance_windows(
        &mut self,
        tracer: &mut Tracer,
    ) -> Result<Option<tokio::time::Instant>> {
        let due = tokio::time::Instant::now() + WINDOW_SLACK;
        let mut closed = false;
        for index in 0..SAMPLED_FAMILIES {
            if self.window_ends[index].is_some_and(|end| end <= due) {
                self.window_ends[index] = None;
                self.set_family(tracer, index, false)?;
                closed = true;
            }
        }
        if closed && !self.tick_marks.is_empty() {
            self.push_mark(tracer)?;
        }
        let opens = self.next_slice.map(|(_, at)| at);
        if self.window_ends.iter().all(Option::is_none) && opens.is_some_and(|at| at <= due) {
            self.open_slice(tracer)?;
            if !self.tick_marks.is_empty() {
                self.push_mark(tracer)?;
            }
        }
        Ok(self.next_window_event())
    }

    pub(super) fn report(&self) -> GovernorReport {
        let estimate = |stats: &FamilyStats| stats.estimate.estimate();
        let sampled = SampledFamily::ALL
            .into_iter()
            .zip(self.stats)
            .filter(|(_, stats)| stats.sampled)
            .map(|(family, stats)| SamplingReport {
                family,
                measured_hit_cost_ns: self.measured_by_family[family.index()]
                    .map(|m| m.ns_per_hit.max(0.0).round() as u64),
                measured_hit_cost_error_ns: self.measured_by_family[family.index()]
                    .map(|m| m.error_ns.round() as u64),
                min_duty_cycle: stats.min_duty,
                mean_duty_cycle: if stats.seconds > 0.0 {
                    stats.duty_seconds / stats.seconds
                } else {
                    1.0
                },
                observed_calls: stats.observed,
                estimated_calls: estimate(&stats).calls.round() as u64,
                estimated_calls_error: estimate(&stats).error.round() as u64,
                estimate_weak: estimate(&stats).weak,
                estimate_slowed_share: estimate(&stats).slowed_share,
                // At the mean size of the allocations seen.
                estimated_bytes: (family == SampledFamily::Allocations).then(|| {
                    let mean_size = stats.observed_bytes / stats.observed.max(1) as f64;
                    (mean_size * estimate(&stats).calls).round() as u64
                }),
            })
            .collect();
        GovernorReport {
            max_overhead_percent: self.max_overhead_percent,
            hit_cost_ns: self.hit_cost_ns,
            calibrated_ns: self.calibrated_ns.clone(),
            planned_hit_cost_ns: self.governor.hit_ns().round() as u64,
            measured_hit_cost_ns: self.measured.map(|m| m.ns_per_hit.max(0.0).round() as u64),
            measured_hit_cost_error_ns: self.measured.map(|m| m.error_ns.round() as u64),
            measured_ticks: self.measured.map_or(0, |m| m.ticks),
            sampled,
            defer_probes_percent: match self.seconds > 0.0 {
                true => self.defer_probe_ns / self.seconds / 1e7,
                false => 0.0,
            },
            defers_over_budget_secs: self.defers_over_budget_secs,
        }
    }
}

/// Each family's windows in a tick's marks (runs of segments with it attached): the variance
/// their hits give its estimate ([`slice_variance`]), and in each the share of the program's
/// time the probes took (their hits at `costs` ns a hit per group, over the longer of the wall
/// time and the program's CPU time), with what that may have cost the estimate.
fn windows_seen(marks: &[(Mark, Attached)], costs: [f64; GROUPS]) -> [Windows; SAMPLED_FAMILIES] {
    let slice_ns = (GOVERNOR_TICK / SLICES_PER_TICK).as_nanos() as f64;
    std::array::from_fn(|family| {
        let mut windows = Vec::new();
        let mut seen = Windows::default();
        let mut open: Option<&Mark> = None;
        for (mark, attached) in marks {
            match (open, attached[family]) {
                (None, true) => open = Some(mark),
                (Some(start), false) => {
                    let hits = mark.hits[1 + family].saturating_sub(start.hits[1 + family]);
                    let wall_ns = mark.at_ns.saturating_sub(start.at_ns) as f64;
                    let share = wall_ns / slice_ns;
                    windows.push((hits, share));
                    let cpu_ns = mark.cpu_ns.saturating_sub(start.cpu_ns) as f64;
                    let probe_ns: f64 = (0..GROUPS)
                        .map(|g| mark.hits[g].saturating_sub(start.hits[g]) as f64 * costs[g])
                        .sum();
                    if wall_ns > 0.0 && share > 0.0 {
                        let probe_share = probe_ns / wall_ns.max(cpu_ns);
                        seen.add_window(hits as f64 / share, probe_share);
                    }
                    open = None;
                }
                _ => {}
            }
        }
        seen.variance = slice_variance(&windows);
        seen
    })
}

/// Hits of the probes that always stay on (heap defers, deferreturn); goroutine exits are a
/// sampled family until a heap defer is seen.
pub(super) fn defer_hits(delta: &impl Fn(Counter) -> u64) -> u64 {
    delta(Counter::DeferProc) + delta(Counter::DeferReturn)
}

/// Hits of each sampled family, indexed like [`SampledFamily::ALL`].
pub(super) fn sampled_hits(delta: &impl Fn(Counter) -> u64) -> [u64; SAMPLED_FAMILIES] {
    [
        delta(Counter::GoroutineExit),
        delta(Counter::DeferProcStack),
        delta(Counter::Malloc) + delta(Counter::AllocSamples),
        delta(Counter::MapAssign),
    ]
}
