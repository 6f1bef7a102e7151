//! `.gopclntab`, the Go runtime's own function table, which survives stripping: where it is,
//! where the Go text starts, the function table (entry, size and name of every Go function,
//! found by binary search), and each function's pc → file and pc → line tables, decoded only
//! for the functions asked about and cached.
//!
//! Layouts handled: magic 0xfffffff0 (Go 1.18–1.19) and 0xfffffff1 (1.20+), which differ in the
//! `_func` record (1.20 inserted `startLine`). Locations are those of the innermost inlined
//! function's source (the pcfile/pcln tables), named after the function that contains the
//! code: deferprobe asks about `defer` call sites, which the compiler never inlines.

use std::{
    collections::HashMap,
    ops::Range,
    path::Path,
    sync::{Arc, Mutex, PoisonError},
};

use object::{
    Endianness, Object as _, ObjectSection as _, ObjectSymbol as _, SectionKind, elf,
    read::elf::{ElfFile64, ElfSection64, ProgramHeader as _},
};
use serde::Serialize;

use super::BinaryError;

const MAGIC_GO118: u32 = 0xffff_fff0;
const MAGIC_GO120: u32 = 0xffff_fff1;
/// pcHeader bytes 4..8: two zero pads, the instruction size quantum (1 on amd64, 4 on arm64:
/// pc deltas in the pcvalue tables count in it), pointer size.
const HEADER_TAILS: [[u8; 4]; 2] = [[0, 0, 1, 8], [0, 0, 4, 8]];
/// pcHeader words (8 bytes each) after the first 8 bytes.
const HEADER_SIZE: usize = 72;
const NFUNC_OFFSET: usize = 8;
const TEXT_START_OFFSET: usize = 24;
const FUNCNAME_OFFSET: usize = 32;
const CUTAB_OFFSET: usize = 40;
const FILETAB_OFFSET: usize = 48;
const PCTAB_OFFSET: usize = 56;
const FUNCTAB_OFFSET: usize = 64;

/// `_func` fields (offsets from the record's start).
const FUNC_NAME_OFF: usize = 4;
const FUNC_PCFILE: usize = 20;
const FUNC_PCLN: usize = 24;
const FUNC_CU_OFFSET: usize = 32;
/// `_func.funcID`; Go 1.20 inserted `startLine` (4 bytes) before it.
const FUNC_ID_GO118: usize = 36;
const FUNC_ID_GO120: usize = 40;

/// `runtime.moduledata` fields: `pcHeader` first, then `funcnametab` (a slice), ..., `minpc`,
/// `text` (unchanged from Go 1.18 to 1.27).
const MODULEDATA_FUNCNAMETAB: u64 = 8;
const MODULEDATA_MINPC: u64 = 160;
const MODULEDATA_TEXT: u64 = 176;

/// A program counter's function and source position.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SourceLocation {
    pub function: String,
    pub file: String,
    pub line: u32,
}

/// One function-table entry, as read.
pub(super) struct FuncEntry<'data> {
    pub name: &'data str,
    pub address: u64,
    /// Up to the next function's entry, so padding included.
    pub size: u64,
    /// `_func.funcID` (`abi.FuncID`; values vary by release).
    pub func_id: u8,
}

/// The parsed header of a `.gopclntab` and a cache of decoded line tables. Its bytes stay in
/// the file: every method takes the whole file and slices the table out of it.
pub(super) struct Pclntab {
    /// The table in the file (from its header on).
    range: Range<usize>,
    func_id_offset: usize,
    /// The instruction size quantum: pcvalue tables count pc deltas in it.
    quantum: u32,
    nfunc: usize,
    /// `runtime.text`: function entries are offsets from it.
    text_start: u64,
    /// ELF virtual address of the table's header (`moduledata.pcHeader` points here); 0 when
    /// parsed from bare bytes.
    address: u64,
    funcnames: usize,
    cutab: usize,
    filetab: usize,
    pctab: usize,
    functab: usize,
    /// Decoded pc → file and pc → line tables, by function index.
    lines: Mutex<HashMap<usize, Arc<LineTables>>>,
}

/// A function's pcvalue tables, as (end offset from entry, value) runs in pc order.
struct LineTables {
    files: Vec<(u32, i32)>,
    lines: Vec<(u32, i32)>,
}

