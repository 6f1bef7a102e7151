//! Issue 12: the runtime's own state is the truth. The `pending` Go program registers its
//! defers before deferprobe attaches (maps by value and by reference, a slice, a string, an
//! `*os.File`, a struct pointer, a range-over-func loop on 1.23+, a frame that recovered a
//! panic) and prints every site's ground truth. `snapshot` and `run --pid` must both report it
//! exactly, on every release and variant (plain, stripped, PIE) of the matrix.

use std::{thread, time::Duration};

use serde_json::Value;

use crate::{
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

fn u64_of(value: &Value, key: &str) -> u64 {
    value[key].as_u64().unwrap_or_else(|| panic!("no {key} in {value}"))
}

/// The finding at the truth site's function and line.
fn finding_for<'a>(report: &'a Value, site: &Value) -> &'a Value {
    report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["function"] == site["function"] && f["line"] == site["line"])
        .unwrap_or_else(|| panic!("no finding for {site}\nfindings: {:#}", report["findings"]))
}

/// The capture kind and closure field type deferprobe must report for a truth site.
fn expected_capture(site: &Value) -> (&'static str, String) {
    let typ = site["type"].as_str().unwrap();
    match site["capture"].as_str().unwrap() {
        "map" => ("map", typ.to_owned()),
        "map_ref" => ("map_by_reference", format!("*{typ}")),
        "struct_pointer" => ("pointer", typ.to_owned()),
        "slice" => ("slice", typ.to_owned()),
        "string" => ("string", typ.to_owned()),
        "file" => ("file", typ.to_owned()),
        other => panic!("unknown capture {other} in {site}"),
    }
}

/// `inspect` names, for every truth site, the closure its defer passes and what it captures.
fn check_inspect(binary: &std::path::Path, truth: &Value) {
    let (_, inspection) = inspect(binary);
    let sites = inspection["heap_defer_sites"].as_array().unwrap();
    for site in truth["sites"].as_array().unwrap() {
        let inspected = sites
            .iter()
            .find(|s| s["function"] == site["function"] && s["line"] == site["line"])
            .unwrap_or_else(|| panic!("inspect: no heap defer site for {site}"));
        let captures = inspected["closure"]["captures"]
            .as_array()
            .unwrap_or_else(|| panic!("inspect: no closure for {inspected}"));
        assert_eq!(captures.len(), 1, "inspect: {inspected}");
        let (kind, type_name) = expected_capture(site);
        assert_eq!(captures[0]["kind"], kind, "inspect: {inspected}");
        assert_eq!(captures[0]["type"], type_name.as_str(), "inspect: {inspected}");
    }
}

