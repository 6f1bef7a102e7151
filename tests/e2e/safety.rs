//! Issue 5: the traced program never suffers, deferprobe never lies. A self-checking stress
//! program (tests/go/stress) on every release; every way tracing ends; SIGKILL of deferprobe
//! seen from the kernel's side (bpftool, the target's code bytes); two tracers on one process;
//! a deliberately overflowed ring buffer whose losses must be reported.

use std::{
    collections::BTreeSet,
    os::unix::fs::FileExt,
    path::Path,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{checks::*, support::*};

/// Deep recursion with stack copying, panic + recover, Goexit and 66 live goroutines, traced
/// from the first instruction and by pid, on every release: exact counts, no loss, and the
/// program's own self-check passes.
#[test]
fn stress_program_counts_exactly_on_every_release() {
    require_root();
    for release in go_releases() {
        let program = go_program(&release, "stress");

        let traced = trace_command(&format!("stress-{release}"), &program, &STRESS_ARGS);
        assert_eq!(traced.code, 0, "go{release}:\n{}\n{}", traced.stdout, traced.stderr);
        let truth = ground_truth_json(&traced.stdout);
        assert_self_check(&truth, STRESS_DEFERS);
        assert_exact(&traced.report, &truth);
        assert_eq!(traced.count("deferproc"), STRESS_DEFERS);
        assert_eq!(traced.report["ended_by"], "target_exited");

        let mut workload =
            Workload::start_with_args(&program, &[&["-wait"][..], &STRESS_ARGS].concat());
        let report_file = report_path(&format!("stress-pid-{release}"));
        let mut cmd = deferprobe();
        cmd.args(["run", "--pid", &workload.pid().to_string(), "--interval", "100ms", "--report"])
            .arg(&report_file);
        let mut tracer = Running::spawn(cmd);
        tracer.wait_for("probes attached");
        let truth = workload.work_json();
        workload.end();
        let (code, stdout, stderr) = tracer.finish();
        assert_eq!(code, 0, "go{release}:\n{stdout}\n{}", stderr.join("\n"));
        assert_self_check(&truth, STRESS_DEFERS);
        let report = read_json(&report_file);
        assert_exact(&report, &truth);
        assert_eq!(report["ended_by"], "target_exited");
        assert!(
            report["notes"].to_string().contains("the target exited while being traced"),
            "{report}"
        );
    }
}

/// Reconciliations every 100 ms land while 66 goroutines recurse, recover and Goexit, 100
/// rounds over: every record registered is released exactly once. (Chain reads that followed
/// a record freed and reused by another goroutine into that one's chain adopted its records,
/// which were then released twice: 429,001–429,019 released of 429,000 in about 1 run in 7.)
#[test]
fn reconciling_mid_recursion_releases_each_record_once() {
    require_root();
    let program = go_program(&go_releases()[0], "stress");
    let args = [&STRESS_ARGS[..], &["-rounds", "100"]].concat();
    // The 650,000 events of 100 rounds come faster than a debug build drains them: a ring
    // buffer that holds them all (losses would be counted, and the releases inexact).
    let flags = ["--interval", "100ms", "--ring-buffer-kib", "65536"];
    for run in 0..4 {
        let name = format!("stress-reconciled-{run}");
        let traced = trace_command_with(&name, &flags, &program, &args);
        let detail = format!("run {run}:\n{}\n{}", traced.stdout, traced.stderr);
        assert_eq!(traced.code, 0, "{detail}");
        let truth = ground_truth_json(&traced.stdout);
        assert_eq!(truth["self_check"], "ok", "{truth}");
        let defers = truth["heap_defers"].as_u64().unwrap();
        assert_eq!(defers, 100 * STRESS_DEFERS, "{truth}");
        assert_eq!(traced.count("deferproc"), defers, "{detail}");
        assert_eq!(traced.report["counts"]["lost_events"], 0, "{detail}");
        assert_eq!(traced.report["pending"]["heap_defers"], 0, "{detail}");
        let site = site_named(&traced.report["sites"], "main.descend");
        assert_eq!((&site["registered"], &site["released"]), (&defers.into(), &defers.into()));
        // Long enough for several reconciliations to land mid-run.
        let secs = traced.report["duration_secs"].as_f64().unwrap();
        assert!(secs > 0.5, "traced {secs} s: {detail}");
    }
}

/// Complements counts.rs (SIGINT / SIGTERM by pid, the target's exit by pid and as a command):
/// --duration writes the JSON report too; a command traced from its start that ends by itself
/// is noted with its exit code; SIGINT / SIGTERM reach a command, whose end ends tracing with a
/// report.
#[test]
fn every_ending_writes_a_report() {
    require_root();
    let release = &go_releases()[0];
    let program = go_program(release, "stress");

    // --duration, by pid.
    let mut workload =
        Workload::start_with_args(&program, &["-wait", "-goroutines", "3", "-depth", "64"]);
    let report_file = report_path("ending-duration");
    let output = deferprobe()
        .args(["run", "--pid", &workload.pid().to_string(), "--duration", "300ms", "--report"])
        .arg(&report_file)
        .output()
        .unwrap();
    let (stdout, stderr) = text(&output);
    assert_eq!(output.status.code(), Some(0), "{stdout}\n{stderr}");
    let report = read_json(&report_file);
    assert_eq!(report["ended_by"], "duration", "{report}");
    let secs = report["duration_secs"].as_f64().unwrap();
    assert!((0.3..5.0).contains(&secs), "duration_secs {secs}");
    assert!(stdout.contains("duration reached"), "{stdout}");
    assert_self_check(&workload.work_json(), SMALL_DEFERS);
    workload.end();

    // The command ends by itself: its exit code, and a note saying so.
    let traced = trace_command(
        "ending-exit",
        &program,
        &["-goroutines", "3", "-depth", "64", "-exit-code", "7"],
    );
    assert_eq!(traced.code, 7, "{}", traced.stderr);
    assert_eq!(traced.report["ended_by"], "target_exited");
    assert_eq!(traced.report["target"]["exit_code"], 7);
    let notes = traced.report["notes"].to_string();
    assert!(notes.contains("the target exited while being traced (exit code 7)"), "{notes}");
    assert_eq!(traced.count("deferproc"), SMALL_DEFERS);

    // SIGINT / SIGTERM while tracing a command: forwarded, the command dies of it, the report
    // says so and deferprobe exits like the command (128 + signal).
    for signal in [libc::SIGINT, libc::SIGTERM] {
        let report_file = report_path(&format!("ending-command-{signal}"));
        let mut cmd = deferprobe();
        cmd.args(["run", "--report"]).arg(&report_file).arg("--").arg(&program).args([
            "-goroutines",
            "3",
            "-depth",
            "64",
            "-linger",
            "60s",
        ]);
        let mut tracer = Running::spawn(cmd);
        tracer.wait_for("probes attached");
        thread::sleep(Duration::from_millis(300)); // the command is lingering by now
        // SAFETY: signalling the child we started.
        unsafe { libc::kill(tracer.child.id() as i32, signal) };
        let (code, stdout, stderr) = tracer.finish();
        assert_eq!(code, 128 + signal, "{stdout}\n{}", stderr.join("\n"));
        let report = read_json(&report_file);
        assert_eq!(report["ended_by"], "target_exited", "{report}");
        assert_eq!(report["target"]["exit_code"], 128 + signal);
        assert_eq!(report["counts"]["deferproc"], SMALL_DEFERS, "{report}");
        assert!(stdout.contains(&format!("exit code {}", 128 + signal)), "{stdout}");
    }
}

/// The BPF objects of one process, by kernel id.
#[derive(Debug)]
struct BpfObjects {
    links: BTreeSet<u64>,
    progs: BTreeSet<u64>,
    maps: BTreeSet<u64>,
}

/// What the kernel holds for one process: the ids of the BPF links, programs and maps it has
/// file descriptors for (/proc/PID/fdinfo).
fn bpf_objects_of(pid: u32) -> BpfObjects {
    let (mut links, mut progs, mut maps) = (BTreeSet::new(), BTreeSet::new(), BTreeSet::new());
    let dir = format!("/proc/{pid}/fdinfo");
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{dir}: {e}")) {
        let Ok(info) = std::fs::read_to_string(entry.unwrap().path()) else { continue };
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().parse::<u64>().unwrap())
        };
        match (field("link_id:"), field("prog_id:"), field("map_id:")) {
            (Some(link), _, _) => {
                links.insert(link);
            }
            (None, Some(prog), _) => {
                progs.insert(prog);
            }
            (None, None, Some(map)) => {
                maps.insert(map);
            }
            _ => {}
        }
    }
    BpfObjects { links, progs, maps }
}