impl Pclntab {
    /// Finds and checks the table of `elf` (whose bytes are `file`), and where the Go text
    /// starts.
    pub(super) fn read(
        path: &Path,
        elf: &ElfFile64<'_, Endianness>,
        file: &[u8],
    ) -> Result<Pclntab, BinaryError> {
        let mut first_error = None;
        for (address, range) in candidates(elf, file) {
            match Self::parse(path, elf, file, address, range) {
                Ok(table) => return Ok(table),
                Err(err) => {
                    first_error.get_or_insert(err);
                }
            }
        }
        Err(first_error.unwrap_or_else(|| BinaryError::NoPclntab { path: path.to_owned() }))
    }

    /// The table at `address`, whose bytes are `file[range]`.
    fn parse(
        path: &Path,
        elf: &ElfFile64<'_, Endianness>,
        file: &[u8],
        address: u64,
        range: Range<usize>,
    ) -> Result<Pclntab, BinaryError> {
        let mut table = Self::parse_header(path, file, range)?;
        table.address = address;
        table.text_start = text_start(path, elf, &table, address, table.text_start, file)?;
        Ok(table)
    }

    /// The checked header of the table `file[range]`, with `text_start` as the header says (0
    /// from Go 1.26: [`text_start`] then finds it in the ELF file).
    pub(super) fn parse_header(
        path: &Path,
        file: &[u8],
        range: Range<usize>,
    ) -> Result<Pclntab, BinaryError> {
        let corrupt =
            |reason: String| BinaryError::CorruptPclntab { path: path.to_owned(), reason };
        let data = file.get(range.clone()).unwrap_or_default();
        let read = Reader { data };
        let func_id_offset = match read.u32(0) {
            Some(MAGIC_GO118) => FUNC_ID_GO118,
            Some(MAGIC_GO120) => FUNC_ID_GO120,
            Some(magic) => return Err(corrupt(format!("unsupported magic {magic:#x}"))),
            None => return Err(corrupt("truncated header".into())),
        };
        let Some(tail) = data.get(4..8).filter(|tail| HEADER_TAILS.iter().any(|t| t == tail))
        else {
            return Err(corrupt(
                "header is not for amd64 or arm64 (1- or 4-byte instructions, 8-byte pointers)"
                    .into(),
            ));
        };
        let quantum = u32::from(tail[2]);
        if data.len() < HEADER_SIZE {
            return Err(corrupt("truncated header".into()));
        }
        // Offsets into the table, each within it.
        let offset = |at: usize, what: &str| {
            read.u64(at)
                .and_then(|value| usize::try_from(value).ok())
                .filter(|&value| value <= data.len())
                .ok_or_else(|| corrupt(format!("{what} offset lies outside the table")))
        };
        let funcnames = offset(FUNCNAME_OFFSET, "function name table")?;
        let cutab = offset(CUTAB_OFFSET, "compilation unit table")?;
        let filetab = offset(FILETAB_OFFSET, "file table")?;
        let pctab = offset(PCTAB_OFFSET, "pc table")?;
        let functab = offset(FUNCTAB_OFFSET, "function table")?;
        let entries = read.u64(NFUNC_OFFSET).unwrap_or(u64::MAX);
        // nfunc (entryOff, funcOff) pairs, then the end offset of the last function.
        let nfunc = usize::try_from(entries)
            .ok()
            .filter(|&n| {
                let end = n.checked_mul(8).and_then(|size| size.checked_add(4 + functab));
                end.is_some_and(|end| end <= data.len())
            })
            .ok_or_else(|| {
                corrupt(format!("function table of {entries} entries exceeds the table"))
            })?;
        Ok(Pclntab {
            address: 0,
            range,
            func_id_offset,
            quantum,
            nfunc,
            text_start: read.u64(TEXT_START_OFFSET).unwrap_or(0),
            funcnames,
            cutab,
            filetab,
            pctab,
            functab,
            lines: Mutex::default(),
        })
    }

