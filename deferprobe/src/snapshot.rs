//! `deferprobe snapshot`: the runtime's own state, with no probes at all. Reads every
//! goroutine's pending `_defer` records and what their closures captured from the target's
//! memory (read-only, without stopping it), and reports them in the schema `run` uses:
//! pending totals, findings, goroutines, sites and notes. [`RuntimeReader`] is the part `run`
//! shares: everything a snapshot of one process needs, set up once.

use serde::Serialize;

use crate::{
    binary::{AllgVariables, ClosureTypes, GoBinary},
    cli::SnapshotArgs,
    error::{Error, Result},
    findings::{self, SnapshotLookups},
    layout::LayoutSource,
    output::{self, OutputFile},
    plan, pprof,
    report::{
        self, Finding, GoroutineReport, Location, PendingReport, PendingSections, SiteReport,
        SnapshotStats, TargetReport,
    },
    state::{AllgAddresses, MapLayout, ProcessMemory, Snapshot, SnapshotContext},
    target::{self, Target},
};

/// What the binary alone says about reading its runtime's state: struct offsets, where the
/// goroutine list is, each closure's layout, the map layout. Built before any process is
/// touched, like the probe plan.
pub struct RuntimeModel<'b> {
    pub binary: &'b GoBinary,
    pub closures: ClosureTypes<'b>,
    pub layout: crate::layout::RuntimeLayout,
    pub layout_source: LayoutSource,
    /// Why the binary's DWARF was not used although it has some ([`plan::SupportedLayout`]).
    pub layout_note: Option<String>,
    /// `runtime.allglen` / `allgptr` as ELF virtual addresses.
    allg: AllgVariables,
    maps: MapLayout,
}

impl<'b> RuntimeModel<'b> {
    pub fn new(binary: &'b GoBinary) -> Result<RuntimeModel<'b>> {
        let plan::SupportedLayout { layout, source: layout_source, note: layout_note } =
            plan::supported_layout(binary)?;
        let allg = binary.allg_variables().ok_or_else(|| {
            Error::unsupported(format!(
                "{}: runtime.allglen/allgptr not found (neither in .symtab nor in \
                 runtime.allgadd's code), so the goroutines can't be listed",
                binary.path().display()
            ))
        })?;
        let info = binary.build_info();
        Ok(RuntimeModel {
            binary,
            closures: binary.closure_types()?,
            layout,
            layout_source,
            layout_note,
            allg,
            maps: MapLayout::for_release(info.release.minor, &info.experiments),
        })
    }
}

/// A [`RuntimeModel`] connected to one process: takes its snapshots.
pub struct RuntimeReader<'m, 'b> {
    pub model: &'m RuntimeModel<'b>,
    pub memory: ProcessMemory,
    /// Runtime address − ELF virtual address ([`target::load_bias`]).
    pub bias: u64,
    /// Also read the call stacks of the goroutines holding pending records (`--pprof`).
    pub stacks: bool,
}

impl<'m, 'b> RuntimeReader<'m, 'b> {
    /// Checks that the memory of `pid`, loaded at `bias`, can be read at all, naming the
    /// capability when it can't.
    pub fn new(model: &'m RuntimeModel<'b>, pid: u32, bias: u64) -> Result<RuntimeReader<'m, 'b>> {
        let memory = ProcessMemory::new(pid);
        let (start, _) = model.binary.image_range();
        if let Err(err) = memory.check_access(start.wrapping_add(bias)) {
            return Err(match err.raw_os_error() {
                Some(libc::EPERM) | Some(libc::EACCES) => Error::permission(format!(
                    "cannot read the memory of pid {pid} ({err}): {}",
                    target::ptrace_advice()
                )),
                Some(libc::ESRCH) => Error::no_target(format!("pid {pid} exited")),
                _ => Error::internal(format!("cannot read the memory of pid {pid}: {err}")),
            });
        }
        Ok(RuntimeReader { model, memory, bias, stacks: false })
    }

    /// Snapshots also read the call stacks of the goroutines holding pending records.
    pub fn with_stacks(self, stacks: bool) -> Self {
        RuntimeReader { stacks, ..self }
    }

    /// What [`Snapshot::take`] needs besides memory.
    pub fn context(&self) -> SnapshotContext<'_, 'b> {
        let model = self.model;
        SnapshotContext {
            layout: model.layout,
            allg: AllgAddresses {
                allglen: model.allg.allglen.wrapping_add(self.bias),
                allgptr: model.allg.allgptr.wrapping_add(self.bias),
            },
            closures: &model.closures,
            bias: self.bias,
            maps: model.maps,
            stacks: self.stacks,
        }
    }

    pub fn take(&self) -> Result<Snapshot> {
        Snapshot::take(&self.memory, &self.context())
            .map_err(|err| Error::no_target(format!("pid {}: {err}", self.memory.pid())))
    }

