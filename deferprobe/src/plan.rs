//! The probe plan: every probe deferprobe attaches to a given Go binary, decided in one place
//! from one table of Go runtime functions and the binary's own analysis.
//!
//! [`RUNTIME_FUNCTIONS`] lists what to probe (symbol variants, the eBPF program that handles
//! them, which registers hold what, the releases that have them). [`ProbePlan::build`] resolves
//! it against a binary: addresses, file offsets, the attach offset just after each function's
//! stack check (decoded, never hardcoded), and the runtime struct offsets (DWARF, else the
//! per-release table). `inspect` prints the plan and `run` attaches exactly it.

use serde::Serialize;

use crate::{
    arch::{Arch, GoRegister},
    binary::{FrameCall, Function, GoBinary, HeapDeferFrameCalls, prologue::CountWhen},
    error::{Error, Result},
    layout::{self, GoRelease, LayoutSource, RuntimeLayout},
};

/// Oldest and newest Go releases deferprobe has verified probes and offsets for.
pub const OLDEST_SUPPORTED: GoRelease = GoRelease::new(1, 19);
pub const NEWEST_SUPPORTED: GoRelease = GoRelease::new(1, 27);

/// Groups of probes a user switches on and off together (`--probes`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum ProbeFamily {
    /// Heap and stack defer registrations, deferreturn in heap-defer frames, goroutine exits:
    /// what pending defers are built from.
    Defers,
    /// `runtime.mapassign*`: map writes, and where captured maps were first written.
    MapWrites,
    /// `runtime.mallocgc` and Go 1.27's size-specialized entries.
    Allocations,
}

impl ProbeFamily {
    pub const ALL: [ProbeFamily; 3] =
        [ProbeFamily::Defers, ProbeFamily::MapWrites, ProbeFamily::Allocations];

    /// As in the report and logs: `defers`, `map_writes`, `allocations`.
    pub fn name(self) -> &'static str {
        match self {
            ProbeFamily::Defers => "defers",
            ProbeFamily::MapWrites => "map_writes",
            ProbeFamily::Allocations => "allocations",
        }
    }
}

/// How allocations are traced (`--alloc-mode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum AllocationMode {
    /// Every allocation, exactly: `runtime.mallocgc` plus Go 1.27's size-specialized entries.
    #[default]
    All,
    /// Only the allocations the runtime samples for its memory profile
    /// (`runtime.profilealloc`, one per `runtime.MemProfileRate` bytes on average, 512 KiB by
    /// default): far fewer probe hits; counts are unsampled into estimates like pprof does.
    /// Needs memory profiling on in the program (the linker turns it off unless the program
    /// can reach `runtime.MemProfile`, e.g. through net/http/pprof).
    Profiled,
}

/// What to plan: which families, and how allocations are traced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlanOptions {
    pub families: Vec<ProbeFamily>,
    pub allocations: AllocationMode,
}

impl Default for PlanOptions {
    /// Every family; every allocation.
    fn default() -> PlanOptions {
        PlanOptions { families: ProbeFamily::ALL.to_vec(), allocations: AllocationMode::All }
    }
}

/// The eBPF programs in deferprobe-ebpf; [`ProbeProgram::name`] is the program's name there.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProbeProgram {
    MapAssign,
    DeferProc,
    DeferProcAt,
    DeferProcStack,
    DeferReturn,
    Mallocgc,
    MallocgcSizeClass,
    Goexit1,
    FatalPanic,
    ProfileAlloc,
}

impl ProbeProgram {
    pub const ALL: [ProbeProgram; 10] = [
        ProbeProgram::MapAssign,
        ProbeProgram::DeferProc,
        ProbeProgram::DeferProcAt,
        ProbeProgram::DeferProcStack,
        ProbeProgram::DeferReturn,
        ProbeProgram::Mallocgc,
        ProbeProgram::MallocgcSizeClass,
        ProbeProgram::Goexit1,
        ProbeProgram::FatalPanic,
        ProbeProgram::ProfileAlloc,
    ];

