//! Issue 14, pprof export: `--pprof FILE` profiles of `snapshot` and `run`, read by Go 1.27's
//! own `go tool pprof` (`-raw`, `-top`). The `callpaths` program holds heap defers at one site,
//! main.accumulate, reached by three call paths (two parked goroutines, one blocked in a
//! syscall) and prints its ground truth: the exact records per goroutine and the callers of
//! main.accumulate. The profiles must show those counts per site and per goroutine, and each
//! sample's stack must lead from main.accumulate (the leaf) out through its real callers.

use std::{collections::BTreeMap, path::Path, process::Command};

use serde_json::Value;

use crate::support::*;

/// Records per holder: (orders, users, syscall).
const HELD: [&str; 6] = ["-orders", "30", "-users", "12", "-syscall", "5"];

/// `go tool pprof ARGS FILE` of Go 1.27, which must be installed.
fn pprof_tool(args: &[&str], profile: &Path) -> String {
    let go = workspace_root().join("target/go/1.27.3/go/bin/go");
    assert!(go.exists(), "{} is missing: install it with `cargo xtask setup`", go.display());
    let output = Command::new(&go)
        .args(["tool", "pprof"])
        .args(args)
        .arg(profile)
        .env("GOTOOLCHAIN", "local")
        .env("PPROF_TMPDIR", workspace_root().join("target/e2e"))
        .output()
        .unwrap();
    let (stdout, stderr) = text(&output);
    assert!(output.status.success(), "go tool pprof {args:?}: {stderr}");
    stdout
}

/// One sample of `pprof -raw`: its values, its stack as function names (leaf first) with the
/// leaf's line, and its labels.
#[derive(Debug)]
struct RawSample {
    values: Vec<i64>,
    functions: Vec<String>,
    leaf_line: u32,
    /// Each label's values as `-raw` prints them (space-separated).
    labels: BTreeMap<String, String>,
}

/// The labels deferprobe writes.
const LABELS: [&str; 4] = ["goroutine", "capture_kind", "captured_type", "stack"];

/// The samples of `pprof -raw` output.
fn raw_samples(raw: &str) -> Vec<RawSample> {
    // A section runs from its title to the next line starting with a capital.
    let section = |title: &str| -> Vec<&str> {
        let mut lines = raw.lines().skip_while(|line| *line != title);
        assert!(lines.next().is_some(), "no {title} in:\n{raw}");
        lines.take_while(|line| !line.starts_with(|c: char| c.is_ascii_uppercase())).collect()
    };
    // "     1: 0x525e7b M=1 main.accumulate /src/main.go:89:0 s=0"
    let mut locations: BTreeMap<u64, (String, u32)> = BTreeMap::new();
    for line in section("Locations") {
        let words: Vec<&str> = line.split_whitespace().collect();
        let Some(id) = words.first().and_then(|w| w.strip_suffix(':')) else { continue };
        let line_number = words
            .get(4)
            .and_then(|place| place.rsplit(':').nth(1))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        let function = words.get(3).map_or("?", |w| w).to_owned();
        locations.insert(id.parse().unwrap(), (function, line_number));
    }
    let lines = section("Samples:");
    let mut samples: Vec<RawSample> = Vec::new();
    for line in &lines[1..] {
        if let Some((values, stack)) = line.split_once(':')
            && !line.trim_start().starts_with(|c: char| c.is_alphabetic())
        {
            let values = values.split_whitespace().map(|v| v.parse().unwrap()).collect();
            let ids: Vec<u64> = stack.split_whitespace().map(|id| id.parse().unwrap()).collect();
            let named: Vec<&(String, u32)> = ids.iter().map(|id| &locations[id]).collect();
            samples.push(RawSample {
                values,
                functions: named.iter().map(|(function, _)| function.clone()).collect(),
                leaf_line: named.first().map_or(0, |(_, line)| *line),
                labels: BTreeMap::new(),
            });
            continue;
        }
        // "   capture_kind:[map] goroutine:[21] stack:[goroutine stack from frame pointers]":
        // values hold spaces and brackets, so each runs to the next label deferprobe writes.
        let sample = samples.last_mut().expect("labels before a sample");
        let mut starts: Vec<(usize, &str)> = LABELS
            .iter()
            .filter_map(|key| line.find(&format!("{key}:[")).map(|at| (at, *key)))
            .collect();
        starts.sort();
        for (index, &(at, key)) in starts.iter().enumerate() {
            let end = starts.get(index + 1).map_or(line.len(), |next| next.0);
            let value = line[at + key.len() + 2..end].trim_end().strip_suffix(']').unwrap();
            sample.labels.insert(key.to_owned(), value.to_owned());
        }
    }
    samples
}

