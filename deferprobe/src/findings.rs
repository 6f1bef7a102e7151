//! Pure: the pending part of a report (pending totals, findings, goroutines, sites) from a
//! [`Snapshot`] of the runtime's state, plus, under `run`, what the probes saw (when each
//! record still pending was registered, and each site's registrations and releases).
//!
//! A finding is a frame (goroutine + the SP its records carry) holding at least
//! `--min-pending` records. Its captures are summarised per closure field type, objects
//! counted once however many closures share them, and its retained bytes estimated from the
//! `_defer` records, the closure objects and what they reach.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::Serialize;

use crate::{
    aggregator::Panicked,
    report::{
        Finding, GoroutineReport, GoroutineSiteReport, Location, LostEvents, MapOrigin,
        PendingReport, PendingSections, SiteReport,
    },
    state::{CapturedValue, Captures, PendingRecord, Snapshot, Value},
};

/// What the report needs from outside the snapshot.
pub struct SnapshotLookups<'a> {
    /// PIE load bias: runtime address − ELF virtual address.
    pub bias: u64,
    /// Source location of a *return address* (ELF virtual address; the call before it).
    pub location: &'a dyn Fn(u64) -> Location,
    /// `sizeof(runtime._defer)`.
    pub defer_record_bytes: u64,
    pub min_pending: u64,
}

/// What the probes saw, under `run`.
pub struct Traced<'a> {
    /// When the record with this closure (runtime address) and goroutine id was registered
    /// while traced (monotonic ns).
    pub registered_ns: &'a dyn Fn(u64, u64) -> Option<u64>,
    /// Heap defers registered and released while traced, per site (runtime return address).
    pub sites: HashMap<u64, (u64, u64)>,
    /// The same per goroutine id and site.
    pub goroutine_sites: HashMap<(u64, u64), (u64, u64)>,
    /// Where the probes first saw a captured map (runtime address) written: the return
    /// address into the writing function; None if never while traced.
    pub map_first_written: &'a dyn Fn(u64) -> Option<u64>,
    /// mapassign calls on a captured map while traced, as far as the kernel's set knows.
    pub map_writes: &'a dyn Fn(u64) -> Option<u64>,
    /// Monotonic ns now.
    pub now_ns: u64,
    /// The Go module other than the executable (a plugin) holding a runtime address, if any.
    pub module_pc: &'a dyn Fn(u64) -> Option<ModulePc>,
}

/// A pc in a Go module other than the executable: a plugin, with its own function table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModulePc {
    /// The module's path, as the target maps it.
    pub module: String,
    /// The pc as an ELF virtual address of the module.
    pub pc: u64,
    /// Source location of the call before it (a return address), from the module's table.
    pub location: Location,
    /// Records at this pc that no registration seen accounts for were registered while the
    /// module's code was not probed (see `modules::Module`).
    pub unseen_were_unprobed: bool,
}

/// Pending records whose registration the probes did not see, by why.
#[derive(Clone, Copy, Debug, Default)]
struct Unseen {
    /// Already pending when tracing started (or lost events; see
    /// [`unseen_registrations_were_lost`]).
    before: u64,
    /// Registered in code that was not probed then (a plugin).
    unprobed: u64,
}

impl Unseen {
    fn add(&mut self, other: Unseen) {
        self.before += other.before;
        self.unprobed += other.unprobed;
    }
}

/// Captures of one kind and type in a finding.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CaptureSummary {
    /// `map`, `map_by_reference`, `slice`, `string`, `file`, `pointer`, `value`.
    pub kind: &'static str,
    /// The closure field's type as the binary names it.
    #[serde(rename = "type")]
    pub type_name: String,
    /// Captured variables of this kind and type (one per pending closure that has one).
    pub captures: u64,
    /// Distinct objects they reach (maps, slice arrays, strings, pointees).
    pub objects: u64,
    /// Maps: their current element count, summed over distinct maps (null if one could not
    /// be read). Slices: summed lengths. Strings: summed lengths in bytes.
    pub entries: Option<u64>,
    /// Slices: summed capacities.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capacity: Option<u64>,
    /// Estimated bytes those objects hold (an estimate: see the report's notes).
    pub est_bytes: u64,
}

