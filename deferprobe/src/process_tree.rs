//! The traced command's process tree, seen from the kernel: loads the process-tree programs
//! (raw tracepoints on fork, exec and exit, which need no tracefs) with the running kernel's
//! `task_struct` offsets (from its BTF), puts the command in the tree, and reads what they
//! report: the programs the tree's processes exec (stopped before their first instruction
//! under `run --follow`), how those processes end, and how many were started.

use std::path::Path;

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, RingBuf},
    programs::RawTracePoint,
};
use deferprobe_common::{
    ProcessEvent, ProcessEventKind, TREE_EXEC_IS_OURS, TreeConfig, TreeCounter,
};
use tokio::io::{Interest, unix::AsyncFd};

use crate::{
    error::{Error, Result},
    target::ExitStatus,
    tracer::{BTF_PATH, EBPF_OBJECT, bpf_error, small_maps},
};

/// What the process-tree programs report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TreeEvent {
    /// Process `pid` of the tree exec'd a program. `stopped`: it was stopped (SIGSTOP) before
    /// its first instruction and waits for SIGCONT; false without `--follow`, or when the stop
    /// could not be sent (`stop_error`, an errno).
    Exec { pid: u32, stopped: bool, stop_error: Option<i32> },
    /// The main thread of process `pid` of the tree exited, ending the process with `status`.
    Exit { pid: u32, status: ExitStatus },
}

/// How many processes the tree started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TreeCounts {
    pub processes_started: u64,
    pub programs_executed: u64,
    pub stops_failed: u64,
    /// Tasks not followed because the kernel's set was full.
    pub tree_full: u64,
}

/// The loaded process-tree programs. Dropping it detaches them.
pub struct ProcessTree {
    // Owns the programs and their links.
    _ebpf: Ebpf,
    tree: HashMap<MapData, u32, u32>,
    counters: Array<MapData, u64>,
    events: AsyncFd<RingBuf<MapData>>,
}

impl ProcessTree {
    /// Loads and attaches the programs; with `stop_at_exec` (`--follow`) every exec in the
    /// tree is stopped for userspace to attach first. Needs a tokio runtime context.
    pub fn load(stop_at_exec: bool, offsets: TaskOffsets) -> Result<ProcessTree> {
        let offsets = offsets.get()?;
        let config = TreeConfig { stop_at_exec: stop_at_exec.into(), ..offsets };
        let mut loader = EbpfLoader::new();
        loader.override_global("TREE_CONFIG", &config, true);
        // The probes' maps are not used by this copy of the object.
        small_maps(&mut loader, &["KNOWN_MAPS", "GOROUTINE_IDS", "EVENTS"]);
        let mut ebpf =
            loader.load(EBPF_OBJECT).map_err(|err| bpf_error("loading the eBPF programs", &err))?;
        for (program, tracepoint) in [
            ("process_fork", "sched_process_fork"),
            ("process_exec", "sched_process_exec"),
            ("process_exit", "sched_process_exit"),
        ] {
            let raw: &mut RawTracePoint = ebpf
                .program_mut(program)
                .ok_or_else(|| Error::internal(format!("no eBPF program {program}")))?
                .try_into()
                .map_err(|err| bpf_error(program, &err))?;
            raw.load().map_err(|err| bpf_error(&format!("loading {program}"), &err))?;
            raw.attach(tracepoint)
                .map_err(|err| bpf_error(&format!("attaching {program} to {tracepoint}"), &err))?;
        }
        let take = |ebpf: &mut Ebpf, name: &str| {
            ebpf.take_map(name).ok_or_else(|| Error::internal(format!("no {name} map")))
        };
        let tree = HashMap::try_from(take(&mut ebpf, "PROCESS_TREE")?)
            .map_err(|err| bpf_error("PROCESS_TREE", &err))?;
        let counters = Array::try_from(take(&mut ebpf, "TREE_COUNTERS")?)
            .map_err(|err| bpf_error("TREE_COUNTERS", &err))?;
        let events = RingBuf::try_from(take(&mut ebpf, "TREE_EVENTS")?)
            .map_err(|err| bpf_error("TREE_EVENTS", &err))?;
        // SAFETY: the ring buffer's fd stays open (owned by the AsyncFd) while registered.
        let events = unsafe { AsyncFd::register_with_interest(events, Interest::READABLE) }
            .map_err(|err| Error::internal(format!("watching the process tree: {err}")))?;
        Ok(ProcessTree { _ebpf: ebpf, tree, counters, events })
    }

    /// Puts the command deferprobe forked, `pid`, in the tree before it execs. `exec_is_ours`:
    /// that exec is deferprobe's own starting of the command (its probes attached already),
    /// not one to report.
    pub fn add_command(&mut self, pid: u32, exec_is_ours: bool) -> Result<()> {
        let flags = if exec_is_ours { TREE_EXEC_IS_OURS } else { 0 };
        self.tree.insert(&pid, &flags, 0).map_err(|err| bpf_error("adding the command", &err))
    }

