//! `deferprobe run`: the thin runtime shell around the pure parts. It finds or starts the
//! target, attaches the probe plan, then runs one tokio loop that drains the ring buffer on a
//! short timer into the [`Aggregator`], reconciles it with the runtime's `_defer` chains and
//! logs counts every `--interval`, and stops on the duration, SIGINT/SIGTERM or the target's
//! exit. Then it writes the report.

use std::{
    collections::{HashMap, HashSet},
    os::fd::OwnedFd,
    time::{Duration, Instant},
};

use deferprobe_common::{Counter, Counters};
use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::{Signal, SignalKind, signal},
    time::{MissedTickBehavior, interval, interval_at, sleep},
};
use tracing::{debug, info, warn};

use crate::{
    aggregator::{Aggregator, Event, Reconciled},
    binary::{GoBinary, MemoryProfiling},
    cli::RunArgs,
    error::{Error, ErrorKind, Result},
    findings,
    governor::{
        Governor, MIN_OBSERVATION_SECS, Observation, SAMPLED_FAMILIES, SampledFamily,
        planned_hit_ns,
    },
    layout::RuntimeLayout,
    output::{self, OutputFile},
    plan::{AllocationMode, PlanOptions, ProbeFamily, ProbePlan},
    report::{
        self, AllocationsReport, Counts, EndReason, GovernorReport, Location, Lookups, LostEvents,
        ProbesReport, ProfiledAllocations, RateSource, Report, SamplingReport, SnapshotStats,
        TargetReport,
    },
    snapshot::{RuntimeModel, RuntimeReader},
    state::memory::{Memory as _, ProcessMemory, RuntimeGoroutine, read_allgs, read_goroutine},
    state::{Snapshot, monotonic_ns},
    target::{self, GatedChild, Target},
    tracer::{AttachMode, Tracer},
};

/// How often the ring buffer is drained (probes submit without waking us).
const DRAIN_EVERY: Duration = Duration::from_millis(50);

/// Pause between the two final looks at the runtime's chains.
const FINAL_RECHECK: Duration = Duration::from_millis(50);

/// Records registered this recently may not be linked into `g._defer` yet when the chain is
/// read (the probe fires at deferproc's entry): reconciliation leaves them alone.
const LINK_GRACE: Duration = Duration::from_millis(20);

