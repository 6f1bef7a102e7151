//! The aggregator: pure state built from probe events, no I/O. Events in ([`Event::decode`],
//! [`Aggregator::apply`]), the runtime's own view of goroutines in ([`Aggregator::reconcile`]);
//! pending heap defers per goroutine, the maps their closures captured, and per-site totals out.
//!
//! Model: a heap defer registration adds a pending record to its goroutine, keyed by the frame
//! (caller SP) and site (caller PC). `deferreturn` runs the records of the frame whose SP it is
//! called with; a goroutine's exit ends all its records. Panics, recover and runtime.Goexit run
//! records without `deferreturn`, and stack growth moves frames: reconciling with the
//! goroutine's `g._defer` chain (the runtime's truth) corrects all of these. An unrecovered panic
//! (`runtime.fatalpanic`) ran all of its goroutine's records: they go at once, as the process
//! dies before any reconciliation could see it. Goroutines are keyed
//! by goid, which, unlike the g struct, is never reused.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use deferprobe_common::{
    AllocSampled, DeferRegistered, DeferReturn, EventHeader, EventKind, GoroutineExit,
    GoroutinePanicked, MapSeen,
};

use crate::state::{
    Captures, DeferRecord, GoroutineDefers, GoroutineHeader, PendingGoroutine, PendingRecord,
    Snapshot,
};

/// One decoded ring-buffer event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    DeferRegistered(DeferRegistered),
    DeferReturn(DeferReturn),
    GoroutineExit(GoroutineExit),
    MapSeen(MapSeen),
    AllocSampled(AllocSampled),
    GoroutinePanicked(GoroutinePanicked),
}

/// Why a ring-buffer record could not be decoded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("event of {0} bytes is shorter than its header")]
    Short(usize),
    #[error("unknown event kind {0}")]
    UnknownKind(u32),
    #[error("{kind:?} event of {len} bytes, expected {expected}")]
    WrongSize { kind: EventKind, len: usize, expected: usize },
}

/// Reads a `#[repr(C)]` plain-old-data value from the exact-size prefix of `bytes`.
fn read_pod<T: Copy>(kind: EventKind, bytes: &[u8]) -> Result<T, DecodeError> {
    let expected = size_of::<T>();
    if bytes.len() < expected {
        return Err(DecodeError::WrongSize { kind, len: bytes.len(), expected });
    }
    // SAFETY: T is a repr(C) struct of integers (any bit pattern is valid) and `bytes` holds at
    // least size_of::<T>() bytes; read_unaligned has no alignment requirement.
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

impl Event {
    /// Decodes one ring-buffer record. Never panics, whatever the bytes.
    pub fn decode(bytes: &[u8]) -> Result<Event, DecodeError> {
        if bytes.len() < size_of::<EventHeader>() {
            return Err(DecodeError::Short(bytes.len()));
        }
        let raw_kind = u32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        let kind = EventKind::from_u32(raw_kind).ok_or(DecodeError::UnknownKind(raw_kind))?;
        Ok(match kind {
            EventKind::DeferRegistered => Event::DeferRegistered(read_pod(kind, bytes)?),
            EventKind::DeferReturn => Event::DeferReturn(read_pod(kind, bytes)?),
            EventKind::GoroutineExit => Event::GoroutineExit(read_pod(kind, bytes)?),
            EventKind::MapSeen => Event::MapSeen(read_pod(kind, bytes)?),
            EventKind::AllocSampled => Event::AllocSampled(read_pod(kind, bytes)?),
            EventKind::GoroutinePanicked => Event::GoroutinePanicked(read_pod(kind, bytes)?),
        })
    }

    pub fn header(&self) -> &EventHeader {
        match self {
            Event::DeferRegistered(e) => &e.header,
            Event::DeferReturn(e) => &e.header,
            Event::GoroutineExit(e) => &e.header,
            Event::MapSeen(e) => &e.header,
            Event::AllocSampled(e) => &e.header,
            Event::GoroutinePanicked(e) => &e.header,
        }
    }
}

/// A heap defer record not yet run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PendingDefer {
    pub closure: u64,
    pub caller_pc: u64,
    pub caller_sp: u64,
    /// The goroutine's `g.stack.hi` when `caller_sp` was (0 if unknown): see [`Frame`].
    pub stack_hi: u64,
    pub registered_ns: u64,
    /// Found in the runtime's `_defer` chain rather than seen registered: already pending when
    /// tracing started (or its event was lost). `registered_ns` is then when it was found.
    pub adopted: bool,
    /// Absent from the goroutine's chain at the last reconciliation. A record is released
    /// only when two reconciliations in a row miss it: the runtime links a record some time
    /// after the probe fires (deferproc may allocate, and so wait for the GC, in between).
    pub missed: bool,
}

/// A frame as the probes report it: its SP, and the goroutine's `g.stack.hi` at that moment.
/// Stack growth copies a goroutine's stack, moving every frame, but keeps each frame's distance
/// from the top, so two sightings are the same frame when their SPs are equal or, with both
/// tops known, their distances from the top are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame {
    pub sp: u64,
    pub stack_hi: u64,
}

impl Frame {
    pub fn same_as(self, other: Frame) -> bool {
        self.sp == other.sp
            || (self.stack_hi != 0
                && other.stack_hi != 0
                && self.stack_hi.wrapping_sub(self.sp) == other.stack_hi.wrapping_sub(other.sp))
    }
}

impl PendingDefer {
    pub fn frame(&self) -> Frame {
        Frame { sp: self.caller_sp, stack_hi: self.stack_hi }
    }
}

/// A map seen by a mapassign probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapInfo {
    pub map_type: u64,
    pub first_goid: u64,
    /// Return address into the function that first wrote it while traced.
    pub first_pc: u64,
}

/// How many maps the aggregator remembers: twice the kernel's known-maps set.
const MAP_TABLE_CAPACITY: usize = 2 * deferprobe_common::KNOWN_MAPS_CAPACITY as usize;

/// Registered and released heap defers of one defer site (the PC after the deferproc call).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SiteTotals {
    pub registered: u64,
    /// Records found pending in the runtime's chains without a registration event (already
    /// pending when tracing started).
    pub adopted: u64,
    pub released: u64,
}

impl SiteTotals {
    pub fn pending(&self) -> u64 {
        self.registered + self.adopted - self.released
    }
}

/// Events seen, by kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventTotals {
    pub defer_registered: u64,
    pub defer_return: u64,
    pub goroutine_exit: u64,
    pub map_seen: u64,
    /// Registrations and returns whose goroutine id could not be read (not tracked).
    pub without_goid: u64,
    pub undecodable: u64,
}