    /// Puts every thread of running process `pid` in the tree (listed until no new one shows
    /// up: a thread started meanwhile is in the tree through its fork).
    pub fn add_process(&mut self, pid: u32) -> Result<()> {
        let mut added = std::collections::HashSet::new();
        loop {
            let threads: Vec<u32> = std::fs::read_dir(format!("/proc/{pid}/task"))
                .map(|dir| {
                    dir.filter_map(|task| task.ok()?.file_name().to_str()?.parse().ok()).collect()
                })
                .unwrap_or_default();
            let new: Vec<u32> = threads.into_iter().filter(|tid| added.insert(*tid)).collect();
            if new.is_empty() {
                return Ok(());
            }
            for tid in new {
                self.tree
                    .insert(&tid, &0, 0)
                    .map_err(|err| bpf_error("adding the target's threads", &err))?;
            }
        }
    }

    pub fn counts(&self) -> TreeCounts {
        let get = |counter: TreeCounter| self.counters.get(&(counter as u32), 0).unwrap_or(0);
        TreeCounts {
            processes_started: get(TreeCounter::ProcessesStarted),
            programs_executed: get(TreeCounter::ProgramsExecuted),
            stops_failed: get(TreeCounter::StopsFailed),
            tree_full: get(TreeCounter::TreeFull),
        }
    }

    /// The events that arrived, waiting for at least one.
    pub async fn next_events(&mut self) -> Vec<TreeEvent> {
        loop {
            let Ok(mut guard) = self.events.readable_mut().await else { continue };
            let ring = guard.get_inner_mut();
            let mut events = Vec::new();
            while let Some(item) = ring.next() {
                events.extend(decode(&item));
            }
            guard.clear_ready();
            if !events.is_empty() {
                return events;
            }
        }
    }

    /// The events that arrived, without waiting.
    pub fn pending_events(&mut self) -> Vec<TreeEvent> {
        let ring = self.events.get_mut();
        let mut events = Vec::new();
        while let Some(item) = ring.next() {
            events.extend(decode(&item));
        }
        events
    }
}

/// The running kernel's `task_struct` offsets, read from its BTF on a thread of their own,
/// alongside the analysis of the target's binary.
pub struct TaskOffsets(std::thread::JoinHandle<Result<TreeConfig>>);

impl TaskOffsets {
    pub fn read() -> TaskOffsets {
        TaskOffsets(std::thread::spawn(|| task_offsets(Path::new(BTF_PATH))))
    }

    fn get(self) -> Result<TreeConfig> {
        self.0.join().unwrap_or_else(|_| Err(Error::internal("reading the kernel's BTF panicked")))
    }
}

/// One record of the tree's ring buffer.
fn decode(bytes: &[u8]) -> Option<TreeEvent> {
    if bytes.len() < std::mem::size_of::<ProcessEvent>() {
        return None;
    }
    // SAFETY: the record holds at least one ProcessEvent (plain integers), read unaligned.
    let event: ProcessEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
    match event.kind {
        k if k == ProcessEventKind::Exec as u32 => Some(TreeEvent::Exec {
            pid: event.pid,
            stopped: event.status == 0,
            stop_error: (event.status < 0).then_some(-event.status),
        }),
        k if k == ProcessEventKind::Exit as u32 => {
            Some(TreeEvent::Exit { pid: event.pid, status: ExitStatus::from_wait(event.status) })
        }
        _ => None,
    }
}

/// Where `task_struct` keeps `pid`, `tgid` and `exit_code` in the running kernel, from its BTF.
fn task_offsets(btf_path: &Path) -> Result<TreeConfig> {
    let missing = |what: String| {
        Error::kernel(format!(
            "the kernel's BTF ({}) {what}: can't follow processes",
            btf_path.display()
        ))
    };
    let data = std::fs::read(btf_path).map_err(|err| missing(format!("is unreadable ({err})")))?;
    let members = struct_members(&data, "task_struct").map_err(missing)?;
    let offset = |name: &str| {
        members
            .iter()
            .find(|(member, bits)| *member == name && bits % 8 == 0)
            .map(|(_, bits)| u64::from(bits / 8))
            .ok_or_else(|| missing(format!("has no task_struct.{name}")))
    };
    Ok(TreeConfig {
        task_pid: offset("pid")?,
        task_tgid: offset("tgid")?,
        task_exit_code: offset("exit_code")?,
        stop_at_exec: 0,
    })
}

/// BTF's magic number, in the first two bytes (in the writer's byte order: the kernel's).
const BTF_MAGIC: u16 = 0xeb9f;
/// `BTF_KIND_STRUCT`.
const BTF_KIND_STRUCT: u32 = 4;

