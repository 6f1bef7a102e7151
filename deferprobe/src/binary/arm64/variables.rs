//! arm64: `runtime.allglen` and `runtime.allgptr` from `runtime.allgadd`'s code, which stores
//! both with `STLR R1, (R2)` (first `allgptr`, then `allglen`), R2 loaded with
//! `MOVD $var(SB), R2` (ADRP + ADD).

use super::decode::instructions;
use crate::binary::AllgVariables;
use yaxpeax_arm::armv8::a64::{Opcode, Operand};

pub(super) fn from_allgadd(code: &[u8], address: u64) -> Option<AllgVariables> {
    let mut addresses: [Option<u64>; 32] = [None; 32];
    let mut stored = Vec::new();
    for instruction in instructions(code, address) {
        let Ok(instruction) = instruction else { break };
        let destination = match instruction.operand(0) {
            Operand::Register(_, n) | Operand::RegisterOrSP(_, n) if n != 31 => {
                Some(usize::from(n))
            }
            _ => None,
        };
        if let (Some(to), Some(value)) = (destination, instruction.pc_relative_address()) {
            addresses[to] = Some(value);
            continue;
        }
        match (instruction.opcode(), instruction.operand(1), instruction.operand(2)) {
            (Opcode::ADD, Operand::RegisterOrSP(_, from), Operand::Immediate(imm)) => {
                if let (Some(to), Some(base)) = (destination, addresses[usize::from(from)]) {
                    addresses[to] = Some(base + u64::from(imm));
                    continue;
                }
            }
            (Opcode::STLR, Operand::RegPreIndex(base, 0, false), _) => {
                stored.extend(addresses[usize::from(base)]);
                continue;
            }
            _ => {}
        }
        for register in instruction.written_registers() {
            addresses[usize::from(register)] = None;
        }
    }
    match stored[..] {
        [.., allgptr, allglen] if allgptr != allglen => Some(AllgVariables { allglen, allgptr }),
        _ => None,
    }
}
