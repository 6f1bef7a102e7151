//! A goroutine's call stack, read from its own stack memory without stopping it: from where
//! its g says it resumes (`g.sched`: pc, sp and frame pointer, saved when it parked, was
//! preempted or entered a syscall; `g.syscallpc`/`syscallsp`/`syscallbp` while in a syscall),
//! then up its frame-pointer chain. Go on amd64 keeps frame pointers: every frame that calls
//! another saves its caller's BP just below its return address and points BP at it, so from a
//! frame pointer `fp`, `[fp + 8]` is the return address into the caller and `[fp]` the
//! caller's frame pointer, and the caller's SP at that call is `fp + 16`.
//!
//! Pure decoding over [`Memory`]: the pcs are runtime addresses, for [`crate::binary`] to name.
//! A stack that can't be read whole says why ([`Unwalked`]), never guesses: a running
//! goroutine's saved context is stale, and before Go 1.23 a goroutine in a syscall has no
//! frame pointer saved. Each walk is checked like a `_defer` chain: the g is read again after
//! it, and a goroutine that moved on is walked again (up to [`ATTEMPTS`] times).

use super::{
    goroutines::{
        ATTEMPTS, G_COPYSTACK, G_RUNNING, G_SYSCALL, GoroutineHeader, SavedContext, read_headers,
    },
    memory::Memory,
};
use crate::layout::RuntimeLayout;

/// Most frames walked (a bound against corrupt memory; deeper stacks are cut, and say so).
pub const MAX_FRAMES: usize = 512;

/// Bytes of stack read at once from the resume SP: most goroutines' whole stack, in one read.
const WINDOW_BYTES: u64 = 32 * 1024;

/// One frame, innermost first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame {
    /// Where the frame's function is: the resume pc for the innermost frame, the return
    /// address into it for the others. Each is the address after a CALL (gopark's `mcall`,
    /// `entersyscall`, a call to the frame below), so the call is at `pc - 1`.
    pub pc: u64,
    /// The frame's SP at that call: what a `_defer` record of this frame holds in `sp`.
    pub sp: u64,
}

/// Why a goroutine's stack was not read (or not whole).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unwalked {
    /// Running on a thread: its saved context is stale.
    Running,
    /// In a syscall, on a Go release that saves no frame pointer for it (before 1.23).
    SyscallWithoutFramePointer,
    /// Its saved context is empty.
    NoContext,
    /// It kept changing while read (or its stack was being copied).
    Changed,
    /// A read failed.
    Unreadable,
}

impl Unwalked {
    /// Why, in words (a pprof label value).
    pub fn describe(self) -> &'static str {
        match self {
            Unwalked::Running => "goroutine running: its saved stack is stale",
            Unwalked::SyscallWithoutFramePointer => {
                "goroutine in a syscall, whose frame pointer Go saves only from 1.23"
            }
            Unwalked::NoContext => "goroutine has no saved context",
            Unwalked::Changed => "goroutine changed while its stack was read",
            Unwalked::Unreadable => "stack memory could not be read",
        }
    }
}

/// How a walk up the frame-pointer chain ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StackEnd {
    /// At the outermost frame (a zero frame pointer or return address).
    Complete,
    /// At [`MAX_FRAMES`].
    Truncated,
    /// At a frame pointer outside the stack, misaligned or not above the one before, or one
    /// that could not be read: the frames before it stand, the rest is unknown.
    Broken,
}

/// A goroutine's stack at one moment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GoroutineStack {
    Walked { frames: Vec<Frame>, end: StackEnd },
    Unwalked(Unwalked),
}

impl GoroutineStack {
    pub fn frames(&self) -> &[Frame] {
        match self {
            GoroutineStack::Walked { frames, .. } => frames,
            GoroutineStack::Unwalked(_) => &[],
        }
    }

    /// The frames from the one whose SP is `sp` (the frame owning a `_defer` record) out to the
    /// outermost; None if no frame walked has that SP.
    pub fn from_frame(&self, sp: u64) -> Option<&[Frame]> {
        let frames = self.frames();
        frames.iter().position(|frame| frame.sp == sp).map(|at| &frames[at..])
    }
}

