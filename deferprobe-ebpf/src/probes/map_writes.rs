//! `runtime.mapassign*`: map writes, and the maps written while traced.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::programs::ProbeContext;
use deferprobe_common::{
    Counter, EventKind, KnownMap, MapSeen, RECENT_MAP_FLUSH_EVERY, recent_map_slot,
};

use crate::{arch, context::*, maps::*};

/// `runtime.mapassign`, `_fast32`, `_fast64`, `_fast64ptr`, `_faststr`: argument 0 = map
/// type, argument 1 = the map. A new map enters the known-maps set and is announced to userspace once.
///
/// Maps are mostly written in runs (a loop filling one map), so a per-CPU cache of recently
/// written maps sits in front of the set: a write to the map in its slot only bumps the slot's
/// count (an array access), skipping the hash lookup. Every [`RECENT_MAP_FLUSH_EVERY`] writes,
/// and when another map takes the slot, the count moves to the map's known-maps entry.
#[inline(always)]
pub(crate) fn on_mapassign(ctx: &ProbeContext) -> u32 {
    bump(Counter::MapAssign, 1);
    let r = regs(ctx);
    let [map_type, map, _] = arch::args(r);
    let mut writes = 1;
    if let Some(slot) = RECENT_MAPS.get_ptr_mut(recent_map_slot(map)) {
        // SAFETY: a per-CPU map value. Counts only change by atomic adds (the BPF target here
        // has no fetching atomics, so "take the count" is a read, then subtracting what was
        // read), so a task preempted inside this probe on the same CPU loses no write.
        unsafe {
            let slot_writes = &raw mut (*slot).writes;
            if (*slot).map == map {
                atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(slot_writes, 1);
                let pending = *slot_writes;
                if pending < RECENT_MAP_FLUSH_EVERY {
                    return 0;
                }
                atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(
                    slot_writes,
                    pending.wrapping_neg(),
                );
                writes = pending;
            } else {
                let (old_map, old_writes) = ((*slot).map, *slot_writes);
                (*slot).map = map;
                atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(
                    slot_writes,
                    old_writes.wrapping_neg(),
                );
                if old_writes != 0 {
                    add_known_map_writes(old_map, old_writes);
                }
            }
        }
    }
    if add_known_map_writes(map, writes) {
        return 0;
    }
    let known = KnownMap { writes, map_type };
    if KNOWN_MAPS.insert(&map, &known, 0).is_ok() {
        bump(Counter::MapsSeen, 1);
        let mut reads = Reads::new();
        // The goroutine is only informative here: a missing one makes the event incomplete.
        let goid = reads.u64(arch::g(r) + PROBE_CONFIG.load().g_goid);
        let caller_pc = arch::return_address(r, &mut reads);
        reads.finish();
        emit(MapSeen { header: header(EventKind::MapSeen, goid), map, map_type, caller_pc });
    }
    0
}

/// Adds `writes` to `map`'s known-maps entry; false if it has none (new, or evicted).
#[inline(always)]
pub(crate) fn add_known_map_writes(map: u64, writes: u64) -> bool {
    match KNOWN_MAPS.get_ptr_mut(&map) {
        Some(known) => {
            // SAFETY: a value pointer from the map; the atomic add tolerates concurrent writers.
            unsafe {
                atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(
                    &raw mut (*known).writes,
                    writes,
                )
            };
            true
        }
        None => false,
    }
}
