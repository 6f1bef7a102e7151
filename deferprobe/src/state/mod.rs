//! Reading the target's runtime state: its goroutines, their pending `_defer` records and what
//! each deferred closure captured, from the process's memory, read-only and without stopping
//! it. Pure decoding over [`Memory`], so the decoders run the same on a live process and on a
//! [`MemoryImage`] captured from one. (Reading the executable is [`crate::binary`]'s job.)

pub mod goroutines;
pub mod memory;
pub mod objects;
pub mod stacks;

use crate::{binary::ClosureTypes, layout::RuntimeLayout};
pub use goroutines::{
    AllgAddresses, DeferRecord, GoroutineDefers, GoroutineHeader, SavedContext, Torn,
};
pub use memory::{Memory, MemoryImage, ProcessMemory, Recording};
pub use objects::{CapturedValue, MapLayout, Value, capture_kind};
pub use stacks::{Frame, GoroutineStack, StackEnd, Unwalked};

/// What a snapshot needs to know about the target besides its memory.
pub struct SnapshotContext<'a, 'b> {
    pub layout: RuntimeLayout,
    pub allg: AllgAddresses,
    pub closures: &'a ClosureTypes<'b>,
    /// Runtime address − ELF virtual address (PIE load bias).
    pub bias: u64,
    pub maps: MapLayout,
    /// Also read the call stack of every goroutine holding pending records (for `--pprof`).
    pub stacks: bool,
}

/// What a pending closure captured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Captures {
    /// Each captured variable with its value.
    Values(Vec<CapturedValue>),
    /// The closure captures nothing (a static funcval, or a struct with only the code
    /// pointer).
    Nothing,
    /// Unknown, and why.
    Unknown(&'static str),
}

/// One pending heap record and its closure.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingRecord {
    pub record: DeferRecord,
    /// The defer site (runtime return address of the `deferproc` call): the record's `pc`, or
    /// for a range-over-func body's record (which has none) the body's `deferprocat` call;
    /// 0 if unknown.
    pub site: u64,
    /// The closure's code (runtime address), from its word 0.
    pub code: Option<u64>,
    /// Bytes of the closure object as allocated (its struct size in 16-byte units); 0 for a
    /// static closure or an unknown layout.
    pub closure_bytes: u64,
    pub captures: Captures,
}

/// A goroutine holding pending heap records.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingGoroutine {
    pub header: GoroutineHeader,
    /// Newest first.
    pub records: Vec<PendingRecord>,
    /// Its call stack when read, if asked for ([`SnapshotContext::stacks`]); None if not
    /// (or not known: a goroutine only the events saw since the snapshot).
    pub stack: Option<GoroutineStack>,
}

/// Every goroutine's pending heap defers at one moment (as near as reading a running process
/// allows: each goroutine is read consistently, one after the other).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// CLOCK_MONOTONIC ns when reading began and ended.
    pub started_ns: u64,
    pub ended_ns: u64,
    /// g structs read (live and dead).
    pub goroutines_read: u64,
    /// Goroutines alive (not `_Gdead`).
    pub goroutines_alive: u64,
    /// Goroutines whose chain changed under every attempt, could not be read, or was not a
    /// chain: dropped and counted, never guessed.
    pub torn: u64,
    pub unreadable: u64,
    pub corrupt: u64,
    /// Goroutines with at least one pending heap record.
    pub goroutines: Vec<PendingGoroutine>,
}

/// Why no snapshot could be taken at all.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotError {
    #[error("the runtime's list of goroutines (allglen/allgptr) could not be read")]
    NoGoroutineList,
    /// Some goroutines could not be read, and then not even the goroutine list: the target's
    /// memory went away while it was read (it was exiting). Such a snapshot shows a fraction
    /// of the state as if it were all of it; the one before, brought up to the exit with the
    /// events, is the truth.
    #[error("the target exited while its goroutines were read")]
    TargetGone,
}

