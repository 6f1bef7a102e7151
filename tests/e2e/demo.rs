//! The bundled demo service (what `./x demo` traces): the leaking batch pump shows up as a
//! site with pending defers, the per-request handler as a site whose defers are all released.

use std::{thread, time::Duration};

use crate::support::*;

#[test]
fn demo_leak_is_visible() {
    require_root();
    let release = &go_releases()[0];
    let mut service = std::process::Command::new(go_program(release, "demo")).spawn().unwrap();
    thread::sleep(Duration::from_millis(200));
    let report_file = report_path("demo");
    let output = deferprobe()
        .args(["run", "--pid", &service.id().to_string(), "--duration", "2s"])
        .args(ALL_PROBES_ON)
        .arg("--report")
        .arg(&report_file)
        .output()
        .unwrap();
    let _ = service.kill();
    let _ = service.wait();
    let (stdout, stderr) = text(&output);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    let report = read_json(&report_file);
    let sites = report["sites"].as_array().unwrap();
    let site = |function: &str| {
        sites
            .iter()
            .find(|s| s["function"] == function)
            .unwrap_or_else(|| panic!("no {function} site in {report}"))
    };
    // One batch every 20 ms for 2 s, none released.
    let pump = site("main.pumpBatches");
    assert!(pump["pending"].as_u64().unwrap() >= 40, "{pump}");
    assert_eq!(pump["released"], 0);
    assert_eq!(sites[0], *pump, "the leak is the top site");
    assert_eq!(pump["line"], source_line("tests/go/demo/main.go", "defer release(results)"));
    // The service ran 200 ms before deferprobe attached: those batches' records were found
    // pending in the runtime's _defer chain.
    let before = pump["pending_before_trace"].as_u64().unwrap();
    assert!(before >= 1, "{pump}");
    assert_eq!(pump["pending"].as_u64().unwrap(), before + pump["registered"].as_u64().unwrap());
    // The leak is a finding: one frame with every pending record; each record, registered
    // before or while traced, holds its batch's map of 16 entries (read from the closures).
    let finding = &report["findings"][0];
    assert_eq!(finding["function"], "main.pumpBatches");
    assert_eq!(finding["pending_defers"], pump["pending"]);
    assert_eq!(finding["pending_before_trace"], before);
    assert_eq!(finding["captured_maps"], pump["pending"]);
    assert_eq!(finding["captured_map_entries"], pump["pending"].as_u64().unwrap() * 16);
    // Some records are older than the trace: their age is unknown, not invented.
    assert!(finding["oldest_pending_secs"].is_null(), "{finding}");
    // Handlers: 3 defers per request, released on return (one may be mid-flight).
    let handler = site("main.handleRequest");
    assert!(handler["registered"].as_u64().unwrap() >= 30, "{handler}");
    assert!(handler["pending"].as_u64().unwrap() <= 3, "{handler}");
    assert_eq!(report["pending"]["goroutines"], 1 + handler["pending"].as_u64().unwrap().min(1));
    assert!(stdout.contains("main.pumpBatches"), "{stdout}");
}

/// 1-based number of the line of `path` (relative to the workspace) that contains `needle`.
fn source_line(path: &str, needle: &str) -> u64 {
    let text = std::fs::read_to_string(workspace_root().join(path)).unwrap();
    let index = text.lines().position(|line| line.contains(needle)).expect(needle);
    index as u64 + 1
}
