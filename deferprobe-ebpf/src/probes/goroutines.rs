//! `runtime.goexit1`: goroutine exits.

use aya_ebpf::programs::ProbeContext;
use deferprobe_common::{Counter, EventKind, GoroutineExit};

use crate::{arch, context::*, maps::*};

/// `runtime.goexit1()`: the current goroutine (g) is ending; g structs are reused afterwards, so its
/// id is forgotten. Only goroutines the defer probes have seen (their id is cached in this
/// generation) can hold records userspace tracks: only their exits are events. In a service
/// that starts a goroutine per request, most exits are of goroutines that never deferred on the
/// heap, and this keeps their probe hit to a lookup and a counter. (A goroutine whose cached id
/// was evicted, or whose records were found pending at attach, is released by reconciliation
/// instead.) While the cache is off, goexit1 is attached only to count exits.
#[inline(always)]
pub(crate) fn on_goexit1(ctx: &ProbeContext) -> u32 {
    bump(Counter::GoroutineExit, 1);
    let g = arch::g(regs(ctx));
    // SAFETY: the value is copied out at once.
    let Some(cached) = (unsafe { GOROUTINE_IDS.get(&g) }).copied() else { return 0 };
    let _ = GOROUTINE_IDS.remove(&g);
    if cached.generation == GOROUTINE_ID_CACHE.get(0).copied().unwrap_or(0) {
        emit(GoroutineExit { header: header(EventKind::GoroutineExit, cached.goid) });
    }
    0
}
