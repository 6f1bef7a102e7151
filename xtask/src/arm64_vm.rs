//! `cargo xtask test-arm64`: deferprobe in a real arm64 Linux. Boots Debian's arm64 cloud
//! kernel (Linux 6.1: BTF and uprobes, no multi-uprobe links, so the per-point attach path
//! runs) under `qemu-system-aarch64` with an initramfs holding the cross-built deferprobe
//! ([`super::cross`]), the workload cross-built with Go 1.21 and 1.27, plain and stripped, a
//! busybox and a shell runner (`init`). The runner traces each program with `run -- CMD`,
//! writes what it got to /out and prints every file base64-encoded between markers on the
//! serial console; this task decodes them into target/arm64-vm/results/ and checks each case
//! against the program's own accounting. Everything comes from Debian's packages and PyPI's
//! Go toolchains.
//!
//! Cases: the counts (heap defers and deferreturn exact, map writes and allocations at least
//! the program's own count, goroutine exits, nothing lost, nothing pending, the command's exit
//! code passed on). Not yet: the correlation ground truth, the snapshot of defers pending
//! before attach, the stress program's self-check (they need the ready/go protocol of
//! tests/e2e/support.rs driven inside the VM).

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, Result, bail, ensure};
use serde_json::Value;

use super::{apt_install, cross, go_binary, workspace_root};

/// The releases and variants the VM traces (the oldest and newest the tests use).
const RELEASES: [&str; 2] = ["1.21.13", "1.27.3"];
const VARIANTS: [(&str, &[&str]); 2] = [("plain", &[]), ("stripped", &["-ldflags=-s -w"])];

/// The counts case: as tests/e2e/counts.rs (20 × 25 loop defers, 10 goroutines × 2).
const WORKLOAD_ARGS: &str = "-calls 20 -defers 25 -map-writes 500 -goroutines 10 -exit-code 3";

/// How long the VM may run (TCG emulation is slow: about 40 s for every case here).
const VM_TIMEOUT_SECS: u64 = 900;

pub fn test_arm64() -> Result<()> {
    let started = Instant::now();
    let deferprobe = cross::cross_build()?;
    let dir = workspace_root().join("target/arm64-vm");
    let (kernel, busybox) = debian_arm64_files(&dir)?;
    let initrd = dir.join("initrd");
    let _ = std::fs::remove_dir_all(&initrd);
    for sub in ["bin", "proc", "sys", "dev", "tmp", "out"] {
        std::fs::create_dir_all(initrd.join(sub))?;
    }
    std::fs::copy(&busybox, initrd.join("bin/busybox"))?;
    std::fs::copy(&deferprobe, initrd.join("bin/deferprobe"))?;
    let mut targets = Vec::new();
    for release in RELEASES {
        for (variant, flags) in VARIANTS {
            let name = format!("workload-{release}-{variant}");
            build_go(release, flags, "workload", &initrd.join("bin").join(&name))?;
            targets.push(name);
        }
    }
    std::fs::write(initrd.join("init"), runner(&targets))?;
    set_executable(&initrd.join("init"))?;
    let image = dir.join("initrd.gz");
    pack(&initrd, &image)?;
    let console = boot(&kernel, &image, &dir.join("console.log"))?;
    let results = dir.join("results");
    let _ = std::fs::remove_dir_all(&results);
    std::fs::create_dir_all(&results)?;
    let files = decode_console(&console, &results)?;
    ensure!(console.contains("BOOTED aarch64"), "the VM did not boot: see {}", dir.display());
    let mut failures = Vec::new();
    for target in &targets {
        match check_counts(&results, target) {
            Ok(summary) => eprintln!("[xtask] arm64 {target}: ok ({summary})"),
            Err(err) => failures.push(format!("{target}: {err:#}")),
        }
    }
    eprintln!(
        "[xtask] test-arm64: {} files back from the VM, {} cases, {:.0} s in all",
        files,
        targets.len(),
        started.elapsed().as_secs_f64()
    );
    if !failures.is_empty() {
        bail!("arm64 cases failed (results in {}):\n{}", results.display(), failures.join("\n"));
    }
    println!("{} passed, 0 failed", targets.len());
    Ok(())
}