/// A goroutine whose panic nothing recovered (`runtime.fatalpanic`): the runtime ran all its
/// deferred calls during the panic, and the process dies of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Panicked {
    /// None when the probe could not read the goroutine's id.
    pub goid: Option<u64>,
    /// Its heap defer records deferprobe held as pending, which ran during the panic (None with
    /// the goroutine unknown).
    pub records_ran: Option<u64>,
}

/// What one reconciliation changed: the differences between our state and the runtime's.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reconciled {
    /// Pending records the runtime no longer has (run by a panic, recover, Goexit, ...).
    pub released: u64,
    /// Records whose frame moved (stack growth copies the stack and adjusts `_defer.sp`).
    pub moved: u64,
    /// Records found pending without a registration (see [`Aggregator::adopt`]).
    pub adopted: u64,
}

impl std::ops::AddAssign for Reconciled {
    fn add_assign(&mut self, other: Reconciled) {
        self.released += other.released;
        self.moved += other.moved;
        self.adopted += other.adopted;
    }
}

/// A goroutine that registered heap defers while traced; dropped when it exits (or its g is
/// found running another goroutine).
#[derive(Debug)]
struct GoroutineState {
    /// The goroutine's g struct, from its latest registration.
    g: u64,
    /// Oldest first.
    pending: Vec<PendingDefer>,
    /// Records released by a `deferreturn` whose chain records the runtime may not have run
    /// and unlinked yet: the probe fires as the frame calls `deferreturn`, which then runs
    /// them one by one. A chain read meanwhile still shows them; they are not adopted (they
    /// would be released twice). Kept until a chain read no longer shows them, at most
    /// [`MAX_RETURNING`].
    returning: Vec<PendingDefer>,
    /// This goroutine's totals per defer site.
    sites: GoroutineSites,
}

/// The most records a goroutine keeps in [`GoroutineState::returning`] (the oldest go first):
/// without chain reads (`--counts-only`) nothing would clear them.
const MAX_RETURNING: usize = 256;

impl Default for GoroutineState {
    /// Most goroutines hold one record at one site: start small (vectors otherwise reserve
    /// four elements on the first push).
    fn default() -> Self {
        GoroutineState {
            g: 0,
            pending: Vec::with_capacity(1),
            returning: Vec::new(),
            sites: GoroutineSites(Vec::with_capacity(1)),
        }
    }
}

/// One goroutine's totals per defer site. A goroutine touches few defer sites, so a short
/// vector: a hash map per goroutine would cost far more memory with many goroutines.
#[derive(Debug, Default)]
struct GoroutineSites(Vec<(u64, SiteTotals)>);

impl GoroutineSites {
    fn entry(&mut self, pc: u64) -> &mut SiteTotals {
        let index = match self.0.iter().position(|(site, _)| *site == pc) {
            Some(index) => index,
            None => {
                self.0.push((pc, SiteTotals::default()));
                self.0.len() - 1
            }
        };
        &mut self.0[index].1
    }
}

/// Pairs pending records with the records of a `_defer` chain: first by closure and SP (the
/// same record, where it was), then by closure alone (its frame moved with the stack). Shared
/// closures (those capturing nothing are one static object) make the closure alone ambiguous;
/// matching exact pairs first keeps records of unmoved frames where they are. Returns, for each
/// pending record, its chain record, and for each chain record whether it was paired.
fn pair_with_chain(
    pending: &[PendingDefer],
    chain: &[DeferRecord],
) -> (Vec<Option<usize>>, Vec<bool>) {
    let mut by_frame: HashMap<(u64, u64), Vec<usize>> = HashMap::new();
    for (index, record) in chain.iter().enumerate().rev() {
        by_frame.entry((record.closure, record.sp)).or_default().push(index);
    }
    // Records seen registered (with their captures) pair before adopted ones, so that if both
    // stand for one chain record, the adopted one is the duplicate left over.
    let mut order: Vec<usize> = (0..pending.len()).collect();
    order.sort_by_key(|&index| pending[index].adopted);
    let mut pairs: Vec<Option<usize>> = vec![None; pending.len()];
    for &index in &order {
        let record = &pending[index];
        pairs[index] = by_frame.get_mut(&(record.closure, record.caller_sp)).and_then(Vec::pop);
    }
    let mut by_closure: HashMap<u64, Vec<usize>> = HashMap::new();
    for indexes in by_frame.into_values() {
        for index in indexes {
            by_closure.entry(chain[index].closure).or_default().push(index);
        }
    }
    for indexes in by_closure.values_mut() {
        // Pop the oldest (highest index: the chain is newest first) first.
        indexes.sort_unstable();
    }
    for &index in &order {
        if pairs[index].is_none() {
            pairs[index] = by_closure.get_mut(&pending[index].closure).and_then(Vec::pop);
        }
    }
    let mut paired = vec![false; chain.len()];
    for index in pairs.iter().flatten() {
        paired[*index] = true;
    }
    (pairs, paired)
}

#[derive(Debug, Default)]
pub struct Aggregator {
    goroutines: HashMap<u64, GoroutineState>,
    sites: HashMap<u64, SiteTotals>,
    /// Maps seen by mapassign, bounded: the oldest uncaptured ones are forgotten first.
    maps: HashMap<u64, MapInfo>,
    /// `maps`' keys, oldest first.
    map_order: VecDeque<u64>,
    /// `--alloc-mode profiled`: samples per allocation size (a few size classes and large
    /// sizes), to unsample once the profiling rate is known.
    sampled_allocations: BTreeMap<u64, u64>,
    events: EventTotals,
    /// Releases seen since the last [`Aggregator::mark`] (None before the first): what a
    /// snapshot taken then no longer shows once the target is gone.
    releases: Option<Releases>,
    /// Goroutines seen dying of an unrecovered panic, in order.
    panicked: Vec<Panicked>,
}

/// Frames that returned through `deferreturn`, by goroutine id, and goroutines that exited.
#[derive(Debug, Default)]
struct Releases {
    frames: HashMap<u64, Vec<Frame>>,
    goroutines: HashSet<u64>,
}