/// Runs `deferprobe run`; returns the process exit code.
pub fn run(args: &RunArgs) -> Result<i32> {
    check_privileges()?;
    // An unwritable --report fails now, not after the whole trace.
    let report_file =
        args.report.as_deref().map(|path| OutputFile::check("--report", path)).transpose()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|err| Error::internal(format!("starting the tokio runtime: {err}")))?;
    // Catch SIGINT / SIGTERM from now on: one arriving while probes are being attached still
    // ends tracing cleanly, with a report.
    let _runtime_context = runtime.enter();
    let signals = Signals::install()?;

    let started_command = !args.command.is_empty();
    let running = args.pid.map(Target::running).transpose()?;
    let exe = match &running {
        Some(target) => target.exe.clone(),
        None => target::resolve_program(&args.command[0])?,
    };
    // Analyse and plan before anything is started: a bad binary fails before it runs.
    let binary = match &running {
        Some(target) => target.open_binary()?,
        None => GoBinary::open(&exe)?,
    };
    let plan = ProbePlan::build(
        &binary,
        &PlanOptions { families: args.probes.clone(), allocations: args.alloc_mode },
    )?;
    // What reading the runtime's state needs from the binary, found before the target runs.
    // Why the runtime's state can't be read, if it can't (reported as a note).
    let mut state_error = None;
    let model = match RuntimeModel::new(&binary) {
        _ if args.counts_only => {
            state_error = Some("--counts-only: deferprobe did not read the target's memory".into());
            None
        }
        Ok(model) => Some(model),
        Err(err) => {
            warn!(%err, "the runtime's state can't be read: pending defers come from events only");
            state_error = Some(err.to_string());
            None
        }
    };
    let memory_profiling = binary.memory_profiling();
    let profiled = plan.allocations == AllocationMode::Profiled
        && plan.families.contains(&ProbeFamily::Allocations);
    if profiled && memory_profiling == MemoryProfiling::Disabled {
        return Err(Error::unsupported(format!(
            "{}: memory profiling is off in this program (the Go linker turns it off when \
             nothing can read the profile, e.g. no net/http/pprof or runtime.MemProfile), so \
             --alloc-mode profiled would see no allocation; use --alloc-mode all",
            exe.display()
        )));
    }
    let (target, gated) = match running {
        Some(target) => (target, None),
        None => {
            let child = GatedChild::spawn(&exe, &args.command)?;
            (child.target.clone(), Some(child))
        }
    };
    let mut tracer = match Tracer::attach(&plan, &target.exe, target.pid, args.ring_buffer_bytes())
    {
        Ok(tracer) => tracer,
        Err(err) => {
            if let Some(child) = gated {
                child.abort();
            }
            return Err(err);
        }
    };
    if let Some(child) = gated {
        child.release()?;
    }
    let families: Vec<&str> = plan.families.iter().map(|family| family.name()).collect();
    info!(
        probes = tracer.attached(),
        families = families.join(","),
        go_version = %plan.go_version,
        pid = target.pid,
        layout = ?plan.layout_source,
        attach_mode = ?tracer.mode(),
        "probes attached"
    );
    // Runtime address − ELF virtual address, for naming the PCs the probes report.
    let bias = target::load_bias(&binary, target.pid);
    let exit_watch = target::pidfd(target.pid)?;
    let memory = ProcessMemory::new(target.pid);
    // The runtime's own state: snapshots at attach, every --interval and before the report.
    // A target whose memory can't be read is refused (naming the capability).
    let reader = match &model {
        Some(model) => match RuntimeReader::new(model, target.pid, bias) {
            Ok(reader) => Some(reader),
            Err(err) if err.kind == ErrorKind::Permission => return Err(err),
            Err(err) => {
                warn!(%err, "the target's memory can't be read: pending defers come from events only");
                state_error = Some(err.to_string());
                None
            }
        },
        None => None,
    };

    let child = started_command.then_some(target.pid);
    // Every g the runtime made, to find defers already pending before tracing started. Only
    // binaries with a symbol table name it; stripped ones fall back to the goroutines seen.
    let allgs = binary.data_symbol("runtime.allgs").map(|address| address.wrapping_add(bias));
    // Runtime address of runtime.MemProfileRate, to unsample with the rate in force.
    let memprofile_rate = match memory_profiling {
        MemoryProfiling::Enabled { rate_variable, .. } if profiled && !args.counts_only => {
            Some(rate_variable.wrapping_add(bias))
        }
        _ => None,
    };
    if let (Some(at), Some(pid)) = (memprofile_rate, args.pid)
        && memory.read_u64(at) == Some(0)
    {
        return Err(Error::unsupported(format!(
            "pid {pid} has set runtime.MemProfileRate to 0 (memory profiling off), so \
             --alloc-mode profiled would see no allocation; use --alloc-mode all"
        )));
    }
    let context = TraceContext {
        reader: reader.as_ref(),
        counts_only: args.counts_only,
        memory,
        layout: plan.layout,
        plan: &plan,
        memprofile_rate,
        allgs,
    };
    let traced =
        runtime.block_on(trace(&mut tracer, exit_watch, signals, args, child, &context))?;
    // How often each captured map was written while traced, from the kernel's known-maps set:
    // read before the tracer detaches.
    let from_snapshot = traced.snapshot.is_some() && reader.is_some();
    let map_writes = match (&traced.snapshot, from_snapshot) {
        (Some((snapshot, _)), true) => {
            captured_map_writes(&tracer, snapshot.captured_map_addresses())
        }
        _ => HashMap::new(),
    };
    drop(tracer); // detach before anything else

    let exit_code = match started_command {
        true => Some(target::wait_child(target.pid)?.shell_code()),
        false => None,
    };
    let location = |pc: u64| Location::of_return_address(&binary, pc);
    let map_writes = |map: u64| map_writes.get(&map).copied();
    let lookups = Lookups {
        bias,
        location: &location,
        now_ns: traced.ended_ns,
        min_pending: args.min_pending,
    };
    // The runtime's own state wins: pending records, what their closures hold, and sites. The
    // events alone (`correlate`) only when it could not be read.
    let mut snapshot_notes = Vec::new();
    let correlation =
        if let (Some((snapshot, after_tracing)), Some(reader)) = (&traced.snapshot, &reader) {
            let registered: HashMap<(u64, u64), u64> = traced
                .aggregator
                .pending_by_goroutine()
                .flat_map(|(goid, records)| {
                    records
                        .iter()
                        .filter(|r| !r.adopted)
                        .map(move |r| ((r.closure, goid), r.registered_ns))
                })
                .collect();
            let registered_ns = |closure: u64, goid: u64| registered.get(&(closure, goid)).copied();
            let events = findings::Traced {
                registered_ns: &registered_ns,
                sites: traced
                    .aggregator
                    .sites()
                    .map(|(pc, totals)| (pc, (totals.registered, totals.released)))
                    .collect(),
                goroutine_sites: snapshot
                    .goroutines
                    .iter()
                    .flat_map(|g| {
                        let goid = g.header.goid;
                        let sites = traced.aggregator.goroutine_sites(goid);
                        sites.map(move |(pc, t)| ((goid, pc), (t.registered, t.released)))
                    })
                    .collect(),
                map_first_written: &|map| traced.aggregator.map(map).map(|m| m.first_pc),
                map_writes: &map_writes,
                now_ns: traced.ended_ns,
            };
            let sections = reader.sections(snapshot, args.min_pending, Some(&events));
            snapshot_notes = crate::snapshot::snapshot_notes(snapshot, &sections);
            if !after_tracing {
                snapshot_notes.push(format!(
                "the target exited: pending defers are the last snapshot of the runtime's state, \
                 taken {:.1}s before, less the records whose frames returned or goroutines \
                 exited since, plus the records registered since",
                traced.ended_ns.saturating_sub(snapshot.ended_ns) as f64 / 1e9
            ));
            }
            sections
        } else {
            report::correlate(&traced.aggregator, &lookups)
        };
    let events = traced.aggregator.events();
    let lost = LostEvents::new(&traced.counters, events.undecodable, events.without_goid);
    let counts = Counts::from_counters(&traced.counters, &lost);
    let allocations = AllocationsReport {
        mode: plan.allocations,
        profiled: profiled.then(|| {
            let (rate, source) = match (traced.memprofile_rate, memory_profiling) {
                (Some(rate), _) => (rate, RateSource::Target),
                (None, MemoryProfiling::Enabled { initial_rate, .. }) => {
                    (initial_rate, RateSource::Binary)
                }
                (None, _) => (report::GO_DEFAULT_MEMPROFILE_RATE, RateSource::GoDefault),
            };
            ProfiledAllocations::unsample(traced.aggregator.sampled_allocations(), rate, source)
        }),
    };
    let mut notes = notes(&lost, traced.ended_by, exit_code, args.ring_buffer_kib);
    notes.extend(snapshot_notes);
    if let Some(err) = &state_error {
        notes.push(format!(
            "the runtime's state was not read ({err}): pending defers, findings and sites come \
             from the events alone, so records pending before tracing started are not counted \
             and what closures capture is unknown"
        ));
    }
    let pending_before_trace: u64 = match from_snapshot {
        true => correlation.findings.iter().map(|f| f.pending_before_trace).sum(),
        false => traced.aggregator.sites().map(|(_, t)| t.adopted).sum(),
    };
    if pending_before_trace > 0 {
        notes.push(format!(
            "{} heap defer records were already pending in the runtime when tracing started \
             (\"pending at attach\", found in the goroutines' _defer chains): their age is \
             unknown (at least the trace's){}",
            pending_before_trace,
            match reader.is_some() {
                true => "",
                false => ", and so are the maps they capture",
            }
        ));
    }
    if traced.reconciled.released + traced.reconciled.moved > 0 {
        notes.push(format!(
            "the runtime's _defer chains corrected the event-based state: {} records run without \
             deferreturn (panic, recover, Goexit), {} frames moved by stack growth",
            traced.reconciled.released, traced.reconciled.moved
        ));
    }
    if !from_snapshot {
        notes.extend(findings::capture_notes(&correlation));
    }
    if !plan.families.contains(&ProbeFamily::Defers) {
        notes.push(
            "defers were not probed (--probes): pending defers, findings and sites cover only \
             records read from the goroutines' _defer chains, with no registrations or releases \
             seen"
                .into(),
        );
    }
    for sampled in &traced.governor.sampled {
        notes.push(format!(
            "{} probes were sampled to stay under --max-overhead {}% (duty cycle {:.0}% on \
             average): their counts cover only the sampled windows; governor.sampled has scaled \
             estimates{}",
            sampled.family.name(),
            traced.governor.max_overhead_percent,
            sampled.mean_duty_cycle * 100.0,
            match sampled.family {
                SampledFamily::MapWrites => {
                    ", and maps written outside the windows can't be recognised as captures"
                }
                SampledFamily::GoroutineExits => {
                    " (before the first heap defer, when there was no record for them to release)"
                }
                SampledFamily::StackDefers | SampledFamily::Allocations => "",
            }
        ));
    }
    if traced.governor.defers_over_budget_secs > 0.0 {
        notes.push(format!(
            "for {:.0}s the defer probes alone cost more than --max-overhead {}% (they always \
             stay on; {:.1}% of a CPU on average over the trace): the budget was exceeded",
            traced.governor.defers_over_budget_secs,
            traced.governor.max_overhead_percent,
            traced.governor.defer_probes_percent
        ));
    }
    let report = Report {
        schema_version: report::SCHEMA_VERSION,
        target: TargetReport {
            pid: target.pid,
            exe: target.exe_name.clone(),
            go_version: plan.go_version.clone(),
            exit_code,
        },
        duration_secs: traced.duration.as_secs_f64(),
        ended_by: traced.ended_by,
        counts: counts.reported(&plan.families, plan.allocations),
        lost,
        probes: ProbesReport {
            attached: traced.attached,
            families: plan.families.clone(),
            layout_source: plan.layout_source,
        },
        allocations,
        governor: traced.governor,
        snapshot: traced
            .snapshot
            .as_ref()
            .filter(|_| reader.is_some())
            .map(|(snapshot, _)| SnapshotStats::of(snapshot)),
        pending: correlation.pending,
        findings: correlation.findings,
        goroutines: correlation.goroutines,
        sites: correlation.sites,
        notes,
    };
    let json = report.to_json() + "\n";
    output::deliver(&report.to_text(), report_file.as_ref().map(|file| (file, json.as_str())))?;
    Ok(exit_code.unwrap_or(0))
}

