//! `deferprobe run`: the thin runtime shell around the pure parts. It finds or starts the
//! target, attaches the probe plan, runs the trace loop ([`trace_loop`]: ring buffer, snapshots,
//! governor ticks through [`sampler`], signals, the target's exit), then assembles and writes
//! the report.

use std::collections::{BTreeMap, HashMap, HashSet};

use tracing::{info, warn};

use crate::{
    binary::MemoryProfiling,
    cli::RunArgs,
    error::{Error, ErrorKind, Result},
    findings,
    governor::SampledFamily,
    output::{self, OutputFile},
    plan::{AllocationMode, PlanOptions, ProbeFamily, ProbePlan},
    process_tree::{ProcessTree, TaskOffsets},
    report::{
        self, AllocationsReport, ChildrenReport, Counts, EndReason, Location, Lookups, LostEvents,
        ProbesReport, ProfiledAllocations, RateSource, Report, SnapshotStats, TargetReport,
    },
    snapshot::{RuntimeModel, RuntimeReader},
    state::memory::{Memory as _, ProcessMemory},
    target::{self, GatedChild, Target},
    tracer::Tracer,
};

mod follow;
mod frames;
mod sampler;
mod signals;
mod trace_loop;

use signals::{CommandStop, Signals};
use trace_loop::{ExitWatch, StopRequest, TraceContext, TraceControl, stop_command, trace};

/// Runs `deferprobe run`; returns the process exit code.
pub fn run(args: &RunArgs) -> Result<i32> {
    check_privileges()?;
    // An unwritable --report fails now, not after the whole trace.
    let report_file =
        args.report.as_deref().map(|path| OutputFile::check("--report", path)).transpose()?;
    let pprof_file =
        args.pprof.as_deref().map(|path| OutputFile::check("--pprof", path)).transpose()?;
    let runtime = new_runtime()?;
    // Catch SIGINT / SIGTERM from now on: one arriving while probes are being attached still
    // ends tracing cleanly, with a report.
    let _runtime_context = runtime.enter();
    let signals = Signals::install()?;
    // After the signals are blocked: a thread started before would get them.
    let task_offsets = TaskOffsets::read();
    if args.follow {
        return follow::run(args, &runtime, &signals, task_offsets, report_file.as_ref());
    }
    let outcome = trace_process(args, Launch::Own { signals: &signals, task_offsets }, &runtime)?;
    // The profile first: a failing stdout never costs it.
    let profile = match (&pprof_file, &outcome.profile) {
        (Some(file), Some(profile)) => file.write(profile),
        _ => Ok(()),
    };
    let json = outcome.report.to_json() + "\n";
    let delivered = output::deliver(
        &outcome.report.to_text(),
        report_file.as_ref().map(|file| (file, json.as_str())),
    );
    profile.and(delivered)?;
    Ok(outcome.code)
}

fn new_runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|err| Error::internal(format!("starting the tokio runtime: {err}")))
}

/// How the process [`trace_process`] traces is started, and what ends its trace.
enum Launch<'a> {
    /// `--pid` or `-- CMD`: the target deferprobe was given. A signal ends the trace of a
    /// `--pid` target, and is forwarded to a command. The process-tree programs (loaded with
    /// `task_offsets` once the target is found) count the processes it starts, which are not
    /// traced.
    Own { signals: &'a Signals, task_offsets: TaskOffsets },
    /// A process of a `--follow`ed tree that exec'd a program, `stopped` at its exec (before
    /// its first instruction) unless the stop failed: released (SIGCONT) once its probes are
    /// attached, traced until it exits or `stop` is requested.
    Followed { pid: u32, stopped: bool, stop: &'a StopRequest, release: &'a dyn Fn() },
}

/// A traced process's report (and `--pprof` profile), and the code `run` exits with for it.
struct Outcome {
    report: Report,
    profile: Option<Vec<u8>>,
    code: i32,
}