/// Notes on what the pending sections could not know: closures whose captures are unknown,
/// map pointers whose header did not check out.
pub fn capture_notes(sections: &PendingSections) -> Vec<String> {
    let mut notes = Vec::new();
    for (why, records) in &sections.unknown_captures {
        notes.push(format!("{records} pending closures have unknown captures: {why}"));
    }
    if sections.unreadable_maps > 0 {
        notes.push(format!(
            "{} captured map pointers did not hold a valid map header: their entries are \
             unknown (counted as 0 in captured_map_entries, null in captures[].entries)",
            sections.unreadable_maps
        ));
    }
    notes
}

/// For a program deferprobe started: nothing was pending before its first instruction (the
/// probes were attached before it ran), so the pending records no registration seen accounts
/// for, counted as "pending before trace" by [`from_snapshot`] and `report::correlate`, are
/// registrations whose events were lost. Moves them to the `pending_registration_lost` counts.
pub fn unseen_registrations_were_lost(sections: &mut PendingSections) {
    let pending = &mut sections.pending;
    pending.registration_lost += std::mem::take(&mut pending.before_trace);
    for finding in &mut sections.findings {
        finding.pending_registration_lost += std::mem::take(&mut finding.pending_before_trace);
    }
    for goroutine in &mut sections.goroutines {
        for site in &mut goroutine.defer_sites {
            site.pending_registration_lost += std::mem::take(&mut site.pending_before_trace);
        }
    }
    for site in &mut sections.sites {
        site.pending_registration_lost += std::mem::take(&mut site.pending_before_trace);
    }
}

/// The note on `registration_lost` pending records (see [`unseen_registrations_were_lost`]),
/// tied to the losses that explain them.
pub fn registration_lost_note(records: u64, lost: &LostEvents, ring_kib: u32) -> String {
    format!(
        "{records} pending heap defer records were registered while traced, but their \
         registration events were lost (ring buffer full: {}, without goroutine id: {}): they \
         are pending (found in the goroutines' _defer chains) and counted as \
         pending_registration_lost, not as registered in sites, and their age is unknown; the \
         program was traced from its first instruction, so none was pending before tracing \
         started; a larger --ring-buffer-kib than {ring_kib} keeps more events",
        lost.ring_buffer_full, lost.without_goroutine_id
    )
}

/// Notes on goroutines that died of an unrecovered panic: the runtime ran their deferred calls
/// during the panic (so none of their records is pending), and the program died of it; the
/// other goroutines' deferred calls never ran, and their records stay pending as the program
/// left them.
pub fn panic_notes(panicked: &[Panicked]) -> Vec<String> {
    panicked
        .iter()
        .map(|p| {
            let goroutine = match p.goid {
                Some(goid) => format!("goroutine {goid}"),
                None => "a goroutine (its id could not be read)".to_owned(),
            };
            let ran = match p.records_ran {
                Some(1) => "its 1 pending heap defer ran".to_owned(),
                Some(n) => format!("its {n} pending heap defers ran"),
                None => "its deferred calls ran (how many pending heap defers: unknown)".to_owned(),
            };
            format!(
                "{goroutine} panicked and nothing recovered: {ran} during the panic, and the \
                 program died of it; the other goroutines' deferred calls never ran, and their \
                 records are reported pending as the program left them"
            )
        })
        .collect()
}