/// Write counts of `maps` (runtime addresses), from the kernel's known-maps set.
fn captured_map_writes(tracer: &Tracer, maps: HashSet<u64>) -> HashMap<u64, u64> {
    maps.into_iter().filter_map(|map| Some((map, tracer.map_writes(map)?))).collect()
}

/// The signals that end tracing.
struct Signals {
    interrupt: Signal,
    terminate: Signal,
}

impl Signals {
    /// Needs a tokio runtime context.
    fn install() -> Result<Signals> {
        let error = |err| Error::internal(format!("installing signal handlers: {err}"));
        Ok(Signals {
            interrupt: signal(SignalKind::interrupt()).map_err(error)?,
            terminate: signal(SignalKind::terminate()).map_err(error)?,
        })
    }
}

/// What the loop reads besides the tracer.
struct TraceContext<'a> {
    /// Snapshots of the runtime's state (None if its goroutine list can't be found).
    reader: Option<&'a RuntimeReader<'a, 'a>>,
    /// `--counts-only`: the target's memory is never read.
    counts_only: bool,
    memory: ProcessMemory,
    layout: RuntimeLayout,
    plan: &'a ProbePlan,
    /// Runtime address of `runtime.MemProfileRate` with `--alloc-mode profiled`, when the
    /// binary has symbols: read while tracing, to unsample with the rate in force.
    memprofile_rate: Option<u64>,
    /// Runtime address of `runtime.allgs`, when the binary has symbols.
    allgs: Option<u64>,
}

