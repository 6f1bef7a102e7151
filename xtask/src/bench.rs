//! `cargo xtask bench`: the benchmarks of issue 6, side by side in one run, written into
//! BENCHMARKS.md (between the `bench:begin` / `bench:end` markers) and, raw, into
//! target/bench/results.json.
//!
//! 1. Per-hit cost: tests/go/benchhits (defer / map / alloc workloads, the program times its
//!    own loop) untraced, under bpftrace counting the same runtime functions, and under
//!    `deferprobe run -- CMD`; built with the default Go release and with Debian's Go 1.19
//!    (issue 13: the cost per hit by release); interleaved repetitions, medians.
//! 2. Kernel-side work per hit: `kernel.bpf_stats_enabled=1` and `bpftool prog show` (run_time_ns
//!    / run_cnt) of every program of each tracer, read while the probes are still attached.
//! 3. Aggregator throughput and 5. memory: deferprobe/benches/aggregator.rs.
//! 4. Attach latency on a > 40 MB Go binary (tests/go/benchbig plus generated functions).
//! 6. A real service: tests/go/benchsvc under wrk on 127.0.0.1.
//! 7. `deferprobe snapshot` of many goroutines holding pending defers.
//! 8. Real servers: Debian's prometheus, etcd and `hugo server` (Go 1.19, stripped), and
//!    benchsvc built with Debian's Go 1.19 and the default release, each under wrk in A/B/A
//!    phases at `--max-overhead 5`, `10` and with `--probes defers`.
//! 9. Estimates of sampled families against exact counts: tests/go/benchphases
//!    (`bench/estimates.rs`).
//!
//! Needs root (uprobes, bpftool). Installs bpftrace, wrk and bpftool with apt-get if missing.
use std::{
    fmt::Write as _,
    fs::File,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use serde_json::{Value, json};

use super::{apt_install, cargo, go_binary, go_command, go_releases, install_go, workspace_root};

mod estimates;

/// Generated functions added to benchbig: with the standard library it links, this brings the
/// binary (with DWARF) over 40 MB.
const BIG_GENERATED_FUNCTIONS: usize = 20_000;

const MARK_BEGIN: &str =
    "<!-- bench:begin (written by `cargo xtask bench`; edit outside the markers) -->";
const MARK_END: &str = "<!-- bench:end -->";

struct Ctx {
    deferprobe: PathBuf,
    out: PathBuf,
    reps: usize,
    /// `--max-overhead` exists (the overhead governor): per-hit runs pass a budget that never
    /// degrades, so every hit is traced.
    governor: bool,
}

/// The sections of a run, for `--only`.
pub const SECTIONS: [&str; 8] =
    ["aggregator", "per-hit", "kernel", "attach", "service", "snapshot", "servers", "estimates"];

/// Phases of the `servers` section: how many of each configuration, and their length.
pub struct ServerPhases {
    pub reps: usize,
    pub secs: u64,
}

/// A full run (`only` empty) rewrites BENCHMARKS.md; `--only SECTION…` runs just those and
/// prints their raw results (for iterating on one thing; BENCHMARKS.md is left alone).
pub fn bench(
    reps: usize,
    calls: u64,
    service_secs: u64,
    server_runs: ServerPhases,
    only: &[String],
) -> Result<()> {
    ensure!(reps >= 1, "--reps must be at least 1");
    ensure!(server_runs.reps >= 1, "--server-reps must be at least 1");
    for section in only {
        ensure!(
            SECTIONS.contains(&section.as_str()),
            "--only {section}: not a section ({})",
            SECTIONS.join(", ")
        );
    }
    let wanted = |section: &str| only.is_empty() || only.iter().any(|s| s == section);
    let root = workspace_root();
    install_packages()?;
    let release = go_releases()?[0].clone();
    install_go(&release)?;
    eprintln!("[bench] building deferprobe (release)");
    let status = cargo()
        .current_dir(&root)
        .args(["build", "--release", "--package", "deferprobe"])
        .status()?;
    ensure!(status.success(), "cargo build failed");
    let out = root.join("target/bench");
    std::fs::create_dir_all(&out)?;
    let ctx = Ctx {
        deferprobe: target_dir().join("release/deferprobe"),
        out: out.clone(),
        reps,
        governor: String::from_utf8_lossy(
            &Command::new(target_dir().join("release/deferprobe"))
                .args(["run", "--help"])
                .output()?
                .stdout,
        )
        .contains("--max-overhead"),
    };
    let hits = build_go(&release, "benchhits", &out)?;
    let svc = build_go(&release, "benchsvc", &out)?;

    let environment = environment(&release)?;
    eprintln!("[bench] environment: {environment}");
    let mut results = json!({ "environment": environment });
    if wanted("aggregator") {
        eprintln!("[bench] aggregator throughput and memory");
        results["aggregator"] = aggregator()?;
    }
    if wanted("per-hit") {
        eprintln!("[bench] per-hit cost");
        // By release: the default one, and Debian's Go 1.19 (issue 13).
        let hits_by_release = [
            (release.clone(), hits.clone()),
            (DEBIAN_GO.0.to_owned(), build_go_debian("benchhits", &out)?),
        ];
        results["per_hit"] = per_hit(&ctx, &hits_by_release, calls)?;
    }
    if wanted("kernel") {
        eprintln!("[bench] kernel-side work per hit (bpf_stats)");
        results["kernel"] = kernel_side(&ctx, &hits, calls)?;
    }
    if wanted("attach") {
        eprintln!("[bench] attach latency");
        let big = build_big(&release, &out)?;
        results["attach"] = attach_latency(&ctx, &big)?;
    }
    if wanted("service") {
        eprintln!("[bench] real service under wrk");
        results["service"] = service(&ctx, &svc, service_secs)?;
    }
    if wanted("snapshot") {
        eprintln!("[bench] snapshot of the runtime's state");
        let captures = build_go(&release, "captures", &out)?;
        results["snapshot"] = snapshot(&ctx, &captures)?;
    }
    if wanted("servers") {
        eprintln!("[bench] real Go servers under wrk");
        let ServerPhases { reps, secs } = server_runs;
        results["servers"] = servers(&ctx, &svc, &release, reps, secs)?;
    }
    if wanted("estimates") {
        eprintln!("[bench] estimates of sampled families against exact counts");
        let phases = build_go(&release, "benchphases", &out)?;
        results["estimates"] = estimates::estimates(&ctx, &phases)?;
    }
    results["environment"]["fuzz_processes_after"] = json!(fuzz_processes());
    if !only.is_empty() {
        let path = out.join("results-partial.json");
        std::fs::write(&path, serde_json::to_string_pretty(&results)?)?;
        println!("{}", serde_json::to_string_pretty(&results)?);
        if !results["estimates"].is_null() {
            let mut section = String::new();
            estimates::render(&mut section, &results["estimates"]);
            println!("{section}");
        }
        eprintln!("[bench] --only: wrote {} (BENCHMARKS.md unchanged)", path.display());
        return Ok(());
    }
    std::fs::write(out.join("results.json"), serde_json::to_string_pretty(&results)?)?;
    let markdown = render(&results, &ctx, reps, calls, service_secs);
    write_benchmarks_md(&root.join("BENCHMARKS.md"), &markdown)?;
    eprintln!("[bench] wrote BENCHMARKS.md and {}", out.join("results.json").display());
    print!("{markdown}");
    Ok(())
}

fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => workspace_root().join(dir),
        None => workspace_root().join("target"),
    }
}

// ---------------------------------------------------------------------------------- set-up

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn install_packages() -> Result<()> {
    let missing: Vec<&str> = [("bpftrace", "bpftrace"), ("wrk", "wrk"), ("bpftool", "bpftool")]
        .into_iter()
        .filter(|(tool, _)| !have(tool))
        .map(|(_, package)| package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("[bench] installing {} (Debian)", missing.join(", "));
    apt_install(&missing)
}

fn build_go(release: &str, program: &str, out: &Path) -> Result<PathBuf> {
    build_go_with(&go_binary(release), release, program, out)
}

/// tests/go/<program> built with Debian's Go ([`DEBIAN_GO`], installed if missing).
fn build_go_debian(program: &str, out: &Path) -> Result<PathBuf> {
    let (release, go) = DEBIAN_GO;
    if !Path::new(go).exists() {
        apt_install(&[&format!("golang-{release}-go")])?;
    }
    build_go_with(Path::new(go), release, program, out)
}

/// tests/go/<program> built with the `go` command of `release` into out/<program>-go<release>.
fn build_go_with(go: &Path, release: &str, program: &str, out: &Path) -> Result<PathBuf> {
    let binary = out.join(format!("{program}-go{release}"));
    let status = go_command(go, release)
        .args(["build", "-o"])
        .arg(&binary)
        .arg(format!("./{program}"))
        .status()?;
    ensure!(status.success(), "go build ./{program} failed");
    Ok(binary)
}

/// tests/go/benchbig plus a generated file of functions, as its own module in target/bench.
fn build_big(release: &str, out: &Path) -> Result<PathBuf> {
    let binary = out.join(format!("benchbig-go{release}"));
    let src = out.join("benchbig-src");
    std::fs::create_dir_all(&src)?;
    let main_go = std::fs::read_to_string(workspace_root().join("tests/go/benchbig/main.go"))?;
    let mut generated = String::from(
        "// Code generated by cargo xtask bench. DO NOT EDIT.\n\npackage main\n\nimport \"strconv\"\n\n",
    );
    for i in 0..BIG_GENERATED_FUNCTIONS {
        write!(
            generated,
            "//go:noinline\nfunc gen{i}(s string, n int) (string, int) {{\n\tswitch n % 7 {{\n\tcase 0:\n\t\ts += strconv.Itoa(n * {i})\n\tcase 1:\n\t\tn = n*{a} ^ len(s)\n\tcase 2:\n\t\ts = s[:len(s)/2] + \"g{i}\"\n\tcase 3:\n\t\tfor j := 0; j < n%{b}; j++ {{\n\t\t\tn += j * {c}\n\t\t}}\n\tdefault:\n\t\ts = strconv.Quote(s) + strconv.FormatInt(int64(n), {d})\n\t}}\n\treturn s, n + {i}\n}}\n\n",
            a = i + 3,
            b = i % 5 + 2,
            c = i % 11 + 1,
            d = i % 30 + 2
        )?;
    }
    generated.push_str("var generated = []func(string, int) (string, int){\n");
    for i in 0..BIG_GENERATED_FUNCTIONS {
        writeln!(generated, "\tgen{i},")?;
    }
    generated.push_str("}\n\nfunc init() { extra = append(extra, generated) }\n");
    let unchanged = std::fs::read_to_string(src.join("main.go")).is_ok_and(|s| s == main_go)
        && std::fs::read_to_string(src.join("gen.go")).is_ok_and(|s| s == generated)
        && binary.exists();
    if !unchanged {
        std::fs::write(src.join("go.mod"), "module benchbig\n\ngo 1.21\n")?;
        std::fs::write(src.join("main.go"), &main_go)?;
        std::fs::write(src.join("gen.go"), &generated)?;
        eprintln!("[bench] building the large binary (a few minutes the first time)");
        let status = go_command(&go_binary(release), release)
            .current_dir(&src)
            .args(["build", "-o"])
            .arg(&binary)
            .arg(".")
            .status()?;
        ensure!(status.success(), "go build benchbig failed");
    }
    Ok(binary)
}

fn sh(cmd: &str) -> String {
    Command::new("sh")
        .args(["-c", cmd])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

fn fuzz_processes() -> Vec<String> {
    sh("pgrep -fa 'cargo-fuzz|libfuzzer|fuzz run|/fuzz/|xtask fuzz' | grep -v pgrep")
        .lines()
        .map(str::to_owned)
        .collect()
}

fn environment(release: &str) -> Result<Value> {
    Ok(json!({
        "date": sh("date -u +%Y-%m-%dT%H:%M:%SZ"),
        "kernel": sh("uname -r"),
        "cpu": sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"),
        "cpus": sh("nproc"),
        "loadavg": sh("cat /proc/loadavg"),
        "go": release,
        "bpftrace": sh("bpftrace --version"),
        "wrk": sh("wrk -v 2>&1 | head -1"),
        "git_head": sh("git -C \"$(pwd)\" rev-parse --short HEAD"),
        "git_dirty_files": sh("git status --short --untracked-files=no | wc -l"),
        "fuzz_processes_before": fuzz_processes(),
        "top_cpu": sh("ps -eo pcpu,comm --sort=-pcpu --no-headers | head -5").lines().map(str::trim).collect::<Vec<_>>(),
    }))
}

// ---------------------------------------------------------------------- running programs

/// What one run of benchhits printed, plus the tracer's view.
struct Run {
    result: Value,
    /// Everything on stdout (bpftrace's counts follow the result line).
    stdout: String,
}

/// Runs `cmd` (a tracer wrapping benchhits, or benchhits itself), reading stdout line by line;
/// `on_result(pid)` runs as soon as the benchmark's JSON result line appears, while the
/// program lingers and the probes are attached.
fn run_hits(mut cmd: Command, mut on_result: impl FnMut(u32) -> Result<()>) -> Result<Run> {
    let err_path = std::env::temp_dir().join(format!("xtask-bench-{}.stderr", std::process::id()));
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(File::create(&err_path)?)
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))?;
    let pid = child.id();
    let mut stdout = String::new();
    let mut result = None;
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line?;
        if result.is_none() && line.starts_with('{') && line.contains("ns_per_call") {
            result = Some(serde_json::from_str::<Value>(&line)?);
            on_result(pid)?;
        }
        stdout.push_str(&line);
        stdout.push('\n');
    }
    let status = child.wait()?;
    let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
    let _ = std::fs::remove_file(&err_path);
    ensure!(status.success(), "{cmd:?} failed ({status}):\n{stdout}\n{stderr}");
    let result =
        result.with_context(|| format!("no result line from {cmd:?}:\n{stdout}\n{stderr}"))?;
    Ok(Run { result, stdout })
}

