//! The kernel <-> userspace ABI of deferprobe: every type that crosses the boundary, once.
//!
//! Both `deferprobe-ebpf` (BPF target, no_std) and `deferprobe` (userspace) compile this crate,
//! so a layout change is a change in one place. Everything here is `#[repr(C)]`, plain old data,
//! and padded explicitly so the layout is the same on both sides.
#![no_std]

/// Default size of the BPF ring buffer that carries events (`--ring-buffer-kib` changes it at
/// load time; it must be a power of two and a multiple of the page size).
pub const EVENT_RING_BYTES: u32 = 1 << 22;

/// Capacity of the in-kernel LRU cache of goroutine ids by g.
pub const GOROUTINE_IDS_CAPACITY: u32 = 1 << 14;

/// Capacity of the in-kernel LRU set of maps seen by mapassign.
pub const KNOWN_MAPS_CAPACITY: u32 = 1 << 16;

/// The counting gates of the probe families userspace samples in windows (indexes of the
/// `GATES` array map, 1 = open): a family's probes count and report a hit only while its gate
/// is open. Userspace opens a gate once the family's probes are attached and closes it before
/// detaching them: breakpoints outlive a detach by milliseconds (the kernel removes them after
/// an RCU grace period), and hits there would count against no attached time.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gate {
    GoroutineExits = 0,
    StackDefers,
    Allocations,
    MapWrites,
}

/// Number of [`Gate`]s.
pub const GATES: u32 = Gate::MapWrites as u32 + 1;

impl Gate {
    pub const ALL: [Gate; GATES as usize] =
        [Gate::GoroutineExits, Gate::StackDefers, Gate::Allocations, Gate::MapWrites];
}

/// Index of one per-CPU counter in [`Counters::values`].
///
/// Counters are exact: every probe hit bumps its counter before anything can fail, so they stay
/// right even when the ring buffer overflows (losses are counted by cause).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Calls of any `runtime.mapassign*` variant.
    MapAssign = 0,
    /// Heap defer registrations: `runtime.deferproc` + `runtime.deferprocat`.
    DeferProc,
    /// Stack defer registrations: `runtime.deferprocStack`.
    DeferProcStack,
    /// Calls of `runtime.deferreturn`.
    DeferReturn,
    /// Allocations (mallocgc and, on Go 1.27, the size-specialized entries), each counted once.
    Malloc,
    /// Sum of requested allocation sizes, in bytes.
    AllocBytes,
    /// Goroutine exits (`runtime.goexit1`).
    GoroutineExit,
    /// Events not written because the ring buffer was full.
    LostRingFull,
    /// Probe hits with a failed user-memory read that had to succeed: an event delivered with a
    /// field 0. Each hit counts once.
    /// Not counted here: an unreadable `g.goid` of an event that needs the goroutine (it
    /// carries goid 0 and userspace counts it), and the speculative reads of captured words.
    UserReadFailed,
    /// Maps that entered the known-maps set (first seen, or seen again after eviction).
    MapsSeen,
    /// `--alloc-mode profiled`: allocations the Go runtime sampled for its memory profile
    /// (`runtime.profilealloc` calls).
    AllocSamples,
    /// Sum of the sampled allocations' sizes (rounded up to their size class), in bytes.
    AllocSampledBytes,
}

impl Counter {
    /// Number of counters; the length of [`Counters::values`].
    pub const COUNT: usize = Counter::AllocSampledBytes as usize + 1;

    /// Every counter, in index order.
    pub const ALL: [Counter; Counter::COUNT] = [
        Counter::MapAssign,
        Counter::DeferProc,
        Counter::DeferProcStack,
        Counter::DeferReturn,
        Counter::Malloc,
        Counter::AllocBytes,
        Counter::GoroutineExit,
        Counter::LostRingFull,
        Counter::UserReadFailed,
        Counter::MapsSeen,
        Counter::AllocSamples,
        Counter::AllocSampledBytes,
    ];
}

/// The single value of the per-CPU `COUNTERS` array: one slot per [`Counter`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub values: [u64; Counter::COUNT],
}

impl Counters {
    pub const ZERO: Counters = Counters { values: [0; Counter::COUNT] };

    pub fn get(&self, counter: Counter) -> u64 {
        self.values[counter as usize]
    }
}

/// Where in the Go runtime's structures the probes find things. Filled by userspace from the
/// probe plan (DWARF or the per-release table) and written into the BPF object before load.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProbeConfig {
    /// Offset of `goid` in `runtime.g`.
    pub g_goid: u64,
    /// Offset of `m` in `runtime.g`.
    pub g_m: u64,
    /// Offset of `curg` in `runtime.m`.
    pub m_curg: u64,
    /// With Go 1.26+/1.27 size-specialized malloc probed: mallocgc forwards every size from 1
    /// to this to those entries, whose probes count it, so the mallocgc probe skips them (a
    /// register test). 0 when they are not probed.
    pub size_specialized_max: u64,
}

