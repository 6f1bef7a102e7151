//! `runtime.mallocgc`, the size-specialized entries and `runtime.profilealloc`.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::programs::ProbeContext;
use deferprobe_common::{AllocSampled, Counter, EventKind};

use crate::{arch, context::*, maps::*};

/// `runtime.mallocgc(size, typ, needzero)`: argument 0 = size. Sizes it forwards to the Go 1.26+
/// size-specialized entries are counted there instead.
#[inline(always)]
pub(crate) fn on_mallocgc(ctx: &ProbeContext) -> u32 {
    let size = arch::args(regs(ctx))[0];
    if size != 0 && size <= PROBE_CONFIG.load().size_specialized_max {
        return 0;
    }
    count_allocation(size);
    0
}

/// Go 1.26+/1.27's size-specialized entries (`mallocgcTinySC*`, `mallocgcSmall*SC*`), same
/// registers as mallocgc: called directly by user code, or by mallocgc (which left them out).
#[inline(always)]
pub(crate) fn on_mallocgc_size_class(ctx: &ProbeContext) -> u32 {
    count_allocation(arch::args(regs(ctx))[0]);
    0
}

/// One allocation of `size` bytes: both counters in one map lookup.
#[inline(always)]
pub(crate) fn count_allocation(size: u64) {
    if let Some(counters) = COUNTERS.get_ptr_mut(0) {
        // SAFETY: as in `bump`.
        unsafe {
            let values = &raw mut (*counters).values;
            let calls = &raw mut (*values)[Counter::Malloc as usize];
            atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(calls, 1);
            let bytes = &raw mut (*values)[Counter::AllocBytes as usize];
            atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(bytes, size);
        }
    }
}

/// `runtime.profilealloc(mp, x, size)` (`--alloc-mode profiled`): the runtime sampled this
/// allocation for its memory profile. Argument 2 = size (rounded to its size class).
#[inline(always)]
pub(crate) fn on_profilealloc(ctx: &ProbeContext) -> u32 {
    let size = arch::args(regs(ctx))[2];
    bump(Counter::AllocSamples, 1);
    bump(Counter::AllocSampledBytes, size);
    emit(AllocSampled { header: header(EventKind::AllocSampled, 0), size });
    0
}