/// Count-only bpftrace probes on `functions` (entry uprobes; `bpftrace -p PID` scopes them).
fn bpftrace_script(binary: &Path, functions: &[String]) -> String {
    functions
        .iter()
        .map(|f| format!("uprobe:{}:\"{f}\" {{ @[probe] = count(); }}\n", binary.display()))
        .collect()
}

/// Sum of bpftrace's `@[...]: N` lines.
fn bpftrace_hits(stdout: &str) -> u64 {
    stdout
        .lines()
        .filter(|l| l.starts_with("@["))
        .filter_map(|l| l.rsplit(": ").next()?.trim().parse::<u64>().ok())
        .sum()
}

/// The counts of a deferprobe report whose budget never sampled: every hit was traced.
fn deferprobe_counts(report: &Path) -> Result<Value> {
    let report: Value = serde_json::from_str(&std::fs::read_to_string(report)?)?;
    let sampled = &report["governor"]["sampled"];
    ensure!(
        sampled.as_array().is_none_or(Vec::is_empty),
        "the governor sampled a run meant to trace every hit: {sampled}"
    );
    Ok(report["counts"].clone())
}

/// Probe hits deferprobe counted: every counted family (allocations once each).
fn counted_hits(counts: &Value) -> u64 {
    ["mapassign", "deferproc", "deferproc_stack", "deferreturn", "mallocgc", "goroutine_exits"]
        .iter()
        .map(|k| counts[k].as_u64().unwrap_or(0))
        .sum()
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 { values[n / 2] } else { (values[n / 2 - 1] + values[n / 2]) / 2.0 }
}

