//! Go's register ABI (ABIInternal) as the probes read it from `pt_regs`, for the architecture
//! this object is built for (aya-build sets `bpf_target_arch` from deferprobe's target): the
//! integer arguments, the current goroutine `g`, the stack pointer, the probed instruction's
//! address, the return address at a function's entry, whether a stack check's branch to
//! `morestack` will be taken, and the length of a call. One object per architecture; the
//! probes never name a register themselves.

use aya_ebpf::bindings::pt_regs;

use crate::context::Reads;

#[cfg(bpf_target_arch = "x86_64")]
mod imp {
    use super::*;

    /// RAX, RBX, RCX: the first three integer arguments.
    #[inline(always)]
    pub(crate) fn args(r: &pt_regs) -> [u64; 3] {
        [r.rax, r.rbx, r.rcx]
    }

    /// R14.
    #[inline(always)]
    pub(crate) fn g(r: &pt_regs) -> u64 {
        r.r14
    }

    #[inline(always)]
    pub(crate) fn sp(r: &pt_regs) -> u64 {
        r.rsp
    }

    /// The kernel sets the ip to the probed instruction before running handlers.
    #[inline(always)]
    pub(crate) fn pc(r: &pt_regs) -> u64 {
        r.rip
    }

    /// At a function's entry (before its prologue moved RSP): the word at [RSP], one
    /// user-memory read.
    #[inline(always)]
    pub(crate) fn return_address(r: &pt_regs, reads: &mut Reads) -> u64 {
        reads.u64(r.rsp)
    }

    /// At a function's entry: the caller's SP before its CALL pushed the return address.
    #[inline(always)]
    pub(crate) fn caller_sp_at_entry(r: &pt_regs) -> u64 {
        r.rsp + 8
    }

    /// On a stack check's `JBE`: taken (to `morestack`) when CF or ZF is set.
    #[inline(always)]
    pub(crate) fn stack_check_taken(r: &pt_regs) -> bool {
        r.eflags & deferprobe_common::amd64::JBE_TAKEN_FLAGS != 0
    }

    pub(crate) const CALL_LEN: u64 = deferprobe_common::amd64::CALL_LEN;
}

#[cfg(bpf_target_arch = "aarch64")]
mod imp {
    use super::*;

    /// R0, R1, R2: the first three integer arguments.
    #[inline(always)]
    pub(crate) fn args(r: &pt_regs) -> [u64; 3] {
        [r.regs[0], r.regs[1], r.regs[2]]
    }

    /// R28.
    #[inline(always)]
    pub(crate) fn g(r: &pt_regs) -> u64 {
        r.regs[28]
    }

    #[inline(always)]
    pub(crate) fn sp(r: &pt_regs) -> u64 {
        r.sp
    }

    /// The kernel sets the pc to the probed instruction before running handlers.
    #[inline(always)]
    pub(crate) fn pc(r: &pt_regs) -> u64 {
        r.pc
    }

    /// At a function's entry (before its prologue saved it): the link register, R30.
    #[inline(always)]
    pub(crate) fn return_address(r: &pt_regs, _reads: &mut Reads) -> u64 {
        r.regs[30]
    }

    /// At a function's entry: the caller's SP (BL pushes nothing).
    #[inline(always)]
    pub(crate) fn caller_sp_at_entry(r: &pt_regs) -> u64 {
        r.sp
    }

    /// On a stack check's `B.LS`: taken (to `morestack`) when Z is set or C clear.
    #[inline(always)]
    pub(crate) fn stack_check_taken(r: &pt_regs) -> bool {
        deferprobe_common::arm64::bls_taken(r.pstate)
    }

    pub(crate) const CALL_LEN: u64 = deferprobe_common::arm64::CALL_LEN;
}

pub(crate) use imp::*;
