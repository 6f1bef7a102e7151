//! A Go program in a pid and mount namespace of its own (a container), traced by its host pid:
//! its binary lives on a tmpfs mounted only in its mount namespace, so deferprobe can read it
//! only through /proc/PID/exe or /proc/PID/root. Counts stay exact, and the reports show the
//! program's path in its namespace and its pids there.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::support::*;

/// The workload, started by `unshare --pid --mount --fork` from a private tmpfs at `dir` (an
/// empty directory on the host), as pid 1 of its pid namespace. Returns it with its host pid.
fn contained_workload(dir: &Path) -> (Workload, u32) {
    let workload = go_program("1.27.3", "workload");
    let script = format!(
        "mount -t tmpfs deferprobe-e2e {dir} && cp {workload} {dir}/workload && exec \
         {dir}/workload -wait -hold",
        dir = dir.display(),
        workload = workload.display()
    );
    let unshare = ["--pid", "--mount", "--fork", "--propagation", "private", "sh", "-c", &script];
    assert!(
        std::process::Command::new("unshare").arg("--version").output().is_ok(),
        "this test needs util-linux's unshare"
    );
    let contained = Workload::start_with_args(Path::new("unshare"), &unshare);
    let unshare_pid = contained.pid();
    let children =
        std::fs::read_to_string(format!("/proc/{unshare_pid}/task/{unshare_pid}/children"))
            .expect("unshare's children");
    let pid: u32 = children.split_whitespace().next().expect("unshare forked").parse().unwrap();
    (contained, pid)
}

#[test]
fn go_program_in_its_own_pid_and_mount_namespace() {
    require_root();
    let dir: PathBuf = workspace_root().join(format!("target/e2e/ns-root-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (mut workload, pid) = contained_workload(&dir);
    let exe_inside = format!("{}/workload", dir.display());
    assert_eq!(std::fs::read_link(format!("/proc/{pid}/exe")).unwrap(), Path::new(&exe_inside));
    assert!(!Path::new(&exe_inside).exists(), "the tmpfs must not be visible from the host");
    let exe_from_host = format!("/proc/{pid}/root{exe_inside}");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(status.contains(&format!("NSpid:\t{pid}\t1\n")), "{status}");
    let check_namespace = |target: &Value| {
        assert_eq!(target["pid"], pid);
        assert_eq!(target["exe"], exe_inside.as_str());
        let namespace = &target["namespace"];
        assert_eq!(namespace["pids"], serde_json::json!([pid, 1]), "{target}");
        assert_eq!(namespace["own_pid_namespace"], true);
        assert_eq!(namespace["own_mount_namespace"], true);
        assert_eq!(namespace["exe_from_here"], exe_from_host.as_str());
    };

    // Reading paths: inspect through /proc/PID/root, snapshot by host pid.
    let (_, inspected) = inspect(Path::new(&exe_from_host));
    assert_eq!(inspected["plan"]["go_version"], "go1.27.3");
    let output =
        deferprobe().args(["snapshot", "--json", "--pid", &pid.to_string()]).output().unwrap();
    let (stdout, stderr) = text(&output);
    assert!(output.status.success(), "{stderr}");
    let snapshot: Value = serde_json::from_str(&stdout).unwrap();
    check_namespace(&snapshot["target"]);

    // run --pid with the host pid: exact counts.
    let report_file = report_path("containers");
    let mut running = Running::spawn({
        let mut cmd = deferprobe();
        cmd.args(["run", "--interval", "1s", "--pid", &pid.to_string()])
            .args(ALL_PROBES_ON)
            .arg("--report")
            .arg(&report_file);
        cmd
    });
    running.wait_for("probes attached");
    let truth = workload.work();
    workload.end();
    let (code, stdout, stderr) = running.finish();
    assert_eq!(code, 0, "{}", stderr.join("\n"));
    let report = read_json(&report_file);
    check_namespace(&report["target"]);
    assert_eq!(report["counts"]["deferproc"], truth.heap_defers, "{}", report["counts"]);
    assert_eq!(report["counts"]["deferreturn"], truth.heap_defer_frame_returns);
    assert!(
        stdout.contains(&format!("  namespace own pid and mount; pids {pid} / 1\n")),
        "{stdout}"
    );
    assert!(stdout.contains("  read at   "), "{stdout}");
    let _ = std::fs::remove_dir(&dir);
}
