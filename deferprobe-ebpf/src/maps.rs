//! The maps and the global configuration the probes share with userspace.

use aya_ebpf::{
    Global,
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
};
use deferprobe_common::{
    Counters, EVENT_RING_BYTES, GATES as GATE_COUNT, GOROUTINE_IDS_CAPACITY, KNOWN_MAPS_CAPACITY,
    KnownMap, PROCESS_TREE_CAPACITY, ProbeConfig, RECENT_MAP_SLOTS, RecentMap, TreeConfig,
    TreeCounter,
};

/// Runtime struct offsets, written by userspace before load.
#[unsafe(no_mangle)]
pub(crate) static PROBE_CONFIG: Global<ProbeConfig> = Global::new(ProbeConfig::ZERO);

#[map]
pub(crate) static COUNTERS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(1, 0);

/// The sampled families' counting gates, by [`deferprobe_common::Gate`] (1 = open).
#[map]
pub(crate) static GATES: Array<u32> = Array::with_max_entries(GATE_COUNT, 0);

/// Maps written while tracing (key: map pointer): each is announced to userspace once (where it
/// was first written), and its writes are counted. Bounded: least recently written maps are
/// evicted.
#[map]
pub(crate) static KNOWN_MAPS: LruHashMap<u64, KnownMap> =
    LruHashMap::with_max_entries(KNOWN_MAPS_CAPACITY, 0);

/// Goroutine ids by g (R14), so that defer probes need not read `g.goid` on every hit. A g
/// changes goroutine only through `runtime.goexit1` (the runtime hands out a new goid when it
/// reuses the g), whose probe removes it; bounded, least recently used first out. Used only
/// while [`GOROUTINE_ID_CACHE`] says goexit1 is attached; entries of an earlier generation are
/// ignored (their goroutine may have ended unseen).
#[map]
pub(crate) static GOROUTINE_IDS: LruHashMap<u64, CachedGoroutineId> =
    LruHashMap::with_max_entries(GOROUTINE_IDS_CAPACITY, 0);

/// The generation of [`GOROUTINE_IDS`] in use, 0 while the cache is off. Userspace turns the
/// cache on (a new generation) after attaching goexit1, and off before detaching it.
#[map]
pub(crate) static GOROUTINE_ID_CACHE: Array<u64> = Array::with_max_entries(1, 0);

#[derive(Clone, Copy)]
pub(crate) struct CachedGoroutineId {
    pub(crate) goid: u64,
    pub(crate) generation: u64,
}

/// Per-CPU cache of recently written maps in front of `KNOWN_MAPS` (see `on_mapassign`).
#[map]
pub(crate) static RECENT_MAPS: PerCpuArray<RecentMap> =
    PerCpuArray::with_max_entries(RECENT_MAP_SLOTS, 0);

#[map]
pub(crate) static EVENTS: RingBuf = RingBuf::with_byte_size(EVENT_RING_BYTES, 0);

/// The process-tree programs' configuration (task_struct offsets, stop at exec), written by
/// userspace before load.
#[unsafe(no_mangle)]
pub(crate) static TREE_CONFIG: Global<TreeConfig> = Global::new(TreeConfig::ZERO);

/// The tasks (by thread id) of the traced command's process tree: the command, and every
/// thread and process its tasks fork, until they exit. Values: `TREE_EXEC_IS_OURS` flags.
/// Not preallocated: only the tree tracer's copy of the object holds more than a few tasks.
#[map]
pub(crate) static PROCESS_TREE: HashMap<u32, u32> =
    HashMap::with_max_entries(PROCESS_TREE_CAPACITY, BPF_F_NO_PREALLOC);

/// The process-tree counters, indexed by `TreeCounter`.
#[map]
pub(crate) static TREE_COUNTERS: Array<u64> = Array::with_max_entries(TreeCounter::COUNT, 0);

/// Execs and exits of the tree's processes, for userspace (which is woken for each: they are
/// rare, and a stopped process waits for it).
#[map]
pub(crate) static TREE_EVENTS: RingBuf = RingBuf::with_byte_size(64 * 1024, 0);
