//! Reading the traced process's memory (process_vm_readv), read-only by construction: this
//! module has no way to write. Used for the runtime's own truth (`g._defer` chains) and map
//! element counts, never for map keys or values.

use crate::layout::RuntimeLayout;

/// The memory of one process.
#[derive(Clone, Copy, Debug)]
pub struct ProcessMemory {
    pid: libc::pid_t,
}

impl ProcessMemory {
    pub fn new(pid: u32) -> Self {
        ProcessMemory { pid: pid as libc::pid_t }
    }

    /// Fills `buf` from `addr`; false if any of it can't be read (unmapped, process gone).
    pub fn read(&self, addr: u64, buf: &mut [u8]) -> bool {
        if addr == 0 {
            return false;
        }
        let local = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
        let remote = libc::iovec { iov_base: addr as *mut libc::c_void, iov_len: buf.len() };
        // SAFETY: `local` covers exactly `buf`; the kernel checks `remote`.
        let n = unsafe { libc::process_vm_readv(self.pid, &local, 1, &remote, 1, 0) };
        n == buf.len() as isize
    }

    pub fn read_u64(&self, addr: u64) -> Option<u64> {
        let mut buf = [0u8; 8];
        self.read(addr, &mut buf).then(|| u64::from_ne_bytes(buf))
    }
}

/// One record of a goroutine's `_defer` chain.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChainRecord {
    /// `_defer.fn`: the deferred closure.
    pub closure: u64,
    /// `_defer.sp`: the frame's SP (updated by the runtime when the stack moves).
    pub sp: u64,
    /// `_defer.pc`: the return address of the deferproc call (the defer site).
    pub pc: u64,
    /// A heap record (deferproc, deferprocat); false for records on the goroutine's own stack
    /// (deferprocStack), which can't accumulate.
    pub heap: bool,
}

/// A goroutine's state as the runtime sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RuntimeGoroutine {
    /// `g.goid` now: differs from the goroutine we asked about if the g was reused.
    pub goid: u64,
    /// Newest first, as the chain links them.
    pub defers: Vec<ChainRecord>,
}

/// Longest `_defer` chain walked (a bound against corrupt memory, far above real programs).
pub const MAX_CHAIN: usize = 1 << 20;

/// Reads `g.goid` and the whole `g._defer` chain of the g at `g`. None if any read fails (the
/// process is gone or the chain changed under us): then nothing is concluded.
pub fn read_goroutine(
    memory: &ProcessMemory,
    layout: &RuntimeLayout,
    g: u64,
) -> Option<RuntimeGoroutine> {
    let goid = memory.read_u64(g + layout.g_goid)?;
    // `g.stack` (lo, hi) is the first field of runtime.g in every release.
    let stack = memory.read_u64(g)?..memory.read_u64(g + 8)?;
    let mut defers = Vec::new();
    let mut record = memory.read_u64(g + layout.g_defer)?;
    while record != 0 {
        if defers.len() >= MAX_CHAIN {
            return None;
        }
        defers.push(ChainRecord {
            closure: memory.read_u64(record + layout.defer_fn)?,
            sp: memory.read_u64(record + layout.defer_sp)?,
            pc: memory.read_u64(record + layout.defer_pc)?,
            heap: !stack.contains(&record),
        });
        record = memory.read_u64(record + layout.defer_link)?;
    }
    Some(RuntimeGoroutine { goid, defers })
}

/// Most goroutines read from `runtime.allgs` (a bound against corrupt memory).
pub const MAX_GOROUTINES: u64 = 1 << 24;

/// Every g the runtime has ever created (`runtime.allgs`, a `[]*g` at `allgs`), dead ones
/// included. None if unreadable.
pub fn read_allgs(memory: &ProcessMemory, allgs: u64) -> Option<Vec<u64>> {
    let array = memory.read_u64(allgs)?;
    let len = memory.read_u64(allgs + 8)?;
    if len > MAX_GOROUTINES {
        return None;
    }
    let mut bytes = vec![0u8; len as usize * 8];
    if len > 0 && !memory.read(array, &mut bytes) {
        return None;
    }
    let (words, _) = bytes.as_chunks::<8>();
    Some(words.iter().map(|word| u64::from_ne_bytes(*word)).filter(|g| *g != 0).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_slice_of_pointers() {
        let gs: Vec<u64> = vec![0x1000, 0, 0x2000];
        let header: [u64; 3] = [gs.as_ptr() as u64, gs.len() as u64, gs.capacity() as u64];
        let me = ProcessMemory::new(std::process::id());
        assert_eq!(read_allgs(&me, header.as_ptr() as u64), Some(vec![0x1000, 0x2000]));
        let empty: [u64; 3] = [0, 0, 0];
        assert_eq!(read_allgs(&me, empty.as_ptr() as u64), Some(vec![]));
        let huge: [u64; 3] = [8, MAX_GOROUTINES + 1, 0];
        assert_eq!(read_allgs(&me, huge.as_ptr() as u64), None);
    }

    #[test]
    fn reads_own_memory_and_refuses_bad_addresses() {
        let value: u64 = 0x1122_3344_5566_7788;
        let me = ProcessMemory::new(std::process::id());
        assert_eq!(me.read_u64(&value as *const u64 as u64), Some(value));
        assert_eq!(me.read_u64(0), None);
        assert_eq!(me.read_u64(8), None);
    }
}
