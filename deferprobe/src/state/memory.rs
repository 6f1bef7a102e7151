//! Reading the traced process's memory (process_vm_readv), read-only by construction: this
//! module has no way to write to a process. [`Memory`] is what the decoders of the runtime's
//! state read through: a live process ([`ProcessMemory`]), or a [`MemoryImage`] captured from
//! one ([`Recording`]), on which the decoders are tested. Map keys and values are never read.

use std::{cell::RefCell, collections::BTreeMap};

/// Read-only memory of a process, live or captured.
pub trait Memory {
    /// Fills `buf` from `addr`; false if any of it can't be read (unmapped, process gone).
    fn read(&self, addr: u64, buf: &mut [u8]) -> bool;

    fn read_u64(&self, addr: u64) -> Option<u64> {
        let mut buf = [0u8; 8];
        self.read(addr, &mut buf).then(|| u64::from_le_bytes(buf))
    }

    /// `len` bytes at each of `addrs`, into consecutive `len`-byte pieces of `out`; whether
    /// each was read. Live memory does this in few system calls.
    fn read_many(&self, addrs: &[u64], len: usize, out: &mut [u8]) -> Vec<bool> {
        addrs
            .iter()
            .zip(out.chunks_exact_mut(len))
            .map(|(&addr, buf)| self.read(addr, buf))
            .collect()
    }
}

/// Bytes captured from a process's memory, by address: what the decoders read, replayable.
#[derive(Clone, Debug, Default)]
pub struct MemoryImage {
    regions: BTreeMap<u64, Vec<u8>>,
}

impl MemoryImage {
    /// Adds (or overwrites with) `bytes` at `addr`.
    pub fn insert(&mut self, addr: u64, bytes: &[u8]) {
        match self.region_mut(addr, bytes.len()) {
            Some(region) => region.copy_from_slice(bytes),
            None => {
                self.regions.insert(addr, bytes.to_vec());
            }
        }
    }

    /// Overwrites captured bytes (to damage an image in tests); false if not captured.
    pub fn write(&mut self, addr: u64, bytes: &[u8]) -> bool {
        self.region_mut(addr, bytes.len()).map(|r| r.copy_from_slice(bytes)).is_some()
    }

    pub fn write_u64(&mut self, addr: u64, value: u64) -> bool {
        self.write(addr, &value.to_le_bytes())
    }

    /// The start of the captured region holding `len` bytes at `addr` (among the 64 regions
    /// starting nearest below it), and where in it they begin.
    fn locate(&self, addr: u64, len: usize) -> Option<(u64, usize)> {
        let (start, _) = self
            .regions
            .range(..=addr)
            .rev()
            .take(64)
            .find(|(start, bytes)| addr + len as u64 <= **start + bytes.len() as u64)?;
        Some((*start, (addr - start) as usize))
    }

    fn region_mut(&mut self, addr: u64, len: usize) -> Option<&mut [u8]> {
        let (start, from) = self.locate(addr, len)?;
        self.regions.get_mut(&start)?.get_mut(from..from + len)
    }

    fn region(&self, addr: u64, len: usize) -> Option<&[u8]> {
        let (start, from) = self.locate(addr, len)?;
        self.regions.get(&start)?.get(from..from + len)
    }
}

impl Memory for MemoryImage {
    fn read(&self, addr: u64, buf: &mut [u8]) -> bool {
        match self.region(addr, buf.len()) {
            Some(bytes) => {
                buf.copy_from_slice(bytes);
                true
            }
            None => false,
        }
    }
}

/// Reads through to `inner` and keeps a copy of every successful read: the image of exactly
/// what a decoder looked at.
pub struct Recording<'m, M: Memory> {
    inner: &'m M,
    image: RefCell<MemoryImage>,
}

impl<'m, M: Memory> Recording<'m, M> {
    pub fn new(inner: &'m M) -> Self {
        Recording { inner, image: RefCell::default() }
    }

    pub fn into_image(self) -> MemoryImage {
        self.image.into_inner()
    }
}