impl Aggregator {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn apply(&mut self, event: &Event) {
        let goid = event.header().goid;
        match event {
            Event::DeferRegistered(e) => {
                self.events.defer_registered += 1;
                let site = self.sites.entry(e.caller_pc).or_default();
                site.registered += 1;
                if goid == 0 {
                    // Counted in the site, but without a goroutine it can't be tracked.
                    site.released += 1;
                    self.events.without_goid += 1;
                    return;
                }
                let goroutine = self.goroutines.entry(goid).or_default();
                goroutine.g = e.g;
                let record = PendingDefer {
                    closure: e.closure,
                    caller_pc: e.caller_pc,
                    caller_sp: e.caller_sp,
                    stack_hi: e.stack_hi,
                    registered_ns: e.header.ktime_ns,
                    adopted: false,
                    missed: false,
                };
                // A record adopted from a chain read after this registration is this record.
                let is_twin = |pending: &PendingDefer, same_frame: bool| {
                    pending.adopted
                        && pending.closure == e.closure
                        && pending.registered_ns > e.header.ktime_ns
                        && (!same_frame || pending.caller_sp == e.caller_sp)
                };
                let adopted_twin = (goroutine.pending.iter().position(|p| is_twin(p, true)))
                    .or_else(|| goroutine.pending.iter().position(|p| is_twin(p, false)));
                match adopted_twin {
                    Some(index) => {
                        goroutine.pending[index] = record;
                        goroutine.sites.entry(e.caller_pc).adopted -= 1;
                        self.sites.entry(e.caller_pc).or_default().adopted -= 1;
                    }
                    None => goroutine.pending.push(record),
                }
                goroutine.sites.entry(e.caller_pc).registered += 1;
            }
            Event::DeferReturn(e) => {
                self.events.defer_return += 1;
                if goid == 0 {
                    self.events.without_goid += 1;
                    return;
                }
                let frame = Frame { sp: e.caller_sp, stack_hi: e.stack_hi };
                self.release_returning(goid, frame);
                if let Some(releases) = &mut self.releases {
                    releases.frames.entry(goid).or_default().push(frame);
                }
            }
            Event::GoroutineExit(_) => {
                self.events.goroutine_exit += 1;
                if goid == 0 {
                    // Its records stay pending until reconciliation finds the chain empty.
                    self.events.without_goid += 1;
                    return;
                }
                self.release(goid, |_| true);
                self.goroutines.remove(&goid);
                if let Some(releases) = &mut self.releases {
                    releases.goroutines.insert(goid);
                }
            }
            Event::MapSeen(e) => {
                self.events.map_seen += 1;
                if self.maps.contains_key(&e.map) {
                    return; // seen again after the kernel's set evicted it: same map
                }
                self.maps.insert(
                    e.map,
                    MapInfo { map_type: e.map_type, first_goid: goid, first_pc: e.caller_pc },
                );
                self.map_order.push_back(e.map);
                self.forget_old_maps();
            }
            Event::AllocSampled(e) => *self.sampled_allocations.entry(e.size).or_default() += 1,
            Event::GoroutinePanicked(_) => {
                if goid == 0 {
                    self.events.without_goid += 1;
                    self.panicked.push(Panicked { goid: None, records_ran: None });
                    return;
                }
                // Every deferred call ran during the panic (the chain is empty by now), and
                // the process dies before its chain can be read again.
                let ran = self.release(goid, |_| true);
                self.goroutines.remove(&goid);
                if let Some(releases) = &mut self.releases {
                    releases.goroutines.insert(goid);
                }
                self.panicked.push(Panicked { goid: Some(goid), records_ran: Some(ran) });
            }
        }
    }

    /// Goroutines seen dying of an unrecovered panic (the program dies with the first).
    pub fn panicked(&self) -> &[Panicked] {
        &self.panicked
    }

    /// Allocations the runtime sampled for its memory profile, as samples per size.
    pub fn sampled_allocations(&self) -> &BTreeMap<u64, u64> {
        &self.sampled_allocations
    }

    /// Keeps the map table within [`MAP_TABLE_CAPACITY`], forgetting the oldest maps first.
    fn forget_old_maps(&mut self) {
        while self.maps.len() > MAP_TABLE_CAPACITY {
            let Some(map) = self.map_order.pop_front() else { break };
            self.maps.remove(&map);
        }
    }

    /// A snapshot of the runtime's state was just taken, after every event drained so far:
    /// releases are logged from here on, for [`Aggregator::at_exit`].
    pub fn mark(&mut self) {
        self.releases = Some(Releases::default());
    }

    /// `snapshot`, the last one taken (and [`Aggregator::mark`]ed) before the target exited,
    /// brought up to the exit with the events seen since: records whose frame returned or
    /// whose goroutine exited are dropped, and records registered since `registered_since_ns`
    /// that are still pending and not in the snapshot are added, their captures unknown (the
    /// target was gone before their closures could be read).
    pub fn at_exit(&self, snapshot: &Snapshot, registered_since_ns: u64) -> Snapshot {
        let mut snapshot = snapshot.clone();
        if let Some(releases) = &self.releases {
            for goroutine in &mut snapshot.goroutines {
                let goid = goroutine.header.goid;
                if releases.goroutines.contains(&goid) {
                    goroutine.records.clear();
                }
                let returned = releases.frames.get(&goid).map_or(&[][..], Vec::as_slice);
                let stack_hi = goroutine.header.stack_hi;
                goroutine.records.retain(|r| {
                    let frame = Frame { sp: r.record.sp, stack_hi };
                    !returned.iter().any(|f| f.same_as(frame))
                });
            }
        }
        let seen: HashSet<(u64, u64)> = snapshot
            .goroutines
            .iter()
            .flat_map(|g| g.records.iter().map(move |r| (g.header.goid, r.record.closure)))
            .collect();
        for (goid, state) in &self.goroutines {
            let added: Vec<PendingRecord> = state
                .pending
                .iter()
                .filter(|r| !r.adopted && r.registered_ns >= registered_since_ns)
                .filter(|r| !seen.contains(&(*goid, r.closure)))
                .map(|r| PendingRecord {
                    record: DeferRecord {
                        address: 0,
                        closure: r.closure,
                        sp: r.caller_sp,
                        pc: r.caller_pc,
                        heap: true,
                        in_range_loop: false,
                    },
                    site: r.caller_pc,
                    code: None,
                    closure_bytes: 0,
                    captures: Captures::Unknown(
                        "registered after the last snapshot, and the target exited before its \
                         closure could be read",
                    ),
                })
                .collect();
            if added.is_empty() {
                continue;
            }
            match snapshot.goroutines.iter_mut().find(|g| g.header.goid == *goid) {
                Some(goroutine) => goroutine.records.extend(added),
                None => snapshot.goroutines.push(PendingGoroutine {
                    header: GoroutineHeader { g: state.g, goid: *goid, ..Default::default() },
                    records: added,
                    stack: None,
                }),
            }
        }
        snapshot.goroutines.retain(|g| !g.records.is_empty());
        snapshot
    }

    /// Counts a ring-buffer record that [`Event::decode`] rejected.
    pub fn record_undecodable(&mut self) {
        self.events.undecodable += 1;
    }

    /// Releases the pending records of `goid` that `runs` selects; returns how many.
    /// Releases `goid`'s records of `frame`, which called `deferreturn`, and keeps them as
    /// [`GoroutineState::returning`] until the runtime has run them.
    fn release_returning(&mut self, goid: u64, frame: Frame) {
        let Some(goroutine) = self.goroutines.get_mut(&goid) else { return };
        let returned: Vec<PendingDefer> =
            goroutine.pending.iter().filter(|r| r.frame().same_as(frame)).copied().collect();
        if returned.is_empty() {
            return;
        }
        goroutine.returning.extend(returned);
        let excess = goroutine.returning.len().saturating_sub(MAX_RETURNING);
        goroutine.returning.drain(..excess);
        self.release(goid, |record| record.frame().same_as(frame));
    }

