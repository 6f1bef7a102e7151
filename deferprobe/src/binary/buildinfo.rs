//! `.go.buildinfo`: the Go version (with its GOEXPERIMENT suffix) and the module information
//! that the linker embeds in every Go 1.18+ executable, stripped ones included.

use std::path::Path;

use object::{
    Endianness, Object as _, ObjectSection as _, elf,
    read::elf::{ElfFile64, ProgramHeader as _},
};
use serde::Serialize;

use super::BinaryError;
use crate::layout::GoRelease;

const MAGIC: &[u8] = b"\xff Go buildinf:";
const HEADER_SIZE: usize = 32;
const FLAGS_OFFSET: usize = 15;
/// Flags bit: version and modinfo follow the header as varint-length strings (Go 1.18+).
const FLAGS_VERSION_INLINE: u8 = 0x2;
/// The linker aligns the blob to 16 bytes.
const ALIGN: u64 = 16;
/// cmd/go frames modinfo with a 16-byte sentinel at each end.
const MODINFO_SENTINEL_LEN: usize = 16;

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BuildInfo {
    /// The toolchain version without the experiment suffix, e.g. `go1.27.3`.
    pub version: String,
    pub release: GoRelease,
    pub patch: u32,
    /// Non-default GOEXPERIMENTs (`go1.24.11 X:noswissmap`, `go1.26.6-X:foo,bar`).
    pub experiments: Vec<String>,
    /// From the modinfo `mod\t<path>\t...` line.
    pub module_path: Option<String>,
    /// From the modinfo `path\t<package>` line.
    pub main_package: Option<String>,
    /// The `build\tGOOS=...` and `build\tGOARCH=...` settings of modinfo (what `go build`
    /// targeted), when present.
    pub goos: Option<String>,
    pub goarch: Option<String>,
}

impl BuildInfo {
    pub(super) fn read(
        path: &Path,
        elf: &ElfFile64<'_, Endianness>,
    ) -> Result<BuildInfo, BinaryError> {
        Self::parse(path, locate(path, elf)?)
    }

    /// Parses the blob starting at the magic (it may run on past the strings).
    pub(super) fn parse(path: &Path, blob: &[u8]) -> Result<BuildInfo, BinaryError> {
        let corrupt = |reason: &str| BinaryError::CorruptBuildInfo {
            path: path.to_owned(),
            reason: reason.to_owned(),
        };
        if !blob.starts_with(MAGIC) {
            return Err(corrupt("bad magic"));
        }
        let flags = *blob.get(FLAGS_OFFSET).ok_or_else(|| corrupt("truncated header"))?;
        if flags & FLAGS_VERSION_INLINE == 0 {
            return Err(BinaryError::GoTooOld { path: path.to_owned() });
        }
        let strings = blob.get(HEADER_SIZE..).ok_or_else(|| corrupt("truncated header"))?;
        let (version, rest) =
            read_string(strings).ok_or_else(|| corrupt("truncated version string"))?;
        let (modinfo, _) = read_string(rest).ok_or_else(|| corrupt("truncated modinfo"))?;
        let version = std::str::from_utf8(version).map_err(|_| corrupt("version is not UTF-8"))?;
        let modinfo = std::str::from_utf8(strip_modinfo_framing(modinfo))
            .map_err(|_| corrupt("modinfo is not UTF-8"))?;
        Self::from_strings(path, version, modinfo)
    }

    fn from_strings(
        path: &Path,
        raw_version: &str,
        modinfo: &str,
    ) -> Result<BuildInfo, BinaryError> {
        let (version, experiments) = split_experiments(raw_version);
        let (release, patch) = parse_version(version).ok_or_else(|| {
            BinaryError::UnknownVersion { path: path.to_owned(), version: raw_version.to_owned() }
        })?;
        // The first tab-separated field after `key` on the first line starting with it.
        let field = |key: &str| {
            modinfo.lines().find_map(|line| {
                line.strip_prefix(key)?.strip_prefix('\t')?.split('\t').next().map(str::to_owned)
            })
        };
        let setting = |key: &str| {
            modinfo.lines().find_map(|line| {
                let value = line.strip_prefix("build\t")?.strip_prefix(key)?.strip_prefix('=')?;
                Some(value.to_owned())
            })
        };
        Ok(BuildInfo {
            version: version.to_owned(),
            release,
            patch,
            experiments,
            module_path: field("mod"),
            main_package: field("path"),
            goos: setting("GOOS"),
            goarch: setting("GOARCH"),
        })
    }
}

