//! Issue 6: the overhead governor. Under a small `--max-overhead`, allocation and map-write
//! probes are sampled and reported as estimates, while defer probes stay on and exact.

use std::{thread, time::Duration};

use crate::support::*;

#[test]
fn governor_samples_hot_families_and_keeps_defers_exact() {
    require_root();
    let release = &go_releases()[0];
    let mut service = std::process::Command::new(go_program(release, "demo")).spawn().unwrap();
    thread::sleep(Duration::from_millis(200));
    let report_file = report_path("governor");
    let mut cmd = deferprobe();
    // ~700 defer hits/s and ~4,000 allocation and map-write hits/s: well over 0.1% of a CPU at
    // any realistic cost per hit, so the sampled families must degrade.
    cmd.args(["run", "--pid", &service.id().to_string(), "--duration", "4s", "--interval", "1s"])
        .args(["--max-overhead", "0.1", "--log-format", "json", "--report"])
        .arg(&report_file);
    let tracer = Running::spawn(cmd);
    let (code, stdout, stderr) = tracer.finish();
    let _ = service.kill();
    let _ = service.wait();
    assert_eq!(code, 0, "{stdout}\n{}", stderr.join("\n"));
    let report = read_json(&report_file);

    let calibrated = json_logs(&stderr, "calibrated");
    assert_eq!(calibrated.len(), 1, "{}", stderr.join("\n"));
    let hit_cost_ns = report["governor"]["hit_cost_ns"].as_u64().expect("calibrated cost");
    assert_eq!(calibrated[0]["hit_cost_ns"], hit_cost_ns);
    assert!(hit_cost_ns > 100, "a uprobe hit can't cost {hit_cost_ns} ns");
    // The governor plans with headroom over the calibrated cost.
    let planned = report["governor"]["planned_hit_cost_ns"].as_u64().expect("planned cost");
    assert_eq!(planned, (hit_cost_ns as f64 * 1.5).round() as u64, "{}", report["governor"]);
    assert_eq!(report["governor"]["max_overhead_percent"], 0.1);

    let changes = json_logs(&stderr, "governor changed a duty cycle");
    assert!(!changes.is_empty(), "{}", stderr.join("\n"));
    let sampled = report["governor"]["sampled"].as_array().unwrap();
    let allocations = sampled
        .iter()
        .find(|s| s["family"] == "allocations")
        .unwrap_or_else(|| panic!("allocations not sampled: {report}"));
    let mean = allocations["mean_duty_cycle"].as_f64().unwrap();
    assert!(mean < 1.0, "{allocations}");
    let observed = allocations["observed_calls"].as_u64().unwrap();
    assert_eq!(
        observed,
        report["counts"]["mallocgc"].as_u64().unwrap(),
        "counts are what was seen"
    );
    assert!(allocations["estimated_calls"].as_u64().unwrap() > observed, "{allocations}");
    let notes = report["notes"].as_array().unwrap();
    assert!(
        notes.iter().any(|n| n.as_str().unwrap().starts_with("allocations probes were sampled")),
        "{report}"
    );
    assert!(stdout.contains("sampled to stay under 0.1% of a CPU"), "{stdout}");

    // Defer probes stayed on: the leak's site accounts for every pending record.
    let pump = report["sites"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["function"] == "main.pumpBatches")
        .unwrap_or_else(|| panic!("no pump site: {report}"));
    let registered = pump["registered"].as_u64().unwrap();
    assert!(registered >= 100, "one batch per 20 ms for 4 s: {pump}");
    assert_eq!(
        pump["pending"].as_u64().unwrap(),
        registered + pump["pending_before_trace"].as_u64().unwrap(),
        "{pump}"
    );
}
