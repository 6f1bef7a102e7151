//! `deferprobe run`: the thin runtime shell around the pure parts. It finds or starts the
//! target, attaches the probe plan, then runs one tokio loop that drains the ring buffer on a
//! short timer into the [`Aggregator`], logs counts every `--interval`, and stops on the
//! duration, SIGINT/SIGTERM or the target's exit. Then it writes the report.

use std::{
    os::fd::OwnedFd,
    time::{Duration, Instant},
};

use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::{Signal, SignalKind, signal},
    time::{MissedTickBehavior, interval, interval_at, sleep},
};
use tracing::{info, warn};

use crate::{
    aggregator::{Aggregator, Event},
    binary::GoBinary,
    cli::RunArgs,
    error::{Error, Result},
    plan::ProbePlan,
    report::{self, Counts, EndReason, LostEvents, ProbesReport, Report, TargetReport},
    target::{self, GatedChild, Target},
    tracer::Tracer,
};

/// How often the ring buffer is drained (probes submit without waking us).
const DRAIN_EVERY: Duration = Duration::from_millis(50);

/// Runs `deferprobe run`; returns the process exit code.
pub fn run(args: &RunArgs) -> Result<i32> {
    check_privileges()?;
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
    let binary = GoBinary::open(&exe).map_err(|err| match &running {
        // Name the process and its executable, not /proc/PID/exe.
        Some(target) => Error::target(err.to_string().replacen(
            &target.exe.display().to_string(),
            &format!("pid {} ({})", target.pid, target.exe_name),
            1,
        )),
        None => Error::from(err),
    })?;
    let plan = ProbePlan::build(&binary)?;
    let (target, gated) = match running {
        Some(target) => (target, None),
        None => {
            let child = GatedChild::spawn(&exe, &args.command)?;
            (child.target.clone(), Some(child))
        }
    };
    let mut tracer = match Tracer::attach(&plan, &target.exe, target.pid) {
        Ok(tracer) => tracer,
        Err(err) => {
            gated.map(GatedChild::abort);
            return Err(err);
        }
    };
    if let Some(child) = gated {
        child.release()?;
    }
    info!(
        probes = tracer.attached(),
        go_version = %plan.go_version,
        pid = target.pid,
        layout = ?plan.layout_source,
        "probes attached"
    );
    let bias = if plan.pie { target::pie_load_bias(target.pid).unwrap_or(0) } else { 0 };
    let exit_watch = target::pidfd(target.pid)?;

    let child = started_command.then_some(target.pid);
    let traced = runtime.block_on(trace(&mut tracer, exit_watch, signals, args, child))?;
    drop(tracer); // detach before anything else

    let exit_code = match started_command {
        true => Some(target::wait_child(target.pid)?.shell_code()),
        false => None,
    };
    let (pending, sites) = report::pending_and_sites(&traced.aggregator, bias, |pc| {
        binary.function_at(pc).map(|f| format!("{}+{:#x}", f.name, pc - f.address))
    });
    let events = traced.aggregator.events();
    let counts = Counts::from_counters(&traced.counters, events.undecodable);
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
        counts,
        lost: LostEvents {
            ring_buffer_full: traced.counters.get(deferprobe_common::Counter::LostRingFull),
            undecodable: events.undecodable,
            without_goroutine_id: events.without_goid,
        },
        probes: ProbesReport { attached: traced.attached, layout_source: plan.layout_source },
        pending,
        sites,
        notes: notes(&counts, traced.ended_by, started_command, events.without_goid),
    };
    print!("{}", report.to_text());
    if let Some(path) = &args.report {
        std::fs::write(path, report.to_json() + "\n")
            .map_err(|err| Error::usage(format!("writing the report to {}: {err}", path.display())))?;
    }
    Ok(exit_code.unwrap_or(0))
}

