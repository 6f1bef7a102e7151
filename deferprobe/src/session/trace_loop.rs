//! The tokio loop of `run`: drains the ring buffer on a short timer into the [`Aggregator`],
//! reconciles it with the runtime's `_defer` chains, takes snapshots of the runtime's state and
//! logs counts (and refreshes the metrics) every `--interval`, runs the governor's ticks,
//! writes interim reports (SIGUSR1, `--report-every`), and stops on the duration, a signal, the
//! target's exit or (a `--follow`ed process) a [`StopRequest`].

use std::{
    borrow::Cow,
    collections::HashMap,
    os::fd::{AsRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

use deferprobe_common::Counters;
use tokio::{
    io::{Interest, unix::AsyncFd},
    time::{MissedTickBehavior, interval, interval_at, sleep},
};
use tracing::{debug, info, warn};

use super::assemble::{self, Live, Reporter};
use super::frames::{FrameArming, IDLE_AFTER};
use super::on_demand::{self, OnDemand};
use super::sampler::{BUDGET_CHECK_EVERY, FIRST_GOVERNOR_TICK, GOVERNOR_TICK, Sampler};
use super::signals::{CommandStop, Signals};
use crate::{
    aggregator::{Aggregator, Event, Reconciled},
    cli::RunArgs,
    error::{Error, ErrorKind, Result},
    layout::RuntimeLayout,
    plan::ProbePlan,
    report::{Counts, EndReason, GovernorReport, InterimCause, InterimReport, LostEvents, Report},
    snapshot::RuntimeReader,
    state::{
        GoroutineDefers, goroutines,
        memory::{Memory as _, ProcessMemory},
    },
    state::{Snapshot, monotonic_ns},
    target,
    tracer::Tracer,
};

/// How often the ring buffer is drained (probes submit without waking us).
pub(super) const DRAIN_EVERY: Duration = Duration::from_millis(50);

/// Pause between the two final looks at the runtime's chains.
pub(super) const FINAL_RECHECK: Duration = Duration::from_millis(50);

/// Records registered this recently may not be linked into `g._defer` yet when the chain is
/// read (the probe fires at deferproc's entry): reconciliation leaves them alone.
pub(super) const LINK_GRACE: Duration = Duration::from_millis(20);

/// The target's exit: a pidfd, readable once it has exited. Empty when the process was gone
/// before tracing began (it exited during attach).
pub(super) struct ExitWatch(Option<AsyncFd<OwnedFd>>);

impl ExitWatch {
    /// Needs a tokio runtime context.
    pub(super) fn new(pid: u32) -> Result<ExitWatch> {
        let fd = match target::pidfd(pid) {
            Ok(fd) => fd,
            Err(err) if err.kind == ErrorKind::NoTarget => return Ok(ExitWatch(None)),
            Err(err) => return Err(err),
        };
        let fd = // SAFETY: the fd stays open (owned by the AsyncFd) for as long as it is registered.
        unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }
            .map_err(|err| Error::internal(format!("watching the target: {err}")))?;
        Ok(ExitWatch(Some(fd)))
    }

    /// Returns once the target has exited.
    pub(super) async fn exited(&self) {
        if let Some(fd) = &self.0 {
            let _ = fd.readable().await;
        }
    }

    /// Whether the target exits within `timeout`, waiting for it (blocking).
    fn exits_within(&self, timeout: Duration) -> bool {
        let Some(fd) = &self.0 else { return true };
        let mut poll =
            libc::pollfd { fd: fd.get_ref().as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: poll(2) on one pollfd we own.
        unsafe { libc::poll(&mut poll, 1, timeout.as_millis() as libc::c_int) > 0 }
    }
}

/// What the loop reads besides the tracer.
pub(super) struct TraceContext<'a> {
    pub(super) pid: u32,
    /// Runtime address − ELF virtual address of the executable.
    pub(super) bias: u64,
    /// Snapshots of the runtime's state (None if its goroutine list can't be found).
    pub(super) reader: Option<&'a RuntimeReader<'a, 'a>>,
    /// `--counts-only`: the target's memory is never read.
    pub(super) counts_only: bool,
    pub(super) memory: ProcessMemory,
    pub(super) layout: RuntimeLayout,
    pub(super) plan: &'a ProbePlan,
    /// Runtime address of `runtime.MemProfileRate` with `--alloc-mode profiled`, when the
    /// binary has symbols: read while tracing, to unsample with the rate in force.
    pub(super) memprofile_rate: Option<u64>,
    /// Go plugins found in the target: looked for before the loop and every `--interval`,
    /// each probed when found.
    pub(super) modules: std::cell::RefCell<crate::modules::Modules>,
    /// Makes the reports, interim and final.
    pub(super) reporter: &'a Reporter<'a>,
    /// Where interim reports and the metrics go.
    pub(super) on_demand: &'a OnDemand<'a>,
    /// The probes were attached before the target's first instruction: nothing was pending
    /// before, and the first snapshot comes at the first interval.
    pub(super) from_first_instruction: bool,
}

/// What ends a trace besides the duration and the target's exit.
pub(super) struct TraceControl<'a> {
    /// SIGINT / SIGTERM: they end the trace of a `--pid` target, and are forwarded to `child`;
    /// SIGUSR1 asks for an interim report. None for a `--follow`ed process (the command gets
    /// them).
    pub(super) signals: Option<&'a Signals>,
    /// Set when deferprobe started the target: a signal then starts stopping it, and tracing
    /// lasts until it exits.
    pub(super) child: Option<u32>,
    /// A `--follow`ed process: its trace ends when the follower asks.
    pub(super) stop: Option<&'a StopRequest>,
}

