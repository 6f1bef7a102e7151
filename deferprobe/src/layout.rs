//! Offsets of the Go runtime structures deferprobe reads (`runtime.g`, `runtime.m`,
//! `runtime._defer`), and the built-in table of them per Go release for binaries without DWARF.
//!
//! DWARF, when the binary has it, wins over the table (see `binary::dwarf`); the table is what
//! stripped binaries get. A release missing from the table is refused, never guessed.

use serde::Serialize;

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
    pub defer_size: u64,
}

/// Where a [`RuntimeLayout`] came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LayoutSource {
    Dwarf,
    ReleaseTable,
}

const fn layout(g_goid: u64, m_curg: u64, defer_link: u64, defer_size: u64) -> RuntimeLayout {
    RuntimeLayout {
        g_defer: 40,
        g_m: 48,
        g_goid,
        m_curg,
        defer_sp: 8,
        defer_pc: 16,
        defer_fn: 24,
        defer_link,
        defer_size,
    }
}

/// Layouts per release, linux/amd64. Checked against each release's DWARF by the unit tests in
/// `binary::dwarf` (every installed toolchain) .
pub const RELEASE_TABLE: &[(GoRelease, RuntimeLayout)] = &[
    (GoRelease::new(1, 21), layout(152, 192, 40, 72)),
    (GoRelease::new(1, 22), layout(152, 192, 32, 48)),
    (GoRelease::new(1, 23), layout(160, 192, 32, 48)),
    (GoRelease::new(1, 24), layout(160, 192, 32, 48)),
    (GoRelease::new(1, 25), layout(152, 184, 32, 48)),
    (GoRelease::new(1, 26), layout(152, 184, 32, 48)),
    (GoRelease::new(1, 27), layout(152, 184, 32, 48)),
];

/// The built-in layout for `release`, if the table has it.
pub fn for_release(release: GoRelease) -> Option<RuntimeLayout> {
    RELEASE_TABLE.iter().find(|(r, _)| *r == release).map(|(_, layout)| *layout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_has_every_supported_release_once() {
        for minor in 21..=27 {
            let hits = RELEASE_TABLE.iter().filter(|(r, _)| *r == GoRelease::new(1, minor)).count();
            assert_eq!(hits, 1, "go1.{minor}");
        }
        assert_eq!(for_release(GoRelease::new(1, 20)), None);
        assert_eq!(for_release(GoRelease::new(1, 23)).unwrap().g_goid, 160);
    }
}
