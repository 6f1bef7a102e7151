//! Static analysis of the traced Go executable (linux/amd64 or linux/arm64 ELF): build info,
//! function symbols, pc → source line, virtual address → file offset for uprobes, probe
//! placement in machine code, heap-defer call sites, and runtime struct offsets from DWARF.
//! [`GoBinary`] memory-maps the file and owns the ELF-level parts; the submodules own one
//! format each, and `isa` (with `amd64`, `arm64`) the machine code of each architecture.

pub(crate) mod amd64;
pub(crate) mod arm64;
mod buildinfo;
mod closures;
mod dwarf;
mod error;
// Also built for tests: its regression tests keep what fuzzing found.
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod gotypes;
pub(crate) mod isa;
mod pclntab;
pub mod prologue;
mod symbols;
#[cfg(test)]
pub(crate) mod testbin;
mod variables;

use std::{
    fs::File,
    path::{Path, PathBuf},
    sync::{Mutex, OnceLock},
};

use memmap2::Mmap;
use object::{
    Architecture, Endianness, FileKind, Object as _, ObjectSection as _, elf,
    read::elf::{ElfFile32, ElfFile64, FileHeader as _, ProgramHeader as _},
};

pub use buildinfo::BuildInfo;
pub use closures::{CapturedField, ClosureLayout, ClosureTypes, DeferredClosure};
pub use error::BinaryError;
pub use pclntab::SourceLocation;
pub use prologue::ProbeOffset;
pub use symbols::{Function, FunctionSource};
pub use variables::AllgVariables;

use crate::{arch::Arch, layout::RuntimeLayout};
use gotypes::{TypeReader, TypesRange};
use pclntab::Pclntab;
use serde::Serialize;
use symbols::FunctionTable;

/// The runtime functions a `defer` inside a loop calls (heap `_defer` records):
/// `runtime.deferproc`, and from Go 1.22 `runtime.deferprocat` (range-over-func bodies).
const HEAP_DEFER_FUNCTIONS: [&str; 2] = ["runtime.deferproc", "runtime.deferprocat"];

/// The runtime functions whose callers own heap `_defer` records: the frame that calls
/// `runtime.deferproc` (a `defer` in a loop), and the frame that calls `runtime.deferrangefunc`
/// (Go 1.22+: the function around a range-over-func loop whose body defers through
/// `runtime.deferprocat`; the records belong to that outer frame).
const HEAP_DEFER_OWNER_MARKERS: [&str; 2] = ["runtime.deferproc", "runtime.deferrangefunc"];

/// A `CALL rel32` instruction in a function that owns heap `_defer` records, where a probe sits
/// instead of at the callee's entry ([`GoBinary::heap_defer_frame_calls`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrameCall {
    /// The function containing the call.
    pub function: Function,
    /// The CALL instruction (ELF virtual address).
    pub call_address: u64,
}

/// The calls in the frames that own heap `_defer` records that deferprobe probes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HeapDeferFrameCalls {
    /// Every `CALL runtime.deferproc`: a heap record registered, at a site the probe knows
    /// from where it sits (no return address to read).
    pub deferproc: Vec<FrameCall>,
    /// Every `CALL runtime.deferreturn` in those frames: where a frame runs its records on a
    /// normal return, and where the runtime resumes it after a `recover`.
    pub deferreturn: Vec<FrameCall>,
}

/// A Go executable, memory-mapped and analysed once by [`GoBinary::open`].
pub struct GoBinary {
    path: PathBuf,
    map: Mmap,
    arch: Arch,
    pie: bool,
    /// File-backed parts of the PT_LOAD segments.
    segments: Vec<Segment>,
    build_info: BuildInfo,
    functions: FunctionTable,
    pclntab: Pclntab,
    /// `moduledata.types`/`etypes`, found on first use.
    types_range: OnceLock<Option<TypesRange>>,
}

/// A call of `runtime.deferproc` or `runtime.deferprocat` outside package runtime: a `defer`
/// whose records go on the heap (one per execution, typically inside a loop).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DeferSite {
    /// The function containing the call and the file and line of the `defer` statement.
    #[serde(flatten)]
    pub location: SourceLocation,
    /// `runtime.deferproc` or `runtime.deferprocat`.
    pub callee: String,
    /// The CALL instruction (ELF virtual address).
    pub call_address: u64,
    /// The address after the CALL: the return address the deferproc probe reports as the caller
    /// pc (the report's `sites[].pc`).
    pub return_address: u64,
}

/// Memory profiling as linked into a Go binary ([`GoBinary::memory_profiling`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum MemoryProfiling {
    /// The linker turned it off: `runtime.profilealloc` is never called.
    Disabled,
    /// On: one allocation sampled per `initial_rate` bytes on average, unless the program
    /// changes `runtime.MemProfileRate` (the variable at `rate_variable`).
    Enabled { initial_rate: u64, rate_variable: u64 },
    /// The binary has no `.symtab` to tell.
    Unknown,
}

#[derive(Debug)]
struct Segment {
    vaddr: u64,
    offset: u64,
    filesz: u64,
    writable: bool,
}