/// The blob from the `.go.buildinfo` section or, when section headers are missing or renamed,
/// from a 16-byte-aligned magic in a writable, non-executable segment (as `debug/buildinfo`
/// does).
fn locate<'data>(
    path: &Path,
    elf: &ElfFile64<'data, Endianness>,
) -> Result<&'data [u8], BinaryError> {
    if let Some(section) = elf.section_by_name(".go.buildinfo") {
        return section.data().map_err(|err| BinaryError::CorruptBuildInfo {
            path: path.to_owned(),
            reason: err.to_string(),
        });
    }
    let endian = elf.endian();
    let data_segments = elf.elf_program_headers().iter().filter(|ph| {
        ph.p_type(endian) == elf::PT_LOAD
            && ph.p_flags(endian) & (elf::PF_X | elf::PF_W) == elf::PF_W
    });
    for segment in data_segments {
        let Ok(bytes) = segment.data(endian, elf.data()) else {
            continue;
        };
        // First file offset in the segment whose virtual address is 16-byte aligned.
        let first = (ALIGN - segment.p_vaddr(endian) % ALIGN) % ALIGN;
        let found = (first as usize..bytes.len())
            .step_by(ALIGN as usize)
            .find(|&offset| bytes[offset..].starts_with(MAGIC));
        if let Some(offset) = found {
            return Ok(&bytes[offset..]);
        }
    }
    Err(BinaryError::NotGo { path: path.to_owned() })
}

/// A string prefixed by its length as an unsigned LEB128 varint, and what follows it.
pub(super) fn read_string(data: &[u8]) -> Option<(&[u8], &[u8])> {
    let (len, used) = read_uvarint(data)?;
    let rest = &data[used..];
    let len = usize::try_from(len).ok().filter(|&len| len <= rest.len())?;
    Some(rest.split_at(len))
}

/// `encoding/binary.Uvarint`: the value and the number of bytes it took.
fn read_uvarint(data: &[u8]) -> Option<(u64, usize)> {
    let mut value = 0u64;
    for (index, &byte) in data.iter().enumerate().take(10) {
        if index == 9 && byte > 1 {
            return None; // overflows 64 bits
        }
        value |= u64::from(byte & 0x7f) << (7 * index);
        if byte & 0x80 == 0 {
            return Some((value, index + 1));
        }
    }
    None
}

/// Removes cmd/go's sentinels around modinfo; like `debug/buildinfo`, anything unframed counts
/// as no modinfo.
fn strip_modinfo_framing(modinfo: &[u8]) -> &[u8] {
    let len = modinfo.len();
    if len > 2 * MODINFO_SENTINEL_LEN && modinfo[len - MODINFO_SENTINEL_LEN - 1] == b'\n' {
        &modinfo[MODINFO_SENTINEL_LEN..len - MODINFO_SENTINEL_LEN]
    } else {
        &[]
    }
}

/// `go1.24.11 X:noswissmap` or `go1.26.6-X:foo,bar` → (`go1.24.11`, the experiments). The
/// linker uses `-X:` from 1.26 unless the version already contains a `-`.
fn split_experiments(raw: &str) -> (&str, Vec<String>) {
    match raw.find(" X:").or_else(|| raw.find("-X:")) {
        Some(at) => {
            let experiments = raw[at + 3..]
                .split(',')
                .map(str::trim)
                .filter(|experiment| !experiment.is_empty())
                .map(str::to_owned)
                .collect();
            (&raw[..at], experiments)
        }
        None => (raw, Vec::new()),
    }
}

/// `go1.27.3` → (1.27, 3); `go1.22` and prereleases such as `go1.23rc1` have patch 0.
fn parse_version(version: &str) -> Option<(GoRelease, u32)> {
    let rest = version.strip_prefix("go")?;
    let (major, rest) = leading_number(rest)?;
    let (minor, rest) = leading_number(rest.strip_prefix('.')?)?;
    let patch = match rest.strip_prefix('.') {
        Some(rest) => leading_number(rest)?.0,
        None => 0,
    };
    Some((GoRelease::new(major, minor), patch))
}

