//! Issue 15: every way a run can end or fail gives a report or a clear error, never a hang,
//! never a wrong exit code (README "How it ends" and "Exit codes"). Each case checks the
//! message, the exit code, the report and the target's state afterwards.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::support::*;

fn workload() -> PathBuf {
    go_program(&go_releases()[0], "workload")
}

/// Whether `pid` is still a live process (not gone, not a zombie).
fn alive(pid: u32) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    let state = stat.rsplit_once(')').map_or("", |(_, rest)| rest).split_whitespace().next();
    !matches!(state, Some("Z" | "X") | None)
}

/// Waits up to `timeout` for `pid` to be gone or a zombie.
fn dies_within(pid: u32, timeout: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if !alive(pid) {
            return true;
        }
        thread::sleep(Duration::from_millis(20));
    }
    false
}

/// The `pid=N` field of a text log line.
fn pid_field(line: &str) -> u32 {
    line.split_whitespace()
        .find_map(|field| field.strip_prefix("pid="))
        .and_then(|pid| pid.parse().ok())
        .unwrap_or_else(|| panic!("no pid= in {line:?}"))
}

fn notes(report: &Value) -> String {
    report["notes"].to_string()
}

fn signal(pid: u32, signal: i32) {
    // SAFETY: plain kill(2).
    unsafe { libc::kill(pid as i32, signal) };
}

/// `run -- CMD` with `flags`, started; returns it once its probes are attached, with the
/// command's pid.
fn start_command(name: &str, flags: &[&str], args: &[&str]) -> (Running, u32, PathBuf) {
    let report_file = report_path(name);
    let mut cmd = deferprobe();
    cmd.args(["run", "--interval", "100ms"])
        .args(flags)
        .arg("--report")
        .arg(&report_file)
        .arg("--")
        .arg(workload())
        .args(args);
    let mut tracer = Running::spawn(cmd);
    let attached = tracer.wait_for("probes attached");
    (tracer, pid_field(&attached), report_file)
}

/// --duration with `-- CMD`: tracing ends on time, deferprobe stops the command (SIGTERM),
/// writes the report with the command's end, and exits 0. Before, it waited for the command.
#[test]
fn duration_with_a_command_stops_it_and_reports() {
    require_root();
    let started = Instant::now();
    let (tracer, child, report_file) = start_command(
        "endings-duration-command",
        &["--duration", "700ms"],
        &["-calls", "4", "-defers", "5", "-goroutines", "0", "-linger", "60s"],
    );
    let (code, stdout, stderr) = tracer.finish();
    assert!(started.elapsed() < Duration::from_secs(20), "took {:?}", started.elapsed());
    assert_eq!(code, 0, "{stdout}\n{}", stderr.join("\n"));
    assert!(!alive(child), "the command outlived deferprobe");
    let report = read_json(&report_file);
    assert_eq!(report["ended_by"], "duration", "{report}");
    assert_eq!(report["target"]["exit_code"], 128 + libc::SIGTERM, "{report}");
    assert_eq!(report["counts"]["deferproc"], 20, "{report}");
    assert!(
        notes(&report).contains(
            "--duration ended tracing, and deferprobe then sent the command SIGTERM; the \
             command ended with exit code 143"
        ),
        "{}",
        notes(&report)
    );
    assert!(stderr.iter().any(|l| l.contains("SIGTERM sent to the command")), "{stderr:?}");
}

/// A command that ignores SIGTERM and SIGINT: a forwarded signal gives it `--kill-after` to
/// exit, then SIGKILL; a second signal sends SIGKILL at once. The report is written and says so.
#[test]
fn a_command_that_ignores_signals_is_killed() {
    require_root();
    let args =
        ["-calls", "2", "-defers", "3", "-goroutines", "0", "-ignore-signals", "-linger", "60s"];
    // One SIGTERM: SIGKILL when --kill-after ends.
    let (tracer, child, report_file) =
        start_command("endings-kill-after", &["--kill-after", "500ms"], &args);
    thread::sleep(Duration::from_millis(300));
    let sent = Instant::now();
    signal(tracer.child.id(), libc::SIGTERM);
    let (code, stdout, stderr) = tracer.finish();
    let took = sent.elapsed();
    assert_eq!(code, 128 + libc::SIGKILL, "{stdout}\n{}", stderr.join("\n"));
    assert!((Duration::from_millis(450)..Duration::from_secs(10)).contains(&took), "{took:?}");
    assert!(!alive(child));
    let report = read_json(&report_file);
    assert_eq!(report["target"]["exit_code"], 128 + libc::SIGKILL);
    assert_eq!(report["counts"]["deferproc"], 6, "{report}");
    assert!(
        notes(&report).contains(
            "deferprobe received SIGTERM and forwarded it to the command; it was still running \
             after --kill-after 500ms, so deferprobe killed it (SIGKILL)"
        ),
        "{}",
        notes(&report)
    );

    // Two SIGINTs: SIGKILL at the second, long before --kill-after.
    let (tracer, child, report_file) = start_command("endings-second-signal", &[], &args);
    thread::sleep(Duration::from_millis(300));
    let sent = Instant::now();
    signal(tracer.child.id(), libc::SIGINT);
    thread::sleep(Duration::from_millis(200));
    signal(tracer.child.id(), libc::SIGINT);
    let (code, _, stderr) = tracer.finish();
    assert_eq!(code, 128 + libc::SIGKILL, "{}", stderr.join("\n"));
    assert!(sent.elapsed() < Duration::from_secs(5), "{:?}", sent.elapsed());
    assert!(!alive(child));
    let report = read_json(&report_file);
    assert!(notes(&report).contains("a second signal (SIGINT) arrived"), "{}", notes(&report));
}