impl GoBinary {
    pub fn open(path: &Path) -> Result<GoBinary, BinaryError> {
        let read_error = |source| BinaryError::Read { path: path.to_owned(), source };
        let file = File::open(path).map_err(read_error)?;
        // SAFETY: a read-only private mapping. Like every reader of a mapped file we rely on it
        // not being truncated underneath us (executables are replaced, not rewritten in place).
        let map = unsafe { Mmap::map(&file) }.map_err(read_error)?;
        let arch = check_platform(path, &map)?;
        let elf = parse_elf(path, &map)?;
        let endian = elf.endian();
        let segments = load_segments(path, &elf, map.len())?;
        let pie = elf.elf_header().e_type(endian) == elf::ET_DYN;
        let build_info = BuildInfo::read(path, &elf)?;
        let pclntab = Pclntab::read(path, &elf, &map)?;
        let functions = FunctionTable::read(path, &elf, &pclntab, &map)?;
        Ok(GoBinary {
            path: path.to_owned(),
            map,
            arch,
            pie,
            segments,
            build_info,
            functions,
            pclntab,
            types_range: OnceLock::new(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn build_info(&self) -> &BuildInfo {
        &self.build_info
    }

    /// The processor the binary is built for (its ELF machine).
    pub fn arch(&self) -> Arch {
        self.arch
    }

    /// Refuses a binary for another processor than the one deferprobe runs on: its
    /// processes can't be probed from here (`run`, `snapshot`; `inspect` reads any).
    pub fn require_host_arch(&self) -> Result<(), BinaryError> {
        match self.arch == Arch::host() {
            true => Ok(()),
            false => Err(BinaryError::ForeignArch {
                path: self.path.clone(),
                binary: self.arch,
                host: Arch::host(),
            }),
        }
    }

    /// The machine-code decoder of [`GoBinary::arch`].
    pub(crate) fn isa(&self) -> &'static dyn isa::Isa {
        isa::for_arch(self.arch)
    }

    /// ELF virtual address range `[start, end)` of the file-backed parts of the PT_LOAD
    /// segments: code, read-only data (static closures live there), initialised data.
    pub fn image_range(&self) -> (u64, u64) {
        let start = self.segments.iter().map(|segment| segment.vaddr).min().unwrap_or(0);
        let end =
            self.segments.iter().map(|segment| segment.vaddr + segment.filesz).max().unwrap_or(0);
        (start, end)
    }

    /// The ELF virtual address the start of the file is loaded at (Go links PIE binaries at
    /// 0x400000, not 0). A process's load bias is where it mapped file offset 0 minus this.
    pub fn file_start_vaddr(&self) -> u64 {
        self.segments
            .iter()
            .min_by_key(|segment| segment.offset)
            .map_or(0, |segment| segment.vaddr.saturating_sub(segment.offset) & !0xfff)
    }

    pub fn is_pie(&self) -> bool {
        self.pie
    }

    /// Address of a data symbol of `.symtab` (e.g. `runtime.allgs`); None in stripped
    /// binaries. Reads the symbol table on each call: for a few look-ups.
    pub fn data_symbol(&self, name: &str) -> Option<u64> {
        use object::{Object as _, ObjectSymbol as _};
        let elf = parse_elf(&self.path, &self.map).ok()?;
        elf.symbols()
            .find(|symbol| symbol.kind() == object::SymbolKind::Data && symbol.name() == Ok(name))
            .map(|symbol| symbol.address())
    }

    /// Whether functions come from `.symtab` or, in stripped binaries, `.gopclntab`.
    pub fn function_source(&self) -> FunctionSource {
        self.functions.source()
    }

    /// Exact name match, e.g. `runtime.deferproc`. From `.symtab`, or from `.gopclntab` when the
    /// binary is stripped. None if absent.
    pub fn function(&self, name: &str) -> Option<Function> {
        self.functions.get(name).cloned()
    }

    /// The function whose code contains `address` (for naming call sites).
    pub fn function_at(&self, address: u64) -> Option<Function> {
        self.functions.containing(address).cloned()
    }

    /// The Go function containing `pc` (an ELF virtual address), and the file and line of the
    /// source it was compiled from, from `.gopclntab` (so also in stripped binaries). For a
    /// return address (a caller pc from a probe, a stack trace entry) pass `pc - 1`: the return
    /// address is the next instruction, which may belong to the next line or even function.
    /// None for pcs outside Go code (C code in cgo binaries, padding past the last function) or
    /// unreadable tables. Each function's tables are decoded on first use and cached, so
    /// lookups stay cheap in large binaries.
    pub fn source_location(&self, pc: u64) -> Option<SourceLocation> {
        self.pclntab.source_location(&self.map, pc)
    }

    /// Every call of `runtime.deferproc` / `runtime.deferprocat` from a function outside package
    /// `runtime`, sorted by address: the `defer` statements that allocate a heap record each
    /// time they run (defers inside loops), known before anything runs.
    pub fn heap_defer_sites(&self) -> Result<Vec<DeferSite>, BinaryError> {
        let callees: Vec<Function> =
            HEAP_DEFER_FUNCTIONS.iter().filter_map(|name| self.function(name)).collect();
        let targets: Vec<u64> = callees.iter().map(|callee| callee.address).collect();
        if targets.is_empty() {
            return Ok(Vec::new());
        }
        let mut sites = Vec::new();
        for function in self.functions.all() {
            if function.name.starts_with("runtime.") {
                continue;
            }
            let code = self.function_code(function)?;
            let calls = self
                .isa()
                .direct_calls(code, function.address, &targets)
                .map_err(|err| self.in_function(function, err))?;
            for call in calls {
                let callee = callees
                    .iter()
                    .find(|callee| callee.address == call.target)
                    .map_or_else(String::new, |callee| callee.name.clone());
                let location =
                    self.source_location(call.address).unwrap_or_else(|| SourceLocation {
                        function: function.name.clone(),
                        file: "?".to_owned(),
                        line: 0,
                    });
                sites.push(DeferSite {
                    location,
                    callee,
                    call_address: call.address,
                    return_address: call.return_address,
                });
            }
        }
        // Aliases (two symbols for one function) would list a call twice.
        sites.sort_by_key(|site| site.call_address);
        sites.dedup_by_key(|site| site.call_address);
        Ok(sites)
    }

    /// The probed calls in the functions that own heap `_defer` records (see
    /// [`HEAP_DEFER_OWNER_MARKERS`]), each list sorted by address, from one scan of the code.
    ///
    /// deferreturn calls of frames that only ever use open-coded or stack defers are left out:
    /// they release nothing deferprobe tracks, and in real programs they are most of them
    /// (encoding/json, for one, returns through deferreturn from every value it marshals).
    pub fn heap_defer_frame_calls(&self) -> Result<HeapDeferFrameCalls, BinaryError> {
        let address_of = |name: &str| self.function(name).map(|function| function.address);
        let deferproc = address_of("runtime.deferproc");
        let deferreturn = address_of("runtime.deferreturn");
        let markers: Vec<u64> =
            HEAP_DEFER_OWNER_MARKERS.iter().filter_map(|name| address_of(name)).collect();
        let mut found = HeapDeferFrameCalls::default();
        if markers.is_empty() {
            return Ok(found);
        }
        let targets: Vec<u64> = markers.iter().copied().chain(deferreturn).collect();
        for function in self.functions.all() {
            let code = self.function_code(function)?;
            let calls = self
                .isa()
                .direct_calls(code, function.address, &targets)
                .map_err(|err| self.in_function(function, err))?;
            if !calls.iter().any(|call| markers.contains(&call.target)) {
                continue;
            }
            for call in calls {
                let list = match Some(call.target) {
                    target if target == deferproc => &mut found.deferproc,
                    target if target == deferreturn => &mut found.deferreturn,
                    _ => continue,
                };
                list.push(FrameCall { function: function.clone(), call_address: call.address });
            }
        }
        // Aliases (two symbols for one function) would list a call twice.
        for list in [&mut found.deferproc, &mut found.deferreturn] {
            list.sort_by_key(|call| call.call_address);
            list.dedup_by_key(|call| call.call_address);
        }
        Ok(found)
    }

    /// All functions whose name starts with `prefix`, sorted by address (e.g.
    /// `runtime.mallocgcSmallScanNoHeaderSC`).
    pub fn functions_with_prefix(&self, prefix: &str) -> Vec<Function> {
        self.functions.with_prefix(prefix)
    }

    /// The machine code of `function` (address..address+size), from the file.
    pub fn function_code(&self, function: &Function) -> Result<&[u8], BinaryError> {
        let outside = || BinaryError::FunctionOutsideFile {
            path: self.path.clone(),
            function: function.name.clone(),
            address: function.address,
            size: function.size,
        };
        self.segment_of(function.address)?;
        let len = usize::try_from(function.size).map_err(|_| outside())?;
        self.bytes_at(function.address, len).ok_or_else(outside)
    }

    /// ELF virtual address → file offset, through the PT_LOAD segment containing it (ET_EXEC and
    /// ET_DYN/PIE alike): what a uprobe is attached at.
    pub fn file_offset(&self, vaddr: u64) -> Result<u64, BinaryError> {
        let (segment, delta) = self.segment_of(vaddr)?;
        Ok(segment.offset + delta)
    }

    /// The initial value of the 8-byte variable at `vaddr` as linked: from the file, or 0 when
    /// it lies past the file-backed part of the segments (`.bss`, `.noptrbss`). None if no
    /// segment holds it.
    pub fn initial_u64(&self, vaddr: u64) -> Option<u64> {
        if self.file_offset(vaddr).is_ok() {
            return self.read_u64(vaddr);
        }
        let elf = parse_elf(&self.path, &self.map).ok()?;
        let endian = elf.endian();
        elf.elf_program_headers()
            .iter()
            .filter(|header| header.p_type(endian) == elf::PT_LOAD)
            .any(|header| {
                let start = header.p_vaddr(endian);
                vaddr >= start && vaddr + 8 <= start + header.p_memsz(endian)
            })
            .then_some(0)
    }

    /// Whether the Go runtime samples allocations for its memory profile, as linked: the
    /// linker sets `runtime.disableMemoryProfiling` when nothing can read the profile, and the
    /// runtime then zeroes `runtime.MemProfileRate` at start. Unknown without `.symtab`.
    pub fn memory_profiling(&self) -> MemoryProfiling {
        let (Some(disabled), Some(rate)) = (
            self.data_symbol("runtime.disableMemoryProfiling"),
            self.data_symbol("runtime.MemProfileRate"),
        ) else {
            return MemoryProfiling::Unknown;
        };
        match (self.initial_u64(disabled), self.initial_u64(rate)) {
            (Some(disabled), _) if disabled & 0xff != 0 => MemoryProfiling::Disabled,
            (Some(_), Some(initial_rate)) => {
                MemoryProfiling::Enabled { initial_rate, rate_variable: rate }
            }
            _ => MemoryProfiling::Unknown,
        }
    }

    /// `len` bytes at ELF virtual address `vaddr` as the file holds them; None unless they lie
    /// in the file-backed part of one segment.
    pub fn bytes_at(&self, vaddr: u64, len: usize) -> Option<&[u8]> {
        self.bytes_from(vaddr)?.get(..len)
    }

    /// The file's bytes from ELF virtual address `vaddr` to the end of the file-backed part of
    /// its segment.
    pub fn bytes_from(&self, vaddr: u64) -> Option<&[u8]> {
        let (segment, delta) = self.segment_of(vaddr).ok()?;
        // In the file, as checked by `load_segments`.
        let start = usize::try_from(segment.offset + delta).ok()?;
        let end = usize::try_from(segment.offset + segment.filesz).ok()?;
        self.map.get(start..end)
    }

    /// The little-endian word at `vaddr` in the file.
    pub fn read_u64(&self, vaddr: u64) -> Option<u64> {
        Some(u64::from_le_bytes(self.bytes_at(vaddr, 8)?.try_into().ok()?))
    }

    /// (vaddr, file-backed size) of the writable PT_LOAD segments (initialised data).
    pub(crate) fn writable_segments(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.segments.iter().filter(|s| s.writable).map(|s| (s.vaddr, s.filesz))
    }

    /// The module's type descriptors, decoded on demand.
    pub fn types(&self) -> TypeReader<'_> {
        let range =
            *self.types_range.get_or_init(|| gotypes::types_range(self, self.pclntab.address()));
        TypeReader::new(self, range)
    }

    /// `runtime.allglen` and `runtime.allgptr`: from `.symtab`, or decoded from
    /// `runtime.allgadd` in stripped binaries ([`variables`]).
    pub fn allg_variables(&self) -> Option<AllgVariables> {
        if let (Some(allglen), Some(allgptr)) =
            (self.data_symbol("runtime.allglen"), self.data_symbol("runtime.allgptr"))
        {
            return Some(AllgVariables { allglen, allgptr });
        }
        let allgadd = self.function("runtime.allgadd")?;
        self.isa().allg_from_allgadd(self.function_code(&allgadd).ok()?, allgadd.address)
    }

    /// The runtime functions the closure scan tells apart ([`closures::Callees`]).
    fn closure_callees(&self) -> closures::Callees {
        let addresses = |names: &[&str]| -> Vec<u64> {
            names.iter().filter_map(|name| self.function(name)).map(|f| f.address).collect()
        };
        closures::Callees {
            allocators: self.closure_allocators(),
            defer_functions: addresses(&HEAP_DEFER_FUNCTIONS),
            write_barriers: self
                .functions_with_prefix("runtime.gcWriteBarrier")
                .into_iter()
                .map(|f| f.address)
                .collect(),
        }
    }

    /// The allocators a closure object is built with ([`closures`]).
    fn closure_allocators(&self) -> Vec<closures::Allocator> {
        use crate::arch::GoRegister;
        // mallocgc(size, typ, needzero) and the size-specialized entries; newobject(typ).
        let mut allocators: Vec<closures::Allocator> = self
            .functions_with_prefix("runtime.mallocgc")
            .into_iter()
            .filter(|f| !f.name.contains("SlowPath"))
            .map(|f| closures::Allocator { address: f.address, type_register: GoRegister::Arg(1) })
            .collect();
        if let Some(newobject) = self.function("runtime.newobject") {
            allocators.push(closures::Allocator {
                address: newobject.address,
                type_register: GoRegister::Arg(0),
            });
        }
        allocators
    }

    /// [`ClosureTypes`] for this binary: the closures built in every function with a heap
    /// defer site, found now; others on demand.
    pub fn closure_types(&self) -> Result<ClosureTypes<'_>, BinaryError> {
        Ok(self.closure_types_for(&self.heap_defer_sites()?))
    }

    /// [`GoBinary::closure_types`] from the heap defer sites already found.
    pub fn closure_types_for(&self, sites: &[DeferSite]) -> ClosureTypes<'_> {
        let catalog = ClosureTypes {
            binary: self,
            types: self.types(),
            callees: self.closure_callees(),
            by_code: Mutex::default(),
            scanned: Mutex::default(),
            layouts: Mutex::default(),
            range_sites: closures::range_sites(sites),
            deferred: Mutex::default(),
        };
        let mut functions: Vec<u64> = sites
            .iter()
            .filter_map(|site| self.function_at(site.call_address))
            .map(|f| f.address)
            .collect();
        functions.dedup();
        for function in functions {
            catalog.scan(function);
        }
        catalog
    }