impl ProbeConfig {
    pub const ZERO: ProbeConfig =
        ProbeConfig { g_goid: 0, g_m: 0, m_curg: 0, size_specialized_max: 0 };
}

/// Discriminant of a ring-buffer record; the first field of every event.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    DeferRegistered = 1,
    DeferReturn = 2,
    GoroutineExit = 3,
    MapSeen = 4,
    AllocSampled = 5,
    GoroutinePanicked = 6,
}

impl EventKind {
    pub fn from_u32(raw: u32) -> Option<EventKind> {
        match raw {
            1 => Some(EventKind::DeferRegistered),
            2 => Some(EventKind::DeferReturn),
            3 => Some(EventKind::GoroutineExit),
            4 => Some(EventKind::MapSeen),
            5 => Some(EventKind::AllocSampled),
            6 => Some(EventKind::GoroutinePanicked),
            _ => None,
        }
    }
}

/// Common prefix of every event.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventHeader {
    /// An [`EventKind`] value.
    pub kind: u32,
    /// CPU the probe ran on.
    pub cpu: u32,
    /// `bpf_ktime_get_ns()` at the probe, for heap defer registrations; 0 in the other events
    /// (reading the clock is a large part of a hit's cost). Events need no time to be ordered:
    /// the ring buffer delivers them in the order the probes reserved their records, which for
    /// one goroutine is the order they happened in.
    pub ktime_ns: u64,
    /// Goroutine id (`g.goid`), 0 if it could not be read.
    pub goid: u64,
}

/// A heap defer record was registered (`runtime.deferproc` / `runtime.deferprocat`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeferRegistered {
    pub header: EventHeader,
    /// The deferred closure (`*funcval`), as the runtime's `_defer.fn` will hold it: what
    /// userspace pairs the record in a snapshot with. What it captures is read from the
    /// snapshot, with the closure's type from the binary; the probe reads no user memory.
    pub closure: u64,
    /// Return address into the function that executed the `defer` statement.
    pub caller_pc: u64,
    /// That function's SP (what the runtime stores as `_defer.sp`).
    pub caller_sp: u64,
    /// The goroutine's `g`, to read its `_defer` chain later.
    pub g: u64,
    /// `g.stack.hi` now (0 if unreadable). Stack growth copies a stack and moves every frame,
    /// but keeps each frame's distance from the top: `stack_hi - caller_sp` names the frame
    /// across moves.
    pub stack_hi: u64,
}

// Events are read back with unaligned reads, but keep them padding-free and 8-byte multiples so
// the layout is the same on both sides.
const _: () = assert!(core::mem::size_of::<DeferRegistered>().is_multiple_of(8));

/// mapassign saw a map not in the kernel's set of known maps (first write while tracing, or
/// again after LRU eviction).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MapSeen {
    pub header: EventHeader,
    /// The map (`*hmap` / `*maps.Map`); its first word is the element count.
    pub map: u64,
    /// The map's type (`*maptype`), for key and element sizes.
    pub map_type: u64,
    /// Return address into the function that wrote it.
    pub caller_pc: u64,
}

/// Slots of the per-CPU cache of recently written maps in front of the known-maps set (a power
/// of two). A map's slot is [`recent_map_slot`].
pub const RECENT_MAP_SLOTS: u32 = 256;

/// Every this many writes counted in a recent-maps slot, mapassign also goes through the
/// known-maps set: it moves the count there and keeps a hot map from being evicted as unused.
pub const RECENT_MAP_FLUSH_EVERY: u64 = 1024;

/// The recent-maps slot of `map`: map headers are at least 16-byte aligned.
pub const fn recent_map_slot(map: u64) -> u32 {
    ((map >> 4) as u32) & (RECENT_MAP_SLOTS - 1)
}

/// One slot of the per-CPU recent-maps cache: the map last written on this CPU among those
/// sharing the slot, and its writes not yet moved to its [`KnownMap`] entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecentMap {
    pub map: u64,
    pub writes: u64,
}

/// Value of the in-kernel known-maps LRU set.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KnownMap {
    /// mapassign calls on this map since it entered the set, except those still counted in a
    /// CPU's [`RecentMap`] slot.
    pub writes: u64,
    pub map_type: u64,
}

/// Attach-cookie bit of a probe on a Go stack check's `JBE` (the probe plan's `count_when:
/// falls_through`): a hit counts only when the branch falls through. When it is taken,
/// `morestack` grows the stack and the function starts again, reaching the probe a second time.
pub const COOKIE_FALLS_THROUGH: u64 = 1;

/// Per-architecture facts both sides need: what the stack check's conditional branch tests in
/// the saved flags, and the length of a call instruction (a probe on a `CALL runtime.deferproc`
/// / `deferreturn` site reports the probed address plus this as the return address).
pub mod amd64 {
    /// The EFLAGS bits a `JBE` tests: it is taken when CF or ZF is set.
    pub const JBE_TAKEN_FLAGS: u64 = (1 << 0) | (1 << 6);

    /// `CALL rel32`.
    pub const CALL_LEN: u64 = 5;
}