/// The follower's request that a process's trace end, and why.
#[derive(Default)]
pub(super) struct StopRequest {
    reason: std::sync::Mutex<Option<EndReason>>,
    notify: tokio::sync::Notify,
}

impl StopRequest {
    /// Asks the trace to end (the first reason given stays). Any thread may ask.
    pub(super) fn request(&self, reason: EndReason) {
        self.reason.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(reason);
        self.notify.notify_one();
    }

    /// Returns once the trace is asked to end.
    async fn requested(&self) -> EndReason {
        loop {
            if let Some(reason) = *self.reason.lock().unwrap_or_else(|e| e.into_inner()) {
                return reason;
            }
            self.notify.notified().await;
        }
    }
}

async fn requested(stop: Option<&StopRequest>) -> EndReason {
    match stop {
        Some(stop) => stop.requested().await,
        None => std::future::pending().await,
    }
}

async fn signal(signals: Option<&Signals>) -> super::signals::Arrived {
    match signals {
        Some(signals) => signals.recv().await,
        None => std::future::pending().await,
    }
}

/// What the trace loop produced.
pub(super) struct Traced {
    /// The newest snapshot of the runtime's state, and whether it was taken after tracing
    /// stopped (false: the target exited first, and this is the last one taken before).
    pub(super) snapshot: Option<(Snapshot, bool)>,
    /// `runtime.MemProfileRate` as last read from the target (`--alloc-mode profiled`).
    pub(super) memprofile_rate: Option<u64>,
    pub(super) aggregator: Aggregator,
    pub(super) counters: Counters,
    pub(super) ended_by: EndReason,
    pub(super) duration: Duration,
    /// Monotonic ns when tracing stopped (the probes' clock).
    pub(super) ended_ns: u64,
    pub(super) attached: usize,
    pub(super) reconciled: Reconciled,
    pub(super) governor: GovernorReport,
    /// Functions whose deferreturn probes went off (no heap defer pending after
    /// [`IDLE_AFTER`]), and how many of them got them back at a heap defer.
    pub(super) frames_idled: usize,
    pub(super) frames_rearmed: usize,
}