    fn data<'data>(&self, file: &'data [u8]) -> Reader<'data> {
        Reader { data: file.get(self.range.clone()).unwrap_or_default() }
    }

    /// Function `index`'s entry offset from `runtime.text`; `index == nfunc` gives the end.
    fn entry_offset(&self, data: &Reader<'_>, index: usize) -> Option<u32> {
        data.u32(self.functab + 8 * index)
    }

    /// The index of the function whose code contains `pc`.
    fn find(&self, file: &[u8], pc: u64) -> Option<usize> {
        let data = self.data(file);
        let offset = u32::try_from(pc.checked_sub(self.text_start)?).ok()?;
        // First function starting after `offset`; entries are sorted (checked when read in
        // full by `functions`, assumed here: a corrupt table gives wrong answers, not panics).
        let (mut low, mut high) = (0, self.nfunc);
        while low < high {
            let mid = low + (high - low) / 2;
            if self.entry_offset(&data, mid)? <= offset {
                low = mid + 1;
            } else {
                high = mid;
            }
        }
        let index = low.checked_sub(1)?;
        (offset < self.entry_offset(&data, index + 1)?).then_some(index)
    }

    /// Function `index`'s `_func` record offset in the table.
    fn func_record(&self, data: &Reader<'_>, index: usize) -> Option<usize> {
        let func_off = data.u32(self.functab + 8 * index + 4)?;
        self.functab.checked_add(func_off as usize)
    }

    /// Function `index` of the table.
    fn entry<'data>(&self, file: &'data [u8], index: usize) -> Result<FuncEntry<'data>, String> {
        let data = self.data(file);
        let bad = |what: &str| format!("function {index} {what}");
        let entry = self.entry_offset(&data, index).ok_or_else(|| bad("is not in the table"))?;
        let end = self.entry_offset(&data, index + 1).ok_or_else(|| bad("is not in the table"))?;
        let size = end.checked_sub(entry).ok_or_else(|| bad("is not sorted by address"))?;
        let record = self.func_record(&data, index).ok_or_else(|| bad("lies outside the table"))?;
        let name_off =
            data.u32(record + FUNC_NAME_OFF).ok_or_else(|| bad("lies outside the table"))?;
        let func_id = *data
            .data
            .get(record + self.func_id_offset)
            .ok_or_else(|| bad("lies outside the table"))?;
        let name = self
            .funcnames
            .checked_add(name_off as usize)
            .and_then(|offset| data.c_string(offset))
            .ok_or_else(|| bad("has a bad name offset"))?;
        let address = self
            .text_start
            .checked_add(u64::from(entry))
            .ok_or_else(|| bad("has an address beyond 64 bits"))?;
        Ok(FuncEntry { name, address, size: u64::from(size), func_id })
    }

    /// Every function, in address order.
    pub(super) fn functions<'data>(
        &self,
        file: &'data [u8],
    ) -> impl Iterator<Item = Result<FuncEntry<'data>, String>> {
        (0..self.nfunc).map(move |index| self.entry(file, index))
    }

    /// Function, file and line of the code at `pc` (an ELF virtual address). None if no Go
    /// function contains `pc` or its tables are unreadable.
    /// ELF virtual address of the table's header.
    pub(super) fn address(&self) -> u64 {
        self.address
    }

    pub(super) fn source_location(&self, file: &[u8], pc: u64) -> Option<SourceLocation> {
        let index = self.find(file, pc)?;
        let entry = self.entry(file, index).ok()?;
        let offset = u32::try_from(pc.checked_sub(entry.address)?).ok()?;
        let tables = self.line_tables(file, index, &entry)?;
        let file_number = value_at(&tables.files, offset)?;
        let line = value_at(&tables.lines, offset)?;
        Some(SourceLocation {
            function: entry.name.to_owned(),
            file: self.file_name(file, index, file_number)?.to_owned(),
            line: u32::try_from(line).ok()?,
        })
    }

    /// Function `index`'s decoded tables, from the cache or decoded now.
    fn line_tables(
        &self,
        file: &[u8],
        index: usize,
        entry: &FuncEntry<'_>,
    ) -> Option<Arc<LineTables>> {
        let mut cache = self.lines.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(tables) = cache.get(&index) {
            return Some(Arc::clone(tables));
        }
        let data = self.data(file);
        let record = self.func_record(&data, index)?;
        let size = u32::try_from(entry.size).ok()?;
        let table = |field: usize| {
            let offset = data.u32(record + field)?;
            decode_pcvalue(data.data.get(self.pctab..)?, offset, size, self.quantum)
        };
        let tables = Arc::new(LineTables { files: table(FUNC_PCFILE)?, lines: table(FUNC_PCLN)? });
        cache.insert(index, Arc::clone(&tables));
        Some(tables)
    }

    /// File `number` of function `index`'s compilation unit.
    fn file_name<'data>(&self, file: &'data [u8], index: usize, number: i32) -> Option<&'data str> {
        let data = self.data(file);
        let record = self.func_record(&data, index)?;
        let cu_offset = data.u32(record + FUNC_CU_OFFSET)?;
        let slot = u64::from(cu_offset) + u64::try_from(number).ok()?;
        let slot = self.cutab.checked_add(usize::try_from(slot).ok()?.checked_mul(4)?)?;
        let file_offset = data.u32(slot).filter(|&offset| offset != u32::MAX)?;
        data.c_string(self.filetab.checked_add(file_offset as usize)?)
    }
}

