//! The traced process: finding a running one by pid (and in it the Go module: the executable,
//! or a Go `-buildmode=c-shared` library a C program loaded), or starting a command gated so
//! probes are attached before its first instruction (fork, attach to the child's pid, then
//! exec), where the traced module is mapped (load bias), and noticing when it exits (pidfd).

use std::{
    ffi::CString,
    fs::File,
    io::{ErrorKind as IoErrorKind, Read, Write},
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
        unix::{
            ffi::OsStrExt,
            fs::{MetadataExt, PermissionsExt},
        },
    },
    path::{Path, PathBuf},
};

use crate::{
    binary::{BinaryError, GoBinary},
    error::{Error, Result},
};

/// What `run -- CMD` and `--pid` say of an executable that is not Go.
pub const C_SHARED_HINT: &str = "a C program with a Go -buildmode=c-shared library can be \
                                 traced with --pid once it has loaded the library";

/// A process deferprobe traces.
#[derive(Clone, Debug)]
pub struct Target {
    pub pid: u32,
    /// What the probes attach to and the analysis reads: the Go module. `/proc/PID/exe` for
    /// running processes (right even if the file was replaced or deleted on disk), or
    /// `/proc/PID/map_files/START-END` of a Go library the process mapped
    /// ([`Target::open_binary`]); the resolved path for commands.
    pub exe: PathBuf,
    /// The executable's path, for humans.
    pub exe_name: String,
    /// The thread id given as `--pid`, when it was a thread of process `pid`, not its leader.
    pub thread: Option<u32>,
    /// The Go library's path as `/proc/PID/maps` names it, when the Go runtime is not in the
    /// executable but in a shared library it loaded (`-buildmode=c-shared`).
    pub go_module: Option<String>,
    /// What the report should say about how the Go module was chosen.
    pub notes: Vec<String>,
    /// Its own namespaces, when it is in a container (read when it was found: they are gone
    /// with it).
    pub namespace: Option<Namespaces>,
}

/// Linux's PF_KTHREAD task flag (/proc/PID/stat field 9).
const PF_KTHREAD: u64 = 0x0020_0000;

/// What /proc says about a pid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProcessState {
    Alive {
        kernel_thread: bool,
    },
    /// Exited, not yet reaped by its parent.
    Zombie,
    /// No such process (any more).
    Gone,
}

/// The state of `pid` from /proc/PID/stat.
pub fn process_state(pid: u32) -> ProcessState {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return ProcessState::Gone;
    };
    // "pid (comm) S ppid pgrp session tty tpgid flags ...": comm may hold spaces and parens.
    let after_comm = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    match fields.first().copied() {
        Some("Z" | "X" | "x") => ProcessState::Zombie,
        Some(_) => ProcessState::Alive {
            kernel_thread: fields
                .get(6)
                .and_then(|f| f.parse::<u64>().ok())
                .is_some_and(|flags| flags & PF_KTHREAD != 0),
        },
        None => ProcessState::Gone,
    }
}

/// Whether `pid` has exited (a zombie, or gone).
pub fn has_exited(pid: u32) -> bool {
    !matches!(process_state(pid), ProcessState::Alive { .. })
}

/// The process (thread group) `tid` belongs to, from /proc/TID/status; None if there is none.
fn thread_group_of(tid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{tid}/status")).ok()?;
    status.lines().find_map(|line| line.strip_prefix("Tgid:")).and_then(|v| v.trim().parse().ok())
}