/// The loop. A signal starts stopping the command deferprobe started (`stop`).
pub(super) async fn trace(
    tracer: &mut Tracer,
    exited: &ExitWatch,
    stop: &mut CommandStop,
    args: &RunArgs,
    control: &TraceControl<'_>,
    context: &TraceContext<'_>,
) -> Result<Traced> {
    let child = control.child;
    let started = Instant::now();
    let kill_deadline = sleep(Duration::MAX / 4);
    tokio::pin!(kill_deadline);
    let mut drain_tick = interval(DRAIN_EVERY);
    drain_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut log_tick = interval_at(tokio::time::Instant::now() + args.interval, args.interval);
    log_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let deadline = sleep(args.duration.unwrap_or(Duration::MAX / 4));
    tokio::pin!(deadline);

    let mut sampler = Sampler::new(tracer, args.max_overhead, context.pid)?;
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
    let mut snapshot = match context.from_first_instruction {
        true => None,
        false => take_snapshot(&mut aggregator),
    };
    // Which functions keep their deferreturn probes: those with a heap defer pending.
    let mut frames = FrameArming::new(context.plan, context.bias);
    if let Some(snapshot) = &snapshot {
        frames.needed(snapshot_sites(snapshot));
    }
    let idle_check = sleep(IDLE_AFTER);
    tokio::pin!(idle_check);
    let mut idle_checked = false;
    // Logged once everything is in place, the snapshot at attach taken: tests and scripts may
    // end the target as soon as they see it.
    let families: Vec<&str> = context.plan.families.iter().map(|family| family.name()).collect();
    info!(
        probes = tracer.attached(),
        families = families.join(","),
        go_version = %context.plan.go_version,
        pid = context.pid,
        layout = ?context.plan.layout_source,
        attach_mode = ?tracer.mode(),
        pending_at_attach = snapshot.as_ref().map(|s| s.pending_records()),
        "probes attached"
    );
    let mut last_logged = Counts::default();
    let mut batch = Vec::new();
    let mut memprofile_rate = None;
    context.modules.borrow_mut().poll(tracer);
    let every = args.report_every.unwrap_or(Duration::MAX / 4);
    let mut report_tick = interval_at(tokio::time::Instant::now() + every, every);
    report_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // Reports while tracing goes on, made after the select that asked for them: the metrics'
    // (the first right away, then every --interval, with `snapshot_current` saying whether
    // that interval's snapshot could be taken), and interim ones.
    let mut publish = context.on_demand.publishes_metrics();
    let mut snapshot_current = true;
    let mut interim = None;
    let ended_by = loop {
        tokio::select! {
            _ = drain_tick.tick() => {
                if drain_and_arm(tracer, &mut aggregator, &mut batch, &mut frames, exited)?.is_none() {
                    break EndReason::TargetExited;
                }
                read_memprofile_rate(context, &mut memprofile_rate);
            }
            _ = budget_check.tick() => {
                // Load that rises between ticks is answered now, not at the next tick.
                let pending = aggregator.has_pending()
                    || snapshot.as_ref().is_some_and(|s| s.pending_records() > 0);
                if or_exited(sampler.degrade_if_over_budget(tracer, pending), exited)?.is_none() {
                    break EndReason::TargetExited;
                }
            }
            _ = governor_tick.tick() => match or_exited(sampler.tick(tracer), exited)? {
                None => break EndReason::TargetExited,
                Some(Some(end)) => {
                    window_end.as_mut().reset(end);
                    window_open = true;
                }
                Some(None) => {}
            },
            _ = &mut idle_check, if !idle_checked => {
                idle_checked = true;
                let idle = frames.take_idle();
                match or_exited(tracer.disarm_frames(&idle), exited) {
                    Ok(None) => break EndReason::TargetExited,
                    // Left on: they cost what they did, and release nothing.
                    Err(err) => warn!(%err, "deferreturn probes could not go off"),
                    Ok(Some(0)) => {}
                    Ok(Some(probes)) => info!(
                        functions = idle.len(),
                        probes,
                        "deferreturn probes off in the functions that had no heap defer pending \
                         (their returns release nothing); a function's go back on at its next \
                         heap defer"
                    ),
                }
            }
            _ = &mut window_end, if window_open => {
                match or_exited(sampler.advance_windows(tracer), exited)? {
                    None => break EndReason::TargetExited,
                    Some(Some(next)) => window_end.as_mut().reset(next),
                    Some(None) => window_open = false,
                }
            }
            _ = log_tick.tick() => {
                context.modules.borrow_mut().poll(tracer);
                let mut armed =
                    drain_and_arm(tracer, &mut aggregator, &mut batch, &mut frames, exited)?;
                reconciled += reconcile(tracer, &mut aggregator, &mut batch, context);
                let taken = take_snapshot(&mut aggregator);
                snapshot_current = taken.is_some();
                if let Some(taken) = taken {
                    snapshot = Some(taken);
                }
                // Registered since, pending in the runtime, and pending before the trace as
                // the chains show them (without a snapshot).
                let pending = aggregator.pending_by_goroutine().flat_map(|(_, records)| {
                    records.iter().map(|record| record.caller_pc)
                });
                let sites = registered_sites(&batch)
                    .chain(snapshot.iter().flat_map(snapshot_sites))
                    .chain(pending)
                    .collect::<Vec<u64>>();
                armed = armed.and(arm(tracer, &mut frames, sites, exited)?);
                if armed.is_none() {
                    break EndReason::TargetExited;
                }
                let counters = tracer.counters()?;
                let lost = lost_events(&counters, &aggregator);
                let counts = Counts::from_counters(&counters, &lost);
                log_counts(&counts, &lost, &last_logged, &aggregator, snapshot.as_ref(), context);
                last_logged = counts;
                publish = context.on_demand.publishes_metrics();
            }
            _ = report_tick.tick(), if args.report_every.is_some() => {
                interim = Some(InterimCause::ReportEvery);
            }
            arrived = signal(control.signals) => match child {
                _ if arrived.asks_for_a_report() => interim = Some(InterimCause::Signal),
                Some(pid) => {
                    if let Some(grace) = stop.on_signal(pid, arrived) {
                        kill_deadline.as_mut().reset(tokio::time::Instant::now() + grace);
                    }
                }
                None => break EndReason::Signal,
            },
            _ = &mut kill_deadline, if stop.awaiting_exit() => {
                if let Some(pid) = child {
                    stop.on_grace_end(pid);
                }
            }
            _ = exited.exited() => break EndReason::TargetExited,
            _ = &mut deadline => break EndReason::Duration,
            reason = requested(control.stop) => break reason,
        }
        if let Some(cause) = interim.take() {
            // Every event so far, and the runtime's state now, read for this report only: the
            // loop's own snapshots and reconciliations go on as they were.
            if drain_and_arm(tracer, &mut aggregator, &mut batch, &mut frames, exited)?.is_none() {
                break EndReason::TargetExited;
            }
            let fresh = context.reader.and_then(|reader| reader.take().ok());
            let so_far = SoFar {
                aggregator: &aggregator,
                snapshot: match fresh {
                    Some(fresh) => Some((Cow::Owned(fresh), true)),
                    None => so_far_snapshot(&aggregator, snapshot.as_ref(), false),
                },
                sampler: &sampler,
                frames: &frames,
                reconciled,
                memprofile_rate,
                started,
            };
            let report = report_so_far(tracer, &so_far, context, Some(on_demand::interim(cause)))?;
            context.on_demand.write(&report);
        }
        if std::mem::take(&mut publish) {
            let so_far = SoFar {
                aggregator: &aggregator,
                snapshot: so_far_snapshot(&aggregator, snapshot.as_ref(), snapshot_current),
                sampler: &sampler,
                frames: &frames,
                reconciled,
                memprofile_rate,
                started,
            };
            let report = report_so_far(tracer, &so_far, context, None)?;
            context.on_demand.publish(report, sampler.duty_cycles());
        }
    };
    // The probes fired synchronously in the target: everything is in the buffer by now.
    drain(tracer, &mut aggregator, &mut batch);
    read_memprofile_rate(context, &mut memprofile_rate);
    let mut final_snapshot = false;
    // A process that exec'd another program is gone as much as one that exited: its memory
    // is the new program's.
    if !matches!(ended_by, EndReason::TargetExited | EndReason::Exec) {
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
        frames_idled: frames.idled,
        frames_rearmed: frames.rearmed,
        governor: {
            sampler.account(tracer)?;
            sampler.report()
        },
    })
}