/// Finds or starts the process `launch` says, attaches the probe plan, traces it and builds
/// its report.
fn trace_process(
    args: &RunArgs,
    launch: Launch<'_>,
    runtime: &tokio::runtime::Runtime,
) -> Result<Outcome> {
    let (signals, task_offsets, followed) = match launch {
        Launch::Own { signals, task_offsets } => (Some(signals), Some(task_offsets), None),
        Launch::Followed { pid, stopped, stop, release } => {
            (None, None, Some((pid, stopped, stop, release)))
        }
    };
    // Whether deferprobe started the target (and waits for it, forwards signals to it).
    let started_command = followed.is_none() && !args.command.is_empty();
    // Whether the probes were attached before the target's first instruction.
    let from_first_instruction =
        started_command || followed.is_some_and(|(_, stopped, ..)| stopped);
    let mut running = match followed {
        Some((pid, ..)) => Some(Target::running(pid)?),
        None => args.pid.map(Target::running).transpose()?,
    };
    if let Some(Target { pid, thread: Some(thread), .. }) = &running {
        info!(thread, pid, "--pid {thread} is a thread of process {pid}: tracing the process");
    }
    let exe = match &running {
        Some(target) => target.exe.clone(),
        None => target::resolve_program(&args.command[0])?,
    };
    // Analyse and plan before anything is started: a bad binary fails before it runs.
    let binary = match &mut running {
        Some(target) => target.open_binary()?,
        None => target::open_command(&exe)?,
    };
    let plan = ProbePlan::build(
        &binary,
        &PlanOptions { families: args.probes.clone(), allocations: args.alloc_mode },
    )?;
    if let Some(note) = &plan.layout_note {
        warn!(%note, "the binary's DWARF is unusable: using the release table");
    }
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
            return Err(match started_command {
                false if err.kind != ErrorKind::Kernel => target.exited_or(err),
                _ => err,
            });
        }
    };
    // The processes the target starts are counted (and not traced: that is --follow's job).
    let tree = task_offsets.map(|offsets| {
        let mut tree = ProcessTree::load(false, offsets)?;
        match &gated {
            Some(child) => tree.add_command(child.target.pid, true),
            None => tree.add_process(target.pid),
        }
        .map(|()| tree)
    });
    let tree = match tree {
        Some(Err(err)) => {
            warn!(%err, "the processes the target starts can't be counted");
            None
        }
        Some(Ok(tree)) => Some(tree),
        None => None,
    };
    if let Some(child) = gated {
        child.release()?;
    }
    if let Some((.., release)) = followed {
        release();
    }
    // Runtime address − ELF virtual address, for naming the PCs the probes report.
    let bias = target::load_bias(&binary, target.pid);
    let exit_watch = ExitWatch::new(target.pid)?;
    let memory = ProcessMemory::new(target.pid);
    // The runtime's own state: snapshots at attach, every --interval and before the report.
    // A target whose memory can't be read is refused (naming the capability).
    let reader = match &model {
        Some(model) => match RuntimeReader::new(model, target.pid, bias) {
            Ok(reader) => Some(reader.with_stacks(args.pprof.is_some())),
            Err(err) if err.kind == ErrorKind::Permission && !target::has_exited(target.pid) => {
                return Err(err);
            }
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
    if let (Some(at), Some(pid), None) = (memprofile_rate, args.pid, followed)
        && memory.read_u64(at) == Some(0)
    {
        return Err(Error::unsupported(format!(
            "pid {pid} has set runtime.MemProfileRate to 0 (memory profiling off), so \
             --alloc-mode profiled would see no allocation; use --alloc-mode all"
        )));
    }
    let context = TraceContext {
        pid: target.pid,
        bias,
        reader: reader.as_ref(),
        counts_only: args.counts_only,
        memory,
        layout: plan.layout,
        plan: &plan,
        memprofile_rate,
        allgs,
        modules: crate::modules::Modules::new(
            target.pid,
            &target.exe,
            PlanOptions { families: plan.families.clone(), allocations: plan.allocations },
            from_first_instruction,
        )
        .into(),
        from_first_instruction,
    };
    let mut stop = CommandStop::new(args.kill_after);
    let control = TraceControl { signals, child, stop: followed.map(|(_, _, stop, _)| stop) };
    let traced =
        runtime.block_on(trace(&mut tracer, &exit_watch, &mut stop, args, &control, &context))?;
    let exited_during_attach = tracer.exited_during_attach();
    let modules = context.modules.into_inner();
    let module_pc = |pc: u64| modules.module_pc(pc);
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

    // --duration ended the trace of a command: it is stopped (it must not outlive deferprobe
    // untraced), and its end is reported.
    if let (Some(pid), EndReason::Duration, Some(signals)) = (child, traced.ended_by, signals) {
        runtime.block_on(stop_command(pid, &exit_watch, signals, &mut stop));
    }
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
        module_pc: &module_pc,
    };
    // The runtime's own state wins: pending records, what their closures hold, and sites. The
    // events alone (`correlate`) only when it could not be read.
    let mut snapshot_notes = Vec::new();
    let mut correlation =
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
                module_pc: &module_pc,
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
    // Probes were attached before the program's first instruction: what no registration seen
    // accounts for is a lost event, never "pending before trace".
    if from_first_instruction {
        findings::unseen_registrations_were_lost(&mut correlation);
    }
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
    let mut notes =
        notes(&lost, traced.ended_by, exit_code, from_first_instruction, args.ring_buffer_kib);
    notes.extend(target.notes.iter().cloned());
    let (children, children_note) = match followed {
        Some((_, stopped, ..)) => {
            if !stopped {
                notes.push(
                    "the process could not be stopped at its exec (pid 1 of a pid namespace \
                     can't be signalled so): it was traced from when its probes were attached"
                        .into(),
                );
            }
            (None, None)
        }
        None => untraced_children(tree.as_ref()),
    };
    notes.extend(children_note);
    notes.extend(plan.layout_note.clone());
    if let Some(thread) = target.thread {
        notes.push(format!(
            "--pid {thread} is a thread of process {}: the process was traced",
            target.pid
        ));
    }
    if exited_during_attach {
        notes.push(
            "the target exited while deferprobe was attaching its probes: counts cover the \
             moment some of them were attached, and the runtime's state was not read"
                .into(),
        );
    }
    if let Some(code) = exit_code
        && let Some(note) = stop.note(&format_args!("exit code {code}"))
    {
        notes.push(note);
    }
    notes.extend(snapshot_notes);
    if let Some(err) = &state_error {
        notes.push(format!(
            "the runtime's state was not read ({err}): pending defers, findings and sites come \
             from the events alone, so records pending before tracing started are not counted \
             and what closures capture is unknown"
        ));
    }
    let pending_before_trace = correlation.pending.before_trace;
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
    notes.extend(modules.notes());
    if correlation.pending.unprobed > 0 {
        notes.push(format!(
            "{} pending heap defer records at sites in Go plugins were registered while the \
             plugin's code was not probed (pending_unprobed): they are not in counts.deferproc \
             nor in their sites' registered, and are neither pending before tracing started \
             nor lost events",
            correlation.pending.unprobed
        ));
    }
    if correlation.pending.registration_lost > 0 {
        notes.push(findings::registration_lost_note(
            correlation.pending.registration_lost,
            &lost,
            args.ring_buffer_kib,
        ));
    }
    notes.extend(findings::panic_notes(traced.aggregator.panicked()));
    if traced.frames_idled > 0 {
        notes.push(format!(
            "deferreturn probes went off after {}s in {} that had no heap defer pending (each \
             return of such a function calls runtime.deferreturn, which releases nothing); {} \
             got them back at a heap defer, within about 50 ms: returns in between are not in \
             counts.deferreturn, and their records were released at the next snapshot",
            frames::IDLE_AFTER.as_secs(),
            match traced.frames_idled {
                1 => "1 function".to_owned(),
                n => format!("{n} functions"),
            },
            traced.frames_rearmed
        ));
    }
    if traced.reconciled.released + traced.reconciled.moved > 0 {
        notes.push(format!(
            "the runtime's _defer chains corrected the event-based state: {} records run without \
             a deferreturn seen (panic, recover, Goexit, or while their function's deferreturn \
             probes were off), {} frames moved by stack growth",
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
             average): their counts cover only the sampled windows; estimate {} ± {} calls \
             (1σ){}{}",
            sampled.family.name(),
            traced.governor.max_overhead_percent,
            sampled.mean_duty_cycle * 100.0,
            sampled.estimated_calls,
            sampled.estimated_calls_error,
            match sampled.estimate_weak {
                true => {
                    ", a weak one: it holds the last rate measured over a long span no later \
                     window measured"
                }
                false => "",
            },
            match sampled.family {
                SampledFamily::MapWrites => {
                    ", and maps written outside the windows can't be recognised as captures"
                }
                SampledFamily::GoroutineExits => {
                    " (while no heap defer was pending, when there was no record for them to release)"
                }
                SampledFamily::StackDefers | SampledFamily::Allocations => "",
            }
        ));
    }
    // Under half a second over budget is a rounding of one check, not a finding.
    if traced.governor.defers_over_budget_secs >= 0.5 {
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
            go_module: target.go_module.clone(),
            go_version: plan.go_version.clone(),
            exit_code,
            namespace: target.namespace.clone(),
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
        children,
        notes,
    };
    // `--pprof`: the profile, written by `run` before the report.
    let profile = args.pprof.is_some().then(|| {
        let no_snapshot = crate::state::Snapshot::default();
        let (snapshot, mut notes) = match (&traced.snapshot, &reader) {
            (Some((snapshot, _)), Some(_)) => (snapshot, Vec::new()),
            _ => (&no_snapshot, vec![PPROF_WITHOUT_STATE.to_owned()]),
        };
        notes.extend(report.notes.iter().cloned());
        let registered: BTreeMap<u64, u64> =
            traced.aggregator.sites().map(|(pc, totals)| (pc, totals.registered)).collect();
        let locate = |pc: u64| match modules.module_pc(pc) {
            Some(module) => module.location,
            None => Location::of_return_address(&binary, pc.wrapping_sub(bias)),
        };
        crate::pprof::encode(&crate::pprof::ProfileSource {
            snapshot,
            defer_record_bytes: plan.layout.defer_size,
            locate: &locate,
            module: target.go_module.as_deref().unwrap_or(&target.exe_name),
            module_range: crate::pprof::module_range(&binary, bias),
            registered: Some(&registered),
            time_nanos: crate::pprof::now_nanos(),
            duration_nanos: traced.duration.as_nanos() as i64,
            notes: &notes,
        })
    });
    // A command deferprobe stopped at --duration: tracing did what was asked (the command's
    // code is in the report). Otherwise the command's own code, as if it ran alone.
    let code = match stop.stopped_at_duration() {
        true => 0,
        false => exit_code.unwrap_or(0),
    };
    Ok(Outcome { report, profile, code })
}