/// The probe plan's function names, by program, from `deferprobe inspect --json`.
fn plan_functions(ctx: &Ctx, binary: &Path) -> Result<Vec<(String, String)>> {
    let out = Command::new(&ctx.deferprobe).args(["inspect", "--json"]).arg(binary).output()?;
    ensure!(
        out.status.success(),
        "deferprobe inspect failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let inspect: Value = serde_json::from_slice(&out.stdout)?;
    Ok(inspect["plan"]["probes"]
        .as_array()
        .context("no plan.probes")?
        .iter()
        .filter_map(|p| Some((p["program"].as_str()?.to_owned(), p["symbol"].as_str()?.to_owned())))
        .collect())
}

struct Workload {
    name: &'static str,
    /// What bpftrace counts: the runtime functions this workload hits.
    functions: Vec<String>,
}

fn workloads(ctx: &Ctx, hits: &Path) -> Result<Vec<Workload>> {
    let plan = plan_functions(ctx, hits)?;
    let alloc: Vec<String> = plan
        .iter()
        .filter(|(program, _)| program.starts_with("mallocgc"))
        .map(|(_, f)| f.clone())
        .collect();
    Ok(vec![
        Workload {
            name: "defer",
            functions: vec!["runtime.deferproc".into(), "runtime.deferreturn".into()],
        },
        // Defer registration of a closure that captures a map (the kernel reads none of it).
        Workload {
            name: "capture",
            functions: vec!["runtime.deferproc".into(), "runtime.deferreturn".into()],
        },
        Workload { name: "map", functions: vec!["runtime.mapassign_fast64".into()] },
        Workload { name: "alloc", functions: alloc },
    ])
}

fn hits_args(workload: &str, calls: u64, linger: &str) -> Vec<String> {
    ["-workload", workload, "-n", &calls.to_string(), "-linger", linger].map(str::to_owned).to_vec()
}

fn deferprobe_run(ctx: &Ctx, report: &Path) -> Command {
    let mut cmd = Command::new(&ctx.deferprobe);
    cmd.args(["run", "--interval", "1h", "--report"]).arg(report);
    if ctx.governor {
        cmd.args(["--max-overhead", "1000"]);
    }
    cmd
}

// ------------------------------------------------------------------------------ per hit

/// One repetition of benchhits untraced and under the bpftrace `script`: ns per call of each,
/// and the hits bpftrace counted.
fn untraced_and_bpftrace(
    hits: &Path,
    args: &[String],
    script: &Path,
    command_line: &str,
) -> Result<(f64, f64, u64)> {
    let mut cmd = Command::new(hits);
    cmd.args(args);
    let untraced = run_hits(cmd, |_| Ok(()))?.result["ns_per_call"].as_f64().unwrap_or(0.0);
    let mut cmd = Command::new("bpftrace");
    cmd.arg(script).arg("-c").arg(command_line);
    let run = run_hits(cmd, |_| Ok(()))?;
    let traced = run.result["ns_per_call"].as_f64().unwrap_or(0.0);
    Ok((untraced, traced, bpftrace_hits(&run.stdout)))
}

/// One workload of the per-hit section on one Go release: its command lines and samples.
struct PerHitCase {
    release: String,
    hits: PathBuf,
    workload: Workload,
    script: PathBuf,
    args: Vec<String>,
    command_line: String,
    samples: [Vec<f64>; 3],
    bpftrace_hits: u64,
    counts: Value,
}

/// Per-hit cost of each workload on each `(release, benchhits)` of `builds` (the first the
/// default release): for each workload, the repetitions interleave untraced, bpftrace and
/// deferprobe runs of every release, so that the ratios between releases come from one run.
fn per_hit(ctx: &Ctx, builds: &[(String, PathBuf)], calls: u64) -> Result<Value> {
    let mut by_workload: Vec<Vec<PerHitCase>> = Vec::new();
    for (release, hits) in builds {
        for (i, workload) in workloads(ctx, hits)?.into_iter().enumerate() {
            let script = ctx.out.join(format!("count-{}-go{release}.bt", workload.name));
            std::fs::write(&script, bpftrace_script(hits, &workload.functions))?;
            let args = hits_args(workload.name, calls, "0s");
            let command_line = format!("{} {}", hits.display(), args.join(" "));
            if by_workload.len() <= i {
                by_workload.push(Vec::new());
            }
            by_workload[i].push(PerHitCase {
                release: release.clone(),
                hits: hits.clone(),
                workload,
                script,
                args,
                command_line,
                samples: Default::default(),
                bpftrace_hits: 0,
                counts: Value::Null,
            });
        }
    }
    let report = ctx.out.join("per-hit-report.json");
    let mut rows = Vec::new();
    for cases in &mut by_workload {
        for rep in 0..ctx.reps {
            for case in cases.iter_mut() {
                eprintln!(
                    "[bench]   {} (Go {}) rep {}/{}",
                    case.workload.name,
                    case.release,
                    rep + 1,
                    ctx.reps
                );
                let (untraced_ns, bpftrace_ns, hits_seen) = untraced_and_bpftrace(
                    &case.hits,
                    &case.args,
                    &case.script,
                    &case.command_line,
                )?;
                case.samples[0].push(untraced_ns);
                case.samples[1].push(bpftrace_ns);
                case.bpftrace_hits = hits_seen;

                let mut cmd = deferprobe_run(ctx, &report);
                cmd.arg("--").arg(&case.hits).args(&case.args);
                let run = run_hits(cmd, |_| Ok(()))?;
                case.samples[2].push(run.result["ns_per_call"].as_f64().unwrap_or(0.0));
                case.counts = deferprobe_counts(&report)?;
            }
        }
        let mut default_ns_per_hit = None;
        for case in cases.iter_mut() {
            let [base, bt, dp] = &mut case.samples;
            let (base_ns, bt_ns, dp_ns) = (median(base), median(bt), median(dp));
            let calls_total = (calls + 100) as f64; // + benchhits' untimed warm-up calls
            let hits_per_call = case.bpftrace_hits as f64 / calls_total;
            let ns_per_hit = (dp_ns - base_ns) / hits_per_call;
            // Against the default release (the first build), measured in the same run.
            let release_ratio = match default_ns_per_hit {
                None => {
                    default_ns_per_hit = Some(ns_per_hit);
                    Value::Null
                }
                Some(default) => json!(ns_per_hit / default),
            };
            let command_line = &case.command_line;
            rows.push(json!({
                "workload": case.workload.name,
                "go": case.release,
                "bpftrace_functions": case.workload.functions,
                "calls": calls,
                "untraced_ns_per_call": base_ns,
                "bpftrace_ns_per_call": bt_ns,
                "deferprobe_ns_per_call": dp_ns,
                "bpftrace_added_ns_per_call": bt_ns - base_ns,
                "deferprobe_added_ns_per_call": dp_ns - base_ns,
                "ratio": (dp_ns - base_ns) / (bt_ns - base_ns),
                "bpftrace_hits_per_call": hits_per_call,
                "deferprobe_ns_per_hit": ns_per_hit,
                "release_ratio": release_ratio,
                "deferprobe_counted_per_call": counted_hits(&case.counts) as f64 / calls_total,
                "deferprobe_counts": case.counts,
                "samples": {"untraced": base, "bpftrace": bt, "deferprobe": dp},
                "command_untraced": command_line,
                "command_bpftrace": format!("bpftrace {} -c '{command_line}'", case.script.display()),
                "command_deferprobe": format!("{} run --interval 1h --report R.json{} -- {command_line}", ctx.deferprobe.display(), if ctx.governor { " --max-overhead 1000" } else { "" }),
            }));
        }
    }
    // Reference: bpftrace's cost per hit on an instruction the kernel emulates (deferprocStack
    // starts with PUSHQ BP), as are the instructions deferprobe's probes sit on (the stack
    // check's JBE, or CALLs), rather than the CMPQ of a function's entry, which the kernel
    // single-steps. On the default release only: before Go 1.21 no function starts with
    // PUSHQ BP.
    let (release, hits) = &builds[0];
    let script_path = ctx.out.join("count-stack.bt");
    std::fs::write(&script_path, bpftrace_script(hits, &["runtime.deferprocStack".to_owned()]))?;
    let args = hits_args("stack", calls, "0s");
    let command_line = format!("{} {}", hits.display(), args.join(" "));
    let (mut base, mut bt) = (Vec::new(), Vec::new());
    let mut bt_hits = 0;
    for _ in 0..ctx.reps {
        let (untraced_ns, bpftrace_ns, hits_seen) =
            untraced_and_bpftrace(hits, &args, &script_path, &command_line)?;
        base.push(untraced_ns);
        bt.push(bpftrace_ns);
        bt_hits = hits_seen;
    }
    let hits_per_call = bt_hits as f64 / (calls + 100) as f64;
    let push_ns_per_hit = (median(&mut bt) - median(&mut base)) / hits_per_call;
    for row in &mut rows {
        row["bpftrace_push_ns_per_hit"] = json!(push_ns_per_hit);
        row["placement_matched_ratio"] = json!(f(&row["deferprobe_ns_per_hit"]) / push_ns_per_hit);
    }
    rows.push(json!({
        "workload": "stack (reference)",
        "go": release,
        "bpftrace_functions": ["runtime.deferprocStack"],
        "bpftrace_hits_per_call": hits_per_call,
        "bpftrace_push_ns_per_hit": push_ns_per_hit,
        "samples": {"untraced": base, "bpftrace": bt},
        "command_untraced": command_line,
        "command_bpftrace": format!("bpftrace {} -c '{command_line}'", script_path.display()),
    }));
    Ok(Value::Array(rows))
}

// ------------------------------------------------------------------------- kernel side

/// Turns `kernel.bpf_stats_enabled` on, and back to what it was when dropped.
struct BpfStats {
    previous: String,
}

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl BpfStats {
    fn enable() -> Result<BpfStats> {
        let previous = std::fs::read_to_string(BPF_STATS)?.trim().to_owned();
        std::fs::write(BPF_STATS, "1").context("sysctl kernel.bpf_stats_enabled=1 (needs root)")?;
        Ok(BpfStats { previous })
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = std::fs::write(BPF_STATS, &self.previous);
    }
}

fn bpftool_progs() -> Result<Vec<Value>> {
    let out = Command::new("bpftool").args(["prog", "show", "--json"]).output()?;
    ensure!(out.status.success(), "bpftool prog show failed");
    let progs: Value = serde_json::from_slice(&out.stdout)?;
    Ok(progs.as_array().cloned().unwrap_or_default())
}

/// Ids of the BPF programs loaded now.
fn prog_ids() -> Result<Vec<u64>> {
    Ok(bpftool_progs()?.iter().filter_map(|p| p["id"].as_u64()).collect())
}

/// run_cnt / run_time_ns of every BPF program loaded since `before` (Debian's bpftool doesn't
/// report the owning pids; nothing else loads programs during the benchmark).
fn prog_stats(before: &[u64]) -> Result<Vec<Value>> {
    // Programs of one name (bpftrace loads one per probe) are summed.
    let mut by_name: Vec<(String, u64, u64, u64)> = Vec::new();
    for p in
        bpftool_progs()?.iter().filter(|p| p["id"].as_u64().is_some_and(|id| !before.contains(&id)))
    {
        let name = p["name"].as_str().unwrap_or("?").to_owned();
        let (cnt, ns) =
            (p["run_cnt"].as_u64().unwrap_or(0), p["run_time_ns"].as_u64().unwrap_or(0));
        match by_name.iter_mut().find(|(n, ..)| *n == name) {
            Some(entry) => {
                entry.1 += cnt;
                entry.2 += ns;
                entry.3 += 1;
            }
            None => by_name.push((name, cnt, ns, 1)),
        }
    }
    Ok(by_name
        .into_iter()
        .filter(|(_, cnt, ..)| *cnt > 0)
        .map(|(name, cnt, ns, programs)| {
            json!({"name": name, "programs": programs, "run_cnt": cnt, "run_time_ns": ns, "ns_per_run": ns as f64 / cnt as f64})
        })
        .collect())
}

/// VmHWM of `pid` in KiB.
fn peak_rss_kib(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// Goroutine counts of the snapshot benchmark, and its goals (ms).
const SNAPSHOT_GOROUTINES: [(u64, f64); 2] = [(10_000, 100.0), (100_000, 1000.0)];

/// `deferprobe snapshot` of `captures -scenario many`: that many goroutines, each holding one
/// pending heap defer capturing a map; `ctx.reps` snapshots each, their `read_ms` (the reading
/// alone) and wall time, and deferprobe's peak RSS (`/usr/bin/time`).
fn snapshot(ctx: &Ctx, captures: &Path) -> Result<Value> {
    let mut rows = Vec::new();
    for (goroutines, goal_ms) in SNAPSHOT_GOROUTINES {
        let mut program = Command::new(captures);
        program.args(["-scenario", "many", "-n", "1", "-goroutines", &goroutines.to_string()]);
        // Without -wait the program works at once, prints its truth, and holds until stdin
        // closes; spawn_until gives it a null stdin, so hold it open here.
        program.stdin(Stdio::piped());
        let mut child = program.stdout(Stdio::piped()).stderr(Stdio::null()).spawn()?;
        let stdin = child.stdin.take();
        let mut reader = BufReader::new(child.stdout.take().expect("piped"));
        let mut truth = String::new();
        while !truth.contains("pending_defers") {
            truth.clear();
            ensure!(reader.read_line(&mut truth)? > 0, "captures ended before its truth");
        }
        let pid = child.id().to_string();
        let (mut read_ms, mut wall_ms, mut rss_kib) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..ctx.reps.max(3) {
            let started = Instant::now();
            let output = Command::new("/usr/bin/time")
                .args(["-f", "%M"])
                .arg(&ctx.deferprobe)
                .args(["snapshot", "--pid", &pid, "--json"])
                .output()?;
            wall_ms.push(started.elapsed().as_secs_f64() * 1e3);
            ensure!(output.status.success(), "deferprobe snapshot failed");
            let report: Value = serde_json::from_slice(&output.stdout)?;
            ensure!(
                report["pending"]["heap_defers"] == goroutines,
                "snapshot saw {} pending, not {goroutines}",
                report["pending"]["heap_defers"]
            );
            read_ms.push(f(&report["snapshot"]["read_ms"]));
            let stderr = String::from_utf8_lossy(&output.stderr);
            rss_kib.extend(stderr.lines().last().and_then(|l| l.trim().parse::<f64>().ok()));
        }
        drop(stdin);
        let _ = child.wait();
        rows.push(json!({
            "goroutines": goroutines,
            "goal_ms": goal_ms,
            "read_ms": read_ms,
            "median_read_ms": median(&mut read_ms.clone()),
            "median_wall_ms": median(&mut wall_ms),
            "peak_rss_kib": rss_kib.iter().cloned().fold(0.0, f64::max),
        }));
    }
    Ok(json!(rows))
}

fn kernel_side(ctx: &Ctx, hits: &Path, calls: u64) -> Result<Value> {
    let _stats = BpfStats::enable()?;
    let mut rows = Vec::new();
    for workload in workloads(ctx, hits)? {
        let script_path = ctx.out.join(format!("count-{}.bt", workload.name));
        std::fs::write(&script_path, bpftrace_script(hits, &workload.functions))?;
        let args = hits_args(workload.name, calls, "500ms");
        let command_line = format!("{} {}", hits.display(), args.join(" "));

        let mut bt_progs = Vec::new();
        let mut cmd = Command::new("bpftrace");
        cmd.arg(&script_path).arg("-c").arg(&command_line);
        let before = prog_ids()?;
        run_hits(cmd, |_| {
            bt_progs = prog_stats(&before)?;
            Ok(())
        })?;

        let report = ctx.out.join("kernel-report.json");
        let mut dp_progs = Vec::new();
        let mut dp_rss = None;
        let mut cmd = deferprobe_run(ctx, &report);
        cmd.arg("--").arg(hits).args(&args);
        let before = prog_ids()?;
        run_hits(cmd, |pid| {
            dp_progs = prog_stats(&before)?;
            dp_rss = peak_rss_kib(pid);
            Ok(())
        })?;
        rows.push(json!({
            "workload": workload.name,
            "bpftrace": bt_progs,
            "deferprobe": dp_progs,
            "deferprobe_peak_rss_kib": dp_rss,
        }));
    }
    Ok(Value::Array(rows))
}

// ------------------------------------------------------------------------ aggregator

fn aggregator() -> Result<Value> {
    let out = cargo()
        .current_dir(workspace_root())
        .args(["bench", "--package", "deferprobe", "--bench", "aggregator", "--", "all"])
        .stderr(Stdio::inherit())
        .output()?;
    ensure!(out.status.success(), "cargo bench --bench aggregator failed");
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    Ok(Value::Array(lines))
}

// ---------------------------------------------------------------------- attach latency

/// Spawns `cmd` and waits for a stdout line containing `marker`; returns the child and the line.
fn spawn_until(cmd: &mut Command, marker: &str) -> Result<(Child, String)> {
    let mut child =
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::null()).spawn()?;
    let mut reader = BufReader::new(child.stdout.take().expect("piped"));
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            let _ = child.kill();
            bail!("{cmd:?} ended before printing {marker:?}");
        }
        if line.contains(marker) {
            break;
        }
    }
    // Keep draining so the program never blocks on a full pipe.
    thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
    Ok((child, line.trim().to_owned()))
}

/// Runs `cmd`, returns (time until a line of `stream` contains `marker`, total wall time).
fn time_until(
    mut cmd: Command,
    marker: &str,
    on_stderr: bool,
) -> Result<(Option<f64>, f64, String)> {
    let started = Instant::now();
    let mut child =
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    let (watched, other) = match on_stderr {
        true => (
            Box::new(child.stderr.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
        ),
        false => (
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()) as Box<dyn std::io::Read + Send>,
        ),
    };
    let drain = thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut BufReader::new(other), &mut s);
        s
    });
    let mut live = None;
    let mut text = String::new();
    for line in BufReader::new(watched).lines() {
        let line = line?;
        if live.is_none() && line.contains(marker) {
            live = Some(started.elapsed().as_secs_f64() * 1e3);
        }
        text.push_str(&line);
        text.push('\n');
    }
    let status = child.wait()?;
    let total = started.elapsed().as_secs_f64() * 1e3;
    let other = drain.join().unwrap_or_default();
    ensure!(status.success(), "{cmd:?} failed ({status}):\n{text}\n{other}");
    Ok((live, total, text))
}

fn attach_latency(ctx: &Ctx, big: &Path) -> Result<Value> {
    let size = std::fs::metadata(big)?.len();
    let functions: Vec<String> = plan_functions(ctx, big)?.into_iter().map(|(_, f)| f).collect();
    let (mut target, ready) = spawn_until(Command::new(big).arg("x"), "ready pid")?;
    let pid = target.id();
    let script = ctx.out.join("attach.bt");
    let mut text = bpftrace_script(big, &functions);
    text.push_str("BEGIN { printf(\"live\\n\"); exit(); }\n");
    std::fs::write(&script, text)?;
    let (mut dp_live, mut dp_total, mut bt_live, mut bt_total) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut probes = String::new();
    let result = (|| -> Result<()> {
        for rep in 0..ctx.reps {
            eprintln!("[bench]   attach rep {}/{}", rep + 1, ctx.reps);
            let mut cmd = Command::new(&ctx.deferprobe);
            cmd.args(["run", "--pid", &pid.to_string(), "--duration", "1ms"]);
            let (live, total, stderr) = time_until(cmd, "probes attached", true)?;
            dp_live.push(live.context("no `probes attached` line")?);
            dp_total.push(total);
            if let Some(line) = stderr.lines().find(|l| l.contains("probes attached")) {
                probes = line.to_owned();
            }
            let mut cmd = Command::new("bpftrace");
            cmd.args(["-p", &pid.to_string()]).arg(&script);
            let (live, total, _) = time_until(cmd, "live", false)?;
            bt_live.push(live.context("bpftrace printed no `live`")?);
            bt_total.push(total);
        }
        Ok(())
    })();
    let _ = target.kill();
    let _ = target.wait();
    result?;
    Ok(json!({
        "binary": big.display().to_string(),
        "binary_bytes": size,
        "target": ready,
        "functions": functions.len(),
        "deferprobe_probes_line": probes,
        "deferprobe_to_attached_ms": median(&mut dp_live.clone()),
        "deferprobe_total_ms": median(&mut dp_total.clone()),
        "bpftrace_to_live_ms": median(&mut bt_live.clone()),
        "bpftrace_total_ms": median(&mut bt_total.clone()),
        "samples": {"deferprobe_to_attached_ms": dp_live, "deferprobe_total_ms": dp_total, "bpftrace_to_live_ms": bt_live, "bpftrace_total_ms": bt_total},
        "command_deferprobe": format!("{} run --pid P --duration 1ms", ctx.deferprobe.display()),
        "command_bpftrace": format!("bpftrace -p P {}", script.display()),
    }))
}

