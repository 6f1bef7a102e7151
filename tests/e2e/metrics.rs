//! Issue 14: what `run` gives while tracing goes on. Debian's Prometheus server scrapes
//! `--metrics-addr` and its HTTP API shows the exact counts and pending defers of a program
//! that prints its own ground truth (tests/go/phases); SIGUSR1 and `--report-every` write
//! interim reports with the exact counts of that moment, and the final report stays as it was.

use std::{
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{checks::*, support::*};

const PROMETHEUS: &str = "/usr/bin/prometheus";

fn phases() -> PathBuf {
    go_program(&go_releases()[0], "phases")
}

/// A loopback port nobody listens on now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `GET path` on 127.0.0.1:`port` (HTTP/1.0): the status, the headers and the body.
fn http_get(port: u16, path: &str) -> std::io::Result<(u16, String, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n")?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    Ok((status, head.to_owned(), body.to_owned()))
}

/// `text` percent-encoded for a URL's query.
fn url_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'-' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Debian's Prometheus server on loopback, scraping `target` every 250 ms, with its storage
/// in a directory of its own. Killed (it is our child) and its directory removed on drop.
struct Prometheus {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Prometheus {
    fn start(name: &str, target: u16) -> Prometheus {
        assert!(
            Path::new(PROMETHEUS).exists(),
            "{PROMETHEUS} is missing: `cargo xtask setup` apt-installs Debian's prometheus"
        );
        let dir = workspace_root().join(format!("target/e2e/{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 250ms\n  scrape_timeout: 200ms\n\
                 scrape_configs:\n  - job_name: deferprobe\n    static_configs:\n      \
                 - targets: ['127.0.0.1:{target}']\n"
            ),
        )
        .unwrap();
        let port = free_port();
        let child = Command::new(PROMETHEUS)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("prometheus.log")).unwrap())
            .spawn()
            .expect("start prometheus");
        let prometheus = Prometheus { child, port, dir };
        prometheus.wait_until(Duration::from_secs(60), "ready", || {
            matches!(http_get(port, "/-/ready"), Ok((200, ..))).then_some(())
        });
        prometheus
    }

    /// `f()` until it gives something, for up to `timeout`; panics naming `what`.
    fn wait_until<T>(&self, timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
        let start = Instant::now();
        loop {
            if let Some(value) = f() {
                return value;
            }
            assert!(
                start.elapsed() < timeout,
                "prometheus: {what} not within {timeout:?}; its log:\n{}",
                std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
            );
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// The instant vector `query` evaluates to now, from the HTTP API.
    fn query(&self, query: &str) -> Vec<Value> {
        let path = format!("/api/v1/query?query={}", url_encode(query));
        let (status, _, body) = http_get(self.port, &path).expect("query prometheus");
        let answer: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
        assert_eq!((status, &answer["status"]), (200, &Value::from("success")), "{body}");
        answer["data"]["result"].as_array().cloned().unwrap_or_default()
    }

    /// Waits (up to 30 s) until `query` gives one series whose value is `value`; returns it.
    fn wait_for_value(&self, query: &str, value: u64) -> Value {
        let wanted = value.to_string();
        let mut last = Vec::new();
        let found = self.wait_until(Duration::from_secs(30), query, || {
            last = self.query(query);
            let found = last.iter().find(|series| series["value"][1] == wanted.as_str());
            (last.len() == 1).then(|| found.cloned()).flatten()
        });
        assert_eq!(last.len(), 1, "{query}: {last:?}");
        found
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `deferprobe run --pid` on the phases program, with `flags`, once its probes are attached.
fn trace_phases(flags: &[&str]) -> (Workload, Running) {
    let workload = Workload::start_with_args(&phases(), &[]);
    let mut cmd = deferprobe();
    cmd.args(["run", "--pid", &workload.pid().to_string(), "--log-format", "json"])
        .args(ALL_PROBES_ON)
        .args(flags);
    let mut tracer = Running::spawn(cmd);
    tracer.wait_for("probes attached");
    (workload, tracer)
}

fn signal(pid: u32, signal: i32) {
    // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(pid as i32, signal) };
}

fn truth_u64(truth: &Value, key: &str) -> u64 {
    truth[key].as_u64().unwrap_or_else(|| panic!("no {key} in {truth}"))
}

/// The metrics' name of a site of the ground truth: `function (file:line)`.
fn site_label(site: &Value) -> String {
    let file = site["file"].as_str().unwrap();
    let base = file.rsplit('/').next().unwrap();
    format!("{} ({base}:{})", site["function"].as_str().unwrap(), site["line"])
}

/// Prometheus scrapes --metrics-addr; its API shows exactly the heap defers the program
/// registered and the ones it holds pending, per site, and the target's identity.
#[test]
fn prometheus_scrapes_exact_counts_and_pending_defers() {
    require_root();
    let metrics_port = free_port();
    let prometheus = Prometheus::start("metrics-prometheus", metrics_port);
    let address = format!("127.0.0.1:{metrics_port}");
    let (mut workload, tracer) = trace_phases(&["--interval", "200ms", "--metrics-addr", &address]);
    assert!(tracer.stderr.iter().any(|l| l.contains("serving metrics")), "{:?}", tracer.stderr);
    workload.work_json();
    let truth = workload.command_json("step");
    let (heap_defers, pending) =
        (truth_u64(&truth, "heap_defers"), truth_u64(&truth, "pending_defers"));
    assert_eq!((heap_defers, pending), (35, 15), "{truth}");

    let deferproc = prometheus.wait_for_value(
        r#"deferprobe_calls_total{call="deferproc",job="deferprobe"}"#,
        heap_defers,
    );
    assert_eq!(deferproc["metric"]["family"], "defers", "{deferproc}");
    prometheus.wait_for_value(
        r#"deferprobe_calls_total{call="deferreturn"}"#,
        truth_u64(&truth, "heap_defer_frame_returns"),
    );
    let pending_site = site_label(&truth["pending_site"]);
    let released_site = site_label(&truth["released_site"]);
    prometheus
        .wait_for_value(&format!(r#"deferprobe_pending_defers{{site="{pending_site}"}}"#), pending);
    prometheus
        .wait_for_value(&format!(r#"deferprobe_pending_defers{{site="{released_site}"}}"#), 0);
    prometheus.wait_for_value("sum(deferprobe_pending_defers)", pending);
    prometheus.wait_for_value("deferprobe_pending_goroutines", 2);
    // Each pending closure captures a map of its own.
    prometheus.wait_for_value("deferprobe_captured_maps", pending);
    let retained =
        prometheus.query(&format!(r#"deferprobe_retained_bytes{{site="{pending_site}"}}"#));
    let bytes: f64 = retained[0]["value"][1].as_str().unwrap().parse().unwrap();
    assert!(bytes > 0.0, "{retained:?}");
    let info = prometheus.wait_for_value("deferprobe_target_info", 1);
    assert_eq!(info["metric"]["pid"], workload.pid().to_string(), "{info}");
    assert_eq!(info["metric"]["go_version"], truth["go_version"], "{info}");
    assert!(info["metric"]["exe"].as_str().unwrap().ends_with("/phases"), "{info}");
    prometheus.wait_for_value(r#"deferprobe_lost_events_total{cause="ring_buffer_full"}"#, 0);
    // A real counter: it never went down over the trace.
    prometheus.wait_for_value(r#"resets(deferprobe_calls_total{call="deferproc"}[1m])"#, 0);
    prometheus.wait_for_value(
        r#"count(deferprobe_governor_duty_cycle) == bool count(deferprobe_governor_sampled)"#,
        1,
    );

    // The endpoint itself: the Prometheus text format, HELP on every metric, /metrics only.
    let (status, head, body) = http_get(metrics_port, "/metrics").unwrap();
    assert_eq!(status, 200, "{head}");
    assert!(
        head.to_ascii_lowercase().contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    for line in body.lines().filter(|l| !l.starts_with('#')) {
        let name = line.split(['{', ' ']).next().unwrap();
        assert!(body.contains(&format!("# HELP {name} ")), "no HELP for {name}:\n{body}");
    }
    assert_eq!(http_get(metrics_port, "/").unwrap().0, 404);

    signal(tracer.child.id(), libc::SIGINT);
    let (code, stdout, stderr) = tracer.finish();
    assert_eq!(code, 0, "{stdout}\n{}", stderr.join("\n"));
    workload.end();
}

/// An address the metrics can't be served at is refused before anything is attached, in one
/// line, with exit code 73.
#[test]
fn a_metrics_address_in_use_is_refused_before_attaching() {
    require_root();
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = taken.local_addr().unwrap().to_string();
    let workload = Workload::start_with_args(&phases(), &[]);
    let output = deferprobe()
        .args(["run", "--pid", &workload.pid().to_string(), "--metrics-addr", &address])
        .output()
        .unwrap();
    let (stdout, stderr) = text(&output);
    assert_eq!(output.status.code(), Some(EXIT_CANNOT_CREATE), "{stderr}");
    assert_eq!(
        stderr,
        format!(
            "deferprobe: error: --metrics-addr {address}: cannot listen there: Address already in use \
             (os error 98)\n"
        )
    );
    assert_eq!(stdout, "");
    drop(workload);
}

/// The `path` field of the "interim report written" log lines seen so far in `stderr`.
fn interim_paths(stderr: &[String]) -> Vec<PathBuf> {
    json_logs(stderr, "interim report written")
        .iter()
        .map(|log| PathBuf::from(log["path"].as_str().unwrap()))
        .collect()
}

/// Checks an interim report against the program's truth at that moment.
fn assert_interim(report: &Value, truth: &Value, cause: &str) {
    assert_eq!(report["ended_by"], Value::Null, "{report}");
    assert_eq!(report["interim"]["cause"], cause, "{report}");
    assert_eq!(report["counts"]["deferproc"], truth["heap_defers"], "{report}");
    assert_eq!(report["pending"]["heap_defers"], truth["pending_defers"], "{report}");
    assert_eq!(report["pending"]["captured_maps"], truth["pending_defers"], "{report}");
    let site = site_at(&report["sites"], &truth["pending_site"]);
    assert_eq!(site["pending"], truth["pending_defers"], "{report}");
    assert_eq!(site["registered"], truth["pending_defers"], "{report}");
    assert_released(report, truth);
}

/// The released site's registrations and releases, and the deferreturn calls, are exact.
fn assert_released(report: &Value, truth: &Value) {
    assert_eq!(report["counts"]["deferreturn"], truth["heap_defer_frame_returns"], "{report}");
    let site = site_at(&report["sites"], &truth["released_site"]);
    assert_eq!((&site["registered"], &site["released"]), (&truth["released"], &truth["released"]));
    assert_eq!(site["pending"], 0, "{report}");
}

/// SIGUSR1 writes an interim JSON report next to --report, named with the time, while the
/// target goes on; each has the exact counts of its moment, and the final report is whole.
#[test]
fn sigusr1_writes_interim_reports_and_the_final_one_is_unaffected() {
    require_root();
    let report_file = report_path("metrics-sigusr1");
    let _ = std::fs::remove_file(&report_file);
    let (mut workload, mut tracer) =
        trace_phases(&["--interval", "1s", "--report", report_file.to_str().unwrap()]);
    let mut truths = Vec::new();
    for step in 0..2 {
        let truth = match step {
            0 => workload.work_json(),
            _ => workload.command_json("step"),
        };
        signal(tracer.child.id(), libc::SIGUSR1);
        tracer.wait_for("interim report written");
        let path = interim_paths(&tracer.stderr).pop().unwrap();
        // report.json → report.20261202T013000Z.json beside it.
        let name = path.file_name().unwrap().to_str().unwrap();
        let stem = report_file.file_stem().unwrap().to_str().unwrap();
        let stamp = name.strip_prefix(&format!("{stem}.")).and_then(|n| n.strip_suffix(".json"));
        let stamp = stamp.unwrap_or_else(|| panic!("{name}")).trim_end_matches("-2");
        assert!(stamp.len() == 16 && stamp.as_bytes()[8] == b'T' && stamp.ends_with('Z'), "{name}");
        assert_eq!(path.parent(), report_file.parent());
        let report = read_json(&path);
        assert_interim(&report, &truth, "signal");
        assert_eq!(
            report["interim"]["written_at"].as_str().unwrap().replace(['-', ':'], ""),
            stamp,
            "{report}"
        );
        std::fs::remove_file(&path).unwrap();
        truths.push(truth);
    }
    assert!(!report_file.exists(), "the final report is written at the end only");
    signal(tracer.child.id(), libc::SIGINT);
    let (code, stdout, stderr) = tracer.finish();
    assert_eq!(code, 0, "{stdout}\n{}", stderr.join("\n"));
    let last = &truths[1];
    let report = read_json(&report_file);
    assert_eq!(report["ended_by"], "signal", "{report}");
    assert!(report.get("interim").is_none(), "{report}");
    assert_eq!(report["counts"]["deferproc"], last["heap_defers"], "{report}");
    assert_eq!(report["pending"]["heap_defers"], last["pending_defers"], "{report}");
    assert_released(&report, last);
    assert!(stdout.starts_with("deferprobe report\n"), "{stdout}");
    workload.end();
}

/// The counts of the last text report among `stderr` that starts with `header`: heap defers
/// and pending heap defers.
fn last_text_report(stderr: &[String], header: &str) -> (u64, u64) {
    let start = stderr.iter().rposition(|l| l.starts_with(header)).expect("a text report");
    let lines = &stderr[start..];
    let value = |prefix: &str| {
        let line = lines.iter().find(|l| l.trim_start().starts_with(prefix)).unwrap();
        line.trim_start()[prefix.len()..]
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap_or_else(|e| panic!("{line}: {e}"))
    };
    (value("heap defers (deferproc)"), value("pending heap defers:"))
}

/// --report-every writes interim text reports on stderr, periodically, with the counts of the
/// moment; the final report on stdout is the whole trace's.
#[test]
fn report_every_writes_interim_text_reports_periodically() {
    require_root();
    let (mut workload, mut tracer) = trace_phases(&["--interval", "1s", "--report-every", "1s"]);
    let header = "deferprobe interim report (";
    for step in 0..2 {
        let truth = match step {
            0 => workload.work_json(),
            _ => workload.command_json("step"),
        };
        // Two reports after the step's truth: the second was made after the step.
        let seen = json_logs(&tracer.stderr, "interim report written to stderr").len();
        while json_logs(&tracer.stderr, "interim report written to stderr").len() < seen + 2 {
            tracer.wait_for("interim report written to stderr");
        }
        let (deferproc, pending) = last_text_report(&tracer.stderr, header);
        assert_eq!(deferproc, truth_u64(&truth, "heap_defers"), "{}", tracer.stderr.join("\n"));
        assert_eq!(pending, truth_u64(&truth, "pending_defers"));
        let report =
            &tracer.stderr[tracer.stderr.iter().rposition(|l| l.starts_with(header)).unwrap()..];
        assert!(report.iter().any(|l| l.contains("still tracing")), "{report:?}");
        assert!(report.iter().all(|l| l.chars().count() <= 80 || l.starts_with('{')), "{report:?}");
    }
    signal(tracer.child.id(), libc::SIGINT);
    let (code, stdout, stderr) = tracer.finish();
    assert_eq!(code, 0, "{stdout}\n{}", stderr.join("\n"));
    let stdout: Vec<String> = stdout.lines().map(str::to_owned).collect();
    assert_eq!(last_text_report(&stdout, "deferprobe report"), (35, 15), "{stdout:?}");
    assert!(stdout.iter().any(|l| l.contains("interrupted")), "{stdout:?}");
    workload.end();
}

/// The capabilities deploy/daemonset.yaml adds (its `add:` list).
fn daemonset_capabilities() -> Vec<String> {
    let path = workspace_root().join("deploy/daemonset.yaml");
    let manifest = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = manifest.lines().map(str::trim).collect();
    let add = lines.iter().position(|l| *l == "add:").expect("an add: list of capabilities");
    lines[add + 1..]
        .iter()
        .map_while(|l| l.strip_prefix("- "))
        .map(|cap| cap.split_whitespace().next().unwrap().to_ascii_lowercase())
        .collect()
}

/// deferprobe with only the capabilities `caps` (as root, as in the DaemonSet's container):
/// `run --pid` on the phases program for a moment, with metrics and interim reports. Its exit
/// code and stderr.
fn run_with_only(caps: &[String], pid: u32, report: &Path) -> (i32, String) {
    let bounding: String = caps.iter().map(|cap| format!(",+{cap}")).collect();
    let output = Command::new("setpriv")
        .arg(format!("--bounding-set=-all{bounding}"))
        .arg("--")
        .arg(env!("CARGO_BIN_EXE_deferprobe"))
        .args(["run", "--pid", &pid.to_string(), "--duration", "1500ms", "--interval", "500ms"])
        .args(["--metrics-addr", "127.0.0.1:0", "--report-every", "1s", "--report"])
        .arg(report)
        .output()
        .expect("setpriv (util-linux) runs deferprobe with a reduced capability set");
    (output.status.code().unwrap_or(-1), text(&output).1)
}

/// What deploy/daemonset.yaml grants is enough, and each capability in it is needed: without
/// any one of them deferprobe is refused, naming it (exit code 77).
#[test]
fn the_daemonsets_capabilities_are_enough_and_each_is_needed() {
    require_root();
    let caps = daemonset_capabilities();
    assert_eq!(caps, ["bpf", "perfmon", "sys_ptrace"]);
    let mut workload = Workload::start_with_args(&phases(), &[]);
    let truth = workload.work_json();
    let report = report_path("metrics-capabilities");
    let (code, stderr) = run_with_only(&caps, workload.pid(), &report);
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("serving metrics"), "{stderr}");
    assert!(stderr.contains("interim report written"), "{stderr}");
    let json = read_json(&report);
    assert_eq!(json["pending"]["heap_defers"], truth["pending_defers"], "{json}");
    for missing in &caps {
        let fewer: Vec<String> = caps.iter().filter(|cap| *cap != missing).cloned().collect();
        let (code, stderr) = run_with_only(&fewer, workload.pid(), &report);
        assert_eq!(code, EXIT_PERMISSION, "without {missing}: {stderr}");
        let name = format!("CAP_{}", missing.to_ascii_uppercase());
        assert!(stderr.contains(&name), "without {missing}: {stderr}");
    }
    // The interim reports beside the final one.
    let stem = report.file_stem().unwrap().to_str().unwrap().to_owned();
    for entry in std::fs::read_dir(report.parent().unwrap()).unwrap() {
        let path = entry.unwrap().path();
        if path.file_name().unwrap().to_str().unwrap().starts_with(&format!("{stem}.")) {
            std::fs::remove_file(path).unwrap();
        }
    }
    workload.end();
}
