//! What a pending deferred closure holds, read from the target with the closure's struct type
//! from the binary ([`crate::binary::ClosureTypes`]): each captured variable's value, and for
//! maps, slices and strings what they reach (element counts, lengths, capacities).
//!
//! A map pointer is only believed after its header checks out for the release's map layout:
//! - Go ≤ 1.23 (and 1.24+ built with `noswissmap`), `hmap`: count @0, B @9, buckets @16,
//!   oldbuckets @24, nevacuate @32. B ≤ 56, count ≤ 13 · 2^B / 2 + 8 (the load factor the
//!   runtime grows at, with one growth step of slack), buckets set once count > 0, and
//!   nevacuate ≤ 2^B.
//! - Go 1.24+, swiss `maps.Map`: used @0, dirPtr @16, dirLen @24, globalDepth @32,
//!   globalShift @33. A small map (dirLen 0) has dirPtr set once used > 0 and used ≤ 8;
//!   otherwise dirLen = 2^globalDepth and globalShift = 64 − globalDepth.
//!
//! A value that fails its check is reported as unreadable, never as a count.

use serde::Serialize;

use super::memory::Memory;
use crate::binary::{
    ClosureLayout,
    gotypes::{GoType, TypeKind, TypeReader},
};

/// Which map header the target's runtime uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MapLayout {
    /// `runtime.hmap` (Go ≤ 1.23, or `GOEXPERIMENT=noswissmap`).
    Hmap,
    /// `internal/runtime/maps.Map` (Go 1.24+).
    Swiss,
}

impl MapLayout {
    pub fn for_release(minor: u32, experiments: &[String]) -> MapLayout {
        match minor >= 24 && !experiments.iter().any(|e| e == "noswissmap") {
            true => MapLayout::Swiss,
            false => MapLayout::Hmap,
        }
    }

    /// The element count of the map at `map`, if its header is a plausible live map.
    pub fn entries(self, memory: &impl Memory, map: u64) -> Option<u64> {
        let mut header = [0u8; 40];
        if !memory.read(map, &mut header) {
            return None;
        }
        let word = |at: usize| u64::from_le_bytes(header[at..at + 8].try_into().unwrap());
        let count = word(0);
        match self {
            MapLayout::Hmap => {
                let b = u32::from(header[9]);
                let (buckets, nevacuate) = (word(16), word(32));
                let plausible = b <= 56
                    && count <= (13u64 << b) / 2 + 8
                    && (count == 0 || buckets != 0)
                    && nevacuate <= 1u64 << b;
                plausible.then_some(count)
            }
            MapLayout::Swiss => {
                let (dir_ptr, dir_len) = (word(16), word(24));
                let (depth, shift) = (u32::from(header[32]), u32::from(header[33]));
                let plausible = match dir_len {
                    0 => count <= 8 && (count == 0 || dir_ptr != 0),
                    len => {
                        depth < 64 && len == 1u64 << depth && shift == 64 - depth && dir_ptr != 0
                    }
                };
                plausible.then_some(count)
            }
        }
    }
}

/// How a closure field holds what it captured, from the field's type: `map`,
/// `map_by_reference` (a `*map[K]V`: the closure assigns the variable), `slice`, `string`,
/// `file` (`*os.File`), `pointer` (any other pointer), `value` (held in the closure itself).
pub fn capture_kind(types: &TypeReader<'_>, typ: &GoType) -> &'static str {
    match typ.kind {
        TypeKind::Map => "map",
        TypeKind::Slice => "slice",
        TypeKind::String => "string",
        TypeKind::Pointer => match typ.elem.and_then(|elem| types.get(elem)) {
            Some(elem) if elem.kind == TypeKind::Map => "map_by_reference",
            Some(elem) if elem.kind == TypeKind::Slice => "slice",
            Some(elem) if elem.kind == TypeKind::String => "string",
            Some(elem) if elem.name == "os.File" => "file",
            _ => "pointer",
        },
        _ => "value",
    }
}

/// One captured variable of a pending closure.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CapturedValue {
    /// The closure struct field's name (`m`, `X0`).
    pub name: String,
    /// [`capture_kind`] of its type.
    pub kind: &'static str,
    /// The field's type as the binary names it: the variable's type when captured by value,
    /// a pointer to it when captured by reference.
    pub type_name: String,
    pub value: Value,
}

