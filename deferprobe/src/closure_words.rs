//! How many words a Go closure captures, from the closure function's own code.
//!
//! A closure object is `{code pointer, captured word 1, captured word 2, ...}` and the function
//! receives it in RDX (the closure context register). Its captured variables are exactly the
//! words it loads through that pointer, so the largest `[closure + 8k]` load gives the size.
//! The kernel inspects a fixed number of words after the code pointer; this tells userspace
//! which of them belong to the closure and which are a neighbouring heap object.

use iced_x86::{
    Code, Decoder, DecoderOptions, FlowControl, InstructionInfoFactory, Mnemonic, OpKind, Register,
};

use crate::binary::prologue::written_registers;

/// Where copies of the closure pointer live while scanning: registers and SP-relative slots.
#[derive(Default)]
struct ClosurePointerCopies {
    registers: Vec<Register>,
    stack_slots: Vec<i64>,
}

impl ClosurePointerCopies {
    fn holds(&self, register: Register) -> bool {
        self.registers.contains(&register.full_register())
    }
    fn add(&mut self, register: Register) {
        let register = register.full_register();
        if !self.registers.contains(&register) {
            self.registers.push(register);
        }
    }
    fn remove(&mut self, register: Register) {
        let register = register.full_register();
        self.registers.retain(|r| *r != register);
    }
}

/// Number of captured words (0 for a closure that captures nothing) of the closure function
/// whose machine code is `code`, loaded at `address`.
///
/// A linear scan: copies of RDX into registers and stack slots are followed, calls clobber
/// registers (Go's ABI keeps none across a call), and every load through a copy counts.
pub fn captured_words(code: &[u8], address: u64) -> usize {
    let mut decoder = Decoder::with_ip(64, code, address, DecoderOptions::NONE);
    let mut info = InstructionInfoFactory::new();
    let mut copies = ClosurePointerCopies::default();
    copies.add(Register::RDX);
    let mut words = 0usize;
    for instruction in &mut decoder {
        if instruction.code() == Code::INVALID {
            break;
        }
        // Loads through a copy of the closure pointer: [copy + 8k], k >= 1.
        let memory_base = instruction.memory_base();
        let reads_closure = (0..instruction.op_count())
            .any(|i| instruction.op_kind(i) == OpKind::Memory)
            && memory_base != Register::None
            && copies.holds(memory_base)
            && instruction.memory_index() == Register::None;
        if reads_closure && instruction.mnemonic() != Mnemonic::Lea {
            let displacement = instruction.memory_displacement64() as i64;
            if displacement >= 8 && displacement % 8 == 0 {
                words = words.max((displacement / 8) as usize);
            }
        }

        if instruction.flow_control() == FlowControl::Call {
            copies.registers.clear();
            continue;
        }
        let is_move = instruction.mnemonic() == Mnemonic::Mov && instruction.op_count() == 2;
        // Spill: MOV [RSP + d], copy.
        if is_move
            && instruction.op0_kind() == OpKind::Memory
            && instruction.memory_base() == Register::RSP
            && instruction.op1_kind() == OpKind::Register
            && copies.holds(instruction.op1_register())
        {
            copies.stack_slots.push(instruction.memory_displacement64() as i64);
            continue;
        }
        // Copy into a register: MOV reg, copy | MOV reg, [RSP + slot].
        if is_move && instruction.op0_kind() == OpKind::Register {
            let destination = instruction.op0_register();
            let from_copy = match instruction.op1_kind() {
                OpKind::Register => copies.holds(instruction.op1_register()),
                OpKind::Memory => {
                    instruction.memory_base() == Register::RSP
                        && instruction.memory_index() == Register::None
                        && copies
                            .stack_slots
                            .contains(&(instruction.memory_displacement64() as i64))
                }
                _ => false,
            };
            if from_copy && destination.size() == 8 {
                copies.add(destination);
                continue;
            }
        }
        // Anything else that writes a register ends that copy.
        for register in written_registers(&mut info, &instruction) {
            copies.remove(register);
        }
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: u64 = 0x401000;

    #[test]
    fn loads_through_rdx() {
        // mov rax, [rdx+8]; mov rbx, [rdx+16]; ret
        let code = [0x48, 0x8b, 0x42, 0x08, 0x48, 0x8b, 0x5a, 0x10, 0xc3];
        assert_eq!(captured_words(&code, BASE), 2);
    }

    #[test]
    fn captures_nothing() {
        // xor eax, eax; ret
        assert_eq!(captured_words(&[0x31, 0xc0, 0xc3], BASE), 0);
    }

    #[test]
    fn follows_register_copies_and_spills() {
        // mov rcx, rdx; mov [rsp+0x18], rcx; call .+0; mov rsi, [rsp+0x18]; mov rax, [rsi+0x18]
        let code = [
            0x48, 0x89, 0xd1, // mov rcx, rdx
            0x48, 0x89, 0x4c, 0x24, 0x18, // mov [rsp+0x18], rcx
            0xe8, 0x00, 0x00, 0x00, 0x00, // call
            0x48, 0x8b, 0x74, 0x24, 0x18, // mov rsi, [rsp+0x18]
            0x48, 0x8b, 0x46, 0x18, // mov rax, [rsi+0x18]
            0xc3,
        ];
        assert_eq!(captured_words(&code, BASE), 3);
    }

    #[test]
    fn overwritten_rdx_is_not_the_closure() {
        // mov edx, 5; mov rax, [rdx+8]  (rdx no longer the closure)
        let code = [0xba, 0x05, 0x00, 0x00, 0x00, 0x48, 0x8b, 0x42, 0x08, 0xc3];
        assert_eq!(captured_words(&code, BASE), 0);
        // call clobbers rdx
        let code = [0xe8, 0x00, 0x00, 0x00, 0x00, 0x48, 0x8b, 0x42, 0x08, 0xc3];
        assert_eq!(captured_words(&code, BASE), 0);
    }
}
