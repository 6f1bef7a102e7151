//! `cargo xtask fuzz`: installs cargo-fuzz if missing, seeds each target's corpus from the
//! sections of real Go binaries (target/go-programs), and runs the targets of fuzz/ for a set
//! time, two at a time, printing executions and crashes per target (docs/FUZZING.md).

use std::{
    collections::BTreeMap,
    fs,
    path::Path,
    process::{Command, Stdio},
    thread,
    time::Instant,
};

use anyhow::{Context as _, Result, bail, ensure};
use deferprobe_common::{DeferRegistered, DeferReturn, EventKind, GoroutineExit, MapSeen};
use object::{Object as _, ObjectSection as _, ObjectSymbol as _};

use crate::{cargo, workspace_root};

/// Every target of fuzz/Cargo.toml.
pub const TARGETS: [&str; 5] = ["buildinfo", "pclntab", "dwarf", "code", "event"];
/// Targets running at once.
const PARALLEL: usize = 2;
/// Seed binaries (under target/go-programs): the oldest and newest pclntab layouts, PIE,
/// stripped and cgo.
const SEED_BINARIES: [&str; 6] = [
    "matrix/go1.19-plain/workload",
    "go1.21.13/workload",
    "go1.27.3/workload",
    "matrix/go1.26.6-pie/workload",
    "matrix/go1.25.5-stripped/workload",
    "go1.27.3/cgoworkload",
];
/// Functions whose code seeds the `code` target: every prologue kind, nosplit, many RETs.
const SEED_FUNCTIONS: [&str; 8] = [
    "runtime.deferproc",
    "runtime.deferprocStack",
    "runtime.deferreturn",
    "runtime.mallocgc",
    "runtime.goexit1",
    "runtime.mapassign_faststr",
    "runtime.morestack",
    "main.main",
];
/// The DWARF sections in the order `deferprobe::binary::fuzzing::dwarf_sections` reads them.
const DWARF_SECTIONS: [&str; 6] = [
    ".debug_abbrev",
    ".debug_info",
    ".debug_line",
    ".debug_line_str",
    ".debug_str",
    ".debug_str_offsets",
];

pub fn fuzz(seconds: u64, targets: &[String]) -> Result<()> {
    let targets: Vec<&str> = if targets.is_empty() {
        TARGETS.to_vec()
    } else {
        for target in targets {
            ensure!(
                TARGETS.contains(&target.as_str()),
                "unknown target {target}; targets: {TARGETS:?}"
            );
        }
        targets.iter().map(String::as_str).collect()
    };
    install_cargo_fuzz()?;
    let fuzz_dir = workspace_root().join("fuzz");
    seed(&fuzz_dir)?;
    let status = cargo_fuzz(&fuzz_dir).arg("build").status()?;
    ensure!(status.success(), "cargo fuzz build failed");
    let logs = fuzz_dir.join("logs");
    fs::create_dir_all(&logs)?;
    let mut results = Vec::new();
    for batch in targets.chunks(PARALLEL) {
        let runs: Vec<_> = batch
            .iter()
            .map(|&target| {
                let log = logs.join(format!("{target}.log"));
                let fuzz_dir = fuzz_dir.clone();
                let target = target.to_owned();
                thread::spawn(move || run_target(&fuzz_dir, &target, seconds, &log))
            })
            .collect();
        for run in runs {
            results.push(run.join().expect("fuzz thread panicked")?);
        }
    }
    eprintln!("[xtask] fuzz results ({seconds} s each, logs in fuzz/logs):");
    let mut failed = false;
    for result in &results {
        eprintln!(
            "[xtask]   {:<10} {:>12} execs  {:>6} s  {}",
            result.target,
            result.execs,
            result.seconds,
            if result.crashed { "CRASH (see its log and fuzz/artifacts)" } else { "0 crashes" }
        );
        failed |= result.crashed;
    }
    if failed {
        bail!("a fuzz target crashed");
    }
    Ok(())
}

struct Outcome {
    target: String,
    execs: u64,
    seconds: u64,
    crashed: bool,
}

fn cargo_fuzz(fuzz_dir: &Path) -> Command {
    let mut command = cargo();
    // deferprobe's eBPF object is not needed by the parsers (and must not see sanitizer flags).
    // Its own target dir (fuzz/target): sanitizer builds share nothing with the workspace's.
    command
        .current_dir(fuzz_dir)
        .env("AYA_BUILD_SKIP", "1")
        .env_remove("CARGO_TARGET_DIR")
        .arg("fuzz");
    command
}

fn install_cargo_fuzz() -> Result<()> {
    let installed =
        cargo().args(["fuzz", "--version"]).stdout(Stdio::null()).stderr(Stdio::null()).status();
    if installed.is_ok_and(|status| status.success()) {
        return Ok(());
    }
    eprintln!("[xtask] installing cargo-fuzz");
    let status = cargo().args(["install", "cargo-fuzz", "--locked"]).status()?;
    ensure!(status.success(), "cargo install cargo-fuzz failed");
    Ok(())
}

