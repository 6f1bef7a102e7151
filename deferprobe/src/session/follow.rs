//! `run --follow -- CMD`: traces every Go program of the command's process tree. The
//! process-tree programs ([`ProcessTree`]) stop each program a process of the tree execs before
//! its first instruction; a thread of its own then reads that program's binary, plans and
//! attaches its probes (each program has its own plan and its own eBPF maps, whether or not
//! other processes run the same binary), releases it (SIGCONT) and traces it as `run` traces
//! one process ([`trace_process`]), until it exits, execs another program, or the command exits.
//! Programs that are not Go are released at once and listed. Signals and `--duration` act on the
//! command, as with `run -- CMD`; SIGUSR1 is passed on to the command (a followed tree has no
//! interim reports, and `--metrics-addr` / `--report-every` are refused with `--follow`).

use std::{
    collections::HashMap,
    os::fd::{AsRawFd as _, OwnedFd},
    sync::mpsc,
    thread::{Scope, ScopedJoinHandle},
    time::{Duration, Instant},
};

use tokio::time::sleep;
use tracing::{info, warn};

use super::{
    Launch, StopRequest, new_runtime,
    signals::{self, CommandStop, Signals},
    trace_loop::ExitWatch,
    trace_process,
};
use crate::{
    cli::RunArgs,
    error::{Error, ErrorKind, Result},
    output::{self, OutputFile},
    process_tree::{ProcessTree, TaskOffsets, TreeEvent},
    report::{
        ChildrenReport, CommandReport, EndReason, FollowReport, ProcessReport, ProcessStatus,
        SCHEMA_VERSION,
    },
    target::{self, ExitStatus, GatedChild},
};

/// Runs `run --follow -- CMD`; returns the exit code (the command's).
pub(super) fn run(
    args: &RunArgs,
    runtime: &tokio::runtime::Runtime,
    signals: &Signals,
    task_offsets: TaskOffsets,
    report_file: Option<&OutputFile>,
) -> Result<i32> {
    let program = args.command.first().ok_or_else(|| Error::usage("--follow needs -- CMD"))?;
    let mut tree = ProcessTree::load(true, task_offsets)?;
    let exe = target::resolve_program(program)?;
    let child = GatedChild::spawn(&exe, &args.command)?;
    let command = child.target.pid;
    // Its exec is stopped and reported like any other: the command itself is traced as one
    // of the tree's programs when it is Go.
    if let Err(err) = tree.add_command(command, false) {
        child.abort();
        return Err(err);
    }
    child.release()?;
    let exit_watch = ExitWatch::new(command)?;
    let started = Instant::now();
    // What each program is traced with: the command's flags, without what the follower does
    // for the whole tree (nor what it does not do: interim reports, metrics).
    let session_args = RunArgs {
        duration: None,
        report: None,
        pprof: None,
        follow: false,
        report_every: None,
        metrics_addr: None,
        ..args.clone()
    };
    let mut stop = CommandStop::new(args.kill_after);
    let (ended_by, processes, exits) = std::thread::scope(|scope| {
        let mut follower =
            Follower { scope, args: &session_args, command, sessions: Vec::new(), stopping: false };
        let mut exits = HashMap::new();
        let ended_by = runtime.block_on(follower.follow(
            &mut tree,
            &exit_watch,
            signals,
            &mut stop,
            args.duration,
            &mut exits,
        ));
        // The command's exit is the tree's last word: what still runs is no longer traced.
        for event in tree.pending_events() {
            follower.on_event(event, &mut exits);
        }
        for session in &follower.sessions {
            session.stop.request(EndReason::CommandExited);
        }
        let processes: Vec<ProcessReport> =
            follower.sessions.into_iter().map(Session::join).collect();
        (ended_by, processes, exits)
    });
    let exit_code = target::wait_child(command)?.shell_code();
    let processes = with_exit_codes(processes, &exits);
    let counts = tree.counts();
    let mut notes = Vec::new();
    if let Some(note) = stop.note(&format_args!("exit code {exit_code}")) {
        notes.push(note);
    }
    if counts.tree_full > 0 {
        notes.push(format!(
            "{} tasks of the tree were not followed (the kernel's set of them was full): the \
             programs their processes started are not listed",
            counts.tree_full
        ));
    }
    notes.push(format!(
        "--max-overhead applies to each traced program on its own ({} traced)",
        processes.iter().filter(|p| p.status == ProcessStatus::Traced).count()
    ));
    let report = FollowReport {
        schema_version: SCHEMA_VERSION,
        kind: "follow",
        command: CommandReport {
            pid: command,
            argv: args.command.clone(),
            exit_code: Some(exit_code),
        },
        duration_secs: started.elapsed().as_secs_f64(),
        ended_by,
        processes,
        children: Some(ChildrenReport {
            processes_started: counts.processes_started,
            programs_executed: counts.programs_executed,
            traced: true,
        }),
        notes,
    };
    let json = report.to_json() + "\n";
    output::deliver(&report.to_text(), report_file.map(|file| (file, json.as_str())))?;
    Ok(match stop.stopped_at_duration() {
        true => 0,
        false => exit_code,
    })
}