// --------------------------------------------------------------------------- service

/// Where the service runs and where everything else does. `--max-overhead` is a share of one
/// CPU: with the server alone on CPU 0 (`GOMAXPROCS=1`), what the probes cost it is what it
/// loses in throughput, and wrk and the tracers (on the other CPUs) take nothing from it. On a
/// single-CPU machine nothing is pinned.
struct Pinning {
    server: Option<String>,
    others: Option<String>,
}

impl Pinning {
    /// The first CPU this process may run on for the server, the others for the rest
    /// (`Cpus_allowed_list`, so a restricted cpuset is respected).
    fn new() -> Pinning {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let allowed = status.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:"));
        let cpus = allowed.map(|list| cpu_list(list.trim())).unwrap_or_default();
        match cpus.split_first() {
            Some((server, others)) if !others.is_empty() => Pinning {
                server: Some(server.to_string()),
                others: Some(others.iter().map(u32::to_string).collect::<Vec<_>>().join(",")),
            },
            _ => Pinning { server: None, others: None },
        }
    }

    fn command(cpus: &Option<String>, program: impl AsRef<std::ffi::OsStr>) -> Command {
        match cpus {
            Some(cpus) => {
                let mut cmd = Command::new("taskset");
                cmd.args(["-c", cpus]).arg(program);
                cmd
            }
            None => Command::new(program),
        }
    }

    fn server(&self, program: &Path) -> Command {
        let mut cmd = Self::command(&self.server, program);
        if self.server.is_some() {
            cmd.env("GOMAXPROCS", "1");
        }
        cmd
    }

    fn other(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        Self::command(&self.others, program)
    }

    fn describe(&self) -> String {
        match (&self.server, &self.others) {
            (Some(server), Some(others)) => format!(
                "server on CPU {server} with GOMAXPROCS=1 (`taskset -c {server}`), wrk and the \
                 tracers on CPU(s) {others}"
            ),
            _ => "not pinned (one CPU)".into(),
        }
    }
}

/// `0-2,5` → [0, 1, 2, 5].
fn cpu_list(list: &str) -> Vec<u32> {
    let mut cpus = Vec::new();
    for part in list.split(',').filter(|part| !part.is_empty()) {
        let (first, last) = part.split_once('-').unwrap_or((part, part));
        if let (Ok(first), Ok(last)) = (first.parse::<u32>(), last.parse::<u32>()) {
            cpus.extend(first..=last);
        }
    }
    cpus
}

/// One HTTP/1.0 exchange with `addr` (`request` without the Host header and the blank line):
/// the status code and the body.
fn http(addr: &str, request: &str) -> Result<(u16, String)> {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(format!("{request}\r\nHost: bench\r\n\r\n").as_bytes())?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok());
    Ok((status.with_context(|| format!("{request:?} answered {answer:?}"))?, body.to_owned()))
}

/// Requests the service has answered so far (its `GET /served`).
fn served(addr: &str) -> Result<u64> {
    let (_, body) = http(addr, "GET /served HTTP/1.0")?;
    body.trim().parse().with_context(|| format!("GET /served answered {body:?}"))
}

/// The service's throughput over the next `secs` seconds, wrk keeping the load on.
fn throughput(addr: &str, pid: &str, secs: u64) -> Result<Sample> {
    let (before, cpu, started) = (served(addr)?, cpu_secs(pid)?, Instant::now());
    thread::sleep(Duration::from_secs(secs));
    let (after, cpu) = (served(addr)?, cpu_secs(pid)? - cpu);
    let requests = after - before;
    Ok(Sample::new(requests as f64 / started.elapsed().as_secs_f64(), requests, cpu))
}

/// User + system CPU time of process `pid` so far, in seconds (/proc/PID/stat, every thread,
/// exited ones included). The uprobe traps and BPF programs run in the process's threads, as
/// system time.
fn cpu_secs(pid: &str) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command's closing parenthesis: state is field 3, utime 14, stime 15.
    let fields: Vec<&str> =
        stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("").split_whitespace().collect();
    let ticks = |index: usize| -> Result<f64> {
        Ok(fields.get(index).context("short /proc/PID/stat")?.parse::<f64>()?)
    };
    Ok((ticks(11)? + ticks(12)?) / clock_ticks())
}

/// `getconf CLK_TCK`: the unit of /proc/PID/stat's times.
fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| sh("getconf CLK_TCK").parse().unwrap_or(100.0))
}

fn interrupt(child: &mut Child) -> Result<()> {
    Command::new("kill").args(["-INT", &child.id().to_string()]).status()?;
    child.wait()?;
    Ok(())
}

/// Starts a tracer on the service and waits until its probes are live.
fn start_tracer(mut cmd: Command, marker: &str, log: &Path) -> Result<Child> {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(File::create(log)?)
        .stderr(File::try_clone(&File::options().append(true).open(log)?)?)
        .spawn()?;
    let started = Instant::now();
    while !std::fs::read_to_string(log).unwrap_or_default().contains(marker) {
        ensure!(started.elapsed() < Duration::from_secs(60), "tracer never printed {marker:?}");
        thread::sleep(Duration::from_millis(20));
    }
    Ok(child)
}

/// `deferprobe run --pid PID` with `flags`, on the tracers' CPUs, once its probes are live; its
/// JSON report goes to `report` when it is interrupted.
fn attach_deferprobe(
    ctx: &Ctx,
    pinning: &Pinning,
    pid: &str,
    flags: &[&str],
    report: &Path,
    log: &Path,
) -> Result<Child> {
    let mut cmd = pinning.other(&ctx.deferprobe);
    cmd.args(["run", "--pid", pid, "--interval", "1h", "--report"]).arg(report).args(flags);
    start_tracer(cmd, "probes attached", log)
}

/// Loss of a traced phase in points of the untraced throughput: against the mean of the
/// untraced phases before and after it.
fn loss_points(traced: f64, before: f64, after: f64) -> f64 {
    100.0 * (1.0 - traced / ((before + after) / 2.0))
}

/// What one A/B/A loss would scatter by (1σ, in points) with nothing traced, from the scatter
/// of consecutive untraced phases: one phase's relative scatter σ is that of their
/// differences over √2, and a loss compares a phase with the mean of two, √(1 + 1/2) σ. None
/// with fewer than three phases.
fn loss_noise_points(untraced: &[f64]) -> Option<f64> {
    let differences: Vec<f64> =
        untraced.windows(2).map(|pair| 200.0 * (pair[1] - pair[0]) / (pair[1] + pair[0])).collect();
    if differences.len() < 2 {
        return None;
    }
    let n = differences.len() as f64;
    let mean = differences.iter().sum::<f64>() / n;
    let variance = differences.iter().map(|d| (d - mean).powi(2)).sum::<f64>() / (n - 1.0);
    Some((variance / 2.0).sqrt() * 1.5f64.sqrt())
}

/// A loss against its goal: "met" or "missed" when the median is more than two standard
/// errors from the goal, else "unsettled" (the machine's noise can't tell).
fn loss_verdict(loss: f64, error: Option<f64>, goal: f64) -> &'static str {
    match error {
        Some(error) if (loss - goal).abs() <= 2.0 * error => "unsettled",
        _ if loss <= goal => "met",
        _ => "missed",
    }
}

/// What a phase measured of the server: requests/s, and its CPU time per request.
#[derive(Clone, Copy)]
struct Sample {
    rps: f64,
    cpu_us_per_request: f64,
}

impl Sample {
    fn new(rps: f64, requests: u64, cpu_secs: f64) -> Sample {
        Sample { rps, cpu_us_per_request: cpu_secs * 1e6 / requests as f64 }
    }
}

/// A/B/A phases: an untraced phase, then `reps` times each configuration's traced phase
/// followed by an untraced one.
struct Phases {
    untraced: Vec<Sample>,
    /// By configuration: each traced phase, and the untraced phases before and after it.
    traced: Vec<Vec<(Sample, Sample, Sample)>>,
}

impl Phases {
    /// `untraced()` measures an untraced phase, `traced(i)` one under configuration `i` (of
    /// `configs`, the names logged). The machine's speed drifts by ±10 % over minutes, and the
    /// adjacent untraced phases follow it.
    fn run(
        label: &str,
        reps: usize,
        configs: &[&str],
        mut untraced: impl FnMut() -> Result<Sample>,
        mut traced: impl FnMut(usize) -> Result<Sample>,
    ) -> Result<Phases> {
        let mut phases =
            Phases { untraced: vec![untraced()?], traced: vec![Vec::new(); configs.len()] };
        for rep in 0..reps {
            for (index, name) in configs.iter().enumerate() {
                eprintln!("[bench]   {label} {name} rep {}/{reps}", rep + 1);
                let sample = traced(index)?;
                let before = *phases.untraced.last().expect("starts with one");
                let after = untraced()?;
                phases.untraced.push(after);
                phases.traced[index].push((before, sample, after));
            }
        }
        Ok(phases)
    }

    /// `{"untraced": {requests_per_sec, samples, cpu_us_per_request}, CONFIG: {requests_per_sec,
    /// samples, loss_points, losses, cpu_us_per_request, cpu_loss_points, cpu_losses}, …}`,
    /// medians of the phases. The CPU loss is the throughput lost at equal CPU time:
    /// 100 × (1 − untraced CPU per request / traced), against the neighbours' mean; unlike the
    /// throughput, it doesn't move with the share of its CPU that other processes take.
    fn rows(&self, configs: &[&str]) -> Value {
        let rps = |samples: &[Sample]| samples.iter().map(|s| s.rps).collect::<Vec<_>>();
        let cpu =
            |samples: &[Sample]| samples.iter().map(|s| s.cpu_us_per_request).collect::<Vec<_>>();
        let noise = loss_noise_points(&rps(&self.untraced));
        let mut rows = json!({
            "untraced": {
                "requests_per_sec": median(&mut rps(&self.untraced)),
                "samples": rps(&self.untraced),
                "cpu_us_per_request": median(&mut cpu(&self.untraced)),
                "loss_noise_points": noise,
            },
        });
        for (index, name) in configs.iter().enumerate() {
            let phases = &self.traced[index];
            let traced: Vec<Sample> = phases.iter().map(|(_, s, _)| *s).collect();
            let losses: Vec<f64> =
                phases.iter().map(|(b, s, a)| loss_points(s.rps, b.rps, a.rps)).collect();
            let cpu_losses: Vec<f64> = phases
                .iter()
                .map(|(b, s, a)| {
                    let untraced = (b.cpu_us_per_request + a.cpu_us_per_request) / 2.0;
                    100.0 * (1.0 - untraced / s.cpu_us_per_request)
                })
                .collect();
            rows[*name] = json!({
                "requests_per_sec": median(&mut rps(&traced)),
                "samples": rps(&traced),
                "loss_points": median(&mut losses.clone()),
                // The median's standard error (1.25 σ/√n for a median) at the untraced noise.
                "loss_error_points": noise.map(|noise| 1.25 * noise / (losses.len() as f64).sqrt()),
                "losses": losses,
                "cpu_us_per_request": median(&mut cpu(&traced)),
                "cpu_loss_points": median(&mut cpu_losses.clone()),
                "cpu_losses": cpu_losses,
            });
        }
        rows
    }
}

