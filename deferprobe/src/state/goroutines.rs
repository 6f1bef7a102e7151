//! Every goroutine and its pending `_defer` records, decoded from the target's memory the way
//! the runtime itself reads them, without stopping it.
//!
//! - The goroutines: `allglen`, then `allgptr`, then `allglen` g pointers from it. The runtime
//!   publishes `allgptr` before `allglen` (`allgadd`), so this order never reads past the array
//!   (`atomicAllG` in runtime/proc.go does the same).
//! - A g's header (`stack`, `_defer`, `sched`, `syscallsp`/`pc`/`bp`, `atomicstatus`, `goid`)
//!   in one read per g, batched.
//! - Its `_defer` chain through `link`. A range-over-func loop (Go 1.22+) puts one record with
//!   `rangefunc` set and no `fn` on the chain of the frame that owns the loop; the loop body's
//!   records hang off its `head` list (`deferprocat`) until that frame returns. They are read
//!   too, as records of the owning frame. `badDefer` (1) ends such a list once the loop ended.
//! - Every read is checked: a chain longer than [`MAX_CHAIN`] or with a cycle, a record whose
//!   frame is not on the g's stack (the walk followed a record freed and reused by another
//!   goroutine), or a g whose `goid`, stack or chain head changed while it was read (re-read
//!   after the walk), is retried, and after [`ATTEMPTS`] dropped and counted as torn, never
//!   guessed.

use std::collections::HashSet;

use super::memory::Memory;
use crate::layout::RuntimeLayout;

/// Longest chain walked (a bound against corrupt memory, far above real programs).
pub const MAX_CHAIN: usize = 1 << 20;

/// Most goroutines read (a bound against corrupt memory).
pub const MAX_GOROUTINES: u64 = 1 << 24;

/// Reads of one goroutine before it is given up as changing under us.
pub const ATTEMPTS: usize = 3;

pub(super) const G_RUNNING: u32 = 2;
pub(super) const G_SYSCALL: u32 = 3;
const G_DEAD: u32 = 6;
/// Go 1.26+: a dead g kept for an extra M (cgo callbacks); as dead as `_Gdead`.
const G_DEAD_EXTRA: u32 = 11;
pub(super) const G_COPYSTACK: u32 = 8;
const G_SCAN: u32 = 0x1000;

/// `badDefer()`: what a range-over-func loop's `head` holds once the loop's frame returned.
const BAD_DEFER: u64 = 1;

/// Runtime addresses of `runtime.allglen` and `runtime.allgptr`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AllgAddresses {
    pub allglen: u64,
    pub allgptr: u64,
}

/// Every g the runtime made (dead ones included), or None if unreadable.
pub fn read_allgs(memory: &impl Memory, at: AllgAddresses) -> Option<Vec<u64>> {
    let len = memory.read_u64(at.allglen)?;
    if len > MAX_GOROUTINES {
        return None;
    }
    let array = memory.read_u64(at.allgptr)?;
    let mut bytes = vec![0u8; len as usize * 8];
    if len > 0 && !memory.read(array, &mut bytes) {
        return None;
    }
    let (words, _) = bytes.as_chunks::<8>();
    Some(words.iter().map(|word| u64::from_le_bytes(*word)).filter(|g| *g != 0).collect())
}

/// The fields of a g a snapshot needs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GoroutineHeader {
    pub g: u64,
    pub goid: u64,
    pub status: u32,
    pub stack_lo: u64,
    pub stack_hi: u64,
    /// `g._defer`: the newest record, 0 if none.
    pub defers: u64,
    /// Where it resumes, for reading its call stack ([`super::stacks`]).
    pub saved: SavedContext,
}

/// What a g saves of the frame it stopped in: `g.sched` (valid unless it is running) and the
/// frame that entered a syscall (valid while `_Gsyscall`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SavedContext {
    pub sched_sp: u64,
    pub sched_pc: u64,
    pub sched_bp: u64,
    pub syscall_sp: u64,
    pub syscall_pc: u64,
    /// Go 1.23+: before, the frame pointer of a goroutine in a syscall is not saved.
    pub syscall_bp: Option<u64>,
}