impl Target {
    /// A running process. A thread id resolves to its process.
    pub fn running(pid: u32) -> Result<Target> {
        let Some(tgid) = thread_group_of(pid) else {
            return Err(Error::no_target(format!("no process with pid {pid}")));
        };
        let thread = (tgid != pid).then_some(pid);
        let pid = tgid;
        match process_state(pid) {
            ProcessState::Alive { kernel_thread: true } => {
                return Err(Error::no_target(format!(
                    "pid {pid} has no executable (a kernel thread)"
                )));
            }
            ProcessState::Zombie => {
                return Err(Error::no_target(format!(
                    "pid {pid} has exited (a zombie its parent has not reaped yet)"
                )));
            }
            ProcessState::Gone => return Err(Error::no_target(format!("pid {pid} exited"))),
            ProcessState::Alive { kernel_thread: false } => {}
        }
        let exe = PathBuf::from(format!("/proc/{pid}/exe"));
        let exe_name = match std::fs::read_link(&exe) {
            Ok(path) => path.to_string_lossy().into_owned(),
            Err(err) if err.kind() == IoErrorKind::NotFound => {
                return Err(Error::no_target(match has_exited(pid) {
                    true => format!("pid {pid} exited"),
                    false => format!("pid {pid} has no executable"),
                }));
            }
            Err(err) if err.kind() == IoErrorKind::PermissionDenied => {
                return Err(Error::permission(format!(
                    "cannot read /proc/{pid}/exe: permission denied: {}",
                    ptrace_advice()
                )));
            }
            Err(err) => return Err(Error::no_target(format!("reading /proc/{pid}/exe: {err}"))),
        };
        let namespace = namespaces(pid, &exe_name);
        Ok(Target { pid, exe, exe_name, thread, go_module: None, notes: Vec::new(), namespace })
    }

    /// `err`, or "the target exited" if it has: for failures while setting up, before anything
    /// is attached, which a process that just exited explains.
    pub fn exited_or(&self, err: Error) -> Error {
        match has_exited(self.pid) {
            true => Error::no_target(format!("pid {} exited before deferprobe attached", self.pid)),
            false => err,
        }
    }

    /// Opens and analyses the Go module of a running process: its executable or, when that
    /// is not Go, the Go library among its file mappings that holds the Go runtime (then
    /// [`Target::exe`] and [`Target::go_module`] name it). Errors name the process and its
    /// executable or library, not `/proc/PID/...`.
    pub fn open_binary(&mut self) -> Result<GoBinary> {
        let not_go = match GoBinary::open(&self.exe) {
            Ok(binary) => {
                binary
                    .require_host_arch()
                    .map_err(|err| self.named(err, &self.exe, &self.exe_name))?;
                return Ok(binary);
            }
            Err(err @ BinaryError::NotGo { .. }) => err,
            Err(err) => return Err(self.named(err, &self.exe, &self.exe_name)),
        };
        let modules = go_modules(self.pid);
        let with_runtime: Vec<&GoModule> =
            modules.iter().filter(|module| module.has_runtime).collect();
        let Some(chosen) = with_runtime.first() else {
            let mut error = self.named(not_go, &self.exe, &self.exe_name);
            error.message += &match modules.is_empty() {
                true => format!(", nor is any file it has mapped; {C_SHARED_HINT}"),
                false => format!(
                    ", and the Go modules it has mapped ({}) hold no Go runtime",
                    names(&modules)
                ),
            };
            return Err(error);
        };
        let binary = GoBinary::open(&chosen.open_path)
            .and_then(|binary| binary.require_host_arch().map(|()| binary))
            .map_err(|err| self.named(err, &chosen.open_path, &chosen.name))?;
        if modules.len() > 1 {
            self.notes.push(format!(
                "pid {} has {} Go modules mapped ({}): traced {}, {}",
                self.pid,
                modules.len(),
                names(&modules),
                chosen.name,
                match with_runtime.len() {
                    1 => "the one with the Go runtime".to_owned(),
                    n => format!(
                        "the first of the {n} with a Go runtime (the others' are not traced)"
                    ),
                }
            ));
        }
        self.exe = chosen.open_path.clone();
        self.go_module = Some(chosen.name.clone());
        Ok(binary)
    }

    /// `err` with `path` replaced by "pid P (NAME)".
    fn named(&self, err: BinaryError, path: &Path, name: &str) -> Error {
        let mut error = Error::from(err);
        error.message = error.message.replacen(
            &path.display().to_string(),
            &format!("pid {} ({name})", self.pid),
            1,
        );
        self.exited_or(error)
    }
}

