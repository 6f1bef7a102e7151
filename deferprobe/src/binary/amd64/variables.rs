//! amd64: `runtime.allglen` and `runtime.allgptr` from `runtime.allgadd`'s code, which stores
//! both with `XCHGQ` (first `allgptr`, then `allglen`), each through a register loaded with
//! `LEAQ var(SB), reg`.

use iced_x86::{Mnemonic, OpKind, Register};

use super::prologue::{instructions, register_slot as slot};
use crate::binary::AllgVariables;

/// From `runtime.allgadd`'s machine code: the targets of its `XCHG`s, in order.
pub(super) fn from_allgadd(code: &[u8], address: u64) -> Option<AllgVariables> {
    let mut addresses: [Option<u64>; 16] = [None; 16];
    let mut stored = Vec::new();
    for instruction in instructions(code, address) {
        let Ok(instruction) = instruction else { break };
        match instruction.mnemonic() {
            Mnemonic::Lea if instruction.memory_base() == Register::RIP => {
                if let Some(to) = slot(instruction.op0_register()) {
                    addresses[to] = Some(instruction.memory_displacement64());
                }
            }
            Mnemonic::Xchg if instruction.op0_kind() == OpKind::Memory => {
                let target = match instruction.memory_base() {
                    Register::RIP => Some(instruction.memory_displacement64()),
                    base if instruction.memory_displacement64() == 0 => {
                        slot(base).and_then(|s| addresses[s])
                    }
                    _ => None,
                };
                stored.extend(target);
            }
            _ => {}
        }
    }
    match stored[..] {
        [.., allgptr, allglen] if allgptr != allglen => Some(AllgVariables { allglen, allgptr }),
        _ => None,
    }
}
