//! `run --follow -- CMD`: the Go programs a command starts, directly or through its children,
//! each traced from its first instruction in a section of its own, with exact counts against
//! what each program says it did; and without `--follow`, the note that children were not
//! traced.

use std::{collections::HashMap, path::Path};

use serde_json::Value;

use crate::support::*;

/// Every ground-truth line in `stdout` ({"heap_defers":…, "pid":…}), by pid.
fn truths_by_pid(stdout: &str) -> HashMap<u64, Value> {
    stdout
        .lines()
        .filter(|line| line.starts_with("{\"heap_defers\""))
        .map(|line| serde_json::from_str::<Value>(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .map(|truth| (truth["pid"].as_u64().expect("pid in the ground truth"), truth))
        .collect()
}

/// `deferprobe run --follow --report FILE -- CMD…` run with `env`, in `dir`.
fn follow(name: &str, dir: &Path, env: &[(&str, String)], cmd: &[&str]) -> Traced {
    let mut deferprobe = deferprobe();
    deferprobe.current_dir(dir).envs(env.iter().map(|(k, v)| (k, v)));
    trace_in(name, deferprobe, &["--follow"], cmd)
}

fn processes(report: &Value) -> &Vec<Value> {
    report["processes"].as_array().unwrap_or_else(|| panic!("no processes in {report}"))
}

/// A traced program's entry: traced from its first instruction, with a report of its own.
fn assert_traced_from_start(process: &Value) {
    assert_eq!(process["status"], "traced", "{process}");
    assert_eq!(process["traced_from"], "first_instruction", "{process}");
    assert_eq!(process["report"]["target"]["pid"], process["pid"], "{process}");
}

/// The registrations the report saw at `function`'s defer site.
fn registered_at(report: &Value, function: &str) -> u64 {
    report["sites"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|site| site["function"].as_str().is_some_and(|f| f.ends_with(function)))
        .map(|site| site["registered"].as_u64().unwrap())
        .sum()
}

/// `go test ./...` (Go 1.27) on a test package whose test counts its own heap defers: the go
/// command, the toolchain programs it runs and the test binary are each traced from their
/// first instruction; the test binary's heap defers are exactly the test's own count.
#[test]
fn go_test_counts_the_test_binarys_heap_defers_exactly() {
    require_root();
    let root = workspace_root();
    let go = root.join("target/go/1.27.3/go/bin/go");
    assert!(go.exists(), "{} is missing: run `cargo xtask setup`", go.display());
    let env = [
        ("GOTOOLCHAIN", "local".to_owned()),
        ("GOCACHE", root.join("target/go-cache/1.27.3").display().to_string()),
        ("GOPATH", root.join("target/go-path").display().to_string()),
        ("GOFLAGS", "-mod=mod".to_owned()),
        ("CGO_ENABLED", "0".to_owned()),
    ];
    let traced = follow(
        "follow-go-test",
        &root.join("tests/go/followtest"),
        &env,
        &[go.to_str().unwrap(), "test", "-count=1", "-v", "./..."],
    );
    assert_eq!(traced.code, 0, "{}{}", traced.stderr, traced.stdout);
    let truth = ground_truth_json(&traced.stdout);
    let report = &traced.report;
    assert_eq!(report["kind"], "follow");
    assert_eq!(report["command"]["exit_code"], 0);
    assert_eq!(report["children"]["traced"], true);
    let processes = processes(report);
    // The go command itself comes first: the command deferprobe started.
    assert_eq!(processes[0]["pid"], report["command"]["pid"]);
    assert_eq!(processes[0]["exe"].as_str().unwrap(), go.to_str().unwrap());
    assert_traced_from_start(&processes[0]);
    let tests: Vec<&Value> = processes
        .iter()
        .filter(|p| p["exe"].as_str().unwrap().ends_with("/followtest.test"))
        .collect();
    assert_eq!(tests.len(), 1, "one test binary: {processes:#?}");
    let test = tests[0];
    assert_traced_from_start(test);
    assert_eq!(test["exit_code"], 0);
    assert_eq!(test["ppid"], report["command"]["pid"], "go runs the test binary itself");
    let test_report = &test["report"];
    assert_eq!(test_report["target"]["go_version"], "go1.27.3");
    assert_eq!(test_report["counts"]["deferproc"], truth["heap_defers"], "{test_report}");
    assert_eq!(registered_at(test_report, "followtest.loopDefers"), truth["heap_defers"]);
    // Every program go ran is a Go program of the toolchain (or the test), each traced.
    for process in processes {
        assert_traced_from_start(process);
        assert_eq!(process["report"]["target"]["go_version"], "go1.27.3", "{process}");
    }
    // The text report: one section per traced program, within 80 columns.
    assert!(traced.stdout.contains("deferprobe report (--follow)"), "{}", traced.stdout);
    let sections = traced.stdout.matches("traced from its first instruction").count();
    assert_eq!(sections, processes.len());
    for line in traced.stdout.lines().filter(|l| !l.starts_with('{')) {
        assert!(line.chars().count() <= 80, "wider than 80 columns: {line:?}");
    }
}

/// `sh -c '…'`: the shell (not Go) is listed and skipped; the Go program it forks is found
/// and counted exactly, with its exit code and the shell's.
#[test]
fn shell_script_child_is_found_and_counted() {
    require_root();
    let spawner = go_program("1.27.3", "spawner");
    let script = format!("{} -children 2 -defers 13 -exit-code 3; exit 5", spawner.display());
    let traced = follow("follow-sh", &workspace_root(), &[], &["sh", "-c", &script]);
    assert_eq!(traced.code, 5, "the command's exit code: {}", traced.stderr);
    let truths = truths_by_pid(&traced.stdout);
    assert_eq!(truths.len(), 3, "{}", traced.stdout);
    let processes = processes(&traced.report);
    let shell = &processes[0];
    assert_eq!(shell["pid"], traced.report["command"]["pid"]);
    assert_eq!(shell["status"], "skipped");
    assert_eq!(shell["reason"], "not a Go program");
    assert_eq!(shell["exit_code"], 5);
    assert!(shell["report"].is_null());
    let go: Vec<&Value> = processes.iter().filter(|p| p["status"] != "skipped").collect();
    assert_eq!(go.len(), 3, "the spawner and its 2 children: {processes:#?}");
    for process in go {
        assert_traced_from_start(process);
        let pid = process["pid"].as_u64().unwrap();
        let truth = truths.get(&pid).unwrap_or_else(|| panic!("no ground truth of pid {pid}"));
        let report = &process["report"];
        assert_eq!(report["counts"]["deferproc"], truth["heap_defers"], "pid {pid}: {report}");
        let expected_exit = if truth["role"] == "parent" { 3 } else { 0 };
        assert_eq!(process["exit_code"], expected_exit, "{process}");
        assert_eq!(report["target"]["exit_code"], expected_exit);
        match truth["role"].as_str() {
            Some("parent") => assert_eq!(process["ppid"], shell["pid"]),
            _ => {
                let parent = truths.values().find(|t| t["role"] == "parent").unwrap();
                assert_eq!(process["ppid"], parent["pid"]);
            }
        }
    }
    // The kernel's count: the shell forked the spawner, which forked its 2 children (and, from
    // Go 1.23 on, one short-lived process of its own that checks for CLONE_PIDFD support);
    // each exec'd a program.
    assert_eq!(traced.report["children"]["programs_executed"], 4);
    assert!(traced.report["children"]["processes_started"].as_u64().unwrap() >= 3);
}

/// Without `--follow`, the children a traced command starts are counted in the kernel and the
/// report says they were not traced; the command's own counts stay exact.
#[test]
fn without_follow_children_are_counted_and_not_traced() {
    require_root();
    let spawner = go_program("1.27.3", "spawner");
    let traced = trace_command("no-follow", &spawner, &["-children", "3", "-defers", "9"]);
    assert_eq!(traced.code, 0, "{}", traced.stderr);
    let truths = truths_by_pid(&traced.stdout);
    let parent = &truths[&traced.report["target"]["pid"].as_u64().unwrap()];
    assert_eq!(parent["children"], 3);
    assert_eq!(traced.report["counts"]["deferproc"], parent["heap_defers"]);
    let children = &traced.report["children"];
    assert_eq!(children["traced"], false);
    assert_eq!(children["programs_executed"], 3, "{children}");
    let started = children["processes_started"].as_u64().unwrap();
    assert!(started >= 3, "{children}");
    let note = format!(
        "the target started {started} processes (3 programs executed) that were not traced: run \
         --follow -- CMD traces the Go programs among them"
    );
    assert!(
        traced.report["notes"].as_array().unwrap().iter().any(|n| n == &Value::from(note.clone())),
        "no note {note:?} in {}",
        traced.report["notes"]
    );
    // A --pid target's children are counted the same way: none here.
    let mut workload = Workload::start(&go_program("1.27.3", "workload"), &[]);
    let report_file = report_path("no-follow-pid");
    let mut running = Running::spawn({
        let mut cmd = deferprobe();
        cmd.args(["run", "--pid", &workload.pid().to_string(), "--report"]).arg(&report_file);
        cmd
    });
    running.wait_for("probes attached");
    workload.work();
    workload.end();
    let (code, _, stderr) = running.finish();
    assert_eq!(code, 0, "{}", stderr.join("\n"));
    let report = read_json(&report_file);
    assert_eq!(report["children"]["processes_started"], 0, "{}", report["children"]);
    assert_eq!(report["children"]["programs_executed"], 0);
}

/// SIGUSR1 sent to deferprobe under `--follow` (which makes no interim reports) is passed on to
/// the command and stops nothing: the command handles it and runs on past `--kill-after`, and
/// the Go program it starts after that is traced exactly.
#[test]
fn sigusr1_is_passed_on_to_the_command() {
    require_root();
    let spawner = go_program("1.27.3", "spawner");
    let dir = workspace_root().join(format!("target/e2e/follow-usr1-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (ready, go_on) = (dir.join("ready"), dir.join("go-on"));
    let script = format!(
        "trap 'echo got-usr1' USR1; touch {}; while [ ! -e {} ]; do sleep 0.1; done; sleep 1.5; \
         {} -children 0 -defers 11; exit 4",
        ready.display(),
        go_on.display(),
        spawner.display()
    );
    let report_file = report_path("follow-usr1");
    let _ = std::fs::remove_file(&report_file);
    let mut running = Running::spawn({
        let mut cmd = deferprobe();
        cmd.args(["run", "--follow", "--kill-after", "1s", "--report"]).arg(&report_file);
        cmd.args(["--", "sh", "-c", &script]);
        cmd
    });
    // The shell's trap is set: SIGUSR1 no longer kills it.
    let waited = std::time::Instant::now();
    while !ready.exists() {
        assert!(waited.elapsed().as_secs() < 60, "the script never started");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(running.child.id() as i32, libc::SIGUSR1) };
    running.wait_for("signal passed on to the command");
    std::fs::write(&go_on, "").unwrap();
    let (code, stdout, stderr) = running.finish();
    let stderr = stderr.join("\n");
    assert_eq!(code, 4, "the command's own exit code, not a SIGKILL: {stderr}\n{stdout}");
    assert!(stdout.lines().any(|line| line == "got-usr1"), "{stdout}");
    let report = read_json(&report_file);
    assert_eq!(report["command"]["exit_code"], 4);
    assert_eq!(report["ended_by"], "target_exited", "{report}");
    let notes = report["notes"].as_array().unwrap();
    assert!(!notes.iter().any(|n| n.as_str().unwrap().contains("forwarded")), "{notes:?}");
    let truth = ground_truth_json(&stdout);
    let go: Vec<&Value> = processes(&report).iter().filter(|p| p["status"] != "skipped").collect();
    assert_eq!(go.len(), 1, "the spawner alone: {:#?}", processes(&report));
    assert_traced_from_start(go[0]);
    assert_eq!(go[0]["report"]["counts"]["deferproc"], truth["heap_defers"]);
    assert_eq!(truth["heap_defers"], 11);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--follow` needs a command to start.
#[test]
fn follow_needs_a_command() {
    let output = deferprobe().args(["run", "--follow", "--pid", "1"]).output().unwrap();
    let (_, stderr) = text(&output);
    assert_eq!(output.status.code(), Some(EXIT_USAGE), "{stderr}");
    assert!(stderr.starts_with("deferprobe: "), "{stderr}");
}
