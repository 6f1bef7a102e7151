//! Checks of deferprobe's reports against the ground truth the Go test programs print
//! themselves: plain functions of JSON values that panic with the report and the truth when
//! something differs. The end-to-end tests use them, and so does `cargo xtask test-arm64` on
//! what comes back from the arm64 VM (it includes this file with `#[path]`), so both hold
//! deferprobe to the same account. Nothing here runs a program.

use serde_json::Value;

pub fn u64_of(value: &Value, key: &str) -> u64 {
    value[key].as_u64().unwrap_or_else(|| panic!("no {key} in {value}"))
}

/// The entry of `sites` (a report's `sites`, a goroutine's `defer_sites`, `inspect`'s
/// `heap_defer_sites`) in `function`; its first, if several.
pub fn site_named<'a>(sites: &'a Value, function: &str) -> &'a Value {
    let entries = sites.as_array().unwrap_or_else(|| panic!("not a list of sites: {sites}"));
    let site = entries.iter().find(|s| s["function"] == function);
    site.unwrap_or_else(|| panic!("no {function} site in {sites}"))
}

/// The entry of `sites` for the defer statement `site` names (its `function` and `line`).
pub fn site_at<'a>(sites: &'a Value, site: &Value) -> &'a Value {
    let entries = sites.as_array().unwrap_or_else(|| panic!("not a list of sites: {sites}"));
    let found =
        entries.iter().find(|s| s["function"] == site["function"] && s["line"] == site["line"]);
    found.unwrap_or_else(|| panic!("no site {site} in {sites}"))
}

// tests/go/captures (correlation.rs).

/// The one finding a scenario holding `-n` defers in one frame must produce.
pub fn assert_single_finding(report: &Value, truth: &Value, by_reference: bool) {
    let findings = report["findings"].as_array().unwrap();
    assert_eq!(findings.len(), 1, "{report}");
    let finding = &findings[0];
    assert_eq!(finding["kind"], "defer_accumulation");
    assert_eq!(u64_of(finding, "pending_defers"), u64_of(truth, "pending_defers"), "{finding}");
    assert_eq!(u64_of(finding, "captured_maps"), u64_of(truth, "captured_maps"), "{finding}");
    let (by_value, by_ref) =
        (u64_of(finding, "captured_maps_by_value"), u64_of(finding, "captured_maps_by_reference"));
    if by_reference {
        assert_eq!((by_value, by_ref), (0, u64_of(truth, "captured_maps")), "{finding}");
    } else {
        assert_eq!((by_value, by_ref), (u64_of(truth, "captured_maps"), 0), "{finding}");
    }
    assert_eq!(
        u64_of(finding, "captured_map_entries"),
        u64_of(truth, "captured_map_entries"),
        "{finding}"
    );
    assert_eq!(finding["function"], truth["function"], "{finding}");
    assert_eq!(finding["file"], truth["file"], "{finding}");
    assert_eq!(finding["line"], truth["line"], "{finding}");
    // Every map was written while traced, in one place (newMap, or where it is inlined):
    // tracing starts before the program works.
    let origins = finding["captured_map_origins"].as_array().unwrap();
    assert_eq!(origins.len(), 1, "{finding}");
    assert!(origins[0]["function"].is_string(), "{finding}");
    assert_eq!(u64_of(&origins[0], "maps"), u64_of(truth, "captured_maps"), "{finding}");
    assert_eq!(u64_of(&origins[0], "entries"), u64_of(truth, "captured_map_entries"), "{finding}");
    assert!(finding["oldest_pending_secs"].as_f64().unwrap() > 0.0);
    // At least the _defer records (48 bytes or more each) and the closures.
    assert!(u64_of(finding, "est_bytes") > u64_of(finding, "pending_defers") * 64, "{finding}");
    assert_eq!(u64_of(&report["pending"], "heap_defers"), u64_of(truth, "pending_defers"));
    assert_eq!(u64_of(&report["pending"], "goroutines"), u64_of(truth, "pending_goroutines"));
    let goroutine = &report["goroutines"][0];
    assert_eq!(goroutine["goid"], finding["goid"]);
    assert_eq!(goroutine["pending_defers"], finding["pending_defers"]);
    assert_eq!(goroutine["captured_maps"], finding["captured_maps"]);
    assert_eq!(goroutine["captured_map_entries"], finding["captured_map_entries"]);
    let site = &goroutine["defer_sites"][0];
    assert_eq!(site["line"], truth["line"]);
    assert_eq!(site["pending"], finding["pending_defers"]);
}

