//! `cargo xtask test-arm64`: deferprobe in a real arm64 Linux. Boots Debian's arm64 cloud
//! kernel (Linux 6.1: BTF and uprobes, no multi-uprobe links, so the per-point attach path
//! runs) under `qemu-system-aarch64` with an initramfs holding the cross-built deferprobe
//! ([`super::cross`], profile `cross-vm`), the Go test programs cross-built with Go 1.21 and
//! 1.27, plain and stripped, a busybox, and `vmrunner` (xtask/vmrunner, Go): it runs the cases
//! of [`cases`] there, driving the programs' ready/go protocol, and prints each result on the
//! serial console (base64 between markers). This task decodes them into
//! target/arm64-vm/results/ and checks each against the program's own ground truth, with the
//! end-to-end tests' own checks (tests/e2e/checks.rs). Everything comes from Debian's packages
//! and PyPI's Go toolchains.
//!
//! Cases, for each release and variant:
//! - `counts`: the workload traced with `run -- CMD` (as tests/e2e/counts.rs): heap defers and
//!   deferreturn exact, map writes and allocations at least the program's own count, goroutine
//!   exits, nothing lost, nothing pending, the command's exit code passed on;
//! - `captures-*`: tests/go/captures traced by `--pid` from before it works, stopped with
//!   SIGINT while it holds its defers (as tests/e2e/correlation.rs): pending defers, captured
//!   maps (by value, by reference, after recovered panics, after Goexits), their entries,
//!   origins and the defer's site exact;
//! - `pending`: tests/go/pending's defers registered before deferprobe looks (as
//!   tests/e2e/runtime_state.rs): `inspect` names each site's closure and capture, and
//!   `snapshot`, `run --pid --probes defers` and `run --pid` with map writes and allocations
//!   find every record, capture and entry exactly;
//! - `stress`, `stress-command`: tests/go/stress by `--pid` and as a command (as
//!   tests/e2e/safety.rs): its own self-check passes, counts exact, nothing lost or pending.
//!
//! Every `run` must have attached per point.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, Result, bail, ensure};
use serde_json::Value;

use super::{apt_install, checks, cross, go_binary, install_go, workspace_root};

/// The releases and variants the VM traces (the oldest and newest the tests use).
const RELEASES: [&str; 2] = ["1.21.13", "1.27.3"];
const VARIANTS: [(&str, &[&str]); 2] = [("plain", &[]), ("stripped", &["-ldflags=-s -w"])];
/// The Go programs (tests/go) the cases run.
const PROGRAMS: [&str; 4] = ["workload", "captures", "pending", "stress"];

/// The counts case: as tests/e2e/counts.rs (20 × 25 loop defers, 10 goroutines × 2).
const WORKLOAD_ARGS: [&str; 10] =
    ["-calls", "20", "-defers", "25", "-map-writes", "500", "-goroutines", "10", "-exit-code", "3"];

/// The captures scenarios: (scenario, -n, by reference), as tests/e2e/correlation.rs.
const SCENARIOS: [(&str, &str, bool); 4] = [
    ("byvalue", "300", false),
    ("byref", "300", true),
    ("panics", "40", false),
    ("goexit", "40", false),
];

/// Records per site of tests/go/pending (as tests/e2e/runtime_state.rs).
const PENDING_N: &str = "40";

/// Keep every probe attached whatever the calibrated cost per hit under emulation makes of the
/// default budget (as the end-to-end tests' ALL_PROBES_ON).
const ALL_PROBES_ON: [&str; 2] = ["--max-overhead", "1000"];

/// How long the VM may run (TCG emulation is slow).
const VM_TIMEOUT_SECS: u64 = 1200;

/// The cargo profile of the deferprobe the VM runs (Cargo.toml: quicker to cross-build).
pub const PROFILE: &str = "cross-vm";