/// Reads the stack of the goroutine whose header was just read, checking the g again after.
pub fn read_stack(
    memory: &impl Memory,
    layout: &RuntimeLayout,
    header: GoroutineHeader,
) -> GoroutineStack {
    let mut header = header;
    for _ in 0..ATTEMPTS {
        let stack = walk(memory, &header);
        let Some(again) = read_headers(memory, layout, &[header.g])[0] else {
            return GoroutineStack::Unwalked(Unwalked::Unreadable);
        };
        let same = again.goid == header.goid
            && again.status == header.status
            && again.saved == header.saved
            && (again.stack_lo, again.stack_hi) == (header.stack_lo, header.stack_hi);
        if same {
            return stack;
        }
        header = again;
    }
    GoroutineStack::Unwalked(Unwalked::Changed)
}

/// Walks the stack `header` describes, as it is in `memory` now.
pub fn walk(memory: &impl Memory, header: &GoroutineHeader) -> GoroutineStack {
    let unwalked = GoroutineStack::Unwalked;
    let SavedContext { sched_sp, sched_pc, sched_bp, syscall_sp, syscall_pc, syscall_bp } =
        header.saved;
    let (pc, sp, bp) = match header.state() {
        G_RUNNING => return unwalked(Unwalked::Running),
        G_COPYSTACK => return unwalked(Unwalked::Changed),
        G_SYSCALL => match syscall_bp {
            Some(bp) => (syscall_pc, syscall_sp, bp),
            None => return unwalked(Unwalked::SyscallWithoutFramePointer),
        },
        // Runnable, waiting, preempted (and leaked, 1.26+): resumes from g.sched.
        _ => (sched_pc, sched_sp, sched_bp),
    };
    let stack = header.stack_lo..header.stack_hi;
    if pc == 0 || !stack.contains(&sp) {
        return unwalked(Unwalked::NoContext);
    }
    let window = StackWindow::read(memory, sp, header.stack_hi);
    let mut frames = vec![Frame { pc, sp }];
    let mut fp = bp;
    let end = loop {
        if fp == 0 {
            break StackEnd::Complete;
        }
        let below = frames.last().map_or(sp, |frame| frame.sp);
        if fp % 8 != 0 || fp < below || fp.saturating_add(16) > header.stack_hi {
            break StackEnd::Broken;
        }
        if frames.len() >= MAX_FRAMES {
            break StackEnd::Truncated;
        }
        let (Some(caller_fp), Some(return_pc)) = (window.word(fp), window.word(fp + 8)) else {
            break StackEnd::Broken;
        };
        if return_pc == 0 {
            break StackEnd::Complete;
        }
        frames.push(Frame { pc: return_pc, sp: fp + 16 });
        if caller_fp != 0 && caller_fp <= fp {
            break StackEnd::Broken;
        }
        fp = caller_fp;
    };
    GoroutineStack::Walked { frames, end }
}

/// The stack from `base` up, read at once as far as [`WINDOW_BYTES`]; words beyond it, or all
/// of them if that read failed, are read one by one.
struct StackWindow<'m, M: Memory> {
    memory: &'m M,
    base: u64,
    bytes: Vec<u8>,
}

impl<'m, M: Memory> StackWindow<'m, M> {
    fn read(memory: &'m M, base: u64, hi: u64) -> Self {
        let mut bytes = vec![0u8; hi.saturating_sub(base).min(WINDOW_BYTES) as usize];
        if !memory.read(base, &mut bytes) {
            bytes.clear();
        }
        StackWindow { memory, base, bytes }
    }