    fn release(&mut self, goid: u64, mut runs: impl FnMut(&PendingDefer) -> bool) -> u64 {
        let Some(goroutine) = self.goroutines.get_mut(&goid) else { return 0 };
        let before = goroutine.pending.len();
        let GoroutineState { pending, sites, .. } = goroutine;
        pending.retain(|record| {
            if runs(record) {
                self.sites.entry(record.caller_pc).or_default().released += 1;
                sites.entry(record.caller_pc).released += 1;
                false
            } else {
                true
            }
        });
        (before - pending.len()) as u64
    }

    /// Goroutines with pending records and their g, for reading their `_defer` chains.
    pub fn goroutines_to_reconcile(&self) -> Vec<(u64, u64)> {
        self.goroutines
            .iter()
            .filter(|(_, state)| !state.pending.is_empty())
            .map(|(goid, state)| (*goid, state.g))
            .collect()
    }

    /// Makes `goid`'s pending records agree with the runtime's view of its g, read after
    /// every event up to now was applied. The runtime wins:
    /// - the g now runs another goroutine (or none): all records of `goid` are gone;
    /// - a pending record no longer in the chain was run (panic, recover, Goexit) once two
    ///   reconciliations in a row miss it, not counting those before `settled_ns`: the probe
    ///   fires a while before the runtime links the record into the chain;
    /// - a record found in the chain takes the chain's SP (its frame moved with the stack).
    ///
    /// Chain records we never saw registered (older than the trace) are not ours and ignored.
    pub fn reconcile(
        &mut self,
        goid: u64,
        runtime: &GoroutineDefers,
        settled_ns: u64,
    ) -> Reconciled {
        if runtime.header.goid != goid {
            let released = self.release(goid, |_| true);
            self.goroutines.remove(&goid);
            return Reconciled { released, ..Reconciled::default() };
        }
        let mut moved = 0;
        let mut gone = Vec::new();
        if let Some(goroutine) = self.goroutines.get_mut(&goid) {
            gone.resize(goroutine.pending.len(), false);
            let (pairs, _) = pair_with_chain(&goroutine.pending, &runtime.records);
            for ((record, pair), gone) in goroutine.pending.iter_mut().zip(pairs).zip(&mut gone) {
                match pair {
                    Some(chain_index) => {
                        record.missed = false;
                        let sp = runtime.records[chain_index].sp;
                        record.stack_hi = runtime.header.stack_hi;
                        if sp != record.caller_sp {
                            record.caller_sp = sp;
                            moved += 1;
                        }
                    }
                    None if record.registered_ns <= settled_ns => {
                        *gone = record.missed;
                        record.missed = true;
                    }
                    None => {}
                }
            }
        }
        let mut index = 0;
        let released = self.release(goid, |_| {
            index += 1;
            gone[index - 1]
        });
        Reconciled { released, moved, adopted: 0 }
    }

    /// Adopts the heap records of a goroutine's `_defer` chain, read at `found_ns`, that no
    /// registration accounts for: records already pending when tracing started, or whose events
    /// were lost. Call it right after reading the chain, before applying more events. A record
    /// whose registration event was still in flight is adopted too; when that event arrives it
    /// takes the adopted record's place (see [`Aggregator::apply`]). Returns how many records
    /// were adopted.
    pub fn adopt(&mut self, runtime: &GoroutineDefers, found_ns: u64) -> u64 {
        let (g, goid) = (runtime.header.g, runtime.header.goid);
        if goid == 0 {
            return 0;
        }
        if runtime.records.iter().all(|record| !record.heap) {
            if let Some(goroutine) = self.goroutines.get_mut(&goid) {
                goroutine.returning.clear();
            }
            return 0;
        }
        let goroutine = self.goroutines.entry(goid).or_default();
        // Records released by a deferreturn still running them are known too: only what
        // neither accounts for is adopted. Those the chain no longer shows are done.
        let pending = goroutine.pending.len();
        let known: Vec<PendingDefer> =
            goroutine.pending.iter().chain(&goroutine.returning).copied().collect();
        let (pairs, paired) = pair_with_chain(&known, &runtime.records);
        let still_running: Vec<PendingDefer> = (goroutine.returning.iter().zip(&pairs[pending..]))
            .filter(|(_, pair)| pair.is_some())
            .map(|(record, _)| *record)
            .collect();
        goroutine.returning = still_running;
        // Oldest first, as `pending` is kept. A record with pc 0 is not one: deferproc links a
        // record before filling it in, and a record that ran is zeroed (`*d = _defer{}`) as it
        // goes back to the pool, so a chain read racing a registration or a panic running the
        // records can meet one. The next read settles it.
        let found: Vec<PendingDefer> = runtime
            .records
            .iter()
            .zip(paired)
            .rev()
            .filter(|(record, paired)| record.heap && !paired && record.pc != 0)
            .map(|(record, _)| PendingDefer {
                closure: record.closure,
                caller_pc: record.pc,
                caller_sp: record.sp,
                stack_hi: runtime.header.stack_hi,
                registered_ns: found_ns,
                adopted: true,
                missed: false,
            })
            .collect();
        if goroutine.g == 0 {
            goroutine.g = g;
        }
        for record in &found {
            goroutine.sites.entry(record.caller_pc).adopted += 1;
            self.sites.entry(record.caller_pc).or_default().adopted += 1;
        }
        let adopted = found.len() as u64;
        // Adopted records predate every record seen registered.
        let mut found = found;
        found.append(&mut goroutine.pending);
        goroutine.pending = found;
        if goroutine.pending.is_empty() && goroutine.returning.is_empty() {
            self.goroutines.remove(&goid);
        }
        adopted
    }

    pub fn events(&self) -> EventTotals {
        self.events
    }

    /// Whether some goroutine has heap defers pending (registered and not yet run, or pending
    /// when tracing started).
    pub fn has_pending(&self) -> bool {
        self.goroutines.values().any(|g| !g.pending.is_empty())
    }

    /// Heap defers registered and not yet run, over all goroutines.
    pub fn pending_heap_defers(&self) -> u64 {
        self.goroutines.values().map(|g| g.pending.len() as u64).sum()
    }

    /// Goroutines with at least one pending heap defer, and their records (oldest first).
    pub fn pending_by_goroutine(&self) -> impl Iterator<Item = (u64, &[PendingDefer])> {
        self.goroutines
            .iter()
            .filter(|(_, g)| !g.pending.is_empty())
            .map(|(goid, g)| (*goid, g.pending.as_slice()))
    }