/// What a captured word holds, by kind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Value {
    /// A map, captured by value (`map[K]V` field) or by reference (`*map[K]V`). `entries` is
    /// None when the header could not be read or did not check out.
    Map { map: u64, by_reference: bool, entries: Option<u64>, slot_bytes: u64 },
    /// A slice (or `*[]T`): None fields when unreadable or inconsistent (len > cap).
    Slice { data: u64, by_reference: bool, len: Option<u64>, cap: Option<u64>, elem_bytes: u64 },
    /// A string (or `*string`).
    String { data: u64, by_reference: bool, len: Option<u64> },
    /// Any other pointer: `*os.File`, `*main.session`, `**T` (a pointer variable captured by
    /// reference). `target_bytes` is the pointee type's size.
    Pointer { target: u64, target_type: String, target_bytes: u64 },
    /// Scalars, funcs, channels, interfaces, structs and arrays held in the closure itself.
    Inline { kind: TypeKind, bytes: u64 },
}

/// Reads the captured variables of the closure object at `closure` (runtime address) laid
/// out as `layout`. None if the object can't be read.
pub fn read_captures(
    memory: &impl Memory,
    types: &TypeReader<'_>,
    layout: &ClosureLayout,
    closure: u64,
    maps: MapLayout,
) -> Option<Vec<CapturedValue>> {
    let mut object = vec![0u8; layout.size as usize];
    if !memory.read(closure, &mut object) {
        return None;
    }
    let word = |at: u64| -> Option<u64> {
        let at = usize::try_from(at).ok()?;
        Some(u64::from_le_bytes(object.get(at..at + 8)?.try_into().ok()?))
    };
    let mut values = Vec::new();
    for field in &layout.captures {
        let typ = &field.typ;
        let value = match typ.kind {
            TypeKind::Map => {
                let map = word(field.offset)?;
                map_value(memory, types, typ, map, false, maps)
            }
            TypeKind::Slice => {
                let (data, len, cap) =
                    (word(field.offset)?, word(field.offset + 8), word(field.offset + 16));
                slice_value(types, typ, data, len, cap, false)
            }
            TypeKind::String => Value::String {
                data: word(field.offset)?,
                by_reference: false,
                len: word(field.offset + 8),
            },
            TypeKind::Pointer => {
                let target = word(field.offset)?;
                pointer_value(memory, types, typ, target, maps)
            }
            kind => Value::Inline { kind, bytes: typ.size },
        };
        values.push(CapturedValue {
            name: field.name.clone(),
            kind: capture_kind(types, typ),
            type_name: typ.name.clone(),
            value,
        });
    }
    Some(values)
}

fn map_value(
    memory: &impl Memory,
    types: &TypeReader<'_>,
    typ: &GoType,
    map: u64,
    by_reference: bool,
    maps: MapLayout,
) -> Value {
    let size = |t: Option<u64>| t.and_then(|t| types.get(t)).map_or(0, |t| t.size);
    Value::Map {
        map,
        by_reference,
        entries: match map {
            0 => Some(0), // a nil map
            map => maps.entries(memory, map),
        },
        slot_bytes: size(typ.key) + size(typ.elem),
    }
}

fn slice_value(
    types: &TypeReader<'_>,
    typ: &GoType,
    data: u64,
    len: Option<u64>,
    cap: Option<u64>,
    by_reference: bool,
) -> Value {
    let consistent = matches!((len, cap), (Some(len), Some(cap)) if len <= cap);
    Value::Slice {
        data,
        by_reference,
        len: len.filter(|_| consistent),
        cap: cap.filter(|_| consistent),
        elem_bytes: typ.elem.and_then(|t| types.get(t)).map_or(0, |t| t.size),
    }
}

/// A pointer field: to a map, slice or string variable (captured by reference), or to
/// anything else.
fn pointer_value(
    memory: &impl Memory,
    types: &TypeReader<'_>,
    typ: &GoType,
    target: u64,
    maps: MapLayout,
) -> Value {
    let Some(elem) = typ.elem.and_then(|t| types.get(t)) else {
        return Value::Pointer { target, target_type: "?".into(), target_bytes: 0 };
    };
    let at = |offset: u64| match target {
        0 => None,
        target => memory.read_u64(target + offset),
    };
    match elem.kind {
        TypeKind::Map => match at(0) {
            Some(map) => map_value(memory, types, &elem, map, true, maps),
            None => Value::Map { map: 0, by_reference: true, entries: None, slot_bytes: 0 },
        },
        TypeKind::Slice => {
            let data = at(0).unwrap_or(0);
            slice_value(types, &elem, data, at(8), at(16), true)
        }
        TypeKind::String => {
            Value::String { data: at(0).unwrap_or(0), by_reference: true, len: at(8) }
        }
        _ => Value::Pointer { target, target_type: elem.name, target_bytes: elem.size },
    }
}