/// Every truth site against `report` (from `snapshot` or `run`).
fn check_report(report: &Value, truth: &Value, what: &str) {
    let context = |detail: &str| format!("{what}: {detail}");
    assert_eq!(
        u64_of(&report["pending"], "heap_defers"),
        u64_of(truth, "pending_defers"),
        "{}",
        context("pending heap defers")
    );
    assert_eq!(
        u64_of(&report["pending"], "goroutines"),
        u64_of(truth, "pending_goroutines"),
        "{}",
        context("goroutines")
    );
    for site in truth["sites"].as_array().unwrap() {
        let pending = u64_of(site, "pending");
        if pending == 0 {
            // The frame whose records a recovered panic ran: no record left at its line.
            let left = report["sites"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|s| s["function"] == site["function"] && s["line"] == site["line"])
                .map(|s| u64_of(s, "pending"))
                .sum::<u64>();
            assert_eq!(left, 0, "{}", context(&format!("{site}")));
            continue;
        }
        let finding = finding_for(report, site);
        let detail = context(&format!("{finding:#}\ntruth {site}"));
        assert_eq!(finding["goid"], site["goid"], "{detail}");
        assert_eq!(u64_of(finding, "pending_defers"), pending, "{detail}");
        assert_eq!(u64_of(finding, "pending_before_trace"), pending, "{detail}");
        assert!(finding["oldest_pending_secs"].is_null(), "{detail}");
        assert_eq!(finding["file"], site["file"], "{detail}");
        let captures = finding["captures"].as_array().unwrap();
        assert_eq!(captures.len(), 1, "{detail}");
        let capture = &captures[0];
        assert_eq!(u64_of(capture, "captures"), pending, "{detail}");
        let (kind, type_name) = expected_capture(site);
        assert_eq!(capture["kind"], kind, "{detail}");
        assert_eq!(capture["type"], type_name.as_str(), "{detail}");
        let maps = u64_of(site, "maps");
        assert_eq!(u64_of(finding, "captured_maps"), maps, "{detail}");
        assert_eq!(
            u64_of(finding, "captured_map_entries"),
            u64_of(site, "map_entries"),
            "{detail}"
        );
        let (by_value, by_reference) = match kind {
            "map_by_reference" => (0, maps),
            _ => (maps, 0),
        };
        assert_eq!(u64_of(finding, "captured_maps_by_value"), by_value, "{detail}");
        assert_eq!(u64_of(finding, "captured_maps_by_reference"), by_reference, "{detail}");
        match kind {
            "map" | "map_by_reference" => {
                assert_eq!(u64_of(capture, "entries"), u64_of(site, "map_entries"), "{detail}")
            }
            "slice" => {
                assert_eq!(u64_of(capture, "entries"), u64_of(site, "slice_len"), "{detail}");
                assert_eq!(u64_of(capture, "capacity"), u64_of(site, "slice_cap"), "{detail}");
            }
            "string" => {
                assert_eq!(u64_of(capture, "entries"), u64_of(site, "string_bytes"), "{detail}")
            }
            _ => assert_eq!(u64_of(capture, "objects"), pending, "{detail}"),
        }
        // At least the _defer records and the closures.
        assert!(u64_of(finding, "est_bytes") > pending * 56, "{detail}");

        // The site says the same, and that nothing was registered while traced (all of it
        // was pending before: null registrations without probes).
        let site_report = report["sites"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["function"] == site["function"] && s["line"] == site["line"])
            .unwrap_or_else(|| panic!("{}", context(&format!("no site for {site}"))));
        let detail = context(&format!("{site_report:#}\ntruth {site}"));
        assert_eq!(u64_of(site_report, "pending"), pending, "{detail}");
        assert_eq!(u64_of(site_report, "pending_before_trace"), pending, "{detail}");
        let registered = &site_report["registered"];
        match report["kind"] == "snapshot" {
            true => assert!(registered.is_null() && site_report["released"].is_null(), "{detail}"),
            false => assert_eq!(registered, 0, "{detail}"),
        }
        assert_eq!(site_report["captures"][0]["kind"], kind, "{detail}");
        assert_eq!(site_report["captures"][0]["type"], type_name.as_str(), "{detail}");
        let goroutine = report["goroutines"]
            .as_array()
            .unwrap()
            .iter()
            .find(|g| g["goid"] == site["goid"])
            .unwrap_or_else(|| panic!("{}", context(&format!("no goroutine for {site}"))));
        let goroutine_site = goroutine["defer_sites"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["line"] == site["line"] && s["function"] == site["function"])
            .unwrap_or_else(|| panic!("{}", context(&format!("{goroutine}"))));
        assert_eq!(u64_of(goroutine_site, "pending"), pending, "{goroutine_site}");
        assert_eq!(u64_of(goroutine_site, "pending_before_trace"), pending, "{goroutine_site}");
    }
    let stats = &report["snapshot"];
    for key in ["torn", "unreadable", "corrupt"] {
        assert_eq!(stats[key], 0, "{what}: snapshot.{key} in {stats}");
    }
    assert!(u64_of(stats, "goroutines_alive") >= u64_of(truth, "pending_goroutines"), "{stats}");
    let notes = report["notes"].as_array().unwrap();
    assert!(
        notes.iter().any(|n| n.as_str().unwrap().contains("estimate")),
        "{what}: no note saying est_bytes is an estimate: {notes:?}"
    );
}

fn check_target(target: &Target) {
    let binary = target.binary();
    let mut program = Workload::start_with_args(&binary, &["-wait", "-n", N]);
    let truth = program.work_json();
    let pid = program.pid().to_string();
    check_inspect(&binary, &truth);

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
