//! Issue 15: the Go runtime inside a shared library. A C program (tests/go/cshared/host)
//! loads a Go `-buildmode=c-shared` library (tests/go/cshared) with dlopen: `run --pid` and
//! `snapshot --pid` find the library among the process's mappings (deleted on disk, even) and
//! trace it there, exactly;
//! `run -- CMD` refuses the C program, saying how to trace it.

use std::{path::PathBuf, process::Command, thread, time::Duration};

use serde_json::Value;

use crate::{bad_input::Scratch, checks::*, cli_errors::assert_fails, support::*};

/// Builds the library with the default release and the host with cc: (host, library).
fn build(scratch: &Scratch) -> (PathBuf, PathBuf) {
    let release = &go_releases()[0];
    let root = workspace_root();
    let go = root.join(format!("target/go/{release}/go/bin/go"));
    assert!(go.exists(), "{} is missing: run `cargo xtask setup`", go.display());
    let library = scratch.dir.join("libdefers.so");
    let built = Command::new(&go)
        .current_dir(root.join("tests/go"))
        .env("GOTOOLCHAIN", "local")
        .env("GOFLAGS", "-mod=mod")
        .env("GOCACHE", root.join(format!("target/go-cache/{release}")))
        .env("CGO_ENABLED", "1")
        .args(["build", "-buildmode=c-shared", "-trimpath=false", "-o"])
        .arg(&library)
        .arg("./cshared")
        .output()
        .unwrap();
    assert!(built.status.success(), "go build -buildmode=c-shared: {}", text(&built).1);
    let host = scratch.dir.join("host");
    let built = Command::new("cc")
        .arg("-o")
        .arg(&host)
        .arg(root.join("tests/go/cshared/host/host.c"))
        .arg("-ldl")
        .output()
        .expect("cc (a C compiler) is needed to build the c-shared test's host program");
    assert!(built.status.success(), "cc host.c: {}", text(&built).1);
    (host, library)
}

fn u64_of(value: &Value, key: &str) -> u64 {
    value[key].as_u64().unwrap_or_else(|| panic!("no {key} in {value}"))
}

/// The report's site for `truth`'s defer statement.
fn site<'a>(report: &'a Value, truth: &Value) -> &'a Value {
    site_at(&report["sites"], &truth["site"])
}

#[test]
fn go_runtime_in_a_c_shared_library_is_traced_by_pid() {
    require_root();
    let scratch = Scratch::new("c-shared");
    let (host, library) = build(&scratch);
    let library_name = library.to_str().unwrap();

    // run -- CMD: the C program is not Go; the message says what works.
    assert_fails(
        &["run", "--", host.to_str().unwrap(), library_name],
        EXIT_UNSUPPORTED,
        "not a Go binary (no .go.buildinfo section); a C program with a Go -buildmode=c-shared \
         library can be traced with --pid once it has loaded the library",
    );

    let mut program = Workload::start_with_args(&host, &[library_name]);
    let pid = program.pid().to_string();
    // Loaded, then deleted on disk: deferprobe reads and probes it through
    // /proc/PID/map_files.
    std::fs::remove_file(&library).unwrap();
    let report_file = report_path("c-shared");
    let mut cmd = deferprobe();
    cmd.args(["run", "--pid", &pid, "--interval", "100ms"])
        .args(ALL_PROBES_ON)
        .arg("--report")
        .arg(&report_file);
    let mut tracer = Running::spawn(cmd);
    tracer.wait_for("probes attached");
    let looped = program.command_json("loop 20 25");
    let held = program.command_json("hold 30");
    assert_eq!(u64_of(&looped, "heap_defers"), 20 * 25, "the library's own count");
    assert_eq!(u64_of(&held, "pending_defers"), 30, "the library's own count");
    thread::sleep(Duration::from_millis(300));
    // SAFETY: signalling the deferprobe we started.
    unsafe { libc::kill(tracer.child.id() as i32, libc::SIGINT) };
    let (code, stdout, stderr) = tracer.finish();
    assert_eq!(code, 0, "{stdout}\n{}", stderr.join("\n"));
    let report = read_json(&report_file);
    let context = format!("report: {report:#}\nstderr: {}", stderr.join("\n"));
    assert_eq!(report["target"]["exe"], host.to_str().unwrap(), "{context}");
    assert_eq!(report["target"]["go_module"], library_name, "{context}");
    assert_eq!(report["target"]["go_version"], looped["go_version"], "{context}");
    assert_eq!(report["ended_by"], "signal", "{context}");
    assert_eq!(u64_of(&report["counts"], "deferproc"), 20 * 25 + 30, "{context}");
    assert_eq!(u64_of(&report["counts"], "lost_events"), 0, "{context}");
    // Each defer statement, by function and file:line, from the library's pclntab.
    let loop_site = site(&report, &looped);
    assert_eq!(loop_site["file"], looped["site"]["file"], "{context}");
    assert_eq!(u64_of(loop_site, "registered"), 20 * 25, "{context}");
    assert_eq!(u64_of(loop_site, "released"), 20 * 25, "{context}");
    assert_eq!(u64_of(loop_site, "pending"), 0, "{context}");
    let hold_site = site(&report, &held);
    assert_eq!(hold_site["file"], held["site"]["file"], "{context}");
    assert_eq!(u64_of(hold_site, "registered"), 30, "{context}");
    assert_eq!(u64_of(hold_site, "pending"), 30, "{context}");
    assert_eq!(u64_of(&report["pending"], "heap_defers"), 30, "{context}");
    let finding = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["function"] == held["site"]["function"])
        .unwrap_or_else(|| panic!("no finding for the held records\n{context}"));
    assert_eq!(finding["goid"], held["goid"], "{context}");
    assert_eq!(u64_of(finding, "pending_defers"), 30, "{context}");

    // snapshot --pid: the 30 held records, read from the library's runtime.
    let output = deferprobe().args(["snapshot", "--pid", &pid, "--json"]).output().unwrap();
    let (stdout, stderr) = text(&output);
    assert_eq!(output.status.code(), Some(0), "snapshot: {stderr}");
    let snapshot: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    let context = format!("snapshot: {snapshot:#}");
    assert_eq!(snapshot["target"]["go_module"], library_name, "{context}");
    assert_eq!(u64_of(&snapshot["pending"], "heap_defers"), 30, "{context}");
    assert_eq!(u64_of(&snapshot["pending"], "goroutines"), 1, "{context}");
    let hold_site = site(&snapshot, &held);
    assert_eq!(u64_of(hold_site, "pending"), 30, "{context}");
    assert_eq!(hold_site["file"], held["site"]["file"], "{context}");
    let text_output = deferprobe().args(["snapshot", "--pid", &pid]).output().unwrap();
    let (text_report, _) = text(&text_output);
    assert!(text_report.contains(&format!("go module {library_name}")), "{text_report}");
    assert!(text_report.contains(&format!("exe       {}", host.display())), "{text_report}");

    program.send("release");
    program.end();
}
