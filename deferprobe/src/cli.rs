//! Command-line interface (clap): subcommands, flags and their validation.

use std::{
    net::{SocketAddr, ToSocketAddrs as _},
    path::PathBuf,
    time::Duration,
};

use clap::{Args, Parser, Subcommand, ValueEnum};
use deferprobe_common::EVENT_RING_BYTES;

use crate::plan::{AllocationMode, ProbeFamily};

#[derive(Debug, Parser)]
#[command(
    name = "deferprobe",
    version,
    about = "Find deferred closures piling up in a running Go program, and the maps they keep alive",
    long_about = None,
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Trace a running Go process (--pid) or a command started under deferprobe (-- CMD ...).
    Run(RunArgs),
    /// Read every goroutine's pending defers and what their closures captured from a running
    /// Go process's memory, with no probes and without stopping it.
    Snapshot(SnapshotArgs),
    /// Analyse a Go binary without running it: Go release and the probe plan.
    Inspect(InspectArgs),
}

#[derive(Debug, Args)]
pub struct SnapshotArgs {
    /// Process id of the running Go program to read.
    #[arg(long, allow_hyphen_values = true, value_parser = parse_pid)]
    pub pid: u32,

    /// Print the report as JSON instead of text.
    #[arg(long)]
    pub json: bool,

    /// Also write the JSON report to this file.
    #[arg(long, value_name = "FILE.json")]
    pub report: Option<PathBuf>,

    /// Also write the pending defers as a pprof profile (gzipped profile.proto) to this file,
    /// with each goroutine's call stack: open it with `go tool pprof FILE`.
    #[arg(long, value_name = "FILE.pb.gz")]
    pub pprof: Option<PathBuf>,

    /// Report a frame as a defer_accumulation finding from this many pending heap defers.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..))]
    pub min_pending: u64,
}

#[derive(Clone, Debug, Args)]
#[command(group = clap::ArgGroup::new("target").required(true).args(["pid", "command"]))]
pub struct RunArgs {
    /// Process id of the running Go program to attach to.
    #[arg(long, allow_hyphen_values = true, value_parser = parse_pid)]
    pub pid: Option<u32>,

    /// Stop tracing after this long (e.g. 30s, 5m, 1h). Default: until Ctrl-C / SIGTERM or
    /// the target exits.
    #[arg(long, allow_hyphen_values = true, value_parser = parse_positive_duration)]
    pub duration: Option<Duration>,

    /// Time between count log lines (and snapshots of the runtime's state); at least 100ms.
    #[arg(long, default_value = "5s", allow_hyphen_values = true, value_parser = parse_interval)]
    pub interval: Duration,

    /// Also write the final report as JSON to this file. Interim reports (SIGUSR1,
    /// --report-every) go next to it, with the time in their name (FILE.20260102T030405Z.json).
    #[arg(long, value_name = "FILE.json")]
    pub report: Option<PathBuf>,

    /// Also write the pending defers at the end, with each goroutine's call stack, and the
    /// registrations seen per site, as a pprof profile (gzipped profile.proto) to this file:
    /// open it with `go tool pprof FILE`. Needs the target's memory (not --counts-only).
    #[arg(long, value_name = "FILE.pb.gz", conflicts_with = "counts_only")]
    pub pprof: Option<PathBuf>,

    /// Also write an interim report every D while tracing goes on, as SIGUSR1 does: text on
    /// stderr, or JSON next to --report with the time in its name. At least 1s.
    #[arg(long, value_name = "D", allow_hyphen_values = true, value_parser = parse_report_every)]
    pub report_every: Option<Duration>,

    /// Serve Prometheus metrics of the trace at http://HOST:PORT/metrics (e.g. 127.0.0.1:9464
    /// or 0.0.0.0:9464), refreshed every --interval. Bound before anything is attached.
    #[arg(long, value_name = "HOST:PORT", value_parser = parse_metrics_addr)]
    pub metrics_addr: Option<SocketAddr>,

