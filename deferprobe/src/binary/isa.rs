//! Machine-code decoding, one implementation per architecture behind [`Isa`]: where a probe
//! goes in a function (its stack check, or the first instruction the kernel emulates), the
//! direct calls to given functions (heap-defer sites, `deferreturn` calls), the closures a
//! function builds, and the runtime variables `runtime.allgadd` stores to. [`for_arch`] is the
//! one place that picks the implementation; `amd64` decodes with iced-x86, `arm64` with
//! yaxpeax-arm.

use super::{
    AllgVariables, BinaryError,
    closures::{Built, Callees},
    prologue::ProbeSpot,
};
use crate::arch::{Arch, GoRegister};

/// One direct call (`CALL rel32`, `BL`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DirectCall {
    /// The call instruction.
    pub address: u64,
    /// The instruction after it: what the callee sees as its return address.
    pub return_address: u64,
    pub target: u64,
}

/// What deferprobe decodes in a function's machine code (`code`, the function at `address`).
pub(crate) trait Isa: Sync {
    /// Where a probe sees each call once, on an instruction the kernel emulates, with the
    /// registers in `reads` still holding what they held at entry: the stack check's branch
    /// (counting fall-throughs only); in a nosplit function the first emulated instruction of
    /// the straight-line code at its entry, provided none of `reads` is written before it and
    /// no branch leads back into that code; otherwise the entry (maybe single-stepped).
    fn probe_spot(
        &self,
        code: &[u8],
        address: u64,
        reads: &[GoRegister],
    ) -> Result<ProbeSpot, BinaryError>;

    /// Every direct call in `code` whose target is one of `targets`.
    fn direct_calls(
        &self,
        code: &[u8],
        address: u64,
        targets: &[u64],
    ) -> Result<Vec<DirectCall>, BinaryError>;

    /// Every closure built in `code`, and the closure each call to a defer function passes.
    /// `is_type` says whether an address can be a type descriptor, `is_function` whether it is
    /// a function's entry.
    fn closures_built(
        &self,
        code: &[u8],
        address: u64,
        callees: &Callees,
        is_type: &dyn Fn(u64) -> bool,
        is_function: &dyn Fn(u64) -> bool,
    ) -> Built;

    /// `runtime.allglen` and `runtime.allgptr`, from `runtime.allgadd`'s code.
    fn allg_from_allgadd(&self, code: &[u8], address: u64) -> Option<AllgVariables>;
}

/// The decoder for `arch`.
pub(crate) fn for_arch(arch: Arch) -> &'static dyn Isa {
    match arch {
        Arch::Amd64 => &super::amd64::Amd64,
        Arch::Arm64 => &super::arm64::Arm64,
    }
}
