//! The final report's schema: what `run` and `snapshot` write as JSON (`--report`, schema
//! version 1), built from the counters, the aggregator, the runtime's state and the target.
//! [`text`] renders it for a terminal; [`correlate`] builds the pending sections from the
//! events alone, when the runtime's state can't be read.

mod correlate;
mod processes;
mod text;

pub use correlate::{Lookups, correlate};
pub use processes::{CommandReport, FollowReport, ProcessReport, ProcessStatus};
pub use text::{site_name, truncate, write_findings, write_more_sites, write_notes, write_pending};

use std::collections::BTreeMap;

use deferprobe_common::{Counter, Counters};
use serde::Serialize;

use crate::{
    aggregator::{Aggregator, PendingDefer},
    plan::{AllocationMode, ProbeFamily},
};

pub const SCHEMA_VERSION: u32 = 1;

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub schema_version: u32,
    pub target: TargetReport,
    pub duration_secs: f64,
    /// Why tracing stopped: "duration", "signal" or "target_exited"; null in an interim report
    /// (tracing goes on).
    pub ended_by: Option<EndReason>,
    /// Only in a report written while tracing goes on (SIGUSR1, `--report-every`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interim: Option<InterimReport>,
    pub counts: ReportedCounts,
    /// `counts.lost_events` by cause.
    pub lost: LostEvents,
    pub probes: ProbesReport,
    pub allocations: AllocationsReport,
    /// The overhead governor: its budget, the measured cost of a hit, and the probe families it
    /// sampled (whose counts above cover only the sampled windows).
    pub governor: GovernorReport,
    /// The snapshot of the runtime's state the pending sections come from; null when the
    /// runtime's state could not be read (a note says why).
    pub snapshot: Option<SnapshotStats>,
    pub pending: PendingReport,
    /// Frames holding at least `--min-pending` heap defers, most estimated bytes first.
    pub findings: Vec<Finding>,
    /// Goroutines with pending heap defers, most pending first.
    pub goroutines: Vec<GoroutineReport>,
    /// Every heap defer site seen while tracing, most pending first.
    pub sites: Vec<SiteReport>,
    /// The processes the target started, which were not traced (`run` without `--follow`);
    /// absent from `snapshot`, and from each process of a `--follow` report. Null when they
    /// could not be counted (a note says why).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub children: Option<ChildrenReport>,
    pub notes: Vec<String>,
}

/// The processes a traced process started (forked), counted by the process-tree programs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct ChildrenReport {
    /// New processes (threads left out) forked by the target or its descendants.
    pub processes_started: u64,
    /// Programs those processes exec'd.
    pub programs_executed: u64,
    /// Always false here: `run --follow` traces them, each in a section of its own.
    pub traced: bool,
}

/// How a snapshot of the runtime's state went.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct SnapshotStats {
    pub read_ms: f64,
    pub goroutines_read: u64,
    pub goroutines_alive: u64,
    pub torn: u64,
    pub unreadable: u64,
    pub corrupt: u64,
}