/// The value of a run table at `offset`.
fn value_at(runs: &[(u32, i32)], offset: u32) -> Option<i32> {
    let index = runs.partition_point(|&(end, _)| end <= offset);
    runs.get(index).map(|&(_, value)| value)
}

/// Decodes the pcvalue table at `offset` in `pctab` for a function of `size` bytes: runs of
/// (value delta as a zig-zag varint, pc delta as a varint), starting from value -1, until a
/// zero value delta after the first run, or the function's end. Pc deltas count in `quantum`
/// bytes (the instruction size quantum).
fn decode_pcvalue(pctab: &[u8], offset: u32, size: u32, quantum: u32) -> Option<Vec<(u32, i32)>> {
    if offset == 0 {
        return None; // no table
    }
    let mut at = offset as usize;
    let mut value: i32 = -1;
    let mut pc: u32 = 0;
    let mut runs = Vec::new();
    while pc < size {
        let (delta, used) = read_varint32(pctab.get(at..)?)?;
        if delta == 0 && !runs.is_empty() {
            break;
        }
        at += used;
        let (pc_delta, used) = read_varint32(pctab.get(at..)?)?;
        at += used;
        value = value.wrapping_add(((delta >> 1) as i32) ^ -((delta & 1) as i32));
        pc = pc.checked_add(pc_delta.checked_mul(quantum)?)?;
        runs.push((pc, value));
    }
    Some(runs)
}

/// An unsigned LEB128 varint of at most 32 bits, and the bytes it took.
fn read_varint32(data: &[u8]) -> Option<(u32, usize)> {
    let mut value = 0u32;
    for (index, &byte) in data.iter().enumerate().take(5) {
        value |= u32::from(byte & 0x7f) << (7 * index);
        if byte & 0x80 == 0 {
            return Some((value, index + 1));
        }
    }
    None
}

/// Where the table may be (virtual address, file range): the `.gopclntab` section
/// (`.data.rel.ro.gopclntab` in internally linked PIEs), or, when external linking merged it
/// into `.data.rel.ro` (cgo PIEs up to Go 1.25), every 8-byte-aligned header signature in the
/// allocated data sections, to the end of its section.
fn candidates(elf: &ElfFile64<'_, Endianness>, file: &[u8]) -> Vec<(u64, Range<usize>)> {
    let in_file = |section: &ElfSection64<'_, '_, Endianness>| {
        let (offset, size) = section.file_range()?;
        let start = usize::try_from(offset).ok()?;
        let end = start.checked_add(usize::try_from(size).ok()?)?;
        file.get(start..end)?;
        Some((section.address(), start..end))
    };
    if let Some(section) =
        elf.section_by_name(".gopclntab").or_else(|| elf.section_by_name(".data.rel.ro.gopclntab"))
    {
        return in_file(&section).into_iter().collect();
    }
    // (Only allocated sections have these kinds.)
    let data_sections = elf
        .sections()
        .filter(|section| matches!(section.kind(), SectionKind::ReadOnlyData | SectionKind::Data));
    let mut found = Vec::new();
    for (address, range) in data_sections.filter_map(|section| in_file(&section)) {
        let bytes = &file[range.clone()];
        let first = ((8 - address % 8) % 8) as usize;
        for at in (first..bytes.len().saturating_sub(HEADER_SIZE)).step_by(8) {
            let magic = &bytes[at..at + 4];
            let signature = (magic == MAGIC_GO118.to_le_bytes()
                || magic == MAGIC_GO120.to_le_bytes())
                && HEADER_TAILS.iter().any(|tail| bytes[at + 4..at + 8] == *tail);
            if signature {
                found.push((address + at as u64, range.start + at..range.end));
            }
        }
    }
    found
}