    fn word(&self, at: u64) -> Option<u64> {
        let offset = usize::try_from(at.checked_sub(self.base)?).ok()?;
        match self.bytes.get(offset..offset + 8) {
            Some(word) => Some(u64::from_le_bytes(word.try_into().ok()?)),
            None => self.memory.read_u64(at),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::MemoryImage;

    const LO: u64 = 0xc000_0000;
    const HI: u64 = 0xc000_4000;

    /// A parked goroutine whose stack holds a chain of three frames above the resume frame:
    /// (frame pointer, saved caller fp, return address).
    fn parked(chain: &[(u64, u64, u64)]) -> (GoroutineHeader, MemoryImage) {
        let mut image = MemoryImage::default();
        image.insert(LO, &vec![0u8; (HI - LO) as usize]);
        for &(fp, caller_fp, ret) in chain {
            assert!(image.write_u64(fp, caller_fp) && image.write_u64(fp + 8, ret));
        }
        let header = GoroutineHeader {
            g: 0xc100_0000,
            goid: 7,
            status: 4, // _Gwaiting
            stack_lo: LO,
            stack_hi: HI,
            defers: 0,
            saved: SavedContext {
                sched_sp: LO + 0x100,
                sched_pc: 0x40_1000,
                sched_bp: chain.first().map_or(0, |link| link.0),
                ..SavedContext::default()
            },
        };
        (header, image)
    }

    #[test]
    fn walks_the_frame_pointer_chain_to_the_outermost_frame() {
        let chain = [
            (LO + 0x140, LO + 0x200, 0x40_2005),
            (LO + 0x200, LO + 0x3f00, 0x40_3005),
            (LO + 0x3f00, 0, 0x40_0001), // the entry function returns to goexit
        ];
        let (header, image) = parked(&chain);
        let stack = walk(&image, &header);
        let expected = vec![
            Frame { pc: 0x40_1000, sp: LO + 0x100 },
            Frame { pc: 0x40_2005, sp: LO + 0x150 },
            Frame { pc: 0x40_3005, sp: LO + 0x210 },
            Frame { pc: 0x40_0001, sp: LO + 0x3f10 },
        ];
        assert_eq!(stack, GoroutineStack::Walked { frames: expected, end: StackEnd::Complete });
        // The frame owning a record with sp LO + 0x210, and its callers.
        let owner = stack.from_frame(LO + 0x210).unwrap();
        assert_eq!(owner.iter().map(|f| f.pc).collect::<Vec<_>>(), [0x40_3005, 0x40_0001]);
        assert_eq!(stack.from_frame(LO + 0x218), None);
    }

    #[test]
    fn a_chain_leaving_the_stack_or_going_down_is_broken_not_followed() {
        for bad in [HI, LO + 0x80, LO + 0x141, LO + 0x140] {
            let chain = [(LO + 0x140, bad, 0x40_2005)];
            let (header, image) = parked(&chain);
            let GoroutineStack::Walked { frames, end } = walk(&image, &header) else {
                panic!("not walked")
            };
            assert_eq!(end, StackEnd::Broken, "caller fp {bad:#x}");
            assert_eq!(frames.len(), 2, "the frames before it stand");
        }
        // A frame pointer the stack doesn't hold, read past the window and failing.
        let (mut header, image) = parked(&[]);
        header.saved.sched_bp = HI + 0x1000;
        assert_eq!(
            walk(&image, &header),
            GoroutineStack::Walked {
                frames: vec![Frame { pc: 0x40_1000, sp: LO + 0x100 }],
                end: StackEnd::Broken
            }
        );
    }

    #[test]
    fn a_cycle_is_cut_at_max_frames_at_worst() {
        // Each frame links to the next one up, forever upward until the stack's top: bounded
        // by the stack; a chain that could loop is refused as going down.
        let chain: Vec<(u64, u64, u64)> =
            (0..1000).map(|i| (LO + 0x100 + 16 * i, LO + 0x110 + 16 * i, 0x40_1000 + i)).collect();
        let chain: Vec<_> = chain.into_iter().filter(|link| link.0 + 16 <= HI).collect();
        let (header, image) = parked(&chain);
        let GoroutineStack::Walked { frames, end } = walk(&image, &header) else {
            panic!("not walked")
        };
        assert_eq!((frames.len(), end), (MAX_FRAMES, StackEnd::Truncated));
    }

    #[test]
    fn running_and_old_syscall_goroutines_are_not_walked() {
        let (mut header, image) = parked(&[(LO + 0x140, 0, 0x40_2005)]);
        header.status = 2;
        assert_eq!(walk(&image, &header), GoroutineStack::Unwalked(Unwalked::Running));
        header.status = 3;
        assert_eq!(
            walk(&image, &header),
            GoroutineStack::Unwalked(Unwalked::SyscallWithoutFramePointer)
        );
        // Go 1.23+: from the syscall's own frame.
        header.saved.syscall_bp = Some(LO + 0x140);
        header.saved.syscall_sp = LO + 0x120;
        header.saved.syscall_pc = 0x40_5005;
        let stack = walk(&image, &header);
        assert_eq!(stack.frames()[0], Frame { pc: 0x40_5005, sp: LO + 0x120 });
        assert_eq!(stack.frames()[1], Frame { pc: 0x40_2005, sp: LO + 0x150 });
        header.status = 4 | 0x1000; // _Gscanwaiting: as waiting
        assert_eq!(walk(&image, &header).frames()[0].pc, 0x40_1000);
        header.saved.sched_pc = 0;
        assert_eq!(walk(&image, &header), GoroutineStack::Unwalked(Unwalked::NoContext));
    }
}
