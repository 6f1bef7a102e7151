//! amd64: direct calls in machine code, the `CALL rel32` instructions of a function that go to given
//! addresses, found by decoding the function with iced-x86 (used to list the call sites of
//! `runtime.deferproc` / `runtime.deferprocat`, the heap-defer sites).

use iced_x86::Code;

use super::prologue::instructions;
use crate::binary::{BinaryError, isa::DirectCall};

const CALL_REL32: u8 = 0xe8;
const CALL_REL32_LEN: usize = deferprobe_common::amd64::CALL_LEN as usize;

/// Every `CALL rel32` in `code` (the function at `address`) whose target is one of `targets`.
/// A byte scan for `E8 rel32` with such a target comes first, so only functions that may call
/// one are decoded; decoding then keeps the real instructions (not bytes inside others).
pub fn direct_calls(
    code: &[u8],
    address: u64,
    targets: &[u64],
) -> Result<Vec<DirectCall>, BinaryError> {
    let maybe = code.windows(CALL_REL32_LEN).enumerate().any(|(at, bytes)| {
        if bytes[0] != CALL_REL32 {
            return false;
        }
        let rel = i32::from_le_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
        let next = address.wrapping_add((at + CALL_REL32_LEN) as u64);
        targets.contains(&next.wrapping_add_signed(i64::from(rel)))
    });
    if !maybe {
        return Ok(Vec::new());
    }
    let mut calls = Vec::new();
    for instruction in instructions(code, address) {
        let instruction = instruction.map_err(|reason| BinaryError::Code { address, reason })?;
        if instruction.code() == Code::Call_rel32_64
            && targets.contains(&instruction.near_branch_target())
        {
            calls.push(DirectCall {
                address: instruction.ip(),
                return_address: instruction.next_ip(),
                target: instruction.near_branch_target(),
            });
        }
    }
    Ok(calls)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `CALL rel32` at `at` (in a function at 0x1000) to `target`.
    fn call(at: u64, target: u64) -> Vec<u8> {
        let rel = target.wrapping_sub(0x1000 + at + 5) as i32;
        [&[CALL_REL32][..], &rel.to_le_bytes()].concat()
    }

    #[test]
    fn finds_calls_to_the_targets_only() {
        // nop; call 0x2000; call 0x3000; mov eax, 0xe8 (an E8 byte inside an instruction); ret
        let code = [
            &[0x90][..],
            &call(1, 0x2000),
            &call(6, 0x3000),
            &[0xb8, 0xe8, 0x00, 0x00, 0x00],
            &[0xc3],
        ]
        .concat();
        let found = direct_calls(&code, 0x1000, &[0x2000]).unwrap();
        let expected = DirectCall { address: 0x1001, return_address: 0x1006, target: 0x2000 };
        assert_eq!(found, [expected]);
        assert_eq!(direct_calls(&code, 0x1000, &[0x4000]).unwrap(), []);
        let both = direct_calls(&code, 0x1000, &[0x3000, 0x2000]).unwrap();
        assert_eq!(both.len(), 2);
    }

    #[test]
    fn bytes_that_only_look_like_a_call_are_not_one() {
        // mov rax, imm64 whose bytes contain `E8 rel32` to 0x2000.
        let mut code = vec![0x48, 0xb8];
        code.extend(call(2, 0x2000));
        code.extend([0, 0, 0, 0xc3]);
        assert_eq!(direct_calls(&code, 0x1000, &[0x2000]).unwrap(), []);
    }

    #[test]
    fn undecodable_code_is_an_error() {
        // A candidate call, then a truncated instruction.
        let code = [&call(0, 0x2000)[..], &[0x0f]].concat();
        let err = direct_calls(&code, 0x1000, &[0x2000]).unwrap_err();
        assert_eq!(err.to_string(), "machine code at 0x1000: truncated instruction at +0x5");
    }
}
