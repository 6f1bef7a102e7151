//! Where reports go: stdout and the `--report` file. A report file is checked before anything
//! is attached and written whole; every failure is an error naming the output (exit codes 73
//! and 74, README "Exit codes"), never a panic, and one failed output never costs the other.

use std::{
    ffi::CString,
    fs,
    io::Write as _,
    os::unix::{
        ffi::OsStrExt as _,
        fs::{FileTypeExt as _, OpenOptionsExt as _},
    },
    path::{Path, PathBuf},
};

use crate::error::{Error, Result};

/// A `--report FILE` (or, for `--pprof` later, any file output), checked up front.
#[derive(Clone, Debug)]
pub struct OutputFile {
    flag: &'static str,
    path: PathBuf,
    /// A FIFO, a character device (`/dev/stdout`, `/dev/null`) or a socket: written in place,
    /// since it can't be replaced by a rename.
    special: bool,
}

impl OutputFile {
    /// Fails now, before any work, if `path` can't be written: a directory, a missing
    /// directory, no permission. Creates nothing.
    pub fn check(flag: &'static str, path: &Path) -> Result<OutputFile> {
        let refuse =
            |why: String| Err(Error::cannot_create(format!("{flag} {}: {why}", path.display())));
        if let Ok(metadata) = fs::metadata(path) {
            let kind = metadata.file_type();
            if kind.is_dir() {
                return refuse("is a directory".into());
            }
            let special = kind.is_fifo() || kind.is_char_device() || kind.is_socket();
            // O_NONBLOCK: opening a FIFO with no reader fails (ENXIO) instead of blocking.
            let opened =
                fs::OpenOptions::new().append(true).custom_flags(libc::O_NONBLOCK).open(path);
            return match opened {
                Ok(_) => Ok(OutputFile { flag, path: path.to_path_buf(), special }),
                Err(err) => refuse(format!("cannot write: {err}")),
            };
        }
        let dir = path.parent().filter(|dir| !dir.as_os_str().is_empty());
        let dir = dir.unwrap_or(Path::new("."));
        if !dir.is_dir() {
            return refuse(format!("no directory {}", dir.display()));
        }
        let Ok(dir_c) = CString::new(dir.as_os_str().as_bytes()) else {
            return refuse("the path holds a NUL byte".into());
        };
        // SAFETY: access(2) reads the NUL-terminated path we pass.
        match unsafe { libc::access(dir_c.as_ptr(), libc::W_OK) } {
            0 => Ok(OutputFile { flag, path: path.to_path_buf(), special: false }),
            _ => refuse(format!(
                "cannot write in {}: {}",
                dir.display(),
                std::io::Error::last_os_error()
            )),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The output for a report of this kind written at `stamp` (a time): `FILE.STAMP.EXT`
    /// beside this one (`report.json` → `report.20261202T013000Z.json`), `-2`, `-3`, … added
    /// while such a file exists; checked like [`OutputFile::check`]. A FIFO or a device is
    /// itself: it has no name to put a time in.
    pub fn with_time(&self, stamp: &str) -> Result<OutputFile> {
        if self.special {
            return Ok(self.clone());
        }
        let stem = self.path.file_stem().unwrap_or_default().to_string_lossy();
        let extension = self.path.extension().map(|e| format!(".{}", e.to_string_lossy()));
        let extension = extension.unwrap_or_default();
        let named = |n: u32| {
            let suffix = if n == 1 { String::new() } else { format!("-{n}") };
            self.path.with_file_name(format!("{stem}.{stamp}{suffix}{extension}"))
        };
        let path = (1..).map(named).find(|path| !path.exists()).unwrap_or_else(|| named(1));
        OutputFile::check(self.flag, &path)
    }

    /// Writes `bytes` whole: a regular file through a temporary file in the same directory,
    /// renamed over it, so a full disk leaves an error and no truncated report.
    pub fn write(&self, bytes: &[u8]) -> Result<()> {
        let error = |err: std::io::Error| {
            Error::output(format!("{} {}: writing failed: {err}", self.flag, self.path.display()))
        };
        if self.special {
            return fs::OpenOptions::new()
                .append(true)
                .open(&self.path)
                .and_then(|mut file| file.write_all(bytes))
                .map_err(error);
        }
        let mut name = self.path.file_name().unwrap_or_default().to_os_string();
        name.push(format!(".tmp{}", std::process::id()));
        let temporary = self.path.with_file_name(name);
        let written = fs::File::create(&temporary)
            .and_then(|mut file| file.write_all(bytes).and_then(|()| file.sync_all()))
            .and_then(|()| fs::rename(&temporary, &self.path));
        if written.is_err() {
            let _ = fs::remove_file(&temporary);
        }
        written.map_err(error)
    }
}

/// Prints to stdout; a closed pipe or a full device is an error naming stdout, not a panic.
pub fn print_stdout(text: &str) -> Result<()> {
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
        .map_err(|err| Error::output(format!("writing the report to stdout: {err}")))
}

/// A report's two outputs: the JSON file first (the one a program reads), then the text on
/// stdout. Both are tried; the first failure is returned.
pub fn deliver(text: &str, json: Option<(&OutputFile, &str)>) -> Result<()> {
    let file = json.map(|(file, json)| file.write(json.as_bytes()));
    let stdout = print_stdout(text);
    file.unwrap_or(Ok(())).and(stdout)
}

/// One line on stderr, ignoring failure (stderr closed or full: nothing else can be done).
pub fn eprint_line(line: &str) {
    let mut stderr = std::io::stderr().lock();
    let _ = writeln!(stderr, "{line}");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    #[test]
    fn refuses_what_cant_be_written_and_creates_nothing() {
        let dir = std::env::temp_dir().join(format!("deferprobe-output-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let err = OutputFile::check("--report", &dir).unwrap_err();
        assert_eq!(err.kind, ErrorKind::CannotCreate);
        assert!(err.to_string().ends_with("is a directory"), "{err}");
        let err = OutputFile::check("--report", &dir.join("missing/r.json")).unwrap_err();
        assert!(err.to_string().contains("no directory"), "{err}");

        let file = OutputFile::check("--report", &dir.join("r.json")).unwrap();
        assert!(!dir.join("r.json").exists());
        file.write(b"{}\n").unwrap();
        assert_eq!(fs::read(dir.join("r.json")).unwrap(), b"{}\n");
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 1, "no temporary file left");

        // A device is written in place, never renamed over.
        let null = OutputFile::check("--report", Path::new("/dev/null")).unwrap();
        null.write(b"x").unwrap();
        assert!(fs::metadata("/dev/null").unwrap().file_type().is_char_device());
        let full = OutputFile::check("--report", Path::new("/dev/full")).unwrap();
        let err = full.write(b"x").unwrap_err();
        assert_eq!(err.kind, ErrorKind::Output);
        assert!(err.to_string().starts_with("--report /dev/full: writing failed"), "{err}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_timed_output_goes_beside_with_the_time_in_its_name() {
        let dir = std::env::temp_dir().join(format!("deferprobe-timed-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let file = OutputFile::check("--report", &dir.join("report.json")).unwrap();
        let first = file.with_time("20261202T013000Z").unwrap();
        assert_eq!(first.path(), dir.join("report.20261202T013000Z.json"));
        first.write(b"{}").unwrap();
        let second = file.with_time("20261202T013000Z").unwrap();
        assert_eq!(second.path(), dir.join("report.20261202T013000Z-2.json"));
        let bare = OutputFile::check("--report", &dir.join("report")).unwrap();
        assert_eq!(bare.with_time("T").unwrap().path(), dir.join("report.T"));
        let null = OutputFile::check("--report", Path::new("/dev/null")).unwrap();
        assert_eq!(null.with_time("T").unwrap().path(), Path::new("/dev/null"));
        fs::remove_dir_all(&dir).unwrap();
    }
}