fn service(ctx: &Ctx, svc: &Path, secs: u64) -> Result<Value> {
    let pinning = Pinning::new();
    let (mut server, line) = spawn_until(&mut pinning.server(svc), "listening on")?;
    let addr = line.trim_start_matches("listening on ").to_owned();
    let url = format!("http://{addr}/items?n=16");
    let pid = server.id().to_string();
    let functions: Vec<String> = plan_functions(ctx, svc)?.into_iter().map(|(_, f)| f).collect();
    let script = ctx.out.join("service.bt");
    let mut text = bpftrace_script(svc, &functions);
    text.push_str("BEGIN { printf(\"live\\n\"); }\n");
    std::fs::write(&script, text)?;
    let log = ctx.out.join("service-tracer.log");
    let report = ctx.out.join("service-report.json");
    // Each deferprobe configuration: its extra flags. "all on" and the single families pass a
    // budget that never samples.
    let deferprobe_configs: Vec<(&str, Vec<&str>)> = vec![
        ("deferprobe", vec![]),
        ("deferprobe_max_overhead_10", vec!["--max-overhead", "10"]),
        ("deferprobe_all_on", vec!["--max-overhead", "1000"]),
        ("deferprobe_defers", vec!["--max-overhead", "1000", "--probes", "defers"]),
        ("deferprobe_map_writes", vec!["--max-overhead", "1000", "--probes", "map-writes"]),
        ("deferprobe_allocations", vec!["--max-overhead", "1000", "--probes", "allocations"]),
    ];
    let traced: Vec<&str> =
        deferprobe_configs.iter().map(|(name, _)| *name).chain(["bpftrace"]).collect();
    // wrk keeps the load on from start to end; each phase is what the server counted.
    let mut load = pinning
        .other("wrk")
        .args(["-t1", "-c8", "-d1h", &url])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let mut counts = json!({});
    thread::sleep(Duration::from_secs(1)); // warm-up
    let phases = Phases::run(
        "service",
        ctx.reps,
        &traced,
        || throughput(&addr, &pid, secs),
        |index| {
            let name = traced[index];
            let Some((_, flags)) = deferprobe_configs.get(index) else {
                let mut cmd = pinning.other("bpftrace");
                cmd.args(["-p", &pid]).arg(&script);
                let mut tracer = start_tracer(cmd, "live", &log)?;
                let sample = throughput(&addr, &pid, secs);
                interrupt(&mut tracer)?;
                return sample;
            };
            let mut tracer = attach_deferprobe(ctx, &pinning, &pid, flags, &report, &log)?;
            let sample = throughput(&addr, &pid, secs);
            interrupt(&mut tracer)?;
            let full: Value = serde_json::from_str(&std::fs::read_to_string(&report)?)?;
            counts[name] = json!({"counts": full["counts"], "duration_secs": full["duration_secs"],
                "governor": full["governor"]});
            sample
        },
    );
    let _ = load.kill();
    let _ = load.wait();
    let _ = server.kill();
    let _ = server.wait();
    let phases = phases?;
    Ok(json!({
        "url": url,
        "wrk": format!("wrk -t1 -c8 {url}"),
        "secs": secs,
        "pinning": pinning.describe(),
        "functions": functions.len(),
        "results": phases.rows(&traced),
        "deferprobe_reports": counts,
        "command_bpftrace": format!("bpftrace -p P {}", script.display()),
    }))
}

// --------------------------------------------------------------------------- servers

/// Debian's Go toolchain that benchsvc is also built with (the Go of Debian's servers).
const DEBIAN_GO: (&str, &str) = ("1.19", "/usr/lib/go-1.19/bin/go");

/// deferprobe configurations of the `servers` section: name, label, flags and the goal (the
/// loss at most this many points).
const SERVER_CONFIGS: [(&str, &str, &[&str], f64); 3] = [
    ("max_overhead_5", "`--max-overhead 5`", &["--max-overhead", "5"], 5.5),
    ("max_overhead_10", "`--max-overhead 10`", &["--max-overhead", "10"], 10.5),
    ("defers", "`--probes defers`", &["--probes", "defers"], 5.0),
];

/// One server of the `servers` section, set up in its own directory: how to start it, the path
/// polled until it answers 200, and the request wrk sends.
struct Server {
    name: String,
    /// Its own directory (data, logs, the deferprobe reports), removed afterwards.
    dir: PathBuf,
    binary: PathBuf,
    args: Vec<String>,
    addr: String,
    ready: String,
    /// A request made once the server is ready (data for the load to read).
    setup: Option<String>,
    /// What wrk loads: a path on `addr`, and a Lua script for a request other than a GET.
    load: String,
    wrk_script: Option<PathBuf>,
    /// What the load does, for the report.
    what: &'static str,
}

/// A port on 127.0.0.1 free now (the kernel's pick; the server binds it a moment later).
fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl Server {
    /// Prometheus scraping itself every second (its TSDB in `dir`), loaded with an instant query.
    fn prometheus(dir: &Path) -> Result<Server> {
        let addr = format!("127.0.0.1:{}", free_port()?);
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: self\n    \
                 static_configs:\n      - targets: ['{addr}']\n"
            ),
        )?;
        Ok(Server {
            name: "prometheus".into(),
            dir: dir.into(),
            binary: "/usr/bin/prometheus".into(),
            args: vec![
                format!("--config.file={}", config.display()),
                format!("--storage.tsdb.path={}", dir.join("data").display()),
                format!("--web.listen-address={addr}"),
                "--log.level=warn".into(),
            ],
            addr,
            ready: "/-/ready".into(),
            setup: None,
            load: "/api/v1/query?query=up".into(),
            wrk_script: None,
            what: "instant query `up` (PromQL parse and evaluation on the TSDB head, JSON)",
        })
    }

    /// A single-member etcd cluster (data in `dir`), loaded with linearizable reads of one key
    /// through the v3 JSON gateway: gRPC gateway, a raft read index, the MVCC store.
    fn etcd(dir: &Path) -> Result<Server> {
        let (client, peer) = (free_port()?, free_port()?);
        let addr = format!("127.0.0.1:{client}");
        let script = dir.join("range.lua");
        // "YmVuY2g=" is base64 of "bench".
        std::fs::write(
            &script,
            "wrk.method = \"POST\"\nwrk.body = '{\"key\":\"YmVuY2g=\"}'\n\
             wrk.headers[\"Content-Type\"] = \"application/json\"\n",
        )?;
        let peer_url = format!("http://127.0.0.1:{peer}");
        Ok(Server {
            name: "etcd".into(),
            dir: dir.into(),
            binary: "/usr/bin/etcd".into(),
            args: vec![
                "--name=bench".into(),
                format!("--data-dir={}", dir.join("data").display()),
                format!("--listen-client-urls=http://{addr}"),
                format!("--advertise-client-urls=http://{addr}"),
                format!("--listen-peer-urls={peer_url}"),
                format!("--initial-advertise-peer-urls={peer_url}"),
                format!("--initial-cluster=bench={peer_url}"),
                "--log-level=error".into(),
            ],
            addr,
            ready: "/health".into(),
            setup: Some(
                "POST /v3/kv/put HTTP/1.0\r\nContent-Length: 45\r\n\r\n\
                 {\"key\":\"YmVuY2g=\",\"value\":\"aGVsbG8gd29ybGQ=\"}"
                    .into(),
            ),
            load: "/v3/kv/range".into(),
            wrk_script: Some(script),
            what: "`POST /v3/kv/range` of one key (JSON gateway → gRPC, raft read index, MVCC)",
        })
    }

    /// `hugo server` on a generated site of 20 posts (in `dir`, rendered to memory), loaded with
    /// one post's page.
    fn hugo(dir: &Path) -> Result<Server> {
        let port = free_port()?;
        let site = dir.join("site");
        std::fs::create_dir_all(site.join("layouts/_default"))?;
        std::fs::create_dir_all(site.join("content/posts"))?;
        std::fs::write(
            site.join("config.toml"),
            "baseURL = \"http://127.0.0.1/\"\ntitle = \"bench\"\n\
             disableKinds = [\"taxonomy\", \"term\", \"RSS\", \"sitemap\"]\n",
        )?;
        std::fs::write(
            site.join("layouts/_default/single.html"),
            "<html><body><h1>{{ .Title }}</h1>{{ .Content }}</body></html>\n",
        )?;
        std::fs::write(
            site.join("layouts/_default/list.html"),
            "<html><body>{{ range .Pages }}<a href=\"{{ .RelPermalink }}\">{{ .Title }}</a>\
             {{ end }}</body></html>\n",
        )?;
        for i in 0..20 {
            std::fs::write(
                site.join(format!("content/posts/post-{i}.md")),
                format!("---\ntitle: \"Post {i}\"\n---\nSome *text* for post {i}.\n"),
            )?;
        }
        let port_arg = port.to_string();
        Ok(Server {
            name: "hugo".into(),
            dir: dir.into(),
            binary: "/usr/bin/hugo".into(),
            args: [
                "server",
                "--source",
                &site.display().to_string(),
                "--cacheDir",
                &dir.join("cache").display().to_string(),
                "--bind",
                "127.0.0.1",
                "--port",
                &port_arg,
                "--disableLiveReload",
            ]
            .map(str::to_owned)
            .to_vec(),
            addr: format!("127.0.0.1:{port}"),
            ready: "/posts/post-1/".into(),
            setup: None,
            load: "/posts/post-1/".into(),
            wrk_script: None,
            what: "one post's page (`hugo server` serves the site it rendered to memory)",
        })
    }

    /// tests/go/benchsvc built with Go `release`, as in section 6.
    fn benchsvc(dir: &Path, binary: &Path, release: &str) -> Result<Server> {
        let addr = format!("127.0.0.1:{}", free_port()?);
        Ok(Server {
            name: format!("benchsvc (Go {release})"),
            dir: dir.into(),
            binary: binary.into(),
            args: vec!["-addr".into(), addr.clone()],
            addr,
            ready: "/served".into(),
            setup: None,
            load: "/items?n=16".into(),
            wrk_script: None,
            what: "`GET /items?n=16` (section 6)",
        })
    }

    fn wrk(&self, pinning: &Pinning, secs: u64) -> Command {
        self.wrk_with(pinning, secs, Load::Saturating)
    }

    fn wrk_with(&self, pinning: &Pinning, secs: u64, load: Load) -> Command {
        let mut cmd = pinning.other("wrk");
        let (connections, script) = match load {
            Load::Saturating => (4, self.wrk_script.clone()),
            Load::Paced => (1, Some(self.dir.join("paced.lua"))),
        };
        cmd.args(["-t1", &format!("-c{connections}"), &format!("-d{secs}s")]);
        if let Some(script) = &script {
            cmd.arg("-s").arg(script);
        }
        cmd.arg(format!("http://{}{}", self.addr, self.load));
        cmd
    }

    /// Starts the server (pinned like section 6's, output into `log`) and waits until it is
    /// ready and set up.
    fn start(&self, pinning: &Pinning, log: &Path) -> Result<Child> {
        let mut server = pinning
            .server(&self.binary)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(File::create(log)?)
            .stderr(File::try_clone(&File::options().append(true).open(log)?)?)
            .spawn()
            .with_context(|| format!("starting {}", self.binary.display()))?;
        let started = Instant::now();
        let ready = format!("GET {} HTTP/1.0", self.ready);
        let result = loop {
            if let Some(status) = server.try_wait()? {
                break Err(anyhow::anyhow!(
                    "{} exited ({status}) before it was ready:\n{}",
                    self.name,
                    std::fs::read_to_string(log).unwrap_or_default()
                ));
            }
            if http(&self.addr, &ready).is_ok_and(|(status, _)| status == 200) {
                break self.setup.as_ref().map_or(Ok(()), |request| {
                    let (status, body) = http(&self.addr, request)?;
                    ensure!(status == 200, "{}: {request:?} answered {status}: {body}", self.name);
                    Ok(())
                });
            }
            if started.elapsed() > Duration::from_secs(60) {
                break Err(anyhow::anyhow!("{} not ready after 60 s", self.name));
            }
            thread::sleep(Duration::from_millis(100));
        };
        if result.is_err() {
            let _ = server.kill();
            let _ = server.wait();
        }
        result.map(|()| server)
    }
}

/// One wrk run of `secs` seconds: the requests/s it measured (every answer a 2xx).
fn wrk_phase(server: &Server, pinning: &Pinning, pid: &str, secs: u64) -> Result<Sample> {
    wrk_phase_with(server, pinning, pid, secs, Load::Saturating)
}

/// How wrk loads a server.
#[derive(Clone, Copy)]
enum Load {
    /// Four connections, each sending its next request on the last answer: the server's CPU
    /// is saturated, and what it loses shows as requests/s.
    Saturating,
    /// One connection waiting 1 ms after each answer ([`PACED_SCRIPT`]): the server has CPU to
    /// spare, so what the probes cost it shows as CPU time.
    Paced,
}

