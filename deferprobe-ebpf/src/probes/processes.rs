//! The traced command's process tree (raw tracepoints `sched_process_fork`, `_exec`, `_exit`):
//! which tasks descend from the command, the programs they exec (stopped with SIGSTOP before
//! their first instruction under `run --follow`, so userspace can attach their probes) and
//! how their processes end. Fires for every task on the machine: a task outside the tree costs
//! one hash lookup.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    helpers::{
        bpf_get_current_pid_tgid, bpf_probe_read_kernel,
        generated::{bpf_get_current_task, bpf_send_signal},
    },
    programs::RawTracePointContext,
};
use deferprobe_common::{ProcessEvent, ProcessEventKind, TREE_EXEC_IS_OURS, TreeCounter};

use crate::maps::*;

const SIGSTOP: u32 = 19;

#[inline(always)]
fn bump_tree(counter: TreeCounter) {
    if let Some(slot) = TREE_COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: the map value lives as long as the map.
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(slot, 1) };
    }
}

/// A `u32` field of a `task_struct` at `offset`.
#[inline(always)]
fn task_u32(task: u64, offset: u64) -> Option<u32> {
    // SAFETY: bpf_probe_read_kernel checks the address; failure is an Err, not a fault.
    unsafe { bpf_probe_read_kernel((task + offset) as *const u32) }.ok()
}

#[inline(always)]
fn emit_process(kind: ProcessEventKind, pid: u32, status: i32) {
    if let Some(mut entry) = TREE_EVENTS.reserve::<ProcessEvent>(0) {
        entry.write(ProcessEvent { kind: kind as u32, pid, status, _pad: 0 });
        entry.submit(0);
    }
}

/// `sched_process_fork(parent, child)`, run by the parent: a task of the tree made a thread or
/// a process, which joins the tree.
#[inline(always)]
pub(crate) fn on_process_fork(ctx: &RawTracePointContext) -> u32 {
    let parent = bpf_get_current_pid_tgid() as u32;
    // SAFETY: the value is copied out at once.
    if unsafe { PROCESS_TREE.get(&parent) }.is_none() {
        return 0;
    }
    let config = TREE_CONFIG.load();
    let child: u64 = ctx.arg(1);
    let (Some(pid), Some(tgid)) =
        (task_u32(child, config.task_pid), task_u32(child, config.task_tgid))
    else {
        return 0;
    };
    if PROCESS_TREE.insert(&pid, &0, 0).is_err() {
        bump_tree(TreeCounter::TreeFull);
        return 0;
    }
    if pid == tgid {
        bump_tree(TreeCounter::ProcessesStarted);
    }
    0
}

/// `sched_process_exec(p, old_pid, bprm)`, run by the process whose new program is loaded and
/// has not run yet: a signal sent now is delivered before its first instruction.
#[inline(always)]
pub(crate) fn on_process_exec(ctx: &RawTracePointContext) -> u32 {
    let pid = (bpf_get_current_pid_tgid() >> 32) as u32;
    // A thread other than the main one exec'd: it took the process's pid, its own is gone.
    let old_pid: u32 = ctx.arg::<u64>(1) as u32;
    if old_pid != pid {
        let _ = PROCESS_TREE.remove(&old_pid);
    }
    // SAFETY: the value is copied out at once.
    let Some(flags) = (unsafe { PROCESS_TREE.get(&pid) }).copied() else { return 0 };
    if flags & TREE_EXEC_IS_OURS != 0 {
        let _ = PROCESS_TREE.insert(&pid, &(flags & !TREE_EXEC_IS_OURS), 0);
        return 0;
    }
    bump_tree(TreeCounter::ProgramsExecuted);
    let status = match TREE_CONFIG.load().stop_at_exec {
        0 => 1,
        // SAFETY: plain helper call; it signals the current process.
        _ => (unsafe { bpf_send_signal(SIGSTOP) }) as i32,
    };
    if status < 0 {
        bump_tree(TreeCounter::StopsFailed);
    }
    emit_process(ProcessEventKind::Exec, pid, status);
    0
}

/// `sched_process_exit(p, ...)`, run by each exiting thread: it leaves the tree; the main
/// thread's exit reports its wait status (the process's, for an exit_group or a fatal signal).
#[inline(always)]
pub(crate) fn on_process_exit(_ctx: &RawTracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tid, pid) = (pid_tgid as u32, (pid_tgid >> 32) as u32);
    if PROCESS_TREE.remove(&tid).is_err() {
        return 0;
    }
    if tid == pid {
        // SAFETY: plain helper call; the task is only read through bpf_probe_read_kernel.
        let task = unsafe { bpf_get_current_task() };
        let status = task_u32(task, TREE_CONFIG.load().task_exit_code).unwrap_or(u32::MAX);
        emit_process(ProcessEventKind::Exit, pid, status as i32);
    }
    0
}
