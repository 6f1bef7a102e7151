//! [`BinaryError`]: everything that can go wrong while analysing a Go executable, as one-line
//! messages that name the file (or, for bare machine code, the address) and the problem.

use std::{io, path::PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum BinaryError {
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: not an ELF file", path.display())]
    NotElf { path: PathBuf },
    /// An executable for another system or processor, named by what it is (`a Windows PE
    /// file`, `a FreeBSD ELF file (GOOS=freebsd)`, `a linux/arm64 ELF file`).
    #[error("{}: {what}; deferprobe reads linux/amd64 and linux/arm64 Go binaries", path.display())]
    UnsupportedPlatform { path: PathBuf, what: String },
    /// A Go binary for another processor than the one deferprobe runs on: `inspect` reads it,
    /// but its processes can't be probed from here.
    #[error(
        "{}: a linux/{binary} Go binary; this deferprobe runs on linux/{host} and traces only \
         linux/{host} programs (`inspect` reads both)",
        path.display()
    )]
    ForeignArch { path: PathBuf, binary: crate::arch::Arch, host: crate::arch::Arch },
    #[error("{}: malformed ELF: {reason}", path.display())]
    MalformedElf { path: PathBuf, reason: String },
    #[error("{}: not a Go binary (no .go.buildinfo section)", path.display())]
    NotGo { path: PathBuf },
    #[error(
        "{}: built by Go older than 1.18, but deferprobe supports Go {} to {}",
        path.display(),
        crate::plan::OLDEST_SUPPORTED,
        crate::plan::NEWEST_SUPPORTED
    )]
    GoTooOld { path: PathBuf },
    #[error("{}: corrupt .go.buildinfo: {reason}", path.display())]
    CorruptBuildInfo { path: PathBuf, reason: String },
    #[error("{}: unrecognised Go version {version:?} in .go.buildinfo", path.display())]
    UnknownVersion { path: PathBuf, version: String },
    #[error("{}: corrupt symbol table: {reason}", path.display())]
    CorruptSymbols { path: PathBuf, reason: String },
    #[error("{}: corrupt .gopclntab: {reason}", path.display())]
    CorruptPclntab { path: PathBuf, reason: String },
    #[error("{}: no .gopclntab (the Go function table) found", path.display())]
    NoPclntab { path: PathBuf },
    #[error("{}: address {address:#x} is in no loadable segment", path.display())]
    UnmappedAddress { path: PathBuf, address: u64 },
    #[error(
        "{}: {function} ({address:#x}, {size} bytes) is not entirely in the file",
        path.display()
    )]
    FunctionOutsideFile { path: PathBuf, function: String, address: u64, size: u64 },
    #[error("{}: corrupt DWARF: {reason}", path.display())]
    CorruptDwarf { path: PathBuf, reason: String },
    #[error("{}: DWARF does not describe {what}", path.display())]
    IncompleteDwarf { path: PathBuf, what: String },
    /// From the [`super::prologue`] functions, which see bytes and an address but no file.
    #[error("machine code at {address:#x}: {reason}")]
    Code { address: u64, reason: String },
    /// A [`BinaryError::Code`] problem in a named function of a file.
    #[error("{}: {function} at {address:#x}: {reason}", path.display())]
    FunctionCode { path: PathBuf, function: String, address: u64, reason: String },
}
