//! DWARF sections (length-prefixed, see `fuzzing::dwarf_sections`) → runtime struct offsets.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| deferprobe::binary::fuzzing::dwarf(data));