/// Opens and analyses the executable of a command (`run -- CMD`): one that is not Go is
/// refused with [`C_SHARED_HINT`].
pub fn open_command(path: &Path) -> Result<GoBinary> {
    GoBinary::open(path).and_then(|binary| binary.require_host_arch().map(|()| binary)).map_err(
        |err| {
            let not_go = matches!(err, BinaryError::NotGo { .. });
            let mut error = Error::from(err);
            if not_go {
                error.message += &format!("; {C_SHARED_HINT}");
            }
            error
        },
    )
}

/// A Go binary a process has mapped (a shared library, or the executable itself).
#[derive(Debug)]
struct GoModule {
    /// As `/proc/PID/maps` names it.
    name: String,
    /// `/proc/PID/map_files/START-END` of its mapping of file offset 0 (also when the file
    /// was deleted or lives in another mount namespace), or `/proc/PID/root/PATH` when
    /// map_files can't be opened.
    open_path: PathBuf,
    /// Whether it contains the Go runtime (`runtime.deferreturn`), not only Go code linked
    /// against a runtime elsewhere.
    has_runtime: bool,
}

fn names(modules: &[GoModule]) -> String {
    modules.iter().map(|module| module.name.as_str()).collect::<Vec<_>>().join(", ")
}

/// The Go binaries among the files `pid` has mapped, in address order, the executable left out.
fn go_modules(pid: u32) -> Vec<GoModule> {
    let exe = std::fs::metadata(format!("/proc/{pid}/exe")).ok().map(|m| (m.dev(), m.ino()));
    let mut seen = std::collections::HashSet::new();
    let mut modules = Vec::new();
    for mapping in mappings(pid) {
        if mapping.offset != 0 || mapping.inode == 0 || !mapping.path.starts_with('/') {
            continue;
        }
        if !seen.insert((mapping.device.clone(), mapping.inode)) {
            continue;
        }
        let map_file =
            PathBuf::from(format!("/proc/{pid}/map_files/{:x}-{:x}", mapping.start, mapping.end));
        let name = mapping.path.trim_end_matches(" (deleted)").to_owned();
        let open_path = match File::open(&map_file) {
            Ok(_) => map_file,
            Err(_) => PathBuf::from(format!("/proc/{pid}/root{name}")),
        };
        let same_as_exe = std::fs::metadata(&open_path).ok().map(|m| (m.dev(), m.ino())) == exe;
        if same_as_exe {
            continue;
        }
        let Ok(binary) = GoBinary::open(&open_path) else { continue };
        let has_runtime = binary.function("runtime.deferreturn").is_some();
        modules.push(GoModule { name, open_path, has_runtime });
    }
    modules
}

/// One line of `/proc/PID/maps`.
#[derive(Debug, PartialEq, Eq)]
struct Mapping {
    start: u64,
    end: u64,
    offset: u64,
    /// `major:minor`, in hex, as the kernel prints it.
    device: String,
    inode: u64,
    /// The file, `[heap]`-style pseudo names, or empty.
    path: String,
}

/// The mappings of `pid` (none if it is gone).
fn mappings(pid: u32) -> Vec<Mapping> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    maps.lines().filter_map(parse_mapping).collect()
}

fn parse_mapping(line: &str) -> Option<Mapping> {
    let mut fields = line.splitn(6, ' ');
    let (start, end) = fields.next()?.split_once('-')?;
    let _perms = fields.next()?;
    let offset = u64::from_str_radix(fields.next()?, 16).ok()?;
    let device = fields.next()?.to_owned();
    let inode = fields.next()?.parse().ok()?;
    Some(Mapping {
        start: u64::from_str_radix(start, 16).ok()?,
        end: u64::from_str_radix(end, 16).ok()?,
        offset,
        device,
        inode,
        path: fields.next().unwrap_or("").trim_start().to_owned(),
    })
}

/// The parent of `pid` (/proc/PID/stat field 4), None if it is gone.
pub fn parent_pid(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()
}

