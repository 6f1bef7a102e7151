//! deferprobe's kernel side: entry-style uprobes on Go runtime functions.
//!
//! Each probe family has one program. Every hit first bumps its per-CPU counter (exact, even
//! when the ring buffer is full), then, for defer bookkeeping, writes a compact event to the
//! ring buffer without waking the reader (userspace drains on a timer).
//!
//! Go passes arguments in registers (ABIInternal: RAX, RBX, RCX, ... and R14 = current g on
//! amd64; R0, R1, R2, ... and R28 = g on arm64), so the probes read `pt_regs` through the
//! per-architecture accessors of `arch.rs` instead of `ctx.arg(n)` (C ABI order).
//! Probes sit on instructions the kernel emulates (see the probe plan in userspace): a runtime
//! function's stack-check branch (`JBE`, `B.LS`), where the return address is still where the
//! call left it and the arguments are still in registers (a hit there counts only when the
//! branch falls through: see [`goes_to_morestack`]), and the `CALL`/`BL runtime.deferproc` /
//! `runtime.deferreturn` instructions of the frames that own heap records.
//!
//! Layout: `maps.rs` (what the probes share with userspace), `context.rs` (counters,
//! registers, reads, events), `probes/` (one file per probe area), and here the programs'
//! entry points.
#![no_std]
#![no_main]
// The BPF target has no AtomicU64::fetch_add; the intrinsic lowers to BPF_ATOMIC_ADD.
#![allow(internal_features)]
#![feature(core_intrinsics)]

mod arch;
mod context;
mod maps;
mod probes;

use aya_ebpf::{
    EbpfContext as _,
    helpers::generated::bpf_get_attach_cookie,
    macros::{raw_tracepoint, uprobe},
    programs::{ProbeContext, RawTracePointContext},
};
use deferprobe_common::{COOKIE_FALLS_THROUGH, Gate};

use crate::{
    context::regs,
    maps::GATES,
    probes::{allocations::*, defers::*, goroutines::*, map_writes::*, processes::*},
};

/// A probe on a stack check's branch (`JBE`, `B.LS`; attach cookie [`COOKIE_FALLS_THROUGH`])
/// that will be taken: the function calls `morestack` and starts again, so this pass is not a
/// call. The kernel runs handlers before it emulates the instruction: the flags are the `CMP`'s.
#[inline(always)]
fn goes_to_morestack(ctx: &ProbeContext) -> bool {
    // SAFETY: the helper reads the cookie of the link that ran this program.
    let cookie = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) };
    cookie & COOKIE_FALLS_THROUGH != 0 && arch::stack_check_taken(regs(ctx))
}

/// A sampled family's probe while userspace has its counting gate closed (the family is being
/// detached): the hit is neither counted nor reported.
#[inline(always)]
fn gate_closed(gate: Option<Gate>) -> bool {
    gate.is_some_and(|gate| GATES.get(gate as u32).copied().unwrap_or(0) == 0)
}

// Every program exists twice: as a classic uprobe (one perf event per attach point, any
// kernel >= 5.8) and as a multi-uprobe (one link for all points of a program: attaching and,
// above all, detaching are far faster). Userspace picks the multi form when the kernel
// supports process-scoped multi-uprobes.
macro_rules! entry_points {
    ($($single:ident, $multi:ident => $handler:ident, $gate:expr;)*) => {$(
        #[uprobe]
        pub fn $single(ctx: ProbeContext) -> u32 {
            if goes_to_morestack(&ctx) || gate_closed($gate) {
                return 0;
            }
            $handler(&ctx)
        }

        #[uprobe(multi)]
        pub fn $multi(ctx: ProbeContext) -> u32 {
            if goes_to_morestack(&ctx) || gate_closed($gate) {
                return 0;
            }
            $handler(&ctx)
        }
    )*};
}

/// deferprobe's calibration probe, on a function of deferprobe itself: measures what one
/// uprobe hit costs on this machine (the governor's unit). Does nothing else.
#[inline(always)]
fn on_calibrate(_ctx: &ProbeContext) -> u32 {
    0
}

entry_points! {
    calibrate, calibrate_multi => on_calibrate, None;
    mapassign, mapassign_multi => on_mapassign, Some(Gate::MapWrites);
    deferproc, deferproc_multi => on_deferproc_call, None;
    deferprocat, deferprocat_multi => on_deferprocat, None;
    deferproc_stack, deferproc_stack_multi => on_deferproc_stack, Some(Gate::StackDefers);
    deferreturn, deferreturn_multi => on_deferreturn, None;
    mallocgc, mallocgc_multi => on_mallocgc, Some(Gate::Allocations);
    mallocgc_size_class, mallocgc_size_class_multi => on_mallocgc_size_class, Some(Gate::Allocations);
    goexit1, goexit1_multi => on_goexit1, Some(Gate::GoroutineExits);
    fatalpanic, fatalpanic_multi => on_fatalpanic, None;
    profilealloc, profilealloc_multi => on_profilealloc, Some(Gate::Allocations);
}

// The traced command's process tree (`run -- CMD`): raw tracepoints, which need no tracefs.
#[raw_tracepoint(tracepoint = "sched_process_fork")]
pub fn process_fork(ctx: RawTracePointContext) -> i32 {
    on_process_fork(&ctx) as i32
}

#[raw_tracepoint(tracepoint = "sched_process_exec")]
pub fn process_exec(ctx: RawTracePointContext) -> i32 {
    on_process_exec(&ctx) as i32
}

#[raw_tracepoint(tracepoint = "sched_process_exit")]
pub fn process_exit(ctx: RawTracePointContext) -> i32 {
    on_process_exit(&ctx) as i32
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