// tests/go/pending (runtime_state.rs).

/// The finding at the truth site's function and line.
pub fn finding_for<'a>(report: &'a Value, site: &Value) -> &'a Value {
    report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["function"] == site["function"] && f["line"] == site["line"])
        .unwrap_or_else(|| panic!("no finding for {site}\nfindings: {:#}", report["findings"]))
}

/// The capture kind and closure field type deferprobe must report for a truth site.
pub fn expected_capture(site: &Value) -> (&'static str, String) {
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

/// `inspect --json`'s `inspection` names, for every truth site of the `pending` program, the
/// closure its defer passes and what it captures.
pub fn check_inspection(inspection: &Value, truth: &Value) {
    for site in truth["sites"].as_array().unwrap() {
        let inspected = site_at(&inspection["heap_defer_sites"], site);
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
pub fn check_report(report: &Value, truth: &Value, what: &str) {
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
        let site_report = site_at(&report["sites"], site);
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
        let goroutine_site = site_at(&goroutine["defer_sites"], site);
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

// tests/go/stress (safety.rs).

/// Goroutines the stress program runs at once, recursion depth, and the heap defers that makes
/// (every level of every goroutine registers one).
pub const GOROUTINES: u64 = 66;
pub const DEPTH: u64 = 64;
pub const STRESS_ARGS: [&str; 4] = ["-goroutines", "66", "-depth", "64"];
pub const STRESS_DEFERS: u64 = GOROUTINES * (DEPTH + 1);
/// The same with `-goroutines 3`.
pub const SMALL_DEFERS: u64 = 3 * (DEPTH + 1);

/// The stress program's own verdict, and that it really did what it is meant to stress.
pub fn assert_self_check(truth: &Value, heap_defers: u64) {
    assert_eq!(truth["self_check"], "ok", "{truth}");
    assert_eq!(truth["heap_defers"], heap_defers, "{truth}");
    assert_eq!(truth["defers_ran"], heap_defers, "{truth}");
    if heap_defers >= STRESS_DEFERS {
        assert_eq!(truth["max_concurrent"], GOROUTINES, "{truth}");
        assert_eq!(truth["recovered"], GOROUTINES / 3, "{truth}");
        assert_eq!(truth["goexits"], GOROUTINES / 3, "{truth}");
        assert_eq!(
            truth["stacks_moved"], GOROUTINES,
            "every goroutine's stack was copied: {truth}"
        );
    }
}

/// Counts exact, nothing lost, nothing left pending.
pub fn assert_exact(report: &Value, truth: &Value) {
    let counts = &report["counts"];
    assert_eq!(counts["deferproc"], truth["heap_defers"], "{report}");
    assert!(
        counts["goroutine_exits"].as_u64().unwrap() >= truth["goroutines_ended"].as_u64().unwrap(),
        "{report}"
    );
    assert_eq!(counts["lost_events"], 0, "{report}");
    for (cause, value) in report["lost"].as_object().unwrap() {
        assert_eq!(value, 0, "lost.{cause}: {report}");
    }
    assert_eq!(report["pending"]["heap_defers"], 0, "{report}");
    let site = site_named(&report["sites"], "main.descend");
    assert_eq!(site["registered"], STRESS_DEFERS, "{report}");
    assert_eq!(site["released"], STRESS_DEFERS, "{report}");
}