impl SnapshotStats {
    pub fn of(snapshot: &crate::state::Snapshot) -> SnapshotStats {
        SnapshotStats {
            read_ms: snapshot.ended_ns.saturating_sub(snapshot.started_ns) as f64 / 1e6,
            goroutines_read: snapshot.goroutines_read,
            goroutines_alive: snapshot.goroutines_alive,
            torn: snapshot.torn,
            unreadable: snapshot.unreadable,
            corrupt: snapshot.corrupt,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct TargetReport {
    pub pid: u32,
    /// The process's executable.
    pub exe: String,
    /// The Go library traced, when the Go runtime is in a shared library the executable
    /// loaded (`-buildmode=c-shared`) rather than in the executable.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub go_module: Option<String>,
    pub go_version: String,
    /// Exit status of a command started with `run -- CMD` (the code, or 128 + signal).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// The process's own pid and mount namespaces, when they are not deferprobe's (a
    /// container): its pids there, and where its executable was read (`exe` is its path in
    /// its own mount namespace).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<crate::target::Namespaces>,
}

/// What asked for a report while tracing goes on, and when it was written.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct InterimReport {
    pub cause: InterimCause,
    /// UTC, RFC 3339 to the second (the time in the report file's name).
    pub written_at: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum InterimCause {
    /// SIGUSR1.
    Signal,
    /// `--report-every`.
    ReportEvery,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EndReason {
    Duration,
    Signal,
    TargetExited,
    /// `--follow`: the process exec'd another program (traced in a section of its own).
    Exec,
    /// `--follow`: the command deferprobe started exited, and this process of its tree
    /// (still running) was no longer traced.
    CommandExited,
}

/// Exact counts from the per-CPU counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub mapassign: u64,
    /// Heap defer registrations: runtime.deferproc + runtime.deferprocat.
    pub deferproc: u64,
    pub deferproc_stack: u64,
    pub deferreturn: u64,
    pub mallocgc: u64,
    pub alloc_bytes: u64,
    pub goroutine_exits: u64,
    pub lost_events: u64,
}

/// [`Counts`] as reported: None (JSON null, "not probed" in text) for the families `--probes`
/// left out, which were not counted at all (not zero).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ReportedCounts {
    pub mapassign: Option<u64>,
    pub deferproc: Option<u64>,
    pub deferproc_stack: Option<u64>,
    pub deferreturn: Option<u64>,
    pub mallocgc: Option<u64>,
    pub alloc_bytes: Option<u64>,
    pub goroutine_exits: Option<u64>,
    pub lost_events: u64,
}

/// Events lost or incomplete, by cause; `counts.lost_events` is their sum.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct LostEvents {
    /// Events not written because the ring buffer was full.
    pub ring_buffer_full: u64,
    /// Records userspace could not decode.
    pub undecodable: u64,
    /// Events written without a goroutine id (reading g.goid failed): counted, not tracked.
    pub without_goroutine_id: u64,
    /// Probe hits whose user-memory reads failed (other than g.goid): events with a field
    /// missing.
    pub user_read_failed: u64,
}

impl LostEvents {
    /// From the kernel's counters and what the aggregator could not use.
    pub fn new(counters: &Counters, undecodable: u64, without_goroutine_id: u64) -> LostEvents {
        LostEvents {
            ring_buffer_full: counters.get(Counter::LostRingFull),
            undecodable,
            without_goroutine_id,
            user_read_failed: counters.get(Counter::UserReadFailed),
        }
    }

    pub fn total(&self) -> u64 {
        self.ring_buffer_full + self.undecodable + self.without_goroutine_id + self.user_read_failed
    }

    /// "cause: n" for every cause that happened, e.g. "ring buffer full: 12".
    pub fn causes(&self) -> Vec<String> {
        [
            ("ring buffer full", self.ring_buffer_full),
            ("undecodable", self.undecodable),
            ("without goroutine id", self.without_goroutine_id),
            ("unreadable user memory", self.user_read_failed),
        ]
        .into_iter()
        .filter(|(_, n)| *n > 0)
        .map(|(cause, n)| format!("{cause}: {n}"))
        .collect()
    }
}

impl Counts {
    pub fn from_counters(counters: &Counters, lost: &LostEvents) -> Counts {
        Counts {
            mapassign: counters.get(Counter::MapAssign),
            deferproc: counters.get(Counter::DeferProc),
            deferproc_stack: counters.get(Counter::DeferProcStack),
            deferreturn: counters.get(Counter::DeferReturn),
            mallocgc: counters.get(Counter::Malloc),
            alloc_bytes: counters.get(Counter::AllocBytes),
            goroutine_exits: counters.get(Counter::GoroutineExit),
            lost_events: lost.total(),
        }
    }

