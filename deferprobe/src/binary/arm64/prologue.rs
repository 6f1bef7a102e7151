//! arm64: where a probe goes in a function. Go's arm64 stack check loads `g.stackguard0`
//! (`MOVD 16(g), R16`, g = R28), compares it with SP or with `SP - framesize` computed into
//! R17 (`SUB $n, RSP, R17`; huge frames `SUBS …, R17` then `BLO morestack` against
//! wrapping), and branches to the `morestack` call with `BLS`, which the kernel simulates.
//! Nosplit functions start with `MOVD.W R30, -n(RSP)`, which it steps; the probe then goes on
//! the first simulated instruction of the straight-line code after it, where that is safe.

use super::decode::{COND_LO, COND_LS, Decoded, SP, instructions};
use crate::binary::{
    BinaryError,
    prologue::{CountWhen, ProbeSpot},
};
use yaxpeax_arm::armv8::a64::{Opcode, Operand};

/// `g.stackguard0` (Go functions) and `g.stackguard1` (the runtime's C-like functions).
const STACK_GUARD_OFFSETS: [i32; 2] = [0x10, 0x18];

/// R16 and R17, the stack check's scratch registers; R27, the assembler's (a large frame
/// size is first moved into it).
const GUARD: u16 = 16;
const FRAME_BOTTOM: u16 = 17;
const ASSEMBLER_TEMP: u16 = 27;

/// At most this many instructions compute `SP - framesize` before the compare.
const MAX_FRAME_ARITHMETIC: usize = 4;

/// See [`crate::binary::isa::Isa::probe_spot`]; `reads` are register numbers (31: SP).
pub(super) fn probe_spot(
    code: &[u8],
    address: u64,
    reads: &[u16],
) -> Result<ProbeSpot, BinaryError> {
    let error = |reason| BinaryError::Code { address, reason };
    if let Some(branch) = stack_check_branch(code, address).map_err(error)? {
        return Ok(ProbeSpot {
            offset: branch.address - address,
            instruction: branch.describe(),
            emulated: true,
            count_when: CountWhen::FallsThrough,
        });
    }
    let decoded: Vec<Decoded> = instructions(code, address).map_while(Result::ok).collect();
    let first = decoded.first().ok_or_else(|| error("no instruction".into()))?;
    let entry = ProbeSpot {
        offset: 0,
        instruction: first.describe(),
        emulated: first.is_emulated(),
        count_when: CountWhen::Always,
    };
    let mut written = [false; 32];
    for instruction in &decoded {
        let offset = instruction.address - address;
        if instruction.is_emulated() {
            let clobbered = reads.iter().any(|&r| written.get(usize::from(r)) == Some(&true));
            // A jump back into the code before the spot would make a call reach it twice.
            let reentered = decoded.iter().any(|other| {
                other.opcode() != Opcode::BL
                    && other
                        .branch_target()
                        .is_some_and(|target| target.wrapping_sub(address) <= offset)
            });
            if clobbered || reentered {
                break;
            }
            return Ok(ProbeSpot {
                offset,
                instruction: instruction.describe(),
                emulated: true,
                count_when: CountWhen::Always,
            });
        }
        if instruction.leaves_straight_line() {
            break;
        }
        for register in instruction.written_registers() {
            written[usize::from(register)] = true;
        }
    }
    Ok(entry)
}

/// The stack check's `BLS`, or None if the code has no stack check (it doesn't start with
/// the load of the stack guard); a check that starts so but doesn't end so is an error.
fn stack_check_branch(code: &[u8], address: u64) -> Result<Option<Decoded>, String> {
    let mut decoded = instructions(code, address);
    let mut next = || decoded.next().unwrap_or_else(|| Err("code ends inside the prologue".into()));
    let first = next()?;
    if !is_stack_guard_load(&first) {
        return Ok(None);
    }
    let unrecognised =
        || format!("unrecognised stack-check prologue at +{:#x}", first.address - address);
    let mut compare = next()?;
    let mut arithmetic = 0;
    while !is_stack_guard_compare(&compare) {
        let scratch_only =
            compare.written_registers().iter().all(|r| *r == FRAME_BOTTOM || *r == ASSEMBLER_TEMP);
        let wrap_check = compare.opcode() == Opcode::Bcc(COND_LO);
        arithmetic += 1;
        if arithmetic > MAX_FRAME_ARITHMETIC || !(scratch_only || wrap_check) {
            return Err(unrecognised());
        }
        compare = next()?;
    }
    let branch = next()?;
    if branch.opcode() != Opcode::Bcc(COND_LS) {
        return Err(format!(
            "stack check at +{:#x} is not followed by BLS",
            compare.address - address
        ));
    }
    Ok(Some(branch))
}