/// wrk's Lua hook for [`Load::Paced`], appended to the server's own script.
const PACED_SCRIPT: &str = "function delay()\n  return 1\nend\n";

/// [`wrk_phase`] under `load`.
fn wrk_phase_with(
    server: &Server,
    pinning: &Pinning,
    pid: &str,
    secs: u64,
    load: Load,
) -> Result<Sample> {
    let cpu = cpu_secs(pid)?;
    let out = server.wrk_with(pinning, secs, load).stdin(Stdio::null()).output()?;
    let cpu = cpu_secs(pid)? - cpu;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(out.status.success(), "wrk failed on {}: {text}", server.name);
    ensure!(!text.contains("Non-2xx"), "{} answered errors under wrk:\n{text}", server.name);
    let rps = text.lines().find_map(|l| l.strip_prefix("Requests/sec:")?.trim().parse().ok());
    // "  41234 requests in 3.00s, 12.34MB read"
    let requests = text.lines().find_map(|l| l.trim().split_once(" requests in ")?.0.parse().ok());
    match (rps, requests) {
        (Some(rps), Some(requests)) => Ok(Sample::new(rps, requests, cpu)),
        _ => bail!("no Requests/sec or request count in wrk's output:\n{text}"),
    }
}

/// What one traced phase's report says of the governor: the calibrated hit cost, each sampled
/// family's mean duty cycle, and the probe hits per second of each counter.
fn governor_summary(report: &Value) -> Value {
    let governor = &report["governor"];
    let duration = f(&report["duration_secs"]);
    let mut duty = json!({});
    // The measured cost of a hit: every probe alike, and each sampled family's own.
    let mut measured = json!({ "all": governor["measured_hit_cost_ns"] });
    for family in governor["sampled"].as_array().into_iter().flatten() {
        if let Some(name) = family["family"].as_str() {
            duty[name] = family["mean_duty_cycle"].clone();
            measured[name] = family["measured_hit_cost_ns"].clone();
        }
    }
    let mut hits = json!({});
    for (name, count) in report["counts"].as_object().into_iter().flatten() {
        if let (false, Some(count)) =
            (["alloc_bytes", "lost_events"].contains(&name.as_str()), count.as_f64())
        {
            hits[name] = json!(count / duration);
        }
    }
    json!({
        "hit_cost_ns": governor["hit_cost_ns"],
        "measured_ns": measured,
        "duty_cycles": duty,
        "hits_per_sec": hits,
    })
}

/// The median, key by key, of objects of numbers (a key missing from some is the median of
/// those that have it).
fn median_by_key(objects: &[&Value]) -> Value {
    let mut keys: Vec<&String> =
        objects.iter().filter_map(|o| o.as_object()).flat_map(|o| o.keys()).collect();
    keys.sort();
    keys.dedup();
    let mut out = json!({});
    for key in keys {
        let mut values: Vec<f64> = objects.iter().filter_map(|o| o[key].as_f64()).collect();
        out[key] = match values.is_empty() {
            true => Value::Null,
            false => json!(median(&mut values)),
        };
    }
    out
}

/// Medians over a configuration's phases of [`governor_summary`].
fn median_summary(summaries: &[Value]) -> Value {
    let field = |name: &str| summaries.iter().map(|s| &s[name]).collect::<Vec<_>>();
    let mut hit_cost: Vec<f64> =
        summaries.iter().filter_map(|s| s["hit_cost_ns"].as_f64()).collect();
    json!({
        "hit_cost_ns": median(&mut hit_cost),
        "measured_ns": median_by_key(&field("measured_ns")),
        "duty_cycles": median_by_key(&field("duty_cycles")),
        "hits_per_sec": median_by_key(&field("hits_per_sec")),
    })
}

/// One server's A/B/A phases under wrk: untraced, then each of [`SERVER_CONFIGS`], `reps`
/// times interleaved; a traced phase starts 1 s after its probes are live, under load.
fn server_phases(ctx: &Ctx, server: &Server, reps: usize, secs: u64) -> Result<Value> {
    let pinning = Pinning::new();
    let (log, report) = (server.dir.join("server.log"), server.dir.join("report.json"));
    let tracer_log = server.dir.join("tracer.log");
    let mut child = server.start(&pinning, &log)?;
    let pid = child.id().to_string();
    let names = SERVER_CONFIGS.map(|(name, ..)| name);
    let mut summaries: Vec<Vec<Value>> = vec![Vec::new(); names.len()];
    let phases = wrk_phase(server, &pinning, &pid, 1).and_then(|_warm_up| {
        Phases::run(
            &server.name,
            reps,
            &names,
            || wrk_phase(server, &pinning, &pid, secs),
            |index| {
                let flags = SERVER_CONFIGS[index].2;
                let mut tracer =
                    attach_deferprobe(ctx, &pinning, &pid, flags, &report, &tracer_log)?;
                let sample = wrk_phase(server, &pinning, &pid, 1)
                    .and_then(|_settle| wrk_phase(server, &pinning, &pid, secs));
                interrupt(&mut tracer)?;
                let full: Value = serde_json::from_str(&std::fs::read_to_string(&report)?)?;
                summaries[index].push(governor_summary(&full));
                sample
            },
        )
    });
    let measured = phases.as_ref().ok().map(|_| measuring_phase(ctx, server, &pinning, &pid));
    let _ = child.kill();
    let _ = child.wait();
    let phases = phases?;
    let measured = measured.expect("measured after the phases")?;
    let mut results = phases.rows(&names);
    for (index, (name, _, _, goal)) in SERVER_CONFIGS.iter().enumerate() {
        let loss = f(&results[*name]["loss_points"]);
        let error = results[*name]["loss_error_points"].as_f64();
        results[*name]["goal_points"] = json!(goal);
        results[*name]["met"] = json!(loss <= *goal);
        results[*name]["verdict"] = json!(loss_verdict(loss, error, *goal));
        results[*name]["governor"] = median_summary(&summaries[index]);
        results[*name]["governor_phases"] = json!(summaries[index]);
    }
    let wrk = format!("{:?}", server.wrk(&pinning, secs)).replace('"', "");
    Ok(json!({
        "server": server.name,
        "command": format!("{} {}", server.binary.display(), server.args.join(" ")),
        "load": server.what,
        "wrk": wrk,
        "results": results,
        "measured": measured,
    }))
}

/// The measuring phase's budget: low enough for the governor to sample the families a paced
/// server's requests hit (its windows are what the real cost of a hit is measured across).
const MEASURE_FLAGS: [&str; 2] = ["--max-overhead", "0.5"];
/// Long enough for the 10 comparisons a measured cost needs, and a few more.
const MEASURE_SECS: u64 = 30;

/// What a hit really costs `server` as deferprobe measures it while tracing (its CPU time
/// against its hits across the sampling windows, `governor.measured_hit_cost_ns`), every probe
/// alike and per sampled family, with errors, under [`Load::Paced`]: a server whose CPU is
/// saturated can't show the cost in its CPU time (it does less work instead). The server's
/// CPU share is recorded to tell.
fn measuring_phase(ctx: &Ctx, server: &Server, pinning: &Pinning, pid: &str) -> Result<Value> {
    eprintln!("[bench]   {} measuring the real cost of a hit", server.name);
    let own = match &server.wrk_script {
        Some(script) => std::fs::read_to_string(script)?,
        None => String::new(),
    };
    std::fs::write(server.dir.join("paced.lua"), own + PACED_SCRIPT)?;
    let (report, tracer_log) = (server.dir.join("measure.json"), server.dir.join("measure.log"));
    let mut tracer = attach_deferprobe(ctx, pinning, pid, &MEASURE_FLAGS, &report, &tracer_log)?;
    let phase = wrk_phase_with(server, pinning, pid, 1, Load::Paced).and_then(|_settle| {
        let cpu = cpu_secs(pid)?;
        let sample = wrk_phase_with(server, pinning, pid, MEASURE_SECS, Load::Paced)?;
        Ok((sample, cpu_secs(pid)? - cpu))
    });
    interrupt(&mut tracer)?;
    let (sample, cpu) = phase?;
    let full: Value = serde_json::from_str(&std::fs::read_to_string(&report)?)?;
    let governor = &full["governor"];
    let mut families = json!({});
    for family in governor["sampled"].as_array().into_iter().flatten() {
        if let Some(name) = family["family"].as_str() {
            families[name] = json!({
                "ns": family["measured_hit_cost_ns"],
                "error_ns": family["measured_hit_cost_error_ns"],
                "mean_duty_cycle": family["mean_duty_cycle"],
            });
        }
    }
    Ok(json!({
        "flags": MEASURE_FLAGS.join(" "),
        "secs": MEASURE_SECS,
        "go": full["target"]["go_version"],
        "requests_per_sec": sample.rps,
        "server_cpu_share": cpu / MEASURE_SECS as f64,
        "calibrated_ns": governor["calibrated_ns"],
        "hit_cost_ns": governor["hit_cost_ns"],
        "all": {
            "ns": governor["measured_hit_cost_ns"],
            "error_ns": governor["measured_hit_cost_error_ns"],
            "ticks": governor["measured_ticks"],
        },
        "families": families,
    }))
}