/// The programs being traced, one thread each.
struct Follower<'scope, 'env> {
    scope: &'scope Scope<'scope, 'env>,
    args: &'env RunArgs,
    /// The command's pid.
    command: u32,
    sessions: Vec<Session<'scope>>,
    /// `--duration` ended: programs exec'd from now on are released untraced.
    stopping: bool,
}

/// One program a process of the tree exec'd, traced (or found not Go) by a thread.
struct Session<'scope> {
    pid: u32,
    stop: std::sync::Arc<StopRequest>,
    /// Closed when the thread is done (its probes detached): a program the same process execs
    /// next waits for it.
    done: Option<mpsc::Receiver<()>>,
    /// None for a program recorded without tracing it.
    handle: Option<ScopedJoinHandle<'scope, ProcessReport>>,
    /// The entry as it was when the program exec'd.
    entry: ProcessReport,
}

impl Session<'_> {
    /// The entry, once its thread is done.
    fn join(self) -> ProcessReport {
        let Some(handle) = self.handle else { return self.entry };
        handle.join().unwrap_or_else(|_| ProcessReport {
            status: ProcessStatus::Failed,
            reason: Some("deferprobe's thread tracing it failed (a bug)".into()),
            ..self.entry
        })
    }
}

impl<'scope, 'env> Follower<'scope, 'env> {
    /// Until the command exits: starts a session for each program exec'd, records exits,
    /// forwards signals to the command and stops it at `--duration`.
    async fn follow(
        &mut self,
        tree: &mut ProcessTree,
        exited: &ExitWatch,
        signals: &Signals,
        stop: &mut CommandStop,
        duration: Option<Duration>,
        exits: &mut HashMap<u32, ExitStatus>,
    ) -> EndReason {
        let command = self.command;
        let kill_deadline = sleep(Duration::MAX / 4);
        tokio::pin!(kill_deadline);
        let deadline = sleep(duration.unwrap_or(Duration::MAX / 4));
        tokio::pin!(deadline);
        let mut ended_by = EndReason::TargetExited;
        loop {
            tokio::select! {
                events = tree.next_events() => {
                    for event in events {
                        self.on_event(event, exits);
                    }
                }
                // No interim reports of a followed tree: SIGUSR1 is the command's, and no
                // reason to stop it.
                arrived = signals.recv() => if arrived.asks_for_a_report() {
                    signals::pass_on(command, arrived);
                } else if let Some(grace) = stop.on_signal(command, arrived) {
                    kill_deadline.as_mut().reset(tokio::time::Instant::now() + grace);
                },
                _ = &mut kill_deadline, if stop.awaiting_exit() => stop.on_grace_end(command),
                _ = &mut deadline, if !self.stopping => {
                    self.stopping = true;
                    ended_by = EndReason::Duration;
                    for session in &self.sessions {
                        session.stop.request(EndReason::Duration);
                    }
                    if stop.cause.is_none() {
                        let grace = stop.on_duration(command);
                        kill_deadline.as_mut().reset(tokio::time::Instant::now() + grace);
                    }
                }
                _ = exited.exited() => return ended_by,
            }
        }
    }

    fn on_event(&mut self, event: TreeEvent, exits: &mut HashMap<u32, ExitStatus>) {
        match event {
            TreeEvent::Exit { pid, status } => {
                exits.insert(pid, status);
            }
            TreeEvent::Exec { pid, stopped, stop_error } => {
                if let Some(errno) = stop_error {
                    warn!(
                        pid,
                        errno,
                        "a program of the tree could not be stopped at its exec: traced from \
                         when its probes are attached"
                    );
                }
                self.start(pid, stopped);
            }
        }
    }