/// What the trace loop produced.
struct Traced {
    /// The newest snapshot of the runtime's state, and whether it was taken after tracing
    /// stopped (false: the target exited first, and this is the last one taken before).
    snapshot: Option<(Snapshot, bool)>,
    /// `runtime.MemProfileRate` as last read from the target (`--alloc-mode profiled`).
    memprofile_rate: Option<u64>,
    aggregator: Aggregator,
    counters: Counters,
    ended_by: EndReason,
    duration: Duration,
    /// Monotonic ns when tracing stopped (the probes' clock).
    ended_ns: u64,
    attached: usize,
    reconciled: Reconciled,
    governor: GovernorReport,
}

/// How often the governor re-evaluates, and the period its sampling windows divide.
const GOVERNOR_TICK: Duration = Duration::from_secs(1);
/// The first decision: every family is attached until then.
const FIRST_GOVERNOR_TICK: Duration = Duration::from_millis(20);
/// Between ticks, the cost of the last this-long is checked; over budget, the governor decides
/// at once (degrading fast, raising only at the regular ticks).
const BUDGET_CHECK_EVERY: Duration = Duration::from_millis(20);

/// Applies the governor's duty cycles to the tracer (a family with duty d is attached for the
/// first d of each tick) and keeps what the report needs to present sampled counts as
/// estimates.
struct Sampler {
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
    /// Regular ticks so far (refresh windows of detached families come every few).
    ticks: u64,
    /// Seconds traced, and the probe time the always-on defer probes took in them (ns).
    seconds: f64,
    defer_probe_ns: f64,
    /// Seconds in which the defer probes alone exceeded the budget.
    defers_over_budget_secs: f64,
}

#[derive(Clone, Copy, Debug)]
struct FamilyStats {
    sampled: bool,
    min_duty: f64,
    duty_seconds: f64,
    seconds: f64,
    observed: u64,
    observed_bytes: f64,
    /// Calls: those seen, scaled up by the duty cycle, plus while detached the latest rate.
    estimated: f64,
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
            estimated: 0.0,
        }
    }
}

impl Sampler {
    /// Per-hit cost if calibration failed: what a uprobe hit costs on a slow virtual machine.
    const FALLBACK_HIT_COST: Duration = Duration::from_micros(20);

