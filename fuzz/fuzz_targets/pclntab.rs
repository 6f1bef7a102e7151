//! A `.gopclntab` section: header, function table, pc → file:line lookups.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| deferprobe::binary::fuzzing::pclntab(data));
