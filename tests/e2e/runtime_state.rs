//! Issue 12: the runtime's own state is the truth. The `pending` Go program registers its
//! defers before deferprobe attaches (maps by value and by reference, a slice, a string, an
//! `*os.File`, a struct pointer, a range-over-func loop on 1.23+, a frame that recovered a
//! panic) and prints every site's ground truth. `snapshot` and `run --pid` must both report it
//! exactly, on every release and variant (plain, stripped, PIE) of the matrix.

use std::{thread, time::Duration};

use serde_json::Value;

use crate::{
    checks::*,
    matrix::{Target, check_each, selected_targets},
    support::*,
};

/// Records per site.
const N: &str = "40";

fn pending_targets() -> Vec<Target> {
    let targets: Vec<Target> =
        selected_targets().into_iter().filter(|t| t.program == "pending").collect();
    assert!(!targets.is_empty(), "no pending targets in tests/go/matrix.txt for this run");
    targets
}

fn check_target(target: &Target) {
    let binary = target.binary();
    let mut program = Workload::start_with_args(&binary, &["-wait", "-n", N]);
    let truth = program.work_json();
    let pid = program.pid().to_string();
    check_inspection(&inspect(&binary).1, &truth);

    // snapshot: no probes.
    let output = deferprobe().args(["snapshot", "--pid", &pid, "--json"]).output().unwrap();
    let (stdout, stderr) = text(&output);
    assert_eq!(output.status.code(), Some(0), "snapshot: {stderr}");
    let report: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    assert_eq!(report["kind"], "snapshot");
    check_report(&report, &truth, "snapshot");
    let text_output = deferprobe().args(["snapshot", "--pid", &pid]).output().unwrap();
    let (text_report, _) = text(&text_output);
    assert!(text_report.contains("pending at attach"), "{text_report}");
    assert!(text_report.lines().all(|l| l.chars().count() <= 80), "{text_report}");

    // run --pid, with only the defer probes: captures come from the closures' types, not from
    // map writes seen while tracing.
    for probes in ["defers", "defers,map-writes,allocations"] {
        let report_file = report_path(&format!("pending-{}-{probes}", target.id()));
        let output = deferprobe()
            .args(["run", "--pid", &pid, "--duration", "600ms", "--interval", "200ms"])
            .args(ALL_PROBES_ON)
            .args(["--probes", probes, "--report"])
            .arg(&report_file)
            .output()
            .unwrap();
        let (_, stderr) = text(&output);
        assert_eq!(output.status.code(), Some(0), "run: {stderr}");
        check_report(&read_json(&report_file), &truth, &format!("run --probes {probes}"));
    }
    program.end();
}

#[test]
fn defers_pending_before_attach_are_exact() {
    require_root();
    check_each(&pending_targets(), Target::id, check_target);
}

/// No false captures under GC churn: while deferred closures capture non-map values, the
/// program allocates and frees maps and objects of the same size (their memory reused by one
/// another) and collects garbage every 100 ms. Traced throughout with every probe, map writes
/// included: the report must still give exactly the captures the closures hold (0 maps for
/// the sites that capture none), on the newest release, plain and stripped.
#[test]
fn no_false_captures_under_gc_churn() {
    require_root();
    let newest = &go_releases()[0];
    let targets: Vec<Target> = pending_targets()
        .into_iter()
        .filter(|t| &t.release == newest && t.variant != "pending-pie")
        .collect();
    check_each(&targets, Target::id, |target| {
        let binary = target.binary();
        let mut program = Workload::start_with_args(&binary, &["-wait", "-n", N, "-churn", "5s"]);
        let truth = program.work_json();
        let pid = program.pid().to_string();
        let report_file = report_path(&format!("churn-{}", target.id()));
        let output = deferprobe()
            .args(["run", "--pid", &pid, "--duration", "4s", "--interval", "500ms"])
            .args(ALL_PROBES_ON)
            .arg("--report")
            .arg(&report_file)
            .output()
            .unwrap();
        let (_, stderr) = text(&output);
        assert_eq!(output.status.code(), Some(0), "run: {stderr}");
        let report = read_json(&report_file);
        // The churn really wrote maps while traced.
        assert!(report["counts"]["mapassign"].as_u64().unwrap() > 10_000, "{}", report["counts"]);
        check_report(&report, &truth, "run during GC churn");
        program.end();
    });
}

/// Goroutines starting and ending while snapshots run: no phantom record, no failure.
#[test]
fn snapshots_under_goroutine_churn() {
    require_root();
    let release = &go_releases()[0];
    let program = go_program(release, "captures");
    let mut target =
        Workload::start_with_args(&program, &["-wait", "-scenario", "churn", "-n", "2"]);
    let pid = target.pid().to_string();
    // The churn runs for a second after "go"; snapshots meanwhile.
    target.go();
    let mut taken = 0;
    for _ in 0..100 {
        let output = deferprobe().args(["snapshot", "--pid", &pid, "--json"]).output().unwrap();
        let (stdout, stderr) = text(&output);
        assert_eq!(output.status.code(), Some(0), "snapshot: {stderr}");
        let report: Value = serde_json::from_str(&stdout).unwrap();
        // Only the holders' records: each pending record belongs to a live goroutine, at the
        // holding function.
        for site in report["sites"].as_array().unwrap() {
            assert_eq!(site["function"], "main.holdByValue", "{site}");
        }
        taken += 1;
        thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(taken, 100);
    drop(target);
}

/// `--counts-only` reads nothing of the target: counts stay exact, the records pending before
/// the trace are not seen, and what closures capture is null with a note, never 0.
#[test]
fn counts_only_reads_nothing_and_says_so() {
    require_root();
    let release = &go_releases()[0];
    let binary = go_program(release, "pending");
    let mut program = Workload::start_with_args(&binary, &["-wait", "-n", "20"]);
    program.work_json();
    let pid = program.pid().to_string();
    let report_file = report_path("counts-only");
    let output = deferprobe()
        .args(["run", "--pid", &pid, "--duration", "300ms", "--counts-only", "--report"])
        .arg(&report_file)
        .output()
        .unwrap();
    let (_, stderr) = text(&output);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    let report = read_json(&report_file);
    assert!(report["snapshot"].is_null(), "{report}");
    assert_eq!(report["pending"]["heap_defers"], 0, "{report}");
    assert!(report["pending"]["captured_maps"].is_null(), "{report}");
    assert_eq!(report["counts"]["deferproc"], 0, "{report}");
    let notes = report["notes"].as_array().unwrap();
    assert!(notes.iter().any(|n| n.as_str().unwrap().contains("--counts-only")), "{notes:?}");
    program.end();
}
