//! The tokio loop of `run`: drains the ring buffer on a short timer into the [`Aggregator`],
//! takes snapshots of the runtime's state and logs counts every `--interval`, runs the governor's
//! ticks, and stops on the duration, a signal or the target's exit.

//! `deferprobe run`: the thin runtime shell around the pure parts. It finds or starts the
//! target, attaches the probe plan, then runs one tokio loop that drains the ring buffer on a
//! short timer into the [`Aggregator`], reconciles it with the runtime's `_defer` chains and
//! logs counts every `--interval`, and stops on the duration, SIGINT/SIGTERM or the target's
//! exit. Then it writes the report.

use std::{
    collections::HashMap,
    os::fd::OwnedFd,
    time::{Duration, Instant},
};

use deferprobe_common::Counters;
use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::{Signal, SignalKind, signal},
    time::{MissedTickBehavior, interval, interval_at, sleep},
};
use tracing::{info, warn};

use super::sampler::{BUDGET_CHECK_EVERY, FIRST_GOVERNOR_TICK, GOVERNOR_TICK, Sampler};
use crate::{
    aggregator::{Aggregator, Event, Reconciled},
    cli::RunArgs,
    error::{Error, Result},
    layout::RuntimeLayout,
    plan::ProbePlan,
    report::{Counts, EndReason, GovernorReport, LostEvents},
    snapshot::RuntimeReader,
    state::memory::{Memory as _, ProcessMemory, RuntimeGoroutine, read_allgs, read_goroutine},
    state::{Snapshot, monotonic_ns},
    tracer::Tracer,
};

/// How often the ring buffer is drained (probes submit without waking us).
pub(super) const DRAIN_EVERY: Duration = Duration::from_millis(50);

/// Pause between the two final looks at the runtime's chains.
pub(super) const FINAL_RECHECK: Duration = Duration::from_millis(50);

/// Records registered this recently may not be linked into `g._defer` yet when the chain is
/// read (the probe fires at deferproc's entry): reconciliation leaves them alone.
pub(super) const LINK_GRACE: Duration = Duration::from_millis(20);

/// The signals that end tracing.
pub(super) struct Signals {
    pub(super) interrupt: Signal,
    pub(super) terminate: Signal,
}

impl Signals {
    /// Needs a tokio runtime context.
    pub(super) fn install() -> Result<Signals> {
        let error = |err| Error::internal(format!("installing signal handlers: {err}"));
        Ok(Signals {
            interrupt: signal(SignalKind::interrupt()).map_err(error)?,
            terminate: signal(SignalKind::terminate()).map_err(error)?,
        })
    }
}

/// What the loop reads besides the tracer.
pub(super) struct TraceContext<'a> {
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
    /// Runtime address of `runtime.allgs`, when the binary has symbols.
    pub(super) allgs: Option<u64>,
    /// Go plugins found in the target: looked for before the loop and every `--interval`,
    /// each probed when found.
    pub(super) modules: std::cell::RefCell<crate::modules::Modules>,
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
}

/// The loop. `child` is set when deferprobe started the target: signals are then forwarded to
/// it and tracing lasts until it exits.
pub(super) async fn trace(
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
    context.modules.borrow_mut().poll(tracer);
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
                context.modules.borrow_mut().poll(tracer);
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
pub(super) fn or_exited<T>(result: Result<T>, exited: &AsyncFd<OwnedFd>) -> Result<Option<T>> {
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
pub(super) struct ChainRead {
    started_ns: u64,
    ended_ns: u64,
    chain: RuntimeGoroutine,
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

pub(super) fn forward(pid: u32, signal: i32) {
    // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(pid as i32, signal) };
}
