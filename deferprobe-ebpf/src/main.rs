//! deferprobe's kernel side: entry-style uprobes on Go runtime functions.
//!
//! Each probe family has one program. Every hit first bumps its per-CPU counter (exact, even
//! when the ring buffer is full), then, for defer bookkeeping, writes a compact event to the
//! ring buffer without waking the reader (userspace drains on a timer).
//!
//! Go passes arguments in registers (ABIInternal: RAX, RBX, RCX, RDI, ...; R14 = current g), so
//! the probes read `pt_regs` fields directly instead of `ctx.arg(n)` (C ABI order).
//! Probes sit just after each function's stack-check branch (see the probe plan in userspace),
//! where RSP still points at the return address and the arguments are still in registers;
//! the deferreturn probe sits on the `CALL runtime.deferreturn` instructions of the frames that
//! own heap records.
#![no_std]
#![no_main]
// The BPF target has no AtomicU64::fetch_add; the intrinsic lowers to BPF_ATOMIC_ADD.
#![allow(internal_features)]
#![feature(core_intrinsics)]

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    EbpfContext as _, Global,
    bindings::{BPF_RB_NO_WAKEUP, pt_regs},
    helpers::{
        bpf_get_smp_processor_id, bpf_ktime_get_ns, bpf_probe_read_user,
        generated::bpf_get_attach_cookie,
    },
    macros::{map, uprobe},
    maps::{Array, LruHashMap, PerCpuArray, RingBuf},
    programs::ProbeContext,
};
use deferprobe_common::{
    AllocSampled, CALL_REL32_LEN, COOKIE_FALLS_THROUGH, Counter, Counters, DeferRegistered,
    DeferReturn, EVENT_RING_BYTES, EventHeader, EventKind, GOROUTINE_IDS_CAPACITY, GoroutineExit,
    GoroutinePanicked, JBE_TAKEN_FLAGS, KNOWN_MAPS_CAPACITY, KnownMap, MapSeen, ProbeConfig,
    RECENT_MAP_FLUSH_EVERY, RECENT_MAP_SLOTS, RecentMap, recent_map_slot,
};

/// Runtime struct offsets, written by userspace before load.
#[unsafe(no_mangle)]
static PROBE_CONFIG: Global<ProbeConfig> = Global::new(ProbeConfig::ZERO);

#[map]
static COUNTERS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(1, 0);

/// Maps written while tracing (key: map pointer): each is announced to userspace once (where it
/// was first written), and its writes are counted. Bounded: least recently written maps are
/// evicted.
#[map]
static KNOWN_MAPS: LruHashMap<u64, KnownMap> = LruHashMap::with_max_entries(KNOWN_MAPS_CAPACITY, 0);

/// Goroutine ids by g (R14), so that defer probes need not read `g.goid` on every hit. A g
/// changes goroutine only through `runtime.goexit1` (the runtime hands out a new goid when it
/// reuses the g), whose probe removes it; bounded, least recently used first out. Used only
/// while [`GOROUTINE_ID_CACHE`] says goexit1 is attached; entries of an earlier generation are
/// ignored (their goroutine may have ended unseen).
#[map]
static GOROUTINE_IDS: LruHashMap<u64, CachedGoroutineId> =
    LruHashMap::with_max_entries(GOROUTINE_IDS_CAPACITY, 0);

/// The generation of [`GOROUTINE_IDS`] in use, 0 while the cache is off. Userspace turns the
/// cache on (a new generation) after attaching goexit1, and off before detaching it.
#[map]
static GOROUTINE_ID_CACHE: Array<u64> = Array::with_max_entries(1, 0);

#[derive(Clone, Copy)]
struct CachedGoroutineId {
    goid: u64,
    generation: u64,
}

/// Per-CPU cache of recently written maps in front of `KNOWN_MAPS` (see `on_mapassign`).
#[map]
static RECENT_MAPS: PerCpuArray<RecentMap> = PerCpuArray::with_max_entries(RECENT_MAP_SLOTS, 0);

#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(EVENT_RING_BYTES, 0);

