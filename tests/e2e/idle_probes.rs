//! Issue 13, "attach only what can matter": every return of a function with a heap defer site
//! calls runtime.deferreturn, registered or not. After 10 s of tracing, the functions that never
//! had a heap defer pending lose their deferreturn probes, and get them back at their next heap
//! defer; goroutine exits are probed for sure only while a heap defer is pending. Pending defers
//! stay exact (the runtime's state says what is pending).

use std::{thread, time::Duration};

use crate::support::*;

#[test]
fn idle_functions_lose_their_deferreturn_probes_and_get_them_back() {
    require_root();
    // 200,000 returns of loopDefers with nothing registered, then 10 goroutines that register
    // 2 heap defers each in it.
    let program = go_program(&go_releases()[0], "workload");
    let mut target =
        Workload::start(&program, &["-calls", "200000", "-defers", "0", "-goroutines", "10"]);
    let report_file = report_path("idle-probes");
    let mut cmd = deferprobe();
    cmd.args(["run", "--pid", &target.pid().to_string(), "--interval", "500ms", "--report"])
        .arg(&report_file)
        .args(ALL_PROBES_ON);
    let mut tracer = Running::spawn(cmd);
    tracer.wait_for("probes attached");
    let off = tracer.wait_for("deferreturn probes off in the functions that had no heap defer");
    assert!(off.contains("functions=1"), "{off}");
    // Links close on a thread of their own: the breakpoints go within milliseconds.
    thread::sleep(Duration::from_millis(300));
    let truth = target.work();
    assert_eq!((truth.heap_defers, truth.heap_defer_frame_returns), (20, 200_010));
    // Two snapshots release what the missed returns ran; a second later with nothing pending,
    // goroutine exits may be sampled again.
    tracer.wait_for("a heap defer is pending: goroutine exits are probed");
    tracer.wait_for("no heap defer pending for a second: goroutine exits may be sampled again");
    // SAFETY: signalling the deferprobe we started.
    unsafe { libc::kill(tracer.child.id() as i32, libc::SIGINT) };
    let (code, stdout, stderr) = tracer.finish();
    assert_eq!(code, 0, "{stdout}\n{}", stderr.join("\n"));
    let report = read_json(&report_file);
    let counts = &report["counts"];
    assert_eq!(counts["deferproc"], 20, "registrations stay exact: {report}");
    // The 200,000 idle returns cost no probe hit; at most the 10 goroutines' were seen.
    assert!(counts["deferreturn"].as_u64().unwrap() <= 10, "{report}");
    assert_eq!(report["pending"]["heap_defers"], 0, "{report}");
    let site =
        report["sites"].as_array().unwrap().iter().find(|s| s["function"] == "main.loopDefers");
    let site = site.unwrap_or_else(|| panic!("no loopDefers site: {report}"));
    assert_eq!((site["registered"].as_u64(), site["released"].as_u64()), (Some(20), Some(20)));
    let notes = report["notes"].to_string();
    assert!(
        notes.contains("deferreturn probes went off after 10s in 1 function that had")
            && notes.contains("1 got them back at a heap defer"),
        "{notes}"
    );
    target.end();
}
