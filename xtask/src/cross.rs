//! `cargo xtask cross-build`: deferprobe for linux/arm64 (`aarch64-unknown-linux-gnu`, linked
//! statically), built on this x86_64 machine. Installs the Rust target with rustup and Debian's
//! `gcc-aarch64-linux-gnu` as the linker (it brings the arm64 glibc to link against) when
//! missing. The build script builds the eBPF object for the target's architecture
//! (`bpf_target_arch = "aarch64"`) and embeds it. The amd64 build is untouched: this one goes
//! to target/aarch64-unknown-linux-gnu/.

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, Result, ensure};

use super::{apt_install, cargo, workspace_root};

pub const TARGET: &str = "aarch64-unknown-linux-gnu";
const LINKER: &str = "aarch64-linux-gnu-gcc";

/// Builds deferprobe for linux/arm64 with the cargo profile `profile` and returns the binary's
/// path.
pub fn cross_build(profile: &str) -> Result<PathBuf> {
    install_target()?;
    if Command::new(LINKER).arg("--version").output().is_err() {
        eprintln!("[xtask] installing Debian's gcc-aarch64-linux-gnu (the arm64 linker)");
        apt_install(&["gcc-aarch64-linux-gnu", "libc6-dev-arm64-cross"])?;
    }
    let status = cargo()
        .args(["build", "--profile", profile, "--package", "deferprobe", "--bin", "deferprobe"])
        .args(["--target", TARGET])
        .env("CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER", LINKER)
        // Static: the arm64 test VM's initramfs has no libc. The linker then notes that std's
        // getpwuid_r (home_dir, unused) and getaddrinfo want glibc's NSS libraries at run time:
        // only a host name given to --metrics-addr is looked up that way (an IP address is
        // not). Known and accepted, so the note is not printed as a warning on every build.
        .env(
            "CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUSTFLAGS",
            "-C target-feature=+crt-static -A linker_messages",
        )
        .status()
        .context("running cargo build --target aarch64-unknown-linux-gnu")?;
    ensure!(status.success(), "cargo build --target {TARGET} failed");
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    Ok(target_dir.join(TARGET).join(profile).join("deferprobe"))
}

/// `rustup target add` for the toolchain rust-toolchain.toml pins, unless it has it.
fn install_target() -> Result<()> {
    let root = workspace_root();
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .current_dir(&root)
        .output()
        .context("running rustup (cross-building needs rustup)")?;
    if String::from_utf8_lossy(&installed.stdout).lines().any(|line| line.trim() == TARGET) {
        return Ok(());
    }
    eprintln!("[xtask] installing the Rust target {TARGET}");
    let status =
        Command::new("rustup").args(["target", "add", TARGET]).current_dir(&root).status()?;
    ensure!(status.success(), "rustup target add {TARGET} failed");
    Ok(())
}
