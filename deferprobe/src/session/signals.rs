//! The signals that end a trace (SIGINT, SIGTERM) and the one that asks for a report while it
//! goes on (SIGUSR1), read from a signalfd so that deferprobe knows who sent each: a terminal's Ctrl-C reaches the whole foreground process group, a
//! `-- CMD` command included, so only signals sent to deferprobe alone are forwarded to it.
//! And what happens to a command when tracing ends: [`CommandStop`], the escalation from a
//! forwarded signal to SIGKILL after `--kill-after`.

use std::{
    fmt,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::Duration,
};

use tokio::io::{Interest, unix::AsyncFd};
use tracing::{info, warn};

use crate::error::{Error, Result};

/// The signals that end tracing, and SIGUSR1 (an interim report). A command deferprobe
/// starts unblocks them before it execs ([`crate::target::GatedChild`]).
pub const HANDLED: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGUSR1];

/// `si_code` of a signal the kernel sent (a terminal's Ctrl-C), not a process's kill(2).
const SI_KERNEL: i32 = 0x80;

/// One signal that arrived.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Arrived {
    pub signal: libc::c_int,
    /// Sent by the kernel to a whole process group (a terminal's Ctrl-C): a command started by
    /// deferprobe in that group got it too.
    pub to_group: bool,
}

impl Arrived {
    pub fn name(self) -> &'static str {
        signal_name(self.signal)
    }

    /// SIGUSR1: a report is asked for, tracing goes on.
    pub fn asks_for_a_report(self) -> bool {
        self.signal == libc::SIGUSR1
    }
}

/// SIGINT, SIGTERM and SIGUSR1, blocked in every thread and read from a signalfd.
pub struct Signals {
    fd: AsyncFd<OwnedFd>,
}

impl Signals {
    /// Blocks [`HANDLED`] in this thread (and so in every thread started after: call it
    /// before any) and opens a signalfd for them. Needs a tokio runtime context. A forked
    /// command unblocks them before exec ([`crate::target::GatedChild`]).
    pub fn install() -> Result<Signals> {
        let error =
            |what: &str| Error::internal(format!("{what}: {}", std::io::Error::last_os_error()));
        // SAFETY: sigset_t is plain data, initialised by sigemptyset; the calls only read and
        // write it and this thread's mask.
        let fd = unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for signal in HANDLED {
                libc::sigaddset(&mut set, signal);
            }
            if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
                return Err(error("blocking SIGINT, SIGTERM and SIGUSR1"));
            }
            let fd = libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC);
            if fd < 0 {
                return Err(error("signalfd"));
            }
            OwnedFd::from_raw_fd(fd)
        };
        let fd = // SAFETY: the fd stays open (owned by the AsyncFd) for as long as it is registered.
        unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }
            .map_err(|err| Error::internal(format!("watching signals: {err}")))?;
        Ok(Signals { fd })
    }

    /// The next signal.
    pub async fn recv(&self) -> Arrived {
        loop {
            let Ok(mut guard) = self.fd.readable().await else { continue };
            // SAFETY: reading one signalfd_siginfo (plain data) from our signalfd.
            let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
            let size = std::mem::size_of::<libc::signalfd_siginfo>();
            let n =
                unsafe { libc::read(self.fd.get_ref().as_raw_fd(), (&raw mut info).cast(), size) };
            if n == size as isize {
                return Arrived {
                    signal: info.ssi_signo as libc::c_int,
                    to_group: info.ssi_code == SI_KERNEL,
                };
            }
            guard.clear_ready();
        }
    }
}

pub fn signal_name(signal: libc::c_int) -> &'static str {
    match signal {
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        libc::SIGKILL => "SIGKILL",
        libc::SIGUSR1 => "SIGUSR1",
        _ => "a signal",
    }
}

/// Why deferprobe ended a command it started.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopCause {
    /// A signal deferprobe received (forwarded, unless the command got it too).
    Signal(Arrived),
    /// `--duration` ended tracing: deferprobe sent SIGTERM.
    Duration,
}

/// How a `-- CMD` command was stopped, for the log and the report's notes.
#[derive(Clone, Debug, Default)]
pub struct CommandStop {
    pub cause: Option<StopCause>,
    /// Why SIGKILL was sent, if it was.
    pub killed: Option<Killed>,
    kill_after: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Killed {
    /// A second signal arrived.
    SecondSignal(Arrived),
    /// The command outlived `--kill-after`.
    Grace,
}

impl CommandStop {
    pub fn new(kill_after: Duration) -> CommandStop {
        CommandStop { cause: None, killed: None, kill_after }
    }