/// The command line of `pid` (/proc/PID/cmdline), empty if it is gone.
pub fn command_line(pid: u32) -> Vec<String> {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    cmdline
        .split(|&byte| byte == 0)
        .filter(|arg| !arg.is_empty())
        .map(|arg| String::from_utf8_lossy(arg).into_owned())
        .collect()
}

/// Where a process lives when its namespaces are not deferprobe's (a container).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Namespaces {
    /// Its pid in each pid namespace it is in, from deferprobe's (the host's) to its own
    /// (`NSpid` in /proc/PID/status).
    pub pids: Vec<u32>,
    /// In a pid namespace of its own, or a mount namespace of its own.
    pub own_pid_namespace: bool,
    pub own_mount_namespace: bool,
    /// Where deferprobe reads its executable: the executable's path in the process's own
    /// mount namespace, seen through `/proc/PID/root` (the probes go on the same inode).
    pub exe_from_here: Option<String>,
}

/// `pid`'s namespaces, when its pid or mount namespace is not deferprobe's; None when both
/// are (or it is gone).
pub fn namespaces(pid: u32, exe_name: &str) -> Option<Namespaces> {
    let namespace = |of: &str, kind: &str| std::fs::read_link(format!("/proc/{of}/ns/{kind}")).ok();
    let differs = |kind: &str| {
        let theirs = namespace(&pid.to_string(), kind);
        theirs.is_some() && theirs != namespace("self", kind)
    };
    let (own_pid_namespace, own_mount_namespace) = (differs("pid"), differs("mnt"));
    if !own_pid_namespace && !own_mount_namespace {
        return None;
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let pids = status
        .lines()
        .find_map(|line| line.strip_prefix("NSpid:"))
        .map(|pids| pids.split_whitespace().filter_map(|p| p.parse().ok()).collect())
        .unwrap_or_default();
    let exe_from_here = (own_mount_namespace && exe_name.starts_with('/'))
        .then(|| format!("/proc/{pid}/root{}", exe_name.trim_end_matches(" (deleted)")));
    Some(Namespaces { pids, own_pid_namespace, own_mount_namespace, exe_from_here })
}

/// What reading another process's executable and memory needs, for one who lacks it.
pub fn ptrace_advice() -> &'static str {
    // SAFETY: geteuid has no preconditions.
    match unsafe { libc::geteuid() } {
        0 => {
            "deferprobe runs as root but without CAP_SYS_PTRACE, which reading another \
             process's executable and memory needs (or YAMA ptrace_scope 3 forbids it)"
        }
        _ => {
            "reading another user's process needs CAP_SYS_PTRACE: run deferprobe as root, or \
             grant it CAP_SYS_PTRACE"
        }
    }
}

/// A forked child that waits, before exec, until [`GatedChild::release`].
#[derive(Debug)]
pub struct GatedChild {
    pub target: Target,
    gate: File,
    exec_status: File,
}

