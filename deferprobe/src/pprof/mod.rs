//! `--pprof FILE`: the pending heap defers of a [`Snapshot`] as a pprof profile (a gzipped
//! `profile.proto`, [`proto`]) that `go tool pprof` opens, so `-top`, `-tree` and the web UI
//! show which call paths hold pending defers and what they keep alive.
//!
//! - Sample types: `pending_defers/count` (exact: records in the runtime's `_defer` chains),
//!   `retained_space/bytes` (an estimate, as the report's `est_bytes`: the `_defer` records,
//!   the closures and what their captures reach, each object counted once, in the first sample
//!   that reaches it), and under `run` `registered/count` (heap defer registrations the probes
//!   saw while traced, per defer site).
//! - A sample's stack: the defer site as the leaf, then the goroutine's call stack from the
//!   frame owning the records out ([`crate::state::stacks`]); the label `stack` says how it
//!   was read, or why it is the defer site only.
//! - Labels: `goroutine` (its id), `capture_kind` and `captured_type` (one value per captured
//!   variable), `stack`.
//!
//! Pure: the profile from the snapshot and lookups; the session writes it (through
//! [`crate::output::OutputFile`]).

mod proto;

pub use proto::Profile;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use crate::{
    binary::GoBinary,
    findings,
    report::Location,
    state::{Captures, GoroutineStack, PendingGoroutine, PendingRecord, Snapshot, StackEnd},
};
use proto::Strings;

/// What a profile is built from besides the snapshot.
pub struct ProfileSource<'a> {
    pub snapshot: &'a Snapshot,
    /// `sizeof(runtime._defer)`.
    pub defer_record_bytes: u64,
    /// Function, file and line of the call before a return address (a runtime address).
    pub locate: &'a dyn Fn(u64) -> Location,
    /// The executable (or Go module) as the target maps it, and its runtime address range.
    pub module: &'a str,
    pub module_range: (u64, u64),
    /// Under `run`: heap defer registrations seen while traced, per site (runtime return
    /// address).
    pub registered: Option<&'a BTreeMap<u64, u64>>,
    /// Wall-clock ns since the epoch when the snapshot was taken, and what the profile covers
    /// (the trace, or the snapshot's read).
    pub time_nanos: i64,
    pub duration_nanos: i64,
    /// Notes for the profile's comments (the report's, say).
    pub notes: &'a [String],
}

/// Label `stack` for samples whose stack is the goroutine's.
pub const STACK_WALKED: &str = "goroutine stack from frame pointers";

/// One sample's identity: who holds it, along which stack, capturing what.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct SampleKey {
    goid: Option<u64>,
    /// Runtime pcs, leaf (the defer site) first.
    stack: Vec<u64>,
    /// (kind, type) of each captured variable.
    captures: Vec<(String, String)>,
    how: String,
}

/// The profile of `source`.
pub fn build(source: &ProfileSource<'_>) -> Profile {
    let mut builder = Builder::new(source);
    let mut values: BTreeMap<SampleKey, Vec<i64>> = BTreeMap::new();
    let width = if source.registered.is_some() { 3 } else { 2 };
    let mut seen_objects = HashSet::new();
    for goroutine in &source.snapshot.goroutines {
        for record in &goroutine.records {
            let (stack, how) = builder.stack_of(goroutine, record);
            let key = SampleKey {
                goid: Some(goroutine.header.goid),
                stack,
                captures: captures_of(record),
                how,
            };
            let bytes = record_bytes(record, source.defer_record_bytes, &mut seen_objects);
            let value = values.entry(key).or_insert_with(|| vec![0; width]);
            value[0] += 1;
            value[1] += bytes as i64;
        }
    }
    for (&site, &registered) in source.registered.into_iter().flatten() {
        if registered == 0 {
            continue;
        }
        let key = SampleKey {
            goid: None,
            stack: vec![site],
            captures: Vec::new(),
            how: "defer site only: registrations are counted by site, with no stack".into(),
        };
        values.entry(key).or_insert_with(|| vec![0; width])[2] += registered as i64;
    }
    let samples = values.into_iter().map(|(key, value)| builder.sample(&key, value)).collect();
    builder.finish(samples)
}

/// The gzipped profile of `source`.
pub fn encode(source: &ProfileSource<'_>) -> Vec<u8> {
    build(source).to_gzipped_bytes().expect("gzip into memory cannot fail")
}