/// `runtime.text`, which function entries are relative to: the header's textStart up to Go
/// 1.25; from 1.26, which leaves it 0, the `runtime.text` symbol, else `runtime.moduledata.text`
/// (stripped binaries), else the start of `.text`. The last is wrong for externally linked
/// (cgo) binaries, whose `.text` starts with C code, hence the other two first.
fn text_start(
    path: &Path,
    elf: &ElfFile64<'_, Endianness>,
    table: &Pclntab,
    pclntab_address: u64,
    header_text_start: u64,
    file: &[u8],
) -> Result<u64, BinaryError> {
    if header_text_start != 0 {
        return Ok(header_text_start);
    }
    if let Some(symbol) = elf.symbols().find(|symbol| symbol.name() == Ok("runtime.text")) {
        return Ok(symbol.address());
    }
    let funcnames = pclntab_address.wrapping_add(table.funcnames as u64);
    let first_entry = table.entry_offset(&table.data(file), 0).unwrap_or(0);
    if let Some(text) = moduledata_text(elf, pclntab_address, funcnames, first_entry) {
        return Ok(text);
    }
    elf.section_by_name(".text").map(|section| section.address()).ok_or_else(|| {
        BinaryError::CorruptPclntab {
            path: path.to_owned(),
            reason: "no .text section to locate the Go text in".into(),
        }
    })
}

/// `moduledata.text` of the moduledata whose `pcHeader` is `pclntab` and `funcnametab` starts
/// at `funcnames`, in the writable segments; checked against `minpc` (the first function).
fn moduledata_text(
    elf: &ElfFile64<'_, Endianness>,
    pclntab: u64,
    funcnames: u64,
    first_entry: u32,
) -> Option<u64> {
    let endian = elf.endian();
    let writable = elf.elf_program_headers().iter().filter(|header| {
        header.p_type(endian) == elf::PT_LOAD && header.p_flags(endian) & elf::PF_W == elf::PF_W
    });
    for segment in writable {
        let Ok(bytes) = segment.data(endian, elf.data()) else {
            continue;
        };
        let read = Reader { data: bytes };
        let first = ((8 - segment.p_vaddr(endian) % 8) % 8) as usize;
        let found = (first..bytes.len()).step_by(8).find_map(|at| {
            let word = |offset: u64| read.u64(at + offset as usize);
            if word(0) != Some(pclntab) || word(MODULEDATA_FUNCNAMETAB) != Some(funcnames) {
                return None;
            }
            let text = word(MODULEDATA_TEXT)?;
            (text.checked_add(u64::from(first_entry)) == word(MODULEDATA_MINPC)).then_some(text)
        });
        if found.is_some() {
            return found;
        }
    }
    None
}

/// Bounds-checked little-endian reads.
struct Reader<'data> {
    data: &'data [u8],
}

impl<'data> Reader<'data> {
    fn bytes<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
        self.data.get(offset..offset.checked_add(N)?)?.try_into().ok()
    }

    fn u32(&self, offset: usize) -> Option<u32> {
        self.bytes(offset).map(u32::from_le_bytes)
    }

    fn u64(&self, offset: usize) -> Option<u64> {
        self.bytes(offset).map(u64::from_le_bytes)
    }

    /// A NUL-terminated UTF-8 string.
    fn c_string(&self, offset: usize) -> Option<&'data str> {
        let bytes = self.data.get(offset..)?;
        let len = bytes.iter().position(|&byte| byte == 0)?;
        std::str::from_utf8(&bytes[..len]).ok()
    }
}

#[cfg(test)]
mod tests {
    use std::{io::Write as _, process::Stdio};

    use super::*;
    use crate::binary::{
        GoBinary,
        testbin::{self, Program, TempFile, Toolchain, Variant},
    };

    fn magic(path: &Path) -> u32 {
        let bytes = std::fs::read(path).unwrap();
        let elf = ElfFile64::<Endianness>::parse(&*bytes).unwrap();
        let section = elf.section_by_name(".gopclntab").unwrap();
        u32::from_le_bytes(section.data().unwrap()[..4].try_into().unwrap())
    }

