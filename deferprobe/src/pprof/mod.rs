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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{
        CapturedValue, DeferRecord, Frame, GoroutineHeader, PendingGoroutine, Unwalked, Value,
    };

    /// Functions of the test's pcs: (pc, function, line).
    const CODE: [(u64, &str, u32); 7] = [
        (0x40_1105, "runtime.gopark", 400),
        (0x40_2005, "main.accumulate", 30),
        (0x40_2105, "main.accumulate", 35),
        (0x40_3105, "main.ingest", 50),
        (0x40_4005, "main.hold-range1", 70),
        (0x40_5105, "main.hold", 66),
        (0x40_0001, "runtime.goexit", 1700),
    ];

    fn locate(pc: u64) -> Location {
        match CODE.iter().find(|(at, _, _)| *at == pc) {
            Some((_, function, line)) => Location {
                function: Some((*function).to_owned()),
                file: Some("/src/main.go".into()),
                line: Some(*line),
            },
            None => Location::default(),
        }
    }

    fn map(map: u64, entries: u64) -> CapturedValue {
        CapturedValue {
            name: "X0".into(),
            kind: "map",
            type_name: "map[string]int".into(),
            value: Value::Map { map, by_reference: false, entries: Some(entries), slot_bytes: 24 },
        }
    }

    fn record(sp: u64, site: u64, captures: Captures) -> PendingRecord {
        PendingRecord {
            record: DeferRecord {
                address: 0,
                closure: 0,
                sp,
                pc: site,
                heap: true,
                in_range_loop: false,
            },
            site,
            code: Some(0x40_6000),
            closure_bytes: 16,
            captures,
        }
    }

    fn goroutine(
        goid: u64,
        records: Vec<PendingRecord>,
        stack: GoroutineStack,
    ) -> PendingGoroutine {
        let header = GoroutineHeader { goid, status: 4, ..GoroutineHeader::default() };
        PendingGoroutine { header, records, stack: Some(stack) }
    }

    fn walked(frames: &[(u64, u64)]) -> GoroutineStack {
        let frames = frames.iter().map(|&(pc, sp)| Frame { pc, sp }).collect();
        GoroutineStack::Walked { frames, end: StackEnd::Complete }
    }

    /// A profile of `snapshot` from the test's binary, `/srv/app` at 0x400000.
    fn source_of<'a>(
        snapshot: &'a Snapshot,
        registered: Option<&'a BTreeMap<u64, u64>>,
        notes: &'a [String],
    ) -> ProfileSource<'a> {
        ProfileSource {
            snapshot,
            defer_record_bytes: 48,
            locate: &locate,
            module: "/srv/app",
            module_range: (0x40_0000, 0x50_0000),
            registered,
            time_nanos: 1,
            duration_nanos: 2,
            notes,
        }
    }

    /// A decoded sample: its stack as `function:line`, leaf first; its values; its labels.
    type Decoded = (Vec<String>, Vec<i64>, Vec<(String, String)>);

    fn samples(profile: &Profile) -> Vec<Decoded> {
        let function = |id: u64| {
            let location = profile.location.iter().find(|l| l.id == id).unwrap();
            location.line.first().map_or("?".to_owned(), |line| {
                let f = profile.function.iter().find(|f| f.id == line.function_id).unwrap();
                format!("{}:{}", profile.string(f.name), line.line)
            })
        };
        profile
            .sample
            .iter()
            .map(|s| {
                let stack = s.location_id.iter().map(|&id| function(id)).collect();
                let labels = s
                    .label
                    .iter()
                    .map(|l| (profile.string(l.key).to_owned(), profile.string(l.str).to_owned()))
                    .collect();
                (stack, s.value.clone(), labels)
            })
            .collect()
    }

    fn label<'a>(labels: &'a [(String, String)], key: &str) -> Vec<&'a str> {
        labels.iter().filter(|(k, _)| k == key).map(|(_, v)| v.as_str()).collect()
    }

    /// A profile decodes back (prost) to exactly what was pending: stacks from the frame
    /// owning the records, leaf the defer site; shared objects' bytes counted once; goroutines
    /// whose stack is unknown get the defer site alone, labelled why; registrations per site.
    #[test]
    fn decodes_back_to_the_snapshot_with_stacks_labels_and_registrations() {
        let caller_chain = [(0x40_1105, 0x100), (0x40_2105, 0x200), (0x40_3105, 0x300)];
        let goexit = (0x40_0001, 0x400);
        let snapshot = Snapshot {
            goroutines: vec![
                goroutine(
                    7,
                    vec![
                        record(0x200, 0x40_2005, Captures::Values(vec![map(0xa, 3)])),
                        record(0x200, 0x40_2005, Captures::Values(vec![map(0xb, 5)])),
                    ],
                    walked(&[caller_chain[0], caller_chain[1], caller_chain[2], goexit]),
                ),
                goroutine(
                    8,
                    vec![record(0x200, 0x40_2005, Captures::Values(vec![map(0xa, 3)]))],
                    GoroutineStack::Unwalked(Unwalked::Running),
                ),
                goroutine(
                    9,
                    vec![record(0x500, 0x40_4005, Captures::Nothing)],
                    walked(&[(0x40_1105, 0x100), (0x40_5105, 0x500), goexit]),
                ),
            ],
            ..Snapshot::default()
        };
        let registered = BTreeMap::from([(0x40_2005, 5), (0x40_4005, 0)]);
        let notes = vec!["a note of the report".to_owned()];
        let source = source_of(&snapshot, Some(&registered), &notes);
        let profile = Profile::from_gzipped_bytes(&encode(&source)).unwrap();
        assert_eq!(profile, build(&source), "what was written decodes back the same");

        let types: Vec<String> = profile
            .sample_type
            .iter()
            .map(|t| format!("{}/{}", profile.string(t.r#type), profile.string(t.unit)))
            .collect();
        assert_eq!(types, ["pending_defers/count", "retained_space/bytes", "registered/count"]);
        assert_eq!(profile.string(profile.default_sample_type), "pending_defers");
        let comments: Vec<&str> = profile.comment.iter().map(|&c| profile.string(c)).collect();
        assert!(comments.iter().any(|c| c.contains("retained_space/bytes is an estimate")));
        assert!(comments.contains(&"a note of the report"));
        assert_eq!(profile.mapping.len(), 1);
        assert_eq!(profile.string(profile.mapping[0].filename), "/srv/app");

        let samples = samples(&profile);
        let find = |goid: &str| {
            samples
                .iter()
                .find(|(_, _, labels)| label(labels, "goroutine") == [goid])
                .unwrap_or_else(|| panic!("no sample of goroutine {goid}: {samples:?}"))
        };
        let map_a = findings::map_bytes_estimate(3, 24);
        let map_b = findings::map_bytes_estimate(5, 24);
        // Goroutine 7: gopark and the owner's own frame give way to the defer site.
        let (stack, values, labels) = find("7");
        assert_eq!(stack, &["main.accumulate:30", "main.ingest:50", "runtime.goexit:1700"]);
        assert_eq!(values, &[2, 2 * (48 + 16) as i64 + (map_a + map_b) as i64, 0]);
        assert_eq!(label(labels, "capture_kind"), ["map"]);
        assert_eq!(label(labels, "captured_type"), ["map[string]int"]);
        assert_eq!(label(labels, "stack"), [STACK_WALKED]);
        // Goroutine 8 runs: the defer site only, and map 0xa already counted by 7.
        let (stack, values, labels) = find("8");
        assert_eq!(stack, &["main.accumulate:30"]);
        assert_eq!(values, &[1, 48 + 16, 0]);
        assert_eq!(
            label(labels, "stack"),
            ["defer site only: goroutine running: its saved stack is stale"]
        );
        // Goroutine 9: a range-over-func body's site, then the frame whose loop it is.
        let (stack, values, labels) = find("9");
        assert_eq!(stack, &["main.hold-range1:70", "main.hold:66", "runtime.goexit:1700"]);
        assert_eq!(values, &[1, 48 + 16, 0]);
        assert_eq!(label(labels, "capture_kind"), ["none"]);
        // Registrations: per site, no stack, none for a site that registered nothing.
        let registrations: Vec<_> = samples.iter().filter(|(_, v, _)| v[2] > 0).collect();
        assert_eq!(registrations.len(), 1);
        assert_eq!(registrations[0].0, ["main.accumulate:30"]);
        assert_eq!(registrations[0].1, [0, 0, 5]);
        assert!(label(&registrations[0].2, "goroutine").is_empty());
        let total: i64 = profile.sample.iter().map(|s| s.value[0]).sum();
        assert_eq!(total, 4);
    }

    /// A record no walked frame owns (its frame was not found on the stack) keeps the defer
    /// site alone, and says so; `snapshot` profiles have two sample types.
    #[test]
    fn a_record_without_an_owning_frame_is_the_defer_site_only() {
        let snapshot = Snapshot {
            goroutines: vec![goroutine(
                7,
                vec![record(0x900, 0x40_2005, Captures::Unknown("why"))],
                walked(&[(0x40_1105, 0x100), (0x40_2105, 0x200)]),
            )],
            ..Snapshot::default()
        };
        let source = source_of(&snapshot, None, &[]);
        let profile = build(&source);
        assert_eq!(profile.sample_type.len(), 2);
        let samples = samples(&profile);
        let (stack, values, labels) = &samples[0];
        assert_eq!(stack, &["main.accumulate:30"]);
        assert_eq!(values, &[1, 48 + 16]);
        assert_eq!(
            label(labels, "stack"),
            ["defer site only: no frame of the goroutine's stack owns the record"]
        );
        assert_eq!(label(labels, "capture_kind"), ["unknown"]);
    }
}
