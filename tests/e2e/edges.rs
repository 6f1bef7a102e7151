//! Issue 15, wrong data at the edges: what the report says about a run's last moments and about
//! records no probe saw registered. A target that dies of an unrecovered panic (the panicking
//! goroutine's defers ran, the others' did not), ...

use std::{thread, time::Duration};

use serde_json::Value;

use crate::support::*;

/// Records per goroutine, and goroutines that hold theirs, in tests/go/crash.
const CRASH_N: u64 = 40;
const CRASH_HOLDERS: u64 = 3;

/// What a report of tests/go/crash must say once the program died of its panic: the holders'
/// records pending, exactly; none of the panicking goroutine's; a note saying what ran.
fn assert_died_of_the_panic(report: &Value, truth: &Value, what: &str) {
    assert_eq!(truth["heap_defers"], (CRASH_HOLDERS + 1) * CRASH_N, "{what}: {truth}");
    assert_eq!(report["ended_by"], "target_exited", "{what}: {report}");
    assert_eq!(report["counts"]["deferproc"], truth["heap_defers"], "{what}: {report}");
    assert_eq!(report["pending"]["heap_defers"], truth["held_pending"], "{what}: {report}");
    assert_eq!(report["pending"]["goroutines"], truth["holders"], "{what}: {report}");
    let goid = truth["panicking_goid"].as_u64().unwrap();
    let goroutines = report["goroutines"].as_array().unwrap();
    assert_eq!(goroutines.len() as u64, CRASH_HOLDERS, "{what}: {report}");
    for goroutine in goroutines {
        assert_ne!(goroutine["goid"], goid, "{what}: the panic ran its defers: {report}");
        assert_eq!(goroutine["pending_defers"], CRASH_N, "{what}: {report}");
    }
    let findings = report["findings"].as_array().unwrap();
    assert_eq!(findings.len() as u64, CRASH_HOLDERS, "{what}: {report}");
    for finding in findings {
        assert_eq!(finding["function"], "main.hold", "{what}: {report}");
        assert_eq!(finding["pending_before_trace"], 0, "{what}: {report}");
    }
    let site = |function: &str| {
        let sites = report["sites"].as_array().unwrap();
        let site = sites.iter().find(|s| s["function"] == function);
        site.unwrap_or_else(|| panic!("{what}: no site in {function}: {report}")).clone()
    };
    let panicked = site("main.panicAfter");
    assert_eq!(
        (&panicked["registered"], &panicked["released"], &panicked["pending"]),
        (&CRASH_N.into(), &CRASH_N.into(), &0.into()),
        "{what}: {report}"
    );
    let held = site("main.hold");
    assert_eq!(held["pending"], truth["held_pending"], "{what}: {report}");
    assert_eq!(held["pending_before_trace"], 0, "{what}: {report}");
    let notes = report["notes"].to_string();
    let note = format!(
        "goroutine {goid} panicked and nothing recovered: its {CRASH_N} pending heap defers ran \
         during the panic, and the program died of it"
    );
    assert!(notes.contains(&note), "{what}: {notes}");
    assert!(!notes.contains("already pending"), "{what}: {notes}");
}

/// `run -- CMD` of a program that dies of a panic, on every release: with snapshots taken
/// before the panic (the last one brought up to the death) and with none (events alone).
#[test]
fn a_fatal_panic_ran_its_goroutines_defers_and_the_others_stay_pending() {
    require_root();
    let args = ["-n", "40", "-holders", "3"];
    for release in go_releases() {
        let program = go_program(&release, "crash");
        // --interval 1s, and the program panics at once: no snapshot before it dies.
        let traced =
            trace_command("crash-no-snapshot", &program, &[&args[..], &["-delay", "0s"]].concat());
        let what = format!("go{release}, no snapshot");
        assert_eq!(traced.code, 2, "{what}: the program's exit status\n{}", traced.stderr);
        assert_eq!(traced.report["target"]["exit_code"], 2, "{what}");
        let truth = ground_truth_json(&traced.stdout);
        assert!(traced.stdout.contains("{\"ran_during_panic\":40}"), "{what}: {}", traced.stdout);
        assert_died_of_the_panic(&traced.report, &truth, &what);
        assert!(traced.report["snapshot"].is_null(), "{what}: {}", traced.report);

        // Snapshots every 100 ms while the goroutines hold their records for 600 ms.
        let report_file = report_path("crash-snapshots");
        let output = deferprobe()
            .args(["run", "--interval", "100ms", "--report"])
            .arg(&report_file)
            .arg("--")
            .arg(&program)
            .args(args)
            .args(["-delay", "600ms"])
            .output()
            .unwrap();
        let (stdout, stderr) = text(&output);
        let what = format!("go{release}, snapshots");
        assert_eq!(output.status.code(), Some(2), "{what}: {stderr}");
        let report = read_json(&report_file);
        assert!(report["snapshot"].is_object(), "{what}: {report}");
        assert_died_of_the_panic(&report, &ground_truth_json(&stdout), &what);
    }
}

