//! Issue 15, wrong data at the edges: what the report says about a run's last moments and about
//! records no probe saw registered. A target that dies of an unrecovered panic (the panicking
//! goroutine's defers ran, the others' did not); a small ring buffer under `run -- CMD`
//! (lost registrations, never "pending before trace"); a Go plugin's defers (probed and named
//! with the plugin's own function table, or counted as unprobed).

use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Command, Stdio},
    thread,
    time::Duration,
};

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

/// tests/go/plugins built with Go `release` and cgo (plugins need it): the host program and the
/// plugin it opens. Built here, not by `cargo xtask go-programs` (which builds without cgo).
fn plugin_programs(release: &str) -> (PathBuf, PathBuf) {
    let root = workspace_root();
    let out = root.join("target/e2e").join(format!("plugin-go{release}"));
    std::fs::create_dir_all(&out).unwrap();
    let cc = Command::new("cc").arg("--version").output();
    assert!(
        cc.is_ok_and(|o| o.status.success()),
        "Go plugins need cgo, and cgo a C compiler: no working `cc` on this machine"
    );
    let go = root.join("target/go").join(release).join("go/bin/go");
    let (host, plugin) = (out.join("host"), out.join("holder.so"));
    for (output, package, mode) in
        [(&plugin, "./plugins/holder", "plugin"), (&host, "./plugins/host", "default")]
    {
        let built = Command::new(&go)
            .current_dir(root.join("tests/go"))
            .env("GOTOOLCHAIN", "local")
            .env("GOCACHE", root.join("target/go-cache").join(release))
            .env("GOPATH", root.join("target/go-path"))
            .env("GOFLAGS", "-mod=mod")
            .env("CGO_ENABLED", "1")
            .args(["build", "-trimpath=false", &format!("-buildmode={mode}"), "-o"])
            .arg(output)
            .arg(package)
            .output()
            .unwrap_or_else(|e| panic!("{}: {e}", go.display()));
        assert!(built.status.success(), "go build {package}: {}", text(&built).1);
    }
    (host, plugin)
}

/// Sites of `report` in `function`, as (registered, released, pending, before trace, lost,
/// unprobed), with the site's module.
fn site_in(report: &Value, function: &str) -> ((u64, u64, u64, u64, u64, u64), Value) {
    let sites = report["sites"].as_array().unwrap();
    let site = sites
        .iter()
        .find(|s| s["function"] == function)
        .unwrap_or_else(|| panic!("no site in {function}: {report}"));
    let n = |key: &str| site[key].as_u64().unwrap_or_else(|| panic!("{key}: {site}"));
    let counts = (
        n("registered"),
        n("released"),
        n("pending"),
        n("pending_before_trace"),
        n("pending_registration_lost"),
        n("pending_unprobed"),
    );
    (counts, site["module"].clone())
}

const HOLD_IN_PLUGIN: &str = "deferprobe.test/programs/plugins/holder.Hold";
const CHURN_IN_PLUGIN: &str = "deferprobe.test/programs/plugins/holder.churn";

