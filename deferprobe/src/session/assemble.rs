//! Assembling `run`'s report from the trace's state: [`Reporter`] holds what is fixed for the
//! whole run (binary, plan, target, flags), [`Live`] what the trace has gathered so far. The
//! final report and the interim ones (SIGUSR1, `--report-every`, the metrics) are built by the
//! same code from the same state, only read.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use deferprobe_common::Counters;

use crate::{
    aggregator::{Aggregator, Reconciled},
    binary::{GoBinary, MemoryProfiling},
    cli::RunArgs,
    findings,
    governor::SampledFamily,
    modules::Modules,
    plan::{ProbeFamily, ProbePlan},
    process_tree::ProcessTree,
    report::{
        self, AllocationsReport, ChildrenReport, Counts, EndReason, GovernorReport, InterimReport,
        Location, Lookups, LostEvents, ProbesReport, ProfiledAllocations, RateSource, Report,
        SnapshotStats, TargetReport,
    },
    snapshot::RuntimeReader,
    state::Snapshot,
    target::Target,
    tracer::Tracer,
};

use super::frames;

/// What a report of this run is made from besides the trace's state: fixed for the run.
pub(super) struct Reporter<'a> {
    pub(super) binary: &'a GoBinary,
    pub(super) plan: &'a ProbePlan,
    pub(super) target: &'a Target,
    pub(super) args: &'a RunArgs,
    /// Snapshots of the runtime's state (None if it can't be read: `state_error` says why).
    pub(super) reader: Option<&'a RuntimeReader<'a, 'a>>,
    pub(super) state_error: Option<String>,
    /// Runtime address − ELF virtual address of the executable.
    pub(super) bias: u64,
    /// The probes were attached before the target's first instruction (`-- CMD`, or a
    /// `--follow`ed process stopped at its exec).
    pub(super) from_first_instruction: bool,
    /// What the report says of the processes the target started.
    pub(super) children: Children<'a>,
    pub(super) memory_profiling: MemoryProfiling,
    /// `--alloc-mode profiled` with allocations probed.
    pub(super) profiled: bool,
}

/// The processes the target started, as a report tells them.
pub(super) enum Children<'a> {
    /// The target deferprobe was given (`--pid`, `-- CMD`): the processes it starts are counted
    /// by the process-tree programs (None: they could not be loaded), and not traced.
    Counted(Option<&'a ProcessTree>),
    /// A process of a `--follow`ed tree (the follow report lists the tree), `stopped` at its
    /// exec unless the stop failed.
    Followed { stopped: bool },
}

/// The trace's state a report is made from, at its end or while it goes on.
pub(super) struct Live<'a> {
    pub(super) aggregator: &'a Aggregator,
    pub(super) counters: &'a Counters,
    /// The snapshot of the runtime's state the pending sections come from, and whether it is
    /// current (false: the last one taken, brought up to now with the events).
    pub(super) snapshot: Option<(&'a Snapshot, bool)>,
    pub(super) governor: GovernorReport,
    /// Why tracing ended; None while it goes on (an interim report: `interim`).
    pub(super) ended_by: Option<EndReason>,
    pub(super) interim: Option<InterimReport>,
    pub(super) duration: Duration,
    /// Monotonic ns of the report's "now" (the probes' clock).
    pub(super) now_ns: u64,
    pub(super) attached: usize,
    pub(super) reconciled: Reconciled,
    /// `runtime.MemProfileRate` as last read from the target (`--alloc-mode profiled`).
    pub(super) memprofile_rate: Option<u64>,
    pub(super) frames_idled: usize,
    pub(super) frames_rearmed: usize,
    /// Write counts of the captured maps, from the kernel's known-maps set.
    pub(super) map_writes: &'a HashMap<u64, u64>,
    pub(super) modules: &'a Modules,
    /// The command's exit code (`-- CMD`, at the end).
    pub(super) exit_code: Option<i32>,
    /// How deferprobe stopped the command, if it did.
    pub(super) stop_note: Option<String>,
    pub(super) exited_during_attach: bool,
}