    /// Name of the program in the eBPF object.
    pub fn name(self) -> &'static str {
        match self {
            ProbeProgram::MapAssign => "mapassign",
            ProbeProgram::DeferProc => "deferproc",
            ProbeProgram::DeferProcAt => "deferprocat",
            ProbeProgram::DeferProcStack => "deferproc_stack",
            ProbeProgram::DeferReturn => "deferreturn",
            ProbeProgram::Mallocgc => "mallocgc",
            ProbeProgram::MallocgcSizeClass => "mallocgc_size_class",
            ProbeProgram::Goexit1 => "goexit1",
            ProbeProgram::FatalPanic => "fatalpanic",
            ProbeProgram::ProfileAlloc => "profilealloc",
        }
    }

    pub fn family(self) -> ProbeFamily {
        match self {
            ProbeProgram::DeferProc
            | ProbeProgram::DeferProcAt
            | ProbeProgram::DeferProcStack
            | ProbeProgram::DeferReturn
            | ProbeProgram::Goexit1
            | ProbeProgram::FatalPanic => ProbeFamily::Defers,
            ProbeProgram::MapAssign => ProbeFamily::MapWrites,
            ProbeProgram::Mallocgc
            | ProbeProgram::MallocgcSizeClass
            | ProbeProgram::ProfileAlloc => ProbeFamily::Allocations,
        }
    }

    /// For an allocation program, the `--alloc-mode` it belongs to.
    fn allocation_mode(self) -> Option<AllocationMode> {
        match self {
            ProbeProgram::Mallocgc | ProbeProgram::MallocgcSizeClass => Some(AllocationMode::All),
            ProbeProgram::ProfileAlloc => Some(AllocationMode::Profiled),
            _ => None,
        }
    }

    /// What a hit reports.
    pub fn reports(self) -> &'static str {
        match self {
            ProbeProgram::MapAssign => "count of map writes",
            ProbeProgram::DeferProc | ProbeProgram::DeferProcAt => {
                "count + event: heap defer (goid, closure, caller pc/sp)"
            }
            ProbeProgram::DeferProcStack => "count of stack defers",
            ProbeProgram::DeferReturn => "count + event: heap-defer frame returns (goid, frame)",
            ProbeProgram::Mallocgc => "count + bytes of allocations (not the size-class ones)",
            ProbeProgram::MallocgcSizeClass => {
                "count + bytes of the allocations mallocgc leaves to them"
            }
            ProbeProgram::Goexit1 => "count + event: goroutine exit (goid)",
            ProbeProgram::FatalPanic => "event: unrecovered panic, its defers all ran (goid)",
            ProbeProgram::ProfileAlloc => {
                "count + event: an allocation sampled for the mem profile"
            }
        }
    }

    /// Registers the program reads, by their role in Go's ABIInternal, and what they hold
    /// ([`crate::arch::Arch::register_name`] names them per architecture).
    pub fn registers(self) -> &'static [(GoRegister, &'static str)] {
        const G: (GoRegister, &str) = (GoRegister::G, "g (current goroutine)");
        const RET: (GoRegister, &str) = (GoRegister::ReturnAddress, "return address");
        const CALL_SP: (GoRegister, &str) = (GoRegister::Sp, "the calling frame's SP");
        const CALL_PC: (GoRegister, &str) =
            (GoRegister::Pc, "the call (+ its length: the return address)");
        match self {
            ProbeProgram::MapAssign => {
                &[(GoRegister::Arg(0), "map type"), (GoRegister::Arg(1), "map"), G, RET]
            }
            ProbeProgram::DeferProc => {
                &[(GoRegister::Arg(0), "closure (*funcval)"), G, CALL_SP, CALL_PC]
            }
            ProbeProgram::DeferProcAt => &[(GoRegister::Arg(0), "closure (*funcval)"), G, RET],
            ProbeProgram::DeferProcStack => {
                &[(GoRegister::Arg(0), "*_defer (on the caller's stack)")]
            }
            ProbeProgram::DeferReturn => &[G, CALL_SP, CALL_PC],
            ProbeProgram::Mallocgc => {
                &[(GoRegister::Arg(0), "size"), (GoRegister::Arg(1), "*_type")]
            }
            ProbeProgram::MallocgcSizeClass => &[(GoRegister::Arg(0), "size")],
            ProbeProgram::Goexit1 | ProbeProgram::FatalPanic => &[G],
            ProbeProgram::ProfileAlloc => {
                &[(GoRegister::Arg(2), "size (rounded to its size class)")]
            }
        }
    }

    /// The registers [`ProbeProgram::registers`] names that the probe's spot must leave as
    /// they were at the function's entry (the program counter is the probe's own address).
    pub fn read_registers(self) -> Vec<GoRegister> {
        self.registers()
            .iter()
            .map(|(register, _)| *register)
            .filter(|register| *register != GoRegister::Pc)
            .collect()
    }
}

