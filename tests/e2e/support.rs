//! Shared plumbing for the end-to-end tests: the deferprobe binary, the Go programs built by
//! `cargo xtask go-programs`, and reading what both print. Missing prerequisites fail the test
//! with a message saying how to get them; nothing is skipped.

use std::{
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Output, Stdio},
    sync::mpsc,
    thread,
    time::Duration,
};

use serde::Deserialize;
use serde_json::Value;

/// deferprobe's own exit codes (README "Exit codes", sysexits.h).
pub const EXIT_USAGE: i32 = 64;
pub const EXIT_UNSUPPORTED: i32 = 65;
pub const EXIT_NO_TARGET: i32 = 66;
pub const EXIT_CANNOT_CREATE: i32 = 73;
pub const EXIT_OUTPUT: i32 = 74;
pub const EXIT_PERMISSION: i32 = 77;

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

/// The Go releases the programs are built with (tests/go/releases.txt), default first.
pub fn go_releases() -> Vec<String> {
    let path = workspace_root().join("tests/go/releases.txt");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect()
}

/// A Go test program built with `release`. Panics (fails the test) if it isn't built.
pub fn go_program(release: &str, name: &str) -> PathBuf {
    let path = workspace_root().join("target/go-programs").join(format!("go{release}")).join(name);
    assert!(
        path.exists(),
        "{} is missing: build the Go test programs with `cargo xtask go-programs` (or run `./x test`)",
        path.display()
    );
    path
}

/// eBPF tests need root; say so instead of failing obscurely (or passing vacuously).
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(euid, 0, "end-to-end tests load eBPF programs and must run as root");
}

/// `run` flags for tests that check exact allocation or map-write counts, or captured maps:
/// keep every probe attached, whatever this machine's calibrated cost per hit makes of the
/// default budget (the governor is tested on its own, in governor.rs).
pub const ALL_PROBES_ON: [&str; 2] = ["--max-overhead", "1000"];

pub fn deferprobe() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_deferprobe"));
    cmd.env_remove("DEFERPROBE_LOG");
    cmd
}

/// A fresh path for a JSON report.
pub fn report_path(test: &str) -> PathBuf {
    let dir = workspace_root().join("target/e2e");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(format!("{test}-{}.json", std::process::id()))
}

pub fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}\n{text}", path.display()))
}

/// What the workload program says it did (its own accounting).
#[derive(Debug, Deserialize)]
pub struct GroundTruth {
    pub heap_defers: u64,
    pub str_map_writes: u64,
    pub int_map_writes: u64,
    pub goroutines_ended: u64,
    /// Only the workload reports it (0 for the other programs).
    #[serde(default)]
    pub heap_defer_frame_returns: u64,
    pub mallocs: u64,
    pub go_version: String,
}

/// Finds the workload's ground-truth JSON line in `stdout`.
pub fn ground_truth(stdout: &str) -> GroundTruth {
    serde_json::from_value(ground_truth_json(stdout)).unwrap()
}

/// The ground-truth JSON line of any test program (the [`GroundTruth`] keys, plus whatever
/// else that program reports) in `stdout`.
pub fn ground_truth_json(stdout: &str) -> Value {
    let line = stdout
        .lines()
        .find(|l| l.starts_with("{\"heap_defers\""))
        .unwrap_or_else(|| panic!("no ground truth line in:\n{stdout}"));
    serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"))
}

/// What `deferprobe run --report FILE -- PROGRAM ARGS…` did.
pub struct Traced {
    /// deferprobe's exit code: the program's, when tracing worked.
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
    /// The JSON report.
    pub report: Value,
}

impl Traced {
    /// `counts.<key>` of the report.
    pub fn count(&self, key: &str) -> u64 {
        self.report["counts"][key]
            .as_u64()
            .unwrap_or_else(|| panic!("no counts.{key} in {}", self.report))
    }
}

/// Traces `program` from its first instruction with `run -- CMD`. Panics, with deferprobe's
/// output, if it wrote no report (it could not trace the program).
pub fn trace_command(name: &str, program: &Path, args: &[&str]) -> Traced {
    trace_command_with(name, &[], program, args)
}

/// [`trace_command`] with more `deferprobe run` flags.
pub fn trace_command_with(name: &str, flags: &[&str], program: &Path, args: &[&str]) -> Traced {
    let mut command: Vec<&str> = vec![program.to_str().expect("UTF-8 path")];
    command.extend(args);
    trace_in(name, deferprobe(), flags, &command)
}

/// `deferprobe run --interval 1s FLAGS --report FILE -- COMMAND…` (FLAGS may set another
/// `--interval`), with `deferprobe`'s environment and directory. Panics, with deferprobe's
/// output, if it wrote no report.
pub fn trace_in(name: &str, mut deferprobe: Command, flags: &[&str], command: &[&str]) -> Traced {
    let report_file = report_path(name);
    let _ = std::fs::remove_file(&report_file);
    let interval: &[&str] = match flags.contains(&"--interval") {
        true => &[],
        false => &["--interval", "1s"],
    };
    let output = deferprobe
        .arg("run")
        .args(interval)
        .args(ALL_PROBES_ON)
        .args(flags)
        .arg("--report")
        .arg(&report_file)
        .arg("--")
        .args(command)
        .output()
        .expect("start deferprobe");
    let (stdout, stderr) = text(&output);
    let code = output.status.code().expect("deferprobe killed by a signal");
    assert!(
        report_file.exists(),
        "deferprobe run {flags:?} -- {command:?} exited with {code} and wrote no report:\n\
         {stderr}{stdout}"
    );
    Traced { code, stdout, stderr, report: read_json(&report_file) }
}