impl Reporter<'_> {
    /// The report of `live`. Reads the trace's state, changes nothing.
    pub(super) fn report(&self, live: &Live<'_>) -> Report {
        let (args, plan, target) = (self.args, self.plan, self.target);
        let module_pc = |pc: u64| live.modules.module_pc(pc);
        let from_snapshot = live.snapshot.is_some() && self.reader.is_some();
        let location = |pc: u64| Location::of_return_address(self.binary, pc);
        let map_writes = |map: u64| live.map_writes.get(&map).copied();
        let lookups = Lookups {
            bias: self.bias,
            location: &location,
            now_ns: live.now_ns,
            min_pending: args.min_pending,
            module_pc: &module_pc,
        };
        let aggregator = live.aggregator;
        // The runtime's own state wins: pending records, what their closures hold, and sites.
        // The events alone (`correlate`) only when it could not be read.
        let mut snapshot_notes = Vec::new();
        let mut correlation = if let (Some((snapshot, current)), Some(reader)) =
            (live.snapshot, self.reader)
        {
            let registered: HashMap<(u64, u64), u64> = aggregator
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
                sites: aggregator
                    .sites()
                    .map(|(pc, totals)| (pc, (totals.registered, totals.released)))
                    .collect(),
                goroutine_sites: snapshot
                    .goroutines
                    .iter()
                    .flat_map(|g| {
                        let goid = g.header.goid;
                        let sites = aggregator.goroutine_sites(goid);
                        sites.map(move |(pc, t)| ((goid, pc), (t.registered, t.released)))
                    })
                    .collect(),
                map_first_written: &|map| aggregator.map(map).map(|m| m.first_pc),
                map_writes: &map_writes,
                now_ns: live.now_ns,
                module_pc: &module_pc,
            };
            let sections = reader.sections(snapshot, args.min_pending, Some(&events));
            snapshot_notes = crate::snapshot::snapshot_notes(snapshot, &sections);
            if !current {
                snapshot_notes.push(format!(
                    "{}: pending defers are the last snapshot of the runtime's state, taken \
                     {:.1}s before, less the records whose frames returned or goroutines exited \
                     since, plus the records registered since",
                    match live.interim {
                        Some(_) => "the runtime's state could not be read for this report",
                        None => "the target exited",
                    },
                    live.now_ns.saturating_sub(snapshot.ended_ns) as f64 / 1e9
                ));
            }
            sections
        } else {
            report::correlate(aggregator, &lookups)
        };
        // Probes were attached before the program's first instruction: what no registration
        // seen accounts for is a lost event, never "pending before trace".
        if self.from_first_instruction {
            findings::unseen_registrations_were_lost(&mut correlation);
        }
        let events = aggregator.events();
        let lost = LostEvents::new(live.counters, events.undecodable, events.without_goid);
        let counts = Counts::from_counters(live.counters, &lost);
        let allocations = AllocationsReport {
            mode: plan.allocations,
            profiled: self.profiled.then(|| {
                let (rate, source) = match (live.memprofile_rate, self.memory_profiling) {
                    (Some(rate), _) => (rate, RateSource::Target),
                    (None, MemoryProfiling::Enabled { initial_rate, .. }) => {
                        (initial_rate, RateSource::Binary)
                    }
                    (None, _) => (report::GO_DEFAULT_MEMPROFILE_RATE, RateSource::GoDefault),
                };
                ProfiledAllocations::unsample(aggregator.sampled_allocations(), rate, source)
            }),
        };
        let mut notes = Vec::new();
        if live.interim.is_some() {
            notes.push(
                "an interim report: tracing goes on, and these are the counts and the runtime's \
                 state so far; the final report comes when tracing ends"
                    .to_owned(),
            );
        }
        notes.extend(end_notes(
            &lost,
            live.ended_by,
            live.exit_code,
            self.from_first_instruction,
            args.ring_buffer_kib,
        ));
        notes.extend(target.notes.iter().cloned());
        let children = match self.children {
            Children::Followed { stopped } => {
                if !stopped {
                    notes.push(
                        "the process could not be stopped at its exec (pid 1 of a pid namespace \
                         can't be signalled so): it was traced from when its probes were attached"
                            .into(),
                    );
                }
                None
            }
            Children::Counted(tree) => {
                let (children, note) = untraced_children(tree);
                notes.extend(note);
                children
            }
        };
        notes.extend(plan.layout_note.clone());
        if let Some(thread) = target.thread {
            notes.push(format!(
                "--pid {thread} is a thread of process {}: the process was traced",
                target.pid
            ));
        }
        if live.exited_during_attach {
            notes.push(
                "the target exited while deferprobe was attaching its probes: counts cover the \
                 moment some of them were attached, and the runtime's state was not read"
                    .into(),
            );
        }
        notes.extend(live.stop_note.clone());
        notes.extend(snapshot_notes);
        if let Some(err) = &self.state_error {
            notes.push(format!(
                "the runtime's state was not read ({err}): pending defers, findings and sites \
                 come from the events alone, so records pending before tracing started are not \
                 counted and what closures capture is unknown"
            ));
        }
        let pending_before_trace = correlation.pending.before_trace;
        if pending_before_trace > 0 {
            notes.push(format!(
                "{} heap defer records were already pending in the runtime when tracing started \
                 (\"pending at attach\", found in the goroutines' _defer chains): their age is \
                 unknown (at least the trace's){}",
                pending_before_trace,
                match self.reader.is_some() {
                    true => "",
                    false => ", and so are the maps they capture",
                }
            ));
        }
        notes.extend(live.modules.notes());
        if correlation.pending.unprobed > 0 {
            notes.push(format!(
                "{} pending heap defer records at sites in Go plugins were registered while the \
                 plugin's code was not probed (pending_unprobed): they are not in \
                 counts.deferproc nor in their sites' registered, and are neither pending before \
                 tracing started nor lost events",
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
        notes.extend(findings::panic_notes(aggregator.panicked()));
        if live.frames_idled > 0 {
            notes.push(format!(
                "deferreturn probes went off after {}s in {} that had no heap defer pending \
                 (each return of such a function calls runtime.deferreturn, which releases \
                 nothing); {} got them back at a heap defer, within about 50 ms: returns in \
                 between are not in counts.deferreturn, and their records were released at the \
                 next snapshot",
                frames::IDLE_AFTER.as_secs(),
                match live.frames_idled {
                    1 => "1 function".to_owned(),
                    n => format!("{n} functions"),
                },
                live.frames_rearmed
            ));
        }
        if live.reconciled.released + live.reconciled.moved > 0 {
            notes.push(format!(
                "the runtime's _defer chains corrected the event-based state: {} records run \
                 without a deferreturn seen (panic, recover, Goexit, or while their function's \
                 deferreturn probes were off), {} frames moved by stack growth",
                live.reconciled.released, live.reconciled.moved
            ));
        }
        if !from_snapshot {
            notes.extend(findings::capture_notes(&correlation));
        }
        if !plan.families.contains(&ProbeFamily::Defers) {
            notes.push(
                "defers were not probed (--probes): pending defers, findings and sites cover \
                 only records read from the goroutines' _defer chains, with no registrations or \
                 releases seen"
                    .into(),
            );
        }
        notes.extend(governor_notes(&live.governor));
        Report {
            schema_version: report::SCHEMA_VERSION,
            target: TargetReport {
                pid: target.pid,
                exe: target.exe_name.clone(),
                go_module: target.go_module.clone(),
                go_version: plan.go_version.clone(),
                exit_code: live.exit_code,
                namespace: target.namespace.clone(),
            },
            duration_secs: live.duration.as_secs_f64(),
            ended_by: live.ended_by,
            interim: live.interim.clone(),
            counts: counts.reported(&plan.families, plan.allocations),
            lost,
            probes: ProbesReport {
                attached: live.attached,
                families: plan.families.clone(),
                layout_source: plan.layout_source,
            },
            allocations,
            governor: live.governor.clone(),
            snapshot: live
                .snapshot
                .filter(|_| self.reader.is_some())
                .map(|(snapshot, _)| SnapshotStats::of(snapshot)),
            pending: correlation.pending,
            findings: correlation.findings,
            goroutines: correlation.goroutines,
            sites: correlation.sites,
            children,
            notes,
        }
    }
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

/// Write counts of `maps` (runtime addresses), from the kernel's known-maps set.
pub(super) fn captured_map_writes(tracer: &Tracer, maps: HashSet<u64>) -> HashMap<u64, u64> {
    maps.into_iter().filter_map(|map| Some((map, tracer.map_writes(map)?))).collect()
}

/// The write counts of the maps `snapshot`'s closures capture, when it is read.
pub(super) fn snapshot_map_writes(
    tracer: &Tracer,
    snapshot: Option<&Snapshot>,
    reader: Option<&RuntimeReader<'_, '_>>,
) -> HashMap<u64, u64> {
    match (snapshot, reader) {
        (Some(snapshot), Some(_)) => captured_map_writes(tracer, snapshot.captured_map_addresses()),
        _ => HashMap::new(),
    }
}

/// What the governor's sampling and budget mean for the counts.
fn governor_notes(governor: &GovernorReport) -> Vec<String> {
    let mut notes = Vec::new();
    for sampled in &governor.sampled {
        notes.push(format!(
            "{} probes were sampled to stay under --max-overhead {}% (duty cycle {:.0}% on \
             average): their counts cover only the sampled windows; estimate {} ± {} calls \
             (1σ){}{}",
            sampled.family.name(),
            governor.max_overhead_percent,
            sampled.mean_duty_cycle * 100.0,
            sampled.estimated_calls,
            sampled.estimated_calls_error,
            match (sampled.estimate_weak, sampled.estimate_slowed_share) {
                (true, Some(share)) => format!(
                    ", a weak one: the probes took up to {:.0}% of the program's time in its \
                     windows, so a program busy on its CPUs ran slower there, and the estimate \
                     may be low (its error counts that much)",
                    share * 100.0
                ),
                (true, None) => ", a weak one: it holds the last rate measured over a long span \
                                 no later window measured"
                    .to_owned(),
                (false, _) => String::new(),
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
    if let (Some(measured), Some(error), Some(calibrated)) =
        (governor.measured_hit_cost_ns, governor.measured_hit_cost_error_ns, governor.hit_cost_ns)
        && measured + error < calibrated
    {
        notes.push(format!(
            "a probe hit measured {measured} ± {error} ns of the target's CPU time, under the              {calibrated} ns calibrated: a program that uses all the CPU it gets does less work              while probes are on rather than spend more time, which its CPU time can't show, so              the budget was kept on the calibrated cost"
        ));
    }
    // Under half a second over budget is a rounding of one check, not a finding.
    if governor.defers_over_budget_secs >= 0.5 {
        notes.push(format!(
            "for {:.0}s the defer probes alone cost more than --max-overhead {}% (they always \
             stay on; {:.1}% of a CPU on average over the trace): the budget was exceeded",
            governor.defers_over_budget_secs,
            governor.max_overhead_percent,
            governor.defer_probes_percent
        ));
    }
    notes
}

/// `exit_code` is the command's, when deferprobe started the target; `ended_by` is None while
/// tracing goes on.
fn end_notes(
    lost: &LostEvents,
    ended_by: Option<EndReason>,
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
    if ended_by == Some(EndReason::TargetExited) {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn governor(measured: Option<(u64, u64)>) -> GovernorReport {
        GovernorReport {
            max_overhead_percent: 5.0,
            hit_cost_ns: Some(883),
            calibrated_ns: None,
            planned_hit_cost_ns: 1325,
            measured_hit_cost_ns: measured.map(|(ns, _)| ns),
            measured_hit_cost_error_ns: measured.map(|(_, error)| error),
            measured_ticks: 13,
            sampled: Vec::new(),
            defer_probes_percent: 0.4,
            defers_over_budget_secs: 0.0,
        }
    }

    /// A measured cost under the calibrated one (a CPU-saturated target) is said, with both
    /// figures; one above it, or none, says nothing.
    #[test]
    fn a_measured_cost_under_the_calibrated_one_is_noted() {
        let notes = governor_notes(&governor(Some((108, 121))));
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(notes[0].contains("108 ± 121 ns") && notes[0].contains("883 ns"), "{notes:?}");
        assert!(governor_notes(&governor(Some((1700, 100)))).is_empty());
        assert!(governor_notes(&governor(Some((800, 100)))).is_empty());
        assert!(governor_notes(&governor(None)).is_empty());
    }
}