/// How a table row names its functions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Symbols {
    /// One function with this exact name.
    Exact(&'static str),
    /// Go 1.26+/1.27 size-specialized malloc entries: `runtime.mallocgc<Kind>SC<n>` or
    /// `runtime.mallocgc<Kind>Size<n>` (not the `*SlowPath` helpers).
    SizeSpecializedMalloc,
    /// Not a function entry: every `CALL runtime.deferproc`
    /// ([`GoBinary::heap_defer_frame_calls`]). The probe's own address then gives the defer
    /// site (the return address is the CALL + 5), where a probe at deferproc's entry must read
    /// it from the stack: one user-memory read less per heap defer (about 120 ns a hit on the
    /// development VMs).
    DeferprocCalls,
    /// Not a function entry: every `CALL runtime.deferreturn` in the functions that own heap
    /// `_defer` records ([`GoBinary::heap_defer_frame_calls`]). Probing runtime.deferreturn
    /// itself would also trap on every return of every function with a stack defer, which
    /// releases nothing deferprobe tracks and, in a net/http + encoding/json service, is
    /// nearly all deferreturn calls (17 per request in `tests/go/benchsvc`, none of them heap).
    DeferreturnCallsInHeapDeferFrames,
}

/// One row of the table: functions, the program probing them, and from which release.
#[derive(Clone, Copy, Debug)]
struct RuntimeFunction {
    symbols: Symbols,
    program: ProbeProgram,
    since: GoRelease,
}

const fn row(symbol: &'static str, program: ProbeProgram) -> RuntimeFunction {
    RuntimeFunction { symbols: Symbols::Exact(symbol), program, since: OLDEST_SUPPORTED }
}

/// What deferprobe probes, per Go release. A function a binary doesn't contain was never
/// linked in (the program can't call it) and is listed as absent, not an error — except
/// mallocgc and goexit1, which every Go program has.
const RUNTIME_FUNCTIONS: &[RuntimeFunction] = &[
    row("runtime.mapassign", ProbeProgram::MapAssign),
    row("runtime.mapassign_fast32", ProbeProgram::MapAssign),
    row("runtime.mapassign_fast64", ProbeProgram::MapAssign),
    row("runtime.mapassign_fast64ptr", ProbeProgram::MapAssign),
    row("runtime.mapassign_faststr", ProbeProgram::MapAssign),
    RuntimeFunction {
        symbols: Symbols::DeferprocCalls,
        program: ProbeProgram::DeferProc,
        since: OLDEST_SUPPORTED,
    },
    // Called from the range-over-func body closures, which the compiler generates: few sites,
    // few calls; probed at its entry.
    RuntimeFunction {
        symbols: Symbols::Exact("runtime.deferprocat"),
        program: ProbeProgram::DeferProcAt,
        since: GoRelease::new(1, 22),
    },
    row("runtime.deferprocStack", ProbeProgram::DeferProcStack),
    RuntimeFunction {
        symbols: Symbols::DeferreturnCallsInHeapDeferFrames,
        program: ProbeProgram::DeferReturn,
        since: OLDEST_SUPPORTED,
    },
    row("runtime.mallocgc", ProbeProgram::Mallocgc),
    RuntimeFunction {
        symbols: Symbols::SizeSpecializedMalloc,
        program: ProbeProgram::MallocgcSizeClass,
        since: GoRelease::new(1, 26),
    },
    row("runtime.goexit1", ProbeProgram::Goexit1),
    // gopanic calls it once no deferred call recovered: the panicking goroutine's records have
    // all run (none through deferreturn), and the process is about to die. Nosplit: probed at
    // its entry (Go >= 1.21: `PUSHQ BP`, emulated; hit once in a program's life anyway).
    row("runtime.fatalpanic", ProbeProgram::FatalPanic),
    row("runtime.profilealloc", ProbeProgram::ProfileAlloc),
];

const ALWAYS_PRESENT: &[&str] = &["runtime.mallocgc", "runtime.goexit1", "runtime.profilealloc"];