/// `MOVD 16(R28), R16` (or 24).
fn is_stack_guard_load(instruction: &Decoded) -> bool {
    instruction.opcode() == Opcode::LDR
        && instruction.operand(0) == Operand::Register(yaxpeax_arm::armv8::a64::SizeCode::X, GUARD)
        && matches!(instruction.operand(1), Operand::RegPreIndex(28, offset, false)
            if STACK_GUARD_OFFSETS.contains(&offset))
}

/// `CMP R16, RSP` or `CMP R16, R17`: SUBS into the zero register of SP or R17 minus R16.
fn is_stack_guard_compare(instruction: &Decoded) -> bool {
    let minuend = matches!(
        instruction.operand(1),
        Operand::RegisterOrSP(_, SP)
            | Operand::Register(_, FRAME_BOTTOM)
            | Operand::RegisterOrSP(_, FRAME_BOTTOM)
    );
    let guard = matches!(
        instruction.operand(2),
        Operand::Register(_, GUARD) | Operand::RegShift(_, 0, _, GUARD)
    );
    instruction.opcode() == Opcode::SUBS
        && matches!(instruction.operand(0), Operand::Register(_, 31))
        && minuend
        && guard
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(words: &[u32]) -> Vec<u8> {
        words.iter().flat_map(|w| w.to_le_bytes()).collect()
    }

    const LOAD_GUARD: u32 = 0xf940_0b90; // MOVD 16(R28), R16
    const CMP_SP: u32 = 0xeb30_63ff; // CMP R16, RSP
    const SUB_R17: u32 = 0xd101_43f1; // SUB $80, RSP, R17
    const CMP_R17: u32 = 0xeb10_023f; // CMP R16, R17
    const BLS: u32 = 0x5400_0529;
    const PUSH_LR: u32 = 0xf81d_0ffe; // MOVD.W R30, -48(RSP)
    const STUR_FP: u32 = 0xf81f_83fd; // MOVD R29, -8(RSP)
    const SUB_FP: u32 = 0xd100_23fd; // SUB $8, RSP, R29
    const RET: u32 = 0xd65f_03c0;

    fn spot(words: &[u32], reads: &[u16]) -> ProbeSpot {
        probe_spot(&code(words), 0x1000, reads).unwrap()
    }

    #[test]
    fn stack_checks() {
        let small = spot(&[LOAD_GUARD, CMP_SP, BLS, PUSH_LR], &[0]);
        assert_eq!((small.offset, small.instruction.as_str()), (8, "b.ls"));
        assert_eq!((small.emulated, small.count_when), (true, CountWhen::FallsThrough));
        let large = spot(&[LOAD_GUARD, SUB_R17, CMP_R17, BLS, PUSH_LR], &[0]);
        assert_eq!(large.offset, 12);
        // Starts like a stack check, doesn't end like one.
        let broken = probe_spot(&code(&[LOAD_GUARD, CMP_SP, PUSH_LR]), 0x1000, &[0]);
        assert_eq!(
            broken.unwrap_err().to_string(),
            "machine code at 0x1000: stack check at +0x4 is not followed by BLS"
        );
        assert!(probe_spot(&code(&[LOAD_GUARD, PUSH_LR, PUSH_LR]), 0x1000, &[0]).is_err());
        assert!(probe_spot(&code(&[LOAD_GUARD]), 0x1000, &[0]).is_err());
    }

    /// Nosplit: the first simulated instruction before which no read register is written.
    #[test]
    fn nosplit_spots() {
        // deferprocStack (Go 1.27): MOVD.W; MOVD R29; SUB; MOVD 48(R28), R2; MOVD 184(R2), R2;
        // CMP R2, R28; BNE.
        let words =
            [PUSH_LR, STUR_FP, SUB_FP, 0xf940_1b82, 0xf940_5c42, 0xeb02_039f, 0x5400_0161, RET];
        let bne = spot(&words, &[0]);
        assert_eq!((bne.offset, bne.instruction.as_str(), bne.emulated), (24, "b.ne", true));
        assert_eq!(bne.count_when, CountWhen::Always);
        // Reading R2 or SP: written before the BNE, so the entry (stepped).
        for reads in [[2], [SP]] {
            let entry = spot(&words, &reads);
            assert_eq!((entry.offset, entry.emulated), (0, false), "{reads:?}");
        }
        // A branch back to the entry: CBZ R0, -4 words.
        let back = spot(&[PUSH_LR, STUR_FP, 0xb4ff_ffc0, RET], &[0]);
        assert!(!back.emulated);
    }
}