/// A stopped command (SIGSTOP) still gets the forwarded signal: deferprobe sends SIGCONT with
/// it, instead of waiting forever.
#[test]
fn a_stopped_command_gets_the_forwarded_signal() {
    require_root();
    let (tracer, child, report_file) = start_command(
        "endings-stopped",
        &[],
        &["-calls", "2", "-defers", "3", "-goroutines", "0", "-linger", "60s"],
    );
    thread::sleep(Duration::from_millis(300));
    signal(child, libc::SIGSTOP);
    thread::sleep(Duration::from_millis(200));
    signal(tracer.child.id(), libc::SIGTERM);
    let (code, stdout, stderr) = tracer.finish();
    assert_eq!(code, 128 + libc::SIGTERM, "{stdout}\n{}", stderr.join("\n"));
    let report = read_json(&report_file);
    assert_eq!(report["ended_by"], "target_exited");
    assert_eq!(report["counts"]["deferproc"], 6, "{report}");
}

/// deferprobe SIGKILLed while tracing a command: the command dies with it, not orphaned and
/// untraced.
#[test]
fn the_command_dies_with_deferprobe() {
    require_root();
    let (mut tracer, child, _) = start_command(
        "endings-sigkill",
        &[],
        &["-calls", "2", "-defers", "3", "-goroutines", "0", "-linger", "60s"],
    );
    assert!(alive(child));
    tracer.child.kill().unwrap();
    tracer.child.wait().unwrap();
    assert!(dies_within(child, Duration::from_secs(5)), "pid {child} outlived deferprobe");
}

/// `--pid` on a target that exits before the first interval: the records pending at attach
/// are reported (from the snapshot at attach), with the target's exit.
#[test]
fn pid_target_exiting_before_the_first_interval_keeps_what_was_pending() {
    require_root();
    let program = go_program(&go_releases()[0], "pending");
    let mut target = Workload::start_with_args(&program, &["-wait", "-n", "20"]);
    let truth = target.work_json();
    let expected = truth["pending_defers"].as_u64().unwrap();
    assert!(expected >= 20, "{truth}");
    let report_file = report_path("endings-exit-before-interval");
    let mut cmd = deferprobe();
    cmd.args(["run", "--pid", &target.pid().to_string(), "--interval", "1h", "--report"])
        .arg(&report_file);
    let mut tracer = Running::spawn(cmd);
    tracer.wait_for("probes attached");
    target.end();
    let (code, stdout, stderr) = tracer.finish();
    assert_eq!(code, 0, "{stdout}\n{}", stderr.join("\n"));
    let report = read_json(&report_file);
    assert_eq!(report["ended_by"], "target_exited", "{report}");
    assert_eq!(report["pending"]["heap_defers"], expected, "{report}");
}

/// A target that exits while deferprobe attaches: over 30 runs against programs living
/// 0–145 ms, each run either reports the target's exit (exit 0) or, when it was gone before
/// anything was attached, says so (exit 66). Never an internal error.
#[test]
fn a_target_exiting_during_attach_is_target_exited() {
    require_root();
    let program = go_program(&go_releases()[0], "stress");
    let (mut reports, mut gone) = (0, 0);
    for run in 0..30u32 {
        let linger = format!("{}ms", run * 5);
        let mut target = Command::new(&program)
            .args(["-goroutines", "2", "-depth", "4", "-linger", &linger])
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let pid = target.id();
        // Reaped as soon as it exits, as a real parent would.
        let reaper = thread::spawn(move || target.wait().unwrap());
        let report_file = report_path(&format!("endings-attach-race-{run}"));
        let _ = fs::remove_file(&report_file);
        let output = deferprobe()
            .args(["run", "--pid", &pid.to_string(), "--report"])
            .arg(&report_file)
            .output()
            .unwrap();
        let (stdout, stderr) = text(&output);
        reaper.join().unwrap();
        match output.status.code() {
            Some(0) => {
                let report = read_json(&report_file);
                assert_eq!(report["ended_by"], "target_exited", "run {run}: {report}");
                reports += 1;
            }
            Some(EXIT_NO_TARGET) => {
                assert_eq!(stderr.lines().count(), 1, "run {run}: {stderr}");
                assert!(
                    stderr.contains(&format!("pid {pid} exited"))
                        || stderr.contains(&format!("pid {pid} has exited (a zombie"))
                        || stderr.contains(&format!("no process with pid {pid}")),
                    "run {run}: {stderr}"
                );
                assert!(!report_file.exists());
                gone += 1;
            }
            code => panic!("run {run} (linger {linger}): exit {code:?}\n{stdout}\n{stderr}"),
        }
    }
    eprintln!("attach race: {reports} reports, {gone} gone before attach");
    assert!(reports > 0, "no run attached before the target exited");
}