    /// [`isa::Isa::probe_spot`] for `function`, with errors naming the file and function.
    pub fn probe_spot(
        &self,
        function: &Function,
        reads: &[crate::arch::GoRegister],
    ) -> Result<prologue::ProbeSpot, BinaryError> {
        let code = self.function_code(function)?;
        self.isa()
            .probe_spot(code, function.address, reads)
            .map_err(|err| self.in_function(function, err))
    }

    /// amd64: the offset just after `function`'s stack check, with errors naming the file and
    /// function (the tests compare it across variants).
    #[cfg(test)]
    pub fn probe_offset(&self, function: &Function) -> Result<ProbeOffset, BinaryError> {
        let code = self.function_code(function)?;
        amd64::prologue::probe_offset(code, function.address)
            .map_err(|err| self.in_function(function, err))
    }

    /// amd64: the offsets of `function`'s RET instructions.
    #[cfg(test)]
    pub fn ret_offsets(&self, function: &Function) -> Result<Vec<u64>, BinaryError> {
        let code = self.function_code(function)?;
        amd64::prologue::ret_offsets(code, function.address)
            .map_err(|err| self.in_function(function, err))
    }

    /// Offsets of `runtime.g` (`_defer`, `m`, `goid`), `runtime.m` (`curg`) and
    /// `runtime._defer` (`sp`, `pc`, `fn`, `link`, byte size) from DWARF. Ok(None) when the
    /// binary has no DWARF (stripped).
    pub fn runtime_layout_from_dwarf(&self) -> Result<Option<RuntimeLayout>, BinaryError> {
        dwarf::runtime_layout(&self.path, &parse_elf(&self.path, &self.map)?)
    }

