//! Addresses of the runtime variables a snapshot reads, also in stripped binaries:
//! `runtime.allglen` and `runtime.allgptr` (every g the runtime made, published lock-free),
//! from `.symtab` when present, otherwise from the code of `runtime.allgadd` (found through
//! `.gopclntab`), which stores both atomically (`XCHGQ` on amd64, `STLR` on arm64): first
//! `allgptr`, then `allglen` (`atomicstorep(&allgptr, …)`, `atomic.Storeuintptr(&allglen, …)`),
//! decoded per architecture (`binary::isa`).

/// Where the runtime keeps its list of goroutines (ELF virtual addresses).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AllgVariables {
    pub allglen: u64,
    pub allgptr: u64,
}