/// The `flat` and `cum` of `function` in `pprof -top` output.
fn top_row(top: &str, function: &str) -> (i64, i64) {
    let row = top
        .lines()
        .find(|line| line.split_whitespace().last() == Some(function))
        .unwrap_or_else(|| panic!("no {function} in -top:\n{top}"));
    let cells: Vec<&str> = row.split_whitespace().collect();
    (cells[0].parse().unwrap(), cells[3].parse().unwrap())
}

/// The goroutine's sample with `pending_defers` records.
fn sample_of<'a>(samples: &'a [RawSample], goid: &Value) -> &'a RawSample {
    let goid = goid.as_u64().unwrap().to_string();
    let mut of = samples.iter().filter(|s| s.labels.get("goroutine") == Some(&goid));
    let sample = of.next().unwrap_or_else(|| panic!("no sample of goroutine {goid}: {samples:#?}"));
    assert!(of.next().is_none(), "goroutine {goid} has more than one sample: {samples:#?}");
    sample
}

/// Whether `callers` appear in `stack` in this order right above its leaf.
fn leads_through(stack: &[String], callers: &[Value]) -> bool {
    let callers: Vec<&str> = callers.iter().map(|c| c.as_str().unwrap()).collect();
    stack.len() > callers.len() && stack[1..=callers.len()] == callers
}

/// Every holder of the truth against the profile at `profile`: its exact count and where its
/// stack leads, and the site's total in `-top`; `release` says whether a syscall's stack can be
/// read (Go 1.23+).
fn check_profile(profile: &Path, truth: &Value, minor: u32, what: &str) -> Vec<RawSample> {
    let samples = raw_samples(&pprof_tool(&["-raw"], profile));
    let total = truth["pending_defers"].as_i64().unwrap();
    for holder in truth["holders"].as_array().unwrap() {
        let sample = sample_of(&samples, &holder["goid"]);
        let path = holder["path"].as_str().unwrap();
        assert_eq!(sample.values[0], holder["pending"].as_i64().unwrap(), "{what} {path}");
        assert!(sample.values[1] > 0, "{what} {path}: retained_space");
        assert_eq!(sample.functions[0], holder["function"].as_str().unwrap(), "{what} {path}");
        assert_eq!(sample.leaf_line, holder["line"].as_u64().unwrap() as u32, "{what} {path}");
        assert_eq!(sample.labels["capture_kind"], "map", "{what} {path}");
        assert_eq!(sample.labels["captured_type"], "map[string]int", "{what} {path}");
        let stack_label = &sample.labels["stack"];
        if holder["blocked"] == "syscall" && minor < 23 {
            // No frame pointer saved for a syscall before Go 1.23: the site alone, and why.
            assert_eq!(sample.functions.len(), 1, "{what} {path}: {sample:?}");
            assert!(stack_label.starts_with("defer site only: "), "{what}: {sample:?}");
            assert!(stack_label.contains("syscall"), "{what}: {sample:?}");
            continue;
        }
        assert_eq!(stack_label, "goroutine stack from frame pointers", "{what} {path}");
        assert!(
            leads_through(&sample.functions, holder["callers"].as_array().unwrap()),
            "{what} {path}: the stack {:?} does not lead through {}",
            sample.functions,
            holder["callers"]
        );
        assert_eq!(sample.functions.last().unwrap(), "runtime.goexit", "{what} {path}");
        assert!(
            !sample.functions.iter().any(|f| f == "main.park" || f == "runtime.gopark"),
            "{what} {path}: frames below the one holding the records: {:?}",
            sample.functions
        );
    }
    let pending: i64 = samples.iter().map(|s| s.values[0]).sum();
    assert_eq!(pending, total, "{what}: pending_defers in the profile");
    // pprof's own view: the site holds everything, and each path its own.
    let (flat, _) = top_row(&pprof_tool(&["-top"], profile), "main.accumulate");
    assert_eq!(flat, total, "{what}: -top main.accumulate");
    let orders = &truth["holders"][0];
    let top = pprof_tool(&["-top", "-focus=main.serveOrders"], profile);
    assert_eq!(top_row(&top, "main.accumulate").0, orders["pending"].as_i64().unwrap(), "{what}");
    assert_eq!(top_row(&top, "main.serveOrders").1, orders["pending"].as_i64().unwrap(), "{what}");
    samples
}