impl GatedChild {
    /// Forks a child that will exec `path` with `command` as its argv once released. Resolve
    /// `path` with [`resolve_program`] first.
    pub fn spawn(path: &Path, command: &[String]) -> Result<GatedChild> {
        let program = command.first().ok_or_else(|| Error::usage("no command after --"))?;
        let c_path = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| Error::usage(format!("{program}: NUL byte in path")))?;
        let c_args = command
            .iter()
            .map(|arg| CString::new(arg.as_bytes()))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|_| Error::usage("NUL byte in a command argument"))?;
        let mut argv: Vec<*const libc::c_char> = c_args.iter().map(|a| a.as_ptr()).collect();
        argv.push(std::ptr::null());

        let (gate_read, gate_write) = cloexec_pipe()?;
        let (status_read, status_write) = cloexec_pipe()?;
        // SAFETY: getpid has no preconditions.
        let parent = unsafe { libc::getpid() };
        // SAFETY: between fork and exec the child only calls async-signal-safe functions
        // (read, write, execv, _exit) on memory prepared before the fork.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(Error::internal(format!("fork: {}", std::io::Error::last_os_error())));
        }
        if pid == 0 {
            let fds = ChildFds {
                gate: gate_read.as_raw_fd(),
                gate_parent_end: gate_write.as_raw_fd(),
                status: status_write.as_raw_fd(),
                status_parent_end: status_read.as_raw_fd(),
                parent,
            };
            unsafe { child_after_fork(fds, &c_path, &argv) }
        }
        drop(gate_read);
        drop(status_write);
        Ok(GatedChild {
            target: Target {
                pid: pid as u32,
                exe: path.to_path_buf(),
                exe_name: path.to_string_lossy().into_owned(),
                thread: None,
                go_module: None,
                notes: Vec::new(),
                namespace: None,
            },
            gate: File::from(gate_write),
            exec_status: File::from(status_read),
        })
    }

    /// Lets the child exec its command. Returns once the exec has happened (or failed).
    pub fn release(mut self) -> Result<()> {
        self.gate
            .write_all(b"x")
            .map_err(|err| Error::internal(format!("releasing the child: {err}")))?;
        let mut errno = [0u8; 4];
        match self.exec_status.read(&mut errno) {
            // The status pipe is close-on-exec: EOF means exec succeeded.
            Ok(0) => Ok(()),
            Ok(_) => {
                reap(self.target.pid);
                let err = std::io::Error::from_raw_os_error(i32::from_ne_bytes(errno));
                Err(Error::no_target(format!("cannot execute {}: {err}", self.target.exe_name)))
            }
            Err(err) => Err(Error::internal(format!("waiting for exec: {err}"))),
        }
    }

    /// Ends the child without running the command (closing the gate makes it exit).
    pub fn abort(self) {
        let pid = self.target.pid;
        drop(self);
        reap(pid);
    }
}

/// The pipe ends as the forked child sees them.
struct ChildFds {
    gate: RawFd,
    gate_parent_end: RawFd,
    status: RawFd,
    status_parent_end: RawFd,
    /// deferprobe's pid.
    parent: libc::pid_t,
}

/// Runs in the forked child: wait at the gate, then exec; report exec failure through the
/// status pipe.
unsafe fn child_after_fork(fds: ChildFds, path: &CString, argv: &[*const libc::c_char]) -> ! {
    unsafe {
        // The command dies with deferprobe, even of SIGKILL: untraced, it would run on
        // orphaned. (Checked after: deferprobe may have died before the prctl.)
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0);
        if libc::getppid() != fds.parent {
            libc::_exit(126);
        }
        // Rust ignores SIGPIPE in deferprobe; the command gets the default back, as from a
        // shell. Other dispositions and the signal mask are as deferprobe inherited them.
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        // deferprobe blocks SIGINT, SIGTERM and SIGUSR1 to read them from a signalfd; the
        // command handles them as usual.
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGUSR1);
        libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        // Only the parent may hold these: the gate must read EOF when the parent lets go.
        libc::close(fds.gate_parent_end);
        libc::close(fds.status_parent_end);
        let mut byte = 0u8;
        let n = libc::read(fds.gate, (&raw mut byte).cast(), 1);
        if n != 1 {
            // The parent gave up (or died) before releasing us.
            libc::_exit(126);
        }
        libc::execv(path.as_ptr(), argv.as_ptr());
        let errno = *libc::__errno_location();
        libc::write(fds.status, (&raw const errno).cast(), 4);
        libc::_exit(127);
    }
}

fn cloexec_pipe() -> Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: fds is a valid two-element array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(Error::internal(format!("pipe2: {}", std::io::Error::last_os_error())));
    }
    // SAFETY: pipe2 returned two fresh descriptors we now own.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn reap(pid: u32) {
    let mut status = 0;
    // SAFETY: waiting for our own child.
    unsafe { libc::waitpid(pid as i32, &mut status, 0) };
}

