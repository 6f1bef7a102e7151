//! The pending sections of a report from the events alone ([`correlate`]): the fallback for
//! when the runtime's state can't be read.

use std::collections::{BTreeMap, HashMap};

use super::*;

/// What the event-only pending sections need from outside ([`correlate`]). Addresses are ELF
/// virtual addresses (load bias removed).
pub struct Lookups<'a> {
    /// PIE load bias: runtime address − ELF virtual address.
    pub bias: u64,
    /// Source location of a *return address* (the call before it).
    pub location: &'a dyn Fn(u64) -> Location,
    /// `bpf_ktime_get_ns()` now.
    pub now_ns: u64,
    /// Findings threshold (`--min-pending`).
    pub min_pending: u64,
    /// The Go module other than the executable (a plugin) holding a runtime address, if any.
    pub module_pc: &'a dyn Fn(u64) -> Option<crate::findings::ModulePc>,
}

/// The pending sections from the events alone, for when the runtime's state could not be
/// read: the records the probes saw registered and not released (corrected against the
/// goroutines' chains while tracing), per goroutine and frame. What their closures capture,
/// and so what they keep alive, is unknown (null).
pub fn correlate(aggregator: &Aggregator, lookups: &Lookups) -> PendingSections {
    let mut locations: HashMap<u64, Location> = HashMap::new();
    let mut locate = |pc: u64| {
        locations
            .entry(pc)
            .or_insert_with(|| match (lookups.module_pc)(pc) {
                Some(module) => module.location,
                None => (lookups.location)(pc.wrapping_sub(lookups.bias)),
            })
            .clone()
    };
    // Records adopted at these sites were registered while their code was not probed.
    let unprobed = |pc: u64| (lookups.module_pc)(pc).is_some_and(|m| m.unseen_were_unprobed);
    let mut findings = Vec::new();
    let mut goroutines = Vec::new();
    let mut unknown = 0;
    for (goid, records) in aggregator.pending_by_goroutine() {
        unknown += records.len() as u64;
        // Frames of this goroutine: records grouped by SP.
        let mut frames: HashMap<u64, Vec<&PendingDefer>> = HashMap::new();
        for record in records {
            frames.entry(record.caller_sp).or_default().push(record);
        }
        for frame in frames.values().filter(|frame| frame.len() as u64 >= lookups.min_pending) {
            // The frame's site: the defer statement with the most pending records.
            let mut per_site: HashMap<u64, u64> = HashMap::new();
            for record in frame {
                *per_site.entry(record.caller_pc).or_default() += 1;
            }
            let site_pc = per_site
                .iter()
                .max_by_key(|(pc, n)| (**n, std::cmp::Reverse(**pc)))
                .map_or(0, |(pc, _)| *pc);
            let location = locate(site_pc);
            let adopted = frame.iter().filter(|r| r.adopted).count() as u64;
            let adopted_unprobed =
                frame.iter().filter(|r| r.adopted && unprobed(r.caller_pc)).count() as u64;
            let oldest = frame.iter().map(|r| r.registered_ns).min().unwrap_or(lookups.now_ns);
            findings.push(Finding {
                kind: "defer_accumulation",
                goid,
                function: location.function,
                file: location.file,
                line: location.line,
                pending_defers: frame.len() as u64,
                pending_before_trace: adopted - adopted_unprobed,
                pending_registration_lost: 0,
                pending_unprobed: adopted_unprobed,
                // Adopted records' age is unknown.
                oldest_pending_secs: (adopted == 0)
                    .then(|| lookups.now_ns.saturating_sub(oldest) as f64 / 1e9),
                captures: Vec::new(),
                captured_maps: None,
                captured_maps_by_value: None,
                captured_maps_by_reference: None,
                captured_map_entries: None,
                est_bytes: None,
                captured_map_origins: Vec::new(),
            });
        }
        let defer_sites = aggregator
            .goroutine_sites(goid)
            .map(|(pc, totals)| {
                let location = locate(pc);
                let pending = records.iter().filter(|r| r.caller_pc == pc).count() as u64;
                GoroutineSiteReport {
                    function: location.function,
                    file: location.file,
                    line: location.line,
                    pending,
                    registered: Some(totals.registered),
                    pending_before_trace: if unprobed(pc) { 0 } else { totals.adopted },
                    pending_registration_lost: 0,
                    pending_unprobed: if unprobed(pc) { totals.adopted } else { 0 },
                    released: Some(totals.released),
                }
            })
            .collect::<Vec<_>>();
        goroutines.push(GoroutineReport {
            goid,
            pending_defers: records.len() as u64,
            captured_maps: None,
            captured_map_entries: None,
            est_bytes: None,
            defer_sites,
        });
    }
    findings.sort_by(|a, b| b.pending_defers.cmp(&a.pending_defers).then(a.goid.cmp(&b.goid)));
    goroutines.sort_by(|a, b| b.pending_defers.cmp(&a.pending_defers).then(a.goid.cmp(&b.goid)));
    for goroutine in &mut goroutines {
        goroutine
            .defer_sites
            .sort_by(|a, b| b.pending.cmp(&a.pending).then(b.registered.cmp(&a.registered)));
    }
    let mut sites: Vec<SiteReport> = aggregator
        .sites()
        .map(|(pc, totals)| {
            let location = locate(pc);
            let module = (lookups.module_pc)(pc);
            let unprobed = module.as_ref().is_some_and(|m| m.unseen_were_unprobed);
            SiteReport {
                pc: match &module {
                    Some(module) => format!("{:#x}", module.pc),
                    None => format!("{:#x}", pc.wrapping_sub(lookups.bias)),
                },
                module: module.map(|m| m.module),
                function: location.function,
                file: location.file,
                line: location.line,
                registered: Some(totals.registered),
                pending_before_trace: if unprobed { 0 } else { totals.adopted },
                pending_registration_lost: 0,
                pending_unprobed: if unprobed { totals.adopted } else { 0 },
                released: Some(totals.released),
                pending: totals.pending(),
                est_bytes: None,
                captures: Vec::new(),
            }
        })
        .collect();
    sites.sort_by(|a, b| (b.pending, b.registered, &a.pc).cmp(&(a.pending, a.registered, &b.pc)));
    PendingSections {
        pending: PendingReport {
            heap_defers: aggregator.pending_heap_defers(),
            goroutines: goroutines.len() as u64,
            captured_maps: None,
            before_trace: sites.iter().map(|site| site.pending_before_trace).sum(),
            registration_lost: 0,
            unprobed: sites.iter().map(|site| site.pending_unprobed).sum(),
        },
        findings,
        goroutines,
        sites,
        unknown_captures: match unknown {
            0 => BTreeMap::new(),
            n => BTreeMap::from([("the runtime's state could not be read", n)]),
        },
        unreadable_maps: 0,
    }
}