/// Section 8: Debian's prometheus, etcd and hugo, and benchsvc built with Debian's Go 1.19 and
/// with `release`, each under wrk in A/B/A phases of `secs` seconds (see [`server_phases`]).
fn servers(ctx: &Ctx, svc: &Path, release: &str, reps: usize, secs: u64) -> Result<Value> {
    super::install_debian_programs()?;
    let svc_debian = build_go_debian("benchsvc", &ctx.out)?;
    let debian_release = DEBIAN_GO.0;
    let root = std::env::temp_dir().join(format!("xtask-bench-servers-{}", std::process::id()));
    let mut rows = Vec::new();
    let result = (|| -> Result<()> {
        let dir = |name: &str| -> Result<PathBuf> {
            let dir = root.join(name);
            std::fs::create_dir_all(&dir)?;
            Ok(dir)
        };
        let servers = [
            Server::prometheus(&dir("prometheus")?)?,
            Server::etcd(&dir("etcd")?)?,
            Server::hugo(&dir("hugo")?)?,
            Server::benchsvc(&dir("benchsvc-debian")?, &svc_debian, debian_release)?,
            Server::benchsvc(&dir("benchsvc")?, svc, release)?,
        ];
        for server in &servers {
            eprintln!("[bench]   {}", server.name);
            rows.push(server_phases(ctx, server, reps, secs)?);
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&root);
    result?;
    Ok(json!({
        "reps": reps,
        "secs": secs,
        "pinning": Pinning::new().describe(),
        "servers": rows,
    }))
}

// ----------------------------------------------------------------------------- report

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

fn goal(ok: bool) -> &'static str {
    if ok { "met" } else { "**missed**" }
}

fn render(r: &Value, ctx: &Ctx, reps: usize, calls: u64, secs: u64) -> String {
    let mut s = String::new();
    let env = &r["environment"];
    let _ = writeln!(s, "{MARK_BEGIN}\n");
    let _ = writeln!(s, "### Run of {}\n", env["date"].as_str().unwrap_or("?"));
    let _ = writeln!(
        s,
        "`cargo xtask bench --reps {reps} --calls {calls} --service-secs {secs}` on Linux {}, {} × {}, \
         load average at start {}; Go {}; {}; git {} with {} modified tracked files{}.\n",
        env["kernel"].as_str().unwrap_or("?"),
        env["cpus"].as_str().unwrap_or("?"),
        env["cpu"].as_str().unwrap_or("?").trim(),
        env["loadavg"].as_str().unwrap_or("?"),
        env["go"].as_str().unwrap_or("?"),
        env["bpftrace"].as_str().unwrap_or("?"),
        env["git_head"].as_str().unwrap_or("?"),
        env["git_dirty_files"].as_str().unwrap_or("?"),
        if ctx.governor { "; this deferprobe has `--max-overhead`" } else { "" },
    );
    let fuzz_before = env["fuzz_processes_before"].as_array().map_or(0, Vec::len);
    let fuzz_after = env["fuzz_processes_after"].as_array().map_or(0, Vec::len);
    let _ = writeln!(
        s,
        "Fuzzer processes running: {fuzz_before} at start, {fuzz_after} at the end. Busiest processes at start: {}.\n",
        env["top_cpu"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect::<Vec<_>>().join("; "))
            .unwrap_or_default()
    );

    let _ = writeln!(
        s,
        "#### 1. Per-hit cost ({calls} timed calls, median of {reps} interleaved runs)\n"
    );
    let _ = writeln!(
        s,
        "| workload | Go | hits/call (bpftrace) | untraced ns/call | bpftrace +ns/call | deferprobe +ns/call | ratio (goal ≤ 1.10) | deferprobe +ns/hit | bpftrace +ns/hit | placement-matched ratio |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|");
    let mut reference = None;
    for row in r["per_hit"].as_array().into_iter().flatten() {
        if row["deferprobe_added_ns_per_call"].is_null() {
            reference = Some(row);
            continue;
        }
        let hpc = f(&row["bpftrace_hits_per_call"]);
        let ratio = f(&row["ratio"]);
        let _ = writeln!(
            s,
            "| {} | {} | {:.2} | {:.0} | {:.0} | {:.0} | {:.2} ({}) | {:.0} | {:.0} | {:.2} |",
            row["workload"].as_str().unwrap_or("?"),
            row["go"].as_str().unwrap_or("?"),
            hpc,
            f(&row["untraced_ns_per_call"]),
            f(&row["bpftrace_added_ns_per_call"]),
            f(&row["deferprobe_added_ns_per_call"]),
            ratio,
            goal(ratio <= 1.10),
            f(&row["deferprobe_ns_per_hit"]),
            f(&row["bpftrace_added_ns_per_call"]) / hpc,
            f(&row["placement_matched_ratio"]),
        );
    }
    render_per_hit_by_release(&mut s, &r["per_hit"]);
    if let Some(row) = reference {
        let _ = writeln!(
            s,
            "\nPlacement-matched ratio: deferprobe's added ns per hit ÷ bpftrace's added ns per hit on an \
             instruction the kernel emulates ({:.0} ns, measured on `runtime.deferprocStack`, whose first \
             instruction is `PUSHQ BP`, with `benchhits -workload stack`: {:.2} hits/call). bpftrace \
             attaches at function entry, a `CMPQ SP, 0x10(R14)` the kernel must single-step; deferprobe \
             attaches to the stack check's `JBE` (counting only fall-throughs) and to the `CALL`s \
             of deferproc and deferreturn, which the kernel emulates on every Go release.",
            f(&row["bpftrace_push_ns_per_hit"]),
            f(&row["bpftrace_hits_per_call"])
        );
    }
    let _ = writeln!(
        s,
        "\nWhat deferprobe counted per call (all its probes are on; counts from its JSON report):\n"
    );
    for row in r["per_hit"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|row| !row["deferprobe_counts"].is_null())
    {
        let _ = writeln!(
            s,
            "- {} (Go {}): {:.2} counted events/call; counts {}",
            row["workload"].as_str().unwrap_or("?"),
            row["go"].as_str().unwrap_or("?"),
            f(&row["deferprobe_counted_per_call"]),
            row["deferprobe_counts"]
        );
    }
    let _ = writeln!(s, "\nCommands (per workload):\n");
    for row in r["per_hit"].as_array().into_iter().flatten() {
        let commands = ["command_untraced", "command_bpftrace", "command_deferprobe"]
            .iter()
            .filter_map(|key| row[*key].as_str())
            .collect::<Vec<_>>()
            .join("\n");
        let _ = writeln!(s, "```sh\n{commands}\n```");
        let _ = writeln!(s, "bpftrace counts: `{}`\n", row["bpftrace_functions"]);
    }

    let _ = writeln!(
        s,
        "#### 2. Kernel-side work per hit (`kernel.bpf_stats_enabled=1`, `bpftool prog show --json`)\n"
    );
    let _ = writeln!(
        s,
        "Goals: hot probes (map writes, allocations) ≤ 100 ns/run; defer registration of a capturing closure ≤ 400 ns/run.\n"
    );
    let _ = writeln!(s, "| workload | tracer | program | run_cnt | ns/run |");
    let _ = writeln!(s, "|---|---|---|---|---|");
    for row in r["kernel"].as_array().into_iter().flatten() {
        for tracer in ["bpftrace", "deferprobe"] {
            for p in row[tracer].as_array().into_iter().flatten() {
                let programs = match p["programs"].as_u64() {
                    Some(n) if n > 1 => format!(" ({n} programs)"),
                    _ => String::new(),
                };
                let _ = writeln!(
                    s,
                    "| {} | {tracer} | {}{programs} | {} | {:.0} |",
                    row["workload"].as_str().unwrap_or("?"),
                    p["name"].as_str().unwrap_or("?"),
                    p["run_cnt"],
                    f(&p["ns_per_run"])
                );
            }
        }
    }
    let _ = writeln!(
        s,
        "\ndeferprobe's peak RSS (VmHWM) during these runs: {} KiB.\n",
        r["kernel"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|row| row["deferprobe_peak_rss_kib"].to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );

    let _ = writeln!(
        s,
        "#### 3. Aggregator throughput and 5. memory (`cargo bench -p deferprobe --bench aggregator`)\n"
    );
    for line in r["aggregator"].as_array().into_iter().flatten() {
        match line["bench"].as_str() {
            Some("aggregator_throughput") => {
                let mean = f(&line["mean_events_per_sec"]);
                let _ = writeln!(
                    s,
                    "- Throughput, decode + apply, one core: **{:.2} M events/s** mean, {:.2} M best pass ({} events per pass) — goal ≥ 5 M: {}",
                    mean / 1e6,
                    f(&line["best_events_per_sec"]) / 1e6,
                    line["events_per_pass"],
                    goal(mean >= 5e6)
                );
            }
            Some("aggregator_memory") => {
                let peak = f(&line["peak_rss_kib"]) / 1024.0;
                let full = line["goroutines"].as_u64() == Some(100_000)
                    && line["maps"].as_u64() == Some(1_000_000);
                let _ = writeln!(
                    s,
                    "- Memory, {} goroutines with a pending defer, {} maps: **peak RSS {:.1} MiB** (process start {:.1} MiB){}",
                    line["goroutines"],
                    line["maps"],
                    peak,
                    f(&line["rss_before_kib"]) / 1024.0,
                    if full {
                        format!(" — goal ≤ 50 MB: {}", goal(peak * 1.048576 <= 50.0))
                    } else {
                        String::new()
                    }
                );
            }
            _ => {}
        }
    }

    let a = &r["attach"];
    let dp = f(&a["deferprobe_to_attached_ms"]);
    let bt = f(&a["bpftrace_to_live_ms"]);
    let _ = writeln!(
        s,
        "\n#### 4. Attach latency ({:.1} MB binary, {} probed functions, median of {reps})\n",
        f(&a["binary_bytes"]) / 1e6,
        a["functions"]
    );
    let _ = writeln!(s, "| tracer | start → probes live (ms) | whole run (ms) |\n|---|---|---|");
    let _ = writeln!(
        s,
        "| deferprobe (`probes attached` line) | {dp:.0} | {:.0} |",
        f(&a["deferprobe_total_ms"])
    );
    let _ = writeln!(
        s,
        "| bpftrace (BEGIN after attach) | {bt:.0} | {:.0} |",
        f(&a["bpftrace_total_ms"])
    );
    let _ = writeln!(
        s,
        "\nGoal ≤ 250 ms: {}; no slower than bpftrace: {}. `{}`; `{}`. Log line: `{}`\n",
        goal(dp <= 250.0),
        goal(dp <= bt),
        a["command_deferprobe"].as_str().unwrap_or(""),
        a["command_bpftrace"].as_str().unwrap_or(""),
        a["deferprobe_probes_line"].as_str().unwrap_or("")
    );

    let sv = &r["service"];
    let _ = writeln!(
        s,
        "#### 6. Real service (`{}` keeping the load on; {} phases of {} s per configuration)\n",
        sv["wrk"].as_str().unwrap_or(""),
        reps,
        sv["secs"]
    );
    let _ = writeln!(
        s,
        "CPUs: {}. Requests/s: what the service answered in a phase (its own count), median of the phases. Each traced phase lies between two untraced ones; its loss is against their mean (the machine's speed drifts over minutes), in points of the untraced throughput; the loss shown is the median of the phases, each phase's loss follows.\n\n| configuration | requests/s | loss (points) | loss of each phase | defer probes (% of a CPU, est.) | budget P: loss ≤ P + 0.5 |\n|---|---|---|---|---|---|",
        sv["pinning"].as_str().unwrap_or("not recorded")
    );
    for (name, label, budget) in [
        ("untraced", "untraced", None),
        ("deferprobe", "deferprobe, default probes, default `--max-overhead` (5)", Some(5.0)),
        (
            "deferprobe_max_overhead_10",
            "deferprobe, default probes, `--max-overhead 10`",
            Some(10.0),
        ),
        ("deferprobe_all_on", "deferprobe, every probe always on (`--max-overhead 1000`)", None),
        ("deferprobe_defers", "deferprobe `--probes defers` (always on)", None),
        ("deferprobe_map_writes", "deferprobe `--probes map-writes` (always on)", None),
        ("deferprobe_allocations", "deferprobe `--probes allocations` (always on)", None),
        ("bpftrace", "bpftrace, count-only on the same functions (entry)", None),
    ] {
        let row = &sv["results"][name];
        if row.is_null() {
            continue;
        }
        let rps = f(&row["requests_per_sec"]);
        let loss = row["loss_points"].as_f64().unwrap_or(0.0);
        let each = row["losses"]
            .as_array()
            .map(|losses| {
                losses.iter().map(|l| format!("{:.1}", f(l))).collect::<Vec<_>>().join(", ")
            })
            .unwrap_or_else(|| "—".to_owned());
        let governor = &sv["deferprobe_reports"][name]["governor"];
        let defer_percent = match governor["defer_probes_percent"].as_f64() {
            Some(p) => format!("{p:.1}"),
            None => "—".to_owned(),
        };
        let verdict = match budget {
            Some(p) if loss <= p + 0.5 => format!("{p}: met"),
            Some(p) => format!("{p}: **missed**"),
            None => "—".to_owned(),
        };
        let _ = writeln!(
            s,
            "| {label} | {rps:.0} | {loss:.1} | {each} | {defer_percent} | {verdict} |"
        );
    }
    let _ = writeln!(
        s,
        "\ndeferprobe's reports (counts and governor) of the last run of each configuration: `{}`. bpftrace: `{}` ({} functions, count only).\n",
        sv["deferprobe_reports"],
        sv["command_bpftrace"].as_str().unwrap_or(""),
        sv["functions"]
    );
    let _ = writeln!(
        s,
        "#### 7. Snapshot of the runtime's state (`deferprobe snapshot` of `captures -scenario many -n 1`)\n"
    );
    let _ = writeln!(
        s,
        "| goroutines holding a pending defer | read_ms (median, each run) | wall ms | deferprobe peak RSS | goal |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|");
    for row in r["snapshot"].as_array().into_iter().flatten() {
        let median = f(&row["median_read_ms"]);
        let _ = writeln!(
            s,
            "| {} | {:.0} ({}) | {:.0} | {:.1} MiB | read ≤ {} ms: {} |",
            row["goroutines"],
            median,
            row["read_ms"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|v| format!("{:.0}", f(v)))
                .collect::<Vec<_>>()
                .join(", "),
            f(&row["median_wall_ms"]),
            f(&row["peak_rss_kib"]) / 1024.0,
            row["goal_ms"],
            goal(median <= f(&row["goal_ms"]))
        );
    }
    if !r["servers"].is_null() {
        render_servers(&mut s, &r["servers"]);
    }
    if !r["estimates"].is_null() {
        estimates::render(&mut s, &r["estimates"]);
    }
    let _ = writeln!(s, "\nRaw numbers: target/bench/results.json.\n\n{MARK_END}");
    s
}

/// Issue 13's goal: deferprobe's added ns per hit on each other release (Go 1.19) within 1.5×
/// of the default release's, for map writes and allocations; other workloads for reference.
fn render_per_hit_by_release(s: &mut String, per_hit: &Value) {
    let rows = per_hit.as_array().map(Vec::as_slice).unwrap_or_default();
    let default = rows.first().and_then(|row| row["go"].as_str()).unwrap_or("?");
    let _ = writeln!(
        s,
        "\nPer-hit cost by release (issue 13): deferprobe's added ns per hit (traced − untraced ns \
         per call, ÷ bpftrace's hits per call), each release's repetitions interleaved with the \
         others'; ratio against Go {default}. Goal: ≤ 1.5× for map writes and allocations.\n\n\
         | workload | Go | untraced ns/call | deferprobe +ns/hit | ratio to Go {default} | goal ≤ 1.5× |\n\
         |---|---|---|---|---|---|"
    );
    for row in rows.iter().filter(|row| !row["deferprobe_ns_per_hit"].is_null()) {
        let workload = row["workload"].as_str().unwrap_or("?");
        let (ratio, verdict) = match row["release_ratio"].as_f64() {
            None => ("—".to_owned(), "—"),
            Some(ratio) if ["map", "alloc"].contains(&workload) => {
                (format!("{ratio:.2}"), goal(ratio <= 1.5))
            }
            Some(ratio) => (format!("{ratio:.2}"), "—"),
        };
        let _ = writeln!(
            s,
            "| {workload} | {} | {:.0} | {:.0} | {ratio} | {verdict} |",
            row["go"].as_str().unwrap_or("?"),
            f(&row["untraced_ns_per_call"]),
            f(&row["deferprobe_ns_per_hit"]),
        );
    }
}

/// Section 8: one table of the losses, one of what the governor did.
/// The servers' measuring phases: what a hit really cost each, by family and Go release.
fn render_measured(s: &mut String, servers: &[Value]) {
    let _ = writeln!(
        s,
        "\nThe real cost of a hit as deferprobe measures it while tracing (its CPU time against its \
         hits across the sampling windows, ± one standard error), in one more traced phase per \
         server: `{}` for {MEASURE_SECS} s under wrk with one connection waiting 1 ms after \
         each answer, after the phases above. Paced, the server has CPU to spare: a server using \
         all the CPU it gets (near 100 %) does less work while probes are on rather than spend \
         more time, so its CPU time can't show their cost, and the figures read low (deferprobe \
         then keeps its budget on the calibrated cost). — : too few comparisons (a family \
         sampled down to its refresh windows), or the family's hits moved with another's.\n\n\
         | server | Go | server CPU | calibrated (ns) | measured, every probe (ns) | measured by family (ns, duty cycle) |\n\
         |---|---|---|---|---|---|",
        MEASURE_FLAGS.join(" ")
    );
    let figure = |m: &Value| match (m["ns"].as_f64(), m["error_ns"].as_f64()) {
        (Some(ns), Some(error)) => format!("{ns:.0} ± {error:.0}"),
        _ => "—".to_owned(),
    };
    for server in servers {
        let measured = &server["measured"];
        let families = measured["families"].as_object().into_iter().flatten();
        let families = families
            .map(|(name, m)| format!("{name} {} ({:.2})", figure(m), f(&m["mean_duty_cycle"])))
            .collect::<Vec<_>>();
        let _ = writeln!(
            s,
            "| {} | {} | {:.0} % | {:.0} | {} ({} comparisons) | {} |",
            server["server"].as_str().unwrap_or("?"),
            measured["go"].as_str().unwrap_or("?"),
            100.0 * f(&measured["server_cpu_share"]),
            f(&measured["hit_cost_ns"]),
            figure(&measured["all"]),
            measured["all"]["ticks"],
            if families.is_empty() { "—".to_owned() } else { families.join("; ") },
        );
    }
}

fn render_servers(s: &mut String, sv: &Value) {
    let servers = sv["servers"].as_array().map(Vec::as_slice).unwrap_or_default();
    let _ = writeln!(
        s,
        "\n#### 8. Real servers (wrk -t1 -c4 per phase; {} phases of {} s per configuration)\n",
        sv["reps"], sv["secs"]
    );
    let _ = writeln!(
        s,
        "CPUs: {}. Requests/s as wrk measured them, median of the untraced phases. Each traced \
         phase starts 1 s after the probes are live (under load) and lies between two untraced \
         ones; its loss is against their mean, in points; the median of the phases, each phase's \
         loss in brackets. Goal: loss ≤ P + 0.5 at `--max-overhead P`, ≤ 5 with `--probes \
         defers` (at the default budget, 5). CPU loss: the same from the server's CPU time per \
         request (/proc/PID/stat user + system, where the uprobe traps are charged), 100 × (1 − \
         untraced / traced): the throughput lost at equal CPU time, whatever share of its CPU \
         other processes take; it still moves with the CPU's speed. Noise: what one phase's \
         loss scatters by (1σ) with nothing traced, from the untraced phases' own scatter; the \
         verdict is `met` or `missed` only when the median loss is more than two standard \
         errors (1.25 × noise / √phases) from the goal, else `unsettled`.\n",
        sv["pinning"].as_str().unwrap_or("not recorded")
    );
    let mut header = "| server | load | untraced requests/s, CPU µs/request; noise |".to_owned();
    for (_, label, ..) in SERVER_CONFIGS {
        let _ = write!(header, " {label}: loss (phases); CPU loss (phases); goal |");
    }
    let _ = writeln!(s, "{header}\n|---|---|---|{}", "---|".repeat(SERVER_CONFIGS.len()));
    let each = |losses: &Value| {
        let losses = losses.as_array().into_iter().flatten();
        losses.map(|l| format!("{:.1}", f(l))).collect::<Vec<_>>().join(", ")
    };
    for server in servers {
        let results = &server["results"];
        let mut row = format!(
            "| {} | {} | {:.0}, {:.1}; ±{:.1} |",
            server["server"].as_str().unwrap_or("?"),
            server["load"].as_str().unwrap_or("?"),
            f(&results["untraced"]["requests_per_sec"]),
            f(&results["untraced"]["cpu_us_per_request"]),
            f(&results["untraced"]["loss_noise_points"]),
        );
        for (name, ..) in SERVER_CONFIGS {
            let config = &results[name];
            let _ = write!(
                row,
                " {:.1} ({}); {:.1} ({}); ≤ {}: {} |",
                f(&config["loss_points"]),
                each(&config["losses"]),
                f(&config["cpu_loss_points"]),
                each(&config["cpu_losses"]),
                config["goal_points"],
                match config["verdict"].as_str() {
                    Some("missed") => "**missed**",
                    Some(verdict) => verdict,
                    None => goal(config["met"].as_bool().unwrap_or(false)),
                }
            );
        }
        let _ = writeln!(s, "{row}");
    }
    let _ = writeln!(
        s,
        "\nFrom deferprobe's reports (medians over the phases): the calibrated `governor.hit_cost_ns`; \
         the measured real cost of a hit (`measured_hit_cost_ns`: `all` every probe alike, then each \
         sampled family's own; — where a phase had too few windows to measure it); the mean duty \
         cycle of each sampled family (a family not listed was always on), and probe hits per \
         second of each counter (counts / duration_secs); their estimated cost, hits/s × \
         calibrated hit cost, in % of a CPU.\n\n\
         | server | configuration | hit cost (ns) | measured (ns) | duty cycles | hits/s | est. % of a CPU |\n\
         |---|---|---|---|---|---|---|"
    );
    let entries = |object: &Value, format: fn(f64) -> String| {
        let text = object
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, v)| match v.is_null() {
                true => format!("{k} —"),
                false => format!("{k} {}", format(f(v))),
            })
            .collect::<Vec<_>>()
            .join(", ");
        if text.is_empty() { "—".to_owned() } else { text }
    };
    for server in servers {
        for (name, label, ..) in SERVER_CONFIGS {
            let governor = &server["results"][name]["governor"];
            let hit_cost = f(&governor["hit_cost_ns"]);
            let hits: f64 =
                governor["hits_per_sec"].as_object().into_iter().flatten().map(|(_, v)| f(v)).sum();
            let _ = writeln!(
                s,
                "| {} | {label} | {hit_cost:.0} | {} | {} | {} | {:.1} |",
                server["server"].as_str().unwrap_or("?"),
                entries(&governor["measured_ns"], |v| format!("{v:.0}")),
                entries(&governor["duty_cycles"], |v| format!("{v:.3}")),
                entries(&governor["hits_per_sec"], |v| format!("{v:.0}")),
                hits * hit_cost / 1e7,
            );
        }
    }
    render_measured(s, servers);
    let _ = writeln!(s, "\nCommands:\n\n```sh");
    for server in servers {
        let _ = writeln!(
            s,
            "{}\n{}",
            server["command"].as_str().unwrap_or(""),
            server["wrk"].as_str().unwrap_or("")
        );
    }
    let _ = writeln!(s, "```\n");
}