/// `program` as a shell would find it: a path if it contains '/', else the first executable
/// file of that name in PATH.
pub fn resolve_program(program: &str) -> Result<PathBuf> {
    let is_executable = |path: &Path| {
        path.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.contains('/') {
        let path = PathBuf::from(program);
        if !path.exists() {
            return Err(Error::no_target(format!("{program}: no such file")));
        }
        if !is_executable(&path) {
            return Err(Error::no_target(format!("{program}: not an executable file")));
        }
        return path.canonicalize().map_err(|err| Error::no_target(format!("{program}: {err}")));
    }
    let search = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&search)
        .map(|dir| dir.join(program))
        .find(|path| is_executable(path))
        .ok_or_else(|| Error::no_target(format!("{program}: command not found in PATH")))
}

/// Runtime address − ELF virtual address of `binary` in process `pid`: where it mapped the
/// start of the file, less where the ELF file says it goes; 0 for position-dependent binaries
/// (and when the mapping can't be found). `binary` is the traced module: the executable or a
/// shared library ([`Target::open_binary`]).
pub fn load_bias(binary: &GoBinary, pid: u32) -> u64 {
    match binary.is_pie() {
        true => module_mapping_start(pid, binary.path())
            .map_or(0, |start| start.wrapping_sub(binary.file_start_vaddr())),
        false => 0,
    }
}

/// Where `pid` mapped file offset 0 of `file` (the executable, a library, or a
/// `/proc/PID/...` link to one): the mapping of the same inode (on the same device when the
/// kernel's numbers agree with stat's, as they may not on overlayfs), else of the same path.
/// None if the process is gone or has no such mapping.
pub fn module_mapping_start(pid: u32, file: &Path) -> Option<u64> {
    let mappings: Vec<Mapping> = mappings(pid).into_iter().filter(|m| m.offset == 0).collect();
    if let Ok(meta) = std::fs::metadata(file) {
        let device = format!("{:02x}:{:02x}", libc::major(meta.dev()), libc::minor(meta.dev()));
        let same_inode = |m: &&Mapping| m.inode == meta.ino();
        let found = mappings.iter().filter(same_inode).find(|m| m.device == device);
        if let Some(mapping) = found.or_else(|| mappings.iter().find(same_inode)) {
            return Some(mapping.start);
        }
    }
    let path = std::fs::read_link(file).unwrap_or_else(|_| file.to_path_buf());
    let path = path.to_string_lossy();
    let path = path.trim_end_matches(" (deleted)");
    mappings.iter().find(|m| m.path.trim_end_matches(" (deleted)") == path).map(|m| m.start)
}

/// The CPU time each thread of `pid` has used, in ns (/proc/PID/task/TID/schedstat: the
/// scheduler's own account, to the nanosecond, uprobe traps included), by thread id. None if
/// the process is gone.
pub fn thread_cpu_times(pid: u32) -> Option<Vec<(u32, u64)>> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut times: Vec<(u32, u64)> = tasks
        .filter_map(|task| {
            let task = task.ok()?;
            let tid = task.file_name().to_str()?.parse().ok()?;
            let schedstat = std::fs::read_to_string(task.path().join("schedstat")).ok()?;
            Some((tid, schedstat.split_whitespace().next()?.parse().ok()?))
        })
        .collect();
    times.sort_unstable();
    (!times.is_empty()).then_some(times)
}

/// How a process ended, as a shell reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitStatus {
    Code(i32),
    Signal(i32),
}

impl ExitStatus {
    /// From a wait status, as waitpid(2) returns it.
    pub fn from_wait(status: i32) -> ExitStatus {
        match libc::WIFSIGNALED(status) {
            true => ExitStatus::Signal(libc::WTERMSIG(status)),
            false => ExitStatus::Code(libc::WEXITSTATUS(status)),
        }
    }

    /// The exit code a shell would give: the code, or 128 + signal.
    pub fn shell_code(self) -> i32 {
        match self {
            ExitStatus::Code(code) => code,
            ExitStatus::Signal(signal) => 128 + signal,
        }
    }
}

/// A pidfd for `pid`: readable once the process has exited.
pub fn pidfd(pid: u32) -> Result<OwnedFd> {
    // SAFETY: plain syscall; the result is a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        let err = std::io::Error::last_os_error();
        return Err(match err.raw_os_error() {
            Some(libc::ESRCH) => Error::no_target(format!("no process with pid {pid}")),
            _ => Error::kernel(format!("pidfd_open({pid}): {err} (need Linux >= 5.3)")),
        });
    }
    // SAFETY: a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Reaps our exited child `pid` and returns how it ended.
