//! amd64: where to put probes inside a function, found by decoding its machine code with
//! iced-x86: the spot where a probe sees each call once and the kernel emulates the instruction
//! ([`probe_spot`]: the stack check's JBE, or the first emulated instruction of a nosplit
//! function), just after the Go stack-check prologue ([`probe_offset`]), and every RET
//! (returns). Offsets are relative to the function's entry.

use iced_x86::{
    Code, Decoder, DecoderError, DecoderOptions, Instruction, InstructionInfoFactory, Mnemonic,
    OpAccess, OpKind, Register,
};

#[cfg(any(test, feature = "fuzzing"))]
use crate::binary::prologue::ProbeOffset;
use crate::binary::{
    BinaryError,
    prologue::{CountWhen, ProbeSpot},
};

/// `g.stackguard0` (Go functions) and `g.stackguard1` (the runtime's C-like functions).
const STACK_GUARD_OFFSETS: [u64; 2] = [0x10, 0x18];

/// Where a probe on `code` (a function at `address`) sees each call once, on an instruction
/// the kernel emulates, with the registers in `reads` still holding what they held at entry:
///
/// - a function with a Go stack check: its JBE (emulated), counting fall-throughs only;
/// - a nosplit function: the first emulated instruction (PUSH reg, CALL, JMP, Jcc, NOP) of
///   the straight-line code at its entry, provided none of `reads` is written before it and no
///   branch of the function leads back into that code;
/// - otherwise the entry, single-stepped (`emulated: false`): the governor must price it so.
pub fn probe_spot(code: &[u8], address: u64, reads: &[Register]) -> Result<ProbeSpot, BinaryError> {
    let error = |reason| BinaryError::Code { address, reason };
    if let Some(branch) = stack_check_branch(code, address).map_err(error)? {
        return Ok(ProbeSpot {
            offset: branch.ip().wrapping_sub(address),
            instruction: describe(&branch),
            emulated: true,
            count_when: CountWhen::FallsThrough,
        });
    }
    let decoded: Vec<Instruction> = instructions(code, address)
        .take_while(|instruction| instruction.is_ok())
        .map(|instruction| instruction.expect("checked"))
        .collect();
    let first = decoded.first().ok_or_else(|| error("no instruction".into()))?;
    // No better spot: the entry, as the kernel treats its instruction.
    let entry = ProbeSpot {
        offset: 0,
        instruction: describe(first),
        emulated: is_emulated(first),
        count_when: CountWhen::Always,
    };
    let mut info = InstructionInfoFactory::new();
    let mut written = [false; 16];
    for instruction in &decoded {
        let offset = instruction.ip().wrapping_sub(address);
        if is_emulated(instruction) {
            let clobbered =
                reads.iter().any(|r| register_slot(*r).is_some_and(|slot| written[slot]));
            // A jump back into the code before the spot would make a call reach it twice (a
            // recursive CALL of the entry is another call, counted as such).
            let reentered = decoded.iter().any(|other| {
                (other.is_jcc_short_or_near() || other.is_jmp_short_or_near())
                    && other.near_branch_target().wrapping_sub(address) <= offset
            });
            if clobbered || reentered {
                break;
            }
            return Ok(ProbeSpot {
                offset,
                instruction: describe(instruction),
                emulated: true,
                count_when: CountWhen::Always,
            });
        }
        if instruction.flow_control() != iced_x86::FlowControl::Next {
            break;
        }
        for register in written_registers(&mut info, instruction) {
            if let Some(slot) = register_slot(register) {
                written[slot] = true;
            }
        }
    }
    Ok(entry)
}

/// Instructions Linux's x86 uprobes emulate instead of single-stepping them out of line
/// (arch/x86/kernel/uprobes.c: `branch_setup_xol_ops`, `push_setup_xol_ops`): CALL rel32, JMP
/// and Jcc rel8/rel32, one-byte NOP, PUSH of a 64-bit register.
pub fn is_emulated(instruction: &Instruction) -> bool {
    instruction.code() == Code::Call_rel32_64
        || instruction.is_jmp_short_or_near()
        || instruction.is_jcc_short_or_near()
        || matches!(instruction.code(), Code::Nopd | Code::Push_r64)
}

