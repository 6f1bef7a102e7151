//! The final report: built from the counters, the aggregator and the target, written as JSON
//! (`--report`, schema version 1) and as text for a terminal (stdout).

use std::fmt::Write as _;

use deferprobe_common::{Counter, Counters};
use serde::Serialize;

use crate::aggregator::Aggregator;

pub const SCHEMA_VERSION: u32 = 1;

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub schema_version: u32,
    pub target: TargetReport,
    pub duration_secs: f64,
    /// Why tracing stopped: "duration", "signal" or "target_exited".
    pub ended_by: EndReason,
    pub counts: Counts,
    /// `counts.lost_events` by cause.
    pub lost: LostEvents,
    pub probes: ProbesReport,
    pub pending: PendingReport,
    /// Heap defer sites seen while tracing, most pending first.
    pub sites: Vec<SiteReport>,
    pub notes: Vec<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct TargetReport {
    pub pid: u32,
    pub exe: String,
    pub go_version: String,
    /// Exit status of a command started with `run -- CMD` (the code, or 128 + signal).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EndReason {
    Duration,
    Signal,
    TargetExited,
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

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct LostEvents {
    /// Events not written because the ring buffer was full.
    pub ring_buffer_full: u64,
    /// Records userspace could not decode.
    pub undecodable: u64,
    /// Events written without a goroutine id (reading g.goid failed): counted, not tracked.
    pub without_goroutine_id: u64,
}

impl Counts {
    pub fn from_counters(counters: &Counters, undecodable: u64) -> Counts {
        Counts {
            mapassign: counters.get(Counter::MapAssign),
            deferproc: counters.get(Counter::DeferProc),
            deferproc_stack: counters.get(Counter::DeferProcStack),
            deferreturn: counters.get(Counter::DeferReturn),
            mallocgc: counters.get(Counter::Malloc),
            alloc_bytes: counters.get(Counter::AllocBytes),
            goroutine_exits: counters.get(Counter::GoroutineExit),
            lost_events: counters.get(Counter::LostRingFull) + undecodable,
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
    /// Attach points (one per probed function).
    pub attached: usize,
    /// Where the runtime struct offsets came from: "dwarf" or "release_table".
    pub layout_source: crate::layout::LayoutSource,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PendingReport {
    /// Heap defers registered while tracing and not run by the end.
    pub heap_defers: u64,
    /// Goroutines holding them.
    pub goroutines: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SiteReport {
    /// Return address of the deferproc call, as `0x…` (ELF virtual address).
    pub pc: String,
    /// `function+0xoffset`, when the binary's symbols name it.
    pub function: Option<String>,
    pub registered: u64,
    pub released: u64,
    pub pending: u64,
}

/// Pending state and site totals from the aggregator. `symbolize` names an ELF virtual
/// address; `bias` is what to subtract from runtime PCs to get one (PIE load bias).
pub fn pending_and_sites(
    aggregator: &Aggregator,
    bias: u64,
    symbolize: impl Fn(u64) -> Option<String>,
) -> (PendingReport, Vec<SiteReport>) {
    let pending = PendingReport {
        heap_defers: aggregator.pending_heap_defers(),
        goroutines: aggregator.pending_by_goroutine().count() as u64,
    };
    let mut sites: Vec<SiteReport> = aggregator
        .sites()
        .map(|(pc, totals)| {
            let pc = pc.wrapping_sub(bias);
            SiteReport {
                pc: format!("{pc:#x}"),
                function: symbolize(pc),
                registered: totals.registered,
                released: totals.released,
                pending: totals.pending(),
            }
        })
        .collect();
    sites.sort_by(|a, b| {
        (b.pending, b.registered, &a.pc).cmp(&(a.pending, a.registered, &b.pc))
    });
    (pending, sites)
}

impl Report {
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("report serializes")
    }

    /// The human-readable report, at most 80 columns wide.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let t = &self.target;
        let ended = match self.ended_by {
            EndReason::Duration => "duration reached",
            EndReason::Signal => "interrupted",
            EndReason::TargetExited => "target exited",
        };
        let _ = writeln!(out, "deferprobe report");
        let _ = writeln!(out, "  target    pid {} ({})", t.pid, t.go_version);
        let _ = writeln!(out, "  exe       {}", t.exe);
        let _ = writeln!(out, "  traced    {:.1}s, {ended}", self.duration_secs);
        if let Some(code) = t.exit_code {
            let _ = writeln!(out, "  exit code {code}");
        }
        let c = &self.counts;
        let _ = writeln!(out, "\ncounts");
        for (label, value) in [
            ("heap defers (deferproc)", c.deferproc),
            ("stack defers (deferprocStack)", c.deferproc_stack),
            ("deferreturn calls", c.deferreturn),
            ("map writes (mapassign)", c.mapassign),
            ("allocations (mallocgc)", c.mallocgc),
            ("allocated bytes", c.alloc_bytes),
            ("goroutine exits", c.goroutine_exits),
            ("lost events", c.lost_events),
        ] {
            let _ = writeln!(out, "  {label:<32}{value:>14}");
        }
        let _ = writeln!(
            out,
            "\npending heap defers: {} in {} goroutine(s)",
            self.pending.heap_defers, self.pending.goroutines
        );
        if !self.sites.is_empty() {
            let _ = writeln!(out, "\n{:<44}{:>12}{:>12}{:>10}", "defer site", "registered", "released", "pending");
            for site in self.sites.iter().take(10) {
                let name = site.function.as_deref().unwrap_or(&site.pc);
                let name = truncate(name, 42);
                let _ = writeln!(
                    out,
                    "  {name:<42}{:>12}{:>12}{:>10}",
                    site.registered, site.released, site.pending
                );
            }
            if self.sites.len() > 10 {
                let _ = writeln!(out, "  ... {} more sites in the JSON report", self.sites.len() - 10);
            }
        }
        if !self.notes.is_empty() {
            let _ = writeln!(out, "\nnotes");
            for note in &self.notes {
                let _ = writeln!(out, "  - {note}");
            }
        }
        out
    }
}

/// `text` cut to `width` characters, with `…` marking the cut (keeps the end: the function
/// name and offset are the informative part).
fn truncate(text: &str, width: usize) -> String {
    let len = text.chars().count();
    if len <= width {
        return text.to_owned();
    }
    let tail: String = text.chars().skip(len - (width - 1)).collect();
    format!("…{tail}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregator::Event;
    use deferprobe_common::{DeferRegistered, EventHeader, EventKind};

    fn sample() -> Report {
        let mut agg = Aggregator::new();
        for _ in 0..3 {
            agg.apply(&Event::DeferRegistered(DeferRegistered {
                header: EventHeader { kind: EventKind::DeferRegistered as u32, cpu: 0, ktime_ns: 1, goid: 7 },
                closure: 0xc000_0000,
                caller_pc: 0x1000_0123,
                caller_sp: 0xc000_8000,
            }));
        }
        let (pending, sites) =
            pending_and_sites(&agg, 0x1000_0000, |pc| Some(format!("main.leaky.func1+{pc:#x}")));
        let mut counters = Counters::ZERO;
        counters.values[Counter::DeferProc as usize] = 3;
        counters.values[Counter::LostRingFull as usize] = 2;
        Report {
            schema_version: SCHEMA_VERSION,
            target: TargetReport { pid: 42, exe: "/srv/app".into(), go_version: "go1.27.3".into(), exit_code: None },
            duration_secs: 1.5,
            ended_by: EndReason::Duration,
            counts: Counts::from_counters(&counters, 1),
            lost: LostEvents { ring_buffer_full: 2, undecodable: 1, without_goroutine_id: 0 },
            probes: ProbesReport { attached: 20, layout_source: crate::layout::LayoutSource::Dwarf },
            pending,
            sites,
            notes: vec!["a note".into()],
        }
    }

    #[test]
    fn json_has_the_stable_keys() {
        let json: serde_json::Value = serde_json::from_str(&sample().to_json()).unwrap();
        assert_eq!(json["schema_version"], 1);
        assert_eq!(json["target"]["go_version"], "go1.27.3");
        assert_eq!(json["target"]["pid"], 42);
        assert_eq!(json["counts"]["deferproc"], 3);
        assert_eq!(json["counts"]["lost_events"], 3);
        for key in ["mapassign", "deferproc_stack", "deferreturn", "mallocgc", "alloc_bytes", "goroutine_exits"] {
            assert_eq!(json["counts"][key], 0, "{key}");
        }
        assert_eq!(json["pending"]["heap_defers"], 3);
        assert_eq!(json["sites"][0]["pc"], "0x123");
        assert_eq!(json["sites"][0]["pending"], 3);
        assert_eq!(json["ended_by"], "duration");
    }

    #[test]
    fn text_fits_80_columns() {
        let text = sample().to_text();
        assert!(text.contains("heap defers (deferproc)"));
        assert!(text.contains("main.leaky.func1+0x123"));
        for line in text.lines() {
            assert!(line.chars().count() <= 80, "{line:?}");
        }
    }

    #[test]
    fn truncate_keeps_the_end() {
        assert_eq!(truncate("abc", 5), "abc");
        assert_eq!(truncate("abcdefgh", 5), "…efgh");
    }
}