    /// The segment whose file-backed part holds `vaddr`, and `vaddr`'s offset into it.
    fn segment_of(&self, vaddr: u64) -> Result<(&Segment, u64), BinaryError> {
        self.segments
            .iter()
            .find_map(|segment| {
                let delta =
                    vaddr.checked_sub(segment.vaddr).filter(|&delta| delta < segment.filesz)?;
                Some((segment, delta))
            })
            .ok_or_else(|| BinaryError::UnmappedAddress { path: self.path.clone(), address: vaddr })
    }

    fn in_function(&self, function: &Function, err: BinaryError) -> BinaryError {
        match err {
            BinaryError::Code { address, reason } => BinaryError::FunctionCode {
                path: self.path.clone(),
                function: function.name.clone(),
                address,
                reason,
            },
            other => other,
        }
    }
}

/// The PT_LOAD segments, each of whose file-backed part must lie inside the file (so offsets
/// computed from them need no further overflow checks).
fn load_segments(
    path: &Path,
    elf: &ElfFile64<'_, Endianness>,
    file_len: usize,
) -> Result<Vec<Segment>, BinaryError> {
    let endian = elf.endian();
    elf.elf_program_headers()
        .iter()
        .filter(|header| header.p_type(endian) == elf::PT_LOAD)
        .map(|header| {
            let segment = Segment {
                vaddr: header.p_vaddr(endian),
                offset: header.p_offset(endian),
                filesz: header.p_filesz(endian),
                writable: header.p_flags(endian).0 & elf::PF_W.0 != 0,
            };
            let file_end = segment.offset.checked_add(segment.filesz);
            let in_file = file_end.is_some_and(|end| end <= file_len as u64)
                && segment.vaddr.checked_add(segment.filesz).is_some();
            if in_file {
                Ok(segment)
            } else {
                Err(BinaryError::MalformedElf {
                    path: path.to_owned(),
                    reason: format!(
                        "PT_LOAD segment at {:#x} extends past the end of the file",
                        segment.vaddr
                    ),
                })
            }
        })
        .collect()
}

/// GOOS values that run on the Linux kernel (Android's binaries are Linux ELF files).
const LINUX_GOOS: [&str; 2] = ["linux", "android"];

/// Refuses anything but a linux/amd64 or linux/arm64 ELF file, naming what the file is instead: another
/// object format ([`FileKind`]), another OS (the ELF OS ABI, or the `GOOS=` build setting of a
/// Go binary), another processor (`e_machine`, which a patched or odd `GOARCH=` setting can't
/// contradict). Files of no known format are
/// [`BinaryError::NotElf`].
fn check_platform(path: &Path, data: &[u8]) -> Result<Arch, BinaryError> {
    let refuse = |what: String| BinaryError::UnsupportedPlatform { path: path.to_owned(), what };
    let malformed = |err: object::Error| BinaryError::MalformedElf {
        path: path.to_owned(),
        reason: err.to_string(),
    };
    let kind = match FileKind::parse(data) {
        Ok(kind) => kind,
        Err(_) if data.starts_with(&elf::ELFMAG) => {
            return Err(BinaryError::MalformedElf {
                path: path.to_owned(),
                reason: "unrecognised ELF header".to_owned(),
            });
        }
        Err(_) => return Err(BinaryError::NotElf { path: path.to_owned() }),
    };
    let (os_abi, arch, goos) = match kind {
        FileKind::Elf64 => {
            let file = ElfFile64::<Endianness>::parse(data).map_err(malformed)?;
            let goos = BuildInfo::read(path, &file).ok().and_then(|info| info.goos);
            (file.elf_header().e_ident.os_abi, file.architecture(), goos)
        }
        FileKind::Elf32 => {
            let file = ElfFile32::<Endianness>::parse(data).map_err(malformed)?;
            (file.elf_header().e_ident.os_abi, file.architecture(), None)
        }
        FileKind::Pe32 | FileKind::Pe64 => return Err(refuse("a Windows PE file".to_owned())),
        FileKind::MachO32 | FileKind::MachO64 | FileKind::MachOFat32 | FileKind::MachOFat64 => {
            return Err(refuse("a macOS Mach-O file".to_owned()));
        }
        FileKind::Coff | FileKind::CoffBig | FileKind::CoffImport => {
            return Err(refuse("a COFF object file".to_owned()));
        }
        FileKind::Xcoff32 | FileKind::Xcoff64 => {
            return Err(refuse("an AIX XCOFF file".to_owned()));
        }
        _ => return Err(BinaryError::NotElf { path: path.to_owned() }),
    };
    // Which says what the OS is: the Go build setting, else the ELF header.
    let (goos, source) = match goos {
        Some(goos) => (goos.clone(), format!("GOOS={goos}")),
        None => (goos_of_os_abi(os_abi).to_owned(), format!("ELF OS ABI {}", os_abi.0)),
    };
    let linux = LINUX_GOOS.contains(&goos.as_str());
    // Linux on any processor [`Arch::from_elf`] knows.
    if let Some(arch) = linux.then(|| Arch::from_elf(arch)).flatten() {
        return Ok(arch);
    }
    Err(refuse(match linux {
        true => format!("a {goos}/{} ELF file", goarch_name(arch)),
        false => format!("a{} ELF file ({source})", os_name(&goos)),
    }))
}

