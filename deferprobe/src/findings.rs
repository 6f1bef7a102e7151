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
    report::{Finding, GoroutineReport, GoroutineSiteReport, Location, PendingReport, SiteReport},
    state::{Captures, PendingRecord, Snapshot, Value},
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
    /// Monotonic ns now.
    pub now_ns: u64,
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

/// The pending part of a report.
pub struct PendingSections {
    pub pending: PendingReport,
    pub findings: Vec<Finding>,
    pub goroutines: Vec<GoroutineReport>,
    pub sites: Vec<SiteReport>,
    /// Pending records whose captures are unknown, by reason.
    pub unknown_captures: BTreeMap<&'static str, u64>,
    /// Map captures whose header did not check out (entries unknown).
    pub unreadable_maps: u64,
}

/// Estimated bytes a map holds: its slots (key + element, plus a control byte) at Go's
/// maximum load factor of 7/8, plus the header. An estimate: overflow buckets, pointed-to
/// data (string bytes, ...) and allocation rounding are not counted.
pub fn map_bytes_estimate(entries: u64, slot_bytes: u64) -> u64 {
    entries * (slot_bytes + 1) * 8 / 7 + 48
}

/// An object a capture reaches, for counting it once.
fn object_of(value: &Value) -> Option<(u64, u64)> {
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

/// Sums what a set of records captures.
#[derive(Default)]
struct CaptureTotals {
    by_type: BTreeMap<(&'static str, String), (u64, HashMap<u64, u64>, Option<u64>, Option<u64>)>,
    maps_by_value: HashSet<u64>,
    maps_by_reference: HashSet<u64>,
    map_entries: HashMap<u64, Option<u64>>,
    objects: HashMap<u64, u64>,
    closure_bytes: u64,
}

impl CaptureTotals {
    fn add(&mut self, record: &PendingRecord) {
        self.closure_bytes += record.closure_bytes;
        let Captures::Values(values) = &record.captures else { return };
        for captured in values {
            let value = &captured.value;
            let entry = self.by_type.entry((value.kind(), captured.type_name.clone())).or_insert((
                0,
                HashMap::new(),
                Some(0),
                None,
            ));
            entry.0 += 1;
            if let Some((object, bytes)) = object_of(value) {
                let new = entry.1.insert(object, bytes).is_none();
                self.objects.insert(object, bytes);
                let add = |total: &mut Option<u64>, n: Option<u64>| {
                    *total = total.zip(n).map(|(a, b)| a + b);
                };
                match *value {
                    Value::Map { map, by_reference, entries, .. } => {
                        if new {
                            add(&mut entry.2, entries);
                        }
                        self.map_entries.insert(map, entries);
                        match by_reference {
                            true => self.maps_by_reference.insert(map),
                            false => self.maps_by_value.insert(map),
                        };
                    }
                    Value::Slice { len, cap, .. } if new => {
                        add(&mut entry.2, len);
                        entry.3 = Some(entry.3.unwrap_or(0) + cap.unwrap_or(0));
                    }
                    Value::String { len, .. } if new => add(&mut entry.2, len),
                    _ => {}
                }
            }
        }
    }

    fn maps(&self) -> u64 {
        self.maps_by_value.union(&self.maps_by_reference).count() as u64
    }

    fn map_entries(&self) -> u64 {
        self.map_entries.values().map(|e| e.unwrap_or(0)).sum()
    }

    fn summaries(&self) -> Vec<CaptureSummary> {
        let mut summaries: Vec<CaptureSummary> = self
            .by_type
            .iter()
            .map(|((kind, type_name), (captures, objects, entries, capacity))| CaptureSummary {
                kind,
                type_name: type_name.clone(),
                captures: *captures,
                objects: objects.len() as u64,
                entries: match *kind {
                    "map" | "map_by_reference" | "slice" | "string" => *entries,
                    _ => None,
                },
                capacity: *capacity,
                est_bytes: objects.values().sum(),
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
    let mut locations: HashMap<u64, Location> = HashMap::new();
    let mut locate = |pc: u64| {
        locations
            .entry(pc)
            .or_insert_with(|| match pc {
                0 => Location::default(),
                pc => (lookups.location)(pc.wrapping_sub(lookups.bias)),
            })
            .clone()
    };
    let mut unknown_captures: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut unreadable_maps = 0;
    let mut findings = Vec::new();
    let mut goroutines = Vec::new();
    let mut all = CaptureTotals::default();
    let mut pending_by_site: HashMap<u64, u64> = HashMap::new();
    let mut records_total = 0;
    for goroutine in &snapshot.goroutines {
        let goid = goroutine.header.goid;
        let mut totals = CaptureTotals::default();
        let mut frames: BTreeMap<u64, Vec<&PendingRecord>> = BTreeMap::new();
        let mut per_site: BTreeMap<u64, u64> = BTreeMap::new();
        for record in &goroutine.records {
            totals.add(record);
            all.add(record);
            frames.entry(record.record.sp).or_default().push(record);
            *per_site.entry(record.site).or_default() += 1;
            if let Captures::Unknown(why) = record.captures {
                *unknown_captures.entry(why).or_default() += 1;
            }
            if let Captures::Values(values) = &record.captures {
                unreadable_maps += values
                    .iter()
                    .filter(
                        |v| matches!(v.value, Value::Map { map, entries: None, .. } if map != 0),
                    )
                    .count() as u64;
            }
        }
        records_total += goroutine.records.len() as u64;
        for (site, n) in &per_site {
            *pending_by_site.entry(*site).or_default() += n;
        }
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
            let registered: Vec<u64> = frame
                .iter()
                .filter_map(|r| traced.and_then(|t| (t.registered_ns)(r.record.closure, goid)))
                .collect();
            let at_attach = pending - registered.len() as u64;
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
                pending_before_trace: at_attach,
                oldest_pending_secs,
                captured_maps: frame_totals.maps(),
                captured_maps_by_value: frame_totals.maps_by_value.len() as u64,
                captured_maps_by_reference: frame_totals.maps_by_reference.len() as u64,
                captured_map_entries: frame_totals.map_entries(),
                est_bytes: pending * lookups.defer_record_bytes
                    + frame_totals.closure_bytes
                    + frame_totals.objects.values().sum::<u64>(),
                captures: frame_totals.summaries(),
                captured_map_origins: Vec::new(),
            });
        }
        let defer_sites = per_site
            .iter()
            .map(|(pc, pending)| {
                let location = locate(*pc);
                let (registered, released) =
                    traced.and_then(|t| t.sites.get(pc).copied()).unwrap_or((0, 0));
                GoroutineSiteReport {
                    function: location.function,
                    file: location.file,
                    line: location.line,
                    pending: *pending,
                    registered,
                    pending_before_trace: 0,
                    released,
                }
            })
            .collect();
        goroutines.push(GoroutineReport {
            goid,
            pending_defers: goroutine.records.len() as u64,
            captured_maps: totals.maps(),
            captured_map_entries: totals.map_entries(),
            defer_sites,
        });
    }
    findings.sort_by(|a, b| b.est_bytes.cmp(&a.est_bytes).then(a.goid.cmp(&b.goid)));
    goroutines.sort_by(|a, b| b.pending_defers.cmp(&a.pending_defers).then(a.goid.cmp(&b.goid)));
    for goroutine in &mut goroutines {
        goroutine.defer_sites.sort_by(|a, b| b.pending.cmp(&a.pending).then(a.line.cmp(&b.line)));
    }
    let mut site_pcs: HashSet<u64> = pending_by_site.keys().copied().collect();
    if let Some(traced) = traced {
        site_pcs.extend(traced.sites.keys());
    }
    let mut sites: Vec<SiteReport> = site_pcs
        .into_iter()
        .map(|pc| {
            let location = locate(pc);
            let pending = pending_by_site.get(&pc).copied().unwrap_or(0);
            let (registered, released) =
                traced.and_then(|t| t.sites.get(&pc).copied()).unwrap_or((0, 0));
            SiteReport {
                pc: match pc {
                    0 => "unknown".to_owned(),
                    pc => format!("{:#x}", pc.wrapping_sub(lookups.bias)),
                },
                function: location.function,
                file: location.file,
                line: location.line,
                registered,
                pending_before_trace: pending.saturating_sub(registered.saturating_sub(released)),
                released,
                pending,
            }
        })
        .collect();
    sites.sort_by(|a, b| (b.pending, b.registered, &a.pc).cmp(&(a.pending, a.registered, &b.pc)));
    PendingSections {
        pending: PendingReport {
            heap_defers: records_total,
            goroutines: snapshot.goroutines.len() as u64,
            captured_maps: all.maps(),
        },
        findings,
        goroutines,
        sites,
        unknown_captures,
        unreadable_maps,
    }
}