/// One probe to attach.
#[derive(Clone, Debug, Serialize)]
pub struct PlannedProbe {
    pub program: ProbeProgram,
    pub symbol: String,
    /// Function entry (ELF virtual address).
    pub address: u64,
    pub size: u64,
    /// Where the probe goes, relative to `address`.
    pub attach_offset: u64,
    /// The instruction there (`jbe`, `push rbp`, `call`, ...), and whether the kernel emulates
    /// it (a hit costs about 0.7 µs on the development VMs) or single-steps it (10–20 µs).
    pub instruction: String,
    pub emulated: bool,
    /// Which hits count as calls: all, or on the stack check's JBE only those that fall
    /// through (the kernel program reads the flags), so a call is counted once even when
    /// `morestack` restarts the function.
    pub count_when: CountWhen,
    /// For a probe on a call instruction inside `symbol` rather than on its entry: the
    /// function called there (`runtime.deferproc`, `runtime.deferreturn`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub call_to: Option<&'static str>,
    /// File offset of the attach point, what the kernel's uprobe API takes.
    pub file_offset: u64,
}

/// Everything `run` attaches to one binary, and what `inspect` prints.
#[derive(Clone, Debug, Serialize)]
pub struct ProbePlan {
    /// The processor the binary is built for.
    pub arch: Arch,
    pub go_version: String,
    pub release: GoRelease,
    pub experiments: Vec<String>,
    pub pie: bool,
    pub layout: RuntimeLayout,
    pub layout_source: LayoutSource,
    /// Why the binary's DWARF was not used although it has some (corrupt, or not describing
    /// the runtime's structs), when the release table stood in: a note of the report.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub layout_note: Option<String>,
    pub probes: Vec<PlannedProbe>,
    /// The probe families planned (`--probes`; `inspect` plans them all).
    pub families: Vec<ProbeFamily>,
    /// How allocations are traced (`--alloc-mode`).
    pub allocations: AllocationMode,
    /// Runtime functions this binary doesn't contain (never linked in).
    pub absent: Vec<String>,
    /// With size-specialized malloc probed: the largest size mallocgc forwards to those
    /// entries (they count it, so the mallocgc probe must not). 0 without.
    pub size_specialized_max: u64,
    /// `[start, end)` of the executable's file-backed segments (ELF virtual addresses).
    pub image_range: (u64, u64),
}

impl ProbePlan {
    pub fn build(binary: &GoBinary, options: &PlanOptions) -> Result<ProbePlan> {
        let info = binary.build_info();
        let release = info.release;
        let path = binary.path().display();
        let SupportedLayout { layout, source: layout_source, note: layout_note } =
            supported_layout(binary)?;

        let mut probes = Vec::new();
        let mut absent = Vec::new();
        let planned = |row: &&RuntimeFunction| {
            row.since <= release
                && options.families.contains(&row.program.family())
                && row.program.allocation_mode().is_none_or(|mode| mode == options.allocations)
        };
        let mut frame_calls: Option<HeapDeferFrameCalls> = None;
        for row in RUNTIME_FUNCTIONS.iter().filter(planned) {
            let functions: Vec<Function> = match row.symbols {
                Symbols::DeferprocCalls | Symbols::DeferreturnCallsInHeapDeferFrames => {
                    let frame_calls = match &mut frame_calls {
                        Some(calls) => calls,
                        none => none.insert(binary.heap_defer_frame_calls()?),
                    };
                    if row.symbols == Symbols::DeferprocCalls
                        && binary.function(DEFERPROC).is_none()
                    {
                        absent.push(DEFERPROC.to_owned());
                    }
                    let (calls, callee) = match row.symbols {
                        Symbols::DeferprocCalls => (&frame_calls.deferproc, DEFERPROC),
                        _ => (&frame_calls.deferreturn, DEFERRETURN),
                    };
                    for call in calls {
                        probes.push(plan_call_probe(binary, row.program, call, callee)?);
                    }
                    continue;
                }
                Symbols::Exact(name) => binary.function(name).into_iter().collect(),
                Symbols::SizeSpecializedMalloc => binary
                    .functions_with_prefix("runtime.mallocgc")
                    .into_iter()
                    .filter(|f| is_size_specialized_malloc(&f.name))
                    .collect(),
            };
            if functions.is_empty() {
                if let Symbols::Exact(name) = row.symbols {
                    if ALWAYS_PRESENT.contains(&name) {
                        return Err(Error::unsupported(format!(
                            "{path}: no {name} symbol; not a complete Go program?"
                        )));
                    }
                    absent.push(name.to_owned());
                }
                continue;
            }
            for function in functions {
                probes.push(plan_probe(binary, row.program, function)?);
            }
        }
        let size_specialized_max =
            match probes.iter().any(|p| p.program == ProbeProgram::MallocgcSizeClass) {
                true => size_specialized_max(release),
                false => 0,
            };
        let mut families = options.families.clone();
        families.sort();
        families.dedup();
        Ok(ProbePlan {
            arch: binary.arch(),
            go_version: info.version.clone(),
            release,
            experiments: info.experiments.clone(),
            pie: binary.is_pie(),
            layout,
            layout_source,
            layout_note,
            probes,
            families,
            allocations: options.allocations,
            absent,
            size_specialized_max,
            image_range: binary.image_range(),
        })
    }