/// What the trace loop produced.
struct Traced {
    aggregator: Aggregator,
    counters: deferprobe_common::Counters,
    ended_by: EndReason,
    duration: Duration,
    attached: usize,
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

/// The loop. `child` is set when deferprobe started the target: signals are then forwarded to
/// it and tracing lasts until it exits.
async fn trace(
    tracer: &mut Tracer,
    exit_watch: OwnedFd,
    mut signals: Signals,
    args: &RunArgs,
    child: Option<u32>,
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

    let mut aggregator = Aggregator::new();
    let mut last_logged = Counts::default();
    let mut batch = Vec::new();
    let mut interrupted = false;
    let ended_by = loop {
        tokio::select! {
            _ = drain_tick.tick() => drain(tracer, &mut aggregator, &mut batch),
            _ = log_tick.tick() => {
                drain(tracer, &mut aggregator, &mut batch);
                let counts = Counts::from_counters(&tracer.counters()?, aggregator.events().undecodable);
                log_counts(&counts, &last_logged, &aggregator);
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
    let counters = tracer.counters()?;
    let counts = Counts::from_counters(&counters, aggregator.events().undecodable);
    info!(
        ended_by = ?ended_by,
        interrupted,
        deferproc = counts.deferproc,
        mapassign = counts.mapassign,
        lost_events = counts.lost_events,
        "tracing stopped"
    );
    Ok(Traced { aggregator, counters, ended_by, duration: started.elapsed(), attached: tracer.attached() })
}

/// Moves every waiting event into the aggregator, in probe-time order (records from different
/// CPUs can reach the ring buffer slightly out of order).
fn drain(tracer: &mut Tracer, aggregator: &mut Aggregator, batch: &mut Vec<Event>) {
    batch.clear();
    tracer.drain(|bytes| match Event::decode(bytes) {
        Ok(event) => batch.push(event),
        Err(err) => {
            warn!(%err, "undecodable event");
            aggregator.record_undecodable();
        }
    });
    batch.sort_by_key(|event| event.header().ktime_ns);
    for event in batch.iter() {
        aggregator.apply(event);
    }
}

fn log_counts(now: &Counts, last: &Counts, aggregator: &Aggregator) {
    let delta = now.since(last);
    info!(
        mapassign = delta.mapassign,
        deferproc = delta.deferproc,
        deferproc_stack = delta.deferproc_stack,
        deferreturn = delta.deferreturn,
        mallocgc = delta.mallocgc,
        alloc_bytes = delta.alloc_bytes,
        goroutine_exits = delta.goroutine_exits,
        lost_events = delta.lost_events,
        total_mapassign = now.mapassign,
        total_deferproc = now.deferproc,
        total_deferproc_stack = now.deferproc_stack,
        total_deferreturn = now.deferreturn,
        total_mallocgc = now.mallocgc,
        total_alloc_bytes = now.alloc_bytes,
        total_goroutine_exits = now.goroutine_exits,
        total_lost_events = now.lost_events,
        pending_heap_defers = aggregator.pending_heap_defers(),
        "counts"
    );
}

fn forward(pid: u32, signal: i32) {
    // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(pid as i32, signal) };
}

fn notes(counts: &Counts, ended_by: EndReason, started_command: bool, without_goid: u64) -> Vec<String> {
    let mut notes = Vec::new();
    if !started_command {
        notes.push(
            "counts cover only what the target did while the probes were attached".to_owned(),
        );
    }
    if ended_by == EndReason::TargetExited && !started_command {
        notes.push("the target exited while being traced".to_owned());
    }
    if counts.lost_events > 0 {
        notes.push(format!(
            "{} events were lost: counts are exact, pending defers and sites are incomplete",
            counts.lost_events
        ));
    }
    if without_goid > 0 {
        notes.push(format!(
            "{without_goid} events had no readable goroutine id and are not in the pending totals"
        ));
    }
    notes
}

/// Root, or CAP_BPF + CAP_PERFMON (loading programs, attaching uprobes, reading the target's
/// executable).
fn check_privileges() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return Ok(());
    }
    const CAP_PERFMON: u32 = 38;
    const CAP_BPF: u32 = 39;
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let effective = status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or(0);
    let missing: Vec<&str> = [(CAP_BPF, "CAP_BPF"), (CAP_PERFMON, "CAP_PERFMON")]
        .into_iter()
        .filter(|(bit, _)| effective & (1 << bit) == 0)
        .map(|(_, name)| name)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(Error::permission(format!(
        "deferprobe needs root or CAP_BPF and CAP_PERFMON (missing: {})",
        missing.join(", ")
    )))
}