    fn new(tracer: &Tracer, max_overhead_percent: f64) -> Result<Sampler> {
        let windows = tracer.mode() == AttachMode::Multi;
        let hit_cost = tracer.hit_cost();
        match hit_cost {
            Some(cost) => {
                info!(hit_cost_ns = cost.as_nanos() as u64, max_overhead_percent, "calibrated")
            }
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
            ticks: 0,
            seconds: 0.0,
            defer_probe_ns: 0.0,
            defers_over_budget_secs: 0.0,
        })
    }

    /// One governor tick: account for the tick that ended, decide, and open the next tick's
    /// windows. Returns when the windows close (None if nothing is sampled).
    fn tick(&mut self, tracer: &mut Tracer) -> Result<Option<tokio::time::Instant>> {
        self.decide(tracer)?;
        self.ticks += 1;
        let mut window = None;
        for (index, family) in SampledFamily::ALL.into_iter().enumerate() {
            let duty = self.governor.duty_for_tick(family, self.ticks);
            self.plan(index, duty);
            self.set_family(tracer, index, duty > 0.0)?;
            if duty > 0.0 && duty < 1.0 && self.windows {
                window = Some(tokio::time::Instant::now() + GOVERNOR_TICK.mul_f64(duty));
            }
        }
        Ok(window)
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
    /// First of all, goroutine exits become required at the first heap defer (registered, or
    /// pending before the trace: `tracks_goroutines`).
    fn degrade_if_over_budget(
        &mut self,
        tracer: &mut Tracer,
        tracks_goroutines: bool,
    ) -> Result<()> {
        let (now, at) = (tracer.counters()?, Instant::now());
        let (last, last_at) = std::mem::replace(&mut self.last_check, (now, at));
        if tracks_goroutines || now.get(Counter::DeferProc) > last.get(Counter::DeferProc) {
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
        let mut hits = defer_hits(&delta) as f64;
        for (index, family_hits) in sampled_hits(&delta).into_iter().enumerate() {
            if self.attached_since[index].is_some() {
                hits += family_hits as f64 * self.planned[index];
            }
        }
        if hits / seconds * self.governor.hit_ns() / 1e7 <= self.max_overhead_percent {
            return Ok(());
        }
        self.decide(tracer)?;
        for (index, family) in SampledFamily::ALL.into_iter().enumerate() {
            let duty = self.governor.duty(family);
            if duty < self.planned[index] {
                self.plan(index, duty);
                self.set_family(tracer, index, false)?;
            }
        }
        Ok(())
    }

    /// From the first heap defer on, goexit1 stays attached with the goroutine-id cache on: it
    /// releases the records of goroutines that end in `runtime.Goexit`, and keeps the cache
    /// right. Before, it only counted exits.
    fn require_exits(&mut self, tracer: &mut Tracer) -> Result<()> {
        let family = SampledFamily::GoroutineExits;
        if self.governor.is_required(family) {
            return Ok(());
        }
        if self.governor.require(family) {
            info!("a heap defer was seen: goroutine exits are probed from now on, always on");
        }
        self.plan(family.index(), 1.0);
        self.set_family(tracer, family.index(), true)
    }

    /// Accounts for the time since the last tick and lets the governor decide; logs what
    /// changed.
    fn decide(&mut self, tracer: &Tracer) -> Result<()> {
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
    fn plan(&mut self, index: usize, duty: f64) {
        self.planned[index] = duty;
        if duty < 1.0 {
            let stats = &mut self.stats[index];
            stats.sampled = true;
            stats.min_duty = stats.min_duty.min(duty);
        }
    }

    /// Attaches or detaches a family, keeping count of the time it is attached.
    fn set_family(&mut self, tracer: &mut Tracer, index: usize, attach: bool) -> Result<()> {
        let family = SampledFamily::ALL[index];
        // goexit1 is what makes the kernel forget cached goroutine ids: the cache is on exactly
        // while it is attached.
        let exits = family == SampledFamily::GoroutineExits;
        if exits && !attach {
            tracer.set_goroutine_id_cache(false)?;
        }
        for program in family.programs() {
            tracer.set_attached(*program, attach)?;
        }
        if exits && attach {
            tracer.set_goroutine_id_cache(true)?;
        }
        match (attach, self.attached_since[index]) {
            (true, None) => self.attached_since[index] = Some(Instant::now()),
            (false, Some(since)) => {
                self.attached_secs[index] += since.elapsed().as_secs_f64();
                self.attached_since[index] = None;
            }
            _ => {}
        }
        Ok(())
    }

    /// Adds the hits since the last tick to the estimates, scaled by the fraction of the time
    /// each family was really attached, and returns them for the governor.
    fn account(&mut self, tracer: &Tracer) -> Result<Observation> {
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
            stats.estimated += match fraction > 0.0 {
                true => sampled_hits[index] as f64 / fraction,
                // Detached: at the rate last seen.
                false => self.governor.rate(SampledFamily::ALL[index]).unwrap_or(0.0) * seconds,
            };
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

    /// Ends the sampling windows: detaches every family below full duty.
    fn close_windows(&mut self, tracer: &mut Tracer) -> Result<()> {
        for (index, family) in SampledFamily::ALL.into_iter().enumerate() {
            if self.governor.duty(family) < 1.0 {
                self.set_family(tracer, index, false)?;
            }
        }
        Ok(())
    }

    fn report(&self) -> GovernorReport {
        let sampled = SampledFamily::ALL
            .into_iter()
            .zip(self.stats)
            .filter(|(_, stats)| stats.sampled)
            .map(|(family, stats)| SamplingReport {
                family,
                min_duty_cycle: stats.min_duty,
                mean_duty_cycle: if stats.seconds > 0.0 {
                    stats.duty_seconds / stats.seconds
                } else {
                    1.0
                },
                observed_calls: stats.observed,
                estimated_calls: stats.estimated.round() as u64,
                // At the mean size of the allocations seen.
                estimated_bytes: (family == SampledFamily::Allocations).then(|| {
                    (stats.observed_bytes / stats.observed.max(1) as f64 * stats.estimated).round()
                        as u64
                }),
            })
            .collect();
        GovernorReport {
            max_overhead_percent: self.max_overhead_percent,
            hit_cost_ns: self.hit_cost_ns,
            planned_hit_cost_ns: self.governor.hit_ns().round() as u64,
            sampled,
            defer_probes_percent: match self.seconds > 0.0 {
                true => self.defer_probe_ns / self.seconds / 1e7,
                false => 0.0,
            },
            defers_over_budget_secs: self.defers_over_budget_secs,
        }
    }
}

/// Hits of the probes that always stay on (heap defers, deferreturn); goroutine exits are a
/// sampled family until a heap defer is seen.
fn defer_hits(delta: &impl Fn(Counter) -> u64) -> u64 {
    delta(Counter::DeferProc) + delta(Counter::DeferReturn)
}

/// Hits of each sampled family, indexed like [`SampledFamily::ALL`].
fn sampled_hits(delta: &impl Fn(Counter) -> u64) -> [u64; SAMPLED_FAMILIES] {
    [
        delta(Counter::GoroutineExit),
        delta(Counter::DeferProcStack),
        delta(Counter::Malloc) + delta(Counter::AllocSamples),
        delta(Counter::MapAssign),
    ]
}

/// The loop. `child` is set when deferprobe started the target: signals are then forwarded to
/// it and tracing lasts until it exits.
async fn trace(
    tracer: &mut Tracer,
    exit_watch: OwnedFd,
    mut signals: Signals,
    args: &RunArgs,
    child: Option<u32>,
    context: &TraceContext<'_>,
) -> Result<Traced> {
    let started = Instant::now();
    // SAFETY: the fd stays open (owned by `exited`) for as long as it is registered.
    let exited = unsafe { AsyncFd::register_with_interest(exit_watch, Interest::READABLE) }
        .map_err(|err| Error::internal(format!("watching the target: {:?}", err)))?;
    let mut drain_tick = interval(DRAIN_EVERY);
    drain_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut log_tick = interval_at(tokio::time::Instant::now() + args.interval, args.interval);
    log_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let deadline = sleep(args.duration.unwrap_or(Duration::MAX / 4));
    tokio::pin!(deadline);

    let mut sampler = Sampler::new(tracer, args.max_overhead)?;
    // The first decision comes early, so that a busy program does not run a whole tick with
    // every probe on before the budget applies.
    let mut governor_tick =
        interval_at(tokio::time::Instant::now() + FIRST_GOVERNOR_TICK, GOVERNOR_TICK);
    governor_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut budget_check = interval(BUDGET_CHECK_EVERY);
    budget_check.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let window_end = sleep(Duration::MAX / 4);
    tokio::pin!(window_end);
    let mut window_open = false;

    let mut aggregator = Aggregator::new();
    let mut reconciled = Reconciled::default();
    // Each snapshot follows a drain: releases from then on are logged (`mark`), so that if the
    // target exits before the next one, the last one can be brought up to the exit.
    let take_snapshot = |aggregator: &mut Aggregator| {
        let snapshot = context.reader.and_then(|reader| reader.take().ok());
        if snapshot.is_some() {
            aggregator.mark();
        }
        snapshot
    };
    // A program deferprobe started has nothing pending before its first instruction: its
    // first snapshot comes at the first interval.
    let mut snapshot = match child {
        Some(_) => None,
        None => take_snapshot(&mut aggregator),
    };
    let mut last_logged = Counts::default();
    let mut batch = Vec::new();
    let mut interrupted = false;
    let mut memprofile_rate = None;
    let mut read_memprofile_rate = || {
        if let Some(rate) = context.memprofile_rate.and_then(|at| context.memory.read_u64(at)) {
            memprofile_rate = Some(rate);
        }
    };
    let ended_by = loop {
        tokio::select! {
            _ = drain_tick.tick() => {
                drain(tracer, &mut aggregator, &mut batch);
                read_memprofile_rate();
            }
            _ = budget_check.tick() => {
                // Load that rises between ticks is answered now, not at the next tick.
                let tracks = aggregator.tracks_goroutines();
                if or_exited(sampler.degrade_if_over_budget(tracer, tracks), &exited)?.is_none() {
                    break EndReason::TargetExited;
                }
            }
            _ = governor_tick.tick() => match or_exited(sampler.tick(tracer), &exited)? {
                None => break EndReason::TargetExited,
                Some(Some(end)) => {
                    window_end.as_mut().reset(end);
                    window_open = true;
                }
                Some(None) => {}
            },
            _ = &mut window_end, if window_open => {
                if or_exited(sampler.close_windows(tracer), &exited)?.is_none() {
                    break EndReason::TargetExited;
                }
                window_open = false;
            }
            _ = log_tick.tick() => {
                drain(tracer, &mut aggregator, &mut batch);
                reconciled += reconcile(tracer, &mut aggregator, &mut batch, context);
                if let Some(taken) = take_snapshot(&mut aggregator) {
                    snapshot = Some(taken);
                }
                let counters = tracer.counters()?;
                let lost = lost_events(&counters, &aggregator);
                let counts = Counts::from_counters(&counters, &lost);
                log_counts(&counts, &lost, &last_logged, &aggregator, snapshot.as_ref(), context);
                last_logged = counts;
            }
            _ = signals.interrupt.recv() => match child {
                Some(pid) => { forward(pid, libc::SIGINT); interrupted = true; }
                None => break EndReason::Signal,
            },
            _ = signals.terminate.recv() => match child {
                Some(pid) => { forward(pid, libc::SIGTERM); interrupted = true; }
                None => break EndReason::Signal,
            },
            _ = exited.readable() => break EndReason::TargetExited,
            _ = &mut deadline => break EndReason::Duration,
        }
    };
    // The probes fired synchronously in the target: everything is in the buffer by now.
    drain(tracer, &mut aggregator, &mut batch);
    read_memprofile_rate();
    let mut final_snapshot = false;
    if ended_by != EndReason::TargetExited {
        // Twice: a record is released only when two looks in a row miss it.
        reconciled += reconcile(tracer, &mut aggregator, &mut batch, context);
        tokio::time::sleep(FINAL_RECHECK).await;
        reconciled += reconcile(tracer, &mut aggregator, &mut batch, context);
        if let Some(taken) = take_snapshot(&mut aggregator) {
            snapshot = Some(taken);
            final_snapshot = true;
        }
    }
    // The target exited after the last snapshot: bring it up to the exit with the events.
    if !final_snapshot {
        let grace = LINK_GRACE.as_nanos() as u64;
        snapshot = snapshot.map(|s| aggregator.at_exit(&s, s.started_ns.saturating_sub(grace)));
    }
    let counters = tracer.counters()?;
    let counts = Counts::from_counters(&counters, &lost_events(&counters, &aggregator))
        .reported(&context.plan.families, context.plan.allocations);
    info!(
        ended_by = ?ended_by,
        interrupted,
        deferproc = counts.deferproc,
        mapassign = counts.mapassign,
        lost_events = counts.lost_events,
        pending_heap_defers = snapshot
            .as_ref()
            .map_or(aggregator.pending_heap_defers(), |s| s.pending_records() as u64),
        "tracing stopped"
    );
    Ok(Traced {
        snapshot: snapshot.map(|snapshot| (snapshot, final_snapshot)),
        aggregator,
        counters,
        ended_by,
        duration: started.elapsed(),
        ended_ns: monotonic_ns(),
        attached: tracer.attached(),
        reconciled,
        memprofile_rate,
        governor: {
            sampler.account(tracer)?;
            sampler.report()
        },
    })
}

/// What attaching or detaching probes gave, or None when it failed because the target has
/// exited (its executable is gone from `/proc/PID/exe`): the target's exit, not an error.
/// The exit is waited for a moment, as the executable goes before the process is reported
/// exited.
fn or_exited<T>(result: Result<T>, exited: &AsyncFd<OwnedFd>) -> Result<Option<T>> {
    use std::os::fd::AsRawFd as _;
    match result {
        Ok(value) => Ok(Some(value)),
        Err(err) => {
            let mut poll =
                libc::pollfd { fd: exited.get_ref().as_raw_fd(), events: libc::POLLIN, revents: 0 };
            // SAFETY: poll(2) on one pollfd we own, for at most 100 ms.
            match unsafe { libc::poll(&mut poll, 1, 100) } {
                1.. => Ok(None),
                _ => Err(err),
            }
        }
    }
}

/// Moves every waiting event into the aggregator, in ring-buffer order.
fn drain(tracer: &mut Tracer, aggregator: &mut Aggregator, batch: &mut Vec<Event>) {
    batch.clear();
    tracer.drain(|bytes| match Event::decode(bytes) {
        Ok(event) => batch.push(event),
        Err(err) => {
            warn!(%err, "undecodable event");
            aggregator.record_undecodable();
        }
    });
    // In ring-buffer order: the order the probes reserved their records (see EventHeader).
    for event in batch.iter() {
        aggregator.apply(event);
    }
}

/// With `--counts-only`, does nothing: the target's memory is not read. Otherwise brings the
/// pending state in line with the runtime's `_defer` chains, read from the target's memory: goroutines we track are reconciled ([`Aggregator::reconcile`]), and heap
/// records no registration accounts for (pending before tracing started) are adopted
/// ([`Aggregator::adopt`]). Logs what the runtime corrected.
fn reconcile(
    tracer: &mut Tracer,
    aggregator: &mut Aggregator,
    batch: &mut Vec<Event>,
    context: &TraceContext,
) -> Reconciled {
    drain(tracer, aggregator, batch);
    if context.counts_only {
        return Reconciled::default();
    }
    let tracked = aggregator.goroutines_to_reconcile();
    let gs: Vec<u64> = match context.allgs.and_then(|allgs| read_allgs(&context.memory, allgs)) {
        Some(all) => all,
        None => tracked.iter().map(|(_, g)| *g).collect(),
    };
    // Each chain with when its reading began and ended: a record registered after the start
    // may be missing from it, and any record in it was registered (its probe fired) before the
    // end. An unreadable chain (target gone, chain changing under us) proves nothing.
    let read = |g: u64| {
        let started_ns = monotonic_ns();
        let chain = read_goroutine(&context.memory, &context.layout, g)?;
        Some(ChainRead { started_ns, ended_ns: monotonic_ns(), chain })
    };
    let chains: HashMap<u64, ChainRead> =
        gs.into_iter().filter_map(|g| Some((g, read(g)?))).collect();
    let grace = LINK_GRACE.as_nanos() as u64;
    let mut total = Reconciled::default();
    for (goid, g) in tracked {
        let Some(read) = chains.get(&g).cloned().or_else(|| read(g)) else { continue };
        total += aggregator.reconcile(goid, &read.chain, read.started_ns.saturating_sub(grace));
    }
    for (g, read) in &chains {
        total.adopted += aggregator.adopt(*g, &read.chain, read.ended_ns);
    }
    if total.released + total.moved + total.adopted > 0 {
        info!(
            released = total.released,
            moved = total.moved,
            adopted = total.adopted,
            "reconciled with the runtime's _defer chains"
        );
    }
    total
}

/// One goroutine's `_defer` chain and when it was read.
#[derive(Clone)]
struct ChainRead {
    started_ns: u64,
    ended_ns: u64,
    chain: RuntimeGoroutine,
}

/// Losses so far, by cause.
fn lost_events(counters: &Counters, aggregator: &Aggregator) -> LostEvents {
    let events = aggregator.events();
    LostEvents::new(counters, events.undecodable, events.without_goid)
}

fn log_counts(
    now: &Counts,
    lost: &LostEvents,
    last: &Counts,
    aggregator: &Aggregator,
    snapshot: Option<&Snapshot>,
    context: &TraceContext<'_>,
) {
    // From the runtime's state when it can be read, else from the events.
    let (pending, maps) = match snapshot {
        Some(snapshot) => (snapshot.pending_records() as u64, Some(snapshot.captured_maps())),
        // The events alone don't say what closures capture.
        None => (aggregator.pending_heap_defers(), None),
    };
    // Families not probed have no count (the fields are left out), not zero.
    let delta = now.since(last).reported(&context.plan.families, context.plan.allocations);
    let total = now.reported(&context.plan.families, context.plan.allocations);
    info!(
        mapassign = delta.mapassign,
        deferproc = delta.deferproc,
        deferproc_stack = delta.deferproc_stack,
        deferreturn = delta.deferreturn,
        mallocgc = delta.mallocgc,
        alloc_bytes = delta.alloc_bytes,
        goroutine_exits = delta.goroutine_exits,
        lost_events = delta.lost_events,
        total_mapassign = total.mapassign,
        total_deferproc = total.deferproc,
        total_deferproc_stack = total.deferproc_stack,
        total_deferreturn = total.deferreturn,
        total_mallocgc = total.mallocgc,
        total_alloc_bytes = total.alloc_bytes,
        total_goroutine_exits = total.goroutine_exits,
        total_lost_events = total.lost_events,
        total_lost_ring_buffer_full = lost.ring_buffer_full,
        total_lost_undecodable = lost.undecodable,
        total_lost_without_goroutine_id = lost.without_goroutine_id,
        total_lost_user_read_failed = lost.user_read_failed,
        pending_heap_defers = pending,
        captured_maps = maps,
        "counts"
    );
}

fn forward(pid: u32, signal: i32) {
    // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(pid as i32, signal) };
}

/// `exit_code` is the command's, when deferprobe started the target.
fn notes(
    lost: &LostEvents,
    ended_by: EndReason,
    exit_code: Option<i32>,
    ring_kib: u32,
) -> Vec<String> {
    let mut notes = Vec::new();
    if exit_code.is_none() {
        notes.push(
            "counts cover only what the target did while the probes were attached".to_owned(),
        );
    }
    if ended_by == EndReason::TargetExited {
        notes.push(match exit_code {
            Some(code) => format!("the target exited while being traced (exit code {code})"),
            None => "the target exited while being traced".to_owned(),
        });
    }
    if lost.total() > 0 {
        notes.push(format!(
            "{} events were lost or incomplete ({}): counts are exact, pending defers, sites and \
             captures may be incomplete",
            lost.total(),
            lost.causes().join(", ")
        ));
    }
    if lost.ring_buffer_full > 0 {
        notes.push(format!(
            "the {} KiB ring buffer overflowed: a larger --ring-buffer-kib keeps more events",
            ring_kib
        ));
    }
    notes
}

/// Loading tracing programs and attaching uprobes needs CAP_SYS_ADMIN, or CAP_BPF and
/// CAP_PERFMON, in the effective set: root normally has them, but a root whose capabilities
/// were dropped does not, and an unprivileged user may have been granted them.
fn check_privileges() -> Result<()> {
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_PERFMON: u32 = 38;
    const CAP_BPF: u32 = 39;
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let effective = status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or(0);
    let has = |cap: u32| effective & (1 << cap) != 0;
    if has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON)) {
        return Ok(());
    }
    let missing: Vec<&str> = [(CAP_BPF, "CAP_BPF"), (CAP_PERFMON, "CAP_PERFMON")]
        .into_iter()
        .filter(|(cap, _)| !has(*cap))
        .map(|(_, name)| name)
        .collect();
    Err(Error::permission(format!(
        "deferprobe needs root, or the capabilities CAP_BPF and CAP_PERFMON (missing: {})",
        missing.join(", ")
    )))
}