    /// A session for the program `pid` just exec'd.
    fn start(&mut self, pid: u32, stopped: bool) {
        let exe = std::fs::read_link(format!("/proc/{pid}/exe"))
            .map(|path| path.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "unknown".into());
        let entry = ProcessReport {
            pid,
            ppid: target::parent_pid(pid),
            exe: exe.clone(),
            argv: target::command_line(pid),
            status: ProcessStatus::Skipped,
            reason: None,
            traced_from: None,
            exit_code: None,
            namespace: target::namespaces(pid, &exe),
            report: None,
        };
        // A pidfd names this process for good: SIGCONT never reaches a process that reused
        // its pid.
        let pidfd = match target::pidfd(pid) {
            Ok(fd) => fd,
            Err(err) => {
                self.record(ProcessReport {
                    status: ProcessStatus::Failed,
                    reason: Some(format!("it exited before it could be traced ({err})")),
                    ..entry
                });
                return;
            }
        };
        if self.stopping {
            resume(&pidfd);
            self.record(ProcessReport {
                reason: Some("exec'd after --duration ended tracing: not traced".into()),
                ..entry
            });
            return;
        }
        // The program this process ran before is gone: its trace ends, and this one's probes
        // go on once the old ones are off.
        let previous = self.sessions.iter_mut().rev().find(|session| session.pid == pid);
        let previous = previous.and_then(|session| {
            session.stop.request(EndReason::Exec);
            session.done.take()
        });
        info!(pid, exe = %exe, stopped, "the process tree exec'd a program");
        let stop = std::sync::Arc::new(StopRequest::default());
        let (done_sender, done) = mpsc::channel::<()>();
        let args = self.args;
        let thread_stop = stop.clone();
        let thread_entry = entry.clone();
        let handle = self.scope.spawn(move || {
            let _done = done_sender;
            if let Some(previous) = previous {
                let _ = previous.recv();
            }
            session(args, pid, stopped, &pidfd, &thread_stop, thread_entry)
        });
        self.sessions.push(Session { pid, stop, done: Some(done), handle: Some(handle), entry });
    }

    /// An entry with no session behind it.
    fn record(&mut self, entry: ProcessReport) {
        let stop = std::sync::Arc::new(StopRequest::default());
        self.sessions.push(Session { pid: entry.pid, stop, done: None, handle: None, entry });
    }
}

/// Traces the program process `pid` just exec'd (stopped there unless `stopped` is false).
fn session(
    args: &RunArgs,
    pid: u32,
    stopped: bool,
    pidfd: &OwnedFd,
    stop: &StopRequest,
    entry: ProcessReport,
) -> ProcessReport {
    let release = || resume(pidfd);
    let traced = new_runtime().and_then(|runtime| {
        let _context = runtime.enter();
        let launch = Launch::Followed { pid, stopped, stop, release: &release };
        trace_process(args, launch, &runtime)
    });
    match traced {
        Ok(outcome) => ProcessReport {
            status: ProcessStatus::Traced,
            traced_from: Some(match stopped {
                true => "first_instruction",
                false => "attach",
            }),
            report: Some(outcome.report),
            ..entry
        },
        Err(err) => {
            // Never left stopped, whatever failed.
            release();
            let status = match err.kind {
                ErrorKind::Unsupported => ProcessStatus::Skipped,
                _ => ProcessStatus::Failed,
            };
            if status == ProcessStatus::Failed {
                warn!(pid, %err, "a Go program of the tree could not be traced");
            }
            // The message names the process: the entry does already.
            let reason = match err.message.contains("not a Go binary") {
                true => "not a Go program".to_owned(),
                false => err.to_string(),
            };
            ProcessReport { status, reason: Some(reason), ..entry }
        }
    }
}

/// SIGCONT to the process `pidfd` names (a no-op when it runs).
fn resume(pidfd: &OwnedFd) {
    // SAFETY: pidfd_send_signal(2) on a pidfd we own, without siginfo.
    unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            libc::SIGCONT,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
}

/// Each process's exit status on its last entry (its earlier programs exec'd, not exited).
fn with_exit_codes(
    mut processes: Vec<ProcessReport>,
    exits: &HashMap<u32, ExitStatus>,
) -> Vec<ProcessReport> {
    let mut last: HashMap<u32, usize> = HashMap::new();
    for (index, process) in processes.iter().enumerate() {
        last.insert(process.pid, index);
    }
    for (pid, index) in last {
        let Some(status) = exits.get(&pid) else { continue };
        let process = &mut processes[index];
        process.exit_code = Some(status.shell_code());
        if let Some(report) = &mut process.report {
            report.target.exit_code = process.exit_code;
        }
    }
    processes
}