/// A Go plugin (`-buildmode=plugin`, opened by `plugin.Open`) carries its own copy of the
/// runtime's defer functions: deferprobe finds it in the target's mappings at the next
/// interval, probes it with its own plan, and names its sites with its own function table.
/// Once probed its defers are counted exactly; what it registered before is "unprobed",
/// never "pending before trace" nor "lost".
#[test]
fn a_go_plugins_defers_are_probed_and_named() {
    require_root();
    let release = &go_releases()[0]; // 1.27
    let (host, plugin) = plugin_programs(release);
    let plugin_path = plugin.display().to_string();
    let trace = |delay: &str| {
        let report_file = report_path("plugin");
        let output = deferprobe()
            .args(["run", "--interval", "100ms", "--report"])
            .arg(&report_file)
            .arg("--")
            .arg(&host)
            .args(["-plugin", &plugin_path, "-n", "30", "-churn", "2", "-host", "2"])
            .args(["-plugin-goroutines", "3", "-delay", delay, "-hold", "500ms"])
            .output()
            .unwrap();
        let (stdout, stderr) = text(&output);
        assert_eq!(output.status.code(), Some(0), "{stderr}");
        (ground_truth_json(&stdout), read_json(&report_file))
    };

    // The plugin's code runs after 400 ms: probed by then (polled every 100 ms).
    let (truth, report) = trace("400ms");
    assert_eq!(truth["plugin_pending"], 90, "{truth}");
    assert_eq!(report["counts"]["deferproc"], truth["heap_defers"], "{report}");
    let held = truth["host_pending"].as_u64().unwrap() + truth["plugin_pending"].as_u64().unwrap();
    assert_eq!(report["pending"]["heap_defers"], held, "{report}");
    for key in ["before_trace", "registration_lost", "unprobed"] {
        assert_eq!(report["pending"][key], 0, "{key}: {report}");
    }
    let (counts, module) = site_in(&report, HOLD_IN_PLUGIN);
    assert_eq!(counts, (90, 0, 90, 0, 0, 0), "{report}");
    assert_eq!(module, plugin_path.as_str(), "{report}");
    let (counts, module) = site_in(&report, CHURN_IN_PLUGIN);
    assert_eq!(counts, (60, 60, 0, 0, 0, 0), "run by the plugin's deferreturn: {report}");
    assert_eq!(module, plugin_path.as_str(), "{report}");
    let (counts, module) = site_in(&report, "main.hold");
    assert_eq!(counts, (60, 0, 60, 0, 0, 0), "{report}");
    assert!(module.is_null(), "{report}");
    for site in report["sites"].as_array().unwrap() {
        assert!(site["function"].is_string() && site["pc"] != "unknown", "{site}");
    }
    let notes = report["notes"].to_string();
    assert!(
        notes.contains(&format!("Go plugin {plugin_path} was loaded while traced and found")),
        "{notes}"
    );
    assert!(!notes.contains("already pending") && !notes.contains("were lost"), "{notes}");

    // The plugin's code runs at once: whatever it registered before it was probed is pending
    // but unprobed; the rest is seen. Either way, every record is accounted for once.
    let (truth, report) = trace("0s");
    assert_eq!(report["pending"]["heap_defers"], held, "{report}");
    let ((registered, _, pending, before, lost, unprobed), _) = site_in(&report, HOLD_IN_PLUGIN);
    assert_eq!(pending, 90, "{report}");
    assert_eq!((before, lost), (0, 0), "{report}");
    assert_eq!(registered + unprobed, pending, "{report}");
    assert_eq!(report["pending"]["unprobed"], unprobed, "{report}");
    let (counts, _) = site_in(&report, "main.hold");
    assert_eq!(counts, (60, 0, 60, 0, 0, 0), "{report}");
    assert!(
        report["counts"]["deferproc"].as_u64().unwrap() <= truth["heap_defers"].as_u64().unwrap(),
        "{report}"
    );
    if unprobed > 0 {
        assert!(report["notes"].to_string().contains(&format!(
            "{unprobed} pending heap defer records at sites in Go plugins were registered while \
             the plugin's code was not probed"
        )));
    }
}

/// By `--pid` after the plugin's code holds its records: the plugin was mapped before tracing
/// started, so it is probed at once, and its records found pending are pending before trace,
/// named in the plugin's code.
#[test]
fn a_go_plugin_mapped_before_attaching_by_pid() {
    require_root();
    let release = &go_releases()[0];
    let (host, plugin) = plugin_programs(release);
    let plugin_path = plugin.display().to_string();
    let mut target = Command::new(&host)
        .args(["-plugin", &plugin_path, "-n", "30", "-hold", "30s"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(target.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let truth: Value = serde_json::from_str(&line).unwrap();
    let report_file = report_path("plugin-pid");
    let output = deferprobe()
        .args(["run", "--pid", &target.id().to_string(), "--duration", "500ms"])
        .args(["--interval", "100ms", "--report"])
        .arg(&report_file)
        .output()
        .unwrap();
    let _ = target.kill();
    let _ = target.wait();
    assert_eq!(output.status.code(), Some(0), "{}", text(&output).1);
    let report = read_json(&report_file);
    let plugin_pending = truth["plugin_pending"].as_u64().unwrap();
    let ((registered, _, pending, before, lost, unprobed), module) =
        site_in(&report, HOLD_IN_PLUGIN);
    assert_eq!((registered, pending, before, lost, unprobed), (0, 90, 90, 0, 0), "{report}");
    assert_eq!(plugin_pending, 90);
    assert_eq!(module, plugin_path.as_str(), "{report}");
    assert_eq!(report["pending"]["before_trace"], 150, "{report}");
    assert!(
        report["notes"].to_string().contains(&format!("Go plugin {plugin_path} was probed like")),
        "{}",
        report["notes"]
    );
}