fn write_benchmarks_md(path: &Path, generated: &str) -> Result<()> {
    let existing = std::fs::read_to_string(path).unwrap_or_default();
    let text = match (existing.find(MARK_BEGIN), existing.find(MARK_END)) {
        (Some(begin), Some(end)) if begin < end => {
            format!(
                "{}{}{}",
                &existing[..begin],
                generated.trim_end(),
                &existing[end + MARK_END.len()..]
            )
        }
        _ => format!("# Benchmarks\n\n{generated}"),
    };
    std::fs::write(path, text)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::{cpu_list, loss_noise_points, loss_verdict, render_per_hit_by_release};

    #[test]
    fn per_hit_by_release() {
        let rows = json!([
            {"workload": "map", "go": "1.27.3", "untraced_ns_per_call": 100.0, "deferprobe_ns_per_hit": 800.0, "release_ratio": null},
            {"workload": "map", "go": "1.19", "untraced_ns_per_call": 120.0, "deferprobe_ns_per_hit": 1300.0, "release_ratio": 1.625},
            {"workload": "defer", "go": "1.19", "untraced_ns_per_call": 170.0, "deferprobe_ns_per_hit": 900.0, "release_ratio": 1.1},
            {"workload": "stack (reference)", "go": "1.27.3"},
        ]);
        let mut s = String::new();
        render_per_hit_by_release(&mut s, &rows);
        assert!(s.contains("ratio to Go 1.27.3"), "{s}");
        assert!(s.contains("| map | 1.27.3 | 100 | 800 | — | — |"), "{s}");
        assert!(s.contains("| map | 1.19 | 120 | 1300 | 1.62 | **missed** |"), "{s}");
        assert!(s.contains("| defer | 1.19 | 170 | 900 | 1.10 | — |"), "{s}");
        assert!(!s.contains("stack"), "{s}");
    }

    /// Untraced phases alternating ±10 % around 100 scatter a loss by about 20 points; a
    /// verdict needs the median two standard errors from the goal.
    #[test]
    fn losses_are_judged_against_the_noise() {
        assert_eq!(loss_noise_points(&[100.0, 100.0]), None);
        assert_eq!(loss_noise_points(&[100.0, 100.0, 100.0]), Some(0.0));
        let noise = loss_noise_points(&[90.0, 110.0, 90.0, 110.0, 90.0]).unwrap();
        assert!((noise - 20.0).abs() < 0.1, "{noise}");
        assert_eq!(loss_verdict(3.0, Some(1.0), 5.5), "met");
        assert_eq!(loss_verdict(8.0, Some(1.0), 5.5), "missed");
        assert_eq!(loss_verdict(7.0, Some(1.0), 5.5), "unsettled");
        assert_eq!(loss_verdict(7.0, None, 5.5), "missed");
    }

    #[test]
    fn cpu_lists() {
        assert_eq!(cpu_list("0-1"), vec![0, 1]);
        assert_eq!(cpu_list("0-2,5,7-8"), vec![0, 1, 2, 5, 7, 8]);
        assert_eq!(cpu_list("3"), vec![3]);
        assert_eq!(cpu_list(""), Vec::<u32>::new());
    }
}