/// `jbe`, `push rbp`, `sub rsp`: the mnemonic and a register operand.
fn describe(instruction: &Instruction) -> String {
    let mnemonic = format!("{:?}", instruction.mnemonic()).to_lowercase();
    match instruction.op_count() > 0 && instruction.op0_kind() == OpKind::Register {
        true => {
            format!("{mnemonic} {}", format!("{:?}", instruction.op0_register()).to_lowercase())
        }
        false => mnemonic,
    }
}

#[cfg(any(test, feature = "fuzzing"))]
/// The offset where a probe sees each call exactly once: just after the stack-check branch.
/// When the check fails the function calls morestack and jumps back to its first instruction,
/// so an entry probe would fire twice. Recognised prologues (R14 = g, R12 = scratch), each
/// ending in `JBE` (short or near) to the morestack call:
///
/// - small frames: `CMPQ SP, 0x10(R14)`
/// - frames up to 4 KiB: `LEAQ -N(SP), R12; CMPQ R12, 0x10(R14)`
/// - larger frames: `MOVQ SP, R12; SUBQ $N, R12; JCS morestack; CMPQ R12, 0x10(R14)`
///
/// optionally preceded by a load of g from TLS into R14 (ABI0 assembly functions). Functions
/// that do not start with one of these (nosplit, e.g. `runtime.deferprocStack`) get offset 0; a
/// prologue that starts like a stack check but does not finish like one is an error.
pub fn probe_offset(code: &[u8], address: u64) -> Result<ProbeOffset, BinaryError> {
    let end =
        stack_check_end(code, address).map_err(|reason| BinaryError::Code { address, reason })?;
    Ok(match end {
        Some(offset) => ProbeOffset { offset, after_stack_check: true },
        None => ProbeOffset { offset: 0, after_stack_check: false },
    })
}

#[cfg(any(test, feature = "fuzzing"))]
/// Offsets of every RET instruction in the function body. (Tail calls leave a function with a
/// JMP instead; Go emits those only in wrappers and assembly.)
pub fn ret_offsets(code: &[u8], address: u64) -> Result<Vec<u64>, BinaryError> {
    let mut offsets = Vec::new();
    for instruction in instructions(code, address) {
        let instruction = instruction.map_err(|reason| BinaryError::Code { address, reason })?;
        if instruction.mnemonic() == Mnemonic::Ret {
            offsets.push(instruction.ip().wrapping_sub(address));
        }
    }
    Ok(offsets)
}

#[cfg(any(test, feature = "fuzzing"))]
/// The offset just past the stack-check JBE, or None if the code has no stack check.
fn stack_check_end(code: &[u8], address: u64) -> Result<Option<u64>, String> {
    Ok(stack_check_branch(code, address)?.map(|branch| branch.next_ip().wrapping_sub(address)))
}

/// The stack check's JBE, or None if the code has no stack check.
fn stack_check_branch(code: &[u8], address: u64) -> Result<Option<Instruction>, String> {
    let mut decoded = instructions(code, address);
    let mut next = || decoded.next().unwrap_or_else(|| Err("code ends inside the prologue".into()));

    let mut first = next()?;
    if is_tls_g_load(&first) {
        first = next()?;
    }
    let (compare, checked) = if is_stack_guard_compare(&first, Register::RSP) {
        (first, Register::RSP)
    } else if first.code() == Code::Lea_r64_m
        && first.op0_register() == Register::R12
        && first.memory_base() == Register::RSP
        && first.memory_index() == Register::None
    {
        (next()?, Register::R12)
    } else if is_mov_r12_rsp(&first) {
        let sub = next()?;
        let jcs = next()?;
        if sub.mnemonic() != Mnemonic::Sub
            || sub.op0_kind() != OpKind::Register
            || sub.op0_register() != Register::R12
            || jcs.mnemonic() != Mnemonic::Jb
        {
            return Err(unrecognised(&first, address));
        }
        (next()?, Register::R12)
    } else {
        return Ok(None);
    };
    if !is_stack_guard_compare(&compare, checked) {
        return Err(unrecognised(&first, address));
    }
    let branch = next()?;
    if branch.mnemonic() != Mnemonic::Jbe {
        return Err(format!(
            "stack check at +{:#x} is not followed by JBE",
            compare.ip().wrapping_sub(address)
        ));
    }
    Ok(Some(branch))
}

fn unrecognised(first: &Instruction, address: u64) -> String {
    format!("unrecognised stack-check prologue at +{:#x}", first.ip().wrapping_sub(address))
}