/// `bpftool -j <object> list`: id → the whole entry.
fn bpftool_list(object: &str) -> Vec<Value> {
    let output =
        Command::new("bpftool").args(["-j", object, "list"]).output().unwrap_or_else(|e| {
            panic!("bpftool: {e}: install it with `cargo xtask setup` (Debian bpftool)")
        });
    assert!(
        output.status.success(),
        "bpftool {object} list: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

fn ids(entries: &[Value]) -> BTreeSet<u64> {
    entries.iter().map(|e| e["id"].as_u64().unwrap()).collect()
}

/// The target's code at each probed address (/proc/PID/mem, the kernel's view of its memory),
/// and the same bytes in the executable file.
fn probed_bytes(pid: u32, probes: &[(u64, u64)]) -> Vec<u8> {
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    probes
        .iter()
        .map(|&(address, _)| {
            let mut byte = [0u8];
            mem.read_exact_at(&mut byte, address).unwrap_or_else(|e| panic!("{address:#x}: {e}"));
            byte[0]
        })
        .collect()
}

/// (runtime address, file offset) of every probe of a non-PIE binary.
fn probe_points(binary: &Path) -> (Vec<(u64, u64)>, Vec<u8>) {
    let (_, json) = inspect(binary);
    assert_eq!(json["plan"]["pie"], false, "the test needs a non-PIE binary (no load bias)");
    let points: Vec<(u64, u64)> = json["plan"]["probes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let at = |k: &str| p[k].as_u64().unwrap_or_else(|| panic!("{k} in {p}"));
            (at("address") + at("attach_offset"), at("file_offset"))
        })
        .collect();
    assert!(points.len() >= 8, "{json}");
    let file = std::fs::read(binary).unwrap();
    let original = points.iter().map(|&(_, offset)| file[offset as usize]).collect::<Vec<u8>>();
    assert!(!original.contains(&0xcc), "an int3 in the file itself would prove nothing");
    (points, original)
}

/// SIGKILL gives deferprobe no chance to clean up; the kernel must. While it runs, each probed
/// instruction of the target reads as int3 and bpftool lists its links and programs; after
/// `kill -9` the original bytes are back and those kernel objects are gone. The target keeps
/// working, correctly.
#[test]
fn sigkill_leaves_no_probe_behind() {
    require_root();
    let release = &go_releases()[0];
    let program = go_program(release, "stress");
    let (points, original) = probe_points(&program);

    let mut workload =
        Workload::start_with_args(&program, &[&["-wait"][..], &STRESS_ARGS].concat());
    let pid = workload.pid();
    assert_eq!(probed_bytes(pid, &points), original, "nothing attached yet");
    let mut cmd = deferprobe();
    cmd.args(["run", "--pid", &pid.to_string()]);
    let mut tracer = Running::spawn(cmd);
    tracer.wait_for("probes attached");
    let tracer_pid = tracer.child.id();

    assert_eq!(probed_bytes(pid, &points), vec![0xcc; points.len()], "uprobes write int3");
    let BpfObjects { links, progs, maps } = bpf_objects_of(tracer_pid);
    assert!(!links.is_empty() && !progs.is_empty(), "deferprobe holds no BPF links / programs");
    assert!(maps.len() >= 4, "EVENTS, COUNTERS, KNOWN_MAPS, ...: {maps:?}");
    let listed_links = ids(&bpftool_list("link"));
    assert!(links.is_subset(&listed_links), "bpftool misses links {links:?}: {listed_links:?}");
    let listed_progs = bpftool_list("prog");
    let names: BTreeSet<&str> = listed_progs
        .iter()
        .filter(|p| progs.contains(&p["id"].as_u64().unwrap()))
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    for name in ["deferproc", "deferreturn", "goexit1", "mapassign", "mallocgc"] {
        assert!(names.iter().any(|n| n.starts_with(name)), "no {name} program in {names:?}");
    }

    tracer.child.kill().unwrap(); // SIGKILL
    let status = tracer.child.wait().unwrap();
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(libc::SIGKILL));

    // Links are released asynchronously after the last file descriptor closes: poll (bounded).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left_links: BTreeSet<u64> =
            links.intersection(&ids(&bpftool_list("link"))).copied().collect();
        let left_progs: BTreeSet<u64> =
            progs.intersection(&ids(&bpftool_list("prog"))).copied().collect();
        let left_maps: BTreeSet<u64> =
            maps.intersection(&ids(&bpftool_list("map"))).copied().collect();
        let bytes = probed_bytes(pid, &points);
        if left_links.is_empty()
            && left_progs.is_empty()
            && left_maps.is_empty()
            && bytes == original
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "10 s after SIGKILL the kernel still holds links {left_links:?}, programs \
             {left_progs:?}, maps {left_maps:?}; probed bytes {bytes:02x?} (file: {original:02x?})"
        );
        thread::sleep(Duration::from_millis(100));
    }

    // The target was traced, then abandoned: it must not notice.
    let truth = workload.work_json();
    assert_self_check(&truth, STRESS_DEFERS);
    workload.end();
}

