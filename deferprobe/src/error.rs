//! The error type every user-facing failure becomes: one line of text and an exit code that
//! says which kind of problem it was (documented in README.md, "Exit codes").

use std::fmt;

/// Which kind of problem, and so which exit code. deferprobe's own codes are those of BSD's
/// `sysexits.h` (64 and up), so that they stay apart from the exit codes of a command run under
/// `run -- CMD`, which deferprobe passes on (0 to 63 in practice, 128 + N for a signal N).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// Bad flags or values (also what clap reports). EX_USAGE.
    Usage,
    /// A target deferprobe can't trace: not a Go binary, not a linux/amd64 ELF file, a garbage
    /// or truncated file, an unsupported Go release. EX_DATAERR.
    Unsupported,
    /// No target to trace: no such process or file, a kernel thread, a command that is not
    /// found or can't be executed, a process that exited before anything was attached.
    /// EX_NOINPUT.
    NoTarget,
    /// The kernel lacks something deferprobe needs (BTF, ring buffers, uprobes, pidfd).
    /// EX_UNAVAILABLE.
    Kernel,
    /// Anything else: a bug or an unexpected system failure. EX_SOFTWARE.
    Internal,
    /// An output file (`--report`) can't be created: checked before anything is attached.
    /// EX_CANTCREAT.
    CannotCreate,
    /// Writing an output (stdout, `--report`) failed: a full disk, a closed pipe. EX_IOERR.
    Output,
    /// Missing privileges: CAP_BPF / CAP_PERFMON for probes, CAP_SYS_PTRACE (or YAMA
    /// `ptrace_scope`) for reading the target's memory. EX_NOPERM.
    Permission,
}

impl ErrorKind {
    /// Every kind, in exit-code order (README.md's table).
    pub const ALL: [ErrorKind; 8] = [
        ErrorKind::Usage,
        ErrorKind::Unsupported,
        ErrorKind::NoTarget,
        ErrorKind::Kernel,
        ErrorKind::Internal,
        ErrorKind::CannotCreate,
        ErrorKind::Output,
        ErrorKind::Permission,
    ];

    pub fn exit_code(self) -> u8 {
        match self {
            ErrorKind::Usage => 64,
            ErrorKind::Unsupported => 65,
            ErrorKind::NoTarget => 66,
            ErrorKind::Kernel => 69,
            ErrorKind::Internal => 70,
            ErrorKind::CannotCreate => 73,
            ErrorKind::Output => 74,
            ErrorKind::Permission => 77,
        }
    }
}

#[derive(Debug)]
pub struct Error {
    pub kind: ErrorKind,
    pub message: String,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error { kind, message: message.into() }
    }
    pub fn usage(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Usage, message)
    }
    pub fn unsupported(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unsupported, message)
    }
    pub fn no_target(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NoTarget, message)
    }
    pub fn permission(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Permission, message)
    }
    pub fn cannot_create(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::CannotCreate, message)
    }
    pub fn output(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Output, message)
    }
    pub fn kernel(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Kernel, message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, message)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Always one line, whatever a lower layer put in the message.
        let mut lines = self.message.lines().map(str::trim).filter(|l| !l.is_empty());
        f.write_str(lines.next().unwrap_or("unknown error"))?;
        for line in lines {
            write!(f, "; {line}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {}

impl From<crate::binary::BinaryError> for Error {
    fn from(err: crate::binary::BinaryError) -> Self {
        use crate::binary::BinaryError;
        match &err {
            BinaryError::Read { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
                Error::no_target(err.to_string())
            }
            _ => Error::unsupported(err.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_are_distinct_and_above_a_commands() {
        let codes: std::collections::BTreeSet<u8> =
            ErrorKind::ALL.iter().map(|kind| kind.exit_code()).collect();
        assert_eq!(codes.len(), ErrorKind::ALL.len());
        assert!(codes.iter().all(|code| (64..=78).contains(code)), "{codes:?}");
    }

    #[test]
    fn display_is_one_line() {
        let err = Error::kernel("first\n\n  second  \nthird");
        assert_eq!(err.to_string(), "first; second; third");
        assert_eq!(err.kind.exit_code(), 69);
    }
}