impl Snapshot {
    /// Reads every goroutine and its pending heap records from `memory`.
    pub fn take(
        memory: &impl Memory,
        context: &SnapshotContext<'_, '_>,
    ) -> Result<Snapshot, SnapshotError> {
        let started_ns = monotonic_ns();
        let gs =
            goroutines::read_allgs(memory, context.allg).ok_or(SnapshotError::NoGoroutineList)?;
        let headers = goroutines::read_headers(memory, &context.layout, &gs);
        let mut snapshot =
            Snapshot { started_ns, goroutines_read: gs.len() as u64, ..Snapshot::default() };
        for header in headers {
            let Some(header) = header else {
                snapshot.unreadable += 1;
                continue;
            };
            if header.dead() {
                continue;
            }
            snapshot.goroutines_alive += 1;
            if header.defers == 0 {
                continue;
            }
            let defers = match goroutines::read_defers(memory, &context.layout, header) {
                Ok(defers) => defers,
                Err(Torn::Changed) => {
                    snapshot.torn += 1;
                    continue;
                }
                Err(Torn::Unreadable) => {
                    snapshot.unreadable += 1;
                    continue;
                }
                Err(Torn::Corrupt) => {
                    snapshot.corrupt += 1;
                    continue;
                }
            };
            let records: Vec<PendingRecord> = defers
                .records
                .iter()
                .filter(|record| record.heap)
                .map(|record| pending_record(memory, context, *record))
                .collect();
            if !records.is_empty() {
                let header = defers.header;
                let stack =
                    context.stacks.then(|| stacks::read_stack(memory, &context.layout, header));
                snapshot.goroutines.push(PendingGoroutine { header, records, stack });
            }
        }
        snapshot.ended_ns = monotonic_ns();
        if snapshot.unreadable > 0
            && goroutines::read_allgs(memory, context.allg).is_none_or(|now| now.is_empty())
        {
            return Err(SnapshotError::TargetGone);
        }
        Ok(snapshot)
    }

    pub fn pending_records(&self) -> usize {
        self.goroutines.iter().map(|g| g.records.len()).sum()
    }

    /// Distinct maps the pending closures capture, by value or by reference.
    pub fn captured_maps(&self) -> usize {
        self.captured_map_addresses().len()
    }

    /// Their addresses.
    pub fn captured_map_addresses(&self) -> std::collections::HashSet<u64> {
        let records = self.goroutines.iter().flat_map(|g| &g.records);
        let values = records.flat_map(|r| match &r.captures {
            Captures::Values(values) => values.as_slice(),
            _ => &[],
        });
        values
            .filter_map(|v| match v.value {
                Value::Map { map, .. } if map != 0 => Some(map),
                _ => None,
            })
            .collect()
    }
}

fn pending_record(
    memory: &impl Memory,
    context: &SnapshotContext<'_, '_>,
    record: DeferRecord,
) -> PendingRecord {
    let closures = context.closures;
    let code = memory.read_u64(record.closure).filter(|&code| code != 0);
    let layout = code.and_then(|code| closures.layout(code.wrapping_sub(context.bias)));
    let captures = match (code, &layout) {
        (None, _) => Captures::Unknown("the closure could not be read"),
        (Some(_), Some(layout)) if layout.captures.is_empty() => Captures::Nothing,
        (Some(_), Some(layout)) => {
            match objects::read_captures(
                memory,
                closures.types(),
                layout,
                record.closure,
                context.maps,
            ) {
                Some(values) => Captures::Values(values),
                None => Captures::Unknown("the closure object could not be read"),
            }
        }
        // No code builds it: a static funcval, which captures nothing; or code deferprobe did
        // not find.
        (Some(_), None) if is_static(context, record.closure) => Captures::Nothing,
        (Some(_), None) => {
            Captures::Unknown("no code building this closure was found in the binary")
        }
    };
    let site = match (record.pc, code) {
        (0, Some(code)) => closures
            .range_site(code.wrapping_sub(context.bias))
            .map_or(0, |site| site.wrapping_add(context.bias)),
        (pc, _) => pc,
    };
    let closure_bytes = layout.map_or(0, |layout| layout.size.next_multiple_of(16));
    PendingRecord { record, site, code, closure_bytes, captures }
}

/// A funcval in the executable's own image (a closure that captures nothing).
fn is_static(context: &SnapshotContext<'_, '_>, closure: u64) -> bool {
    let (start, end) = context.closures.image_range();
    (start..end).contains(&closure.wrapping_sub(context.bias))
}

