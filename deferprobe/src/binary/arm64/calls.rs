//! arm64: the `BL` instructions of a function that go to given addresses (the call sites of
//! `runtime.deferproc` / `runtime.deferprocat` and `runtime.deferreturn`).

use super::decode::instructions;
use crate::binary::{BinaryError, isa::DirectCall};
use yaxpeax_arm::armv8::a64::Opcode;

/// `BL imm26`: opcode bits 31..26 = 0b100101.
const BL_MASK: u32 = 0xfc00_0000;
const BL_BITS: u32 = 0x9400_0000;

/// Every `BL` in `code` (the function at `address`) whose target is one of `targets`. Words
/// are tested as `BL` encodings first, so only functions that may call one are decoded.
pub(super) fn direct_calls(
    code: &[u8],
    address: u64,
    targets: &[u64],
) -> Result<Vec<DirectCall>, BinaryError> {
    let call_len = deferprobe_common::arm64::CALL_LEN;
    let maybe = code.as_chunks::<4>().0.iter().enumerate().any(|(index, word)| {
        let word = u32::from_le_bytes(*word);
        // imm26, in words, sign-extended.
        let offset = i64::from(((word << 6) as i32) >> 6) * 4;
        let at = address + index as u64 * 4;
        word & BL_MASK == BL_BITS && targets.contains(&at.wrapping_add_signed(offset))
    });
    if !maybe {
        return Ok(Vec::new());
    }
    let mut calls = Vec::new();
    for instruction in instructions(code, address) {
        let instruction = instruction.map_err(|reason| BinaryError::Code { address, reason })?;
        if instruction.opcode() == Opcode::BL
            && let Some(target) = instruction.branch_target()
            && targets.contains(&target)
        {
            calls.push(DirectCall {
                address: instruction.address,
                return_address: instruction.address + call_len,
                target,
            });
        }
    }
    Ok(calls)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `BL` at `at` to `target`.
    fn bl(at: u64, target: u64) -> [u8; 4] {
        let words = (target.wrapping_sub(at) as i64 / 4) as u32 & 0x03ff_ffff;
        (BL_BITS | words).to_le_bytes()
    }

    #[test]
    fn finds_calls_to_the_targets_only() {
        // NOP; BL 0x2000; BL 0x800 (backwards); RET
        let code = [
            &0xd503_201fu32.to_le_bytes()[..],
            &bl(0x1004, 0x2000),
            &bl(0x1008, 0x800),
            &0xd65f_03c0u32.to_le_bytes(),
        ]
        .concat();
        let found = direct_calls(&code, 0x1000, &[0x2000]).unwrap();
        assert_eq!(found, [DirectCall { address: 0x1004, return_address: 0x1008, target: 0x2000 }]);
        assert_eq!(direct_calls(&code, 0x1000, &[0x800]).unwrap()[0].address, 0x1008);
        assert_eq!(direct_calls(&code, 0x1000, &[0x4000]).unwrap(), []);
    }
}