pub fn wait_child(pid: u32) -> Result<ExitStatus> {
    let mut status = 0;
    // SAFETY: waiting for our own child.
    let rc = unsafe { libc::waitpid(pid as i32, &mut status, 0) };
    if rc < 0 {
        return Err(Error::internal(format!("waitpid: {}", std::io::Error::last_os_error())));
    }
    Ok(ExitStatus::from_wait(status))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_target_errors() {
        let err = Target::running(i32::MAX as u32).unwrap_err();
        assert_eq!(err.to_string(), format!("no process with pid {}", i32::MAX));
        let me = Target::running(std::process::id()).unwrap();
        assert_eq!(me.exe, PathBuf::from(format!("/proc/{}/exe", std::process::id())));
        assert_eq!(me.go_module, None);
    }

    #[test]
    fn maps_lines() {
        let line = "7f12a4c00000-7f12a4c3c000 r--p 00000000 fd:01 1837420                    \
                    /tmp/lib go (deleted)";
        assert_eq!(
            parse_mapping(line),
            Some(Mapping {
                start: 0x7f12a4c00000,
                end: 0x7f12a4c3c000,
                offset: 0,
                device: "fd:01".into(),
                inode: 1837420,
                path: "/tmp/lib go (deleted)".into(),
            })
        );
        let anonymous = parse_mapping("7ffd1000-7ffd2000 rw-p 00001000 00:00 0 ").unwrap();
        assert_eq!((anonymous.offset, anonymous.inode, anonymous.path.as_str()), (0x1000, 0, ""));
        assert_eq!(parse_mapping("garbage"), None);
        // This test binary: found by inode through /proc/self/exe, at its lowest mapping.
        let pid = std::process::id();
        let start = module_mapping_start(pid, Path::new("/proc/self/exe")).unwrap();
        let lowest = mappings(pid)
            .into_iter()
            .filter(|m| {
                m.offset == 0 && m.path == std::env::current_exe().unwrap().to_string_lossy()
            })
            .map(|m| m.start)
            .min();
        assert_eq!(Some(start), lowest);
    }

    #[test]
    fn reads_proc() {
        let me = std::process::id();
        // SAFETY: getppid has no preconditions.
        assert_eq!(parent_pid(me), Some(unsafe { libc::getppid() } as u32));
        assert_eq!(command_line(me), std::env::args().collect::<Vec<_>>());
        assert_eq!(namespaces(me, "/x"), None, "deferprobe's own namespaces are not another's");
        assert_eq!((parent_pid(i32::MAX as u32), command_line(i32::MAX as u32)), (None, vec![]));
    }

    #[test]
    fn resolves_programs_like_a_shell() {
        assert!(resolve_program("sh").unwrap().is_absolute());
        assert!(
            resolve_program("no-such-program-xyz").unwrap_err().to_string().contains("not found")
        );
        let plain_file =
            std::env::temp_dir().join(format!("deferprobe-test-{}", std::process::id()));
        std::fs::write(&plain_file, "not a program").unwrap();
        std::fs::set_permissions(&plain_file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = resolve_program(plain_file.to_str().unwrap()).unwrap_err();
        std::fs::remove_file(&plain_file).unwrap();
        assert!(err.to_string().contains("not an executable"), "{err}");
    }

    #[test]
    fn gated_child_runs_only_when_released() {
        let sh = resolve_program("sh").unwrap();
        let child = GatedChild::spawn(&sh, &["sh".into(), "-c".into(), "exit 7".into()]).unwrap();
        let pid = child.target.pid;
        child.release().unwrap();
        assert_eq!(wait_child(pid).unwrap(), ExitStatus::Code(7));

        let child = GatedChild::spawn(&sh, &["sh".into(), "-c".into(), "exit 0".into()]).unwrap();
        child.abort();
    }
}
