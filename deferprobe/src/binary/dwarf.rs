//! Offsets of the `runtime.g` (and its `sched`, a `runtime.gobuf`), `runtime.m` and
//! `runtime._defer` fields deferprobe reads, from
//! the binary's DWARF (sections possibly compressed). When present they win over
//! [`crate::layout::RELEASE_TABLE`].

use std::{borrow::Cow, path::Path};

use gimli::{DwarfSections, EndianSlice, LittleEndian, SectionId};
use object::{Endianness, Object as _, ObjectSection as _, read::elf::ElfFile64};

use super::BinaryError;
use crate::layout::RuntimeLayout;

const G: usize = 0;
const M: usize = 1;
const DEFER: usize = 2;
const GOBUF: usize = 3;
const STRUCTS: [&str; 4] = ["runtime.g", "runtime.m", "runtime._defer", "runtime.gobuf"];

/// A structure type from DWARF: its byte size and (member name, offset) pairs.
struct Struct {
    byte_size: Option<u64>,
    members: Vec<(String, u64)>,
}

/// Ok(None) when the binary has no `.debug_info` (stripped with `-w` or `-s`).
pub(super) fn runtime_layout(
    path: &Path,
    elf: &ElfFile64<'_, Endianness>,
) -> Result<Option<RuntimeLayout>, BinaryError> {
    if elf.section_by_name(".debug_info").is_none() {
        return Ok(None);
    }
    let load = |id: SectionId| -> Result<Cow<'_, [u8]>, BinaryError> {
        match elf.section_by_name(id.name()).filter(|_| NEEDED.contains(&id)) {
            Some(section) => section.uncompressed_data().map_err(|err| BinaryError::CorruptDwarf {
                path: path.to_owned(),
                reason: format!("{}: {err}", id.name()),
            }),
            None => Ok(Cow::Borrowed(&[])),
        }
    };
    layout_from_sections(path, DwarfSections::load(load)?).map(Some)
}

/// What units, entries and names need (gimli parses each unit's line program header, and
/// DWARF 5 names may be indexed strings); not locations or ranges.
pub(super) const NEEDED: [SectionId; 6] = [
    SectionId::DebugAbbrev,
    SectionId::DebugInfo,
    SectionId::DebugLine,
    SectionId::DebugLineStr,
    SectionId::DebugStr,
    SectionId::DebugStrOffsets,
];

/// The layout from the uncompressed [`NEEDED`] sections (others may be empty).
pub(super) fn layout_from_sections<T: AsRef<[u8]>>(
    path: &Path,
    sections: DwarfSections<T>,
) -> Result<RuntimeLayout, BinaryError> {
    let corrupt = |reason: String| BinaryError::CorruptDwarf { path: path.to_owned(), reason };
    let dwarf = sections.borrow(|data| EndianSlice::new(data.as_ref(), LittleEndian));
    let structs = find_structs(&dwarf).map_err(|err| corrupt(err.to_string()))?;

    let incomplete = |what: String| BinaryError::IncompleteDwarf { path: path.to_owned(), what };
    let described =
        |index: usize| structs[index].as_ref().ok_or_else(|| incomplete(STRUCTS[index].to_owned()));
    let member = |index: usize, name: &str| {
        described(index)?
            .members
            .iter()
            .find(|(member, _)| member == name)
            .map(|&(_, offset)| offset)
            .ok_or_else(|| incomplete(format!("{}.{name}", STRUCTS[index])))
    };
    let sched = member(G, "sched")?;
    Ok(RuntimeLayout {
        g_defer: member(G, "_defer")?,
        g_m: member(G, "m")?,
        g_goid: member(G, "goid")?,
        m_curg: member(M, "curg")?,
        defer_sp: member(DEFER, "sp")?,
        defer_pc: member(DEFER, "pc")?,
        defer_fn: member(DEFER, "fn")?,
        defer_link: member(DEFER, "link")?,
        g_status: member(G, "atomicstatus")?,
        // Go 1.22+: range-over-func loops keep their records on a `head` list.
        defer_rangefunc: member(DEFER, "rangefunc").ok(),
        defer_head: member(DEFER, "head").ok(),
        defer_size: described(DEFER)?
            .byte_size
            .ok_or_else(|| incomplete("the size of runtime._defer".to_owned()))?,
        g_sched_sp: sched + member(GOBUF, "sp")?,
        g_sched_pc: sched + member(GOBUF, "pc")?,
        g_sched_bp: sched + member(GOBUF, "bp")?,
        g_syscall_sp: member(G, "syscallsp")?,
        g_syscall_pc: member(G, "syscallpc")?,
        // Go 1.23+.
        g_syscall_bp: member(G, "syscallbp").ok(),
    })
}

/// The first structure type named like each of [`STRUCTS`], with its direct members.
fn find_structs(
    dwarf: &gimli::Dwarf<EndianSlice<'_, LittleEndian>>,
) -> gimli::Result<[Option<Struct>; 4]> {
    let mut found: [Option<Struct>; 4] = Default::default();
    let mut units = dwarf.units();
    while let Some(header) = units.next()? {
        let unit = dwarf.unit(header)?;
        let mut entries = unit.entries();
        // The struct whose members are being collected, and its depth.
        let mut collecting: Option<(usize, isize)> = None;
        while let Some(entry) = entries.next_dfs()? {
            if let Some((index, depth)) = collecting {
                if entry.depth() > depth {
                    if entry.depth() == depth + 1
                        && entry.tag() == gimli::DW_TAG_member
                        && let Some(name) = entry.attr_value(gimli::DW_AT_name)
                        && let Some(location) = entry.attr_value(gimli::DW_AT_data_member_location)
                        && let Some(offset) = location.udata_value()
                        && let Some(record) = &mut found[index]
                    {
                        let name = dwarf.attr_string(&unit, name)?.to_string_lossy().into_owned();
                        record.members.push((name, offset));
                    }
                    continue;
                }
                collecting = None;
            }
            if entry.tag() != gimli::DW_TAG_structure_type {
                continue;
            }
            let Some(name) = entry.attr_value(gimli::DW_AT_name) else {
                continue;
            };
            let name = dwarf.attr_string(&unit, name)?;
            let wanted = STRUCTS.iter().position(|wanted| name.slice() == wanted.as_bytes());
            if let Some(index) = wanted.filter(|&index| found[index].is_none()) {
                let byte_size =
                    entry.attr_value(gimli::DW_AT_byte_size).and_then(|size| size.udata_value());
                found[index] = Some(Struct { byte_size, members: Vec::new() });
                collecting = Some((index, entry.depth()));
            }
        }
        if found.iter().all(Option::is_some) {
            break;
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use crate::{
        binary::{
            GoBinary,
            testbin::{self, Program, Variant},
        },
        layout,
    };

    #[test]
    fn dwarf_matches_release_table() {
        for toolchain in testbin::toolchains() {
            let release = &toolchain.version;
            for program in Program::ALL {
                let path = testbin::build(&toolchain, program, Variant::Plain);
                let binary = GoBinary::open(&path).unwrap();
                let from_dwarf = binary.runtime_layout_from_dwarf().unwrap();
                let from_dwarf =
                    from_dwarf.unwrap_or_else(|| panic!("go{release} {program:?}: no DWARF"));
                let table = layout::for_release(binary.arch(), binary.build_info().release);
                assert_eq!(Some(from_dwarf), table, "go{release} {program:?}: DWARF vs layout.rs");
            }
        }
    }
}
