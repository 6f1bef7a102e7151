//! Go type descriptors (`abi.Type`, `runtime._type` before 1.21) read from the executable's own
//! read-only data, which stripping keeps: kind, size, the name the binary carries
//! (`map[string]int`, `*os.File`, `struct { F uintptr; X0 map[string]int }`), and what a type
//! is made of (map key and element, pointer target, slice element, struct fields).
//!
//! Layout, the same on linux/amd64 from Go 1.19 to 1.27: Size_ @0, PtrBytes @8, Hash @16,
//! TFlag @20, Kind_ @23 (low 5 bits), Str @40 (a name offset from the module's `types` base);
//! then, by kind, MapType Key @48 / Elem @56, PtrType, SliceType, ChanType and ArrayType Elem
//! @48 (ArrayType Len @64), StructType PkgPath @48 and Fields @56 (`[]structField`, each
//! `{Name, Typ, Offset}`, 24 bytes). A name is one flags byte, a varint length and the bytes.
//! The `types` base comes from `runtime.firstmoduledata`, found as the word that points to
//! `.gopclntab` (its first field, `pcHeader`).

use std::{collections::HashMap, sync::Mutex};

use serde::Serialize;

use super::GoBinary;

/// `abi.Kind` values deferprobe tells apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TypeKind {
    Bool,
    Int,
    Uint,
    Float,
    Complex,
    Uintptr,
    Array,
    Chan,
    Func,
    Interface,
    Map,
    Pointer,
    Slice,
    String,
    Struct,
    UnsafePointer,
}

impl TypeKind {
    fn from_abi(kind: u8) -> Option<TypeKind> {
        Some(match kind & 0x1f {
            1 => TypeKind::Bool,
            2..=6 => TypeKind::Int,
            7..=11 => TypeKind::Uint,
            12 => TypeKind::Uintptr,
            13 | 14 => TypeKind::Float,
            15 | 16 => TypeKind::Complex,
            17 => TypeKind::Array,
            18 => TypeKind::Chan,
            19 => TypeKind::Func,
            20 => TypeKind::Interface,
            21 => TypeKind::Map,
            22 => TypeKind::Pointer,
            23 => TypeKind::Slice,
            24 => TypeKind::String,
            25 => TypeKind::Struct,
            26 => TypeKind::UnsafePointer,
            _ => return None,
        })
    }
}

/// One type descriptor, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GoType {
    /// ELF virtual address of the descriptor.
    pub address: u64,
    pub size: u64,
    pub kind: TypeKind,
    /// As the binary spells it; "?" if the name can't be read.
    pub name: String,
    /// Map key and element, pointer / slice / chan / array element (addresses of their
    /// descriptors; `key` only for maps).
    pub elem: Option<u64>,
    pub key: Option<u64>,
    /// Array length.
    pub len: Option<u64>,
    /// Struct fields.
    pub fields: Vec<StructField>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StructField {
    pub name: String,
    pub offset: u64,
    /// Address of the field's type descriptor.
    pub typ: u64,
}

/// Most struct fields decoded from one descriptor (a bound against corrupt data; closures
/// capture a handful).
const MAX_FIELDS: u64 = 4096;

/// `tflag` bit: the name in `Str` has a leading `*` that is not part of this type's name.
const TFLAG_EXTRA_STAR: u8 = 1 << 1;

/// Where the module's type descriptors live, from `runtime.firstmoduledata`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TypesRange {
    pub types: u64,
    pub etypes: u64,
}

impl TypesRange {
    pub fn contains(&self, address: u64) -> bool {
        (self.types..self.etypes).contains(&address)
    }
}

/// Offset of `moduledata.types`: Go 1.20 added `covctrs`/`ecovctrs` before it. `etypes`
/// follows within the next two words (1.26 put a length between them).
fn types_field_offset(minor: u32) -> u64 {
    if minor >= 20 { 296 } else { 280 }
}

