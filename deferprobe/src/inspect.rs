//! `deferprobe inspect BINARY`: the static analysis of a Go binary (release, struct offsets,
//! the probe plan, the heap-defer sites) as text or JSON, without running anything.

use std::{fmt::Write as _, path::Path};

use serde::Serialize;

use crate::{
    binary::{ClosureTypes, DeferSite, GoBinary, MemoryProfiling, prologue::CountWhen},
    error::Result,
    layout::{self, RuntimeLayout},
    plan::{PlanOptions, ProbePlan},
    state::capture_kind,
};

/// A heap defer site and what its closure captures.
#[derive(Serialize)]
struct SiteInspection<'a> {
    #[serde(flatten)]
    site: &'a DeferSite,
    /// The deferred closure, from the code that builds it; null when the code doesn't say
    /// (a closure passed in from elsewhere).
    closure: Option<ClosureInspection>,
}

#[derive(Serialize)]
struct ClosureInspection {
    /// The closure's function (e.g. `main.leak.func1`).
    function: String,
    /// The closure struct type as the binary names it; null for a static closure.
    #[serde(rename = "type")]
    type_name: Option<String>,
    /// Its captured variables, in field order (empty: it captures nothing).
    captures: Vec<FieldInspection>,
}

#[derive(Serialize)]
struct FieldInspection {
    name: String,
    #[serde(rename = "type")]
    type_name: String,
    kind: &'static str,
    offset: u64,
}

fn closure_of(
    binary: &GoBinary,
    closures: &ClosureTypes<'_>,
    site: &DeferSite,
) -> Option<ClosureInspection> {
    let deferred = closures.deferred_at(site.return_address)?;
    let function = binary.function_at(deferred.code).map_or_else(|| "?".to_owned(), |f| f.name);
    let (type_name, captures) = match &deferred.layout {
        None => (None, Vec::new()),
        Some(layout) => (
            Some(layout.type_name.clone()),
            layout
                .captures
                .iter()
                .map(|field| FieldInspection {
                    name: field.name.clone(),
                    type_name: field.typ.name.clone(),
                    kind: capture_kind(closures.types(), &field.typ),
                    offset: field.offset,
                })
                .collect(),
        ),
    };
    Some(ClosureInspection { function, type_name, captures })
}

#[derive(Serialize)]
struct Inspection<'a> {
    path: String,
    module_path: Option<&'a str>,
    main_package: Option<&'a str>,
    plan: &'a ProbePlan,
    /// The built-in struct offsets for this Go release (what `plan.layout` would be without
    /// DWARF), checked against DWARF by `cargo xtask layout-table`.
    release_table_layout: Option<RuntimeLayout>,
    heap_defer_sites: Vec<SiteInspection<'a>>,
    /// Whether `--alloc-mode profiled` can work: the runtime's allocation sampling as linked.
    memory_profiling: MemoryProfiling,
}