/// A thread id given as --pid resolves to its process, and the report says so.
#[test]
fn a_thread_id_resolves_to_its_process() {
    require_root();
    let mut target = Workload::start(&workload(), &["-calls", "2", "-defers", "3"]);
    let pid = target.pid();
    let thread = fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .find(|tid| *tid != pid)
        .expect("a Go program has more than one thread");
    let report_file = report_path("endings-thread");
    let mut cmd = deferprobe();
    cmd.args(["run", "--pid", &thread.to_string(), "--duration", "3s", "--report"])
        .arg(&report_file);
    let mut tracer = Running::spawn(cmd);
    tracer.wait_for("probes attached");
    let truth = target.work();
    let (code, _, stderr) = tracer.finish();
    assert_eq!(code, 0, "{}", stderr.join("\n"));
    let report = read_json(&report_file);
    assert_eq!(report["target"]["pid"], pid);
    assert_eq!(report["counts"]["deferproc"], truth.heap_defers, "{report}");
    assert!(
        notes(&report).contains(&format!("--pid {thread} is a thread of process {pid}")),
        "{}",
        notes(&report)
    );
    target.end();
}

/// stdout on a full device, or a closed pipe: the JSON report is still written, and the error
/// names stdout (exit 74), never a panic.
#[test]
fn a_failing_stdout_still_writes_the_report_file() {
    require_root();
    for stdout in ["full", "closed pipe"] {
        let mut target = Workload::start(&workload(), &["-calls", "2", "-defers", "3"]);
        let truth = target.work();
        let report_file = report_path(&format!("endings-stdout-{}", stdout.replace(' ', "-")));
        let mut cmd = deferprobe();
        cmd.args(["run", "--pid", &target.pid().to_string(), "--duration", "300ms", "--report"])
            .arg(&report_file)
            .stderr(Stdio::piped());
        let output = match stdout {
            "full" => cmd.stdout(fs::File::create("/dev/full").unwrap()).output().unwrap(),
            _ => {
                let mut child = cmd.stdout(Stdio::piped()).spawn().unwrap();
                drop(child.stdout.take());
                child.wait_with_output().unwrap()
            }
        };
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(EXIT_OUTPUT), "{stdout}: {stderr}");
        let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("deferprobe: ")).collect();
        assert_eq!(errors.len(), 1, "{stdout}: {stderr}");
        assert!(errors[0].contains("writing the report to stdout"), "{stdout}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        let report = read_json(&report_file);
        assert_eq!(report["ended_by"], "duration");
        assert!(report["counts"]["deferproc"].is_u64(), "{report}");
        assert!(truth.heap_defers > 0);
        target.end();
    }
}

/// A tmpfs of its own, mounted for one test (unmounted on drop).
struct Mount {
    dir: PathBuf,
}