/// The GOOS an ELF OS ABI byte stands for (Go sets it for FreeBSD; Linux and most others
/// leave it 0, "System V").
fn goos_of_os_abi(os_abi: elf::OsAbi) -> &'static str {
    match os_abi {
        elf::ELFOSABI_FREEBSD => "freebsd",
        elf::ELFOSABI_NETBSD => "netbsd",
        elf::ELFOSABI_OPENBSD => "openbsd",
        elf::ELFOSABI_SOLARIS => "solaris",
        _ => "linux",
    }
}

/// " FreeBSD", "n OpenBSD": the system a GOOS names, with the article's ending.
fn os_name(goos: &str) -> String {
    let name = match goos {
        "freebsd" => "FreeBSD",
        "netbsd" => "NetBSD",
        "openbsd" => "OpenBSD",
        "dragonfly" => "DragonFly BSD",
        "solaris" => "Solaris",
        "illumos" => "illumos",
        "plan9" => "Plan 9",
        other => other,
    };
    let vowel = name.starts_with(|c: char| "aeiouAEIOU".contains(c));
    format!("{} {name}", if vowel { "n" } else { "" })
}

/// Parses `data`, already checked by [`check_platform`], as a little-endian 64-bit ELF file
/// whose sections all lie in the file.
fn parse_elf<'data>(
    path: &Path,
    data: &'data [u8],
) -> Result<ElfFile64<'data, Endianness>, BinaryError> {
    let malformed = |err: object::Error| BinaryError::MalformedElf {
        path: path.to_owned(),
        reason: err.to_string(),
    };
    let file = ElfFile64::<Endianness>::parse(data).map_err(malformed)?;
    if !file.is_little_endian() {
        return Err(BinaryError::MalformedElf {
            path: path.to_owned(),
            reason: "big-endian".to_owned(),
        });
    }
    // A truncated copy would otherwise lose section names (`.shstrtab` comes last) and so,
    // silently, its DWARF.
    for section in file.sections() {
        let end = section.file_range().map_or(Some(0), |(offset, size)| offset.checked_add(size));
        if end.is_none_or(|end| end > data.len() as u64) {
            return Err(BinaryError::MalformedElf {
                path: path.to_owned(),
                reason: format!(
                    "section {} extends past the end of the file (truncated?)",
                    section.index().0
                ),
            });
        }
    }
    Ok(file)
}