impl GoroutineHeader {
    fn decode(g: u64, bytes: &[u8], layout: &RuntimeLayout) -> GoroutineHeader {
        let word = |at: u64| {
            let at = at as usize;
            u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap())
        };
        let status = layout.g_status as usize;
        GoroutineHeader {
            g,
            goid: word(layout.g_goid),
            status: u32::from_le_bytes(bytes[status..status + 4].try_into().unwrap()),
            stack_lo: word(0),
            stack_hi: word(8),
            defers: word(layout.g_defer),
            saved: SavedContext {
                sched_sp: word(layout.g_sched_sp),
                sched_pc: word(layout.g_sched_pc),
                sched_bp: word(layout.g_sched_bp),
                syscall_sp: word(layout.g_syscall_sp),
                syscall_pc: word(layout.g_syscall_pc),
                syscall_bp: layout.g_syscall_bp.map(word),
            },
        }
    }

    /// Bytes of a g read for its header.
    fn len(layout: &RuntimeLayout) -> usize {
        let words = [layout.g_goid, layout.g_defer, layout.g_status, layout.g_sched_sp];
        let saved =
            [layout.g_sched_pc, layout.g_sched_bp, layout.g_syscall_sp, layout.g_syscall_pc];
        let last = words.into_iter().chain(saved).chain(layout.g_syscall_bp).max().unwrap_or(0);
        (last + 8) as usize
    }

    /// `atomicstatus` without the `_Gscan` bit.
    pub fn state(&self) -> u32 {
        self.status & !G_SCAN
    }

    pub fn dead(&self) -> bool {
        matches!(self.status & !G_SCAN, G_DEAD | G_DEAD_EXTRA)
    }
}

/// The headers of `gs`, in few system calls; None for a g that can't be read.
pub fn read_headers(
    memory: &impl Memory,
    layout: &RuntimeLayout,
    gs: &[u64],
) -> Vec<Option<GoroutineHeader>> {
    let len = GoroutineHeader::len(layout);
    let mut bytes = vec![0u8; gs.len() * len];
    let read = memory.read_many(gs, len, &mut bytes);
    gs.iter()
        .zip(read)
        .zip(bytes.chunks_exact(len))
        .map(|((&g, ok), bytes)| ok.then(|| GoroutineHeader::decode(g, bytes, layout)))
        .collect()
}

/// One pending `_defer` record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeferRecord {
    /// Where the record is.
    pub address: u64,
    /// `_defer.fn`: the deferred closure (a funcval).
    pub closure: u64,
    /// `_defer.sp`: the SP of the frame that owns it (for the records of a range-over-func
    /// loop, the owning frame's).
    pub sp: u64,
    /// `_defer.pc`: the return address of the `deferproc` call, the defer site. 0 for the
    /// records of a range-over-func loop body, which `deferprocat` leaves unset.
    pub pc: u64,
    /// On the heap (deferproc, deferprocat) rather than in the frame (deferprocStack).
    pub heap: bool,
    /// One of a range-over-func loop body's records (`deferprocat`).
    pub in_range_loop: bool,
}

/// A goroutine's pending records, newest first, as the runtime links them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GoroutineDefers {
    pub header: GoroutineHeader,
    pub records: Vec<DeferRecord>,
}

/// Why a goroutine's chain could not be read consistently.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Torn {
    /// A read failed (the g or a record was freed, or the process is gone).
    Unreadable,
    /// The chain changed while it was walked, or the g now runs another goroutine, or its
    /// stack is being copied.
    Changed,
    /// A cycle, or more than [`MAX_CHAIN`] records: not a chain the runtime could have.
    Corrupt,
}