    /// `goid`'s totals per defer site (caller PC).
    pub fn goroutine_sites(&self, goid: u64) -> impl Iterator<Item = (u64, SiteTotals)> + '_ {
        self.goroutines.get(&goid).into_iter().flat_map(|g| g.sites.0.iter().copied())
    }

    /// Per-site totals, keyed by caller PC.
    pub fn sites(&self) -> impl Iterator<Item = (u64, SiteTotals)> + '_ {
        self.sites.iter().map(|(pc, totals)| (*pc, *totals))
    }

    /// Maps seen by mapassign while tracing.
    pub fn map(&self, map: u64) -> Option<&MapInfo> {
        self.maps.get(&map)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(kind: EventKind, goid: u64, ktime_ns: u64) -> EventHeader {
        EventHeader { kind: kind as u32, cpu: 0, ktime_ns, goid }
    }

    fn registered(goid: u64, pc: u64, sp: u64) -> Event {
        Event::DeferRegistered(DeferRegistered {
            header: header(EventKind::DeferRegistered, goid, 0),
            closure: 0xc000_0000 + pc,
            caller_pc: pc,
            caller_sp: sp,
            g: 0xc000_1000 + goid,
            ..Default::default()
        })
    }

    fn returned(goid: u64, sp: u64) -> Event {
        Event::DeferReturn(DeferReturn {
            header: header(EventKind::DeferReturn, goid, 0),
            caller_pc: 0,
            caller_sp: sp,
            stack_hi: 0,
        })
    }

    /// A heap defer registered by the frame at `sp` on a stack whose top is `stack_hi`; and
    /// that frame returning.
    fn registered_on_stack(goid: u64, sp: u64, stack_hi: u64) -> Event {
        Event::DeferRegistered(DeferRegistered {
            header: header(EventKind::DeferRegistered, goid, 0),
            closure: 0xc000_0000 + sp,
            caller_pc: 0x401000,
            caller_sp: sp,
            g: 0xc000_1000,
            stack_hi,
        })
    }

    fn returned_on_stack(goid: u64, sp: u64, stack_hi: u64) -> Event {
        Event::DeferReturn(DeferReturn {
            header: header(EventKind::DeferReturn, goid, 0),
            caller_pc: 0,
            caller_sp: sp,
            stack_hi,
        })
    }

    /// Stack growth moves every frame (new SPs) but keeps each one's distance from the top:
    /// a deferreturn after the move releases exactly its own frame's records.
    #[test]
    fn frames_are_known_across_stack_moves() {
        let mut agg = Aggregator::new();
        // Two frames on a stack topped at 0xc000_a000: 0x100 and 0x300 below the top.
        agg.apply(&registered_on_stack(5, 0xc000_9f00, 0xc000_a000));
        agg.apply(&registered_on_stack(5, 0xc000_9d00, 0xc000_a000));
        // The stack moved to one topped at 0xc010_0000: the inner frame returns there.
        agg.apply(&returned_on_stack(5, 0xc00f_fd00, 0xc010_0000));
        let (_, records) = agg.pending_by_goroutine().next().unwrap();
        assert_eq!(records.iter().map(|r| r.caller_sp).collect::<Vec<_>>(), [0xc000_9f00]);
        // A frame at another distance releases nothing; the outer one then does.
        agg.apply(&returned_on_stack(5, 0xc00f_fe00, 0xc010_0000));
        assert_eq!(agg.pending_heap_defers(), 1);
        agg.apply(&returned_on_stack(5, 0xc00f_ff00, 0xc010_0000));
        assert_eq!(agg.pending_heap_defers(), 0);
        // Without the top, the raw SP alone must match, as before.
        agg.apply(&registered_on_stack(5, 0xc000_9f00, 0));
        agg.apply(&returned_on_stack(5, 0xc00f_ff00, 0xc010_0000));
        assert_eq!(agg.pending_heap_defers(), 1);
    }

    fn exited(goid: u64) -> Event {
        Event::GoroutineExit(GoroutineExit { header: header(EventKind::GoroutineExit, goid, 0) })
    }

    fn bytes_of<T: Copy>(value: &T) -> Vec<u8> {
        // SAFETY: test-only view of a repr(C) POD value.
        unsafe { std::slice::from_raw_parts((value as *const T).cast::<u8>(), size_of::<T>()) }
            .to_vec()
    }

    #[test]
    fn decodes_every_kind_and_rejects_garbage() {
        let seen = Event::MapSeen(MapSeen {
            header: header(EventKind::MapSeen, 7, 0),
            map: 0xc000_2000,
            map_type: 0x4a0000,
            caller_pc: 0x401234,
        });
        let sampled = Event::AllocSampled(AllocSampled {
            header: header(EventKind::AllocSampled, 0, 0),
            size: 48,
        });
        let panicked = Event::GoroutinePanicked(GoroutinePanicked {
            header: header(EventKind::GoroutinePanicked, 7, 0),
        });
        for event in [
            registered(7, 0x401000, 0xc000100),
            returned(7, 0xc000100),
            exited(7),
            seen,
            sampled,
            panicked,
        ] {
            let bytes = match &event {
                Event::DeferRegistered(e) => bytes_of(e),
                Event::DeferReturn(e) => bytes_of(e),
                Event::GoroutineExit(e) => bytes_of(e),
                Event::MapSeen(e) => bytes_of(e),
                Event::AllocSampled(e) => bytes_of(e),
                Event::GoroutinePanicked(e) => bytes_of(e),
            };
            assert_eq!(Event::decode(&bytes), Ok(event));
            assert!(Event::decode(&bytes[..bytes.len() - 1]).is_err());
        }
        assert_eq!(Event::decode(&[1, 0, 0]), Err(DecodeError::Short(3)));
        assert_eq!(Event::decode(&[9; 24]), Err(DecodeError::UnknownKind(0x0909_0909)));
        // A DeferRegistered header with no payload.
        let header_only = bytes_of(registered(1, 2, 3).header());
        assert!(matches!(Event::decode(&header_only), Err(DecodeError::WrongSize { .. })));
    }

    #[test]
    fn loop_defers_pile_up_until_the_frame_returns() {
        let mut agg = Aggregator::new();
        for _ in 0..300 {
            agg.apply(&registered(5, 0x401000, 0xc000_8000));
        }
        assert_eq!(agg.pending_heap_defers(), 300);
        // Another frame's return releases nothing of this one.
        agg.apply(&returned(5, 0xc000_7000));
        assert_eq!(agg.pending_heap_defers(), 300);
        agg.apply(&returned(5, 0xc000_8000));
        assert_eq!(agg.pending_heap_defers(), 0);
        let sites: Vec<_> = agg.sites().collect();
        assert_eq!(sites, [(0x401000, SiteTotals { registered: 300, adopted: 0, released: 300 })]);
    }

    #[test]
    fn per_request_handlers_release_everything() {
        let mut agg = Aggregator::new();
        for request in 0..1000u64 {
            let goid = 100 + request % 7;
            for _ in 0..3 {
                agg.apply(&registered(goid, 0x402000, 0xc001_0000));
            }
            agg.apply(&returned(goid, 0xc001_0000));
        }
        assert_eq!(agg.pending_heap_defers(), 0);
        assert_eq!(agg.pending_by_goroutine().count(), 0);
        let totals = agg.sites().next().unwrap().1;
        assert_eq!((totals.registered, totals.released, totals.pending()), (3000, 3000, 0));
    }

    #[test]
    fn nested_frames_and_goroutine_exit() {
        let mut agg = Aggregator::new();
        agg.apply(&registered(9, 0x401000, 0xc000_9000)); // outer frame
        agg.apply(&registered(9, 0x402000, 0xc000_8000)); // inner frame
        agg.apply(&registered(10, 0x402000, 0xc000_8000)); // other goroutine, same sp
        agg.apply(&returned(9, 0xc000_8000));
        assert_eq!(agg.pending_heap_defers(), 2);
        agg.apply(&exited(9));
        assert_eq!(agg.pending_heap_defers(), 1);
        assert_eq!(
            agg.pending_by_goroutine().map(|(g, r)| (g, r.len())).collect::<Vec<_>>(),
            [(10, 1)]
        );
        assert_eq!(agg.events().goroutine_exit, 1);
    }

    #[test]
    fn interleaved_goroutines() {
        // Events of two goroutines interleaved (as records from two CPUs arrive).
        let mut agg = Aggregator::new();
        for i in 0..50 {
            agg.apply(&registered(1, 0x401000, 0xc000_1000));
            agg.apply(&registered(2, 0x401000, 0xc000_2000));
            if i % 10 == 9 {
                agg.apply(&returned(2, 0xc000_2000));
            }
        }
        assert_eq!(agg.pending_by_goroutine().find(|(g, _)| *g == 1).unwrap().1.len(), 50);
        assert!(agg.pending_by_goroutine().all(|(g, _)| g == 1));
    }

    #[test]
    fn unknown_goroutine_is_counted_not_tracked() {
        let mut agg = Aggregator::new();
        agg.apply(&registered(0, 0x401000, 0xc000_1000));
        agg.apply(&returned(0, 0xc000_1000));
        agg.record_undecodable();
        assert_eq!(agg.pending_heap_defers(), 0);
        assert_eq!(agg.events().without_goid, 2);
        assert_eq!(agg.events().undecodable, 1);
    }

    /// A snapshot of `(goid, [(closure, sp)])`, taken at `started_ns`.
    fn snapshot_of(goroutines: &[(u64, &[(u64, u64)])], started_ns: u64) -> Snapshot {
        let goroutines = goroutines
            .iter()
            .map(|&(goid, records)| PendingGoroutine {
                header: GoroutineHeader {
                    g: 0xc000_1000 + goid,
                    goid,
                    status: 4,
                    defers: 1,
                    ..Default::default()
                },
                stack: None,
                records: records
                    .iter()
                    .map(|&(closure, sp)| PendingRecord {
                        record: DeferRecord {
                            address: closure + 0x100,
                            closure,
                            sp,
                            pc: 0x401000,
                            heap: true,
                            in_range_loop: false,
                        },
                        site: 0x401000,
                        code: Some(0x402000),
                        closure_bytes: 16,
                        captures: Captures::Nothing,
                    })
                    .collect(),
            })
            .collect();
        Snapshot { started_ns, ended_ns: started_ns + 10, goroutines, ..Snapshot::default() }
    }

    #[test]
    fn the_last_snapshot_is_brought_up_to_the_exit() {
        let mut agg = Aggregator::new();
        // Goroutine 7 holds two frames, 8 one record, when the snapshot is taken.
        let snapshot =
            snapshot_of(&[(7, &[(0xa1, 0x100), (0xa2, 0x200)]), (8, &[(0xb1, 0x300)])], 1000);
        agg.mark();
        // Then 7's frame at 0x100 returns, 8 exits, and 9 registers a record that stays.
        agg.apply(&returned(7, 0x100));
        agg.apply(&exited(8));
        agg.apply(&registered_at(9, 0xc1, 0x400, 2000));
        // A record registered before the snapshot (and so in it, or released) is not added.
        agg.apply(&registered_at(9, 0xc2, 0x500, 500));
        let now = agg.at_exit(&snapshot, 990);
        let held: Vec<(u64, Vec<u64>)> = now
            .goroutines
            .iter()
            .map(|g| (g.header.goid, g.records.iter().map(|r| r.record.closure).collect()))
            .collect();
        assert_eq!(held, [(7, vec![0xa2]), (9, vec![0xc1])]);
        let added = &now.goroutines[1].records[0];
        assert_eq!(added.site, 0x401000);
        assert!(matches!(added.captures, Captures::Unknown(_)));
        // Without a mark (no snapshot was ever taken) nothing is dropped.
        let unmarked = Aggregator::new().at_exit(&snapshot, 990);
        assert_eq!(unmarked, snapshot);
    }

    fn panicked(goid: u64) -> Event {
        Event::GoroutinePanicked(GoroutinePanicked {
            header: header(EventKind::GoroutinePanicked, goid, 0),
        })
    }

    /// An unrecovered panic ran all of its goroutine's records (no deferreturn, no goexit1:
    /// the process dies): they leave the events' state and the last snapshot brought up to the
    /// exit; the other goroutines' records did not run and stay.
    #[test]
    fn an_unrecovered_panic_ran_its_goroutines_records() {
        let mut agg = Aggregator::new();
        agg.apply(&registered_at(7, 0xa1, 0x100, 10));
        agg.apply(&registered_at(7, 0xa2, 0x100, 11));
        agg.apply(&registered_at(8, 0xb1, 0x300, 12));
        let snapshot =
            snapshot_of(&[(7, &[(0xa1, 0x100), (0xa2, 0x100)]), (8, &[(0xb1, 0x300)])], 20);
        agg.mark();
        // Registered after the snapshot, run by the panic too.
        agg.apply(&registered_at(7, 0xa3, 0x100, 30));
        agg.apply(&panicked(7));
        assert_eq!(agg.panicked(), [Panicked { goid: Some(7), records_ran: Some(3) }]);
        assert_eq!(
            agg.pending_by_goroutine().map(|(g, r)| (g, r.len())).collect::<Vec<_>>(),
            [(8, 1)]
        );
        let site = agg.sites().next().unwrap().1;
        assert_eq!((site.registered, site.released, site.pending()), (4, 3, 1));
        let now = agg.at_exit(&snapshot, 15);
        let held: Vec<u64> = now.goroutines.iter().map(|g| g.header.goid).collect();
        assert_eq!(held, [8]);
        // A goroutine whose id could not be read: an unknown, not a zero.
        agg.apply(&panicked(0));
        assert_eq!(agg.panicked()[1], Panicked { goid: None, records_ran: None });
        assert_eq!(agg.pending_heap_defers(), 1);
    }

    fn registered_at(goid: u64, closure: u64, sp: u64, ktime_ns: u64) -> Event {
        Event::DeferRegistered(DeferRegistered {
            header: header(EventKind::DeferRegistered, goid, ktime_ns),
            closure,
            caller_pc: 0x401000,
            caller_sp: sp,
            g: 0xc000_1000,
            ..Default::default()
        })
    }

    /// Goroutine `goid`'s chain, read from the g at 0xc000_1000: `(closure, sp)` heap records
    /// of the site at 0x401000, newest first.
    fn chain(goid: u64, records: &[(u64, u64)]) -> GoroutineDefers {
        GoroutineDefers {
            header: GoroutineHeader { g: 0xc000_1000, goid, ..Default::default() },
            records: records
                .iter()
                .map(|&(closure, sp)| DeferRecord {
                    address: 0xc010_0000,
                    closure,
                    sp,
                    pc: 0x401000,
                    heap: true,
                    in_range_loop: false,
                })
                .collect(),
        }
    }

    /// `runtime` as read from the g at `g`.
    fn on_g(g: u64, runtime: &GoroutineDefers) -> GoroutineDefers {
        let mut runtime = runtime.clone();
        runtime.header.g = g;
        runtime
    }

    #[test]
    fn a_registration_makes_its_goroutine_tracked() {
        let mut agg = Aggregator::new();
        let event = DeferRegistered {
            header: header(EventKind::DeferRegistered, 3, 0),
            caller_pc: 0x401000,
            caller_sp: 0xc000_8000,
            g: 0xc000_1000,
            ..Default::default()
        };
        agg.apply(&Event::DeferRegistered(event));
        assert_eq!(agg.pending_heap_defers(), 1);
        assert_eq!(agg.goroutines_to_reconcile(), [(3, 0xc000_1000)]);
    }

    #[test]
    fn reconcile_releases_what_a_panic_ran() {
        let mut agg = Aggregator::new();
        for i in 0..5 {
            agg.apply(&registered_at(4, 0xc000_0100 + i * 16, 0xc000_8000, 100 + i));
        }
        // The runtime still has the two oldest; the three newest ran during a panic.
        let runtime = chain(4, &[(0xc000_0110, 0xc000_8000), (0xc000_0100, 0xc000_8000)]);
        // One miss could be a record not linked yet; the second look settles it.
        assert_eq!(agg.reconcile(4, &runtime, 1_000), Reconciled::default());
        assert_eq!(agg.pending_heap_defers(), 5);
        let outcome = agg.reconcile(4, &runtime, 2_000);
        assert_eq!(outcome, Reconciled { released: 3, moved: 0, adopted: 0 });
        assert_eq!(agg.pending_heap_defers(), 2);
        let totals = agg.sites().next().unwrap().1;
        assert_eq!((totals.registered, totals.released), (5, 3));
    }

    #[test]
    fn reconcile_leaves_records_the_runtime_has_not_linked_yet() {
        let mut agg = Aggregator::new();
        agg.apply(&registered_at(4, 0xc000_0100, 0xc000_8000, 100));
        agg.apply(&registered_at(4, 0xc000_0110, 0xc000_8000, 5_000));
        // Chains read at 2_000: the record registered at 5_000 can't be judged yet.
        agg.reconcile(4, &chain(4, &[]), 2_000);
        let outcome = agg.reconcile(4, &chain(4, &[]), 2_000);
        assert_eq!(outcome.released, 1);
        assert_eq!(agg.pending_heap_defers(), 1);
    }

    #[test]
    fn reconcile_follows_frames_moved_by_stack_growth() {
        let mut agg = Aggregator::new();
        agg.apply(&registered_at(4, 0xc000_0100, 0xc000_8000, 1));
        agg.apply(&registered_at(4, 0xc000_0110, 0xc000_8000, 2));
        let runtime = chain(4, &[(0xc000_0110, 0xc004_8000), (0xc000_0100, 0xc004_8000)]);
        assert_eq!(
            agg.reconcile(4, &runtime, 1_000),
            Reconciled { released: 0, moved: 2, adopted: 0 }
        );
        // deferreturn now comes with the new SP and releases them.
        agg.apply(&returned(4, 0xc004_8000));
        assert_eq!(agg.pending_heap_defers(), 0);
    }

    #[test]
    fn reconcile_matches_shared_closures_as_a_multiset() {
        // Closures without captures are one static funcval: same pointer for every record.
        let mut agg = Aggregator::new();
        for i in 0..4 {
            agg.apply(&registered_at(4, 0x4f_0000, 0xc000_8000, i));
        }
        let runtime = chain(4, &[(0x4f_0000, 0xc000_8000), (0x4f_0000, 0xc000_8000)]);
        agg.reconcile(4, &runtime, 1_000);
        assert_eq!(agg.reconcile(4, &runtime, 1_000).released, 2);
        assert_eq!(agg.pending_heap_defers(), 2);
    }

    #[test]
    fn reconcile_drops_a_goroutine_whose_g_was_reused() {
        let mut agg = Aggregator::new();
        agg.apply(&registered_at(4, 0xc000_0100, 0xc000_8000, 1));
        agg.apply(&registered_at(4, 0xc000_0110, 0xc000_8000, 2));
        // The g now runs goroutine 99: goroutine 4 is gone with its records.
        let runtime = chain(99, &[(0xc000_0100, 0xc000_8000)]);
        assert_eq!(agg.reconcile(4, &runtime, 1_000).released, 2);
        assert_eq!(agg.pending_heap_defers(), 0);
        assert!(agg.goroutines_to_reconcile().is_empty());
    }

    #[test]
    fn goroutine_site_totals_survive_until_exit() {
        let mut agg = Aggregator::new();
        agg.apply(&registered(8, 0x401000, 0xc000_8000));
        agg.apply(&returned(8, 0xc000_8000));
        agg.apply(&registered(8, 0x401000, 0xc000_8000));
        let sites: Vec<_> = agg.goroutine_sites(8).collect();
        assert_eq!(sites, [(0x401000, SiteTotals { registered: 2, adopted: 0, released: 1 })]);
        agg.apply(&exited(8));
        assert_eq!(agg.goroutine_sites(8).count(), 0);
        assert_eq!(agg.pending_heap_defers(), 0);
    }

    /// Found by the arm64 VM's stress case, and on amd64 with `--interval 100ms`: a chain read
    /// while a frame's `deferreturn` runs its records (the probe fired as it was called, and
    /// released them) still shows them. Adopting them released them twice (429,001–429,019
    /// released of 429,000 registered).
    #[test]
    fn records_a_deferreturn_is_still_running_are_not_adopted() {
        let mut agg = Aggregator::new();
        agg.apply(&registered_at(6, 0xc000_0300, 0xc000_8000, 10));
        agg.apply(&registered_at(6, 0xc000_0400, 0xc000_8000, 11));
        agg.apply(&returned(6, 0xc000_8000));
        assert_eq!(agg.pending_heap_defers(), 0);
        // The runtime has run one of the two so far.
        let running = chain(6, &[(0xc000_0300, 0xc000_8000)]);
        assert_eq!(agg.adopt(&on_g(0xc000_1000, &running), 50), 0);
        // Done: a record the frame's next registration links is adopted again as usual.
        assert_eq!(agg.adopt(&on_g(0xc000_1000, &chain(6, &[])), 60), 0);
        assert_eq!(agg.adopt(&on_g(0xc000_1000, &running), 70), 1);
        let totals = agg.sites().next().unwrap().1;
        assert_eq!((totals.registered, totals.adopted, totals.released), (2, 1, 2));
    }

    #[test]
    fn adopts_records_pending_before_tracing_once() {
        let mut agg = Aggregator::new();
        // Registered while traced: known.
        agg.apply(&registered_at(4, 0xc000_0300, 0xc000_8000, 10));
        // The chain (newest first) also has two older heap records and a stack record.
        let mut runtime = chain(
            4,
            &[(0xc000_0300, 0xc000_8000), (0xc000_0200, 0xc000_8000), (0xc000_0100, 0xc000_8000)],
        );
        runtime.records.push(DeferRecord {
            address: 0xc000_8f00,
            closure: 0xc000_0050,
            sp: 0xc000_9000,
            pc: 0x402000,
            heap: false,
            in_range_loop: false,
        });
        assert_eq!(agg.adopt(&on_g(0xc000_1000, &runtime), 99), 2);
        assert_eq!(agg.pending_heap_defers(), 3);
        let (_, records) = agg.pending_by_goroutine().next().unwrap();
        assert_eq!(
            records.iter().map(|r| (r.closure, r.adopted)).collect::<Vec<_>>(),
            [(0xc000_0100, true), (0xc000_0200, true), (0xc000_0300, false)]
        );
        // A second look adopts nothing more.
        assert_eq!(agg.adopt(&on_g(0xc000_1000, &runtime), 120), 0);
        let totals = agg.sites().next().unwrap().1;
        assert_eq!((totals.registered, totals.adopted, totals.pending()), (1, 2, 3));
        // deferreturn of the frame releases adopted and registered records alike.
        agg.apply(&returned(4, 0xc000_8000));
        assert_eq!(agg.pending_heap_defers(), 0);
        assert_eq!(agg.sites().next().unwrap().1.pending(), 0);
    }

    #[test]
    fn adopts_goroutines_never_seen_registering() {
        let mut agg = Aggregator::new();
        let runtime = chain(12, &[(0xc000_0100, 0xc000_8000)]);
        assert_eq!(agg.adopt(&on_g(0xc000_5000, &runtime), 5), 1);
        assert_eq!(agg.goroutines_to_reconcile(), [(12, 0xc000_5000)]);
        // An empty chain adopts nothing and creates no goroutine.
        assert_eq!(agg.adopt(&on_g(0xc000_6000, &chain(13, &[])), 5), 0);
        // Nor does a record not filled in yet, or zeroed after it ran (a racing read).
        let mut racing = chain(14, &[(0, 0)]);
        racing.records[0].pc = 0;
        assert_eq!(agg.adopt(&on_g(0xc000_7000, &racing), 5), 0);
        assert_eq!(agg.pending_by_goroutine().count(), 1);
    }

    #[test]
    fn an_in_flight_registration_replaces_its_adopted_twin() {
        let mut agg = Aggregator::new();
        // The chain, read by 500, already links the record registered at 400 whose event
        // had not been drained yet.
        let runtime = chain(4, &[(0xc000_0100, 0xc000_8000)]);
        assert_eq!(agg.adopt(&on_g(0xc000_1000, &runtime), 500), 1);
        agg.apply(&registered_at(4, 0xc000_0100, 0xc000_8000, 400));
        assert_eq!(agg.pending_heap_defers(), 1);
        let totals = agg.sites().next().unwrap().1;
        assert_eq!((totals.registered, totals.adopted), (1, 0));
        // A later registration of the same (static) closure is a new record.
        agg.apply(&registered_at(4, 0xc000_0100, 0xc000_8000, 600));
        assert_eq!(agg.pending_heap_defers(), 2);
    }

    #[test]
    fn shared_closures_keep_their_frames_when_records_are_in_flight() {
        // Recursion with a capture-free (static, shared) closure: one record per frame.
        let mut agg = Aggregator::new();
        for level in 0..3u64 {
            agg.apply(&registered_at(4, 0x4f_0000, 0xc000_9000 - level * 0x100, level));
        }
        // The chain (newest first) also links a deeper frame's record whose event is in flight.
        let runtime = chain(
            4,
            &[
                (0x4f_0000, 0xc000_8d00),
                (0x4f_0000, 0xc000_8e00),
                (0x4f_0000, 0xc000_8f00),
                (0x4f_0000, 0xc000_9000),
            ],
        );
        assert_eq!(agg.reconcile(4, &runtime, 1_000), Reconciled::default());
        assert_eq!(agg.adopt(&on_g(0xc000_1000, &runtime), 2_000), 1);
        agg.apply(&registered_at(4, 0x4f_0000, 0xc000_8d00, 1_500));
        assert_eq!(agg.pending_heap_defers(), 4);
        // Each level returns through deferreturn with its own SP: nothing is left.
        for sp in [0xc000_8d00, 0xc000_8e00, 0xc000_8f00, 0xc000_9000] {
            agg.apply(&returned(4, sp));
        }
        assert_eq!(agg.pending_heap_defers(), 0);
    }

    #[test]
    fn the_map_table_is_bounded_oldest_first() {
        let mut agg = Aggregator::new();
        let seen = |map: u64| {
            Event::MapSeen(MapSeen {
                header: header(EventKind::MapSeen, 1, 0),
                map,
                map_type: 0x4a_0000,
                caller_pc: 0x401234,
            })
        };
        for i in 0..MAP_TABLE_CAPACITY as u64 + 10 {
            agg.apply(&seen(0xd000_0000 + i * 16));
        }
        assert_eq!(agg.maps.len(), MAP_TABLE_CAPACITY);
        assert!(agg.map(0xd000_0000).is_none(), "the oldest map is forgotten");
        assert_eq!(agg.map(0xd000_0000 + 10 * 16).map(|m| m.first_pc), Some(0x401234));
    }
}