/// CLOCK_MONOTONIC in ns: the clock of `bpf_ktime_get_ns()`.
pub fn monotonic_ns() -> u64 {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use std::{
        io::{BufRead as _, BufReader, Write as _},
        process::{Command, Stdio},
    };

    use super::*;
    use crate::{
        binary::{
            GoBinary,
            testbin::{self, Program, Variant},
        },
        snapshot::{RuntimeModel, RuntimeReader},
    };

    /// The `pending` program, holding its defers until dropped.
    struct Pending {
        child: std::process::Child,
        truth: serde_json::Value,
    }

    impl Pending {
        fn start(binary: &std::path::Path) -> Pending {
            let mut child = Command::new(binary)
                .args(["-wait", "-n", "12"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            let mut stdout = BufReader::new(child.stdout.take().unwrap());
            let mut line = String::new();
            stdout.read_line(&mut line).unwrap();
            assert_eq!(line, "ready\n");
            child.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
            line.clear();
            stdout.read_line(&mut line).unwrap();
            Pending { child, truth: serde_json::from_str(&line).unwrap() }
        }
    }

    impl Drop for Pending {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    /// Reads `memory` as a RuntimeReader would, but through any [`Memory`].
    /// Memory of a process that exits after `reads_left` reads: nothing reads after that.
    struct Dying<'a> {
        image: &'a MemoryImage,
        reads_left: std::cell::Cell<usize>,
    }

    impl Memory for Dying<'_> {
        fn read(&self, addr: u64, buf: &mut [u8]) -> bool {
            let left = self.reads_left.get();
            self.reads_left.set(left.saturating_sub(1));
            left > 0 && self.image.read(addr, buf)
        }
    }

    fn take(reader: &RuntimeReader<'_, '_>, memory: &impl Memory) -> Snapshot {
        Snapshot::take(memory, &reader.context()).unwrap()
    }

    /// Starts the `pending` program at `path`, takes a live snapshot of it while recording
    /// what was read, and hands `check` the reader, the snapshot, its image and the truth.
    fn with_captured_image(
        path: &std::path::Path,
        check: impl FnOnce(&RuntimeReader<'_, '_>, Snapshot, MemoryImage, &serde_json::Value),
    ) {
        with_captured_image_of(path, false, check)
    }

    /// The same, reading the goroutines' stacks too if `stacks`.
    fn with_captured_image_of(
        path: &std::path::Path,
        stacks: bool,
        check: impl FnOnce(&RuntimeReader<'_, '_>, Snapshot, MemoryImage, &serde_json::Value),
    ) {
        let pending = Pending::start(path);
        let binary = GoBinary::open(path).unwrap();
        let model = RuntimeModel::new(&binary).unwrap();
        let pid = pending.child.id();
        let reader = RuntimeReader::new(&model, pid, crate::target::load_bias(&binary, pid));
        let reader = reader.unwrap().with_stacks(stacks);
        let recording = Recording::new(&reader.memory);
        let live = take(&reader, &recording);
        check(&reader, live, recording.into_image(), &pending.truth);
    }

    /// A live snapshot, captured as an image, decodes the same from the image; damaged images
    /// are refused record by record, never guessed.
    #[test]
    fn decodes_captured_images_and_refuses_damaged_ones() {
        for toolchain in testbin::toolchains() {
            for variant in [Variant::Plain, Variant::Stripped] {
                let path = testbin::build(&toolchain, Program::Pending, variant);
                let what = format!("go{} {variant:?}", toolchain.version);
                with_captured_image(&path, |reader, live, image, truth| {
                    let expected = truth["pending_defers"].as_u64().unwrap() as usize;
                    assert_eq!(live.pending_records(), expected, "{what}");
                    let mut replayed = take(reader, &image);
                    replayed.started_ns = live.started_ns;
                    replayed.ended_ns = live.ended_ns;
                    assert_eq!(replayed, live, "{what}: the image decodes differently");

                    // A cycle in one goroutine's chain: that goroutine is dropped as corrupt.
                    let victim = &live.goroutines[0];
                    let record = victim.records[0].record.address;
                    let mut damaged = image.clone();
                    assert!(damaged.write_u64(record + reader.model.layout.defer_link, record));
                    let snapshot = take(reader, &damaged);
                    assert_eq!(snapshot.corrupt, 1, "{what}");
                    assert_eq!(snapshot.goroutines.len(), live.goroutines.len() - 1, "{what}");

                    // A walk that leaves the chain for another goroutine's (a record freed
                    // and reused by it meanwhile): its frames are not on this goroutine's
                    // stack, so the read is torn, not merged.
                    let other = live.goroutines.iter().find(|g| g.header.g != victim.header.g);
                    let other = other.expect("the pending program has several goroutines");
                    let mut damaged = image.clone();
                    let link = record + reader.model.layout.defer_link;
                    assert!(damaged.write_u64(link, other.records[0].record.address));
                    let snapshot = take(reader, &damaged);
                    assert_eq!(snapshot.torn, 1, "{what}");
                    assert_eq!(snapshot.goroutines.len(), live.goroutines.len() - 1, "{what}");

                    // A record that can't be read: that goroutine is dropped as unreadable.
                    let mut damaged = image.clone();
                    let next = victim.header.g + reader.model.layout.g_defer;
                    assert!(damaged.write_u64(next, 0xdead_0000));
                    let snapshot = take(reader, &damaged);
                    assert_eq!(snapshot.unreadable, 1, "{what}");

                    // The target exits once the goroutine list is read: not a snapshot of its
                    // state (a fraction of it), an error.
                    let dying = Dying { image: &image, reads_left: std::cell::Cell::new(3) };
                    let gone = Snapshot::take(&dying, &reader.context());
                    assert_eq!(gone, Err(SnapshotError::TargetGone), "{what}");

                    // A map header that does not check out: entries unknown, not a count.
                    let map = victim.records.iter().find_map(|r| match &r.captures {
                        Captures::Values(values) => values.iter().find_map(|v| match v.value {
                            Value::Map { map, by_reference: false, .. } => Some(map),
                            _ => None,
                        }),
                        _ => None,
                    });
                    if let Some(map) = map {
                        let mut damaged = image.clone();
                        // An absurd count for the header's size.
                        assert!(damaged.write_u64(map, 1 << 40));
                        let snapshot = take(reader, &damaged);
                        let entries = snapshot.goroutines[0].records.iter().find_map(|r| match &r
                            .captures
                        {
                            Captures::Values(values) => values.iter().find_map(|v| match v.value {
                                Value::Map { map: m, entries, .. } if m == map => Some(entries),
                                _ => None,
                            }),
                            _ => None,
                        });
                        assert_eq!(entries, Some(None), "{what}");
                    }
                });
            }
        }
    }

    /// Every holding goroutine's stack, read from its saved context and frame pointers, has a
    /// frame owning each of its records, in the function of the truth's defer statement (for a
    /// range-over-func body, the function whose loop it is), and ends in runtime.goexit; the
    /// captured image decodes the same stacks.
    #[test]
    fn stacks_lead_from_the_owning_frame_to_goexit_in_captured_images() {
        for toolchain in testbin::toolchains() {
            for variant in [Variant::Plain, Variant::Stripped] {
                let path = testbin::build(&toolchain, Program::Pending, variant);
                let what = format!("go{} {variant:?}", toolchain.version);
                with_captured_image_of(&path, true, |reader, live, image, truth| {
                    let binary = reader.model.binary;
                    let function = |pc: u64| {
                        let location = binary.source_location(pc.wrapping_sub(reader.bias) - 1);
                        location.map(|location| location.function)
                    };
                    for goroutine in &live.goroutines {
                        let goid = goroutine.header.goid;
                        let site = truth["sites"]
                            .as_array()
                            .unwrap()
                            .iter()
                            .find(|s| s["goid"] == goid && s["pending"].as_u64() > Some(0))
                            .unwrap_or_else(|| panic!("{what}: goroutine {goid} not in truth"));
                        let expected = site["function"].as_str().unwrap();
                        let stack = goroutine.stack.as_ref().expect("stacks were asked for");
                        let GoroutineStack::Walked { frames, end } = stack else {
                            panic!("{what}: goroutine {goid}: {stack:?}")
                        };
                        assert_eq!(*end, StackEnd::Complete, "{what}: goroutine {goid}");
                        let outermost = function(frames.last().unwrap().pc);
                        assert_eq!(outermost.as_deref(), Some("runtime.goexit"), "{what}");
                        for record in &goroutine.records {
                            let owner = stack.from_frame(record.record.sp).unwrap_or_else(|| {
                                panic!("{what}: goroutine {goid}: no frame at sp {record:?}")
                            });
                            let owner = function(owner[0].pc).unwrap();
                            assert!(
                                expected == owner || expected.starts_with(&format!("{owner}-")),
                                "{what}: goroutine {goid}: {owner} holds a record of {expected}"
                            );
                        }
                    }
                    let mut replayed = take(reader, &image);
                    replayed.started_ns = live.started_ns;
                    replayed.ended_ns = live.ended_ns;
                    assert_eq!(replayed, live, "{what}: the image decodes differently");
                });
            }
        }
    }

    /// A goroutine that changes under every read is dropped as torn.
    #[test]
    fn a_chain_changing_under_every_read_is_torn() {
        struct Shifting<'m> {
            image: &'m MemoryImage,
            goid_at: u64,
            reads: std::cell::Cell<u64>,
        }
        impl Memory for Shifting<'_> {
            fn read(&self, addr: u64, buf: &mut [u8]) -> bool {
                if !self.image.read(addr, buf) {
                    return false;
                }
                // Every read of the g shows another goroutine id.
                let range = addr..addr + buf.len() as u64;
                if range.contains(&self.goid_at) {
                    self.reads.set(self.reads.get() + 1);
                    let at = (self.goid_at - addr) as usize;
                    buf[at..at + 8].copy_from_slice(&(1000 + self.reads.get()).to_le_bytes());
                }
                true
            }
        }
        let toolchain = testbin::toolchains().remove(0);
        let path = testbin::build(&toolchain, Program::Pending, Variant::Plain);
        with_captured_image(&path, |reader, live, image, _| {
            let victim = live.goroutines[0].header.g;
            let shifting = Shifting {
                image: &image,
                goid_at: victim + reader.model.layout.g_goid,
                reads: Default::default(),
            };
            let snapshot = take(reader, &shifting);
            assert_eq!(snapshot.torn, 1);
            assert_eq!(snapshot.goroutines.len(), live.goroutines.len() - 1);
        });
    }
}
