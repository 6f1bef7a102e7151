//! Test support: locating the real Go binaries built by `cargo xtask go-programs`, and
//! temporary (possibly damaged) copies of them.

use std::{
    path::{Path, PathBuf},
    sync::atomic::{AtomicUsize, Ordering},
};

use object::{Object as _, ObjectSection as _, read::elf::ElfFile64};

/// The programs under tests/go.
pub const PROGRAMS: [&str; 2] = ["workload", "demo"];

/// Runtime functions every supported release has.
pub const FUNCTIONS: [&str; 5] = [
    "runtime.deferproc",
    "runtime.deferreturn",
    "runtime.mapassign_faststr",
    "runtime.mallocgc",
    "runtime.goexit1",
];

fn workspace() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("deferprobe is inside the workspace")
}

/// The Go releases the test programs are built with (tests/go/releases.txt), e.g. "1.27.3".
pub fn releases() -> Vec<String> {
    let list = workspace().join("tests/go/releases.txt");
    let text =
        std::fs::read_to_string(&list).unwrap_or_else(|err| panic!("{}: {err}", list.display()));
    let releases: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(str::to_owned)
        .collect();
    assert!(
        !releases.is_empty(),
        "{} lists no Go release",
        list.display()
    );
    releases
}

/// target/go-programs/go<release>/<program>; fails the test when it has not been built.
pub fn path(release: &str, program: &str) -> PathBuf {
    let path = workspace()
        .join("target/go-programs")
        .join(format!("go{release}"))
        .join(program);
    assert!(
        path.is_file(),
        "{} is missing: run `cargo xtask go-programs` to build the Go test programs",
        path.display()
    );
    path
}

/// A file in the temp directory, removed on drop.
pub struct TempFile {
    path: PathBuf,
}

impl TempFile {
    pub fn new(name: &str, contents: &[u8]) -> TempFile {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let unique = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!(
            "deferprobe-binary-test-{}-{unique}-{name}",
            std::process::id()
        ));
        std::fs::write(&path, contents).unwrap_or_else(|err| panic!("{}: {err}", path.display()));
        TempFile { path }
    }

    /// A copy of `original` changed by `patch`.
    pub fn patched(original: &Path, patch: impl FnOnce(&mut Vec<u8>)) -> TempFile {
        let mut bytes = std::fs::read(original).unwrap();
        patch(&mut bytes);
        TempFile::new(&original.file_name().unwrap().to_string_lossy(), &bytes)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Where a section's header and contents are in the file.
struct SectionLocation {
    header: usize,
    contents: std::ops::Range<usize>,
}

fn locate_section(bytes: &[u8], name: &str) -> SectionLocation {
    let elf = ElfFile64::<object::Endianness>::parse(bytes).unwrap();
    let section = elf
        .section_by_name(name)
        .unwrap_or_else(|| panic!("no section {name}"));
    let (offset, size) = section
        .file_range()
        .unwrap_or_else(|| panic!("{name} has no file contents"));
    let endian = elf.endian();
    let table = elf.elf_header().e_shoff.get(endian) as usize;
    let entry_size = usize::from(elf.elf_header().e_shentsize.get(endian));
    SectionLocation {
        header: table + section.index().0 * entry_size,
        contents: offset as usize..(offset + size) as usize,
    }
}

/// Overwrites a 4-byte field of a section header.
fn set_header_field(bytes: &mut [u8], name: &str, field_offset: usize, value: u32) {
    let at = locate_section(bytes, name).header + field_offset;
    bytes[at..at + 4].copy_from_slice(&value.to_le_bytes());
}

/// Changes a section's type (e.g. `.symtab` to SHT_NULL, as if stripped).
pub fn set_section_type(bytes: &mut [u8], name: &str, sh_type: u32) {
    set_header_field(bytes, name, 4, sh_type);
}

/// Gives a section the empty name, so it cannot be found by name.
pub fn rename_section(bytes: &mut [u8], name: &str) {
    set_header_field(bytes, name, 0, 0);
}

/// XORs a section's file contents from byte `from` on.
pub fn scramble_section(bytes: &mut [u8], name: &str, from: usize) {
    let contents = locate_section(bytes, name).contents;
    for byte in &mut bytes[contents.start + from..contents.end] {
        *byte ^= 0x5a;
    }
}

#[test]
#[should_panic(expected = "run `cargo xtask go-programs`")]
fn missing_binaries_fail_loudly() {
    path("0.0.0", "workload");
}