/// Two deferprobes on one process at once: each loads its own programs and maps and attaches
/// its own links, and both count exactly.
#[test]
fn two_tracers_on_one_process_both_count_exactly() {
    require_root();
    let release = &go_releases()[0];
    let program = go_program(release, "stress");
    let mut workload =
        Workload::start_with_args(&program, &[&["-wait"][..], &STRESS_ARGS].concat());
    let pid = workload.pid().to_string();
    let mut tracers = Vec::new();
    for name in ["first", "second"] {
        let report_file = report_path(&format!("two-tracers-{name}"));
        let mut cmd = deferprobe();
        cmd.args(["run", "--pid", &pid, "--report"]).arg(&report_file);
        let mut tracer = Running::spawn(cmd);
        tracer.wait_for("probes attached");
        tracers.push((tracer, report_file));
    }
    let (first, second) =
        (bpf_objects_of(tracers[0].0.child.id()), bpf_objects_of(tracers[1].0.child.id()));
    for (first, second, what) in [
        (&first.links, &second.links, "links"),
        (&first.progs, &second.progs, "programs"),
        (&first.maps, &second.maps, "maps"),
    ] {
        assert!(
            !first.is_empty() && first.is_disjoint(second),
            "{what} are per tracer: {first:?} {second:?}"
        );
    }

    let truth = workload.work_json();
    assert_self_check(&truth, STRESS_DEFERS);
    workload.end();
    for (tracer, report_file) in tracers {
        let (code, stdout, stderr) = tracer.finish();
        assert_eq!(code, 0, "{stdout}\n{}", stderr.join("\n"));
        let report = read_json(&report_file);
        assert_exact(&report, &truth);
        assert_eq!(report["ended_by"], "target_exited");
    }
}