/// The trace's state so far, for a report while tracing goes on.
struct SoFar<'a> {
    aggregator: &'a Aggregator,
    /// The snapshot to report, and whether it is current (see [`Live::snapshot`]).
    snapshot: Option<(Cow<'a, Snapshot>, bool)>,
    sampler: &'a Sampler,
    frames: &'a FrameArming,
    reconciled: Reconciled,
    memprofile_rate: Option<u64>,
    started: Instant,
}

/// The snapshot a report so far shows: `last` if it is `current`, else `last` brought up to
/// now with the events seen since it was taken.
fn so_far_snapshot<'a>(
    aggregator: &Aggregator,
    last: Option<&'a Snapshot>,
    current: bool,
) -> Option<(Cow<'a, Snapshot>, bool)> {
    let last = last?;
    Some(match current {
        true => (Cow::Borrowed(last), true),
        false => {
            let since = last.started_ns.saturating_sub(LINK_GRACE.as_nanos() as u64);
            (Cow::Owned(aggregator.at_exit(last, since)), false)
        }
    })
}

/// The report of the trace so far (`interim`: to be written; None: for the metrics). Reads
/// the counters and the known-maps set, changes nothing.
fn report_so_far(
    tracer: &Tracer,
    so_far: &SoFar<'_>,
    context: &TraceContext<'_>,
    interim: Option<InterimReport>,
) -> Result<Report> {
    let counters = tracer.counters()?;
    let snapshot = so_far.snapshot.as_ref().map(|(snapshot, current)| (&**snapshot, *current));
    let map_writes =
        assemble::snapshot_map_writes(tracer, snapshot.map(|(s, _)| s), context.reader);
    let modules = context.modules.borrow();
    Ok(context.reporter.report(&Live {
        aggregator: so_far.aggregator,
        counters: &counters,
        snapshot,
        governor: so_far.sampler.report(),
        ended_by: None,
        interim,
        duration: so_far.started.elapsed(),
        now_ns: monotonic_ns(),
        attached: tracer.attached(),
        reconciled: so_far.reconciled,
        memprofile_rate: so_far.memprofile_rate,
        frames_idled: so_far.frames.idled,
        frames_rearmed: so_far.frames.rearmed,
        map_writes: &map_writes,
        modules: &modules,
        exit_code: None,
        stop_note: None,
        exited_during_attach: false,
    }))
}