    /// With --metrics-addr: the defer sites with the most pending defers that get series of
    /// their own; the others are summed as site="other".
    #[arg(
        long,
        value_name = "N",
        default_value_t = 20,
        value_parser = clap::value_parser!(u32).range(1..=1000)
    )]
    pub metrics_sites: u32,

    /// Report a frame as a defer_accumulation finding from this many pending heap defers.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..))]
    pub min_pending: u64,

    /// With `-- CMD`: how long the command has to exit after a forwarded signal, or after the
    /// SIGTERM deferprobe sends it when --duration ends, before deferprobe sends SIGKILL.
    #[arg(
        long,
        value_name = "D",
        default_value = "10s",
        allow_hyphen_values = true,
        value_parser = parse_positive_duration
    )]
    pub kill_after: Duration,

    /// Size of the ring buffer that carries events to deferprobe, in KiB: a power of two, at
    /// least 4 pages. Events that don't fit are lost (and counted); counts stay exact.
    #[arg(long, value_name = "KIB", default_value_t = DEFAULT_RING_BUFFER_KIB, value_parser = parse_ring_buffer_kib)]
    pub ring_buffer_kib: u32,

    /// Keep the probes' cost under this percent of one CPU: when the projected cost is higher,
    /// stack-defer counting, then allocation probes, then map-write probes are sampled
    /// (attached part of each second) or detached. The probes pending defers are built from
    /// always stay on. Sampled counts are reported as estimates.
    #[arg(
        long,
        value_name = "PERCENT",
        default_value_t = 5.0,
        allow_hyphen_values = true,
        value_parser = parse_percent
    )]
    pub max_overhead: f64,

    /// Probe families to attach, comma-separated: defers (heap and stack defers, deferreturn,
    /// goroutine exits), map-writes, allocations. Counts of a family left out are reported as
    /// not probed (null), never as zero; without defers there are no pending defers to find.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        value_name = "FAMILY,...",
        default_values_t = ProbeFamily::ALL
    )]
    pub probes: Vec<ProbeFamily>,

    /// How allocations are traced: `all` counts every allocation exactly (a probe hit each);
    /// `profiled` probes only the allocations the Go runtime samples for its memory profile
    /// (one per runtime.MemProfileRate bytes, 512 KiB by default) and reports unsampled
    /// estimates. `profiled` needs memory profiling on in the program (e.g. net/http/pprof).
    #[arg(long, value_enum, value_name = "MODE", default_value_t = AllocationMode::All)]
    pub alloc_mode: AllocationMode,

    /// Probe only: never read the target's memory (no snapshots of the runtime's state), so
    /// deferprobe needs no CAP_SYS_PTRACE. Counts stay exact; pending defers come from the
    /// events alone, and what their closures capture is unknown (the report says so).
    #[arg(long)]
    pub counts_only: bool,

    /// Format of the log lines on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// With `-- CMD`: also trace the Go programs the command starts, directly or through its
    /// children (`go test`, a shell script), each from its first instruction, in a report
    /// section of its own. Programs that are not Go are listed and skipped. Not with
    /// --metrics-addr, --report-every (a followed tree has no interim reports yet) or --pprof
    /// (nor a profile); SIGUSR1 is forwarded to the command.
    #[arg(
        long,
        requires = "command",
        conflicts_with_all = ["pid", "metrics_addr", "report_every", "pprof"]
    )]
    pub follow: bool,

    /// Command to start with probes attached before its first instruction (after `--`).
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,
}

impl RunArgs {
    /// `--ring-buffer-kib` in bytes.
    pub fn ring_buffer_bytes(&self) -> u32 {
        self.ring_buffer_kib * 1024
    }
}

/// `--ring-buffer-kib` default: [`EVENT_RING_BYTES`], the size compiled into the eBPF object.
pub const DEFAULT_RING_BUFFER_KIB: u32 = EVENT_RING_BYTES / 1024;

/// Largest `--ring-buffer-kib`: 1 GiB.
const MAX_RING_BUFFER_KIB: u32 = 1 << 20;

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The Go executable to analyse.
    pub binary: PathBuf,

    /// Print the analysis as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