/// The runtime address range of `binary`'s image, loaded with `bias`.
pub fn module_range(binary: &GoBinary, bias: u64) -> (u64, u64) {
    let (start, end) = binary.image_range();
    (start.wrapping_add(bias), end.wrapping_add(bias))
}

/// Wall-clock ns since the epoch (a profile's `time_nanos`).
pub fn now_nanos() -> i64 {
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    since.map_or(0, |since| since.as_nanos() as i64)
}

/// (kind, type) of each variable the record's closure captured, sorted.
fn captures_of(record: &PendingRecord) -> Vec<(String, String)> {
    let mut captures: Vec<(String, String)> = match &record.captures {
        Captures::Values(values) => {
            values.iter().map(|v| (v.kind.to_owned(), v.type_name.clone())).collect()
        }
        Captures::Nothing => vec![("none".into(), "none".into())],
        Captures::Unknown(_) => vec![("unknown".into(), "unknown".into())],
    };
    captures.sort();
    captures
}

/// Estimated bytes a record keeps alive that no record before it did: its `_defer` record,
/// its closure, and the objects its captures reach first.
fn record_bytes(record: &PendingRecord, defer_bytes: u64, seen: &mut HashSet<u64>) -> u64 {
    let objects: u64 = match &record.captures {
        Captures::Values(values) => values
            .iter()
            .filter_map(|v| findings::object_of(&v.value))
            .filter(|&(object, _)| seen.insert(object))
            .map(|(_, bytes)| bytes)
            .sum(),
        _ => 0,
    };
    defer_bytes + record.closure_bytes + objects
}

/// Locations, functions and strings, each once.
struct Builder<'s> {
    source: &'s ProfileSource<'s>,
    strings: Strings,
    /// Each pc's location as named (runtime pc → source).
    names: HashMap<u64, Location>,
    /// Runtime pc → location id, for the pcs samples use.
    locations: BTreeMap<u64, u64>,
    functions: HashMap<(String, String), u64>,
    function_list: Vec<proto::Function>,
}

impl<'s> Builder<'s> {
    fn new(source: &'s ProfileSource<'s>) -> Self {
        Builder {
            source,
            strings: Strings::default(),
            names: HashMap::new(),
            locations: BTreeMap::new(),
            functions: HashMap::new(),
            function_list: Vec::new(),
        }
    }

    fn location(&mut self, pc: u64) -> u64 {
        let next = self.locations.len() as u64 + 1;
        *self.locations.entry(pc).or_insert(next)
    }

    fn named(&mut self, pc: u64) -> &Location {
        let locate = self.source.locate;
        self.names.entry(pc).or_insert_with(|| locate(pc))
    }

    /// The record's stack, leaf first, and how it was read.
    fn stack_of(
        &mut self,
        goroutine: &PendingGoroutine,
        record: &PendingRecord,
    ) -> (Vec<u64>, String) {
        let site = record.site;
        let site_only = |why: &str| (vec![site], format!("defer site only: {why}"));
        let walked = match &goroutine.stack {
            None => return site_only("the goroutine's stack was not read"),
            Some(GoroutineStack::Unwalked(why)) => return site_only(why.describe()),
            Some(stack @ GoroutineStack::Walked { end, .. }) => (stack, *end),
        };
        let (stack, end) = walked;
        let Some(frames) = stack.from_frame(record.record.sp) else {
            return site_only("no frame of the goroutine's stack owns the record");
        };
        let mut pcs = vec![site];
        // The owning frame is where the defer statement is, unless the statement is in a
        // range-over-func loop body (a closure of its own): then both are on the path.
        let (owner, callers) = frames.split_first().expect("from_frame is never empty");
        let site_function = self.named(site).function.clone();
        if site_function != self.named(owner.pc).function {
            pcs.push(owner.pc);
        }
        pcs.extend(callers.iter().map(|frame| frame.pc));
        let how = match end {
            StackEnd::Complete => STACK_WALKED.to_owned(),
            StackEnd::Truncated => {
                format!("{STACK_WALKED}, cut at {} frames", crate::state::stacks::MAX_FRAMES)
            }
            StackEnd::Broken => {
                format!("{STACK_WALKED}, up to a frame pointer that did not check out")
            }
        };
        (pcs, how)
    }

