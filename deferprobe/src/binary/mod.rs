//! Static analysis of the traced Go executable (linux/amd64 ELF): build info, function symbols,
//! virtual address → file offset for uprobes, probe placement in machine code, and runtime
//! struct offsets from DWARF. [`GoBinary`] memory-maps the file and owns the ELF-level parts;
//! the submodules own one format each.

mod buildinfo;
mod dwarf;
mod error;
pub mod prologue;
mod symbols;
#[cfg(test)]
mod testbin;

use std::{
    fs::File,
    path::{Path, PathBuf},
};

use memmap2::Mmap;
use object::{
    Architecture, Endianness, FileKind, Object as _, elf,
    read::elf::{ElfFile32, ElfFile64, FileHeader as _, ProgramHeader as _},
};

pub use buildinfo::BuildInfo;
pub use error::BinaryError;
pub use prologue::ProbeOffset;
pub use symbols::{Function, FunctionSource};

use crate::layout::RuntimeLayout;
use symbols::FunctionTable;

/// A Go executable, memory-mapped and analysed once by [`GoBinary::open`].
pub struct GoBinary {
    path: PathBuf,
    map: Mmap,
    pie: bool,
    /// File-backed parts of the PT_LOAD segments.
    segments: Vec<Segment>,
    build_info: BuildInfo,
    functions: FunctionTable,
}

#[derive(Debug)]
struct Segment {
    vaddr: u64,
    offset: u64,
    filesz: u64,
}