    /// The pending sections of a report from `snapshot`.
    pub fn sections(
        &self,
        snapshot: &Snapshot,
        min_pending: u64,
        traced: Option<&findings::Traced<'_>>,
    ) -> PendingSections {
        let location = |pc: u64| Location::of_return_address(self.model.binary, pc);
        let lookups = SnapshotLookups {
            bias: self.bias,
            location: &location,
            defer_record_bytes: self.model.layout.defer_size,
            min_pending,
        };
        findings::from_snapshot(snapshot, &lookups, traced)
    }
}

/// Notes every report built from a snapshot carries.
pub fn snapshot_notes(snapshot: &Snapshot, sections: &PendingSections) -> Vec<String> {
    let mut notes = Vec::new();
    let dropped = snapshot.torn + snapshot.unreadable + snapshot.corrupt;
    if dropped > 0 {
        notes.push(format!(
            "{dropped} goroutines were left out of the snapshot: {} changed while read (3 \
             tries), {} could not be read, {} held no valid _defer chain; their records are \
             not counted",
            snapshot.torn, snapshot.unreadable, snapshot.corrupt
        ));
    }
    notes.extend(findings::capture_notes(sections));
    if !sections.findings.is_empty() {
        notes.push(
            "est_bytes is an estimate: _defer records, closures, map slots at Go's load \
             factor, slice capacities, string bytes and one pointee per pointer; data those \
             reach in turn is not included"
                .into(),
        );
    }
    notes
}

/// The JSON report of `snapshot` (schema version [`report::SCHEMA_VERSION`]).
#[derive(Clone, Debug, Serialize)]
pub struct SnapshotReport {
    pub schema_version: u32,
    /// "snapshot".
    pub kind: &'static str,
    pub target: TargetReport,
    pub snapshot: SnapshotStats,
    pub layout_source: LayoutSource,
    pub pending: PendingReport,
    pub findings: Vec<Finding>,
    pub goroutines: Vec<GoroutineReport>,
    pub sites: Vec<SiteReport>,
    pub notes: Vec<String>,
}

impl SnapshotReport {
    pub fn to_text(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let t = &self.target;
        let s = &self.snapshot;
        let _ = writeln!(out, "deferprobe snapshot");
        let _ = writeln!(out, "  target    pid {} ({})", t.pid, t.go_version);
        let _ = writeln!(out, "  exe       {}", report::truncate(&t.exe, 68));
        if let Some(module) = &t.go_module {
            let _ = writeln!(out, "  go module {}", report::truncate(module, 68));
        }
        let _ = writeln!(
            out,
            "  read      {} goroutines ({} alive) in {:.1} ms, target not stopped",
            s.goroutines_read, s.goroutines_alive, s.read_ms
        );
        report::write_pending(&mut out, &self.pending);
        report::write_findings(&mut out, &self.findings);
        if !self.sites.is_empty() {
            let _ = writeln!(out, "\n{:<68}{:>10}", "defer site", "pending");
            for site in self.sites.iter().take(10) {
                let name = report::site_name(site);
                let _ = writeln!(out, "  {:<66}{:>10}", report::truncate(&name, 64), site.pending);
            }
            report::write_more_sites(&mut out, self.sites.len());
        }
        report::write_notes(&mut out, &self.notes);
        out
    }
}

/// Runs `deferprobe snapshot`; returns the exit code.
pub fn snapshot(args: &SnapshotArgs) -> Result<i32> {
    let report_file =
        args.report.as_deref().map(|path| OutputFile::check("--report", path)).transpose()?;
    let pprof_file =
        args.pprof.as_deref().map(|path| OutputFile::check("--pprof", path)).transpose()?;
    let mut target = Target::running(args.pid)?;
    let binary = target.open_binary()?;
    let model = RuntimeModel::new(&binary)?;
    let bias = target::load_bias(&binary, target.pid);
    let reader = RuntimeReader::new(&model, target.pid, bias)?.with_stacks(pprof_file.is_some());
    let snapshot = reader.take()?;
    let sections = reader.sections(&snapshot, args.min_pending, None);
    let mut notes = target.notes.clone();
    notes.extend(snapshot_notes(&snapshot, &sections));
    if let Some(note) = &model.layout_note {
        tracing::warn!(%note, "the binary's DWARF is unusable: using the release table");
        notes.push(note.clone());
    }
    notes.push(
        "a snapshot has no probes: every pending record is \"pending at attach\", with no age, \
         and sites show no registrations or releases (deferprobe run adds them)"
            .into(),
    );
    let report = SnapshotReport {
        schema_version: report::SCHEMA_VERSION,
        kind: "snapshot",
        target: TargetReport {
            pid: target.pid,
            exe: target.exe_name.clone(),
            go_module: target.go_module.clone(),
            go_version: binary.build_info().version.clone(),
            exit_code: None,
            namespace: target.namespace.clone(),
        },
        snapshot: SnapshotStats::of(&snapshot),
        layout_source: model.layout_source,
        pending: sections.pending,
        findings: sections.findings,
        goroutines: sections.goroutines,
        sites: sections.sites,
        notes,
    };
    let json = serde_json::to_string_pretty(&report).expect("report serializes") + "\n";
    let text = match args.json {
        true => json.clone(),
        false => report.to_text(),
    };
    // The profile first: a failing stdout never costs it.
    let profile = pprof_file.map(|file| {
        let locate = |pc: u64| Location::of_return_address(&binary, pc.wrapping_sub(bias));
        file.write(&pprof::encode(&pprof::ProfileSource {
            snapshot: &snapshot,
            defer_record_bytes: model.layout.defer_size,
            locate: &locate,
            module: report.target.go_module.as_deref().unwrap_or(&report.target.exe),
            module_range: pprof::module_range(&binary, bias),
            registered: None,
            time_nanos: pprof::now_nanos(),
            duration_nanos: snapshot.ended_ns.saturating_sub(snapshot.started_ns) as i64,
            notes: &report.notes,
        }))
    });
    let delivered = output::deliver(&text, report_file.as_ref().map(|file| (file, json.as_str())));
    profile.unwrap_or(Ok(())).and(delivered)?;
    Ok(0)
}