/// Reads the `_defer` chain of the goroutine whose header was just read. The header is read
/// again after the walk: if the goroutine or its chain head changed, the walk starts over, up
/// to [`ATTEMPTS`] times.
pub fn read_defers(
    memory: &impl Memory,
    layout: &RuntimeLayout,
    header: GoroutineHeader,
) -> Result<GoroutineDefers, Torn> {
    let mut header = header;
    let mut outcome = Err(Torn::Changed);
    for _ in 0..ATTEMPTS {
        if header.defers == 0 || header.dead() {
            return Ok(GoroutineDefers { header, records: Vec::new() });
        }
        let walked = match header.status & !G_SCAN == G_COPYSTACK {
            true => Err(Torn::Changed),
            false => walk_chain(memory, layout, &header),
        };
        let again = read_headers(memory, layout, &[header.g])[0].ok_or(Torn::Unreadable)?;
        let same = again.goid == header.goid
            && again.defers == header.defers
            && (again.stack_lo, again.stack_hi) == (header.stack_lo, header.stack_hi)
            && again.status & !G_SCAN != G_COPYSTACK;
        match walked {
            Ok(records) if same => return Ok(GoroutineDefers { header, records }),
            Err(Torn::Corrupt) if same => return Err(Torn::Corrupt),
            Err(torn) if same => outcome = Err(torn),
            _ => outcome = Err(Torn::Changed),
        }
        header = again;
    }
    outcome
}

fn walk_chain(
    memory: &impl Memory,
    layout: &RuntimeLayout,
    header: &GoroutineHeader,
) -> Result<Vec<DeferRecord>, Torn> {
    let mut records = Vec::new();
    let mut seen = HashSet::new();
    let stack = header.stack_lo..header.stack_hi;
    let len = layout.defer_size as usize;
    let mut buf = vec![0u8; len];
    let mut next = header.defers;
    // The chain, and after each range-over-func record its body's list.
    let mut pending_lists: Vec<(u64, u64)> = Vec::new();
    while next != 0 {
        read_record(memory, next, &mut buf, &mut seen)?;
        let word =
            |at: u64| u64::from_le_bytes(buf[at as usize..at as usize + 8].try_into().unwrap());
        let rangefunc = layout.defer_rangefunc.is_some_and(|at| buf[at as usize] != 0);
        let sp = word(layout.defer_sp);
        // Every record belongs to a frame of this goroutine. One that doesn't was freed while
        // we walked and reused by another goroutine (records are pooled per P): the walk left
        // this chain for that one's.
        if !(header.stack_lo..=header.stack_hi).contains(&sp) {
            return Err(Torn::Changed);
        }
        match (rangefunc, layout.defer_head) {
            (true, Some(head)) => pending_lists.push((word(head), sp)),
            _ => records.push(DeferRecord {
                address: next,
                closure: word(layout.defer_fn),
                sp,
                pc: word(layout.defer_pc),
                heap: !stack.contains(&next),
                in_range_loop: false,
            }),
        }
        next = word(layout.defer_link);
    }
    for (head, owner_sp) in pending_lists {
        // `head` points to the loop's atomic.Pointer[_defer].
        let mut next = match head {
            0 => 0,
            head => memory.read_u64(head).ok_or(Torn::Unreadable)?,
        };
        while next != 0 && next != BAD_DEFER {
            read_record(memory, next, &mut buf, &mut seen)?;
            let word =
                |at: u64| u64::from_le_bytes(buf[at as usize..at as usize + 8].try_into().unwrap());
            records.push(DeferRecord {
                address: next,
                closure: word(layout.defer_fn),
                sp: owner_sp,
                pc: word(layout.defer_pc),
                heap: true,
                in_range_loop: true,
            });
            next = word(layout.defer_link);
        }
    }
    Ok(records)
}

/// Reads the record at `address` into `buf`: a record seen before in this walk (a cycle) or
/// past [`MAX_CHAIN`] records is corrupt.
fn read_record(
    memory: &impl Memory,
    address: u64,
    buf: &mut [u8],
    seen: &mut HashSet<u64>,
) -> Result<(), Torn> {
    if seen.len() >= MAX_CHAIN || !seen.insert(address) {
        return Err(Torn::Corrupt);
    }
    match memory.read(address, buf) {
        true => Ok(()),
        false => Err(Torn::Unreadable),
    }
}