/// `MOVQ (TLS), R14`: `mov r14, fs:[…]`.
fn is_tls_g_load(instruction: &Instruction) -> bool {
    instruction.mnemonic() == Mnemonic::Mov
        && instruction.op0_kind() == OpKind::Register
        && instruction.op0_register() == Register::R14
        && instruction.op1_kind() == OpKind::Memory
        && instruction.memory_segment() == Register::FS
}

/// `CMPQ reg, 0x10(R14)` (or 0x18).
fn is_stack_guard_compare(instruction: &Instruction, register: Register) -> bool {
    instruction.code() == Code::Cmp_r64_rm64
        && instruction.op0_register() == register
        && instruction.op1_kind() == OpKind::Memory
        && instruction.memory_base() == Register::R14
        && instruction.memory_index() == Register::None
        && instruction.memory_segment() == Register::DS
        && STACK_GUARD_OFFSETS.contains(&instruction.memory_displacement64())
}

/// `MOVQ SP, R12`, in either encoding.
fn is_mov_r12_rsp(instruction: &Instruction) -> bool {
    matches!(instruction.code(), Code::Mov_r64_rm64 | Code::Mov_rm64_r64)
        && instruction.op0_kind() == OpKind::Register
        && instruction.op0_register() == Register::R12
        && instruction.op1_kind() == OpKind::Register
        && instruction.op1_register() == Register::RSP
}

/// Index 0–15 of a general-purpose register (any width: `ECX` is `RCX`'s), for scans that
/// track what each register holds; None for others.
pub fn register_slot(register: Register) -> Option<usize> {
    let full = register.full_register();
    (Register::RAX..=Register::R15).contains(&full).then(|| full as usize - Register::RAX as usize)
}

/// The registers `instruction` writes, fully or in part, always or conditionally: what a
/// scan must stop believing it knows about.
pub fn written_registers<'i>(
    info: &'i mut InstructionInfoFactory,
    instruction: &Instruction,
) -> impl Iterator<Item = Register> + 'i {
    info.info(instruction)
        .used_registers()
        .iter()
        .filter(|used| {
            matches!(
                used.access(),
                OpAccess::Write
                    | OpAccess::ReadWrite
                    | OpAccess::CondWrite
                    | OpAccess::ReadCondWrite
            )
        })
        .map(|used| used.register())
}