    pub fn kill_after(&self) -> Duration {
        self.kill_after
    }

    /// Whether `--duration` ended the trace, and deferprobe stopped the command.
    pub fn stopped_at_duration(&self) -> bool {
        self.cause == Some(StopCause::Duration)
    }

    /// Whether SIGKILL is due at the grace's end (a stop began, no SIGKILL yet).
    pub fn awaiting_exit(&self) -> bool {
        self.cause.is_some() && self.killed.is_none()
    }

    /// A signal arrived for command `pid`. The first is forwarded (unless the command got it
    /// from the terminal too) with SIGCONT, so a stopped command gets it; from then on the
    /// command has `--kill-after` to exit. A second one sends SIGKILL. Returns when SIGKILL is
    /// due, for a first signal.
    pub fn on_signal(&mut self, pid: u32, arrived: Arrived) -> Option<Duration> {
        match (self.cause, self.killed) {
            (None, _) => {
                if !arrived.to_group {
                    send(pid, arrived.signal);
                }
                send(pid, libc::SIGCONT);
                self.cause = Some(StopCause::Signal(arrived));
                info!(
                    signal = arrived.name(),
                    pid,
                    forwarded = !arrived.to_group,
                    kill_after = %humantime::format_duration(self.kill_after),
                    "signal: tracing until the command exits (SIGKILL at a second signal, or \
                     when --kill-after ends)"
                );
                Some(self.kill_after)
            }
            (Some(_), None) => {
                self.kill(pid, Killed::SecondSignal(arrived));
                None
            }
            (Some(_), Some(_)) => None,
        }
    }

    /// `--duration` ended tracing: SIGTERM (and SIGCONT) to the command. Returns when SIGKILL
    /// is due.
    pub fn on_duration(&mut self, pid: u32) -> Duration {
        send(pid, libc::SIGTERM);
        send(pid, libc::SIGCONT);
        self.cause = Some(StopCause::Duration);
        info!(
            pid,
            kill_after = %humantime::format_duration(self.kill_after),
            "--duration reached: SIGTERM sent to the command"
        );
        self.kill_after
    }

    /// The grace after the first signal ended with the command alive.
    pub fn on_grace_end(&mut self, pid: u32) {
        if self.awaiting_exit() {
            self.kill(pid, Killed::Grace);
        }
    }

    fn kill(&mut self, pid: u32, why: Killed) {
        send(pid, libc::SIGKILL);
        self.killed = Some(why);
        warn!(pid, reason = %why.describe(self.kill_after), "SIGKILL sent to the command");
    }

    /// The report's note, if deferprobe stopped the command.
    pub fn note(&self, exit: &dyn fmt::Display) -> Option<String> {
        let started = match self.cause? {
            StopCause::Duration => {
                "--duration ended tracing, and deferprobe then sent the command SIGTERM".to_owned()
            }
            StopCause::Signal(arrived) if arrived.to_group => {
                format!("{} from the terminal reached the command and deferprobe", arrived.name())
            }
            StopCause::Signal(arrived) => {
                format!("deferprobe received {} and forwarded it to the command", arrived.name())
            }
        };
        let killed = match self.killed {
            Some(why) => {
                format!("; {}, so deferprobe killed it (SIGKILL)", why.describe(self.kill_after))
            }
            None => String::new(),
        };
        Some(format!("{started}{killed}; the command ended with {exit}"))
    }
}

impl Killed {
    fn describe(self, kill_after: Duration) -> String {
        match self {
            Killed::SecondSignal(arrived) => {
                format!("a second signal ({}) arrived", arrived.name())
            }
            Killed::Grace => format!(
                "it was still running after --kill-after {}",
                humantime::format_duration(kill_after)
            ),
        }
    }
}

/// Passes `arrived` on to command `pid` (unless it got it from the terminal too) without
/// stopping it: SIGUSR1 under `--follow`, which makes no interim reports.
pub fn pass_on(pid: u32, arrived: Arrived) {
    if !arrived.to_group {
        send(pid, arrived.signal);
    }
    info!(
        signal = arrived.name(),
        pid,
        forwarded = !arrived.to_group,
        "signal passed on to the command (--follow makes no interim reports)"
    );
}

fn send(pid: u32, signal: libc::c_int) {
    // SAFETY: plain kill(2) on our own child (not yet reaped, so the pid is still its).
    unsafe { libc::kill(pid as libc::pid_t, signal) };
}