fn parse_pid(value: &str) -> Result<u32, String> {
    match value.parse::<u32>() {
        Ok(0) => Err("pid 0 is not a process".into()),
        Ok(pid) if pid > i32::MAX as u32 => Err(format!("{pid} is not a valid pid")),
        Ok(pid) => Ok(pid),
        Err(_) => Err(format!("`{value}` is not a process id")),
    }
}

fn parse_ring_buffer_kib(value: &str) -> Result<u32, String> {
    // SAFETY: sysconf has no preconditions.
    let page_kib = (unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) / 1024) as u32;
    let min = 4 * page_kib;
    let kib: u32 = value.parse().map_err(|_| format!("`{value}` is not a size in KiB"))?;
    if !kib.is_power_of_two() || kib < min || kib > MAX_RING_BUFFER_KIB {
        return Err(format!(
            "must be a power of two from {min} (4 pages) to {MAX_RING_BUFFER_KIB} KiB, not {kib}"
        ));
    }
    Ok(kib)
}

fn parse_percent(value: &str) -> Result<f64, String> {
    match value.trim_end_matches('%').parse::<f64>() {
        Ok(percent) if percent > 0.0 && percent <= 1000.0 => Ok(percent),
        Ok(_) => Err("must be more than 0 and at most 1000 (percent of one CPU)".into()),
        Err(_) => Err(format!("`{value}` is not a percentage like 5 or 0.5")),
    }
}

/// Shortest `--interval`: each one logs a line and reads the target's memory.
const MIN_INTERVAL: Duration = Duration::from_millis(100);

fn parse_interval(value: &str) -> Result<Duration, String> {
    parse_at_least(value, MIN_INTERVAL, "each interval logs a line and reads the target's memory")
}

/// Shortest `--report-every`: each one reads the target's memory and writes a report.
const MIN_REPORT_EVERY: Duration = Duration::from_secs(1);

fn parse_report_every(value: &str) -> Result<Duration, String> {
    parse_at_least(value, MIN_REPORT_EVERY, "each report reads the target's memory")
}

/// A duration of at least `min`, refused saying `why` it can't be shorter.
fn parse_at_least(value: &str, min: Duration, why: &str) -> Result<Duration, String> {
    let duration = parse_positive_duration(value)?;
    match duration < min {
        true => Err(format!("must be at least {} ({why})", humantime::format_duration(min))),
        false => Ok(duration),
    }
}

/// `HOST:PORT`: an IP address (`127.0.0.1:9464`, `[::]:9464`) or a host name this machine
/// resolves (`localhost:9464`), and a port.
fn parse_metrics_addr(value: &str) -> Result<SocketAddr, String> {
    if let Ok(address) = value.parse() {
        return Ok(address);
    }
    let not_an_address =
        || format!("`{value}` is not an address like 127.0.0.1:9464, [::]:9464 or localhost:9464");
    let mut resolved = value.to_socket_addrs().map_err(|_| not_an_address())?;
    resolved.next().ok_or_else(not_an_address)
}