impl<M: Memory> Memory for Recording<'_, M> {
    fn read(&self, addr: u64, buf: &mut [u8]) -> bool {
        let ok = self.inner.read(addr, buf);
        if ok {
            self.image.borrow_mut().insert(addr, buf);
        }
        ok
    }

    fn read_many(&self, addrs: &[u64], len: usize, out: &mut [u8]) -> Vec<bool> {
        let read = self.inner.read_many(addrs, len, out);
        let mut image = self.image.borrow_mut();
        for ((addr, ok), bytes) in addrs.iter().zip(&read).zip(out.chunks_exact(len)) {
            if *ok {
                image.insert(*addr, bytes);
            }
        }
        read
    }
}

/// The memory of one process.
#[derive(Clone, Copy, Debug)]
pub struct ProcessMemory {
    pid: libc::pid_t,
}

/// Most iovecs one process_vm_readv takes (IOV_MAX).
const IOV_MAX: usize = 1024;

impl ProcessMemory {
    pub fn new(pid: u32) -> Self {
        ProcessMemory { pid: pid as libc::pid_t }
    }

    pub fn pid(&self) -> u32 {
        self.pid as u32
    }

    /// Whether this process may read the target's memory at all (ptrace access mode
    /// PTRACE_MODE_ATTACH_REALCREDS: CAP_SYS_PTRACE, or the same user under YAMA's rules): the
    /// error of reading a word that is always mapped, `addr` (e.g. the start of its code).
    pub fn check_access(&self, addr: u64) -> Result<(), std::io::Error> {
        let mut buf = [0u8; 8];
        let local = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: 8 };
        let remote = libc::iovec { iov_base: addr as *mut libc::c_void, iov_len: 8 };
        // SAFETY: `local` covers exactly `buf`; the kernel checks `remote`.
        match unsafe { libc::process_vm_readv(self.pid, &local, 1, &remote, 1, 0) } {
            8 => Ok(()),
            _ => Err(std::io::Error::last_os_error()),
        }
    }
}

impl Memory for ProcessMemory {
    fn read(&self, addr: u64, buf: &mut [u8]) -> bool {
        if addr == 0 {
            return false;
        }
        let local = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
        let remote = libc::iovec { iov_base: addr as *mut libc::c_void, iov_len: buf.len() };
        // SAFETY: `local` covers exactly `buf`; the kernel checks `remote`.
        let n = unsafe { libc::process_vm_readv(self.pid, &local, 1, &remote, 1, 0) };
        n == buf.len() as isize
    }

    /// Up to [`IOV_MAX`] reads per system call. The kernel stops at the first piece it can't
    /// read: that one fails, and the rest go on from the next.
    fn read_many(&self, addrs: &[u64], len: usize, out: &mut [u8]) -> Vec<bool> {
        let mut ok = vec![false; addrs.len()];
        let mut next = 0;
        while next < addrs.len() {
            let end = (next + IOV_MAX).min(addrs.len());
            let pieces = &mut out[next * len..end * len];
            let local: Vec<libc::iovec> = pieces
                .chunks_exact_mut(len)
                .map(|buf| libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: len })
                .collect();
            let remote: Vec<libc::iovec> = addrs[next..end]
                .iter()
                .map(|&addr| libc::iovec { iov_base: addr as *mut libc::c_void, iov_len: len })
                .collect();
            // SAFETY: every local iovec covers one `len`-byte piece of `out`; the kernel
            // checks the remote ones.
            let n = unsafe {
                libc::process_vm_readv(
                    self.pid,
                    local.as_ptr(),
                    local.len() as libc::c_ulong,
                    remote.as_ptr(),
                    remote.len() as libc::c_ulong,
                    0,
                )
            };
            let whole = if n < 0 || len == 0 { 0 } else { n as usize / len };
            for flag in &mut ok[next..next + whole] {
                *flag = true;
            }
            // The piece after the whole ones failed (or the call did): skip it.
            next += whole + usize::from(next + whole < end);
        }
        ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_memory_and_refuses_bad_addresses() {
        let value: u64 = 0x1122_3344_5566_7788;
        let me = ProcessMemory::new(std::process::id());
        assert_eq!(me.read_u64(&value as *const u64 as u64), Some(value));
        assert_eq!(me.read_u64(0), None);
        assert_eq!(me.read_u64(8), None);
    }
}