/// Finds `moduledata.types`/`etypes`: `runtime.firstmoduledata` is the word-aligned word of the
/// initialised data that points to `.gopclntab` and whose `text` (at 176) is `minpc` (at 160).
pub(super) fn types_range(binary: &GoBinary, pclntab: u64) -> Option<TypesRange> {
    let (start, end) = binary.image_range();
    for segment in binary.writable_segments() {
        let bytes = binary.bytes_at(segment.0, segment.1 as usize)?;
        let (words, _) = bytes.as_chunks::<8>();
        for (index, word) in words.iter().enumerate() {
            if u64::from_le_bytes(*word) != pclntab {
                continue;
            }
            let at = segment.0 + index as u64 * 8;
            let read = |offset: u64| binary.read_u64(at + offset);
            if read(160).is_none() || read(160) != read(176) {
                continue;
            }
            let offset = types_field_offset(binary.build_info().release.minor);
            let types = read(offset)?;
            if !(start..end).contains(&types) {
                continue;
            }
            let etypes = [8, 16]
                .into_iter()
                .filter_map(|delta| read(offset + delta))
                .find(|&etypes| etypes > types && etypes <= end)?;
            return Some(TypesRange { types, etypes });
        }
    }
    None
}

/// Decodes type descriptors of one binary, each once.
pub struct TypeReader<'b> {
    binary: &'b GoBinary,
    range: Option<TypesRange>,
    cache: Mutex<HashMap<u64, Option<GoType>>>,
}

impl<'b> TypeReader<'b> {
    pub(super) fn new(binary: &'b GoBinary, range: Option<TypesRange>) -> Self {
        TypeReader { binary, range, cache: Mutex::default() }
    }

    /// Whether `address` can be a type descriptor of this module.
    pub fn is_type_address(&self, address: u64) -> bool {
        self.range.is_some_and(|range| range.contains(address))
    }

    pub fn range(&self) -> Option<TypesRange> {
        self.range
    }

    /// The descriptor at `address`, or None if it is not one.
    pub fn get(&self, address: u64) -> Option<GoType> {
        if !self.is_type_address(address) {
            return None;
        }
        let mut cache = self.cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        cache.entry(address).or_insert_with(|| self.decode(address)).clone()
    }

    /// The type's name, or "?".
    pub fn name(&self, address: u64) -> String {
        self.get(address).map_or_else(|| "?".to_owned(), |t| t.name)
    }

    fn decode(&self, address: u64) -> Option<GoType> {
        let binary = self.binary;
        let header = binary.bytes_at(address, 48)?;
        let word = |at: usize| u64::from_le_bytes(header[at..at + 8].try_into().unwrap());
        let size = word(0);
        let tflag = header[20];
        let kind = TypeKind::from_abi(header[23])?;
        let str_off = i32::from_le_bytes(header[40..44].try_into().unwrap());
        let name = self
            .range
            .and_then(|range| read_name(binary, range.types.wrapping_add_signed(str_off.into())))
            .map(|name| match tflag & TFLAG_EXTRA_STAR != 0 {
                true => name.strip_prefix('*').unwrap_or(&name).to_owned(),
                false => name,
            })
            .unwrap_or_else(|| "?".to_owned());
        let at = |offset: u64| binary.read_u64(address + offset);
        let mut decoded =
            GoType { address, size, kind, name, elem: None, key: None, len: None, fields: vec![] };
        match kind {
            TypeKind::Map => {
                decoded.key = at(48);
                decoded.elem = at(56);
            }
            TypeKind::Pointer | TypeKind::Slice | TypeKind::Chan => decoded.elem = at(48),
            TypeKind::Array => {
                decoded.elem = at(48);
                decoded.len = at(64);
            }
            TypeKind::Struct => {
                let (fields, count) = (at(56)?, at(64)?);
                if count > MAX_FIELDS {
                    return None;
                }
                for index in 0..count {
                    let field = fields + index * 24;
                    let word = |offset: u64| binary.read_u64(field + offset);
                    decoded.fields.push(StructField {
                        name: word(0).and_then(|name| read_name(binary, name))?,
                        typ: word(8)?,
                        offset: word(16)?,
                    });
                }
            }
            _ => {}
        }
        Some(decoded)
    }
}

/// A `name`: flags byte, varint length, bytes.
fn read_name(binary: &GoBinary, address: u64) -> Option<String> {
    let (name, _) = super::buildinfo::read_string(binary.bytes_from(address.checked_add(1)?)?)?;
    String::from_utf8(name.to_vec()).ok()
}