/// Captured maps `(map, entries)` grouped by where the probes saw them first written while
/// traced (`first_written`: that call's return address; maps never seen written are left
/// out), with their entries and the writes counted (`writes`), most maps first.
pub fn map_origins(
    maps: impl IntoIterator<Item = (u64, u64)>,
    first_written: &dyn Fn(u64) -> Option<u64>,
    writes: &dyn Fn(u64) -> Option<u64>,
    locate: &mut dyn FnMut(u64) -> Location,
) -> Vec<MapOrigin> {
    let mut origins: HashMap<u64, MapOrigin> = HashMap::new();
    for (map, entries) in maps {
        let Some(first_pc) = first_written(map) else { continue };
        let origin = origins.entry(first_pc).or_insert_with(|| {
            let Location { function, file, line } = locate(first_pc);
            MapOrigin { function, file, line, maps: 0, entries: 0, writes: 0 }
        });
        origin.maps += 1;
        origin.entries += entries;
        origin.writes += writes(map).unwrap_or(0);
    }
    let mut origins: Vec<MapOrigin> = origins.into_values().collect();
    origins.sort_by(|a, b| b.maps.cmp(&a.maps).then(a.line.cmp(&b.line)));
    origins
}

/// Estimated bytes a map holds: its slots (key + element, plus a control byte) at Go's
/// maximum load factor of 7/8, plus the header. An estimate: overflow buckets, pointed-to
/// data (string bytes, ...) and allocation rounding are not counted.
pub fn map_bytes_estimate(entries: u64, slot_bytes: u64) -> u64 {
    entries * (slot_bytes + 1) * 8 / 7 + 48
}

/// An object a capture reaches, for counting it once: its address and estimated bytes.
pub(crate) fn object_of(value: &Value) -> Option<(u64, u64)> {
    match *value {
        Value::Map { map, entries, slot_bytes, .. } if map != 0 => {
            Some((map, map_bytes_estimate(entries.unwrap_or(0), slot_bytes)))
        }
        Value::Slice { data, cap, elem_bytes, .. } if data != 0 => {
            Some((data, cap.unwrap_or(0) * elem_bytes))
        }
        Value::String { data, len, .. } if data != 0 => Some((data, len.unwrap_or(0))),
        Value::Pointer { target, target_bytes, .. } if target != 0 => Some((target, target_bytes)),
        _ => None,
    }
}

/// The captured variables of a record (none when it captures nothing or is unknown).
fn values(record: &PendingRecord) -> &[CapturedValue] {
    match &record.captures {
        Captures::Values(values) => values,
        _ => &[],
    }
}

/// What some records keep alive: the distinct maps they capture (by value and by reference,
/// with their entries), the distinct objects their captures reach, and the closures.
#[derive(Default)]
struct Retained {
    records: u64,
    by_value: HashSet<u64>,
    by_reference: HashSet<u64>,
    entries: HashMap<u64, Option<u64>>,
    /// Distinct objects reached by any capture, with their estimated bytes.
    objects: HashMap<u64, u64>,
    closure_bytes: u64,
}

impl Retained {
    fn add(&mut self, record: &PendingRecord) {
        self.records += 1;
        self.closure_bytes += record.closure_bytes;
        for captured in values(record) {
            if let Some((object, bytes)) = object_of(&captured.value) {
                self.objects.insert(object, bytes);
            }
            if let Value::Map { map, by_reference, entries, .. } = captured.value
                && map != 0
            {
                self.entries.insert(map, entries);
                match by_reference {
                    true => self.by_reference.insert(map),
                    false => self.by_value.insert(map),
                };
            }
        }
    }

    fn maps(&self) -> u64 {
        self.by_value.union(&self.by_reference).count() as u64
    }

    /// Known element counts, summed (an unreadable map adds nothing; notes say how many).
    fn map_entries(&self) -> u64 {
        self.entries.values().map(|e| e.unwrap_or(0)).sum()
    }

    /// Estimated bytes: the `_defer` records, the closures, and each object once.
    fn est_bytes(&self, defer_record_bytes: u64) -> u64 {
        self.records * defer_record_bytes + self.closure_bytes + self.objects.values().sum::<u64>()
    }
}

/// Captures of one kind and field type.
#[derive(Default)]
struct TypeTotals {
    captures: u64,
    /// Distinct objects reached, with their estimated bytes.
    objects: HashMap<u64, u64>,
    /// Map entries, slice lengths or string lengths of those objects, summed.
    entries: u64,
    entries_unknown: bool,
    /// Slice capacities, summed.
    capacity: Option<u64>,
}