/// The members (name, offset in bits) of the first struct named `name` in the raw BTF `data`
/// (Documentation/bpf/btf.rst: a header, the types, the strings). The types are walked in
/// place, nothing of the others kept: parsing all of the kernel's (tens of thousands) took
/// 85 MB. Err says what is wrong with `data`, as "is …" / "has …".
fn struct_members<'d>(
    data: &'d [u8],
    name: &str,
) -> std::result::Result<Vec<(&'d str, u32)>, String> {
    let unreadable = |why: &str| format!("is unreadable ({why})");
    let word = |bytes: &[u8], at: usize| {
        bytes.get(at..at + 4).map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
    };
    if data.get(..2) != Some(&BTF_MAGIC.to_ne_bytes()[..]) {
        return Err(unreadable("not BTF in this machine's byte order"));
    }
    let header =
        |at: usize| word(data, at).map(|w| w as usize).ok_or_else(|| unreadable("truncated"));
    let (header_len, type_off, type_len, str_off, str_len) =
        (header(4)?, header(8)?, header(12)?, header(16)?, header(20)?);
    let section = |off: usize, len: usize| {
        let start = header_len.checked_add(off)?;
        data.get(start..start.checked_add(len)?)
    };
    let types = section(type_off, type_len).ok_or_else(|| unreadable("truncated"))?;
    let strings = section(str_off, str_len).ok_or_else(|| unreadable("truncated"))?;
    let string = |off: u32| {
        let tail = strings.get(off as usize..)?;
        std::str::from_utf8(&tail[..tail.iter().position(|&b| b == 0)?]).ok()
    };
    let mut at = 0;
    // Each type: name_off, info (vlen in bits 0-15, kind in 24-28, kind_flag in 31), size or
    // type; then what its kind adds.
    while let (Some(name_off), Some(info)) = (word(types, at), word(types, at + 4)) {
        let (kind, vlen) = ((info >> 24) & 0x1f, (info & 0xffff) as usize);
        let extra = match kind {
            // INT, VAR, DECL_TAG: one u32.
            1 | 14 | 17 => 4,
            // PTR, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC, FLOAT, TYPE_TAG: nothing.
            2 | 7..=12 | 16 | 18 => 0,
            // ARRAY: btf_array.
            3 => 12,
            // STRUCT, UNION (btf_member), DATASEC (btf_var_secinfo), ENUM64 (btf_enum64).
            4 | 5 | 15 | 19 => 12 * vlen,
            // ENUM (btf_enum), FUNC_PROTO (btf_param).
            6 | 13 => 8 * vlen,
            _ => return Err(unreadable(&format!("BTF kind {kind} unknown to deferprobe"))),
        };
        let body = types.get(at + 12..at + 12 + extra).ok_or_else(|| unreadable("truncated"))?;
        if kind == BTF_KIND_STRUCT && string(name_off) == Some(name) {
            // btf_member: name_off, type, offset (with kind_flag: bit offset in bits 0-23,
            // bitfield size in 24-31).
            let bit_offset = |offset: u32| match info >> 31 {
                1 => offset & 0x00ff_ffff,
                _ => offset,
            };
            let (members, _) = body.as_chunks::<12>();
            return Ok(members
                .iter()
                .map(|member| {
                    let name = word(member, 0).and_then(string).unwrap_or("");
                    (name, bit_offset(word(member, 8).unwrap_or(0)))
                })
                .collect());
        }
        at += 12 + extra;
    }
    Err(format!("has no struct {name}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_struct_offsets_from_btf() {
        let offsets = task_offsets(Path::new(BTF_PATH)).unwrap();
        // tgid follows pid (both pid_t) in every kernel's task_struct.
        assert_eq!(offsets.task_tgid, offsets.task_pid + 4);
        assert!(offsets.task_exit_code > 0);
        let err = task_offsets(Path::new("/nonexistent")).unwrap_err();
        assert!(err.to_string().contains("can't follow processes"), "{err}");
    }

    /// A BTF blob made here: an int, a union named like the struct, then the struct, whose
    /// members use kind_flag (bit offsets in the low 24 bits).
    #[test]
    fn struct_members_from_raw_btf() {
        let strings = b"\0int\0task_struct\0pid\0tgid\0flags\0";
        let (int, task, pid, tgid, flags) = (1u32, 5, 17, 21, 26);
        let types: [&[u32]; 3] = [
            // int: INT, size 4, encoding.
            &[int, 1 << 24, 4, 32],
            // A union named task_struct (not the struct), one member.
            &[task, 5 << 24 | 1, 4, pid, 1, 0],
            // struct task_struct, kind_flag, 3 members: pid at byte 8, tgid at byte 12, a
            // 3-bit bitfield at bit 132.
            &[task, 1 << 31 | 4 << 24 | 3, 24, pid, 1, 64, tgid, 1, 96, flags, 1, 3 << 24 | 132],
        ];
        let types: Vec<u8> = types.concat().iter().flat_map(|w| w.to_ne_bytes()).collect();
        let mut data = Vec::new();
        data.extend(BTF_MAGIC.to_ne_bytes());
        data.extend([1, 0]);
        for word in [24, 0, types.len() as u32, types.len() as u32, strings.len() as u32] {
            data.extend(word.to_ne_bytes());
        }
        data.extend(&types);
        data.extend(strings);
        let members = struct_members(&data, "task_struct").unwrap();
        assert_eq!(members, [("pid", 64), ("tgid", 96), ("flags", 132)]);
        assert_eq!(struct_members(&data, "mm_struct").unwrap_err(), "has no struct mm_struct");
        let truncated = struct_members(&data[..data.len() - strings.len() - 4], "task_struct");
        assert_eq!(truncated.unwrap_err(), "is unreadable (truncated)");
        let not_btf = struct_members(b"\x7fELF and more than a header's bytes", "task_struct");
        assert!(not_btf.unwrap_err().starts_with("is unreadable (not BTF"));
    }

    /// Real programs on this kernel (needs root): a shell deferprobe starts, and the program it
    /// runs, are each stopped at their exec until SIGCONT; their exits carry their codes.
    #[test]
    fn follows_a_command_and_its_children() {
        // SAFETY: geteuid has no preconditions.
        assert_eq!(unsafe { libc::geteuid() }, 0, "this test loads eBPF programs: run as root");
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let _context = runtime.enter();
        let mut tree = ProcessTree::load(true, TaskOffsets::read()).unwrap();
        let sh = crate::target::resolve_program("sh").unwrap();
        let script = "/bin/true; exit 3".to_owned();
        let child =
            crate::target::GatedChild::spawn(&sh, &["sh".into(), "-c".into(), script]).unwrap();
        let shell = child.target.pid;
        tree.add_command(shell, false).unwrap();
        child.release().unwrap();
        let mut seen = Vec::new();
        let mut shell_code = None;
        while shell_code.is_none() {
            let events = runtime.block_on(async {
                tokio::time::timeout(std::time::Duration::from_secs(10), tree.next_events()).await
            });
            for event in events.expect("no process-tree event within 10 s") {
                match event {
                    TreeEvent::Exec { pid, stopped, .. } => {
                        assert!(stopped, "{event:?}");
                        let state = crate::target::process_state(pid);
                        assert!(matches!(state, crate::target::ProcessState::Alive { .. }));
                        seen.push(pid);
                        // SAFETY: plain kill(2) of a process of the tree, stopped at its exec.
                        unsafe { libc::kill(pid as i32, libc::SIGCONT) };
                    }
                    TreeEvent::Exit { pid, status } if pid == shell => shell_code = Some(status),
                    TreeEvent::Exit { .. } => {}
                }
            }
        }
        assert_eq!(crate::target::wait_child(shell).unwrap(), ExitStatus::Code(3));
        assert_eq!(shell_code, Some(ExitStatus::Code(3)));
        // The shell's exec, then /bin/true's in the child it forked (dash may exec it in place
        // for the last command, but not here: the exit follows).
        assert_eq!(seen.len(), 2, "{seen:?}");
        assert_eq!(seen[0], shell);
        let counts = tree.counts();
        assert_eq!((counts.processes_started, counts.programs_executed), (1, 2));
    }

    #[test]
    fn decodes_events() {
        let event = |kind: ProcessEventKind, status: i32| {
            let event = ProcessEvent { kind: kind as u32, pid: 42, status, _pad: 0 };
            // SAFETY: plain integers, viewed as bytes.
            unsafe {
                std::slice::from_raw_parts(
                    (&raw const event).cast::<u8>(),
                    std::mem::size_of::<ProcessEvent>(),
                )
            }
            .to_vec()
        };
        assert_eq!(
            decode(&event(ProcessEventKind::Exec, 0)),
            Some(TreeEvent::Exec { pid: 42, stopped: true, stop_error: None })
        );
        assert_eq!(
            decode(&event(ProcessEventKind::Exec, -libc::EPERM)),
            Some(TreeEvent::Exec { pid: 42, stopped: false, stop_error: Some(libc::EPERM) })
        );
        assert_eq!(
            decode(&event(ProcessEventKind::Exit, 3 << 8)),
            Some(TreeEvent::Exit { pid: 42, status: ExitStatus::Code(3) })
        );
        assert_eq!(
            decode(&event(ProcessEventKind::Exit, libc::SIGKILL)),
            Some(TreeEvent::Exit { pid: 42, status: ExitStatus::Signal(libc::SIGKILL) })
        );
        assert_eq!(decode(&[0; 4]), None);
    }
}