fn leading_number(text: &str) -> Option<(u32, &str)> {
    let end = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    Some((text[..end].parse().ok()?, &text[end..]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::binary::{
        GoBinary,
        testbin::{self, Program, Variant},
    };

    fn synthetic(version: &str) -> BuildInfo {
        BuildInfo::from_strings(Path::new("synthetic"), version, "").unwrap()
    }

    #[test]
    fn real_binaries() {
        for toolchain in testbin::toolchains() {
            let release = &toolchain.version;
            for program in Program::ALL {
                for variant in Variant::ALL {
                    let path = testbin::build(&toolchain, program, variant);
                    let binary = GoBinary::open(&path).unwrap();
                    let info = binary.build_info();
                    assert_eq!(info.version, format!("go{release}"));
                    assert_eq!(&format!("{}.{}", info.release, info.patch), release);
                    assert_eq!(info.experiments, Vec::<String>::new());
                    assert_eq!(info.module_path.as_deref(), Some("deferprobe.test/programs"));
                    let package = format!("deferprobe.test/programs/{}", program.dir());
                    assert_eq!(info.main_package.as_deref(), Some(package.as_str()));
                    assert_eq!(info.goos.as_deref(), Some("linux"));
                    assert_eq!(info.goarch.as_deref(), Some("amd64"));
                }
            }
        }
    }

    #[test]
    fn experiments_space_form() {
        let info = synthetic("go1.24.11 X:noswissmap");
        assert_eq!(info.version, "go1.24.11");
        assert_eq!((info.release, info.patch), (GoRelease::new(1, 24), 11));
        assert_eq!(info.experiments, ["noswissmap"]);
        let info = synthetic("go1.22.0-bigcorp X:foo,nobar");
        assert_eq!(info.version, "go1.22.0-bigcorp");
        assert_eq!(info.experiments, ["foo", "nobar"]);
    }

    #[test]
    fn experiments_dash_form() {
        let info = synthetic("go1.26.6-X:foo,bar");
        assert_eq!(info.version, "go1.26.6");
        assert_eq!((info.release, info.patch), (GoRelease::new(1, 26), 6));
        assert_eq!(info.experiments, ["foo", "bar"]);
    }

    #[test]
    fn versions() {
        assert_eq!(parse_version("go1.22"), Some((GoRelease::new(1, 22), 0)));
        assert_eq!(parse_version("go1.23rc1"), Some((GoRelease::new(1, 23), 0)));
        assert_eq!(parse_version("go1.21.13"), Some((GoRelease::new(1, 21), 13)));
        assert_eq!(parse_version("devel go1.24-abc"), None);
        assert_eq!(parse_version("go1"), None);
        assert_eq!(parse_version("go1.x"), None);
        assert!(matches!(
            BuildInfo::from_strings(Path::new("f"), "weird", ""),
            Err(BinaryError::UnknownVersion { .. })
        ));
    }

    #[test]
    fn modinfo_lines() {
        let modinfo = "path\tex.com/cmd/x\nmod\tex.com\tv1.2.3\th1:abc=\ndep\tgolang.org/x/sys\t\
                       v0.1.0\nbuild\t-trimpath=true\nbuild\tGOARCH=arm64\nbuild\tGOOS=freebsd\n";
        let info = BuildInfo::from_strings(Path::new("f"), "go1.27.3", modinfo).unwrap();
        assert_eq!(info.main_package.as_deref(), Some("ex.com/cmd/x"));
        assert_eq!(info.module_path.as_deref(), Some("ex.com"));
        assert_eq!(info.goos.as_deref(), Some("freebsd"));
        assert_eq!(info.goarch.as_deref(), Some("arm64"));
        let info = BuildInfo::from_strings(Path::new("f"), "go1.27.3", "path\tp\n").unwrap();
        assert_eq!((info.goos, info.goarch), (None, None));
    }

    fn blob(flags: u8, version: &[u8], modinfo: &[u8]) -> Vec<u8> {
        let mut blob = MAGIC.to_vec();
        blob.extend([8, flags]);
        blob.resize(HEADER_SIZE, 0);
        for string in [version, modinfo] {
            blob.push(u8::try_from(string.len()).unwrap());
            blob.extend(string);
        }
        blob
    }

    #[test]
    fn blob_parsing() {
        let sentinel = [0xaa; MODINFO_SENTINEL_LEN];
        let modinfo = [&sentinel[..], b"path\tp\nmod\tm\t(devel)\t\n", &sentinel[..]].concat();
        let info = BuildInfo::parse(Path::new("f"), &blob(2, b"go1.21.13", &modinfo)).unwrap();
        assert_eq!(info.version, "go1.21.13");
        assert_eq!(info.main_package.as_deref(), Some("p"));
        assert_eq!(info.module_path.as_deref(), Some("m"));

        // Unframed modinfo is ignored, like debug/buildinfo does.
        let info = BuildInfo::parse(Path::new("f"), &blob(2, b"go1.21.13", b"path\tp\n")).unwrap();
        assert_eq!(info.main_package, None);

        let err = BuildInfo::parse(Path::new("f"), &blob(0, b"", b"")).unwrap_err();
        assert!(matches!(err, BinaryError::GoTooOld { .. }), "{err}");

        let mut truncated = blob(2, b"go1.21.13", &modinfo);
        truncated.truncate(HEADER_SIZE + 5);
        let err = BuildInfo::parse(Path::new("f"), &truncated).unwrap_err();
        assert_eq!(err.to_string(), "f: corrupt .go.buildinfo: truncated version string");

        let err = BuildInfo::parse(Path::new("f"), &MAGIC[..10]).unwrap_err();
        assert_eq!(err.to_string(), "f: corrupt .go.buildinfo: bad magic");
    }

    #[test]
    fn uvarints() {
        assert_eq!(read_uvarint(&[0x05]), Some((5, 1)));
        assert_eq!(read_uvarint(&[0xac, 0x02]), Some((300, 2)));
        assert_eq!(read_uvarint(&[0x80]), None);
        assert_eq!(read_uvarint(&[0xff; 10]), None);
        assert_eq!(read_string(&[0x7f, b'a']), None);
    }
}