/// Decodes `code` linearly; an undecodable or truncated instruction is an error item.
pub(super) fn instructions(
    code: &[u8],
    address: u64,
) -> impl Iterator<Item = Result<Instruction, String>> {
    let mut decoder = Decoder::with_ip(64, code, address, DecoderOptions::NONE);
    std::iter::from_fn(move || {
        if !decoder.can_decode() {
            return None;
        }
        let offset = decoder.ip().wrapping_sub(address);
        let instruction = decoder.decode();
        Some(match decoder.last_error() {
            DecoderError::None => Ok(instruction),
            DecoderError::NoMoreBytes => Err(format!("truncated instruction at +{offset:#x}")),
            _ => Err(format!("undecodable instruction at +{offset:#x}")),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::binary::{
        GoBinary,
        testbin::{self, Program, Variant},
    };

    fn offset(code: &[u8]) -> Result<ProbeOffset, BinaryError> {
        probe_offset(code, 0x1000)
    }

    fn after(offset: u64) -> ProbeOffset {
        ProbeOffset { offset, after_stack_check: true }
    }

    const CMP_RSP: [u8; 4] = [0x49, 0x3b, 0x66, 0x10];
    const CMP_R12: [u8; 4] = [0x4d, 0x3b, 0x66, 0x10];
    const LEA_R12: [u8; 5] = [0x4c, 0x8d, 0x64, 0x24, 0xd0];
    const JBE_SHORT: [u8; 2] = [0x76, 0x20];
    const JBE_NEAR: [u8; 6] = [0x0f, 0x86, 0x00, 0x01, 0x00, 0x00];
    const PUSH_RBP: [u8; 1] = [0x55];

    #[test]
    fn synthetic_prologues() {
        assert_eq!(offset(&[&CMP_RSP[..], &JBE_SHORT, &PUSH_RBP].concat()).unwrap(), after(6));
        assert_eq!(offset(&[&CMP_RSP[..], &JBE_NEAR, &PUSH_RBP].concat()).unwrap(), after(10));
        assert_eq!(
            offset(&[&LEA_R12[..], &CMP_R12, &JBE_NEAR, &PUSH_RBP].concat()).unwrap(),
            after(15)
        );
        // MOVQ SP, R12; SUBQ $0x2000, R12; JCS; CMPQ R12, 0x10(R14); JBE
        let huge = [
            &[0x49, 0x89, 0xe4][..],
            &[0x49, 0x81, 0xec, 0x00, 0x20, 0x00, 0x00],
            &[0x72, 0x10],
            &CMP_R12,
            &JBE_SHORT,
            &PUSH_RBP,
        ]
        .concat();
        assert_eq!(offset(&huge).unwrap(), after(3 + 7 + 2 + 4 + 2));
        // ABI0: MOVQ FS:-8, R14 first.
        let abi0 =
            [&[0x64, 0x4c, 0x8b, 0x34, 0x25, 0xf8, 0xff, 0xff, 0xff][..], &CMP_RSP, &JBE_SHORT]
                .concat();
        assert_eq!(offset(&abi0).unwrap(), after(15));
        // nosplit
        let none = ProbeOffset { offset: 0, after_stack_check: false };
        assert_eq!(offset(&[0x55, 0x48, 0x89, 0xe5, 0xc3]).unwrap(), none);
        assert_eq!(offset(&[0xc3]).unwrap(), none);
    }

    fn spot(code: &[u8], reads: &[Register]) -> ProbeSpot {
        probe_spot(code, 0x1000, reads).unwrap()
    }

    /// Where probes go: the stack check's JBE; in nosplit code the first emulated
    /// instruction before which no read register is written and into which nothing jumps back;
    /// else the entry, single-stepped.
    #[test]
    fn synthetic_probe_spots() {
        let rax = [Register::RAX];
        let jbe = spot(&[&CMP_RSP[..], &JBE_NEAR, &PUSH_RBP].concat(), &rax);
        assert_eq!((jbe.offset, jbe.instruction.as_str(), jbe.emulated), (4, "jbe", true));
        assert_eq!(jbe.count_when, CountWhen::FallsThrough);
        let large = spot(&[&LEA_R12[..], &CMP_R12, &JBE_SHORT].concat(), &rax);
        assert_eq!((large.offset, large.count_when), (9, CountWhen::FallsThrough));
        // Go >= 1.21 nosplit: PUSHQ BP first.
        let push = spot(&[0x55, 0x48, 0x89, 0xe5, 0xc3], &rax);
        assert_eq!((push.offset, push.instruction.as_str(), push.emulated), (0, "push rbp", true));
        assert_eq!(push.count_when, CountWhen::Always);
        // Go 1.19 nosplit: SUBQ $0x18, SP; MOVQ BP, 0x10(SP); CMPQ DX, CX; JNE.
        let go119 = [
            &[0x48, 0x83, 0xec, 0x18][..],
            &[0x48, 0x89, 0x6c, 0x24, 0x10],
            &[0x48, 0x39, 0xca],
            &[0x75, 0x02],
            &[0x90, 0x90, 0xc3],
        ]
        .concat();
        let jne = spot(&go119, &rax);
        assert_eq!((jne.offset, jne.instruction.as_str(), jne.emulated), (12, "jne", true));
        // ... not when the program reads RSP (SUBQ moved it) or a register written before.
        let stepped = spot(&go119, &[Register::RSP]);
        assert_eq!((stepped.offset, stepped.instruction.as_str()), (0, "sub rsp"));
        assert!(!stepped.emulated);
        let mov_rax = [&[0x48, 0x89, 0xd0][..], &[0x75, 0x00, 0xc3]].concat(); // MOVQ DX, AX
        assert!(!spot(&mov_rax, &rax).emulated);
        assert!(spot(&mov_rax, &[Register::RBX]).emulated);
        // ... nor when a jump leads back before it: SUBQ; JNE (to the SUBQ).
        let back = [&[0x48, 0x83, 0xec, 0x18][..], &[0x75, 0xfa, 0xc3]].concat();
        assert!(!spot(&back, &rax).emulated);
    }

    #[test]
    fn broken_prologues_are_errors() {
        let no_jbe = [&CMP_RSP[..], &PUSH_RBP].concat();
        assert_eq!(
            offset(&no_jbe).unwrap_err().to_string(),
            "machine code at 0x1000: stack check at +0x0 is not followed by JBE"
        );
        let lea_without_cmp = [&LEA_R12[..], &PUSH_RBP, &JBE_SHORT].concat();
        assert!(offset(&lea_without_cmp).is_err());
        assert!(offset(&CMP_RSP).is_err());
        assert!(offset(&CMP_RSP[..2]).is_err());
        assert!(offset(&[]).is_err());
    }

    #[test]
    fn ret_offsets_synthetic() {
        // push rbp; ret; nop; ret
        assert_eq!(ret_offsets(&[0x55, 0xc3, 0x90, 0xc3], 0).unwrap(), [1, 3]);
        assert_eq!(ret_offsets(&[], 0).unwrap(), Vec::<u64>::new());
        let err = ret_offsets(&[0xc3, 0x0f], 0x2000).unwrap_err();
        assert_eq!(err.to_string(), "machine code at 0x2000: truncated instruction at +0x1");
    }

    /// Independent of iced-x86: the raw encodings from go-runtime.md.
    fn expected_from_bytes(code: &[u8]) -> u64 {
        let lea = match code {
            [0x4c, 0x8d, 0x64, 0x24, _, ..] => 5,
            [0x4c, 0x8d, 0xa4, 0x24, _, _, _, _, ..] => 8,
            _ => 0,
        };
        let compare = if lea == 0 { CMP_RSP } else { CMP_R12 };
        assert_eq!(code[lea..lea + 4], compare, "stack check expected at +{lea}");
        match code[lea + 4] {
            0x76 => lea as u64 + 4 + 2,
            0x0f if code[lea + 5] == 0x86 => lea as u64 + 4 + 6,
            other => panic!("expected JBE after the stack check, found {other:#x}"),
        }
    }

    #[test]
    fn real_prologues() {
        for toolchain in testbin::toolchains() {
            let release = &toolchain.version;
            let path = testbin::build(&toolchain, Program::Workload, Variant::Stripped);
            let binary = GoBinary::open(&path).unwrap();
            let minor = binary.build_info().release.minor;
            for name in ["runtime.deferproc", "runtime.mapassign_faststr", "runtime.deferreturn"] {
                let function = binary.function(name).unwrap();
                let code = binary.function_code(&function).unwrap();
                let probe = binary.probe_offset(&function).unwrap();
                assert!(probe.after_stack_check, "go{release} {name}");
                assert_eq!(probe.offset, expected_from_bytes(code), "go{release} {name}");
            }
            let mapassign = binary.function("runtime.mapassign_faststr").unwrap();
            let expected = if minor <= 23 { 10 } else { 15 };
            assert_eq!(binary.probe_offset(&mapassign).unwrap(), after(expected), "go{release}");

            let stack = binary.function("runtime.deferprocStack").unwrap();
            let probe = binary.probe_offset(&stack).unwrap();
            assert_eq!(probe, ProbeOffset { offset: 0, after_stack_check: false }, "go{release}");
            // nosplit: PUSHQ BP at the entry from 1.21; on 1.19 and 1.20 the JNE of its
            // `gp.m.curg != gp` check, before which RAX (the *_defer) is untouched.
            let code = binary.function_code(&stack).unwrap();
            let spot = probe_spot(code, stack.address, &[Register::RAX]).unwrap();
            let expected = if minor >= 21 { "push rbp" } else { "jne" };
            assert_eq!(spot.instruction, expected, "go{release}");
            assert!(spot.emulated, "go{release}");
            let code = binary.function_code(&mapassign).unwrap();
            let spot = probe_spot(code, mapassign.address, &[Register::RAX]).unwrap();
            assert_eq!(
                (spot.instruction.as_str(), spot.count_when),
                ("jbe", CountWhen::FallsThrough)
            );
        }
    }

    #[test]
    fn real_ret_offsets() {
        for toolchain in testbin::toolchains() {
            let release = &toolchain.version;
            let path = testbin::build(&toolchain, Program::Workload, Variant::PieStripped);
            let binary = GoBinary::open(&path).unwrap();
            for name in testbin::FUNCTIONS.iter().chain(&["runtime.deferprocStack"]) {
                let function = binary.function(name).unwrap();
                let code = binary.function_code(&function).unwrap();
                let rets = binary.ret_offsets(&function).unwrap();
                assert!(!rets.is_empty(), "go{release} {name}");
                for ret in rets {
                    assert_eq!(code[ret as usize], 0xc3, "go{release} {name}+{ret:#x}");
                }
            }
        }
    }
}
