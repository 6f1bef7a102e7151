//! Builds the eBPF object (deferprobe-ebpf, BPF target) with aya-build; src/tracer.rs embeds it.
use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    // AYA_BUILD_SKIP=1 (analysis-only builds) leaves an empty object; loading it then fails
    // with a clear error instead of the build failing.
    println!("cargo::rerun-if-env-changed=AYA_BUILD_SKIP");
    if std::env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true")) {
        let out_dir = std::env::var("OUT_DIR").context("OUT_DIR")?;
        std::fs::write(std::path::Path::new(&out_dir).join("deferprobe"), [])?;
        return Ok(());
    }
    let metadata = cargo_metadata()?;
    let toolchain = toolchain_channel()?;
    aya_build::build_ebpf(
        [aya_build::Package { name: "deferprobe-ebpf", root_dir: &metadata, ..Default::default() }],
        aya_build::Toolchain::Custom(&toolchain),
    )
}

/// Directory of the deferprobe-ebpf crate.
fn cargo_metadata() -> anyhow::Result<String> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let dir = std::path::Path::new(&manifest_dir).join("../deferprobe-ebpf");
    let dir = dir.canonicalize().with_context(|| format!("{}", dir.display()))?;
    dir.to_str().map(str::to_owned).ok_or_else(|| anyhow!("non-UTF-8 path {}", dir.display()))
}

/// The toolchain pinned in rust-toolchain.toml, so the eBPF crate's bitcode matches bpf-linker's
/// LLVM.
fn toolchain_channel() -> anyhow::Result<String> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let path = std::path::Path::new(&manifest_dir).join("../rust-toolchain.toml");
    println!("cargo::rerun-if-changed={}", path.display());
    let text = std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
    text.lines()
        .find_map(|line| {
            let value = line.trim().strip_prefix("channel")?.trim().strip_prefix('=')?;
            Some(value.trim().trim_matches('"').to_owned())
        })
        .ok_or_else(|| anyhow!("no channel in {}", path.display()))
}