/// The arm64 kernel image and busybox from Debian's packages (foreign-architecture downloads,
/// not installs), extracted under `dir` once.
fn debian_arm64_files(dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let busybox = dir.join("bb/bin/busybox");
    let kernel = find_kernel(dir);
    if let (Some(kernel), true) = (kernel, busybox.exists()) {
        return Ok((kernel, busybox));
    }
    if Command::new("qemu-system-aarch64").arg("--version").output().is_err() {
        apt_install(&["qemu-system-arm", "cpio"])?;
    }
    let debs = dir.join("debs");
    std::fs::create_dir_all(&debs)?;
    let run = |program: &str, args: &[&str], cwd: &Path| -> Result<String> {
        let output = Command::new(program)
            .args(args)
            .current_dir(cwd)
            .output()
            .with_context(|| format!("running {program}"))?;
        ensure!(
            output.status.success(),
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    };
    run("dpkg", &["--add-architecture", "arm64"], dir)?;
    let downloaded = (|| -> Result<()> {
        run("apt-get", &["update", "-qq"], dir)?;
        // The metapackage names the current kernel package.
        let depends = run("apt-cache", &["depends", "linux-image-cloud-arm64:arm64"], dir)?;
        let image = depends
            .lines()
            .find_map(|line| line.trim().strip_prefix("Depends: "))
            .context("apt-cache depends linux-image-cloud-arm64:arm64 names no kernel")?
            .to_owned();
        run("apt-get", &["download", &image, "busybox-static:arm64"], &debs)?;
        Ok(())
    })();
    run("dpkg", &["--remove-architecture", "arm64"], dir)?;
    run("apt-get", &["update", "-qq"], dir)?;
    downloaded?;
    for entry in std::fs::read_dir(&debs)? {
        let path = entry?.path();
        let into = match path.file_name().and_then(|n| n.to_str()) {
            Some(name) if name.starts_with("linux-image") => dir.join("kern"),
            Some(name) if name.starts_with("busybox") => dir.join("bb"),
            _ => continue,
        };
        let path = path.to_string_lossy().into_owned();
        run("dpkg-deb", &["-x", &path, &into.to_string_lossy()], dir)?;
    }
    let kernel = find_kernel(dir).context("no vmlinuz in the kernel package")?;
    ensure!(busybox.exists(), "no busybox in busybox-static:arm64");
    Ok((kernel, busybox))
}

fn find_kernel(dir: &Path) -> Option<PathBuf> {
    std::fs::read_dir(dir.join("kern/boot")).ok()?.find_map(|entry| {
        let path = entry.ok()?.path();
        path.file_name()?.to_str()?.starts_with("vmlinuz-").then_some(path)
    })
}

/// `go build` of tests/go/<program> for GOARCH=arm64.
fn build_go(release: &str, flags: &[&str], program: &str, out: &Path) -> Result<()> {
    let root = workspace_root();
    let go = go_binary(release);
    ensure!(go.exists(), "{} is missing: run `cargo xtask setup`", go.display());
    let output = Command::new(&go)
        .arg("build")
        .args(flags)
        .arg("-o")
        .arg(out)
        .arg(format!("./{program}"))
        .current_dir(root.join("tests/go"))
        .env("GOARCH", "arm64")
        .env("CGO_ENABLED", "0")
        .env("GOTOOLCHAIN", "local")
        .env("GOFLAGS", "-mod=mod")
        .env("GOCACHE", root.join("target/go-cache").join(format!("{release}-arm64")))
        .env("GOPATH", root.join("target/go-path"))
        .output()?;
    ensure!(
        output.status.success(),
        "go{release} arm64 build ./{program}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

/// The VM's init: mounts, runs every case into /out, prints /out on the console, powers off.
fn runner(targets: &[String]) -> String {
    let mut script = String::from(
        "#!/bin/busybox sh\n\
         /bin/busybox --install -s /bin\n\
         mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev\n\
         mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null\n\
         echo \"BOOTED $(uname -m) $(uname -r)\"\n\
         cd /out\n",
    );
    for target in targets {
        script.push_str(&format!(
            "/bin/deferprobe inspect /bin/{target} > inspect-{target}.txt 2>&1\n\
             /bin/deferprobe run --interval 100ms --max-overhead 1000 --report \
             /out/counts-{target}.json -- /bin/{target} {WORKLOAD_ARGS} \
             > counts-{target}.stdout 2> counts-{target}.stderr\n\
             echo $? > counts-{target}.code\n"
        ));
    }
    script.push_str(
        "for f in /out/*; do echo \"=====BEGIN $(basename $f)\"; base64 $f; echo =====END; done\n\
         poweroff -f\n",
    );
    script
}

fn set_executable(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// `find . | cpio -o -H newc | gzip` in `dir`.
fn pack(dir: &Path, image: &Path) -> Result<()> {
    let script = format!("find . | cpio -o -H newc 2>/dev/null | gzip -1 > '{}'", image.display());
    let status = Command::new("sh").args(["-c", &script]).current_dir(dir).status()?;
    ensure!(status.success(), "packing the initramfs failed (are cpio and gzip installed?)");
    Ok(())
}

/// Boots the VM (2 vCPUs, TCG) and returns its console output (also written to `log`).
fn boot(kernel: &Path, initrd: &Path, log: &Path) -> Result<String> {
    let output = Command::new("timeout")
        .arg(VM_TIMEOUT_SECS.to_string())
        .arg("qemu-system-aarch64")
        .args(["-M", "virt", "-cpu", "max", "-smp", "2", "-m", "1536", "-nographic"])
        .arg("-no-reboot")
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", "console=ttyAMA0 panic=-1 quiet"])
        .output()
        .context("running qemu-system-aarch64 (apt-get install qemu-system-arm)")?;
    let console = String::from_utf8_lossy(&output.stdout).replace('\r', "");
    std::fs::write(log, &console)?;
    ensure!(
        output.status.success(),
        "qemu-system-aarch64 failed or timed out ({}): see {}",
        output.status,
        log.display()
    );
    Ok(console)
}

/// Writes every `=====BEGIN name` … `=====END` block of the console, base64-decoded, to
/// `results/name`; returns how many.
fn decode_console(console: &str, results: &Path) -> Result<usize> {
    let mut count = 0;
    let mut lines = console.lines();
    while let Some(line) = lines.next() {
        let Some(name) = line.strip_prefix("=====BEGIN ") else { continue };
        let mut encoded = String::new();
        for line in lines.by_ref() {
            if line == "=====END" {
                break;
            }
            encoded.push_str(line.trim());
        }
        let bytes = base64_decode(&encoded).with_context(|| format!("{name}: bad base64"))?;
        std::fs::write(results.join(name.trim()), bytes)?;
        count += 1;
    }
    Ok(count)
}

/// Standard base64 (busybox's `base64` output), padding allowed.
fn base64_decode(text: &str) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut buffer, mut bits) = (0u32, 0);
    for byte in text.bytes().filter(|b| *b != b'=') {
        let value = match byte {
            b'A'..=b'Z' => byte - b'A',
            b'a'..=b'z' => byte - b'a' + 26,
            b'0'..=b'9' => byte - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            other => bail!("unexpected byte {other:#x}"),
        };
        buffer = (buffer << 6) | u32::from(value);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((buffer >> bits) as u8);
        }
    }
    Ok(out)
}

/// The counts case of `target` against the workload's own accounting.
fn check_counts(results: &Path, target: &str) -> Result<String> {
    let read = |suffix: &str| -> Result<String> {
        let path = results.join(format!("counts-{target}.{suffix}"));
        std::fs::read_to_string(&path)
            .with_context(|| format!("{} not back from the VM", path.display()))
    };
    let code = read("code")?;
    let stderr = read("stderr")?;
    ensure!(code.trim() == "3", "exit code {} (the command's is 3): {stderr}", code.trim());
    let stdout = read("stdout")?;
    let truth: Value = stdout
        .lines()
        .find(|line| line.starts_with("{\"heap_defers\""))
        .map(serde_json::from_str)
        .transpose()?
        .with_context(|| format!("no ground truth in the program's output: {stdout}"))?;
    let report: Value = serde_json::from_str(&read("json")?)?;
    let truth_of = |key: &str| truth[key].as_u64().with_context(|| format!("truth has no {key}"));
    let count = |key: &str| {
        report["counts"][key].as_u64().with_context(|| format!("report has no counts.{key}"))
    };
    ensure!(truth_of("heap_defers")? == 20 * 25 + 10 * 2, "the workload did other work: {truth}");
    let checks = [
        ("deferproc", count("deferproc")? == truth_of("heap_defers")?),
        ("deferreturn", count("deferreturn")? == truth_of("heap_defer_frame_returns")?),
        (
            "mapassign",
            count("mapassign")? >= truth_of("str_map_writes")? + truth_of("int_map_writes")?,
        ),
        ("mallocgc", count("mallocgc")? >= truth_of("mallocs")?),
        ("goroutine_exits", count("goroutine_exits")? >= truth_of("goroutines_ended")?),
        ("lost_events", count("lost_events")? == 0),
        ("pending", report["pending"]["heap_defers"] == 0),
        ("go_version", report["target"]["go_version"] == truth["go_version"]),
    ];
    let failed: Vec<&str> = checks.iter().filter(|(_, ok)| !ok).map(|(what, _)| *what).collect();
    ensure!(failed.is_empty(), "{} wrong: report {report}, truth {truth}", failed.join(", "));
    ensure!(
        stderr.contains("attach_mode=PerPoint"),
        "expected the per-point attach path on Linux 6.1: {stderr}"
    );
    Ok(format!(
        "deferproc {} deferreturn {} mapassign {} mallocgc {} (runtime {})",
        count("deferproc")?,
        count("deferreturn")?,
        count("mapassign")?,
        count("mallocgc")?,
        truth_of("mallocs")?
    ))
}