/// Returns what `inspect` prints.
pub fn inspect(path: &Path, json: bool) -> Result<String> {
    let binary = GoBinary::open(path)?;
    let plan = ProbePlan::build(&binary, &PlanOptions::default())?;
    let memory_profiling = binary.memory_profiling();
    let sites = binary.heap_defer_sites()?;
    let closures = binary.closure_types_for(&sites);
    let inspected: Vec<SiteInspection> = sites
        .iter()
        .map(|site| SiteInspection { site, closure: closure_of(&binary, &closures, site) })
        .collect();
    let info = binary.build_info();
    if json {
        let inspection = Inspection {
            path: path.display().to_string(),
            module_path: info.module_path.as_deref(),
            main_package: info.main_package.as_deref(),
            plan: &plan,
            release_table_layout: layout::for_release(plan.arch, plan.release),
            heap_defer_sites: inspected,
            memory_profiling,
        };
        return Ok(serde_json::to_string_pretty(&inspection).expect("serializes") + "\n");
    }
    let mut out = String::new();
    let _ = writeln!(out, "{}", path.display());
    let _ = writeln!(out, "  go release   {}", plan.go_version);
    let _ = writeln!(out, "  arch         {}", plan.arch);
    if !plan.experiments.is_empty() {
        let _ = writeln!(out, "  experiments  {}", plan.experiments.join(","));
    }
    if let Some(module) = &info.module_path {
        let _ = writeln!(out, "  module       {module}");
    }
    if let Some(main) = &info.main_package {
        let _ = writeln!(out, "  main package {main}");
    }
    let _ = writeln!(out, "  pie          {}", if plan.pie { "yes" } else { "no" });
    let profiling = match memory_profiling {
        MemoryProfiling::Enabled { initial_rate, .. } => {
            format!("on, MemProfileRate {initial_rate} (--alloc-mode profiled works)")
        }
        MemoryProfiling::Disabled => "off (turned off by the linker)".to_owned(),
        MemoryProfiling::Unknown => "unknown (no symbol table)".to_owned(),
    };
    let _ = writeln!(out, "  mem profile  {profiling}");
    let l = &plan.layout;
    let _ = writeln!(
        out,
        "  offsets      g.goid={} g.m={} g._defer={} m.curg={} _defer size={} ({:?})",
        l.g_goid, l.g_m, l.g_defer, l.m_curg, l.defer_size, plan.layout_source
    );
    if let Some(note) = &plan.layout_note {
        let _ = writeln!(out, "  note         {note}");
    }
    let _ = writeln!(out, "\nprobe plan ({} probes)", plan.probes.len());
    let _ =
        writeln!(out, "  {:<28} {:>9} {:>6}  {:<9} probe", "function", "address", "attach", "on");
    let mut on_calls = std::collections::BTreeMap::new();
    for probe in &plan.probes {
        if let Some(callee) = probe.call_to {
            on_calls.insert(probe.program.name(), callee);
        }
        // `*`: single-stepped by the kernel, not emulated.
        let on = format!("{}{}", probe.instruction, if probe.emulated { "" } else { "*" });
        let _ = writeln!(
            out,
            "  {:<28} {:>#9x} {:>+6}  {:<9} {}",
            fit_left(&probe.symbol, 28),
            probe.address,
            probe.attach_offset,
            on,
            probe.program.name(),
        );
    }
    let stepped = plan.probes.iter().filter(|probe| !probe.emulated).count();
    let _ = match stepped {
        0 => writeln!(out, "  every probe is on an instruction the kernel emulates"),
        n => writeln!(out, "  *: {n} probes the kernel single-steps (10-20 µs a hit here)"),
    };
    if let Some(check) =
        plan.probes.iter().find(|probe| probe.count_when == CountWhen::FallsThrough)
    {
        let branch = &check.instruction;
        let _ = writeln!(out, "  {branch}: the stack check's; a hit counts when it falls through");
    }
    for (program, callee) in on_calls {
        let call = plan.arch.call_mnemonic().to_uppercase();
        let _ = writeln!(out, "  {program} probes sit on the functions' {call}s of {callee}");
    }
    if !plan.absent.is_empty() {
        let _ = writeln!(out, "\nnot in this binary (never called): {}", plan.absent.join(", "));
    }
    let _ = writeln!(out, "\nprograms");
    let mut programs: Vec<_> = plan.probes.iter().map(|p| p.program).collect();
    programs.dedup();
    for program in programs {
        let registers: Vec<String> = program
            .registers()
            .iter()
            .map(|(reg, what)| format!("{}={what}", plan.arch.register_name(*reg)))
            .collect();
        let _ = writeln!(out, "  {:<20} {}", program.name(), program.reports());
        for (index, register) in registers.iter().enumerate() {
            let label = if index == 0 { "reads" } else { "" };
            let _ = writeln!(out, "  {:<20} {label:<5} {register}", "");
        }
    }
    let _ = writeln!(
        out,
        "\nheap defer sites ({}: defers that allocate a record each run)",
        sites.len()
    );
    for SiteInspection { site, closure } in &inspected {
        let location = &site.location;
        let _ = writeln!(out, "  {}", location.function);
        let _ = writeln!(
            out,
            "      {}:{} (return address {:#x})",
            location.file, location.line, site.return_address
        );
        match closure {
            None => {
                let _ = writeln!(out, "      closure unknown (not built next to the defer)");
            }
            Some(closure) if closure.captures.is_empty() => {
                let _ = writeln!(out, "      {} captures nothing", closure.function);
            }
            Some(closure) => {
                let _ = writeln!(out, "      {} captures", closure.function);
                for field in &closure.captures {
                    let _ = writeln!(
                        out,
                        "        {} {} ({})",
                        field.name, field.type_name, field.kind
                    );
                }
            }
        }
    }
    Ok(out)
}

/// `text` in at most `width` characters: its end, after "…", when it is longer (the end of a
/// Go function name says most).
fn fit_left(text: &str, width: usize) -> String {
    let count = text.chars().count();
    match count > width {
        true => std::iter::once('…').chain(text.chars().skip(count - width + 1)).collect(),
        false => text.to_owned(),
    }
}
