//! Machine code of one function: stack-check prologue, RET offsets, direct calls.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| deferprobe::binary::fuzzing::code(data));