    /// These counts, with those that were not counted left out: families not `probed`, and
    /// allocations when only the runtime's profiling samples were (`--alloc-mode profiled`).
    pub fn reported(&self, probed: &[ProbeFamily], allocations: AllocationMode) -> ReportedCounts {
        let of = |family: ProbeFamily, value: u64| probed.contains(&family).then_some(value);
        let exact_allocations = allocations == AllocationMode::All;
        let allocations =
            |value: u64| of(ProbeFamily::Allocations, value).filter(|_| exact_allocations);
        ReportedCounts {
            mapassign: of(ProbeFamily::MapWrites, self.mapassign),
            deferproc: of(ProbeFamily::Defers, self.deferproc),
            deferproc_stack: of(ProbeFamily::Defers, self.deferproc_stack),
            deferreturn: of(ProbeFamily::Defers, self.deferreturn),
            mallocgc: allocations(self.mallocgc),
            alloc_bytes: allocations(self.alloc_bytes),
            goroutine_exits: of(ProbeFamily::Defers, self.goroutine_exits),
            lost_events: self.lost_events,
        }
    }

    /// Field-wise `self - earlier` (for "since the last log line").
    pub fn since(&self, earlier: &Counts) -> Counts {
        Counts {
            mapassign: self.mapassign - earlier.mapassign,
            deferproc: self.deferproc - earlier.deferproc,
            deferproc_stack: self.deferproc_stack - earlier.deferproc_stack,
            deferreturn: self.deferreturn - earlier.deferreturn,
            mallocgc: self.mallocgc - earlier.mallocgc,
            alloc_bytes: self.alloc_bytes - earlier.alloc_bytes,
            goroutine_exits: self.goroutine_exits - earlier.goroutine_exits,
            lost_events: self.lost_events - earlier.lost_events,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct ProbesReport {
    /// Attach points (one per probed function or call site).
    pub attached: usize,
    /// The probe families attached (`--probes`).
    pub families: Vec<ProbeFamily>,
    /// Where the runtime struct offsets came from: "dwarf" or "release_table".
    pub layout_source: crate::layout::LayoutSource,
}

/// How allocations were traced (`--alloc-mode`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AllocationsReport {
    pub mode: AllocationMode,
    /// With `profiled`: the runtime's samples and what they stand for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profiled: Option<ProfiledAllocations>,
}

/// Where the `runtime.MemProfileRate` used to unsample came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RateSource {
    /// Read from the target's memory while tracing.
    Target,
    /// The value linked into the binary (the target could not be read).
    Binary,
    /// Go's default, 512 KiB: the binary has no symbols to find the variable by.
    GoDefault,
}

/// Allocations the Go runtime sampled for its memory profile, unsampled like pprof does.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ProfiledAllocations {
    pub memprofile_rate: u64,
    pub rate_source: RateSource,
    /// Exact: `runtime.profilealloc` calls seen.
    pub samples: u64,
    pub sampled_bytes: u64,
    /// Estimates: each sample of `size` bytes stands for `1 / (1 - exp(-size / rate))`
    /// allocations (pprof's unsampling).
    pub estimated_calls: u64,
    pub estimated_bytes: u64,
}

/// Go's default `runtime.MemProfileRate`.
pub const GO_DEFAULT_MEMPROFILE_RATE: u64 = 512 * 1024;

impl ProfiledAllocations {
    /// From samples per allocation size (rounded to its size class) at `rate`.
    pub fn unsample(
        samples_by_size: &BTreeMap<u64, u64>,
        rate: u64,
        rate_source: RateSource,
    ) -> ProfiledAllocations {
        let (mut calls, mut bytes) = (0.0, 0.0);
        for (&size, &samples) in samples_by_size {
            // A rate of 1 samples every allocation; 0 never samples (nothing to scale).
            let scale = match rate {
                0 | 1 => 1.0,
                _ => 1.0 / (1.0 - (-(size as f64) / rate as f64).exp()),
            };
            calls += samples as f64 * scale;
            bytes += (samples * size) as f64 * scale;
        }
        ProfiledAllocations {
            memprofile_rate: rate,
            rate_source,
            samples: samples_by_size.values().sum(),
            sampled_bytes: samples_by_size.iter().map(|(size, n)| size * n).sum(),
            estimated_calls: calls.round() as u64,
            estimated_bytes: bytes.round() as u64,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GovernorReport {
    pub max_overhead_percent: f64,
    /// What one probe hit costs on this machine, measured at start (null if it couldn't be):
    /// the dearer of the instruction classes the plan uses, each in `calibrated_ns`.
    pub hit_cost_ns: Option<u64>,
    /// The calibrated cost of a hit per instruction class (`jbe`, `call`).
    pub calibrated_ns: Option<BTreeMap<&'static str, u64>>,
    /// What the governor counted a hit as costing at the end: the measured real cost (plus its
    /// error) once it was solid, never under the calibrated cost, else the calibrated cost (or
    /// a fallback) with headroom for what a hit costs a busy program beyond it.
    pub planned_hit_cost_ns: u64,
    /// What a hit really cost the target (its CPU time against its hits, between sampling
    /// windows and the rest of each tick: see `cost.rs`), every probe alike; null until enough
    /// ticks had windows. Each sampled family's own figure is in `sampled[]`.
    pub measured_hit_cost_ns: Option<u64>,
    /// One standard error of `measured_hit_cost_ns`, and the segments (at least one per tick
    /// with a window) it was measured over.
    pub measured_hit_cost_error_ns: Option<u64>,
    pub measured_ticks: usize,
    pub sampled: Vec<SamplingReport>,
    /// What the always-on defer probes cost, in percent of one CPU (their hits × the
    /// planned cost per hit, over the whole trace).
    pub defer_probes_percent: f64,
    /// Seconds in which the defer probes alone cost more than `max_overhead_percent`.
    pub defers_over_budget_secs: f64,
}

/// A probe family the governor attached only part of the time.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SamplingReport {
    pub family: crate::governor::SampledFamily,
    pub min_duty_cycle: f64,
    /// Time-weighted.
    pub mean_duty_cycle: f64,
    /// Calls seen while attached (what `counts` shows).
    pub observed_calls: u64,
    /// Calls scaled up by the duty cycle, detached spans bridged by the rates measured on
    /// either side (see `estimate.rs`): an estimate, not a count.
    pub estimated_calls: u64,
    /// One standard deviation of `estimated_calls`.
    pub estimated_calls_error: u64,
    /// The estimate extrapolates a rate over a span no measurement closes (longer than a tenth
    /// of the trace), or rests on no measurement: a note says so.
    pub estimate_weak: bool,
    /// The largest share of the program's time the probes took in a tick's windows, when over
    /// a fifth: a program busy on its CPUs ran slower in the windows, and the estimate may be
    /// low (its error includes that much). Null otherwise.
    pub estimate_slowed_share: Option<f64>,
    /// For allocations: bytes scaled up the same way.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub estimated_bytes: Option<u64>,
    /// What a hit of this family really cost the target, told apart from the others' by
    /// when their windows closed (see `cost.rs`), with one standard error; null until enough
    /// windows, or when its hits moved together with another family's.
    pub measured_hit_cost_ns: Option<u64>,
    pub measured_hit_cost_error_ns: Option<u64>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PendingReport {
    /// Heap defers pending at the end.
    pub heap_defers: u64,
    /// Goroutines holding them.
    pub goroutines: u64,
    /// Distinct maps their closures capture; null when the runtime's state could not be read.
    pub captured_maps: Option<u64>,
    /// Of `heap_defers`, records no registration seen while traced accounts for, already
    /// pending when tracing started (`--pid`; always 0 when deferprobe started the program).
    pub before_trace: u64,
    /// Of `heap_defers`, records no registration seen accounts for in a program deferprobe
    /// started (nothing is pending before its first instruction): their registration events
    /// were lost (ring buffer full). 0 under `--pid`, where they count as `before_trace`.
    pub registration_lost: u64,
    /// Of `heap_defers`, records at sites in code that was not probed when they were
    /// registered: a Go plugin loaded while traced (probed from when deferprobe found it) or
    /// one it could not probe. Neither pending before trace nor lost: see the notes.
    pub unprobed: u64,
}

/// Where a PC is in the source.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Location {
    pub function: Option<String>,
    pub file: Option<String>,
    pub line: Option<u32>,
}

impl Location {
    /// Where the call before the *return address* `pc` (an ELF virtual address) is, from the
    /// binary's `.gopclntab`; unknown outside Go code.
    pub fn of_return_address(binary: &crate::binary::GoBinary, pc: u64) -> Location {
        match binary.source_location(pc.wrapping_sub(1)) {
            Some(loc) => Location {
                function: Some(loc.function),
                file: Some(loc.file),
                line: Some(loc.line),
            },
            None => Location::default(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SiteReport {
    /// Return address of the deferproc call, as `0x…` (ELF virtual address of the executable,
    /// or of `module`).
    pub pc: String,
    /// The Go plugin holding the site (its path); null for the executable.
    pub module: Option<String>,
    pub function: Option<String>,
    pub file: Option<String>,
    /// Line of the `defer` statement.
    pub line: Option<u32>,
    /// Heap defers registered and released while traced; null without probes (`snapshot`).
    pub registered: Option<u64>,
    /// Pending records whose registration the probes did not see: pending before tracing
    /// started (all of them in a `snapshot`).
    pub pending_before_trace: u64,
    /// Pending records whose registration event was lost, in a program deferprobe started
    /// (see [`PendingReport::registration_lost`]).
    pub pending_registration_lost: u64,
    /// Pending records registered while the site's code was not probed (a plugin: see
    /// [`PendingReport::unprobed`]).
    pub pending_unprobed: u64,
    pub released: Option<u64>,
    pub pending: u64,
    /// Estimate of what the site's pending records keep alive, as for findings (objects shared
    /// with other sites counted in each); null when only events could be read.
    pub est_bytes: Option<u64>,
    /// What the site's pending closures capture (from the runtime's state; empty when only
    /// events could be read).
    pub captures: Vec<crate::findings::CaptureSummary>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GoroutineReport {
    pub goid: u64,
    pub pending_defers: u64,
    pub captured_maps: Option<u64>,
    pub captured_map_entries: Option<u64>,
    /// Estimate of what the goroutine's pending records keep alive, as for findings; null
    /// when only events could be read.
    pub est_bytes: Option<u64>,
    pub defer_sites: Vec<GoroutineSiteReport>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct GoroutineSiteReport {
    pub function: Option<String>,
    pub file: Option<String>,
    pub line: Option<u32>,
    pub pending: u64,
    /// This goroutine's registrations and releases at the site; null without probes.
    pub registered: Option<u64>,
    pub pending_before_trace: u64,
    pub pending_registration_lost: u64,
    pub pending_unprobed: u64,
    pub released: Option<u64>,
}

/// One frame (goroutine + function invocation) holding many pending heap defers.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Finding {
    /// "defer_accumulation".
    pub kind: &'static str,
    pub goid: u64,
    pub function: Option<String>,
    pub file: Option<String>,
    /// Line of the `defer` statement with the most pending records in the frame.
    pub line: Option<u32>,
    pub pending_defers: u64,
    /// Of those, records already pending when tracing started (found in the runtime's chain):
    /// for them `oldest_pending_secs` is a lower bound and captures are unknown.
    pub pending_before_trace: u64,
    /// Of those, records whose registration event was lost (in a program deferprobe started:
    /// see [`PendingReport::registration_lost`]); their age and captures' origins are unknown.
    pub pending_registration_lost: u64,
    /// Of those, records registered while their code was not probed (a plugin: see
    /// [`PendingReport::unprobed`]).
    pub pending_unprobed: u64,
    /// Age of the oldest pending record; null when some were pending before tracing started
    /// (their age is unknown, "pending at attach") or their registration event was lost.
    pub oldest_pending_secs: Option<f64>,
    /// Distinct maps captured (by value or by reference) by the frame's pending closures.
    pub captured_maps: Option<u64>,
    pub captured_maps_by_value: Option<u64>,
    pub captured_maps_by_reference: Option<u64>,
    /// Their element counts now, summed.
    pub captured_map_entries: Option<u64>,
    /// Estimate of what the frame keeps alive: `_defer` records + closures + captured maps.
    pub est_bytes: Option<u64>,
    /// What the frame's pending closures captured, by kind and type, from the closures'
    /// types in the binary and the objects in the target.
    pub captures: Vec<crate::findings::CaptureSummary>,
    /// The captured maps grouped by where they were first written while traced.
    pub captured_map_origins: Vec<MapOrigin>,
}

/// Captured maps first written at one place.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MapOrigin {
    pub function: Option<String>,
    pub file: Option<String>,
    pub line: Option<u32>,
    pub maps: u64,
    pub entries: u64,
    /// mapassign calls on them while traced (as far as the kernel's LRU set still knows them).
    pub writes: u64,
}

/// The pending part of a report: from a snapshot of the runtime's state
/// ([`crate::findings::from_snapshot`]), or from the events alone ([`correlate`]).
pub struct PendingSections {
    pub pending: PendingReport,
    pub findings: Vec<Finding>,
    pub goroutines: Vec<GoroutineReport>,
    pub sites: Vec<SiteReport>,
    /// Pending records whose captures are unknown, by reason.
    pub unknown_captures: BTreeMap<&'static str, u64>,
    /// Map captures whose header did not check out (entries unknown).
    pub unreadable_maps: u64,
}

impl Report {
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("report serializes")
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::text::{human_bytes, wrap};
    use super::*;
    use crate::aggregator::Event;
    use deferprobe_common::{DeferRegistered, EventHeader, EventKind};

    const BIAS: u64 = 0x1000_0000;

    fn header(kind: EventKind, goid: u64, ktime_ns: u64) -> EventHeader {
        EventHeader { kind: kind as u32, cpu: 0, ktime_ns, goid }
    }

    /// `count` loop defers on goroutine 7, registered while traced.
    fn leaky_aggregator(count: u64) -> Aggregator {
        let mut agg = Aggregator::new();
        for i in 0..count {
            agg.apply(&Event::DeferRegistered(DeferRegistered {
                header: header(EventKind::DeferRegistered, 7, 1_000_000_000 + i),
                closure: 0xc000_0000 + i * 16,
                caller_pc: 0x40_0123 + BIAS,
                caller_sp: 0xc000_8000,
                g: 0xc000_0100,
                stack_hi: 0,
            }));
        }
        agg
    }

    fn lookups(location: &dyn Fn(u64) -> Location) -> Lookups<'_> {
        Lookups {
            bias: BIAS,
            location,
            now_ns: 3_000_000_000,
            min_pending: 16,
            module_pc: &|_| None,
        }
    }

    fn location(pc: u64) -> Location {
        Location {
            function: Some(format!("main.leak@{pc:#x}")),
            file: Some("/src/main.go".into()),
            line: Some(42),
        }
    }

    /// Without the runtime's state, a frame's records still make a finding, but what they
    /// capture and keep alive is unknown: null, never 0.
    #[test]
    fn events_alone_make_findings_with_unknown_captures() {
        let agg = leaky_aggregator(300);
        let c = correlate(&agg, &lookups(&location));
        assert_eq!(
            c.pending,
            PendingReport {
                heap_defers: 300,
                goroutines: 1,
                captured_maps: None,
                before_trace: 0,
                registration_lost: 0,
                unprobed: 0
            }
        );
        assert_eq!(c.findings.len(), 1);
        let f = &c.findings[0];
        assert_eq!((f.goid, f.pending_defers, f.pending_before_trace), (7, 300, 0));
        assert_eq!((f.captured_maps, f.captured_map_entries, f.est_bytes), (None, None, None));
        assert_eq!(f.function.as_deref(), Some("main.leak@0x400123"));
        assert_eq!(f.line, Some(42));
        assert!((f.oldest_pending_secs.unwrap() - 2.0).abs() < 1e-6);
        assert_eq!(c.goroutines[0].defer_sites[0].pending, 300);
        assert_eq!(c.goroutines[0].captured_maps, None);
        assert_eq!(c.sites[0].pc, "0x400123");
        assert_eq!(c.sites[0].registered, Some(300));
        assert_eq!(c.unknown_captures.values().sum::<u64>(), 300);
    }

    #[test]
    fn small_frames_make_no_finding() {
        let agg = leaky_aggregator(15);
        let c = correlate(&agg, &lookups(&location));
        assert!(c.findings.is_empty(), "15 < --min-pending 16");
        assert_eq!(c.pending.heap_defers, 15);
    }

    pub(crate) fn sample() -> Report {
        let agg = leaky_aggregator(20);
        let c = correlate(&agg, &lookups(&location));
        let mut counters = Counters::ZERO;
        counters.values[Counter::DeferProc as usize] = 20;
        counters.values[Counter::LostRingFull as usize] = 2;
        Report {
            schema_version: SCHEMA_VERSION,
            target: TargetReport {
                pid: 42,
                exe: "/srv/app".into(),
                go_module: None,
                go_version: "go1.27.3".into(),
                exit_code: None,
                namespace: None,
            },
            duration_secs: 1.5,
            ended_by: Some(EndReason::Duration),
            interim: None,
            counts: Counts::from_counters(&counters, &LostEvents::new(&counters, 1, 0))
                .reported(&ProbeFamily::ALL, AllocationMode::All),
            lost: LostEvents::new(&counters, 1, 0),
            probes: ProbesReport {
                attached: 20,
                families: ProbeFamily::ALL.to_vec(),
                layout_source: crate::layout::LayoutSource::Dwarf,
            },
            allocations: AllocationsReport { mode: AllocationMode::All, profiled: None },
            governor: GovernorReport {
                max_overhead_percent: 5.0,
                hit_cost_ns: Some(20_000),
                calibrated_ns: None,
                planned_hit_cost_ns: 30_000,
                measured_hit_cost_ns: None,
                measured_hit_cost_error_ns: None,
                measured_ticks: 0,
                sampled: vec![SamplingReport {
                    family: crate::governor::SampledFamily::Allocations,
                    min_duty_cycle: 0.1,
                    mean_duty_cycle: 0.25,
                    observed_calls: 1000,
                    estimated_calls: 4000,
                    estimated_calls_error: 110,
                    estimate_weak: false,
                    estimate_slowed_share: None,
                    estimated_bytes: Some(123_456),
                    measured_hit_cost_ns: Some(900),
                    measured_hit_cost_error_ns: Some(150),
                }],
                defer_probes_percent: 1.5,
                defers_over_budget_secs: 0.0,
            },
            snapshot: None,
            pending: c.pending,
            findings: c.findings,
            goroutines: c.goroutines,
            sites: c.sites,
            children: None,
            notes: vec![
                "a note long enough to need wrapping in an eighty column terminal, \
                         which is what the text report promises to fit in"
                    .into(),
            ],
        }
    }

    /// pprof's unsampling: a sample of `size` bytes at `rate` stands for
    /// `1 / (1 - exp(-size / rate))` allocations; at rate 1 every allocation was sampled.
    #[test]
    fn profiled_allocations_are_unsampled_like_pprof() {
        let samples = BTreeMap::from([(16, 10), (1 << 20, 2)]);
        let every = ProfiledAllocations::unsample(&samples, 1, RateSource::Target);
        assert_eq!((every.samples, every.sampled_bytes), (12, 160 + (2 << 20)));
        assert_eq!((every.estimated_calls, every.estimated_bytes), (12, 160 + (2 << 20)));
        let rate = GO_DEFAULT_MEMPROFILE_RATE;
        let sampled = ProfiledAllocations::unsample(&samples, rate, RateSource::GoDefault);
        let small = 1.0 / (1.0 - (-16.0 / rate as f64).exp()); // about rate / 16
        let large = 1.0 / (1.0 - (-((1 << 20) as f64) / rate as f64).exp()); // about 1.16
        assert_eq!(sampled.estimated_calls, (10.0 * small + 2.0 * large).round() as u64);
        assert_eq!(
            sampled.estimated_bytes,
            (160.0 * small + (2 << 20) as f64 * large).round() as u64
        );
        assert!((327_000..328_000).contains(&sampled.estimated_calls), "{sampled:?}");
        assert_eq!(sampled.samples, 12);
    }

    #[test]
    fn json_has_the_stable_keys() {
        let json: serde_json::Value = serde_json::from_str(&sample().to_json()).unwrap();
        assert_eq!(json["schema_version"], 1);
        assert_eq!(json["target"]["go_version"], "go1.27.3");
        assert_eq!(json["target"]["pid"], 42);
        assert_eq!(json["counts"]["deferproc"], 20);
        assert_eq!(json["counts"]["lost_events"], 3);
        assert_eq!(json["lost"]["ring_buffer_full"], 2);
        assert_eq!(json["lost"]["undecodable"], 1);
        assert_eq!(json["lost"]["without_goroutine_id"], 0);
        assert_eq!(json["lost"]["user_read_failed"], 0);
        for key in [
            "mapassign",
            "deferproc_stack",
            "deferreturn",
            "mallocgc",
            "alloc_bytes",
            "goroutine_exits",
        ] {
            assert_eq!(json["counts"][key], 0, "{key}");
        }
        assert_eq!(
            json["probes"]["families"],
            serde_json::json!(["defers", "map_writes", "allocations"])
        );
        assert_eq!(json["pending"]["heap_defers"], 20);
        assert_eq!(json["sites"][0]["pc"], "0x400123");
        assert_eq!(json["sites"][0]["line"], 42);
        assert_eq!(json["sites"][0]["pending"], 20);
        assert_eq!(json["ended_by"], "duration");
        let finding = &json["findings"][0];
        assert_eq!(finding["kind"], "defer_accumulation");
        for key in ["goid", "function", "file", "line", "pending_defers", "oldest_pending_secs"] {
            assert!(!finding[key].is_null(), "findings[0].{key}");
        }
        // From the events alone what closures capture is unknown: the keys are there, null.
        for key in ["captured_maps", "captured_map_entries", "est_bytes"] {
            assert!(finding.as_object().unwrap()[key].is_null(), "findings[0].{key}");
        }
        let goroutine = &json["goroutines"][0];
        for key in ["goid", "pending_defers"] {
            assert!(!goroutine[key].is_null(), "goroutines[0].{key}");
        }
        for key in ["captured_maps", "captured_map_entries", "est_bytes"] {
            assert!(goroutine.as_object().unwrap()[key].is_null(), "goroutines[0].{key}");
        }
        for key in ["function", "file", "line", "pending", "registered", "released"] {
            assert!(!goroutine["defer_sites"][0][key].is_null(), "defer_sites[0].{key}");
        }
    }

    #[test]
    fn text_fits_80_columns() {
        let text = sample().to_text();
        assert!(text.contains("heap defers (deferproc)"));
        assert!(
            text.contains("allocations  duty min 10%, mean 25%; estimated ~4000 calls"),
            "{text}"
        );
        assert!(text.contains("    ring buffer full: 2\n    undecodable: 1\n"), "{text}");
        assert!(text.contains("defer accumulation in goroutine 7: 20 pending"), "{text}");
        assert!(text.contains("main.leak@0x400123 (main.go:42)"), "{text}");
        for line in text.lines() {
            assert!(line.chars().count() <= 80, "{line:?}");
        }
    }

    #[test]
    fn formatting_helpers() {
        assert_eq!(truncate("abc", 5), "abc");
        assert_eq!(truncate("abcdefgh", 5), "…efgh");
        assert_eq!(wrap("aa bb cc", 5), ["aa bb", "cc"]);
        assert_eq!(wrap("", 5), Vec::<String>::new());
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
    }
}