/// Runs the cases whose names contain one of `filters` (all of them without filters).
pub fn test_arm64(filters: &[String]) -> Result<()> {
    let started = Instant::now();
    let deferprobe = cross::cross_build(PROFILE)?;
    let built = started.elapsed();
    let dir = workspace_root().join("target/arm64-vm");
    let (kernel, busybox) = debian_arm64_files(&dir)?;
    let initrd = dir.join("initrd");
    let _ = std::fs::remove_dir_all(&initrd);
    for sub in ["bin", "proc", "sys", "dev", "tmp"] {
        std::fs::create_dir_all(initrd.join(sub))?;
    }
    std::fs::copy(&busybox, initrd.join("bin/busybox"))?;
    std::fs::copy(&deferprobe, initrd.join("bin/deferprobe"))?;
    let mut targets = Vec::new();
    for release in RELEASES {
        for (variant, flags) in VARIANTS {
            let id = format!("{release}-{variant}");
            for program in PROGRAMS {
                let out = initrd.join("bin").join(format!("{program}-{id}"));
                build_go(release, flags, &workspace_root().join("tests/go"), program, &out)?;
            }
            targets.push(id);
        }
    }
    let runner_dir = workspace_root().join("xtask/vmrunner");
    build_go(RELEASES[1], &[], &runner_dir, ".", &initrd.join("bin/vmrunner"))?;
    let cases = cases(&targets, filters);
    ensure!(!cases.as_array().unwrap().is_empty(), "no case matches {filters:?}");
    std::fs::write(initrd.join("cases.json"), serde_json::to_string_pretty(&cases)?)?;
    std::fs::write(initrd.join("init"), INIT)?;
    set_executable(&initrd.join("init"))?;
    let image = dir.join("initrd.gz");
    pack(&initrd, &image)?;
    let prepared = started.elapsed();
    let (console, vm_failed) = boot(&kernel, &image, &dir.join("console.log"))?;
    let in_vm = started.elapsed() - prepared;
    ensure!(
        console.contains("BOOTED aarch64"),
        "the VM did not boot: see {}{}",
        dir.join("console.log").display(),
        vm_failed.map(|why| format!(" ({why})")).unwrap_or_default()
    );
    let results = dir.join("results");
    let _ = std::fs::remove_dir_all(&results);
    std::fs::create_dir_all(&results)?;
    decode_console(&console, &results)?;
    let mut failures: Vec<String> = vm_failed.into_iter().collect();
    let names: Vec<&str> =
        cases.as_array().unwrap().iter().filter_map(|c| c["name"].as_str()).collect();
    for name in &names {
        match check_case(&results, name) {
            Ok((summary, ms)) => {
                eprintln!("[xtask] arm64 {name}: ok in {:.1} s ({summary})", ms as f64 / 1000.0)
            }
            Err(err) => failures.push(format!("{name}: {err:#}")),
        }
    }
    eprintln!(
        "[xtask] test-arm64: {} cases; cross-build {:.0} s, preparing {:.0} s, VM {:.0} s, {:.0} s in all",
        names.len(),
        built.as_secs_f64(),
        (prepared - built).as_secs_f64(),
        in_vm.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    if !failures.is_empty() {
        bail!(
            "{} of {} arm64 cases failed (results in {}):\n{}",
            failures.len(),
            names.len(),
            results.display(),
            failures.join("\n")
        );
    }
    println!("{} passed, 0 failed", names.len());
    Ok(())
}

/// The VM's init: mounts, runs every case (vmrunner prints the results), powers off.
const INIT: &str = "#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
echo \"BOOTED $(uname -m) $(uname -r)\"
cd /tmp
/bin/vmrunner /cases.json
echo \"VMRUNNER EXIT $?\"
poweroff -f
";

/// The cases vmrunner runs (see xtask/vmrunner/main.go for what each field means), for each
/// target id `<release>-<variant>`.
fn cases(targets: &[String], filters: &[String]) -> Value {
    let strings = |items: &[&str]| -> Vec<String> { items.iter().map(|s| s.to_string()).collect() };
    let mut cases = Vec::new();
    for id in targets {
        let bin = |program: &str| format!("/bin/{program}-{id}");
        let report = |case: &str| format!("/tmp/{case}-{id}.json");

        let mut counts = strings(&["run", "--interval", "100ms"]);
        counts.extend(strings(&ALL_PROBES_ON));
        counts.extend(["--report".into(), report("counts"), "--".into(), bin("workload")]);
        counts.extend(strings(&WORKLOAD_ARGS));
        cases.push(serde_json::json!({ "name": format!("counts-{id}"), "runs": [counts] }));

        for (scenario, n, _) in SCENARIOS {
            let mut tracer = strings(&["run", "--interval", "200ms"]);
            tracer.extend(strings(&ALL_PROBES_ON));
            tracer.extend(strings(&["--log-format", "json", "--report"]));
            tracer.push(report(&format!("captures-{scenario}")));
            cases.push(serde_json::json!({
                "name": format!("captures-{scenario}-{id}"),
                "target": { "program": bin("captures"), "args": ["-wait", "-scenario", scenario, "-n", n] },
                "attach": { "args": tracer, "stop": "sigint", "stop_after_ms": 450 },
            }));
        }

        let pid_run = |probes: &str| {
            let mut run =
                strings(&["run", "--pid", "{pid}", "--duration", "600ms", "--interval", "200ms"]);
            run.extend(strings(&ALL_PROBES_ON));
            run.extend(["--probes".into(), probes.into(), "--report".into()]);
            run.push(report(&format!("pending-{}", probes.replace(',', "+"))));
            run
        };
        cases.push(serde_json::json!({
            "name": format!("pending-{id}"),
            "target": { "program": bin("pending"), "args": ["-wait", "-n", PENDING_N] },
            "runs": [
                ["inspect", "--json", bin("pending")],
                ["snapshot", "--pid", "{pid}", "--json"],
                pid_run("defers"),
                pid_run("defers,map-writes,allocations"),
            ],
        }));

        let mut tracer = strings(&["run", "--interval", "100ms"]);
        tracer.extend(strings(&ALL_PROBES_ON));
        tracer.extend(["--report".into(), report("stress")]);
        let mut stress_args = strings(&["-wait"]);
        stress_args.extend(strings(&checks::STRESS_ARGS));
        cases.push(serde_json::json!({
            "name": format!("stress-{id}"),
            "target": { "program": bin("stress"), "args": stress_args },
            "attach": { "args": tracer, "stop": "target_exit" },
        }));
        let mut command = strings(&["run", "--interval", "1s"]);
        command.extend(strings(&ALL_PROBES_ON));
        command.extend(["--report".into(), report("stress-command"), "--".into(), bin("stress")]);
        command.extend(strings(&checks::STRESS_ARGS));
        cases
            .push(serde_json::json!({ "name": format!("stress-command-{id}"), "runs": [command] }));
    }
    cases.retain(|case| {
        let name = case["name"].as_str().unwrap_or_default();
        filters.is_empty() || filters.iter().any(|filter| name.contains(filter.as_str()))
    });
    Value::Array(cases)
}

/// The arm64 kernel image and busybox from Debian's packages (foreign-architecture downloads,
/// not installs), extracted under `dir` once.
fn debian_arm64_files(dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let found = |program: &str| Command::new(program).arg("--version").output().is_ok();
    if !found("qemu-system-aarch64") || !found("cpio") {
        eprintln!("[xtask] installing Debian's qemu-system-arm and cpio");
        apt_install(&["qemu-system-arm", "cpio"])?;
    }
    let busybox = dir.join("bb/bin/busybox");
    let kernel = find_kernel(dir);
    if let (Some(kernel), true) = (kernel, busybox.exists()) {
        return Ok((kernel, busybox));
    }
    eprintln!("[xtask] downloading Debian's arm64 cloud kernel and busybox-static:arm64");
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

/// `go build` of the package `package` of the module in `dir` for GOARCH=arm64, installing
/// the Go release first if it is missing.
fn build_go(release: &str, flags: &[&str], dir: &Path, package: &str, out: &Path) -> Result<()> {
    let root = workspace_root();
    install_go(release)?;
    let output = Command::new(go_binary(release))
        .arg("build")
        .args(flags)
        .arg("-o")
        .arg(out)
        .arg(format!("./{package}"))
        .current_dir(dir)
        .env("GOARCH", "arm64")
        .env("CGO_ENABLED", "0")
        .env("GOTOOLCHAIN", "local")
        .env("GOFLAGS", "-mod=mod")
        .env("GOCACHE", root.join("target/go-cache").join(format!("{release}-arm64")))
        .env("GOPATH", root.join("target/go-path"))
        .output()?;
    ensure!(
        output.status.success(),
        "go{release} arm64 build ./{package} in {}: {}",
        dir.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
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

/// Boots the VM (2 vCPUs, TCG), its console going to `log` as it runs (`tail -f` it to watch);
/// returns the console output and, if qemu failed or timed out, why.
fn boot(kernel: &Path, initrd: &Path, log: &Path) -> Result<(String, Option<String>)> {
    let console = std::fs::File::create(log)?;
    let status = Command::new("timeout")
        .arg(VM_TIMEOUT_SECS.to_string())
        .arg("qemu-system-aarch64")
        .args(["-M", "virt", "-cpu", "max", "-smp", "2", "-m", "1536", "-nographic"])
        .arg("-no-reboot")
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", "console=ttyAMA0 panic=-1 quiet"])
        .stdin(Stdio::null())
        .stdout(console)
        .status()
        .context("running qemu-system-aarch64 (apt-get install qemu-system-arm)")?;
    let console = String::from_utf8_lossy(&std::fs::read(log)?).replace('\r', "");
    let failed = (!status.success()).then(|| {
        format!(
            "qemu-system-aarch64 failed or timed out after {VM_TIMEOUT_SECS} s ({status}): see {}",
            log.display()
        )
    });
    Ok((console, failed))
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

/// One deferprobe run inside the VM, as vmrunner recorded it.
struct VmRun {
    args: String,
    code: i64,
    stdout: String,
    stderr: String,
    /// The file it wrote after --report, parsed.
    report: Option<Value>,
}

impl VmRun {
    fn parse(run: &Value) -> Result<VmRun> {
        let text = |key: &str| run[key].as_str().unwrap_or_default().to_owned();
        let args: Vec<&str> =
            run["args"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
        let report = match run["report"].as_str() {
            Some(text) => Some(serde_json::from_str(text).context("the report is not JSON")?),
            None => None,
        };
        Ok(VmRun {
            args: args.join(" "),
            code: run["code"].as_i64().context("no exit code")?,
            stdout: text("stdout"),
            stderr: text("stderr"),
            report,
        })
    }

    /// Exited with `code`, and (for `run`) attached per point: Linux 6.1 has no multi-uprobe
    /// links.
    fn expect(&self, code: i64) -> Result<()> {
        ensure!(
            self.code == code,
            "deferprobe {} exited with {} (expected {code}):\n{}{}",
            self.args,
            self.code,
            self.stderr,
            self.stdout
        );
        if self.args.starts_with("run ") {
            ensure!(
                self.stderr.contains("PerPoint"),
                "deferprobe {}: expected the per-point attach path on Linux 6.1:\n{}",
                self.args,
                self.stderr
            );
        }
        Ok(())
    }

    fn report(&self) -> Result<&Value> {
        self.report.as_ref().with_context(|| {
            format!("deferprobe {} wrote no report:\n{}{}", self.args, self.stderr, self.stdout)
        })
    }

    /// stdout as JSON (`snapshot --json`, `inspect --json`).
    fn json(&self) -> Result<Value> {
        serde_json::from_str(&self.stdout).with_context(|| {
            format!("deferprobe {}: stdout is not JSON: {}", self.args, self.stdout)
        })
    }
}

/// Runs one of tests/e2e/checks.rs's checks, which panic with the report and the truth when
/// they differ: the panic becomes this case's error.
fn shared_check(check: impl FnOnce()) -> Result<()> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(check));
    std::panic::set_hook(hook);
    outcome.map_err(|payload| {
        let message = payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "a check failed".into());
        anyhow::anyhow!("{message}")
    })
}

/// Checks the case `name` (results/<name>.json); returns a summary and its time in the VM (ms).
fn check_case(results: &Path, name: &str) -> Result<(String, u64)> {
    let path = results.join(format!("{name}.json"));
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("{} not back from the VM (see console.log)", path.display()))?;
    let result: Value = serde_json::from_str(&text).with_context(|| path.display().to_string())?;
    let runs = result["runs"]
        .as_array()
        .context("no runs")?
        .iter()
        .map(VmRun::parse)
        .collect::<Result<Vec<_>>>()?;
    let ms = result["ms"].as_u64().unwrap_or_default();
    if let Some(error) = result["error"].as_str() {
        let outputs: Vec<String> = runs
            .iter()
            .map(|r| format!("deferprobe {} ({}):\n{}", r.args, r.code, r.stderr))
            .collect();
        bail!("in the VM: {error}\n{}", outputs.join("\n"));
    }
    let truth = &result["truth"];
    let target_ok = || -> Result<()> {
        ensure!(
            result["target_code"] == 0,
            "the target exited with {}: {}",
            result["target_code"],
            result["target_stderr"]
        );
        Ok(())
    };
    let summary = if name.starts_with("counts-") {
        check_counts(&runs[0])?
    } else if let Some(rest) = name.strip_prefix("captures-") {
        let (_, _, by_reference) = SCENARIOS
            .iter()
            .find(|(scenario, _, _)| rest.starts_with(&format!("{scenario}-")))
            .context("unknown scenario")?;
        target_ok()?;
        let run = &runs[0];
        run.expect(0)?;
        let report = run.report()?;
        shared_check(|| checks::assert_single_finding(report, truth, *by_reference))?;
        if rest.starts_with("goexit-") {
            ensure!(checks::u64_of(&report["counts"], "goroutine_exits") >= 20, "{report}");
        }
        format!(
            "pending {} captured maps {} entries {}",
            report["pending"]["heap_defers"],
            report["pending"]["captured_maps"],
            report["findings"][0]["captured_map_entries"]
        )
    } else if name.starts_with("pending-") {
        target_ok()?;
        ensure!(runs.len() == 4, "expected 4 runs, got {}", runs.len());
        runs.iter().try_for_each(|run| run.expect(0))?;
        let inspection = runs[0].json()?;
        shared_check(|| checks::check_inspection(&inspection, truth))?;
        let snapshot = runs[1].json()?;
        ensure!(snapshot["kind"] == "snapshot", "{snapshot}");
        shared_check(|| checks::check_report(&snapshot, truth, "snapshot"))?;
        for run in &runs[2..] {
            let report = run.report()?;
            shared_check(|| checks::check_report(report, truth, &run.args))?;
        }
        format!(
            "{} pending at {} sites, snapshot and run --pid exact",
            truth["pending_defers"],
            truth["sites"].as_array().map_or(0, Vec::len)
        )
    } else if name.starts_with("stress-command-") {
        let run = &runs[0];
        run.expect(0)?;
        let truth = run
            .stdout
            .lines()
            .find(|line| line.starts_with("{\"heap_defers\""))
            .map(serde_json::from_str::<Value>)
            .transpose()?
            .with_context(|| format!("no ground truth in the program's output: {}", run.stdout))?;
        let report = run.report()?;
        shared_check(|| {
            checks::assert_self_check(&truth, checks::STRESS_DEFERS);
            checks::assert_exact(report, &truth);
        })?;
        ensure!(report["counts"]["deferproc"] == checks::STRESS_DEFERS, "{report}");
        ensure!(report["ended_by"] == "target_exited", "{report}");
        format!("self-check {}, deferproc {}", truth["self_check"], report["counts"]["deferproc"])
    } else if name.starts_with("stress-") {
        target_ok()?;
        let run = &runs[0];
        run.expect(0)?;
        let report = run.report()?;
        shared_check(|| {
            checks::assert_self_check(truth, checks::STRESS_DEFERS);
            checks::assert_exact(report, truth);
        })?;
        ensure!(report["ended_by"] == "target_exited", "{report}");
        format!("self-check {}, deferproc {}", truth["self_check"], report["counts"]["deferproc"])
    } else {
        bail!("no check for this case")
    };
    Ok((summary, ms))
}

/// The counts case against the workload's own accounting.
fn check_counts(run: &VmRun) -> Result<String> {
    run.expect(3)?;
    let truth: Value = run
        .stdout
        .lines()
        .find(|line| line.starts_with("{\"heap_defers\""))
        .map(serde_json::from_str)
        .transpose()?
        .with_context(|| format!("no ground truth in the program's output: {}", run.stdout))?;
    let report = run.report()?;
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
    Ok(format!(
        "deferproc {} deferreturn {} mapassign {} mallocgc {} (runtime {})",
        count("deferproc")?,
        count("deferreturn")?,
        count("mapassign")?,
        count("mallocgc")?,
        truth_of("mallocs")?
    ))
}