/// Runs one target for `seconds`; its output goes to `log`.
fn run_target(fuzz_dir: &Path, target: &str, seconds: u64, log: &Path) -> Result<Outcome> {
    eprintln!("[xtask] fuzzing {target} for {seconds} s");
    let output = fs::File::create(log)?;
    let started = Instant::now();
    let status = cargo_fuzz(fuzz_dir)
        .args(["run", target, "--", "-print_final_stats=1", "-timeout=10", "-rss_limit_mb=4096"])
        .arg(format!("-max_total_time={seconds}"))
        .stdout(output.try_clone()?)
        .stderr(output)
        .status()?;
    let text = fs::read_to_string(log)?;
    let stat = |name: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(&format!("stat::{name}:"))?.trim().parse().ok())
            .unwrap_or(0)
    };
    Ok(Outcome {
        target: target.to_owned(),
        execs: stat("number_of_executed_units"),
        // libFuzzer's "Done N runs in S second(s)"; a crash ends the run without it.
        seconds: text
            .lines()
            .find_map(|line| {
                line.strip_prefix("Done ")?.split(" in ").nth(1)?.split(' ').next()?.parse().ok()
            })
            .unwrap_or_else(|| started.elapsed().as_secs()),
        crashed: !status.success(),
    })
}

/// Writes seed inputs into fuzz/corpus/<target>/ (existing corpus entries stay).
fn seed(fuzz_dir: &Path) -> Result<()> {
    let programs = workspace_root().join("target/go-programs");
    let mut seeds: BTreeMap<&str, Vec<(String, Vec<u8>)>> = BTreeMap::new();
    for binary in SEED_BINARIES {
        let path = programs.join(binary);
        let bytes = fs::read(&path)
            .with_context(|| format!("{} (run `cargo xtask go-programs` first)", path.display()))?;
        let elf = object::File::parse(&*bytes).with_context(|| format!("{}", path.display()))?;
        let name = binary.replace('/', "-");
        let section = |names: &[&str]| {
            names.iter().find_map(|name| {
                let data = elf.section_by_name(name)?.uncompressed_data().ok()?;
                Some(data.into_owned())
            })
        };
        if let Some(data) = section(&[".go.buildinfo"]) {
            seeds.entry("buildinfo").or_default().push((name.clone(), data));
        }
        if let Some(data) = section(&[".gopclntab", ".data.rel.ro.gopclntab"]) {
            seeds.entry("pclntab").or_default().push((name.clone(), data));
        }
        if elf.section_by_name(".debug_info").is_some() {
            let mut packed = Vec::new();
            for name in DWARF_SECTIONS {
                let data = section(&[name]).unwrap_or_default();
                packed.extend_from_slice(&u32::try_from(data.len())?.to_le_bytes());
                packed.extend_from_slice(&data);
            }
            seeds.entry("dwarf").or_default().push((name.clone(), packed));
        }
        for function in SEED_FUNCTIONS {
            if let Some(code) = function_code(&elf, function) {
                seeds.entry("code").or_default().push((format!("{name}-{function}"), code));
            }
        }
    }
    seeds.insert("event", event_seeds());
    for (target, inputs) in seeds {
        let dir = fuzz_dir.join("corpus").join(target);
        fs::create_dir_all(&dir)?;
        for (name, data) in inputs {
            fs::write(dir.join(format!("seed-{name}")), data)?;
        }
    }
    Ok(())
}

/// The bytes of `name` (from `.symtab`; None in stripped binaries).
fn function_code(elf: &object::File<'_>, name: &str) -> Option<Vec<u8>> {
    let symbol = elf.symbols().find(|symbol| symbol.name() == Ok(name))?;
    let section = elf.section_by_index(symbol.section_index()?).ok()?;
    let data = section.data().ok()?;
    let start = usize::try_from(symbol.address().checked_sub(section.address())?).ok()?;
    let end = start.checked_add(usize::try_from(symbol.size()).ok()?)?;
    Some(data.get(start..end)?.to_vec())
}

/// One record of each kind (a length byte, then the zeroed event with its kind), then all four in
/// one sequence, as the `event` target reads its input.
fn event_seeds() -> Vec<(String, Vec<u8>)> {
    let record = |kind: EventKind, size: usize| {
        let mut bytes = vec![0u8; size];
        bytes[..4].copy_from_slice(&(kind as u32).to_ne_bytes());
        bytes[16] = 7; // goid
        let mut framed = vec![u8::try_from(size).expect("events are under 256 bytes")];
        framed.extend(bytes);
        framed
    };
    let records = [
        ("defer-registered", record(EventKind::DeferRegistered, size_of::<DeferRegistered>())),
        ("defer-return", record(EventKind::DeferReturn, size_of::<DeferReturn>())),
        ("goroutine-exit", record(EventKind::GoroutineExit, size_of::<GoroutineExit>())),
        ("map-seen", record(EventKind::MapSeen, size_of::<MapSeen>())),
    ];
    let all = records.iter().flat_map(|(_, bytes)| bytes.clone()).collect();
    let mut seeds: Vec<_> =
        records.into_iter().map(|(name, bytes)| (name.to_owned(), bytes)).collect();
    seeds.push(("all".to_owned(), all));
    seeds
}