/// What a frame's or a site's records capture, by kind and type.
#[derive(Default)]
struct CaptureTotals<'s> {
    retained: Retained,
    by_type: BTreeMap<(&'static str, &'s str), TypeTotals>,
}

impl<'s> CaptureTotals<'s> {
    fn add(&mut self, record: &'s PendingRecord) {
        self.retained.add(record);
        for captured in values(record) {
            let value = &captured.value;
            let totals = self.by_type.entry((captured.kind, &captured.type_name)).or_default();
            totals.captures += 1;
            let Some((object, bytes)) = object_of(value) else { continue };
            if totals.objects.insert(object, bytes).is_some() {
                continue; // counted once, however many closures share it
            }
            let mut add = |n: Option<u64>| match n {
                Some(n) => totals.entries += n,
                None => totals.entries_unknown = true,
            };
            match *value {
                Value::Map { entries, .. } => add(entries),
                Value::Slice { len, cap, .. } => {
                    add(len);
                    totals.capacity = Some(totals.capacity.unwrap_or(0) + cap.unwrap_or(0));
                }
                Value::String { len, .. } => add(len),
                _ => {}
            }
        }
    }

    fn summaries(&self) -> Vec<CaptureSummary> {
        let mut summaries: Vec<CaptureSummary> = self
            .by_type
            .iter()
            .map(|(&(kind, type_name), totals)| CaptureSummary {
                kind,
                type_name: type_name.to_owned(),
                captures: totals.captures,
                objects: totals.objects.len() as u64,
                entries: match kind {
                    "map" | "map_by_reference" | "slice" | "string" => {
                        (!totals.entries_unknown).then_some(totals.entries)
                    }
                    _ => None,
                },
                capacity: totals.capacity,
                est_bytes: totals.objects.values().sum(),
            })
            .collect();
        summaries.sort_by(|a, b| b.est_bytes.cmp(&a.est_bytes).then(b.captures.cmp(&a.captures)));
        summaries
    }
}

