//! A `.go.buildinfo` blob (from its magic on).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| deferprobe::binary::fuzzing::buildinfo(data));
