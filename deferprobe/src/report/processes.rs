//! The report of `run --follow`: the command, every program its process tree exec'd (one
//! entry per exec: a process that execs twice has two), and for each Go program traced its own
//! report, in the schema of `run`'s. Rendered as text with one section per traced process.

use std::fmt::Write as _;

use serde::Serialize;

use super::{ChildrenReport, EndReason, Report, text::truncate};
use crate::target::Namespaces;

#[derive(Clone, Debug, Serialize)]
pub struct FollowReport {
    pub schema_version: u32,
    /// Always "follow".
    pub kind: &'static str,
    pub command: CommandReport,
    pub duration_secs: f64,
    /// Why tracing stopped: "duration", or "target_exited" once the command exited (a signal
    /// is forwarded to the command, which then exits).
    pub ended_by: EndReason,
    /// Every program the command's process tree exec'd, in the order they were.
    pub processes: Vec<ProcessReport>,
    /// What the tree started, counted in the kernel (`traced` true: the Go programs among them
    /// are in `processes`).
    pub children: Option<ChildrenReport>,
    pub notes: Vec<String>,
}

/// The command deferprobe started.
#[derive(Clone, Debug, Serialize)]
pub struct CommandReport {
    pub pid: u32,
    pub argv: Vec<String>,
    /// Its exit status (the code, or 128 + signal).
    pub exit_code: Option<i32>,
}

/// How a program of the tree was dealt with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProcessStatus {
    /// A Go program: traced, its report in `report`.
    Traced,
    /// Not a Go program, or one deferprobe doesn't support (`reason` says which).
    Skipped,
    /// A Go program whose tracing failed (`reason`).
    Failed,
}

/// One program a process of the tree exec'd.
#[derive(Clone, Debug, Serialize)]
pub struct ProcessReport {
    pub pid: u32,
    /// Its parent when it exec'd (null if it was gone).
    pub ppid: Option<u32>,
    /// The executable, as the process names it (its path in its own mount namespace).
    pub exe: String,
    pub argv: Vec<String>,
    pub status: ProcessStatus,
    /// Why it was skipped or failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Since when it was traced: "first_instruction" (stopped at its exec until its probes were
    /// attached), or "attach" (it could not be stopped: from when they were).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub traced_from: Option<&'static str>,
    /// Its exit status (the code, or 128 + signal); null while it ran on (or exec'd again).
    pub exit_code: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<Namespaces>,
    /// The report of a traced program (`run`'s schema).
    pub report: Option<Report>,
}

impl FollowReport {
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("report serializes")
    }

    /// The text report: the command and the list of programs, then one section per traced
    /// program (its `run` report), at most 80 columns wide.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let ended = match self.ended_by {
            EndReason::Duration => "duration reached",
            _ => "the command exited",
        };
        let _ = writeln!(out, "deferprobe report (--follow)");
        let _ = writeln!(
            out,
            "  command   pid {}: {}",
            self.command.pid,
            truncate(&self.command.argv.join(" "), 56)
        );
        let _ = writeln!(out, "  traced    {:.1}s, {ended}", self.duration_secs);
        if let Some(code) = self.command.exit_code {
            let _ = writeln!(out, "  exit code {code}");
        }
        let traced = self.processes.iter().filter(|p| p.status == ProcessStatus::Traced).count();
        let _ = writeln!(
            out,
            "\nprograms executed: {} ({traced} traced)\n  {:<8}{:<8}{:<6}{:<20}program",
            self.processes.len(),
            "pid",
            "ppid",
            "exit",
            "",
        );
        for process in &self.processes {
            let exit = process.exit_code.map_or_else(|| "-".to_owned(), |code| code.to_string());
            let what = match (process.status, &process.report) {
                (ProcessStatus::Traced, Some(report)) => report.target.go_version.clone(),
                (ProcessStatus::Skipped, _) => "skipped".to_owned(),
                _ => "failed".to_owned(),
            };
            let ppid = process.ppid.map_or_else(|| "?".to_owned(), |ppid| ppid.to_string());
            let _ = writeln!(
                out,
                "  {:<8}{ppid:<8}{exit:<6}{:<20}{}",
                process.pid,
                truncate(&what, 19),
                truncate(&process.exe, 36)
            );
        }
        let mut notes = self.notes.clone();
        for process in &self.processes {
            if let Some(reason) = &process.reason {
                notes.push(format!("pid {} ({}): {reason}", process.pid, process.exe));
            }
        }
        super::write_notes(&mut out, &notes);
        for process in &self.processes {
            let Some(report) = &process.report else { continue };
            let title = format!("pid {} {}", process.pid, process.exe);
            let _ = writeln!(out, "\n{:=<80}\n== {}\n{:=<80}", "", truncate(&title, 77), "");
            let _ = match process.traced_from {
                Some("first_instruction") => {
                    writeln!(out, "traced from its first instruction (stopped at its exec)")
                }
                _ => writeln!(out, "traced from when its probes were attached"),
            };
            out.push_str(&report.to_text());
        }
        out
    }
}