    fn sample(&mut self, key: &SampleKey, value: Vec<i64>) -> proto::Sample {
        let location_id = key.stack.iter().map(|&pc| self.location(pc)).collect();
        let mut label = Vec::new();
        let mut add = |strings: &mut Strings, key: &str, value: &str| {
            label.push(proto::Label {
                key: strings.add(key),
                str: strings.add(value),
                ..Default::default()
            });
        };
        if let Some(goid) = key.goid {
            add(&mut self.strings, "goroutine", &goid.to_string());
        }
        let kinds: BTreeSet<&str> = key.captures.iter().map(|(kind, _)| kind.as_str()).collect();
        let types: BTreeSet<&str> = key.captures.iter().map(|(_, t)| t.as_str()).collect();
        for kind in kinds {
            add(&mut self.strings, "capture_kind", kind);
        }
        for type_name in types {
            add(&mut self.strings, "captured_type", type_name);
        }
        add(&mut self.strings, "stack", &key.how);
        proto::Sample { location_id, value, label }
    }

    fn finish(mut self, sample: Vec<proto::Sample>) -> Profile {
        let source = self.source;
        let mut sample_type = vec![
            self.value_type("pending_defers", "count"),
            self.value_type("retained_space", "bytes"),
        ];
        if source.registered.is_some() {
            sample_type.push(self.value_type("registered", "count"));
        }
        let (start, limit) = source.module_range;
        let mapping = proto::Mapping {
            id: 1,
            memory_start: start,
            memory_limit: limit,
            filename: self.strings.add(source.module),
            has_functions: true,
            has_filenames: true,
            has_line_numbers: true,
            has_inline_frames: false,
            ..Default::default()
        };
        let locations: Vec<(u64, u64)> = std::mem::take(&mut self.locations).into_iter().collect();
        let mut location: Vec<proto::Location> = locations
            .into_iter()
            .map(|(pc, id)| {
                let named = self.named(pc).clone();
                proto::Location {
                    id,
                    mapping_id: if (start..limit).contains(&pc) { 1 } else { 0 },
                    address: pc,
                    line: self.lines(&named),
                    is_folded: false,
                }
            })
            .collect();
        location.sort_by_key(|location| location.id);
        let mut notes = vec![
            "deferprobe: heap defer records pending in the target's runtime (its _defer chains)"
                .to_owned(),
            "pending_defers/count is exact; retained_space/bytes is an estimate: the _defer \
             records, the closures, map slots at Go's load factor, slice capacities, string \
             bytes and one pointee per pointer, each object counted once (in the first sample \
             that reaches it); data those reach in turn is not included"
                .to_owned(),
            "a sample's stack is its defer site (the leaf) and the goroutine's call stack from \
             the frame holding the records, read from frame pointers; label stack says how it \
             was read, or why it is the defer site only"
                .to_owned(),
        ];
        if source.registered.is_some() {
            notes.push(
                "registered/count: heap defer registrations the probes saw while traced, per \
                 defer site (their stacks are the defer site only)"
                    .to_owned(),
            );
        }
        notes.extend(source.notes.iter().cloned());
        let comment = notes.iter().map(|note| self.strings.add(note)).collect();
        let period_type = Some(self.value_type("pending_defers", "count"));
        let default_sample_type = self.strings.add("pending_defers");
        Profile {
            sample_type,
            sample,
            mapping: vec![mapping],
            location,
            function: std::mem::take(&mut self.function_list),
            time_nanos: source.time_nanos,
            duration_nanos: source.duration_nanos,
            period_type,
            period: 1,
            comment,
            default_sample_type,
            string_table: self.strings.into_table(),
            ..Default::default()
        }
    }

    fn value_type(&mut self, r#type: &str, unit: &str) -> proto::ValueType {
        proto::ValueType { r#type: self.strings.add(r#type), unit: self.strings.add(unit) }
    }

    /// The location's line (none when the pc is outside the Go code the binary names).
    fn lines(&mut self, named: &Location) -> Vec<proto::Line> {
        let Some(function) = &named.function else { return Vec::new() };
        let file = named.file.clone().unwrap_or_default();
        let next = self.function_list.len() as u64 + 1;
        let id = *self.functions.entry((function.clone(), file.clone())).or_insert(next);
        if id == next {
            let name = self.strings.add(function);
            self.function_list.push(proto::Function {
                id,
                name,
                system_name: name,
                filename: self.strings.add(&file),
                start_line: 0,
            });
        }
        vec![proto::Line { function_id: id, line: named.line.map_or(0, i64::from), column: 0 }]
    }
}
