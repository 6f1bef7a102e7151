//! arm64: the closures a function builds, read from its code (see `binary::closures` for what
//! is looked for). Go 1.27 builds a deferred closure as `MOVD $size, R0` / `MOVD $type(SB), R1`
//! (ADRP + ADD) / `BL runtime.mallocgc…`, then `MOVD $main.f.func1(SB), R3` / `MOVD R3, (R0)`
//! (the code pointer into word 0), the captures into `8(R0)`, …, and `BL runtime.deferproc`
//! with the closure in R0; Go 1.19–1.21 pass the type to `runtime.newobject` in R0. A linear
//! scan: registers holding an ADRP/ADR(+ADD) address are followed, the object an allocator
//! returns in R0 is followed through register copies (`ORR Rm, ZR, Rd`), and a store of a
//! function's entry into word 0 of the object ties the function to the type.

use super::{
    decode::{LR, instructions},
    register,
};
use crate::binary::closures::{Built, Callees, Deferred};
use yaxpeax_arm::armv8::a64::{Opcode, Operand};

/// What `runtime.gcWriteBarrier*` clobbers on arm64: R25 (the buffer pointer it returns) and
/// the linker's scratch registers R16, R17 and R27.
const WRITE_BARRIER_CLOBBERS: [u16; 4] = [16, 17, 25, 27];

/// See [`crate::binary::isa::Isa::closures_built`].
pub(super) fn closures_built(
    code: &[u8],
    address: u64,
    callees: &Callees,
    is_type: &dyn Fn(u64) -> bool,
    is_function: &dyn Fn(u64) -> bool,
) -> Built {
    let Callees { allocators, defer_functions, write_barriers } = callees;
    let mut found = Built::default();
    let mut addresses: [Option<u64>; 32] = [None; 32];
    let mut object: [bool; 32] = [false; 32];
    let mut object_type: Option<u64> = None;
    let mut object_code: Option<u64> = None;
    for instruction in instructions(code, address) {
        let Ok(instruction) = instruction else { break };
        let opcode = instruction.opcode();
        if matches!(opcode, Opcode::BL | Opcode::BLR) {
            let target = instruction.branch_target();
            if let Some(target) = target
                && write_barriers.contains(&target)
            {
                for r in WRITE_BARRIER_CLOBBERS.into_iter().chain([LR]) {
                    (addresses[usize::from(r)], object[usize::from(r)]) = (None, false);
                }
                continue;
            }
            if let Some(target) = target
                && defer_functions.contains(&target)
                && let Some(closure) = Deferred::passed(object[0], object_code, addresses[0])
            {
                found.deferred.insert(instruction.address + 4, closure);
            }
            let allocator = target.and_then(|t| allocators.iter().find(|a| a.address == t));
            object = [false; 32];
            object_type = None;
            object_code = None;
            if let Some(allocator) = allocator
                && let Some(typ) =
                    register(allocator.type_register).and_then(|r| addresses[usize::from(r)])
                && is_type(typ)
            {
                object[0] = true;
                object_type = Some(typ);
            }
            addresses = [None; 32];
            continue;
        }
        let destination = match instruction.operand(0) {
            Operand::Register(_, n) | Operand::RegisterOrSP(_, n) if n != 31 => {
                Some(usize::from(n))
            }
            _ => None,
        };
        // ADRP / ADR: an address.
        if let (Some(to), Some(value)) = (destination, instruction.pc_relative_address()) {
            (addresses[to], object[to]) = (Some(value), false);
            continue;
        }
        // ADD Rd, Rn, #imm on a known address.
        if opcode == Opcode::ADD
            && let (Some(to), Operand::RegisterOrSP(_, from), Operand::Immediate(imm)) =
                (destination, instruction.operand(1), instruction.operand(2))
            && let Some(base) = addresses.get(usize::from(from)).copied().flatten()
        {
            (addresses[to], object[to]) = (Some(base + u64::from(imm)), false);
            continue;
        }
        // STR Rt, (Rn): the code pointer into word 0 of the object.
        if opcode == Opcode::STR
            && let (Operand::Register(_, value), Operand::RegPreIndex(base, 0, false)) =
                (instruction.operand(0), instruction.operand(1))
            && object.get(usize::from(base)) == Some(&true)
            && let Some(code) = addresses.get(usize::from(value)).copied().flatten()
            && is_function(code)
            && let Some(typ) = object_type.take()
        {
            found.types.entry(code).or_insert(typ);
            object_code = Some(code);
            continue;
        }
        // ORR Rd, ZR, Rm (MOVD Rm, Rd): a copy of what we follow.
        if opcode == Opcode::ORR
            && let (Some(to), Operand::Register(_, 31), Operand::RegShift(_, 0, _, from)) =
                (destination, instruction.operand(1), instruction.operand(2))
            && from != 31
        {
            addresses[to] = addresses[usize::from(from)];
            object[to] = object[usize::from(from)];
            continue;
        }
        for register in instruction.written_registers() {
            let slot = usize::from(register);
            (addresses[slot], object[slot]) = (None, false);
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::{arch::GoRegister, binary::closures::Allocator};

    const MALLOC: u64 = 0x2000;
    const DEFERPROC: u64 = 0x2800;
    const TYPE: u64 = 0x9c50;
    const CLOSURE: u64 = 0x1a00;

    fn bl(at: u64, target: u64) -> u32 {
        0x9400_0000 | ((target.wrapping_sub(at) as i64 / 4) as u32 & 0x03ff_ffff)
    }

    /// `ADRP Xd, page` at `at`.
    fn adrp(d: u32, at: u64, target: u64) -> u32 {
        let pages = ((target >> 12) as i64 - (at >> 12) as i64) as u32;
        0x9000_0000 | ((pages & 3) << 29) | (((pages >> 2) & 0x7ffff) << 5) | d
    }

    /// `ADD Xd, Xd, #imm12`.
    fn add(d: u32, imm: u32) -> u32 {
        0x9100_0000 | (imm << 10) | (d << 5) | d
    }

    #[test]
    fn mallocgc_then_code_pointer_then_deferproc() {
        // ADRP X1; ADD X1, X1, #0xc50; BL mallocgc; ADRP X3; ADD X3, X3, #0xa00;
        // STR X3, [X0]; BL deferproc
        let words = [
            adrp(1, 0x1000, TYPE),
            add(1, 0xc50),
            bl(0x1008, MALLOC),
            adrp(3, 0x100c, CLOSURE),
            add(3, 0xa00),
            0xf900_0003,
            bl(0x1018, DEFERPROC),
        ];
        let code: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        let callees = Callees {
            allocators: vec![Allocator { address: MALLOC, type_register: GoRegister::Arg(1) }],
            defer_functions: vec![DEFERPROC],
            write_barriers: vec![],
        };
        let found = closures_built(&code, 0x1000, &callees, &|a| a == TYPE, &|a| a == CLOSURE);
        assert_eq!(found.types, HashMap::from([(CLOSURE, TYPE)]));
        assert_eq!(found.deferred, HashMap::from([(0x101c, Deferred::Code(CLOSURE))]));
        // The type in the wrong register: nothing.
        let callees = Callees {
            allocators: vec![Allocator { address: MALLOC, type_register: GoRegister::Arg(0) }],
            ..callees
        };
        let found = closures_built(&code, 0x1000, &callees, &|a| a == TYPE, &|a| a == CLOSURE);
        assert!(found.types.is_empty());
    }
}