/// What the report says of the processes an untraced tree started (`children`), and its note.
fn untraced_children(tree: Option<&ProcessTree>) -> (Option<ChildrenReport>, Option<String>) {
    let Some(tree) = tree else {
        let note = "the processes the target started were not counted (the process-tree \
                    programs could not be loaded): any it started were not traced";
        return (None, Some(note.to_owned()));
    };
    let counts = tree.counts();
    let children = ChildrenReport {
        processes_started: counts.processes_started,
        programs_executed: counts.programs_executed,
        traced: false,
    };
    let note = (counts.processes_started + counts.programs_executed > 0).then(|| {
        format!(
            "the target started {} processes ({} programs executed) that were not traced: \
             run --follow -- CMD traces the Go programs among them",
            counts.processes_started, counts.programs_executed
        )
    });
    (Some(children), note)
}

/// The `--pprof` profile's first comment when the runtime's state could not be read.
const PPROF_WITHOUT_STATE: &str = "the runtime's state was not read (see the notes): pending \
     defers are unknown, not zero, and this profile has only the registrations seen per site";

/// Write counts of `maps` (runtime addresses), from the kernel's known-maps set.
fn captured_map_writes(tracer: &Tracer, maps: HashSet<u64>) -> HashMap<u64, u64> {
    maps.into_iter().filter_map(|map| Some((map, tracer.map_writes(map)?))).collect()
}

/// `exit_code` is the command's, when deferprobe started the target.
fn notes(
    lost: &LostEvents,
    ended_by: EndReason,
    exit_code: Option<i32>,
    from_first_instruction: bool,
    ring_kib: u32,
) -> Vec<String> {
    let mut notes = Vec::new();
    if !from_first_instruction {
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