impl GoBinary {
    pub fn open(path: &Path) -> Result<GoBinary, BinaryError> {
        let read_error = |source| BinaryError::Read {
            path: path.to_owned(),
            source,
        };
        let file = File::open(path).map_err(read_error)?;
        // SAFETY: a read-only private mapping. Like every reader of a mapped file we rely on it
        // not being truncated underneath us (executables are replaced, not rewritten in place).
        let map = unsafe { Mmap::map(&file) }.map_err(read_error)?;
        let elf = parse_elf(path, &map)?;
        let endian = elf.endian();
        let segments = load_segments(path, &elf, map.len())?;
        let pie = elf.elf_header().e_type(endian) == elf::ET_DYN;
        let build_info = BuildInfo::read(path, &elf)?;
        let functions = FunctionTable::read(path, &elf)?;
        Ok(GoBinary {
            path: path.to_owned(),
            map,
            pie,
            segments,
            build_info,
            functions,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn build_info(&self) -> &BuildInfo {
        &self.build_info
    }

    pub fn is_pie(&self) -> bool {
        self.pie
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
        let (segment, delta) = self.segment_of(function.address)?;
        if function.size > segment.filesz - delta {
            return Err(outside());
        }
        // Both in the file, as checked by `load_segments`.
        let start = usize::try_from(segment.offset + delta).map_err(|_| outside())?;
        let len = usize::try_from(function.size).map_err(|_| outside())?;
        self.map.get(start..start + len).ok_or_else(outside)
    }

    /// ELF virtual address → file offset, through the PT_LOAD segment containing it (ET_EXEC and
    /// ET_DYN/PIE alike): what a uprobe is attached at.
    pub fn file_offset(&self, vaddr: u64) -> Result<u64, BinaryError> {
        let (segment, delta) = self.segment_of(vaddr)?;
        Ok(segment.offset + delta)
    }

    /// [`prologue::probe_offset`] for `function`, with errors naming the file and function.
    pub fn probe_offset(&self, function: &Function) -> Result<ProbeOffset, BinaryError> {
        let code = self.function_code(function)?;
        prologue::probe_offset(code, function.address)
            .map_err(|err| self.in_function(function, err))
    }

    /// [`prologue::ret_offsets`] for `function`, with errors naming the file and function.
    pub fn ret_offsets(&self, function: &Function) -> Result<Vec<u64>, BinaryError> {
        let code = self.function_code(function)?;
        prologue::ret_offsets(code, function.address).map_err(|err| self.in_function(function, err))
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
                let delta = vaddr
                    .checked_sub(segment.vaddr)
                    .filter(|&delta| delta < segment.filesz)?;
                Some((segment, delta))
            })
            .ok_or_else(|| BinaryError::UnmappedAddress {
                path: self.path.clone(),
                address: vaddr,
            })
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

/// Parses `data` as a little-endian x86-64 ELF file, telling apart "not ELF", "ELF for another
/// architecture" and "malformed".
fn parse_elf<'data>(
    path: &Path,
    data: &'data [u8],
) -> Result<ElfFile64<'data, Endianness>, BinaryError> {
    let malformed = |err: object::Error| BinaryError::MalformedElf {
        path: path.to_owned(),
        reason: err.to_string(),
    };
    let unsupported = |arch: Architecture| BinaryError::UnsupportedArchitecture {
        path: path.to_owned(),
        arch: goarch(arch),
    };
    if !data.starts_with(&elf::ELFMAG) {
        return Err(BinaryError::NotElf {
            path: path.to_owned(),
        });
    }
    match FileKind::parse(data).map_err(malformed)? {
        FileKind::Elf64 => {}
        FileKind::Elf32 => {
            return Err(unsupported(
                ElfFile32::<Endianness>::parse(data)
                    .map_err(malformed)?
                    .architecture(),
            ));
        }
        _ => {
            return Err(BinaryError::NotElf {
                path: path.to_owned(),
            });
        }
    }
    let file = ElfFile64::<Endianness>::parse(data).map_err(malformed)?;
    if file.architecture() != Architecture::X86_64 {
        return Err(unsupported(file.architecture()));
    }
    if !file.is_little_endian() {
        return Err(BinaryError::MalformedElf {
            path: path.to_owned(),
            reason: "big-endian x86-64".to_owned(),
        });
    }
    Ok(file)
}

/// The GOARCH name of an architecture, for messages.
fn goarch(arch: Architecture) -> String {
    match arch {
        Architecture::I386 => "386".to_owned(),
        Architecture::X86_64_X32 => "x32".to_owned(),
        Architecture::Aarch64 => "arm64".to_owned(),
        Architecture::Arm => "arm".to_owned(),
        Architecture::LoongArch64 => "loong64".to_owned(),
        other => format!("{other:?}").to_lowercase(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use testbin::{FUNCTIONS, TempFile};

    fn open(release: &str) -> GoBinary {
        GoBinary::open(&testbin::path(release, "workload")).unwrap()
    }

    #[test]
    fn functions() {
        for release in testbin::releases() {
            let binary = open(&release);
            assert_eq!(binary.function_source(), FunctionSource::Symtab);
            assert!(!binary.is_pie());
            for name in FUNCTIONS {
                let function = binary
                    .function(name)
                    .unwrap_or_else(|| panic!("go{release} {name}"));
                assert_eq!(function.name, name);
                assert!(
                    function.size > 0 && function.address > 0,
                    "go{release} {function:?}"
                );
            }
            assert_eq!(binary.function("runtime.deferproc2"), None);
            assert_eq!(binary.function("runtime.deferpro"), None);
        }
    }

    #[test]
    fn functions_with_prefix() {
        for release in testbin::releases() {
            let binary = open(&release);
            let found = binary.functions_with_prefix("runtime.deferproc");
            let names: Vec<&str> = found.iter().map(|f| f.name.as_str()).collect();
            assert!(
                names.contains(&"runtime.deferproc") && names.contains(&"runtime.deferprocStack")
            );
            assert!(
                found
                    .windows(2)
                    .all(|pair| pair[0].address < pair[1].address),
                "{names:?}"
            );
            assert!(
                found
                    .iter()
                    .all(|f| f.name.starts_with("runtime.deferproc"))
            );

            let sc = binary.functions_with_prefix("runtime.mallocgcSmallScanNoHeaderSC");
            if binary.build_info().release.minor >= 27 {
                let names: Vec<&str> = sc.iter().map(|f| f.name.as_str()).collect();
                let expected: Vec<String> = (1..=7)
                    .map(|n| format!("runtime.mallocgcSmallScanNoHeaderSC{n}"))
                    .collect();
                assert_eq!(names, expected, "go{release}");
            } else {
                assert_eq!(sc, [], "go{release}");
            }
            assert_eq!(binary.functions_with_prefix("no.such.package."), []);
        }
    }

    #[test]
    fn file_offsets() {
        for release in testbin::releases() {
            let binary = open(&release);
            let bytes = std::fs::read(binary.path()).unwrap();
            for name in FUNCTIONS {
                let function = binary.function(name).unwrap();
                let code = binary.function_code(&function).unwrap();
                assert_eq!(code.len() as u64, function.size);
                let offset = binary.file_offset(function.address).unwrap() as usize;
                assert_eq!(
                    &bytes[offset..offset + code.len()],
                    code,
                    "go{release} {name}"
                );
            }
            let err = binary.file_offset(0x10).unwrap_err();
            let expected = format!(
                "{}: address 0x10 is in no loadable segment",
                binary.path().display()
            );
            assert_eq!(err.to_string(), expected);
            let bogus = Function {
                name: "bogus".into(),
                address: 0x10,
                size: 1,
            };
            assert!(binary.function_code(&bogus).is_err());
            let mut too_long = binary.function("runtime.goexit1").unwrap();
            too_long.size = u64::MAX;
            let err = binary.function_code(&too_long).unwrap_err();
            assert!(
                matches!(err, BinaryError::FunctionOutsideFile { .. }),
                "{err}"
            );
        }
    }

    #[test]
    fn stripped_symbols_come_from_pclntab() {
        for release in testbin::releases() {
            let binary = open(&release);
            let stripped = TempFile::patched(binary.path(), |bytes| {
                testbin::set_section_type(bytes, ".symtab", elf::SHT_NULL.0)
            });
            let stripped = GoBinary::open(stripped.path()).unwrap();
            assert_eq!(
                stripped.function_source(),
                FunctionSource::Pclntab,
                "go{release}"
            );
            // Every .symtab function is in pclntab at the same address, under the same name less
            // the `.abi0` ELF gives one of a function and its ABI wrapper. Sizes may include the
            // padding up to the next function.
            for function in binary.functions_with_prefix("") {
                let twin = stripped.function_at(function.address);
                let twin =
                    twin.unwrap_or_else(|| panic!("go{release}: {function:?} not in pclntab"));
                let name = twin.name.replace('·', ".");
                let expected = (function.name.trim_end_matches(".abi0"), function.address);
                assert_eq!((name.as_str(), twin.address), expected, "go{release}");
                assert!(
                    twin.size >= function.size,
                    "go{release} {twin:?} vs {function:?}"
                );
                assert!(
                    twin.size < function.size + 64,
                    "go{release} {twin:?} vs {function:?}"
                );
            }
            // A name shared with an ABI wrapper resolves to the real code: the Go function
            // (runtime.goexit1 has a runtime.goexit1.abi0 wrapper in 1.27), or the assembly
            // (ELF runtime.reflectcall.abi0, whose wrapper is runtime.reflectcall).
            for name in FUNCTIONS {
                let function = stripped.function(name).unwrap();
                let original = binary.function(name).unwrap();
                assert_eq!(function.address, original.address, "go{release} {name}");
                let probe = stripped.probe_offset(&function).unwrap();
                assert_eq!(
                    probe,
                    binary.probe_offset(&original).unwrap(),
                    "go{release} {name}"
                );
            }
            let reflectcall = stripped.function("runtime.reflectcall").unwrap();
            let assembly = binary.function("runtime.reflectcall.abi0").unwrap();
            assert_eq!(reflectcall.address, assembly.address, "go{release}");
        }
    }

    #[test]
    fn no_dwarf_is_none() {
        for release in testbin::releases() {
            let path = testbin::path(&release, "workload");
            let without =
                TempFile::patched(&path, |bytes| testbin::rename_section(bytes, ".debug_info"));
            let binary = GoBinary::open(without.path()).unwrap();
            assert_eq!(
                binary.runtime_layout_from_dwarf().unwrap(),
                None,
                "go{release}"
            );
        }
    }

    #[test]
    fn scrambled_dwarf_is_an_error() {
        let path = testbin::path(&testbin::releases()[0], "workload");
        for (section, from) in [
            (".debug_info", 0),
            (".debug_info", 40),
            (".debug_abbrev", 0),
        ] {
            let broken = TempFile::patched(&path, |bytes| {
                testbin::scramble_section(bytes, section, from)
            });
            let binary = GoBinary::open(broken.path()).unwrap();
            let err = binary.runtime_layout_from_dwarf().unwrap_err();
            assert!(
                err.to_string().contains("corrupt DWARF"),
                "{section}+{from}: {err}"
            );
        }
    }

    fn open_err(file: &TempFile) -> String {
        let err = GoBinary::open(file.path()).err().expect("open should fail");
        let message = err.to_string();
        assert!(
            message.starts_with(&file.path().display().to_string()),
            "{message}"
        );
        assert!(!message.contains('\n'), "{message}");
        message
    }

    #[test]
    fn truncated_files_are_errors() {
        for release in testbin::releases() {
            let path = testbin::path(&release, "workload");
            let len = std::fs::metadata(&path).unwrap().len() as usize;
            // Every cut loses loaded segments, or the symbol or string table at the end.
            for keep in [0, 10, 100, 1024, len / 4, len / 2, len * 3 / 4, len - 4096] {
                let truncated = TempFile::patched(&path, |bytes| bytes.truncate(keep));
                open_err(&truncated);
            }
        }
    }

    #[test]
    fn scrambled_buildinfo() {
        for release in testbin::releases() {
            let path = testbin::path(&release, "workload");
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

    #[test]
    fn scrambled_pclntab_in_stripped_binary() {
        let release = &testbin::releases()[0];
        let path = testbin::path(release, "workload");
        for from in [0, 8, 64] {
            let broken = TempFile::patched(&path, |bytes| {
                testbin::set_section_type(bytes, ".symtab", elf::SHT_NULL.0);
                testbin::scramble_section(bytes, ".gopclntab", from);
            });
            let message = open_err(&broken);
            assert!(message.contains("corrupt .gopclntab"), "{message}");
        }
    }

    #[test]
    fn not_elf() {
        let text = TempFile::new("text", b"#!/bin/sh\necho hello, not an ELF file\n");
        assert_eq!(
            open_err(&text),
            format!("{}: not an ELF file", text.path().display())
        );
        let empty = TempFile::new("empty", b"");
        open_err(&empty);
        let missing = Path::new("/nonexistent/deferprobe-test-binary");
        let err = GoBinary::open(missing).err().unwrap();
        assert!(
            err.to_string()
                .starts_with("/nonexistent/deferprobe-test-binary: cannot read: "),
            "{err}"
        );
    }

    #[test]
    fn other_architectures() {
        let path = testbin::path(&testbin::releases()[0], "workload");
        let arm64 = TempFile::patched(&path, |bytes| {
            bytes[18..20].copy_from_slice(&elf::EM_AARCH64.0.to_le_bytes());
        });
        assert_eq!(
            open_err(&arm64),
            format!(
                "{}: unsupported architecture arm64 (deferprobe traces linux/amd64 Go binaries)",
                arm64.path().display()
            )
        );
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
        assert!(open_err(&i386).contains("unsupported architecture 386"));
    }
}