/// `deferprobe inspect BINARY` and `inspect --json BINARY`: (text, JSON). Panics with
/// deferprobe's error if either fails.
pub fn inspect(binary: &Path) -> (String, Value) {
    let run = |json: bool| {
        let mut cmd = deferprobe();
        cmd.arg("inspect");
        if json {
            cmd.arg("--json");
        }
        let output = cmd.arg(binary).output().expect("start deferprobe");
        let (stdout, stderr) = text(&output);
        assert!(
            output.status.success(),
            "deferprobe inspect {} failed ({}): {stderr}",
            binary.display(),
            output.status
        );
        stdout
    };
    let json = run(true);
    let json =
        serde_json::from_str(&json).unwrap_or_else(|e| panic!("inspect --json: {e}\n{json}"));
    (run(false), json)
}

pub fn text(output: &Output) -> (String, String) {
    (String::from_utf8_lossy(&output.stdout).into(), String::from_utf8_lossy(&output.stderr).into())
}

/// A deferprobe process whose stderr lines arrive on a channel, so a test can wait for
/// "probes attached" before letting the target work.
pub struct Running {
    pub child: Child,
    lines: mpsc::Receiver<String>,
    pub stderr: Vec<String>,
}

impl Running {
    pub fn spawn(mut cmd: Command) -> Running {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start deferprobe");
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Running { child, lines, stderr: Vec::new() }
    }

    /// Waits (up to 60 s) for a stderr line containing `needle`; panics with what was seen.
    pub fn wait_for(&mut self, needle: &str) -> String {
        loop {
            match self.lines.recv_timeout(Duration::from_secs(60)) {
                Ok(line) => {
                    self.stderr.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(_) => {
                    panic!("no stderr line with {needle:?}; got:\n{}", self.stderr.join("\n"))
                }
            }
        }
    }

    /// Waits for exit; returns (exit code, stdout, all stderr lines).
    pub fn finish(self) -> (i32, String, Vec<String>) {
        let (code, stdout, stderr, _) = self.finish_with_peak_rss();
        (code, stdout, stderr)
    }

    /// Like [`Running::finish`], plus deferprobe's peak resident memory in KiB.
    pub fn finish_with_peak_rss(mut self) -> (i32, String, Vec<String>, u64) {
        let mut stdout = String::new();
        std::io::Read::read_to_string(self.child.stdout.as_mut().unwrap(), &mut stdout).unwrap();
        let mut status = 0;
        // SAFETY: reaping our own child; rusage is plain data the kernel fills.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        let reaped = unsafe { libc::wait4(self.child.id() as i32, &mut status, 0, &mut usage) };
        assert_eq!(reaped, self.child.id() as i32, "wait4 deferprobe");
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(5)) {
            self.stderr.push(line);
        }
        assert!(
            libc::WIFEXITED(status),
            "deferprobe killed by a signal: {}",
            self.stderr.join("\n")
        );
        (libc::WEXITSTATUS(status), stdout, self.stderr, usage.ru_maxrss as u64)
    }
}

/// A Go test program started with -wait (and, for the workload, -hold): it prints "ready",
/// works when told, prints its ground truth as one JSON line, and exits when its stdin closes.
pub struct Workload {
    pub child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<std::process::ChildStdout>,
}

impl Workload {
    /// The workload program, with -wait -hold and `args`.
    pub fn start(program: &Path, args: &[&str]) -> Workload {
        let args: Vec<&str> = ["-wait", "-hold"].iter().chain(args).copied().collect();
        Self::start_with_args(program, &args)
    }

    /// Any test program that speaks the ready/go protocol, with exactly `args`.
    pub fn start_with_args(program: &Path, args: &[&str]) -> Workload {
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start workload");
        let stdin = child.stdin.take();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        assert_eq!(line, "ready\n");
        Workload { child, stdin, stdout }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Lets the workload work; returns its ground truth.
    pub fn work(&mut self) -> GroundTruth {
        serde_json::from_value(self.work_json()).expect("workload ground truth")
    }

    /// Lets it work, without waiting for what it prints.
    pub fn go(&mut self) {
        self.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    }

    /// Lets it work; returns the JSON line it prints when done.
    pub fn work_json(&mut self) -> Value {
        self.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
    }

    /// Sends `line` (a command of a program with more than "go", e.g. tests/go/cshared's
    /// host) and returns the JSON line it prints in answer.
    pub fn command_json(&mut self, line: &str) -> Value {
        self.send(line);
        let mut answer = String::new();
        self.stdout.read_line(&mut answer).unwrap();
        serde_json::from_str(&answer).unwrap_or_else(|e| panic!("{line}: {e}: {answer:?}"))
    }

    /// Sends `line`, without waiting for an answer.
    pub fn send(&mut self, line: &str) {
        writeln!(self.stdin.as_mut().unwrap(), "{line}").unwrap();
    }

    /// Closes its stdin (it exits) and reaps it.
    pub fn end(mut self) {
        drop(self.stdin.take());
        let status = self.child.wait().unwrap();
        assert!(status.success(), "workload failed: {status}");
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The JSON log lines among `stderr` whose message is `message`.
pub fn json_logs(stderr: &[String], message: &str) -> Vec<Value> {
    stderr
        .iter()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|v| v["message"] == message)
        .collect()
}