/// Minor version of a release like "1.24.11".
fn minor(release: &str) -> u32 {
    release.split('.').nth(1).unwrap().parse().unwrap()
}

#[test]
fn snapshot_pprof_has_exact_pending_per_site_and_stacks_to_the_accumulating_function() {
    for release in go_releases() {
        let binary = go_program(&release, "callpaths");
        let args: Vec<&str> = ["-wait"].into_iter().chain(HELD).collect();
        let mut program = Workload::start_with_args(&binary, &args);
        let truth = program.work_json();
        let profile = report_path(&format!("pprof-snapshot-{release}")).with_extension("pb.gz");
        let pid = program.pid().to_string();
        let output = deferprobe()
            .args(["snapshot", "--pid", &pid, "--pprof"])
            .arg(&profile)
            .output()
            .unwrap();
        let (stdout, stderr) = text(&output);
        assert_eq!(output.status.code(), Some(0), "go{release}: {stderr}\n{stdout}");
        let samples = check_profile(&profile, &truth, minor(&release), &format!("go{release}"));
        assert_eq!(samples[0].values.len(), 2, "snapshot: no registered/count");
        program.end();
        std::fs::remove_file(&profile).unwrap();
    }
}

#[test]
fn run_pprof_has_pending_with_stacks_and_the_registrations_seen_per_site() {
    require_root();
    let release = &go_releases()[0];
    let binary = go_program(release, "callpaths");
    let args: Vec<&str> = ["-wait"].into_iter().chain(HELD).collect();
    let mut program = Workload::start_with_args(&binary, &args);
    let profile = report_path("pprof-run").with_extension("pb.gz");
    let pid = program.pid().to_string();
    let mut cmd = deferprobe();
    cmd.args(["run", "--pid", &pid, "--duration", "3s", "--interval", "500ms", "--pprof"])
        .arg(&profile);
    let mut running = Running::spawn(cmd);
    running.wait_for("probes attached");
    let truth = program.work_json();
    let (code, stdout, stderr) = running.finish();
    assert_eq!(code, 0, "{}\n{stdout}", stderr.join("\n"));
    let samples = check_profile(&profile, &truth, minor(release), &format!("run go{release}"));
    // Every record was registered while traced, at the one site.
    let registered: Vec<&RawSample> = samples.iter().filter(|s| s.values[2] > 0).collect();
    assert_eq!(registered.len(), 1, "{samples:#?}");
    let total = truth["pending_defers"].as_i64().unwrap();
    assert_eq!(registered[0].values, [0, 0, total]);
    assert_eq!(registered[0].functions, ["main.accumulate"]);
    assert_eq!(registered[0].leaf_line, truth["holders"][0]["line"].as_u64().unwrap() as u32);
    let top = pprof_tool(&["-top", "-sample_index=registered"], &profile);
    assert_eq!(top_row(&top, "main.accumulate").0, total);
    program.end();
    std::fs::remove_file(&profile).unwrap();
}

/// An unwritable `--pprof` is refused before anything is read or attached (exit 73), like
/// `--report`.
#[test]
fn an_unwritable_pprof_file_is_refused_up_front() {
    let dir = workspace_root().join("target/e2e");
    std::fs::create_dir_all(&dir).unwrap();
    for command in ["snapshot", "run"] {
        let output = deferprobe()
            .args([command, "--pid", "1", "--pprof"])
            .arg(dir.join("missing-dir/p.pb.gz"))
            .output()
            .unwrap();
        let (_, stderr) = text(&output);
        assert_eq!(output.status.code(), Some(EXIT_CANNOT_CREATE), "{command}: {stderr}");
        assert!(stderr.contains("--pprof") && stderr.contains("no directory"), "{stderr}");
    }
}
