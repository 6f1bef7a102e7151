//! The error type every user-facing failure becomes: one line of text and an exit code that
//! says which kind of problem it was (documented in README.md, "Exit codes").

use std::fmt;

/// Which kind of problem, and so which exit code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// Bad flags or values (also what clap uses).
    Usage,
    /// The target: no such process, not a Go binary, an unsupported Go release, ...
    Target,
    /// Not root, or missing CAP_BPF / CAP_PERFMON.
    Permission,
    /// The kernel lacks something deferprobe needs (BTF, ring buffers, uprobes).
    Kernel,
    /// Anything else: a bug or an unexpected system failure.
    Internal,
}

impl ErrorKind {
    pub fn exit_code(self) -> u8 {
        match self {
            ErrorKind::Internal => 1,
            ErrorKind::Usage => 2,
            ErrorKind::Target => 3,
            ErrorKind::Permission => 4,
            ErrorKind::Kernel => 5,
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
    pub fn target(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Target, message)
    }
    pub fn permission(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Permission, message)
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
        Error::target(err.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_is_one_line() {
        let err = Error::kernel("first\n\n  second  \nthird");
        assert_eq!(err.to_string(), "first; second; third");
        assert_eq!(err.kind.exit_code(), 5);
    }
}
