//! Entry points for the cargo-fuzz targets in `fuzz/` (cargo feature `fuzzing`): each parser of
//! untrusted binary data, fed raw bytes. They must return (an error, or nothing), never panic or
//! hang, whatever the bytes. `cargo xtask fuzz` seeds them from real Go binaries (docs/FUZZING.md).

use std::{convert::Infallible, path::Path};

use gimli::{DwarfSections, SectionId};

use super::{BuildInfo, amd64, dwarf, pclntab::Pclntab};

/// The path errors name (there is no file).
const PATH: &str = "<fuzz input>";
/// Where fuzzed machine code is taken to start (a typical Go text address).
pub const CODE_ADDRESS: u64 = 0x40_1000;

/// A `.go.buildinfo` blob, from its magic on.
pub fn buildinfo(data: &[u8]) {
    let _ = BuildInfo::parse(Path::new(PATH), data);
}

/// A `.gopclntab` section: the header, every function-table entry, and pc → function, file and
/// line lookups at, inside and just past each function (at most 64 functions).
pub fn pclntab(data: &[u8]) {
    let Ok(table) = Pclntab::parse_header(Path::new(PATH), data, 0..data.len()) else {
        return;
    };
    for entry in table.functions(data).take(64).flatten() {
        let last = entry.address.saturating_add(entry.size.saturating_sub(1));
        for pc in [
            entry.address,
            entry.address.saturating_add(entry.size / 2),
            last,
            last.saturating_add(1),
        ] {
            let _ = table.source_location(data, pc);
        }
    }
    let _ = table.source_location(data, 0);
    let _ = table.source_location(data, u64::MAX);
}

/// The DWARF sections [`dwarf_sections`] splits `data` into, in this order.
pub const DWARF_SECTIONS: [SectionId; 6] = dwarf::NEEDED;

/// Splits a DWARF fuzz input into the sections of [`DWARF_SECTIONS`]: each is a little-endian
/// `u32` length and that many bytes; missing or short ones are empty or cut short.
pub fn dwarf_sections(mut data: &[u8]) -> [&[u8]; 6] {
    DWARF_SECTIONS.map(|_| {
        let len =
            data.get(..4).map_or(0, |len| u32::from_le_bytes(len.try_into().unwrap()) as usize);
        let rest = data.get(4..).unwrap_or_default();
        let (section, rest) = rest.split_at(len.min(rest.len()));
        data = rest;
        section
    })
}

/// Runtime struct offsets from DWARF sections packed as [`dwarf_sections`] reads them.
pub fn dwarf(data: &[u8]) {
    let sections = dwarf_sections(data);
    let load = |id: SectionId| -> Result<&[u8], Infallible> {
        Ok(DWARF_SECTIONS
            .iter()
            .position(|&wanted| wanted == id)
            .map_or(&[][..], |index| sections[index]))
    };
    let Ok(sections) = DwarfSections::load(load);
    let _ = dwarf::layout_from_sections(Path::new(PATH), sections);
}

/// A function's machine code at [`CODE_ADDRESS`]: the probe offset after the stack check, the
/// RET offsets, and the direct calls to the target of the first `E8 rel32` byte pattern.
pub fn code(data: &[u8]) {
    let _ = amd64::prologue::probe_offset(data, CODE_ADDRESS);
    let _ = amd64::prologue::ret_offsets(data, CODE_ADDRESS);
    let target = data.windows(5).position(|bytes| bytes[0] == 0xe8).map(|at| {
        let rel = i32::from_le_bytes(data[at + 1..at + 5].try_into().unwrap());
        (CODE_ADDRESS + at as u64 + 5).wrapping_add_signed(i64::from(rel))
    });
    let _ = amd64::calls::direct_calls(data, CODE_ADDRESS, &[target.unwrap_or(CODE_ADDRESS)]);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every entry point on inputs too short to hold anything.
    #[test]
    fn empty_and_tiny_inputs() {
        for len in [0, 1, 4, 15, 16, 31, 32, 33, 72] {
            let data = vec![0xff; len];
            buildinfo(&data);
            pclntab(&data);
            dwarf(&data);
            code(&data);
        }
    }

    /// A Go 1.20+ `.gopclntab` with one 16-byte function, `f` at `text_start`: the header, the
    /// function table (entry, record offset; end), the `_func` record, names, a cu and file table.
    fn one_function_table(text_start: u64) -> Vec<u8> {
        const FUNCTAB: usize = 72;
        const RECORD: usize = FUNCTAB + 16;
        const NAMES: usize = RECORD + 48;
        let mut table = vec![0u8; NAMES + 16];
        let mut put = |at: usize, bytes: &[u8]| table[at..at + bytes.len()].copy_from_slice(bytes);
        put(0, &[0xf1, 0xff, 0xff, 0xff, 0, 0, 1, 8]);
        put(8, &1u64.to_le_bytes()); // nfunc
        put(24, &text_start.to_le_bytes());
        for (field, offset) in
            [(32, NAMES), (40, NAMES + 8), (48, NAMES), (56, NAMES), (64, FUNCTAB)]
        {
            put(field, &(offset as u64).to_le_bytes());
        }
        put(FUNCTAB, &0u32.to_le_bytes());
        put(FUNCTAB + 4, &16u32.to_le_bytes()); // record at functab + 16
        put(FUNCTAB + 8, &16u32.to_le_bytes()); // end of the last function
        put(NAMES, b"f\0");
        table
    }

    /// Found by the pclntab target: a function ending at the top of the address space made the
    /// look-up just past it overflow (in the harness; `source_location` itself was fine).
    #[test]
    fn function_at_the_top_of_the_address_space() {
        let table = one_function_table(u64::MAX - 15);
        let parsed = Pclntab::parse_header(Path::new(PATH), &table, 0..table.len()).unwrap();
        let entry = parsed.functions(&table).next().unwrap().unwrap();
        assert_eq!((entry.name, entry.address, entry.size), ("f", u64::MAX - 15, 16));
        pclntab(&table);
        // And an ordinary address, for contrast.
        pclntab(&one_function_table(0x40_1000));
    }
}