/// A 16 KiB ring buffer (4 pages) and 4000 defers registered in one tight loop: the buffer
/// overflows between two drains. The per-CPU counters stay exact, and the loss is reported by
/// cause in the log lines, the JSON report, the text report and the notes.
#[test]
fn ring_buffer_overflow_is_counted_and_reported() {
    require_root();
    const BURST: u64 = 4000;
    let release = &go_releases()[0];
    let program = go_program(release, "stress");
    let mut workload = Workload::start_with_args(
        &program,
        &["-wait", "-rounds", "0", "-burst", &BURST.to_string()],
    );
    let report_file = report_path("ring-overflow");
    let mut cmd = deferprobe();
    cmd.args(["run", "--pid", &workload.pid().to_string(), "--ring-buffer-kib", "16"])
        .args(["--interval", "100ms", "--log-format", "json", "--report"])
        .arg(&report_file);
    let mut tracer = Running::spawn(cmd);
    tracer.wait_for("probes attached");
    let truth = workload.work_json();
    assert_self_check(&truth, BURST);
    thread::sleep(Duration::from_millis(250)); // at least one counts line after the burst
    workload.end();
    let (code, stdout, stderr) = tracer.finish();
    assert_eq!(code, 0, "{stdout}\n{}", stderr.join("\n"));

    let report = read_json(&report_file);
    assert_eq!(report["counts"]["deferproc"], BURST, "per-CPU counters are exact: {report}");
    let lost = &report["lost"];
    let ring_full = lost["ring_buffer_full"].as_u64().unwrap();
    assert!(ring_full > 0, "16 KiB can't hold {BURST} events: {report}");
    let sum: u64 = ["ring_buffer_full", "undecodable", "without_goroutine_id", "user_read_failed"]
        .iter()
        .map(|cause| lost[cause].as_u64().unwrap_or_else(|| panic!("lost.{cause}: {report}")))
        .sum();
    assert_eq!(report["counts"]["lost_events"], sum, "{report}");
    // What did arrive is at most what was registered, and together they account for all.
    let site = &report["sites"][0];
    assert_eq!(site["function"], "main.burst", "{report}");
    let seen = site["registered"].as_u64().unwrap();
    assert!(seen < BURST, "{report}");
    assert!(seen + ring_full >= BURST, "each registration arrived or was counted lost: {report}");
    let notes = report["notes"].to_string();
    assert!(
        notes.contains(&format!(
            "{sum} events were lost or incomplete (ring buffer full: {ring_full}"
        )),
        "{notes}"
    );
    assert!(notes.contains("the 16 KiB ring buffer overflowed"), "{notes}");
    assert!(stdout.contains(&format!("ring buffer full: {ring_full}")), "{stdout}");

    let counts = json_logs(&stderr, "counts");
    let last = counts.last().unwrap_or_else(|| panic!("no counts line:\n{}", stderr.join("\n")));
    assert_eq!(last["total_deferproc"], BURST, "{last}");
    assert_eq!(last["total_lost_ring_buffer_full"], ring_full, "{last}");
    assert_eq!(last["total_lost_events"], sum, "{last}");
    let stopped = json_logs(&stderr, "tracing stopped");
    assert_eq!(stopped[0]["lost_events"], sum, "{stopped:?}");
}
