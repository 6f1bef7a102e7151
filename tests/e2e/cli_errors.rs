//! Bad input gets one clear line on stderr and a documented exit code (README "Exit codes").

use crate::support::*;

pub(crate) fn assert_fails(args: &[&str], code: i32, message: &str) {
    let output = deferprobe().args(args).output().unwrap();
    let (stdout, stderr) = text(&output);
    assert_eq!(output.status.code(), Some(code), "{args:?}\n{stdout}\n{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line for {args:?}: {stderr}");
    assert!(stderr.starts_with("deferprobe: "), "{stderr}");
    assert!(stderr.contains(message), "{args:?}: {stderr:?} lacks {message:?}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn usage_errors_exit_64() {
    assert_fails(&["run"], EXIT_USAGE, "required arguments were not provided: <--pid <PID>|CMD>");
    assert_fails(&["run", "--pid", "0"], EXIT_USAGE, "pid 0 is not a process");
    assert_fails(&["run", "--pid", "1", "--duration", "soon"], EXIT_USAGE, "not a duration");
    assert_fails(&["run", "--pid", "1", "--interval", "0s"], EXIT_USAGE, "longer than zero");
    assert_fails(&["run", "--pid", "1", "--log-format", "xml"], EXIT_USAGE, "xml");
    assert_fails(&["run", "--pid", "1", "--frobnicate"], EXIT_USAGE, "--frobnicate");
    assert_fails(&["frobnicate"], EXIT_USAGE, "frobnicate");
    // A followed tree has no metrics or interim reports (yet).
    assert_fails(
        &["run", "--follow", "--metrics-addr", "127.0.0.1:0", "--", "true"],
        EXIT_USAGE,
        "'--follow' cannot be used with '--metrics-addr",
    );
    assert_fails(
        &["run", "--report-every", "1m", "--follow", "--", "true"],
        EXIT_USAGE,
        "'--report-every <D>' cannot be used with '--follow'",
    );
}

#[test]
fn target_errors_exit_65_or_66() {
    require_root();
    assert_fails(&["run", "--pid", "2147483646"], EXIT_NO_TARGET, "no process with pid 2147483646");
    // A process that isn't Go: this test binary's parent shell is not, but we know `sleep`.
    let mut sleeper = std::process::Command::new("sleep").arg("30").spawn().unwrap();
    assert_fails(&["run", "--pid", &sleeper.id().to_string()], EXIT_UNSUPPORTED, "not a Go binary");
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    assert_fails(&["run", "--", "/nonexistent/prog"], EXIT_NO_TARGET, "no such file");
    assert_fails(&["run", "--", "true"], EXIT_UNSUPPORTED, "not a Go binary");
    assert_fails(&["inspect", "/nonexistent/prog"], EXIT_NO_TARGET, "/nonexistent/prog");
    assert_fails(
        &["inspect", concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml")],
        EXIT_UNSUPPORTED,
        "not an ELF file",
    );
}

#[test]
fn inspect_prints_release_and_plan() {
    for release in go_releases() {
        let program = go_program(&release, "workload");
        let output = deferprobe().arg("inspect").arg(&program).output().unwrap();
        let (stdout, stderr) = text(&output);
        assert!(output.status.success(), "{stderr}");
        assert!(stdout.contains(&format!("go release   go{release}")), "{stdout}");
        // Made for an 80-column terminal; only a source path may make a line longer.
        for line in stdout.lines().filter(|line| !line.contains(".go:")) {
            assert!(line.chars().count() <= 80, "longer than 80 columns: {line:?}");
        }
        for symbol in [
            "deferproc probes sit on the functions' CALLs of runtime.deferproc",
            "runtime.deferreturn",
            "runtime.mapassign_faststr",
            "runtime.mallocgc",
            "runtime.goexit1",
            "runtime.fatalpanic",
        ] {
            assert!(stdout.contains(symbol), "{symbol} missing:\n{stdout}");
        }
        let output = deferprobe().args(["inspect", "--json"]).arg(&program).output().unwrap();
        let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        assert_eq!(json["plan"]["go_version"], format!("go{release}"));
        assert_eq!(json["main_package"], "deferprobe.test/programs/workload");
        let probes = json["plan"]["probes"].as_array().unwrap();
        // deferproc and deferreturn: on their CALLs in the loop-defer function, not at their
        // entries.
        for (program, callee) in
            [("defer_proc", "runtime.deferproc"), ("defer_return", "runtime.deferreturn")]
        {
            let calls: Vec<&serde_json::Value> =
                probes.iter().filter(|p| p["program"] == program).collect();
            assert!(calls.iter().any(|p| p["symbol"] == "main.loopDefers"), "{calls:?}");
            assert!(calls.iter().all(|p| p["call_to"] == callee), "{calls:?}");
            assert!(!probes.iter().any(|p| p["symbol"] == callee), "{probes:?}");
        }
        // The workload never reads its memory profile: the linker turned profiling off.
        assert_eq!(json["memory_profiling"]["state"], "disabled", "{}", json["memory_profiling"]);
        assert!(stdout.contains("mem profile  off"), "{stdout}");
    }
}

/// Without the capabilities to load tracing programs, deferprobe says so (exit 77), whether it
/// runs as an unprivileged user or as a root whose capabilities were dropped.
#[test]
fn missing_privileges_exit_77() {
    require_root();
    let mut workload = Workload::start(&go_program(&go_releases()[0], "workload"), &[]);
    let pid = workload.pid().to_string();
    for setpriv_args in [
        &["--reuid=65534", "--regid=65534", "--clear-groups"][..],
        &["--bounding-set=-sys_admin,-bpf,-perfmon", "--inh-caps=-all"][..],
    ] {
        let output = std::process::Command::new("setpriv")
            .args(setpriv_args)
            .arg(env!("CARGO_BIN_EXE_deferprobe"))
            .args(["run", "--pid", &pid])
            .output()
            .expect("setpriv (util-linux) is needed for this test");
        let (stdout, stderr) = text(&output);
        assert_eq!(
            output.status.code(),
            Some(EXIT_PERMISSION),
            "{setpriv_args:?}\n{stdout}\n{stderr}"
        );
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(
            stderr.contains("needs root, or the capabilities CAP_BPF and CAP_PERFMON"),
            "{stderr}"
        );
    }
    // The target was never touched.
    assert_eq!(workload.work().heap_defers, 520);
    workload.end();
}
