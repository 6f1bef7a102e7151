//! Issue 4: pending heap defers per goroutine, the maps their closures capture, and findings,
//! checked against the ground truth the `captures` Go program computes itself, on the oldest
//! and newest Go releases under test.

use std::{thread, time::Duration};

use serde_json::Value;

use crate::{checks::*, support::*};

/// The oldest and the newest release in tests/go/releases.txt.
fn oldest_and_newest() -> Vec<String> {
    let mut releases = go_releases();
    releases.sort_by_key(|r| r.split('.').map(|n| n.parse::<u32>().unwrap()).collect::<Vec<_>>());
    vec![releases[0].clone(), releases[releases.len() - 1].clone()]
}

/// What tracing one scenario gave.
struct Traced {
    report: Value,
    /// The program's own accounting.
    truth: Value,
    stderr: Vec<String>,
    peak_rss_kib: u64,
}

/// Traces `captures -scenario NAME` by --pid: attach, let it work, stop with SIGINT while it
/// still holds its defers.
fn trace_scenario(release: &str, scenario: &str, args: &[&str]) -> Traced {
    let program = go_program(release, "captures");
    let mut program_args = vec!["-wait", "-scenario", scenario];
    program_args.extend(args);
    let mut target = Workload::start_with_args(&program, &program_args);
    let report_file = report_path(&format!("{scenario}-{release}"));
    let mut cmd = deferprobe();
    cmd.args(["run", "--pid", &target.pid().to_string(), "--interval", "200ms"])
        .args(ALL_PROBES_ON)
        .args(["--log-format", "json", "--report"])
        .arg(&report_file);
    let mut tracer = Running::spawn(cmd);
    tracer.wait_for("probes attached");
    let truth = target.work_json();
    thread::sleep(Duration::from_millis(450)); // a couple of log intervals
    // SAFETY: signalling the child we started.
    unsafe { libc::kill(tracer.child.id() as i32, libc::SIGINT) };
    let (code, stdout, stderr, peak_rss_kib) = tracer.finish_with_peak_rss();
    assert_eq!(code, 0, "{stdout}\n{}", stderr.join("\n"));
    target.end();
    Traced { report: read_json(&report_file), truth, stderr, peak_rss_kib }
}

#[test]
fn loop_defers_capturing_maps_by_value() {
    require_root();
    for release in oldest_and_newest() {
        let Traced { report, truth, stderr, .. } =
            trace_scenario(&release, "byvalue", &["-n", "300"]);
        assert_single_finding(&report, &truth, false);
        // The periodic log line carries pending defers and captured maps.
        let last = json_logs(&stderr, "counts").pop().expect("counts log lines");
        assert_eq!(u64_of(&last, "pending_heap_defers"), 300, "{last}");
        assert_eq!(u64_of(&last, "captured_maps"), 300, "{last}");
    }
}

#[test]
fn loop_defers_capturing_maps_by_reference() {
    require_root();
    for release in oldest_and_newest() {
        let Traced { report, truth, .. } = trace_scenario(&release, "byref", &["-n", "300"]);
        assert_single_finding(&report, &truth, true);
    }
}

#[test]
fn per_request_handler_releases_everything() {
    require_root();
    for release in oldest_and_newest() {
        let Traced { report, truth, .. } = trace_scenario(&release, "handler", &["-n", "1000"]);
        assert_eq!(report["findings"].as_array().unwrap().len(), 0, "{report}");
        assert_eq!(u64_of(&report["pending"], "heap_defers"), 0, "{report}");
        let site = site_named(&report["sites"], truth["function"].as_str().unwrap());
        assert_eq!(u64_of(site, "registered"), u64_of(&truth, "registered"), "{site}");
        assert_eq!(u64_of(site, "released"), u64_of(&truth, "released"), "{site}");
        assert_eq!(u64_of(site, "pending"), 0);
    }
}

#[test]
fn panics_and_recover_keep_pending_exact() {
    require_root();
    for release in oldest_and_newest() {
        let Traced { report, truth, .. } = trace_scenario(&release, "panics", &["-n", "40"]);
        assert_single_finding(&report, &truth, false);
    }
}

#[test]
fn goexit_and_ended_goroutines_keep_pending_exact() {
    require_root();
    for release in oldest_and_newest() {
        let Traced { report, truth, .. } = trace_scenario(&release, "goexit", &["-n", "40"]);
        assert_single_finding(&report, &truth, false);
        assert!(u64_of(&report["counts"], "goroutine_exits") >= 20);
    }
}

#[test]
fn five_thousand_goroutines() {
    require_root();
    for release in oldest_and_newest() {
        let Traced { report, truth, peak_rss_kib, .. } =
            trace_scenario(&release, "many", &["-n", "3", "-goroutines", "5000"]);
        // Bounded memory: 15,000 pending records and 5,000 goroutines in a few tens of MiB
        // (the embedded eBPF object and the mapped target binary included).
        eprintln!("five_thousand_goroutines go{release}: peak RSS {peak_rss_kib} KiB");
        assert!(peak_rss_kib < 64 * 1024, "deferprobe peak RSS {peak_rss_kib} KiB");
        assert_eq!(u64_of(&report["pending"], "heap_defers"), u64_of(&truth, "pending_defers"));
        assert_eq!(u64_of(&report["pending"], "goroutines"), 5000);
        assert_eq!(u64_of(&report["pending"], "captured_maps"), u64_of(&truth, "captured_maps"));
        let goroutines = report["goroutines"].as_array().unwrap();
        assert_eq!(goroutines.len(), 5000);
        assert!(goroutines.iter().all(|g| g["pending_defers"] == 3));
        let entries: u64 = goroutines.iter().map(|g| u64_of(g, "captured_map_entries")).sum();
        assert_eq!(entries, u64_of(&truth, "captured_map_entries"));
        // 3 pending per frame is below --min-pending 16: no findings.
        assert_eq!(report["findings"].as_array().unwrap().len(), 0);
        assert_eq!(u64_of(&report["counts"], "lost_events"), 0);
    }
}