/// The same, traced by `--pid` from before the goroutines start.
#[test]
fn a_fatal_panic_by_pid() {
    require_root();
    let release = &go_releases()[0];
    let program = go_program(release, "crash");
    let mut workload = Workload::start_with_args(&program, &["-wait", "-n", "40", "-holders", "3"]);
    let report_file = report_path("crash-pid");
    let mut cmd = deferprobe();
    cmd.args(["run", "--pid", &workload.pid().to_string(), "--interval", "100ms"])
        .args(["--log-format", "json", "--report"])
        .arg(&report_file);
    let mut tracer = Running::spawn(cmd);
    tracer.wait_for("probes attached");
    let truth = workload.work_json();
    tracer.wait_for("\"counts\""); // a snapshot with the records held
    thread::sleep(Duration::from_millis(150));
    workload.go(); // panic now
    let status = workload.child.wait().unwrap();
    assert_eq!(status.code(), Some(2), "the program dies of its panic");
    let (code, stdout, stderr) = tracer.finish();
    assert_eq!(code, 0, "{stdout}\n{}", stderr.join("\n"));
    let report = read_json(&report_file);
    assert_died_of_the_panic(&report, &truth, "--pid");
}

/// `run -- CMD` with a 16 KiB ring buffer: 2,500 heap defers registered in five bursts
/// overflow it. The probes were attached before the program's first instruction, so the
/// pending records no registration event accounts for are lost events, never "pending before
/// tracing started": every record is pending (the program's own count), the registrations
/// seen plus the lost ones are all of them, and the note ties them to the ring buffer.
#[test]
fn a_small_ring_buffer_under_a_command_loses_registrations_not_time() {
    require_root();
    let release = &go_releases()[0];
    let program = go_program(release, "crash");
    let report_file = report_path("ring-command");
    // Defers only: every event lost is a registration (nothing returns or exits here).
    let output = deferprobe()
        .args(["run", "--probes", "defers", "--ring-buffer-kib", "16", "--interval", "100ms"])
        .arg("--report")
        .arg(&report_file)
        .arg("--")
        .arg(&program)
        .args(["-holders", "4", "-n", "500", "-delay", "800ms", "-exit"])
        .output()
        .unwrap();
    let (stdout, stderr) = text(&output);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    let truth = ground_truth_json(&stdout);
    let total = 5 * 500;
    assert_eq!(truth["heap_defers"], total, "{truth}");
    let report = read_json(&report_file);
    assert_eq!(report["counts"]["deferproc"], total, "{report}");
    let pending = &report["pending"];
    assert_eq!(pending["heap_defers"], total, "every record is still pending: {report}");
    assert_eq!(pending["before_trace"], 0, "{report}");
    let ring_full = report["lost"]["ring_buffer_full"].as_u64().unwrap();
    assert!(ring_full > 0, "16 KiB can't hold {total} events: {report}");
    assert_eq!(pending["registration_lost"], ring_full, "{report}");
    let sum = |section: &str, key: &str| -> u64 {
        let items = report[section].as_array().unwrap();
        items.iter().map(|item| item[key].as_u64().unwrap_or_else(|| panic!("{key}: {item}"))).sum()
    };
    assert_eq!(sum("sites", "registered") + ring_full, total, "seen + lost = all: {report}");
    assert_eq!(sum("sites", "pending_registration_lost"), ring_full, "{report}");
    assert_eq!(sum("findings", "pending_registration_lost"), ring_full, "{report}");
    assert_eq!(sum("sites", "pending_before_trace"), 0, "{report}");
    assert_eq!(sum("findings", "pending_before_trace"), 0, "{report}");
    for goroutine in report["goroutines"].as_array().unwrap() {
        for site in goroutine["defer_sites"].as_array().unwrap() {
            assert_eq!(site["pending_before_trace"], 0, "{goroutine}");
        }
    }
    let notes = report["notes"].to_string();
    assert!(
        notes.contains(&format!(
            "{ring_full} pending heap defer records were registered while traced, but their \
             registration events were lost (ring buffer full: {ring_full}"
        )),
        "{notes}"
    );
    assert!(notes.contains("a larger --ring-buffer-kib than 16"), "{notes}");
    assert!(!notes.contains("already pending"), "{notes}");
    assert!(stdout.contains("lost"), "the text report's sites have a lost column: {stdout}");
}