/// The GOARCH name of an architecture, for messages.
fn goarch_name(arch: Architecture) -> String {
    match arch {
        Architecture::X86_64 => "amd64".to_owned(),
        Architecture::I386 => "386".to_owned(),
        Architecture::X86_64_X32 => "x32".to_owned(),
        Architecture::Aarch64 => "arm64".to_owned(),
        Architecture::Arm => "arm".to_owned(),
        Architecture::LoongArch64 => "loong64".to_owned(),
        Architecture::PowerPc64 => "ppc64".to_owned(),
        Architecture::Riscv64 => "riscv64".to_owned(),
        Architecture::S390x => "s390x".to_owned(),
        other => format!("{other:?}").to_lowercase(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use testbin::{FUNCTIONS, Program, TempFile, Toolchain, Variant};

    fn open(toolchain: &Toolchain, program: Program, variant: Variant) -> GoBinary {
        GoBinary::open(&testbin::build(toolchain, program, variant)).unwrap()
    }

    #[test]
    fn functions() {
        for toolchain in testbin::toolchains() {
            for program in Program::ALL {
                for variant in Variant::ALL {
                    let binary = open(&toolchain, program, variant);
                    let what = format!("go{} {program:?} {variant:?}", toolchain.version);
                    let source = match variant.stripped() {
                        true => FunctionSource::Pclntab,
                        false => FunctionSource::Symtab,
                    };
                    assert_eq!(binary.function_source(), source, "{what}");
                    assert_eq!(binary.is_pie(), variant.pie(), "{what}");
                    for name in FUNCTIONS.iter().chain(&["main.loopDefers", "main.main"]) {
                        if program == Program::Demo && *name == "main.loopDefers" {
                            continue;
                        }
                        let function =
                            binary.function(name).unwrap_or_else(|| panic!("{what}: no {name}"));
                        assert_eq!(function.name, *name);
                        assert!(function.size > 0 && function.address > 0, "{what} {function:?}");
                        assert_eq!(binary.function_at(function.address + 1), Some(function));
                    }
                    assert_eq!(binary.function("runtime.deferproc2"), None);
                    assert_eq!(binary.function("runtime.deferpro"), None);
                }
            }
        }
    }

    /// What a snapshot needs from a stripped binary, decoded from code and data, equals what
    /// the symbol table of the same program says.
    #[test]
    fn runtime_variables_and_types_without_symbols() {
        for toolchain in testbin::toolchains() {
            let what = format!("go{}", toolchain.version);
            let plain = open(&toolchain, Program::Pending, Variant::Plain);
            let allgadd = plain.function("runtime.allgadd").unwrap();
            let decoded = plain
                .isa()
                .allg_from_allgadd(plain.function_code(&allgadd).unwrap(), allgadd.address);
            assert_eq!(decoded, plain.allg_variables(), "{what}");
            assert!(decoded.is_some(), "{what}");
            let range = plain.types().range().unwrap_or_else(|| panic!("{what}: no types"));
            assert_eq!(
                Some(range.types),
                plain.data_symbol("runtime.types").or_else(|| {
                    // Some releases give it as a read-only data symbol of another kind.
                    plain_symbol(&plain, "runtime.types")
                }),
                "{what}"
            );
            for variant in [Variant::Stripped, Variant::PieStripped] {
                let binary = open(&toolchain, Program::Pending, variant);
                assert!(binary.allg_variables().is_some(), "{what} {variant:?}");
                let closures = binary.closure_types().unwrap();
                // The closure of holdMapsByValue's loop defer captures one map[string]int.
                let code = binary
                    .functions_with_prefix("main.holdMapsByValue.func")
                    .into_iter()
                    .next()
                    .unwrap_or_else(|| panic!("{what} {variant:?}: no closure"));
                let layout = closures.layout(code.address).unwrap();
                let types: Vec<&str> =
                    layout.captures.iter().map(|c| c.typ.name.as_str()).collect();
                assert!(types.contains(&"map[string]int"), "{what} {variant:?}: {layout:?}");
            }
        }
    }

    fn plain_symbol(binary: &GoBinary, name: &str) -> Option<u64> {
        use object::{Object as _, ObjectSymbol as _};
        let elf = parse_elf(&binary.path, &binary.map).ok()?;
        elf.symbols().find(|s| s.name() == Ok(name)).map(|s| s.address())
    }

    #[test]
    fn functions_with_prefix() {
        for toolchain in testbin::toolchains() {
            let binary = open(&toolchain, Program::Workload, Variant::Plain);
            let release = &toolchain.version;
            let found = binary.functions_with_prefix("runtime.deferproc");
            let names: Vec<&str> = found.iter().map(|f| f.name.as_str()).collect();
            assert!(
                names.contains(&"runtime.deferproc") && names.contains(&"runtime.deferprocStack")
            );
            assert!(found.windows(2).all(|pair| pair[0].address < pair[1].address), "{names:?}");
            assert!(found.iter().all(|f| f.name.starts_with("runtime.deferproc")));

            let sc = binary.functions_with_prefix("runtime.mallocgcSmallScanNoHeaderSC");
            if binary.build_info().release.minor >= 27 {
                let names: Vec<&str> = sc.iter().map(|f| f.name.as_str()).collect();
                let expected: Vec<String> =
                    (1..=7).map(|n| format!("runtime.mallocgcSmallScanNoHeaderSC{n}")).collect();
                assert_eq!(names, expected, "go{release}");
            } else {
                assert_eq!(sc, [], "go{release}");
            }
            assert_eq!(binary.functions_with_prefix("no.such.package."), []);
        }
    }

    #[test]
    fn file_offsets() {
        for toolchain in testbin::toolchains() {
            for program in [Program::Workload, Program::Cgo] {
                for variant in Variant::ALL {
                    let binary = open(&toolchain, program, variant);
                    let what = format!("go{} {program:?} {variant:?}", toolchain.version);
                    let bytes = std::fs::read(binary.path()).unwrap();
                    for name in FUNCTIONS {
                        let function = binary.function(name).unwrap();
                        let code = binary.function_code(&function).unwrap();
                        assert_eq!(code.len() as u64, function.size);
                        let offset = binary.file_offset(function.address).unwrap() as usize;
                        assert_eq!(&bytes[offset..offset + code.len()], code, "{what} {name}");
                    }
                    let err = binary.file_offset(0xdead_0000_0000).unwrap_err();
                    let expected = format!(
                        "{}: address 0xdead00000000 is in no loadable segment",
                        binary.path().display()
                    );
                    assert_eq!(err.to_string(), expected);
                    let bogus =
                        Function { name: "bogus".into(), address: 0xdead_0000_0000, size: 1 };
                    assert!(binary.function_code(&bogus).is_err());
                    let mut too_long = binary.function("runtime.goexit1").unwrap();
                    too_long.size = u64::MAX;
                    let err = binary.function_code(&too_long).unwrap_err();
                    assert!(matches!(err, BinaryError::FunctionOutsideFile { .. }), "{err}");
                }
            }
        }
    }

    /// Real `-s -w` binaries (also PIE, also cgo, whose Go text does not start `.text`, and
    /// which up to Go 1.25 has no `.gopclntab` section when PIE) find every Go function at the
    /// address the unstripped build of the same program has.
    #[test]
    fn stripped_binaries_have_the_same_functions() {
        for toolchain in testbin::toolchains() {
            for program in Program::ALL {
                for (plain, stripped) in
                    [(Variant::Plain, Variant::Stripped), (Variant::Pie, Variant::PieStripped)]
                {
                    let what = format!("go{} {program:?} {stripped:?}", toolchain.version);
                    let binary = open(&toolchain, program, plain);
                    let stripped = open(&toolchain, program, stripped);
                    assert_eq!(stripped.function_source(), FunctionSource::Pclntab);
                    // Every Go function of .symtab is in pclntab at the same address, under the
                    // same name less the `.abi0` ELF gives one of a function and its ABI
                    // wrapper. Sizes may include the padding up to the next function.
                    let mut go_functions = 0;
                    for function in binary.functions.all() {
                        let Some(twin) = stripped.function_at(function.address) else {
                            // C code of cgo binaries.
                            assert_eq!(program, Program::Cgo, "{what}: {function:?}");
                            assert_eq!(binary.source_location(function.address), None);
                            continue;
                        };
                        go_functions += 1;
                        let name = twin.name.replace('·', ".");
                        let mut expected_name = function.name.trim_end_matches(".abi0").to_owned();
                        if name.contains("[...]") {
                            // Go 1.19 pclntab: `type..eq.[...]T` for ELF's `type..eq.[5]T`.
                            expected_name = array_lengths_elided(&expected_name);
                        }
                        let expected = (expected_name.as_str(), function.address);
                        assert_eq!((name.as_str(), twin.address), expected, "{what}");
                        assert!(twin.size >= function.size, "{what} {twin:?} vs {function:?}");
                        assert!(twin.size < function.size + 64, "{what} {twin:?} vs {function:?}");
                    }
                    assert!(go_functions > 1000, "{what}: {go_functions} functions");
                    // A name shared with an ABI wrapper resolves to the real code: the Go
                    // function (runtime.goexit1 has a runtime.goexit1.abi0 wrapper in 1.27), or
                    // the assembly (ELF runtime.reflectcall.abi0, whose wrapper is
                    // runtime.reflectcall).
                    for name in FUNCTIONS {
                        let function = stripped.function(name).unwrap();
                        let original = binary.function(name).unwrap();
                        assert_eq!(function.address, original.address, "{what} {name}");
                        let probe = stripped.probe_offset(&function).unwrap();
                        assert_eq!(probe, binary.probe_offset(&original).unwrap(), "{what} {name}");
                    }
                    let reflectcall = stripped.function("runtime.reflectcall").unwrap();
                    let assembly = binary.function("runtime.reflectcall.abi0").unwrap();
                    assert_eq!(reflectcall.address, assembly.address, "{what}");
                }
            }
        }
    }

    /// `[5]T` → `[...]T`.
    fn array_lengths_elided(name: &str) -> String {
        let mut out = String::new();
        let mut rest = name;
        while let Some(open) = rest.find('[') {
            out.push_str(&rest[..=open]);
            rest = &rest[open + 1..];
            let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
            if digits > 0 && rest[digits..].starts_with(']') {
                out.push_str("...");
                rest = &rest[digits..];
            }
        }
        out + rest
    }

    /// The heap-defer sites of the test programs: the `defer` statements inside loops, at the
    /// return address of their deferproc call.
    #[test]
    fn heap_defer_sites() {
        let loop_defer = "defer func() { sink += len(m) }()";
        for toolchain in testbin::toolchains() {
            for variant in Variant::ALL {
                let expectations = [
                    (
                        Program::Workload,
                        vec![(
                            "main.loopDefers",
                            testbin::source_line(Program::Workload, loop_defer),
                        )],
                    ),
                    (
                        Program::Cgo,
                        vec![("main.loopDefers", testbin::source_line(Program::Cgo, loop_defer))],
                    ),
                    (
                        Program::Demo,
                        vec![
                            (
                                "main.pumpBatches",
                                testbin::source_line(Program::Demo, "defer release(results)"),
                            ),
                            (
                                "main.handleRequest",
                                testbin::source_line(
                                    Program::Demo,
                                    "defer func() { total += len(scratch) }()",
                                ),
                            ),
                        ],
                    ),
                ];
                for (program, expected) in expectations {
                    let what = format!("go{} {program:?} {variant:?}", toolchain.version);
                    let binary = open(&toolchain, program, variant);
                    let deferproc = binary.function("runtime.deferproc").unwrap();
                    let sites = binary.heap_defer_sites().unwrap();
                    let main_sites: Vec<(&str, u32)> = sites
                        .iter()
                        .filter(|site| site.location.function.starts_with("main."))
                        .map(|site| (site.location.function.as_str(), site.location.line))
                        .collect();
                    assert_eq!(main_sites, expected, "{what}: {sites:#?}");
                    for site in &sites {
                        assert!(!site.location.function.starts_with("runtime."), "{what}");
                        assert_eq!(site.callee, "runtime.deferproc", "{what}");
                        assert_eq!(site.return_address, site.call_address + 5, "{what}");
                        let source = program.source().canonicalize().unwrap();
                        if site.location.function.starts_with("main.") {
                            assert_eq!(Path::new(&site.location.file), source, "{what}");
                        }
                        // What the deferproc probe sees: its return address, in the caller.
                        let caller = binary.function_at(site.return_address - 1).unwrap();
                        assert!(
                            caller.name.trim_end_matches(".abi0") == site.location.function,
                            "{what}: {caller:?} vs {site:?}"
                        );
                        let code = binary.function_code(&caller).unwrap();
                        let at = (site.call_address - caller.address) as usize;
                        let rel = i32::from_le_bytes(code[at + 1..at + 5].try_into().unwrap());
                        assert_eq!(code[at], 0xe8, "{what}");
                        assert_eq!(
                            site.return_address.wrapping_add_signed(i64::from(rel)),
                            deferproc.address,
                            "{what}"
                        );
                    }
                }
            }
        }
    }

    /// The test programs never read their memory profile, so the linker turned profiling off;
    /// stripped binaries can't tell.
    #[test]
    fn memory_profiling_as_linked() {
        for toolchain in testbin::toolchains() {
            for variant in Variant::ALL {
                let binary = open(&toolchain, Program::Workload, variant);
                let expected = match variant.stripped() {
                    true => MemoryProfiling::Unknown,
                    false => MemoryProfiling::Disabled,
                };
                assert_eq!(
                    binary.memory_profiling(),
                    expected,
                    "go{} {variant:?}",
                    toolchain.version
                );
            }
        }
    }

    #[test]
    fn no_dwarf_is_none() {
        for toolchain in testbin::toolchains() {
            for variant in [Variant::Stripped, Variant::PieStripped] {
                let binary = open(&toolchain, Program::Workload, variant);
                assert_eq!(
                    binary.runtime_layout_from_dwarf().unwrap(),
                    None,
                    "go{} {variant:?}",
                    toolchain.version
                );
            }
        }
    }

    #[test]
    fn scrambled_dwarf_is_an_error() {
        let toolchain = &testbin::toolchains()[0];
        let path = testbin::build(toolchain, Program::Workload, Variant::Plain);
        for (section, from) in [(".debug_info", 0), (".debug_info", 40), (".debug_abbrev", 0)] {
            let broken =
                TempFile::patched(&path, |bytes| testbin::scramble_section(bytes, section, from));
            let binary = GoBinary::open(broken.path()).unwrap();
            let err = binary.runtime_layout_from_dwarf().unwrap_err();
            assert!(err.to_string().contains("corrupt DWARF"), "{section}+{from}: {err}");
        }
    }

    fn open_err(file: &TempFile) -> String {
        let err = GoBinary::open(file.path())
            .err()
            .unwrap_or_else(|| panic!("opening {} should fail", file.path().display()));
        let message = err.to_string();
        assert!(message.starts_with(&file.path().display().to_string()), "{message}");
        assert!(!message.contains('\n'), "{message}");
        message
    }

    /// A cut that loses part of a loaded segment is an error. One that loses only what follows
    /// (section names, `.symtab`) either is too, or leaves a binary analysed as before.
    #[test]
    fn truncated_files_are_errors() {
        for toolchain in testbin::toolchains() {
            for variant in [Variant::Plain, Variant::Stripped, Variant::PieStripped] {
                let path = testbin::build(&toolchain, Program::Workload, variant);
                let original = GoBinary::open(&path).unwrap();
                let loads_end = original
                    .segments
                    .iter()
                    .map(|segment| (segment.offset + segment.filesz) as usize)
                    .max()
                    .unwrap();
                let sections_end = parse_elf(&path, &original.map)
                    .unwrap()
                    .sections()
                    .filter_map(|section| section.file_range())
                    .map(|(offset, size)| (offset + size) as usize)
                    .max()
                    .unwrap();
                let len = std::fs::metadata(&path).unwrap().len() as usize;
                let cuts = [
                    0,
                    10,
                    100,
                    1024,
                    len / 4,
                    len / 2,
                    loads_end - 1,
                    len - 4096,
                    sections_end - 1,
                    len - 1,
                ];
                // Even past the loaded segments: a cut `.shstrtab` (last in Go binaries) once
                // lost every section name, and so the DWARF, silently.
                for keep in cuts {
                    let truncated = TempFile::patched(&path, |bytes| bytes.truncate(keep));
                    if keep < sections_end.max(loads_end) {
                        open_err(&truncated);
                        continue;
                    }
                    let binary = GoBinary::open(truncated.path()).unwrap();
                    for name in FUNCTIONS {
                        assert_eq!(binary.function(name), original.function(name));
                    }
                }
            }
        }
    }

    #[test]
    fn scrambled_buildinfo() {
        for toolchain in testbin::toolchains() {
            let path = testbin::build(&toolchain, Program::Workload, Variant::Stripped);
            let whole = TempFile::patched(&path, |bytes| {
                testbin::scramble_section(bytes, ".go.buildinfo", 0)
            });
            assert!(open_err(&whole).ends_with("corrupt .go.buildinfo: bad magic"));
            // Keep the magic and flags, scramble the strings.
            let strings = TempFile::patched(&path, |bytes| {
                testbin::scramble_section(bytes, ".go.buildinfo", 32)
            });
            let message = open_err(&strings);
            assert!(message.contains(".go.buildinfo"), "{message}");
        }
    }

    /// Both pclntab magics (Go 1.19 and 1.20+), with and without `.symtab`: a damaged header
    /// or function table fails `open`.
    #[test]
    fn scrambled_pclntab() {
        for toolchain in testbin::toolchains() {
            for variant in [Variant::Plain, Variant::Stripped] {
                let path = testbin::build(&toolchain, Program::Workload, variant);
                for from in [0, 8, 64] {
                    let broken = TempFile::patched(&path, |bytes| {
                        testbin::scramble_section(bytes, ".gopclntab", from);
                    });
                    let message = open_err(&broken);
                    assert!(message.contains("corrupt .gopclntab"), "{message}");
                }
                // Without its section name (as in cgo PIEs), the table is found by its header.
                let unnamed =
                    TempFile::patched(&path, |bytes| testbin::rename_section(bytes, ".gopclntab"));
                let binary = GoBinary::open(unnamed.path()).unwrap();
                let original = GoBinary::open(&path).unwrap();
                for name in FUNCTIONS {
                    assert_eq!(binary.function(name), original.function(name));
                }
                let unnamed = TempFile::patched(&path, |bytes| {
                    testbin::scramble_section(bytes, ".gopclntab", 0);
                    testbin::rename_section(bytes, ".gopclntab");
                });
                let message = open_err(&unnamed);
                let expected = "no .gopclntab (the Go function table) found";
                assert!(message.ends_with(expected), "{message}");
            }
        }
    }

    #[test]
    fn not_elf() {
        let text = TempFile::new("text", b"#!/bin/sh\necho hello, not an ELF file\n");
        assert_eq!(open_err(&text), format!("{}: not an ELF file", text.path().display()));
        let empty = TempFile::new("empty", b"");
        open_err(&empty);
        let missing = Path::new("/nonexistent/deferprobe-test-binary");
        let err = GoBinary::open(missing).err().unwrap();
        assert!(
            err.to_string().starts_with("/nonexistent/deferprobe-test-binary: cannot read: "),
            "{err}"
        );
    }

    #[test]
    fn other_architectures() {
        let path = testbin::build(&testbin::toolchains()[0], Program::Workload, Variant::Plain);
        // An arm64 machine is read (`inspect`), and refused for tracing on this processor.
        let arm64 = TempFile::patched(&path, |bytes| {
            bytes[18..20].copy_from_slice(&elf::EM_AARCH64.0.to_le_bytes());
        });
        let binary = GoBinary::open(arm64.path()).unwrap();
        assert_eq!(binary.arch(), Arch::Arm64);
        #[cfg(target_arch = "x86_64")]
        assert_eq!(
            binary.require_host_arch().unwrap_err().to_string(),
            format!(
                "{}: a linux/arm64 Go binary; this deferprobe runs on linux/amd64 and traces \
                 only linux/amd64 programs (`inspect` reads both)",
                arm64.path().display()
            )
        );
        let s390 = TempFile::patched(&path, |bytes| {
            bytes[18..20].copy_from_slice(&elf::EM_S390.0.to_le_bytes());
        });
        assert_eq!(
            open_err(&s390),
            format!(
                "{}: a linux/s390x ELF file; deferprobe reads linux/amd64 and linux/arm64 Go \
                 binaries",
                s390.path().display()
            )
        );
        // The binary's own GOOS setting (every copy of modinfo patched, same length).
        let netbsd = TempFile::patched(&path, |bytes| {
            let mut patched = 0;
            while let Some(at) = bytes.windows(11).position(|w| w == b"\tGOOS=linux") {
                bytes[at..at + 11].copy_from_slice(b"\tGOOS=netbs");
                patched += 1;
            }
            assert!(patched > 0);
        });
        let expected = ": a netbs ELF file (GOOS=netbs); deferprobe reads linux/amd64 and \
                        linux/arm64 Go binaries";
        assert!(open_err(&netbsd).ends_with(expected), "{}", open_err(&netbsd));
        // A bare 32-bit i386 ELF header.
        let mut header = vec![0u8; 52];
        header[..7].copy_from_slice(&[
            0x7f,
            b'E',
            b'L',
            b'F',
            elf::ELFCLASS32.0,
            elf::ELFDATA2LSB.0,
            1,
        ]);
        header[16..18].copy_from_slice(&elf::ET_EXEC.0.to_le_bytes());
        header[18..20].copy_from_slice(&elf::EM_386.0.to_le_bytes());
        header[20..24].copy_from_slice(&1u32.to_le_bytes());
        header[40..42].copy_from_slice(&52u16.to_le_bytes());
        let i386 = TempFile::new("i386", &header);
        assert!(open_err(&i386).ends_with(
            ": a linux/386 ELF file; deferprobe reads linux/amd64 and linux/arm64 Go binaries"
        ));
        for (magic, what) in [
            (&b"MZ\x90\0"[..], "a Windows PE file"),
            (&[0xcf, 0xfa, 0xed, 0xfe][..], "a macOS Mach-O file"),
        ] {
            let mut bytes = vec![0u8; 4096];
            bytes[..magic.len()].copy_from_slice(magic);
            let file = TempFile::new("foreign", &bytes);
            let message = open_err(&file);
            assert!(message.contains(what) || message.contains("not an ELF file"), "{message}");
        }
    }
}