    #[test]
    fn both_magics() {
        let mut seen = Vec::new();
        for toolchain in testbin::toolchains() {
            let path = testbin::build(&toolchain, Program::Workload, Variant::Plain);
            let expected = if toolchain.minor() < 20 { MAGIC_GO118 } else { MAGIC_GO120 };
            assert_eq!(magic(&path), expected, "go{}", toolchain.version);
            seen.push(expected);
        }
        assert!(seen.contains(&MAGIC_GO118) && seen.contains(&MAGIC_GO120));
    }

    /// Function entries and a pc in the middle of each of `count` functions spread over the
    /// table, plus the last byte of each.
    fn sample_pcs(binary: &GoBinary, count: usize) -> Vec<u64> {
        let functions = binary.functions.all();
        let step = (functions.len() / count).max(1);
        functions
            .iter()
            .step_by(step)
            .flat_map(|f| [f.address, f.address + f.size / 2, f.address + f.size - 1])
            .collect()
    }

    /// `go tool addr2line` of the toolchain that built `path`: (function, file, line) per pc.
    fn go_addr2line(toolchain: &Toolchain, path: &Path, pcs: &[u64]) -> Vec<(String, String, i64)> {
        let mut child = std::process::Command::new(toolchain.go())
            .args(["tool", "addr2line"])
            .arg(path)
            .env("GOTOOLCHAIN", "local")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let input: String = pcs.iter().map(|pc| format!("{pc:#x}\n")).collect();
        child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
        let output = child.wait_with_output().unwrap();
        assert!(output.status.success(), "go tool addr2line failed");
        let text = String::from_utf8(output.stdout).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        lines
            .chunks(2)
            .map(|pair| {
                let parsed = pair[1].rsplit_once(':').and_then(|(file, line)| {
                    Some((pair[0].to_owned(), file.to_owned(), line.parse().ok()?))
                });
                parsed.unwrap_or_else(|| panic!("addr2line printed {pair:?}"))
            })
            .collect()
    }

    /// Go's own pc → line (on the unstripped build, where it knows where the Go text starts)
    /// agrees with ours on every variant: stripping and PIE change neither addresses nor lines.
    #[test]
    fn source_locations_match_go_addr2line() {
        for toolchain in testbin::toolchains() {
            for program in [Program::Workload, Program::Cgo] {
                let plain = testbin::build(&toolchain, program, Variant::Plain);
                let binary = GoBinary::open(&plain).unwrap();
                let pcs = sample_pcs(&binary, 400);
                let expected = go_addr2line(&toolchain, &plain, &pcs);
                for variant in [Variant::Plain, Variant::Stripped] {
                    let what = format!("go{} {program:?} {variant:?}", toolchain.version);
                    let binary =
                        GoBinary::open(&testbin::build(&toolchain, program, variant)).unwrap();
                    let mut known = 0;
                    for (&pc, (function, file, line)) in pcs.iter().zip(&expected) {
                        let location = binary.source_location(pc);
                        // Unknown pcs, and markers such as go:textfipsend (line -1).
                        let Ok(line) = u32::try_from(*line) else {
                            assert_eq!(location, None, "{what} {pc:#x}");
                            continue;
                        };
                        if function == "?" {
                            assert_eq!(location, None, "{what} {pc:#x}");
                            continue;
                        }
                        known += 1;
                        let expected =
                            SourceLocation { function: function.clone(), file: file.clone(), line };
                        assert_eq!(location, Some(expected), "{what} {pc:#x}");
                    }
                    assert!(known > 500, "{what}: only {known} known pcs");
                }
            }
        }
    }

    #[test]
    fn pcs_outside_go_code() {
        let toolchain = &testbin::toolchains()[0];
        let binary =
            GoBinary::open(&testbin::build(toolchain, Program::Workload, Variant::Stripped))
                .unwrap();
        let last = binary.functions.all().last().unwrap().clone();
        for pc in [0, 0x1000, last.address + last.size, u64::MAX] {
            assert_eq!(binary.source_location(pc), None, "{pc:#x}");
        }
        let main = binary.function("main.main").unwrap();
        let first = binary.source_location(main.address).unwrap();
        assert_eq!(first.function, "main.main");
        assert!(first.file.ends_with("/workload/main.go"), "{first:?}");
        // Decoded once, then cached.
        assert_eq!(binary.pclntab.lines.lock().unwrap().len(), 1);
        assert_eq!(binary.source_location(main.address + 1).unwrap().function, "main.main");
        assert_eq!(binary.pclntab.lines.lock().unwrap().len(), 1);
    }