    /// Probes handled by `program`.
    pub fn probes_of(&self, program: ProbeProgram) -> impl Iterator<Item = &PlannedProbe> {
        self.probes.iter().filter(move |p| p.program == program)
    }
}

/// The runtime struct offsets deferprobe reads a binary's runtime with, where they came from,
/// and, when the binary's DWARF could not be used, why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SupportedLayout {
    pub layout: RuntimeLayout,
    pub source: LayoutSource,
    /// "the binary's DWARF could not be used (...)": for the report's notes.
    pub note: Option<String>,
}

/// The runtime struct offsets of a binary whose Go release deferprobe supports.
pub fn supported_layout(binary: &GoBinary) -> Result<SupportedLayout> {
    let info = binary.build_info();
    let release = info.release;
    if release < OLDEST_SUPPORTED || release > NEWEST_SUPPORTED {
        return Err(Error::unsupported(format!(
            "{}: built with {}, but deferprobe supports Go {OLDEST_SUPPORTED} to \
             {NEWEST_SUPPORTED}",
            binary.path().display(),
            info.version
        )));
    }
    runtime_layout(binary, release)
}

/// The runtime struct offsets: from DWARF when the binary has it, else the built-in table for
/// `release`; a release the table lacks is refused, never guessed.
fn runtime_layout(binary: &GoBinary, release: GoRelease) -> Result<SupportedLayout> {
    choose_layout(binary, release, binary.runtime_layout_from_dwarf())
}

/// [`runtime_layout`] from what reading the DWARF gave. DWARF that can't be read or doesn't
/// describe the structs never refuses a binary the table covers: the table stands in, and the
/// note says why.
fn choose_layout(
    binary: &GoBinary,
    release: GoRelease,
    from_dwarf: std::result::Result<Option<RuntimeLayout>, crate::binary::BinaryError>,
) -> Result<SupportedLayout> {
    let table = layout::for_release(binary.arch(), release);
    let version = &binary.build_info().version;
    match (from_dwarf, table) {
        (Ok(Some(layout)), _) => {
            Ok(SupportedLayout { layout, source: LayoutSource::Dwarf, note: None })
        }
        (Ok(None), Some(layout)) => {
            Ok(SupportedLayout { layout, source: LayoutSource::ReleaseTable, note: None })
        }
        (Err(err), Some(layout)) => Ok(SupportedLayout {
            layout,
            source: LayoutSource::ReleaseTable,
            note: Some(format!(
                "the binary's DWARF could not be used ({err}): the runtime struct offsets come \
                 from deferprobe's built-in table for Go {release} (layout_source \
                 \"release_table\")"
            )),
        }),
        (Ok(None), None) => Err(Error::unsupported(format!(
            "{}: built with {version}, which has no DWARF and deferprobe has no built-in struct \
             offsets for Go {release}; a build without -ldflags=-s/-w keeps DWARF",
            binary.path().display(),
        ))),
        (Err(err), None) => Err(Error::unsupported(format!(
            "{err}; and deferprobe has no built-in struct offsets for Go {release} ({version}) \
             to use instead"
        ))),
    }
}