/// Reads `runtime.MemProfileRate` from the target (`--alloc-mode profiled`), into `rate`.
fn read_memprofile_rate(context: &TraceContext<'_>, rate: &mut Option<u64>) {
    if let Some(read) = context.memprofile_rate.and_then(|at| context.memory.read_u64(at)) {
        *rate = Some(read);
    }
}

/// What attaching or detaching probes gave, or None when it failed because the target has
/// exited (its executable is gone from `/proc/PID/exe`): the target's exit, not an error.
/// The exit is waited for a moment, as the executable goes before the process is reported
/// exited.
pub(super) fn or_exited<T>(result: Result<T>, exited: &ExitWatch) -> Result<Option<T>> {
    match result {
        Ok(value) => Ok(Some(value)),
        Err(_) if exited.exits_within(Duration::from_millis(100)) => Ok(None),
        Err(err) => Err(err),
    }
}

/// Attaches the deferreturn probes of the functions holding `sites` (runtime return addresses
/// of defer sites with a record pending) whose probes went off. None when that failed because
/// the target exited; another failure is logged, and tried again at the next heap defer.
fn arm(
    tracer: &mut Tracer,
    frames: &mut FrameArming,
    sites: impl IntoIterator<Item = u64>,
    exited: &ExitWatch,
) -> Result<Option<()>> {
    let needed = frames.needed(sites);
    if needed.is_empty() {
        return Ok(Some(()));
    }
    match or_exited(tracer.arm_frames(&needed), exited) {
        Ok(Some(probes)) => {
            debug!(functions = needed.len(), probes, "deferreturn probes back on");
            Ok(Some(()))
        }
        Ok(None) => Ok(None),
        // Their records are still released by the next snapshot; asked again at the next
        // heap defer.
        Err(err) => {
            warn!(%err, functions = needed.len(), "deferreturn probes could not go back on");
            frames.not_armed(&needed);
            Ok(Some(()))
        }
    }
}

/// The defer sites of the registrations in `batch`.
fn registered_sites(batch: &[Event]) -> impl Iterator<Item = u64> + '_ {
    batch.iter().filter_map(|event| match event {
        Event::DeferRegistered(registered) => Some(registered.caller_pc),
        _ => None,
    })
}