/// Adds `by` to a per-CPU counter. Atomic because uprobe programs run with migration, not
/// preemption, disabled: two tasks on one CPU can interleave a plain read-modify-write.
#[inline(always)]
fn bump(counter: Counter, by: u64) {
    if let Some(counters) = COUNTERS.get_ptr_mut(0) {
        // SAFETY: the map value lives as long as the map; index is a compile-time constant.
        unsafe {
            let slot = &raw mut (*counters).values[counter as usize];
            atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(slot, by);
        }
    }
}

#[inline(always)]
fn regs(ctx: &ProbeContext) -> &pt_regs {
    // SAFETY: the kernel hands every uprobe program a valid pt_regs.
    unsafe { &*ctx.regs }
}

#[inline(always)]
fn read_user_u64(addr: u64) -> Option<u64> {
    // SAFETY: bpf_probe_read_user checks the address; failure is an Err, not a fault.
    unsafe { bpf_probe_read_user(addr as *const u64) }.ok()
}

/// `g.goid` of the goroutine in `g` (R14), or None when it can't be read. Events that need the
/// goroutine carry goid 0 then, and userspace counts them (`without_goroutine_id`).
///
/// From [`GOROUTINE_IDS`] when the cache is on and has it: a hash lookup costs well under half
/// a user-memory read.
#[inline(always)]
fn goid_of(g: u64) -> Option<u64> {
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
struct Reads {
    failed: bool,
}

impl Reads {
    #[inline(always)]
    fn new() -> Reads {
        Reads { failed: false }
    }

    /// The word at `addr`, or 0 (recorded as a failure).
    #[inline(always)]
    fn u64(&mut self, addr: u64) -> u64 {
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
    fn finish(self) {
        if self.failed {
            bump(Counter::UserReadFailed, 1);
        }
    }
}

/// An event header with the time: only registrations need it (the age of pending records, and
/// telling them apart from records found in a chain read). Reading the clock costs about 50 ns
/// a hit on the development VMs; the ring buffer's order already orders events.
#[inline(always)]
fn timed_header(kind: EventKind, goid: u64) -> EventHeader {
    EventHeader {
        // SAFETY: plain helper call without arguments.
        ktime_ns: unsafe { bpf_ktime_get_ns() },
        ..header(kind, goid)
    }
}

/// An event header without the time (`ktime_ns` 0).
#[inline(always)]
fn header(kind: EventKind, goid: u64) -> EventHeader {
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
fn emit<T: 'static>(event: T) {
    match EVENTS.reserve::<T>(0) {
        Some(mut entry) => {
            entry.write(event);
            entry.submit(BPF_RB_NO_WAKEUP as u64);
        }
        None => bump(Counter::LostRingFull, 1),
    }
}

/// `runtime.mapassign`, `_fast32`, `_fast64`, `_fast64ptr`, `_faststr`: RAX = map type,
/// RBX = the map. A new map enters the known-maps set and is announced to userspace once.
///
/// Maps are mostly written in runs (a loop filling one map), so a per-CPU cache of recently
/// written maps sits in front of the set: a write to the map in its slot only bumps the slot's
/// count (an array access), skipping the hash lookup. Every [`RECENT_MAP_FLUSH_EVERY`] writes,
/// and when another map takes the slot, the count moves to the map's known-maps entry.
#[inline(always)]
fn on_mapassign(ctx: &ProbeContext) -> u32 {
    bump(Counter::MapAssign, 1);
    let r = regs(ctx);
    let map = r.rbx;
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
    let known = KnownMap { writes, map_type: r.rax };
    if KNOWN_MAPS.insert(&map, &known, 0).is_ok() {
        bump(Counter::MapsSeen, 1);
        let mut reads = Reads::new();
        // The goroutine is only informative here: a missing one makes the event incomplete.
        let goid = reads.u64(r.r14 + PROBE_CONFIG.load().g_goid);
        let caller_pc = reads.u64(r.rsp);
        reads.finish();
        emit(MapSeen { header: header(EventKind::MapSeen, goid), map, map_type: r.rax, caller_pc });
    }
    0
}

/// Adds `writes` to `map`'s known-maps entry; false if it has none (new, or evicted).
#[inline(always)]
fn add_known_map_writes(map: u64, writes: u64) -> bool {
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

/// A heap defer: `runtime.deferproc(fn)`, probed on each `CALL runtime.deferproc` (the probe's
/// address gives the defer site: its return address is the CALL + 5, and RSP is the calling
/// frame's SP); `runtime.deferprocat(fn, frame)`, probed at its entry (the return address is
/// read from the stack). RAX = the closure, sent as it is: what it captures is read from the
/// runtime's state by userspace's snapshots, with the closure's type from the binary.
///
/// User-memory reads are what a hit costs most (about 120 ns each on the development VMs): a
/// registration reads only the goroutine id, once per goroutine (it is cached).
#[inline(always)]
fn on_deferproc_call(ctx: &ProbeContext) -> u32 {
    let r = regs(ctx);
    // The kernel sets the ip to the probed instruction before running handlers.
    on_heap_defer(r, r.rip + CALL_REL32_LEN, r.rsp, Reads::new())
}

/// `runtime.deferprocat` at its entry, after the stack check: the return address is at [RSP].
#[inline(always)]
fn on_deferprocat(ctx: &ProbeContext) -> u32 {
    let r = regs(ctx);
    let mut reads = Reads::new();
    let caller_pc = reads.u64(r.rsp);
    on_heap_defer(r, caller_pc, r.rsp + 8, reads)
}

/// The event of a heap defer registered by the frame at `caller_sp`, at `caller_pc`: the
/// closure pointer only. What the closure captures comes from snapshots of the runtime's state.
#[inline(always)]
fn on_heap_defer(r: &pt_regs, caller_pc: u64, caller_sp: u64, mut reads: Reads) -> u32 {
    bump(Counter::DeferProc, 1);
    let event = DeferRegistered {
        header: timed_header(EventKind::DeferRegistered, goid_of(r.r14).unwrap_or(0)),
        closure: r.rax,
        caller_pc,
        caller_sp,
        g: r.r14,
        stack_hi: reads.u64(r.r14 + G_STACK_HI),
    };
    reads.finish();
    emit(event);
    0
}

/// `runtime.deferprocStack(d)`: a stack record; it can't accumulate, so it is only counted.
#[inline(always)]
fn on_deferproc_stack(_ctx: &ProbeContext) -> u32 {
    bump(Counter::DeferProcStack, 1);
    0
}

/// A `CALL runtime.deferreturn` in a frame that owns heap records (the probe sits on the call,
/// not on deferreturn's entry: see the probe plan): RSP is the frame's SP, the records it runs
/// are those with that sp. Reads the goroutine id (cached) and `g.stack.hi`.
#[inline(always)]
fn on_deferreturn(ctx: &ProbeContext) -> u32 {
    bump(Counter::DeferReturn, 1);
    let r = regs(ctx);
    let mut reads = Reads::new();
    let event = DeferReturn {
        header: header(EventKind::DeferReturn, goid_of(r.r14).unwrap_or(0)),
        // The kernel sets the ip to the probed instruction before running handlers.
        caller_pc: r.rip + CALL_REL32_LEN,
        caller_sp: r.rsp,
        stack_hi: reads.u64(r.r14 + G_STACK_HI),
    };
    reads.finish();
    emit(event);
    0
}

/// Offset of `stack.hi` in `runtime.g` (`stack` is its first field in every release).
const G_STACK_HI: u64 = 8;

/// `runtime.mallocgc(size, typ, needzero)`: RAX = size. Sizes it forwards to the Go 1.26+
/// size-specialized entries are counted there instead.
#[inline(always)]
fn on_mallocgc(ctx: &ProbeContext) -> u32 {
    let r = regs(ctx);
    let size = r.rax;
    if size != 0 && size <= PROBE_CONFIG.load().size_specialized_max {
        return 0;
    }
    count_allocation(size);
    0
}

/// Go 1.26+/1.27's size-specialized entries (`mallocgcTinySC*`, `mallocgcSmall*SC*`), same
/// registers as mallocgc: called directly by user code, or by mallocgc (which left them out).
#[inline(always)]
fn on_mallocgc_size_class(ctx: &ProbeContext) -> u32 {
    count_allocation(regs(ctx).rax);
    0
}

/// One allocation of `size` bytes: both counters in one map lookup.
#[inline(always)]
fn count_allocation(size: u64) {
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
/// allocation for its memory profile. RCX = size (rounded to its size class).
#[inline(always)]
fn on_profilealloc(ctx: &ProbeContext) -> u32 {
    let size = regs(ctx).rcx;
    bump(Counter::AllocSamples, 1);
    bump(Counter::AllocSampledBytes, size);
    emit(AllocSampled { header: header(EventKind::AllocSampled, 0), size });
    0
}

/// `runtime.goexit1()`: the goroutine in R14 is ending; g structs are reused afterwards, so its
/// id is forgotten. Only goroutines the defer probes have seen (their id is cached in this
/// generation) can hold records userspace tracks: only their exits are events. In a service
/// that starts a goroutine per request, most exits are of goroutines that never deferred on the
/// heap, and this keeps their probe hit to a lookup and a counter. (A goroutine whose cached id
/// was evicted, or whose records were found pending at attach, is released by reconciliation
/// instead.) While the cache is off, goexit1 is attached only to count exits.
#[inline(always)]
fn on_goexit1(ctx: &ProbeContext) -> u32 {
    bump(Counter::GoroutineExit, 1);
    let g = regs(ctx).r14;
    // SAFETY: the value is copied out at once.
    let Some(cached) = (unsafe { GOROUTINE_IDS.get(&g) }).copied() else { return 0 };
    let _ = GOROUTINE_IDS.remove(&g);
    if cached.generation == GOROUTINE_ID_CACHE.get(0).copied().unwrap_or(0) {
        emit(GoroutineExit { header: header(EventKind::GoroutineExit, cached.goid) });
    }
    0
}

/// `runtime.fatalpanic(msgs)`, which `gopanic` calls when nothing recovered the panic of the
/// goroutine in R14: every deferred call of that goroutine has run (none through deferreturn),
/// and the process dies next. Hit once in a program's life, so the goroutine id is read here.
#[inline(always)]
fn on_fatalpanic(ctx: &ProbeContext) -> u32 {
    let goid = goid_of(regs(ctx).r14).unwrap_or(0);
    emit(GoroutinePanicked { header: header(EventKind::GoroutinePanicked, goid) });
    0
}

/// A probe on a stack check's `JBE` (attach cookie [`COOKIE_FALLS_THROUGH`]) whose branch will
/// be taken: the function calls `morestack` and starts again, so this pass is not a call. The
/// kernel runs handlers before it emulates the instruction: the flags are the `CMP`'s.
#[inline(always)]
fn goes_to_morestack(ctx: &ProbeContext) -> bool {
    // SAFETY: the helper reads the cookie of the link that ran this program.
    let cookie = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) };
    cookie & COOKIE_FALLS_THROUGH != 0 && regs(ctx).eflags & JBE_TAKEN_FLAGS != 0
}

// Every program exists twice: as a classic uprobe (one perf event per attach point, any
// kernel >= 5.8) and as a multi-uprobe (one link for all points of a program: attaching and,
// above all, detaching are far faster). Userspace picks the multi form when the kernel
// supports process-scoped multi-uprobes.
macro_rules! entry_points {
    ($($single:ident, $multi:ident => $handler:ident;)*) => {$(
        #[uprobe]
        pub fn $single(ctx: ProbeContext) -> u32 {
            if goes_to_morestack(&ctx) {
                return 0;
            }
            $handler(&ctx)
        }

        #[uprobe(multi)]
        pub fn $multi(ctx: ProbeContext) -> u32 {
            if goes_to_morestack(&ctx) {
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
    calibrate, calibrate_multi => on_calibrate;
    mapassign, mapassign_multi => on_mapassign;
    deferproc, deferproc_multi => on_deferproc_call;
    deferprocat, deferprocat_multi => on_deferprocat;
    deferproc_stack, deferproc_stack_multi => on_deferproc_stack;
    deferreturn, deferreturn_multi => on_deferreturn;
    mallocgc, mallocgc_multi => on_mallocgc;
    mallocgc_size_class, mallocgc_size_class_multi => on_mallocgc_size_class;
    goexit1, goexit1_multi => on_goexit1;
    fatalpanic, fatalpanic_multi => on_fatalpanic;
    profilealloc, profilealloc_multi => on_profilealloc;
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