fn plan_probe(
    binary: &GoBinary,
    program: ProbeProgram,
    function: Function,
) -> Result<PlannedProbe> {
    let spot = binary.probe_spot(&function, &program.read_registers())?;
    let file_offset = binary.file_offset(function.address + spot.offset)?;
    Ok(PlannedProbe {
        program,
        symbol: function.name,
        address: function.address,
        size: function.size,
        attach_offset: spot.offset,
        instruction: spot.instruction,
        emulated: spot.emulated,
        count_when: spot.count_when,
        call_to: None,
        file_offset,
    })
}

const DEFERPROC: &str = "runtime.deferproc";
const DEFERRETURN: &str = "runtime.deferreturn";

/// A probe on a direct call of `callee` (`CALL rel32`, `BL`: the kernel emulates both rather
/// than single-stepping them) inside `call.function`.
fn plan_call_probe(
    binary: &GoBinary,
    program: ProbeProgram,
    call: &FrameCall,
    callee: &'static str,
) -> Result<PlannedProbe> {
    Ok(PlannedProbe {
        program,
        file_offset: binary.file_offset(call.call_address)?,
        attach_offset: call.call_address - call.function.address,
        symbol: call.function.name.clone(),
        address: call.function.address,
        size: call.function.size,
        instruction: binary.arch().call_mnemonic().into(),
        emulated: true,
        count_when: CountWhen::Always,
        call_to: Some(callee),
    })
}

/// The sizes `runtime.mallocgc` hands to the size-specialized entries: every size from 1 to
/// this (`size < len(mallocNoScanTable)`: 80 bytes on Go 1.27; on 1.26 with
/// `GOEXPERIMENT=sizespecializedmalloc`, `heapBitsInSpan(size)`: 512 bytes). The e2e test
/// `size_specialized_malloc_counts_like_the_generic_build` checks the counts stay exact.
fn size_specialized_max(release: GoRelease) -> u64 {
    if release >= GoRelease::new(1, 27) { 80 } else { 512 }
}

