//! `deferprobe run`: the thin runtime shell around the pure parts. It finds or starts the
//! target, attaches the probe plan, runs the trace loop ([`trace_loop`]: ring buffer, snapshots,
//! governor ticks through [`sampler`], signals, the target's exit, reports [`on_demand`]), then
//! has the report [`assemble`]d and writes it. `run --follow` does that for each program of a
//! command's process tree ([`follow`]).

use std::collections::BTreeMap;

use tracing::{info, warn};

use crate::{
    binary::MemoryProfiling,
    cli::RunArgs,
    error::{Error, ErrorKind, Result},
    metrics::{TraceMetrics, server::MetricsListener},
    output::{self, OutputFile},
    plan::{AllocationMode, PlanOptions, ProbeFamily, ProbePlan},
    process_tree::{ProcessTree, TaskOffsets},
    report::{EndReason, Location, Report},
    snapshot::{RuntimeModel, RuntimeReader},
    state::memory::{Memory as _, ProcessMemory},
    target::{self, GatedChild, Target},
    tracer::Tracer,
};

mod assemble;
mod follow;
mod frames;
mod on_demand;
mod sampler;
mod signals;
mod trace_loop;

use assemble::{Children, Live, Reporter};
use on_demand::OnDemand;
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
    // So does an address the metrics can't be served at.
    let metrics = args.metrics_addr.map(MetricsListener::bind).transpose()?;
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
    let launch =
        Launch::Own { signals: &signals, task_offsets, report_file: report_file.as_ref(), metrics };
    let outcome = trace_process(args, launch, &runtime)?;
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
    /// `--pid` target, and is forwarded to a command; SIGUSR1 asks for an interim report
    /// (JSON next to `report_file`, if any). The process-tree programs (loaded with
    /// `task_offsets` once the target is found) count the processes it starts, which are not
    /// traced. `metrics` (`--metrics-addr`) serves the metrics once the probes are attached.
    Own {
        signals: &'a Signals,
        task_offsets: TaskOffsets,
        report_file: Option<&'a OutputFile>,
        metrics: Option<MetricsListener>,
    },
    /// A process of a `--follow`ed tree that exec'd a program, `stopped` at its exec (before
    /// its first instruction) unless the stop failed: released (SIGCONT) once its probes are
    /// attached, traced until it exits or `stop` is requested. No interim reports, no metrics.
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
    let (signals, task_offsets, report_file, metrics_listener, followed) = match launch {
        Launch::Own { signals, task_offsets, report_file, metrics } => {
            (Some(signals), Some(task_offsets), report_file, metrics, None)
        }
        Launch::Followed { pid, stopped, stop, release } => {
            (None, None, None, None, Some((pid, stopped, stop, release)))
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
    let reporter = Reporter {
        binary: &binary,
        plan: &plan,
        target: &target,
        args,
        reader: reader.as_ref(),
        state_error,
        bias,
        from_first_instruction,
        children: match followed {
            Some((_, stopped, ..)) => Children::Followed { stopped },
            None => Children::Counted(tree.as_ref()),
        },
        memory_profiling,
        profiled,
    };
    let metrics = metrics_listener.map(|listener| {
        let metrics = TraceMetrics::new(args.metrics_sites as usize);
        listener.serve(metrics.registry()).map(|()| metrics)
    });
    let on_demand = OnDemand { report_file, metrics: metrics.transpose()? };
    let context = TraceContext {
        pid: target.pid,
        bias,
        reader: reader.as_ref(),
        counts_only: args.counts_only,
        memory,
        layout: plan.layout,
        plan: &plan,
        memprofile_rate,
        modules: crate::modules::Modules::new(
            target.pid,
            &target.exe,
            PlanOptions { families: plan.families.clone(), allocations: plan.allocations },
            from_first_instruction,
        )
        .into(),
        reporter: &reporter,
        on_demand: &on_demand,
        from_first_instruction,
    };
    let mut stop = CommandStop::new(args.kill_after);
    let control = TraceControl { signals, child, stop: followed.map(|(_, _, stop, _)| stop) };
    let traced =
        runtime.block_on(trace(&mut tracer, &exit_watch, &mut stop, args, &control, &context))?;
    let exited_during_attach = tracer.exited_during_attach();
    // How often each captured map was written while traced, from the kernel's known-maps set:
    // read before the tracer detaches.
    let map_writes = assemble::snapshot_map_writes(
        &tracer,
        traced.snapshot.as_ref().map(|(snapshot, _)| snapshot),
        reader.as_ref(),
    );
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
    let modules = context.modules.borrow();
    let report = reporter.report(&Live {
        aggregator: &traced.aggregator,
        counters: &traced.counters,
        snapshot: traced.snapshot.as_ref().map(|(snapshot, current)| (snapshot, *current)),
        governor: traced.governor.clone(),
        ended_by: Some(traced.ended_by),
        interim: None,
        duration: traced.duration,
        now_ns: traced.ended_ns,
        attached: traced.attached,
        reconciled: traced.reconciled,
        memprofile_rate: traced.memprofile_rate,
        frames_idled: traced.frames_idled,
        frames_rearmed: traced.frames_rearmed,
        map_writes: &map_writes,
        modules: &modules,
        exit_code,
        stop_note: exit_code.and_then(|code| stop.note(&format_args!("exit code {code}"))),
        exited_during_attach,
    });
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

/// The `--pprof` profile's first comment when the runtime's state could not be read.
const PPROF_WITHOUT_STATE: &str = "the runtime's state was not read (see the notes): pending \
     defers are unknown, not zero, and this profile has only the registrations seen per site";

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
