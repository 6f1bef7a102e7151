//! The deferprobe command: parses the command line, sets up logging, runs a subcommand and turns
//! every failure into one line on stderr and an exit code (see README.md, "Exit codes").

use std::{io::IsTerminal as _, process::ExitCode};

use clap::Parser as _;
use deferprobe::{
    cli::{Cli, Command, LogFormat},
    error::{Error, ErrorKind},
    inspect, output, session, snapshot,
};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) if err.use_stderr() => {
            // clap's own message up to its usage block, on one line: "error: the following
            // required arguments were not provided:\n  <BINARY>\n\nUsage: ..." keeps `<BINARY>`.
            let rendered = err.to_string();
            let message: Vec<&str> =
                rendered.lines().map(str::trim).take_while(|line| !line.is_empty()).collect();
            let message = message.join(" ");
            let message = message.trim_start_matches("error: ");
            let message = if message.is_empty() { "invalid arguments" } else { message };
            output::eprint_line(&format!("deferprobe: {message} (see deferprobe --help)"));
            return ExitCode::from(ErrorKind::Usage.exit_code());
        }
        Err(help_or_version) => {
            // --help / --version: a closed stdout is the reader's choice, not an error.
            let _ = output::print_stdout(&help_or_version.to_string());
            return ExitCode::SUCCESS;
        }
    };
    let result = match &cli.command {
        Command::Run(args) => {
            init_logging(args.log_format);
            session::run(args)
        }
        Command::Snapshot(args) => snapshot::snapshot(args),
        Command::Inspect(args) => inspect::inspect(&args.binary, args.json)
            .map(|text| output::print_stdout(&text).map(|()| 0))
            .and_then(|code| code),
    };
    match result {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(err) => fail(&err),
    }
}

fn fail(err: &Error) -> ExitCode {
    output::eprint_line(&format!("deferprobe: error: {err}"));
    ExitCode::from(err.kind.exit_code())
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("DEFERPROBE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.with_target(false).init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).init(),
    }
}