fn parse_positive_duration(value: &str) -> Result<Duration, String> {
    if value.trim_start().starts_with('-') {
        return Err("must be longer than zero".into());
    }
    let duration = humantime::parse_duration(value)
        .map_err(|err| format!("`{value}` is not a duration like 30s, 500ms or 5m ({err})"))?;
    if duration.is_zero() {
        return Err("must be longer than zero".into());
    }
    Ok(duration)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("deferprobe").chain(args.iter().copied()))
    }

    #[test]
    fn run_with_pid_and_flags() {
        let cli =
            parse(&["run", "--pid", "42", "--duration", "1m", "--interval", "500ms"]).unwrap();
        let Command::Run(run) = cli.command else { panic!("not run") };
        assert_eq!(run.pid, Some(42));
        assert_eq!(run.duration, Some(Duration::from_secs(60)));
        assert_eq!(run.interval, Duration::from_millis(500));
        assert_eq!(run.log_format, LogFormat::Text);
        assert_eq!(run.min_pending, 16);
        assert_eq!(run.max_overhead, 5.0);
        assert_eq!(run.ring_buffer_kib, 4096);
        assert_eq!(run.ring_buffer_bytes(), EVENT_RING_BYTES);
        assert_eq!(run.probes, ProbeFamily::ALL);
        assert_eq!((run.metrics_addr, run.metrics_sites, run.report_every), (None, 20, None));
        assert!(run.command.is_empty());
    }

    #[test]
    fn run_with_metrics_and_reports_on_demand() {
        let cli = parse(&[
            "run",
            "--pid",
            "42",
            "--metrics-addr",
            "[::1]:9464",
            "--metrics-sites",
            "5",
            "--report-every",
            "1m",
        ])
        .unwrap();
        let Command::Run(run) = cli.command else { panic!("not run") };
        assert_eq!(run.metrics_addr, Some("[::1]:9464".parse().unwrap()));
        assert_eq!(run.metrics_sites, 5);
        assert_eq!(run.report_every, Some(Duration::from_secs(60)));
        let cli = parse(&["run", "--pid", "1", "--metrics-addr", "localhost:9464"]).unwrap();
        let Command::Run(run) = cli.command else { panic!("not run") };
        assert_eq!(run.metrics_addr.map(|a| (a.ip().is_loopback(), a.port())), Some((true, 9464)));
    }

    #[test]
    fn run_with_command() {
        let cli = parse(&[
            "run",
            "--log-format",
            "json",
            "--ring-buffer-kib",
            "16",
            "--probes",
            "allocations,map-writes",
            "--",
            "/bin/prog",
            "-x",
            "--y",
        ])
        .unwrap();
        let Command::Run(run) = cli.command else { panic!("not run") };
        assert_eq!(run.ring_buffer_bytes(), 16 * 1024);
        assert_eq!(run.probes, [ProbeFamily::Allocations, ProbeFamily::MapWrites]);
        assert_eq!(run.command, ["/bin/prog", "-x", "--y"]);
        assert_eq!(run.log_format, LogFormat::Json);
    }

    #[test]
    fn rejects_bad_values() {
        for args in [
            &["run"][..],
            &["run", "--pid", "1", "--", "prog"],
            &["run", "--pid", "0"],
            &["run", "--pid", "abc"],
            &["run", "--pid", "1", "--duration", "0s"],
            &["run", "--pid", "1", "--duration", "soon"],
            &["run", "--pid", "1", "--interval", "-1s"],
            &["run", "--pid", "1", "--interval", "1ns"],
            &["run", "--pid", "1", "--interval", "99ms"],
            &["run", "--pid", "1", "--max-overhead", "-1"],
            &["run", "--pid", "1", "--kill-after", "0s"],
            &["run", "--pid", "1", "--log-format", "xml"],
            &["run", "--pid", "1", "--bogus"],
            &["run", "--pid", "1", "--min-pending", "0"],
            &["run", "--pid", "1", "--max-overhead", "0"],
            &["run", "--pid", "1", "--max-overhead", "lots"],
            &["run", "--pid", "1", "--ring-buffer-kib", "8"],
            &["run", "--pid", "1", "--ring-buffer-kib", "100"],
            &["run", "--pid", "1", "--ring-buffer-kib", "2097152"],
            &["run", "--pid", "1", "--ring-buffer-kib", "4MiB"],
            &["run", "--pid", "1", "--probes", "defers,maps"],
            &["run", "--pid", "1", "--probes", ""],
            &["run", "--pid", "1", "--metrics-addr", "9464"],
            &["run", "--pid", "1", "--metrics-addr", "127.0.0.1"],
            &["run", "--pid", "1", "--metrics-addr", "127.0.0.1:99999"],
            &["run", "--pid", "1", "--metrics-sites", "0"],
            &["run", "--pid", "1", "--report-every", "500ms"],
            &["run", "--pid", "1", "--report-every", "0s"],
            &["run", "--pid", "1", "--follow"],
            &["run", "--follow", "--metrics-addr", "127.0.0.1:9464", "--", "prog"],
            &["run", "--follow", "--report-every", "1m", "--", "prog"],
            &["run", "--follow", "--pprof", "p.pb.gz", "--", "prog"],
        ] {
            let err = parse(args).expect_err(&format!("{args:?} should fail"));
            assert_eq!(err.exit_code(), 2, "{args:?}"); // clap's; main.rs makes it 64
        }
    }
}