/// Builds the pending sections from `snapshot`.
pub fn from_snapshot(
    snapshot: &Snapshot,
    lookups: &SnapshotLookups<'_>,
    traced: Option<&Traced<'_>>,
) -> PendingSections {
    let module_pc = |pc: u64| traced.and_then(|t| (t.module_pc)(pc));
    let mut locations: HashMap<u64, Location> = HashMap::new();
    let mut locate = |pc: u64| {
        locations
            .entry(pc)
            .or_insert_with(|| match (pc, module_pc(pc)) {
                (0, _) => Location::default(),
                (_, Some(module)) => module.location,
                (pc, None) => (lookups.location)(pc.wrapping_sub(lookups.bias)),
            })
            .clone()
    };
    // Whether the probes saw the record's registration (never, without probes).
    let registered_ns = |record: &PendingRecord, goid: u64| {
        traced.and_then(|t| (t.registered_ns)(record.record.closure, goid))
    };
    // Why the probes did not see it, if they did not.
    let unprobed_sites: HashSet<u64> = snapshot
        .goroutines
        .iter()
        .flat_map(|g| g.records.iter().map(|r| r.site))
        .filter(|&pc| module_pc(pc).is_some_and(|m| m.unseen_were_unprobed))
        .collect();
    let unseen = |record: &PendingRecord, goid: u64| match registered_ns(record, goid) {
        Some(_) => Unseen::default(),
        None if unprobed_sites.contains(&record.site) => Unseen { before: 0, unprobed: 1 },
        None => Unseen { before: 1, unprobed: 0 },
    };
    let mut unknown_captures: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut unreadable_maps = 0;
    let mut findings = Vec::new();
    let mut goroutines = Vec::new();
    let mut all = Retained::default();
    // Per site: pending records, those pending before tracing, and what they capture.
    let mut by_site: BTreeMap<u64, (u64, Unseen, CaptureTotals)> = BTreeMap::new();
    let mut records_total = 0;
    for goroutine in &snapshot.goroutines {
        let goid = goroutine.header.goid;
        let mut retained = Retained::default();
        let mut frames: BTreeMap<u64, Vec<&PendingRecord>> = BTreeMap::new();
        // Per site: pending records, and those pending before tracing.
        let mut per_site: BTreeMap<u64, (u64, Unseen)> = BTreeMap::new();
        for record in &goroutine.records {
            retained.add(record);
            all.add(record);
            frames.entry(record.record.sp).or_default().push(record);
            let unseen = unseen(record, goid);
            let site = per_site.entry(record.site).or_default();
            site.0 += 1;
            site.1.add(unseen);
            let site = by_site.entry(record.site).or_default();
            site.0 += 1;
            site.1.add(unseen);
            site.2.add(record);
            if let Captures::Unknown(why) = record.captures {
                *unknown_captures.entry(why).or_default() += 1;
            }
            unreadable_maps += values(record)
                .iter()
                .filter(|v| matches!(v.value, Value::Map { map, entries: None, .. } if map != 0))
                .count() as u64;
        }
        records_total += goroutine.records.len() as u64;
        for frame in frames.values() {
            let pending = frame.len() as u64;
            if pending < lookups.min_pending {
                continue;
            }
            let mut frame_totals = CaptureTotals::default();
            let mut sites: BTreeMap<u64, u64> = BTreeMap::new();
            for record in frame {
                frame_totals.add(record);
                *sites.entry(record.site).or_default() += 1;
            }
            // The frame's site: the defer statement with the most pending records.
            let site = sites.iter().max_by_key(|(pc, n)| (**n, std::cmp::Reverse(**pc)));
            let location = locate(site.map_or(0, |(pc, _)| *pc));
            let registered: Vec<u64> =
                frame.iter().filter_map(|record| registered_ns(record, goid)).collect();
            let at_attach = pending - registered.len() as u64;
            let mut frame_unseen = Unseen::default();
            for record in frame {
                frame_unseen.add(unseen(record, goid));
            }
            let oldest_pending_secs = match (traced, at_attach) {
                (Some(t), 0) => registered
                    .iter()
                    .min()
                    .map(|oldest| t.now_ns.saturating_sub(*oldest) as f64 / 1e9),
                _ => None,
            };
            findings.push(Finding {
                kind: "defer_accumulation",
                goid,
                function: location.function,
                file: location.file,
                line: location.line,
                pending_defers: pending,
                pending_before_trace: frame_unseen.before,
                pending_registration_lost: 0,
                pending_unprobed: frame_unseen.unprobed,
                oldest_pending_secs,
                captured_maps: Some(frame_totals.retained.maps()),
                captured_maps_by_value: Some(frame_totals.retained.by_value.len() as u64),
                captured_maps_by_reference: Some(frame_totals.retained.by_reference.len() as u64),
                captured_map_entries: Some(frame_totals.retained.map_entries()),
                est_bytes: Some(frame_totals.retained.est_bytes(lookups.defer_record_bytes)),
                captures: frame_totals.summaries(),
                captured_map_origins: match traced {
                    Some(t) => map_origins(
                        frame_totals.retained.entries.iter().map(|(m, e)| (*m, e.unwrap_or(0))),
                        t.map_first_written,
                        t.map_writes,
                        &mut locate,
                    ),
                    None => Vec::new(),
                },
            });
        }
        let defer_sites = per_site
            .iter()
            .map(|(pc, &(pending, unseen))| {
                let location = locate(*pc);
                let totals = traced
                    .map(|t| t.goroutine_sites.get(&(goid, *pc)).copied().unwrap_or_default());
                GoroutineSiteReport {
                    function: location.function,
                    file: location.file,
                    line: location.line,
                    pending,
                    registered: totals.map(|(registered, _)| registered),
                    pending_before_trace: unseen.before,
                    pending_registration_lost: 0,
                    pending_unprobed: unseen.unprobed,
                    released: totals.map(|(_, released)| released),
                }
            })
            .collect();
        goroutines.push(GoroutineReport {
            goid,
            pending_defers: goroutine.records.len() as u64,
            captured_maps: Some(retained.maps()),
            captured_map_entries: Some(retained.map_entries()),
            est_bytes: Some(retained.est_bytes(lookups.defer_record_bytes)),
            defer_sites,
        });
    }
    findings.sort_by(|a, b| b.est_bytes.cmp(&a.est_bytes).then(a.goid.cmp(&b.goid)));
    goroutines.sort_by(|a, b| b.pending_defers.cmp(&a.pending_defers).then(a.goid.cmp(&b.goid)));
    for goroutine in &mut goroutines {
        goroutine.defer_sites.sort_by(|a, b| b.pending.cmp(&a.pending).then(a.line.cmp(&b.line)));
    }
    // Sites that registered while traced but hold nothing now are sites too.
    if let Some(traced) = traced {
        for pc in traced.sites.keys() {
            by_site.entry(*pc).or_default();
        }
    }
    let mut unseen_total = Unseen::default();
    for (_, unseen, _) in by_site.values() {
        unseen_total.add(*unseen);
    }
    let mut sites: Vec<SiteReport> = by_site
        .into_iter()
        .map(|(pc, (pending, unseen, captures))| {
            let location = locate(pc);
            let totals = traced.map(|t| t.sites.get(&pc).copied().unwrap_or_default());
            let module = module_pc(pc);
            SiteReport {
                pc: match (pc, &module) {
                    (0, _) => "unknown".to_owned(),
                    (_, Some(module)) => format!("{:#x}", module.pc),
                    (pc, None) => format!("{:#x}", pc.wrapping_sub(lookups.bias)),
                },
                module: module.map(|m| m.module),
                function: location.function,
                file: location.file,
                line: location.line,
                registered: totals.map(|(registered, _)| registered),
                pending_before_trace: unseen.before,
                pending_registration_lost: 0,
                pending_unprobed: unseen.unprobed,
                released: totals.map(|(_, released)| released),
                pending,
                est_bytes: Some(captures.retained.est_bytes(lookups.defer_record_bytes)),
                captures: captures.summaries(),
            }
        })
        .collect();
    sites.sort_by(|a, b| (b.pending, b.registered, &a.pc).cmp(&(a.pending, a.registered, &b.pc)));
    PendingSections {
        pending: PendingReport {
            heap_defers: records_total,
            goroutines: snapshot.goroutines.len() as u64,
            captured_maps: Some(all.maps()),
            before_trace: unseen_total.before,
            registration_lost: 0,
            unprobed: unseen_total.unprobed,
        },
        findings,
        goroutines,
        sites,
        unknown_captures,
        unreadable_maps,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{DeferRecord, GoroutineHeader, PendingGoroutine};

    fn record(sp: u64, values: Vec<CapturedValue>) -> PendingRecord {
        PendingRecord {
            record: DeferRecord {
                address: 0,
                closure: 0,
                sp,
                pc: 0x401005,
                heap: true,
                in_range_loop: false,
            },
            site: 0x401005,
            code: Some(0x402000),
            closure_bytes: 16,
            captures: Captures::Values(values),
        }
    }

    fn map(map: u64, by_reference: bool, entries: Option<u64>) -> CapturedValue {
        CapturedValue {
            name: "X0".into(),
            kind: if by_reference { "map_by_reference" } else { "map" },
            type_name: match by_reference {
                true => "*map[string]int".into(),
                false => "map[string]int".into(),
            },
            value: Value::Map { map, by_reference, entries, slot_bytes: 24 },
        }
    }

    fn sections(records: Vec<PendingRecord>, min_pending: u64) -> PendingSections {
        let header =
            GoroutineHeader { g: 0xc000, goid: 7, status: 4, defers: 1, ..Default::default() };
        let snapshot = Snapshot {
            goroutines: vec![PendingGoroutine { header, records, stack: None }],
            ..Snapshot::default()
        };
        let location = |_: u64| Location {
            function: Some("main.leak".into()),
            file: Some("/src/main.go".into()),
            line: Some(12),
        };
        let lookups =
            SnapshotLookups { bias: 0, location: &location, defer_record_bytes: 48, min_pending };
        from_snapshot(&snapshot, &lookups, None)
    }

    #[test]
    fn a_frame_summarises_its_captures_counting_shared_objects_once() {
        // Three closures of one frame: two share map 0xa (3 entries), one holds map 0xb by
        // reference; a frame elsewhere holds an unreadable map.
        let records = vec![
            record(0x100, vec![map(0xa, false, Some(3))]),
            record(0x100, vec![map(0xa, false, Some(3))]),
            record(0x100, vec![map(0xb, true, Some(5))]),
            record(0x900, vec![map(0xc, false, None)]),
        ];
        let s = sections(records, 3);
        assert_eq!(s.pending.heap_defers, 4);
        assert_eq!(s.pending.captured_maps, Some(3));
        assert_eq!(s.unreadable_maps, 1);
        assert_eq!(s.findings.len(), 1, "only the frame with 3 records is a finding");
        let f = &s.findings[0];
        assert_eq!((f.pending_defers, f.pending_before_trace), (3, 3));
        assert_eq!(f.oldest_pending_secs, None, "no events: the age is unknown");
        assert_eq!(
            (f.captured_maps, f.captured_maps_by_value, f.captured_maps_by_reference),
            (Some(2), Some(1), Some(1))
        );
        assert_eq!(f.captured_map_entries, Some(8));
        let by_value = f.captures.iter().find(|c| c.kind == "map").unwrap();
        assert_eq!((by_value.captures, by_value.objects, by_value.entries), (2, 1, Some(3)));
        assert_eq!(by_value.est_bytes, map_bytes_estimate(3, 24));
        let by_reference = f.captures.iter().find(|c| c.kind == "map_by_reference").unwrap();
        assert_eq!(by_reference.type_name, "*map[string]int");
        assert_eq!(
            f.est_bytes,
            Some(3 * 48 + 3 * 16 + map_bytes_estimate(3, 24) + map_bytes_estimate(5, 24))
        );
        // The goroutine counts every map, the unreadable one's entries as unknown (0 added).
        assert_eq!(s.goroutines[0].captured_maps, Some(3));
        assert_eq!(s.goroutines[0].captured_map_entries, Some(8));
        let objects =
            map_bytes_estimate(3, 24) + map_bytes_estimate(5, 24) + map_bytes_estimate(0, 24);
        assert_eq!(s.goroutines[0].est_bytes, Some(4 * 48 + 4 * 16 + objects));
        // Without probes, no origins and no registrations.
        assert!(f.captured_map_origins.is_empty());
        assert_eq!(s.sites[0].registered, None);
    }

    #[test]
    fn maps_are_grouped_by_where_they_were_first_written_while_traced() {
        let first_written = |map: u64| match map {
            0xa | 0xb => Some(0x401200),
            _ => None, // written before tracing started
        };
        let writes = |map: u64| Some(map & 0xf);
        let mut locate = |pc: u64| Location { line: Some(pc as u32), ..Location::default() };
        let origins =
            map_origins([(0xa, 3), (0xb, 5), (0xc, 7)], &first_written, &writes, &mut locate);
        assert_eq!(origins.len(), 1);
        assert_eq!((origins[0].maps, origins[0].entries, origins[0].writes), (2, 8, 0xa + 0xb));
        assert_eq!(origins[0].line, Some(0x401200));
    }

    /// In a program deferprobe started, records no registration accounts for were lost events,
    /// never "pending before trace", in every section.
    #[test]
    fn unseen_records_of_a_started_program_are_lost_registrations() {
        let records = vec![record(0x100, vec![]); 3];
        let mut s = sections(records, 1);
        assert_eq!((s.pending.before_trace, s.findings[0].pending_before_trace), (3, 3));
        unseen_registrations_were_lost(&mut s);
        let f = &s.findings[0];
        assert_eq!((f.pending_before_trace, f.pending_registration_lost), (0, 3));
        assert_eq!(f.oldest_pending_secs, None, "their age is unknown");
        assert_eq!((s.pending.before_trace, s.pending.registration_lost), (0, 3));
        let site = &s.sites[0];
        assert_eq!((site.pending_before_trace, site.pending_registration_lost), (0, 3));
        let site = &s.goroutines[0].defer_sites[0];
        assert_eq!((site.pending_before_trace, site.pending_registration_lost), (0, 3));
    }

    /// Records at sites in a plugin loaded while traced, which no registration seen accounts
    /// for, are "unprobed" (and stay so when the program was started by deferprobe), named
    /// with the plugin's table, their pc the plugin's own; the executable's are not.
    #[test]
    fn unseen_records_in_a_plugin_loaded_while_traced_are_unprobed() {
        let mut in_plugin = record(0x100, vec![]);
        in_plugin.site = 0x7f00_0000_1005;
        let records = vec![in_plugin.clone(), in_plugin, record(0x200, vec![])];
        let header =
            GoroutineHeader { g: 0xc000, goid: 7, status: 4, defers: 1, ..Default::default() };
        let snapshot = Snapshot {
            goroutines: vec![PendingGoroutine { header, records, stack: None }],
            ..Snapshot::default()
        };
        let location =
            |_: u64| Location { function: Some("main.leak".into()), ..Location::default() };
        let lookups = SnapshotLookups {
            bias: 0,
            location: &location,
            defer_record_bytes: 48,
            min_pending: 1,
        };
        let module_pc = |pc: u64| {
            (pc >= 0x7f00_0000_0000).then(|| ModulePc {
                module: "/tmp/p.so".into(),
                pc: pc - 0x7f00_0000_0000,
                location: Location { function: Some("p.Hold".into()), ..Location::default() },
                unseen_were_unprobed: true,
            })
        };
        let traced = Traced {
            registered_ns: &|_, _| None,
            sites: HashMap::new(),
            goroutine_sites: HashMap::new(),
            map_first_written: &|_| None,
            map_writes: &|_| None,
            now_ns: 0,
            module_pc: &module_pc,
        };
        let mut s = from_snapshot(&snapshot, &lookups, Some(&traced));
        unseen_registrations_were_lost(&mut s);
        let p = (s.pending.before_trace, s.pending.registration_lost, s.pending.unprobed);
        assert_eq!(p, (0, 1, 2));
        let site = s.sites.iter().find(|site| site.module.is_some()).unwrap();
        assert_eq!((site.pc.as_str(), site.function.as_deref()), ("0x1005", Some("p.Hold")));
        assert_eq!((site.pending_unprobed, site.pending_registration_lost), (2, 0));
        let finding = s.findings.iter().find(|f| f.function.as_deref() == Some("p.Hold")).unwrap();
        assert_eq!((finding.pending_unprobed, finding.pending_before_trace), (2, 0));
    }

    #[test]
    fn a_fatal_panic_is_noted_with_what_ran_and_unknowns_as_such() {
        let notes = panic_notes(&[
            Panicked { goid: Some(9), records_ran: Some(40) },
            Panicked { goid: None, records_ran: None },
        ]);
        assert_eq!(
            notes[0],
            "goroutine 9 panicked and nothing recovered: its 40 pending heap defers ran during \
             the panic, and the program died of it; the other goroutines' deferred calls never \
             ran, and their records are reported pending as the program left them"
        );
        assert!(notes[1].starts_with("a goroutine (its id could not be read) panicked"));
        assert!(notes[1].contains("how many pending heap defers: unknown"), "{}", notes[1]);
    }

    #[test]
    fn an_unreadable_map_makes_its_entries_unknown_not_zero() {
        let records = vec![record(0x100, vec![map(0xc, false, None)]); 2];
        let s = sections(records, 1);
        let capture = &s.findings[0].captures[0];
        assert_eq!(capture.entries, None);
        assert_eq!(capture.objects, 1);
    }
}
