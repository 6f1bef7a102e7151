//! Issue 2: every probe family counted exactly, by `--pid` and by `-- CMD`, on each release;
//! logs and the JSON report.

use std::{thread, time::Duration};

use serde_json::Value;

use crate::{checks::*, support::*};

/// Work the workload does in every test: 20 calls × 25 loop defers, plus 10 goroutines with 2
/// loop defers each.
const WORKLOAD_ARGS: [&str; 8] =
    ["-calls", "20", "-defers", "25", "-map-writes", "500", "-goroutines", "10"];

/// Checks the report's counts against the program's own accounting.
fn assert_counts_match(report: &Value, truth: &GroundTruth) {
    let counts = &report["counts"];
    let count = |key: &str| counts[key].as_u64().unwrap_or_else(|| panic!("no counts.{key}"));
    assert_eq!(truth.heap_defers, 20 * 25 + 10 * 2);
    assert_eq!(count("deferproc"), truth.heap_defers, "heap defers must be exact: {report}");
    let map_writes = truth.str_map_writes + truth.int_map_writes;
    assert!(count("mapassign") >= map_writes, "mapassign {} < {map_writes}", count("mapassign"));
    assert!(count("goroutine_exits") >= truth.goroutines_ended, "{report}");
    // deferreturn is probed only where frames that own heap records call it: exactly the
    // returns of loopDefers (no other function of the workload owns heap records).
    assert_eq!(truth.heap_defer_frame_returns, 20 + 10);
    assert_eq!(count("deferreturn"), truth.heap_defer_frame_returns, "{report}");
    assert_eq!(count("lost_events"), 0, "{report}");
    assert!(count("alloc_bytes") > 0);
    for key in ["deferproc_stack", "mallocgc"] {
        assert!(counts[key].is_u64(), "counts.{key}");
    }
    assert_eq!(report["schema_version"], 1);
    assert_eq!(report["target"]["go_version"], truth.go_version.as_str());
    assert!(report["duration_secs"].as_f64().unwrap() > 0.0);
    assert!(report["probes"]["attached"].as_u64().unwrap() >= 8, "{report}");
    // Every registered defer of the workload ran: nothing pending at the end.
    assert_eq!(report["pending"]["heap_defers"], 0, "{report}");
    let loop_site = site_named(&report["sites"], "main.loopDefers");
    assert_eq!(loop_site["registered"], truth.heap_defers);
    assert_eq!(loop_site["released"], truth.heap_defers);
}

/// `run -- CMD`: probes are attached before the program's first instruction, so every
/// allocation it makes is seen: mallocgc counts at least what the runtime itself counted.
#[test]
fn command_counts_match_ground_truth_on_every_release() {
    require_root();
    for release in go_releases() {
        let program = go_program(&release, "workload");
        let report_file = report_path(&format!("command-{release}"));
        let output = deferprobe()
            .args(["run", "--interval", "100ms"])
            .args(ALL_PROBES_ON)
            .arg("--report")
            .arg(&report_file)
            .arg("--")
            .arg(&program)
            .args(WORKLOAD_ARGS)
            .args(["-exit-code", "3"])
            .output()
            .unwrap();
        let (stdout, stderr) = text(&output);
        assert_eq!(output.status.code(), Some(3), "exit code is the command's\n{stdout}\n{stderr}");
        let truth = ground_truth(&stdout);
        let report = read_json(&report_file);
        assert_counts_match(&report, &truth);
        assert_eq!(report["ended_by"], "target_exited");
        assert_eq!(report["target"]["exit_code"], 3);
        let mallocgc = report["counts"]["mallocgc"].as_u64().unwrap();
        assert!(
            mallocgc >= truth.mallocs,
            "go{release}: mallocgc {mallocgc} < runtime's {}",
            truth.mallocs
        );
        // Allocations after the program's own count are only its output: no double counting
        // (the size-specialized entries of Go 1.27 are deduplicated).
        assert!(
            mallocgc <= truth.mallocs + 200,
            "go{release}: mallocgc {mallocgc} vs {}",
            truth.mallocs
        );
        // The human report is on stdout too.
        assert!(stdout.contains("heap defers (deferproc)"), "{stdout}");
        assert!(stderr.contains("probes attached"), "{stderr}");
        assert!(stderr.contains(&format!("go_version={}", truth.go_version)), "{stderr}");
    }
}