    /// Damaged pc tables give no location rather than a wrong one or a panic.
    #[test]
    fn scrambled_pc_tables() {
        for toolchain in testbin::toolchains() {
            let path = testbin::build(&toolchain, Program::Workload, Variant::Stripped);
            let original = GoBinary::open(&path).unwrap();
            let main = original.function("main.main").unwrap();
            let (pctab, functab) = {
                let bytes = std::fs::read(&path).unwrap();
                let elf = ElfFile64::<Endianness>::parse(&*bytes).unwrap();
                let data = elf.section_by_name(".gopclntab").unwrap().data().unwrap();
                let read = Reader { data };
                let offset = |at| read.u64(at).unwrap() as usize;
                (offset(PCTAB_OFFSET), offset(FUNCTAB_OFFSET))
            };
            let broken = TempFile::patched(&path, |bytes| {
                testbin::fill_section(bytes, ".gopclntab", pctab..functab, 0xff);
            });
            let binary = GoBinary::open(broken.path()).unwrap();
            assert_eq!(binary.function("main.main"), Some(main.clone()));
            assert_eq!(binary.source_location(main.address), None, "go{}", toolchain.version);
        }
    }

    /// Single corrupted bytes anywhere in the table (header, function table, records, names, pc
    /// tables) make `open` fail or give answers, never a panic.
    #[test]
    fn corrupted_bytes_never_panic() {
        for toolchain in testbin::toolchains() {
            let path = testbin::build(&toolchain, Program::Workload, Variant::Stripped);
            let original = GoBinary::open(&path).unwrap();
            let main = original.function("main.loopDefers").unwrap();
            let len = original.pclntab.range.len();
            let mut state = 0x9e37_79b9_7f4a_7c15_u64;
            for round in 0..100 {
                // xorshift: deterministic positions, some in the header, most anywhere.
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let at = if round < 30 { state as usize % 80 } else { state as usize % len };
                let broken = TempFile::patched(&path, |bytes| {
                    testbin::fill_section(bytes, ".gopclntab", at..at + 1, (state >> 40) as u8);
                });
                let Ok(binary) = GoBinary::open(broken.path()) else {
                    continue;
                };
                for pc in [main.address, main.address + 20, 0, u64::MAX] {
                    let _ = binary.source_location(pc);
                }
                let _ = binary.heap_defer_sites();
                let _ = binary.function("runtime.deferproc");
            }
        }
    }

    #[test]
    fn pcvalue_tables() {
        // value -1 + 21 = 10 (zig-zag 20) for 4 bytes, then +1 (2) for 3, then -2 (3) for 1.
        let table = [0, 20, 4, 2, 3, 3, 1, 0];
        let runs = decode_pcvalue(&table, 1, 8, 1).unwrap();
        assert_eq!(runs, [(4, 9), (7, 10), (8, 8)]);
        assert_eq!(value_at(&runs, 0), Some(9));
        assert_eq!(value_at(&runs, 3), Some(9));
        assert_eq!(value_at(&runs, 4), Some(10));
        assert_eq!(value_at(&runs, 7), Some(8));
        assert_eq!(value_at(&runs, 8), None);
        // Stops at the function's end even without the terminator.
        assert_eq!(decode_pcvalue(&table[..5], 1, 4, 1).unwrap(), [(4, 9)]);
        // Truncated, or a varint running off the end.
        assert_eq!(decode_pcvalue(&table[..4], 1, 8, 1), None);
        assert_eq!(decode_pcvalue(&[0, 0x80, 0x80], 1, 8, 1), None);
        assert_eq!(decode_pcvalue(&table, 0, 8, 1), None);
        assert_eq!(decode_pcvalue(&table, 100, 8, 1), None);
        assert_eq!(read_varint32(&[0xac, 0x02]), Some((300, 2)));
        assert_eq!(read_varint32(&[0xff; 6]), None);
    }
}
