//! amd64: the closures a function builds, read from its code with iced-x86 (see
//! `binary::closures` for what is looked for). A linear scan: registers holding a RIP-relative
//! address (`LEA`) are followed, the object returned by an allocator call is followed through
//! register copies, and a store of a function's entry into word 0 of that object ties the
//! function to the type.

use iced_x86::{Code, FlowControl, InstructionInfoFactory, Mnemonic, OpKind, Register};

use super::{
    prologue::{instructions, register_slot as slot, written_registers},
    register,
};
use crate::binary::closures::{Built, Callees, Deferred};

/// Every closure built in `code` (the function at `address`), and the closure each call to a
/// defer function passes. `is_type` says whether an address can be a type descriptor,
/// `is_function` whether it is a function's entry.
pub(super) fn closures_built(
    code: &[u8],
    address: u64,
    callees: &Callees,
    is_type: &dyn Fn(u64) -> bool,
    is_function: &dyn Fn(u64) -> bool,
) -> Built {
    let Callees { allocators, defer_functions, write_barriers } = callees;
    let mut found = Built::default();
    let mut info = InstructionInfoFactory::new();
    // RIP-relative addresses in registers, and the registers holding the newest allocation
    // (with its type).
    let mut addresses: [Option<u64>; 16] = [None; 16];
    let mut object: [bool; 16] = [false; 16];
    let mut object_type: Option<u64> = None;
    // The code stored into word 0 of the object the registers in `object` hold.
    let mut object_code: Option<u64> = None;
    let rax = slot(Register::RAX).unwrap();
    for instruction in instructions(code, address) {
        let Ok(instruction) = instruction else { break };
        if instruction.flow_control() == FlowControl::Call {
            let target = instruction.near_branch_target();
            let direct = instruction.code() == Code::Call_rel32_64;
            if direct && write_barriers.contains(&target) {
                let r11 = slot(Register::R11).unwrap();
                (addresses[r11], object[r11]) = (None, false);
                continue;
            }
            if direct
                && defer_functions.contains(&target)
                && let Some(closure) = Deferred::passed(object[rax], object_code, addresses[rax])
            {
                found.deferred.insert(instruction.next_ip(), closure);
            }
            let allocator =
                direct.then(|| allocators.iter().find(|a| a.address == target)).flatten();
            object = [false; 16];
            object_type = None;
            object_code = None;
            if let Some(allocator) = allocator
                && let Some(typ) =
                    register(allocator.type_register).and_then(slot).and_then(|s| addresses[s])
                && is_type(typ)
            {
                object[slot(Register::RAX).unwrap()] = true;
                object_type = Some(typ);
            }
            addresses = [None; 16];
            continue;
        }
        let destination = (instruction.op_count() > 0
            && instruction.op0_kind() == OpKind::Register)
            .then(|| instruction.op0_register());
        // LEA reg, [rip+disp]
        if instruction.mnemonic() == Mnemonic::Lea
            && instruction.memory_base() == Register::RIP
            && let Some(to) = destination.and_then(slot)
        {
            addresses[to] = Some(instruction.memory_displacement64());
            object[to] = false;
            continue;
        }
        if instruction.mnemonic() == Mnemonic::Mov && instruction.op_count() == 2 {
            // MOV [obj], reg: the code pointer into word 0.
            if instruction.op0_kind() == OpKind::Memory
                && instruction.memory_index() == Register::None
                && instruction.memory_displacement64() == 0
                && slot(instruction.memory_base()).is_some_and(|s| object[s])
                && instruction.op1_kind() == OpKind::Register
                && let Some(code) = slot(instruction.op1_register()).and_then(|s| addresses[s])
                && is_function(code)
                && let Some(typ) = object_type.take()
            {
                found.types.entry(code).or_insert(typ);
                object_code = Some(code);
                continue;
            }
            // MOV reg, reg: copies of what we follow.
            if instruction.op1_kind() == OpKind::Register
                && let (Some(to), Some(from)) =
                    (destination.and_then(slot), slot(instruction.op1_register()))
                && instruction.op0_register().size() == 8
            {
                addresses[to] = addresses[from];
                object[to] = object[from];
                continue;
            }
        }
        for register in written_registers(&mut info, &instruction) {
            if let Some(s) = slot(register) {
                addresses[s] = None;
                object[s] = false;
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::{arch::GoRegister, binary::closures::Allocator};

    const NEWOBJECT: u64 = 0x2000;
    const TYPE: u64 = 0x9000;
    const CLOSURE: u64 = 0x1800;

    fn lea_rip(register_code: u8, at: u64, target: u64, rex: u8) -> Vec<u8> {
        // REX.W 8D /r with ModRM 00 reg 101 (RIP-relative), disp32.
        let next = at + 7;
        let disp = (target.wrapping_sub(next)) as i32;
        let mut bytes = vec![rex, 0x8d, (register_code << 3) | 0b101];
        bytes.extend(disp.to_le_bytes());
        bytes
    }

    fn call(at: u64, target: u64) -> Vec<u8> {
        let rel = target.wrapping_sub(at + 5) as i32;
        [&[0xe8][..], &rel.to_le_bytes()].concat()
    }

    const DEFERPROC: u64 = 0x2800;
    const FUNCVAL: u64 = 0x9800;

    const WRITE_BARRIER: u64 = 0x2c00;

    fn built(code: &[u8], type_register: GoRegister) -> Built {
        let callees = Callees {
            allocators: vec![Allocator { address: NEWOBJECT, type_register }],
            defer_functions: vec![DEFERPROC],
            write_barriers: vec![WRITE_BARRIER],
        };
        closures_built(code, 0x1000, &callees, &|a| a == TYPE, &|a| a == CLOSURE)
    }

    fn scan(code: &[u8], type_register: GoRegister) -> HashMap<u64, u64> {
        built(code, type_register).types
    }

    #[test]
    fn the_closure_each_defer_passes() {
        // lea rax, [rip+TYPE]; call newobject; lea rcx, [rip+CLOSURE]; mov [rax], rcx;
        // call deferproc (the object in rax)
        let mut code = lea_rip(0, 0x1000, TYPE, 0x48);
        code.extend(call(0x1007, NEWOBJECT));
        code.extend(lea_rip(1, 0x100c, CLOSURE, 0x48));
        code.extend([0x48, 0x89, 0x08]);
        code.extend(call(0x1016, DEFERPROC));
        // lea rax, [rip+FUNCVAL]; call deferproc (a static closure)
        code.extend(lea_rip(0, 0x101b, FUNCVAL, 0x48));
        code.extend(call(0x1022, DEFERPROC));
        // call deferproc with rax unknown (loaded from the stack: mov rax, [rsp+8])
        code.extend([0x48, 0x8b, 0x44, 0x24, 0x08]);
        code.extend(call(0x102c, DEFERPROC));
        let found = built(&code, GoRegister::Arg(0));
        assert_eq!(
            found.deferred,
            HashMap::from([
                (0x101b, Deferred::Code(CLOSURE)),
                (0x1027, Deferred::Funcval(FUNCVAL))
            ])
        );
    }

    #[test]
    fn go119_newobject_then_code_pointer() {
        // lea rax, [rip+TYPE]; call newobject; lea rcx, [rip+CLOSURE]; mov [rax], rcx
        let mut code = lea_rip(0, 0x1000, TYPE, 0x48);
        code.extend(call(0x1007, NEWOBJECT));
        code.extend(lea_rip(1, 0x100c, CLOSURE, 0x48));
        code.extend([0x48, 0x89, 0x08]); // mov [rax], rcx
        assert_eq!(scan(&code, GoRegister::Arg(0)), HashMap::from([(CLOSURE, TYPE)]));
        // The same code, but the type argument is not in the allocator's register.
        assert_eq!(scan(&code, GoRegister::Arg(1)), HashMap::new());
    }

    #[test]
    fn object_followed_through_a_copy_and_other_calls_forget() {
        // lea rbx, [rip+TYPE]; call newobject; mov rdx, rax; lea rcx, [rip+CLOSURE];
        // mov [rdx], rcx
        let mut code = lea_rip(3, 0x1000, TYPE, 0x48);
        code.extend(call(0x1007, NEWOBJECT));
        code.extend([0x48, 0x89, 0xc2]); // mov rdx, rax
        code.extend(lea_rip(1, 0x100f, CLOSURE, 0x48));
        code.extend([0x48, 0x89, 0x0a]); // mov [rdx], rcx
        assert_eq!(scan(&code, GoRegister::Arg(1)), HashMap::from([(CLOSURE, TYPE)]));
        // A call in between (not the allocator) ends the object.
        let mut code = lea_rip(3, 0x1000, TYPE, 0x48);
        code.extend(call(0x1007, NEWOBJECT));
        code.extend(call(0x100c, 0x3000));
        code.extend(lea_rip(1, 0x1011, CLOSURE, 0x48));
        code.extend([0x48, 0x89, 0x08]);
        assert_eq!(scan(&code, GoRegister::Arg(1)), HashMap::new());
    }
}