impl Mount {
    fn tmpfs(name: &str, options: &str) -> Mount {
        let dir =
            workspace_root().join("target/e2e").join(format!("{name}-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, "tmpfs"])
            .arg(&dir)
            .status()
            .expect("mount(8) is needed for this test");
        assert!(status.success(), "mount -t tmpfs -o {options} {}", dir.display());
        Mount { dir }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dir).status();
        let _ = fs::remove_dir(&self.dir);
    }
}

/// A --report that can't be created is refused before anything is attached (exit 73); one
/// that fails to be written (a full filesystem) is an error naming it (exit 74) that leaves no
/// partial file, and the text report still reaches stdout.
#[test]
fn report_file_problems() {
    require_root();
    let mut target = Workload::start(&workload(), &["-calls", "2", "-defers", "3"]);
    let pid = target.pid().to_string();
    let read_only = Mount::tmpfs("endings-ro", "ro,size=64k");
    let scratch = report_path("endings-report-dir");
    fs::create_dir_all(&scratch).unwrap();
    for (path, message) in [
        (scratch.clone(), "is a directory".to_owned()),
        (
            scratch.join("missing/r.json"),
            format!("no directory {}", scratch.join("missing").display()),
        ),
        (read_only.dir.join("r.json"), "Read-only file system".to_owned()),
    ] {
        let output =
            deferprobe().args(["run", "--pid", &pid, "--report"]).arg(&path).output().unwrap();
        let (stdout, stderr) = text(&output);
        assert_eq!(output.status.code(), Some(EXIT_CANNOT_CREATE), "{stdout}{stderr}");
        assert_eq!(stderr.lines().count(), 1, "nothing attached, one line: {stderr}");
        assert!(stderr.contains(&format!("--report {}", path.display())), "{stderr}");
        assert!(stderr.contains(&message), "{stderr} lacks {message}");
    }
    fs::remove_dir(&scratch).unwrap();

    let full = Mount::tmpfs("endings-full", "size=16k");
    let filler = fs::write(full.dir.join("filler"), vec![0u8; 64 * 1024]);
    assert!(filler.is_err(), "the tmpfs should be full");
    let report_file = full.dir.join("r.json");
    let output = deferprobe()
        .args(["run", "--pid", &pid, "--duration", "300ms", "--report"])
        .arg(&report_file)
        .output()
        .unwrap();
    let (stdout, stderr) = text(&output);
    assert_eq!(output.status.code(), Some(EXIT_OUTPUT), "{stdout}{stderr}");
    let error = stderr.lines().last().unwrap();
    assert!(
        error.starts_with(&format!(
            "deferprobe: error: --report {}: writing failed:",
            report_file.display()
        )) && error.contains("No space left on device"),
        "{stderr}"
    );
    assert!(stdout.contains("duration reached"), "the text report still printed: {stdout}");
    let left: Vec<_> = fs::read_dir(&full.dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left, ["filler"], "no partial report left");
    drop(full);
    target.work();
    target.end();
}

/// Missing privileges are named: root without CAP_SYS_PTRACE on another user's process, and an
/// unprivileged user with CAP_BPF + CAP_PERFMON on root's process (exit 77).
#[test]
fn missing_ptrace_capability_is_named() {
    require_root();
    let program = workload();
    // The target runs as nobody; deferprobe as root without CAP_SYS_PTRACE.
    let mut nobody = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&program)
        .args(["-wait", "-hold"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("setpriv (util-linux) is needed for this test");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(nobody.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line, "ready\n");
    let root_target = Workload::start(&program, &[]);
    for (setpriv, pid, message) in [
        (
            &["--bounding-set=-sys_ptrace", "--inh-caps=-sys_ptrace"][..],
            nobody.id(),
            "deferprobe runs as root but without CAP_SYS_PTRACE",
        ),
        (
            &[
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "--inh-caps=+bpf,+perfmon",
                "--ambient-caps=+bpf,+perfmon",
            ][..],
            root_target.pid(),
            "run deferprobe as root, or grant it CAP_SYS_PTRACE",
        ),
    ] {
        for command in ["run", "snapshot"] {
            let output = Command::new("setpriv")
                .args(setpriv)
                .arg(env!("CARGO_BIN_EXE_deferprobe"))
                .args([command, "--pid", &pid.to_string()])
                .output()
                .unwrap();
            let (stdout, stderr) = text(&output);
            assert_eq!(
                output.status.code(),
                Some(EXIT_PERMISSION),
                "{command} {setpriv:?}\n{stdout}\n{stderr}"
            );
            assert_eq!(stderr.lines().count(), 1, "{stderr}");
            assert!(stderr.contains(message), "{command} {setpriv:?}: {stderr}");
        }
    }
    let _ = nobody.kill();
    let _ = nobody.wait();
    drop(root_target);
}

/// deferprobe's own errors and a traced command's exit codes don't collide: the command's 2
/// and 3 pass through as they are; deferprobe's usage and target errors are 64 and 65.
#[test]
fn a_commands_exit_codes_stay_apart_from_deferprobes() {
    require_root();
    for code in [1, 2, 3, 63] {
        let traced = trace_command(
            &format!("endings-code-{code}"),
            &workload(),
            &["-calls", "1", "-defers", "2", "-goroutines", "0", "-exit-code", &code.to_string()],
        );
        assert_eq!(traced.code, code, "{}", traced.stderr);
        assert_eq!(traced.report["target"]["exit_code"], code);
    }
    let output = deferprobe().args(["run", "--bogus", "--", "x"]).output().unwrap();
    assert_eq!(output.status.code(), Some(EXIT_USAGE));
    let output = deferprobe().args(["run", "--", "true"]).output().unwrap();
    assert_eq!(output.status.code(), Some(EXIT_UNSUPPORTED));
    assert!(Path::new("/bin/true").exists() || Path::new("/usr/bin/true").exists());
}