/// `run --pid`: attach to a running program, then let it work; JSON logs every interval.
#[test]
fn pid_counts_match_ground_truth_on_every_release() {
    require_root();
    for release in go_releases() {
        let mut workload = Workload::start(&go_program(&release, "workload"), &WORKLOAD_ARGS);
        let report_file = report_path(&format!("pid-{release}"));
        let mut cmd = deferprobe();
        cmd.args(["run", "--pid", &workload.pid().to_string(), "--interval", "100ms"])
            .args(ALL_PROBES_ON)
            .args(["--log-format", "json", "--report"])
            .arg(&report_file);
        let mut tracer = Running::spawn(cmd);
        let attached = tracer.wait_for("probes attached");
        let truth = workload.work();
        thread::sleep(Duration::from_millis(350)); // a few log intervals
        workload.end();
        let (code, stdout, stderr) = tracer.finish();
        assert_eq!(code, 0, "{stdout}\n{}", stderr.join("\n"));

        let report = read_json(&report_file);
        assert_counts_match(&report, &truth);
        assert_eq!(report["ended_by"], "target_exited");
        assert!(
            report["notes"]
                .as_array()
                .unwrap()
                .iter()
                .any(|n| n.as_str().unwrap().contains("exited"))
        );

        let attached: Value = serde_json::from_str(&attached).expect("JSON log line");
        assert_eq!(attached["go_version"], truth.go_version.as_str());
        assert_eq!(attached["level"], "INFO");
        assert!(attached["probes"].as_u64().unwrap() >= 8);
        let counts = json_logs(&stderr, "counts");
        assert!(counts.len() >= 2, "expected interval log lines:\n{}", stderr.join("\n"));
        let fields = [
            "mapassign",
            "deferproc",
            "deferproc_stack",
            "deferreturn",
            "mallocgc",
            "alloc_bytes",
            "goroutine_exits",
            "lost_events",
        ];
        let mut sums = [0u64; 8];
        for line in &counts {
            for (sum, field) in sums.iter_mut().zip(fields) {
                *sum += line[field].as_u64().unwrap_or_else(|| panic!("{field} in {line}"));
                assert!(line[format!("total_{field}")].is_u64(), "total_{field} in {line}");
            }
        }
        // Deltas add up to the totals of the last line.
        let last = counts.last().unwrap();
        for (sum, field) in sums.iter().zip(fields) {
            assert_eq!(*sum, last[format!("total_{field}")].as_u64().unwrap(), "{field}");
        }
    }
}

/// Tracing stops at --duration, and at SIGINT / SIGTERM, the same way: report, exit 0, and
/// the target keeps running unharmed.
#[test]
fn duration_and_signals_end_tracing_cleanly() {
    require_root();
    let release = &go_releases()[0];
    let mut workload = Workload::start(&go_program(release, "workload"), &WORKLOAD_ARGS);
    let pid = workload.pid().to_string();

    let output = deferprobe().args(["run", "--pid", &pid, "--duration", "300ms"]).output().unwrap();
    let (stdout, stderr) = text(&output);
    assert_eq!(output.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("duration reached"), "{stdout}");

    for signal in [libc::SIGINT, libc::SIGTERM] {
        let report_file = report_path(&format!("signal-{signal}"));
        let mut cmd = deferprobe();
        cmd.args(["run", "--pid", &pid, "--report"]).arg(&report_file);
        let mut tracer = Running::spawn(cmd);
        tracer.wait_for("probes attached");
        // SAFETY: signalling the child we started.
        unsafe { libc::kill(tracer.child.id() as i32, signal) };
        let (code, stdout, stderr) = tracer.finish();
        assert_eq!(code, 0, "{stdout}\n{}", stderr.join("\n"));
        assert_eq!(read_json(&report_file)["ended_by"], "signal");
    }

    // Still alive and correct after three attach/detach cycles.
    let truth = workload.work();
    assert_eq!(truth.heap_defers, 520);
    workload.end();
}

/// `--probes`: each family on its own attaches only its probes, counts exactly what it counted
/// with every family on, and reports the other families as not probed (null), never as zero.
#[test]
fn each_probe_family_on_its_own() {
    require_root();
    let release = &go_releases()[0];
    let program = go_program(release, "workload");
    for (family, counted) in [
        ("defers", &["deferproc", "deferproc_stack", "deferreturn", "goroutine_exits"][..]),
        ("map-writes", &["mapassign"]),
        ("allocations", &["mallocgc", "alloc_bytes"]),
    ] {
        let Traced { code, stdout, stderr, report } = trace_command_with(
            &format!("family-{family}"),
            &["--probes", family],
            &program,
            &WORKLOAD_ARGS,
        );
        assert_eq!(code, 0, "{family}: {stderr}");
        let truth = ground_truth(&stdout);
        let json_family = family.replace('-', "_");
        assert_eq!(report["probes"]["families"], serde_json::json!([json_family]), "{report}");
        assert!(stderr.contains(&format!("families=\"{json_family}\"")), "{stderr}");
        let counts = report["counts"].as_object().unwrap();
        for (key, value) in counts {
            match counted.contains(&key.as_str()) || key == "lost_events" {
                true => assert!(value.is_u64(), "{family}: counts.{key} = {value}"),
                false => assert!(value.is_null(), "{family}: counts.{key} = {value}, not null"),
            }
        }
        let count = |key: &str| counts[key].as_u64().unwrap();
        match family {
            "defers" => {
                assert_eq!(count("deferproc"), truth.heap_defers, "{report}");
                assert_eq!(count("deferreturn"), truth.heap_defer_frame_returns, "{report}");
                assert!(count("goroutine_exits") >= truth.goroutines_ended, "{report}");
                assert_eq!(report["pending"]["heap_defers"], 0, "{report}");
            }
            "map-writes" => {
                let writes = truth.str_map_writes + truth.int_map_writes;
                assert!(count("mapassign") >= writes, "{report}");
            }
            _ => assert!(count("mallocgc") >= truth.mallocs, "{report}"),
        }
        assert!(stdout.contains("not probed"), "{stdout}");
    }
}
