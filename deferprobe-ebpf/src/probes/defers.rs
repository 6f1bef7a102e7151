//! Defer registration and release: `CALL runtime.deferproc` sites, `runtime.deferprocat`,
//! `runtime.deferprocStack`, `CALL runtime.deferreturn` sites, and `runtime.fatalpanic`.

use aya_ebpf::{bindings::pt_regs, programs::ProbeContext};
use deferprobe_common::{Counter, DeferRegistered, DeferReturn, EventKind, GoroutinePanicked};

use crate::{arch, context::*};

/// A heap defer: `runtime.deferproc(fn)`, probed on each `CALL`/`BL runtime.deferproc` (the
/// probe's address gives the defer site: its return address is the call + its length, and SP is
/// the calling frame's SP); `runtime.deferprocat(fn, frame)`, probed at its entry (the return
/// address is read from the stack on amd64, the link register on arm64). Argument 0 = the
/// closure, sent as it is: what it captures is read from the
/// runtime's state by userspace's snapshots, with the closure's type from the binary.
///
/// User-memory reads are what a hit costs most (about 120 ns each on the development VMs): a
/// registration reads only the goroutine id, once per goroutine (it is cached).
#[inline(always)]
pub(crate) fn on_deferproc_call(ctx: &ProbeContext) -> u32 {
    let r = regs(ctx);
    on_heap_defer(r, arch::pc(r) + arch::CALL_LEN, arch::sp(r), Reads::new())
}

/// `runtime.deferprocat` at its entry, on its stack check's branch: the return address and the
/// caller's SP are still where the call left them.
#[inline(always)]
pub(crate) fn on_deferprocat(ctx: &ProbeContext) -> u32 {
    let r = regs(ctx);
    let mut reads = Reads::new();
    let caller_pc = arch::return_address(r, &mut reads);
    on_heap_defer(r, caller_pc, arch::caller_sp_at_entry(r), reads)
}

/// The event of a heap defer registered by the frame at `caller_sp`, at `caller_pc`: the
/// closure pointer only. What the closure captures comes from snapshots of the runtime's state.
#[inline(always)]
pub(crate) fn on_heap_defer(r: &pt_regs, caller_pc: u64, caller_sp: u64, mut reads: Reads) -> u32 {
    bump(Counter::DeferProc, 1);
    let g = arch::g(r);
    let event = DeferRegistered {
        header: timed_header(EventKind::DeferRegistered, goid_of(g).unwrap_or(0)),
        closure: arch::args(r)[0],
        caller_pc,
        caller_sp,
        g,
        stack_hi: reads.u64(g + G_STACK_HI),
    };
    reads.finish();
    emit(event);
    0
}

/// `runtime.deferprocStack(d)`: a stack record; it can't accumulate, so it is only counted.
#[inline(always)]
pub(crate) fn on_deferproc_stack(_ctx: &ProbeContext) -> u32 {
    bump(Counter::DeferProcStack, 1);
    0
}

/// A `CALL`/`BL runtime.deferreturn` in a frame that owns heap records (the probe sits on the
/// call, not on deferreturn's entry: see the probe plan): SP is the frame's SP, the records it runs
/// are those with that sp. Reads the goroutine id (cached) and `g.stack.hi`.
#[inline(always)]
pub(crate) fn on_deferreturn(ctx: &ProbeContext) -> u32 {
    bump(Counter::DeferReturn, 1);
    let r = regs(ctx);
    let g = arch::g(r);
    let mut reads = Reads::new();
    let event = DeferReturn {
        header: header(EventKind::DeferReturn, goid_of(g).unwrap_or(0)),
        caller_pc: arch::pc(r) + arch::CALL_LEN,
        caller_sp: arch::sp(r),
        stack_hi: reads.u64(g + G_STACK_HI),
    };
    reads.finish();
    emit(event);
    0
}

/// Offset of `stack.hi` in `runtime.g` (`stack` is its first field in every release).
pub(crate) const G_STACK_HI: u64 = 8;

/// `runtime.fatalpanic(msgs)`, which `gopanic` calls when nothing recovered the panic of the
/// current goroutine (g): every deferred call of that goroutine has run (none through deferreturn),
/// and the process dies next. Hit once in a program's life, so the goroutine id is read here.
#[inline(always)]
pub(crate) fn on_fatalpanic(ctx: &ProbeContext) -> u32 {
    let goid = goid_of(arch::g(regs(ctx))).unwrap_or(0);
    emit(GoroutinePanicked { header: header(EventKind::GoroutinePanicked, goid) });
    0
}