/// See [`amd64`].
pub mod arm64 {
    /// PSTATE's Z flag. `B.LS` (the stack check's branch to `morestack`) is taken when Z is set
    /// or C is clear.
    pub const PSTATE_Z: u64 = 1 << 30;
    /// PSTATE's C flag.
    pub const PSTATE_C: u64 = 1 << 29;

    /// `BL imm26`.
    pub const CALL_LEN: u64 = 4;

    /// Whether a `B.LS` with these saved PSTATE flags is taken.
    pub const fn bls_taken(pstate: u64) -> bool {
        pstate & PSTATE_Z != 0 || pstate & PSTATE_C == 0
    }
}

/// A frame that owns heap records (SP `caller_sp`, resuming at `caller_pc`) called
/// `runtime.deferreturn`, which runs its records.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeferReturn {
    pub header: EventHeader,
    pub caller_pc: u64,
    pub caller_sp: u64,
    /// `g.stack.hi` now (0 if unreadable): see [`DeferRegistered::stack_hi`].
    pub stack_hi: u64,
}

/// The Go runtime sampled an allocation for its memory profile (`runtime.profilealloc`, with
/// `--alloc-mode profiled`). The size lets userspace unsample like pprof does: a sample of
/// `size` bytes stands for `1 / (1 - exp(-size / MemProfileRate))` allocations.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AllocSampled {
    pub header: EventHeader,
    /// The allocation's size, rounded up to its size class.
    pub size: u64,
}

/// A goroutine ended (`runtime.goexit1`); all its records are gone.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GoroutineExit {
    pub header: EventHeader,
}

/// A goroutine's panic was not recovered (`runtime.fatalpanic`, which `gopanic` calls once the
/// goroutine's deferred calls have all run): its records are gone, and the process is dying.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GoroutinePanicked {
    pub header: EventHeader,
}

/// Where the kernel's `struct task_struct` keeps what the process-tree programs read, in bytes
/// (from the running kernel's BTF, /sys/kernel/btf/vmlinux), and what they do at an exec.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TreeConfig {
    /// `task_struct.pid` (the thread id) and `task_struct.tgid` (the process id).
    pub task_pid: u64,
    pub task_tgid: u64,
    /// `task_struct.exit_code`: the wait status, set before `sched_process_exit` fires.
    pub task_exit_code: u64,
    /// Non-zero with `run --follow`: a descendant that execs a program is stopped (SIGSTOP)
    /// before its first instruction, so userspace can attach its probes first.
    pub stop_at_exec: u64,
}

impl TreeConfig {
    pub const ZERO: TreeConfig =
        TreeConfig { task_pid: 0, task_tgid: 0, task_exit_code: 0, stop_at_exec: 0 };
}

/// Capacity of the in-kernel set of the traced command's tasks (threads of every descendant
/// process), keyed by thread id.
pub const PROCESS_TREE_CAPACITY: u32 = 1 << 16;

/// Flag of an entry of the process-tree set: the task's next exec is deferprobe's own
/// (`run -- CMD` starting the command, probes already attached); it is neither stopped nor
/// reported.
pub const TREE_EXEC_IS_OURS: u32 = 1;

/// Index of a process-tree counter (an array of `u64`, not per CPU: forks and execs are rare).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TreeCounter {
    /// New processes (not threads) forked by the tree's tasks.
    ProcessesStarted = 0,
    /// Programs the tree's processes exec'd (deferprobe's own exec of the command left out).
    ProgramsExecuted,
    /// Execs whose SIGSTOP could not be sent (`bpf_send_signal` failed, e.g. for pid 1 of a
    /// pid namespace): traced from when userspace attached.
    StopsFailed,
    /// Tasks not added because the set was full: their children are not followed.
    TreeFull,
}

impl TreeCounter {
    pub const COUNT: u32 = TreeCounter::TreeFull as u32 + 1;
}

/// Kind of a [`ProcessEvent`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProcessEventKind {
    /// A process of the tree exec'd a program.
    Exec = 1,
    /// The main thread of a process of the tree exited.
    Exit = 2,
}

/// What the process-tree programs tell userspace (their own small ring buffer).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcessEvent {
    /// A [`ProcessEventKind`] value.
    pub kind: u32,
    /// The process (thread group) id, in the initial pid namespace.
    pub pid: u32,
    /// Exec: what sending SIGSTOP returned (0: stopped before its first instruction; a
    /// negative errno; 1 when no stop was asked). Exit: the wait status (`task_struct.exit_code`).
    pub status: i32,
    pub _pad: u32,
}

const _: () = assert!(core::mem::size_of::<ProcessEvent>().is_multiple_of(8));

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain #[repr(C)] integers with no padding holes.
    unsafe impl aya::Pod for super::Counters {}
    unsafe impl aya::Pod for super::ProbeConfig {}
    unsafe impl aya::Pod for super::KnownMap {}
    unsafe impl aya::Pod for super::RecentMap {}
    unsafe impl aya::Pod for super::TreeConfig {}
}
