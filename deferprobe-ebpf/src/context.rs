//! What every probe uses: counters, registers, user-memory reads, goroutine ids, event
//! headers and the ring buffer.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    bindings::{BPF_RB_NO_WAKEUP, pt_regs},
    helpers::{bpf_get_smp_processor_id, bpf_ktime_get_ns, bpf_probe_read_user},
    programs::ProbeContext,
};
use deferprobe_common::{Counter, EventHeader, EventKind};

use crate::maps::*;

/// Adds `by` to a per-CPU counter. Atomic because uprobe programs run with migration, not
/// preemption, disabled: two tasks on one CPU can interleave a plain read-modify-write.
#[inline(always)]
pub(crate) fn bump(counter: Counter, by: u64) {
    if let Some(counters) = COUNTERS.get_ptr_mut(0) {
        // SAFETY: the map value lives as long as the map; index is a compile-time constant.
        unsafe {
            let slot = &raw mut (*counters).values[counter as usize];
            atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(slot, by);
        }
    }
}

#[inline(always)]
pub(crate) fn regs(ctx: &ProbeContext) -> &pt_regs {
    // SAFETY: the kernel hands every uprobe program a valid pt_regs.
    unsafe { &*ctx.regs }
}

#[inline(always)]
pub(crate) fn read_user_u64(addr: u64) -> Option<u64> {
    // SAFETY: bpf_probe_read_user checks the address; failure is an Err, not a fault.
    unsafe { bpf_probe_read_user(addr as *const u64) }.ok()
}

/// `g.goid` of the goroutine in `g` (R14), or None when it can't be read. Events that need the
/// goroutine carry goid 0 then, and userspace counts them (`without_goroutine_id`).
///
/// From [`GOROUTINE_IDS`] when the cache is on and has it: a hash lookup costs well under half
/// a user-memory read.
#[inline(always)]
pub(crate) fn goid_of(g: u64) -> Option<u64> {
    let generation = GOROUTINE_ID_CACHE.get(0).copied().unwrap_or(0);
    if generation != 0 {
        // SAFETY: the value is copied out at once.
        if let Some(cached) = unsafe { GOROUTINE_IDS.get(&g) }.copied()
            && cached.generation == generation
        {
            return Some(cached.goid);
        }
    }
    let goid = read_user_u64(g + PROBE_CONFIG.load().g_goid)?;
    if generation != 0 {
        let _ = GOROUTINE_IDS.insert(&g, &CachedGoroutineId { goid, generation }, 0);
    }
    Some(goid)
}

/// Tracks the user-memory reads of one probe hit that must succeed; a hit with any failed read
/// is counted once ([`Counter::UserReadFailed`]).
pub(crate) struct Reads {
    pub(crate) failed: bool,
}

impl Reads {
    #[inline(always)]
    pub(crate) fn new() -> Reads {
        Reads { failed: false }
    }

    /// The word at `addr`, or 0 (recorded as a failure).
    #[inline(always)]
    pub(crate) fn u64(&mut self, addr: u64) -> u64 {
        match read_user_u64(addr) {
            Some(value) => value,
            None => {
                self.failed = true;
                0
            }
        }
    }

    /// Counts the hit if any read failed.
    #[inline(always)]
    pub(crate) fn finish(self) {
        if self.failed {
            bump(Counter::UserReadFailed, 1);
        }
    }
}

/// An event header with the time: only registrations need it (the age of pending records, and
/// telling them apart from records found in a chain read). Reading the clock costs about 50 ns
/// a hit on the development VMs; the ring buffer's order already orders events.
#[inline(always)]
pub(crate) fn timed_header(kind: EventKind, goid: u64) -> EventHeader {
    EventHeader {
        // SAFETY: plain helper call without arguments.
        ktime_ns: unsafe { bpf_ktime_get_ns() },
        ..header(kind, goid)
    }
}

/// An event header without the time (`ktime_ns` 0).
#[inline(always)]
pub(crate) fn header(kind: EventKind, goid: u64) -> EventHeader {
    EventHeader {
        kind: kind as u32,
        // SAFETY: plain helper call without arguments.
        cpu: unsafe { bpf_get_smp_processor_id() },
        ktime_ns: 0,
        goid,
    }
}

/// Writes `event` to the ring buffer without waking the reader; counts it when the buffer is
/// full.
#[inline(always)]
pub(crate) fn emit<T: 'static>(event: T) {
    match EVENTS.reserve::<T>(0) {
        Some(mut entry) => {
            entry.write(event);
            entry.submit(BPF_RB_NO_WAKEUP as u64);
        }
        None => bump(Counter::LostRingFull, 1),
    }
}