/// `runtime.mallocgcTinySC2`, `runtime.mallocgcSmallScanNoHeaderSC5`, `runtime.mallocgcTinySize8`
/// (1.26 experiment), but not `runtime.mallocgcSmallNoScanSlowPath` or `runtime.mallocgc`.
fn is_size_specialized_malloc(name: &str) -> bool {
    let Some(rest) = name.strip_prefix("runtime.mallocgc") else { return false };
    let digits = rest.trim_end_matches(|c: char| c.is_ascii_digit());
    digits.len() < rest.len() && (digits.ends_with("SC") || digits.ends_with("Size"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::binary::testbin::{self, Program, TempFile, Variant};

    /// Every register a program says it reads is a register on each architecture (never an
    /// argument passed on the stack), and all but the program counter are left for the
    /// placement to check.
    #[test]
    fn read_registers_cover_what_programs_read() {
        for program in ProbeProgram::ALL {
            for arch in Arch::ALL {
                for (register, _) in program.registers() {
                    assert_ne!(arch.register_name(*register), "stack", "{program:?} {arch}");
                }
            }
            let named =
                program.registers().iter().filter(|(name, _)| *name != GoRegister::Pc).count();
            assert_eq!(program.read_registers().len(), named, "{program:?}");
        }
    }

    /// Go 1.19 (no deferprocat, the older `_defer`) to 1.27, plain and stripped, PIE and cgo.
    #[test]
    fn plans_for_every_release_and_variant() {
        for toolchain in testbin::toolchains() {
            for program in Program::ALL {
                for variant in Variant::ALL {
                    let what = format!("go{} {program:?} {variant:?}", toolchain.version);
                    let binary =
                        GoBinary::open(&testbin::build(&toolchain, program, variant)).unwrap();
                    let plan = ProbePlan::build(&binary, &PlanOptions::default()).unwrap();
                    assert_eq!(plan.release.minor, toolchain.minor(), "{what}");
                    assert_eq!(plan.pie, variant.pie(), "{what}");
                    let source = match variant.stripped() {
                        true => LayoutSource::ReleaseTable,
                        false => LayoutSource::Dwarf,
                    };
                    assert_eq!(plan.layout_source, source, "{what}");
                    assert_eq!(
                        Some(plan.layout),
                        layout::for_release(plan.arch, plan.release),
                        "{what}"
                    );
                    let symbols: Vec<&str> =
                        plan.probes.iter().map(|p| p.symbol.as_str()).collect();
                    let probe = plan.probes.iter().find(|p| p.symbol == "runtime.mallocgc");
                    assert!(
                        probe
                            .is_some_and(|p| p.instruction == "jbe"
                                && p.count_when == CountWhen::FallsThrough),
                        "{what}: {probe:?}"
                    );
                    // Every probe on an instruction the kernel emulates, on every release.
                    let stepped: Vec<&PlannedProbe> =
                        plan.probes.iter().filter(|p| !p.emulated).collect();
                    assert!(stepped.is_empty(), "{what}: single-stepped probes {stepped:#?}");
                    // deferproc is probed on each CALL of it, deferreturn on each CALL in a
                    // function with a heap defer: on the 5-byte CALL, not at the callee.
                    for (program, callee) in [
                        (ProbeProgram::DeferProc, "runtime.deferproc"),
                        (ProbeProgram::DeferReturn, "runtime.deferreturn"),
                    ] {
                        let calls: Vec<&PlannedProbe> = plan.probes_of(program).collect();
                        for site in binary.heap_defer_sites().unwrap() {
                            let function = &site.location.function;
                            assert!(
                                calls.iter().any(|p| p.symbol == *function),
                                "{what}: no {callee} probe in {function}: {calls:#?}"
                            );
                        }
                        assert!(!symbols.contains(&callee), "{what}");
                        for probe in calls {
                            assert_eq!(probe.call_to, Some(callee), "{what}");
                            let code =
                                binary.function_code(&binary.function_at(probe.address).unwrap());
                            let at = probe.attach_offset as usize;
                            let rel = i32::from_le_bytes(
                                code.unwrap()[at + 1..at + 5].try_into().unwrap(),
                            );
                            let target = (probe.address + probe.attach_offset + 5)
                                .wrapping_add_signed(rel.into());
                            assert_eq!(
                                Some(target),
                                binary.function(callee).map(|f| f.address),
                                "{what}"
                            );
                        }
                    }
                    // Every heap defer site has its probe (deferprocat's is at its entry).
                    let sites = binary.heap_defer_sites().unwrap();
                    for site in sites.iter().filter(|site| site.callee == "runtime.deferproc") {
                        let probe = plan
                            .probes_of(ProbeProgram::DeferProc)
                            .find(|p| p.address + p.attach_offset == site.call_address);
                        assert!(probe.is_some(), "{what}: {site:?} unprobed");
                    }
                    if toolchain.minor() < 22 {
                        assert!(!symbols.contains(&"runtime.deferprocat"), "{what}");
                        assert!(!plan.absent.contains(&"runtime.deferprocat".to_owned()), "{what}");
                    }
                }
            }
        }
    }

    /// A copy of the first toolchain's stripped workload claiming to be built by Go `1.<minor>`.
    fn claiming_release(minor: u32) -> TempFile {
        let toolchain = &testbin::toolchains()[0];
        let path = testbin::build(toolchain, Program::Workload, Variant::Stripped);
        let real = format!("go{}", toolchain.version);
        let prefix = format!("go1.{minor}.");
        let fake = format!("{prefix}{}", "0".repeat(real.len() - prefix.len()));
        TempFile::patched(&path, |bytes| {
            testbin::replace_in_section(bytes, ".go.buildinfo", real.as_bytes(), fake.as_bytes());
        })
    }

    #[test]
    fn unsupported_releases_are_refused() {
        for minor in [18, NEWEST_SUPPORTED.minor + 1] {
            let file = claiming_release(minor);
            let binary = GoBinary::open(file.path()).unwrap();
            let err = ProbePlan::build(&binary, &PlanOptions::default()).unwrap_err();
            let expected = format!(
                "{}: built with go1.{minor}.0, but deferprobe supports Go 1.19 to 1.27",
                file.path().display()
            );
            assert!(err.to_string().starts_with(&expected), "{err}");
            assert_eq!(err.kind, crate::error::ErrorKind::Unsupported);
        }
    }

    #[test]
    fn release_without_dwarf_or_table_is_refused() {
        let toolchain = &testbin::toolchains()[0];
        let stripped = testbin::build(toolchain, Program::Workload, Variant::Stripped);
        let binary = GoBinary::open(&stripped).unwrap();
        let err = runtime_layout(&binary, GoRelease::new(1, 18)).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "{}: built with go{}, which has no DWARF and deferprobe has no built-in struct \
                 offsets for Go 1.18; a build without -ldflags=-s/-w keeps DWARF",
                stripped.display(),
                toolchain.version
            )
        );
        let plain = testbin::build(toolchain, Program::Workload, Variant::Plain);
        let binary = GoBinary::open(&plain).unwrap();
        let chosen = runtime_layout(&binary, GoRelease::new(1, 18)).unwrap();
        assert_eq!((chosen.source, chosen.note), (LayoutSource::Dwarf, None));
    }

    /// A real binary with random bytes over its `.debug_info` (compressed, as Go writes it) or
    /// `.debug_abbrev`: the release table stands in and the note names the DWARF problem. DWARF
    /// that doesn't describe the structs does the same; only a release the table lacks is
    /// still refused.
    #[test]
    fn unusable_dwarf_falls_back_to_the_release_table() {
        for toolchain in testbin::toolchains() {
            let what = format!("go{}", toolchain.version);
            let path = testbin::build(&toolchain, Program::Workload, Variant::Plain);
            for (section, from) in [(".debug_info", 0), (".debug_info", 40), (".debug_abbrev", 0)] {
                let broken = TempFile::patched(&path, |bytes| {
                    testbin::scramble_section(bytes, section, from)
                });
                let binary = GoBinary::open(broken.path()).unwrap();
                let problem = binary.runtime_layout_from_dwarf().unwrap_err().to_string();
                let plan = ProbePlan::build(&binary, &PlanOptions::default()).unwrap();
                assert_eq!(plan.layout_source, LayoutSource::ReleaseTable, "{what} {section}");
                assert_eq!(
                    Some(plan.layout),
                    layout::for_release(plan.arch, plan.release),
                    "{what}"
                );
                let note = plan.layout_note.unwrap_or_else(|| panic!("{what}: no note"));
                assert_eq!(
                    note,
                    format!(
                        "the binary's DWARF could not be used ({problem}): the runtime struct \
                         offsets come from deferprobe's built-in table for Go {} (layout_source \
                         \"release_table\")",
                        plan.release
                    )
                );
                assert!(problem.contains("corrupt DWARF"), "{what} {section}: {problem}");
                let model = crate::snapshot::RuntimeModel::new(&binary).unwrap();
                assert_eq!(model.layout_source, LayoutSource::ReleaseTable, "{what}");
                assert_eq!(model.layout_note.as_deref(), Some(note.as_str()), "{what}");

                let err = runtime_layout(&binary, GoRelease::new(1, 18)).unwrap_err();
                assert_eq!(
                    err.to_string(),
                    format!(
                        "{problem}; and deferprobe has no built-in struct offsets for Go 1.18 \
                         (go{}) to use instead",
                        toolchain.version
                    )
                );
                assert_eq!(err.kind, crate::error::ErrorKind::Unsupported);
            }
            let binary = GoBinary::open(&path).unwrap();
            let incomplete = crate::binary::BinaryError::IncompleteDwarf {
                path: path.clone(),
                what: "runtime._defer".to_owned(),
            };
            let chosen = choose_layout(&binary, binary.build_info().release, Err(incomplete));
            let chosen = chosen.unwrap();
            assert_eq!(chosen.source, LayoutSource::ReleaseTable, "{what}");
            assert!(
                chosen.note.unwrap().contains("DWARF does not describe runtime._defer"),
                "{what}"
            );
        }
    }

    #[test]
    fn size_specialized_malloc_names() {
        for yes in [
            "runtime.mallocgcTinySC2",
            "runtime.mallocgcSmallNoScanSC7",
            "runtime.mallocgcSmallScanNoHeaderSC1",
            "runtime.mallocgcTinySize15",
            "runtime.mallocgcSmallScanNoHeaderSize512",
        ] {
            assert!(is_size_specialized_malloc(yes), "{yes}");
        }
        for no in [
            "runtime.mallocgc",
            "runtime.mallocgcTinySlowPath",
            "runtime.mallocgcSmallNoscan",
            "runtime.mallocgcLarge",
            "runtime.mallocgcSC",
            "runtime.mapassign",
        ] {
            assert!(!is_size_specialized_malloc(no), "{no}");
        }
    }

    #[test]
    fn every_program_has_a_table_row() {
        for program in ProbeProgram::ALL {
            assert!(RUNTIME_FUNCTIONS.iter().any(|row| row.program == program), "{program:?}");
        }
    }
}