/// The defer sites of a snapshot's pending records.
fn snapshot_sites(snapshot: &Snapshot) -> impl Iterator<Item = u64> + '_ {
    snapshot.goroutines.iter().flat_map(|g| g.records.iter().map(|record| record.site))
}

/// `--duration` ended the trace of command `pid`: stops it (SIGTERM, then SIGKILL at a second
/// signal or after `--kill-after`) and returns once it has exited.
pub(super) async fn stop_command(
    pid: u32,
    exited: &ExitWatch,
    signals: &Signals,
    stop: &mut CommandStop,
) {
    // Already stopping on a signal: its grace goes on.
    let grace = match stop.cause {
        Some(_) => stop.kill_after(),
        None => stop.on_duration(pid),
    };
    let kill_deadline = sleep(grace);
    tokio::pin!(kill_deadline);
    loop {
        tokio::select! {
            _ = exited.exited() => return,
            // SIGUSR1 is no reason to stop the command harder.
            arrived = signals.recv() => if !arrived.asks_for_a_report() {
                stop.on_signal(pid, arrived);
            },
            _ = &mut kill_deadline, if stop.awaiting_exit() => stop.on_grace_end(pid),
        }
    }
}

/// [`drain`]s, then puts the deferreturn probes back on in the functions of the heap defers
/// registered since (None: the target exited).
fn drain_and_arm(
    tracer: &mut Tracer,
    aggregator: &mut Aggregator,
    batch: &mut Vec<Event>,
    frames: &mut FrameArming,
    exited: &ExitWatch,
) -> Result<Option<()>> {
    drain(tracer, aggregator, batch);
    arm(tracer, frames, registered_sites(batch), exited)
}

/// Moves every waiting event into the aggregator, in ring-buffer order.
pub(super) fn drain(tracer: &mut Tracer, aggregator: &mut Aggregator, batch: &mut Vec<Event>) {
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
pub(super) fn reconcile(
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
    // Every g the runtime made (to find records pending before tracing started), else the
    // goroutines seen registering.
    let all = (context.reader)
        .and_then(|reader| goroutines::read_allgs(&context.memory, reader.context().allg));
    let gs: Vec<u64> = match all {
        Some(all) => all,
        None => tracked.iter().map(|(_, g)| *g).collect(),
    };
    let mut chains = read_chains(context, &gs);
    // A tracked goroutine whose chain could not be read consistently gets a second try.
    let again: Vec<u64> =
        tracked.iter().map(|(_, g)| *g).filter(|g| !chains.contains_key(g)).collect();
    if !again.is_empty() {
        chains.extend(read_chains(context, &again));
    }
    let grace = LINK_GRACE.as_nanos() as u64;
    let mut total = Reconciled::default();
    for (goid, g) in tracked {
        let Some(read) = chains.get(&g) else { continue };
        total += aggregator.reconcile(goid, &read.chain, read.started_ns.saturating_sub(grace));
    }
    for read in chains.values() {
        total.adopted += aggregator.adopt(&read.chain, read.ended_ns);
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

/// One goroutine's `_defer` chain and when its reading began and ended: a record registered
/// after the start may be missing from it, and any record in it was registered (its probe
/// fired) before the end.
pub(super) struct ChainRead {
    started_ns: u64,
    ended_ns: u64,
    chain: GoroutineDefers,
}

/// The chains of the goroutines at `gs`, by g, read as snapshots read them
/// ([`goroutines::read_defers`]). A chain that can't be read consistently (the target is gone,
/// the chain changed under every try) proves nothing and is left out.
fn read_chains(context: &TraceContext, gs: &[u64]) -> HashMap<u64, ChainRead> {
    let started_ns = monotonic_ns();
    let headers = goroutines::read_headers(&context.memory, &context.layout, gs);
    (gs.iter().zip(headers))
        .filter_map(|(&g, header)| {
            let chain = goroutines::read_defers(&context.memory, &context.layout, header?).ok()?;
            Some((g, ChainRead { started_ns, ended_ns: monotonic_ns(), chain }))
        })
        .collect()
}

/// Losses so far, by cause.
pub(super) fn lost_events(counters: &Counters, aggregator: &Aggregator) -> LostEvents {
    let events = aggregator.events();
    LostEvents::new(counters, events.undecodable, events.without_goid)
}

pub(super) fn log_counts(
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
