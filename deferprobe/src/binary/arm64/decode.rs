//! arm64 instructions as yaxpeax-arm decodes them, and what the other arm64 modules ask of
//! one: where a branch goes, which general registers it writes, whether Linux's arm64 uprobes
//! simulate it, how `inspect` names it. Registers are numbered 0–31 with 31 the stack pointer
//! (writes to the zero register, also number 31 in the encoding, are no writes).

use yaxpeax_arch::{Decoder as _, U8Reader};
use yaxpeax_arm::armv8::a64::{InstDecoder, Instruction, Opcode, Operand};

/// The stack pointer's slot.
pub(super) const SP: u16 = 31;
/// The link register.
pub(super) const LR: u16 = 30;

/// `B.cond` condition codes (the encoding's).
pub(super) const COND_LO: u8 = 3;
pub(super) const COND_LS: u8 = 9;

/// One decoded instruction and its address.
#[derive(Clone, Debug)]
pub(super) struct Decoded {
    pub address: u64,
    pub instruction: Instruction,
}

/// Decodes `code` (the function at `address`) one 4-byte word at a time; a word that is no
/// instruction, or a last word cut short, is an error item.
pub(super) fn instructions(
    code: &[u8],
    address: u64,
) -> impl Iterator<Item = Result<Decoded, String>> + '_ {
    let decoder = InstDecoder::default();
    code.chunks(4).enumerate().map(move |(index, word)| {
        let offset = index as u64 * 4;
        if word.len() < 4 {
            return Err(format!("truncated instruction at +{offset:#x}"));
        }
        decoder
            .decode(&mut U8Reader::new(word))
            .map(|instruction| Decoded { address: address + offset, instruction })
            .map_err(|_| format!("undecodable instruction at +{offset:#x}"))
    })
}

impl Decoded {
    pub fn opcode(&self) -> Opcode {
        self.instruction.opcode
    }

    pub fn operand(&self, index: usize) -> Operand {
        self.instruction.operands[index]
    }

    /// The target of a direct branch or call (B, BL, B.cond, CBZ/CBNZ, TBZ/TBNZ).
    pub fn branch_target(&self) -> Option<u64> {
        if !is_direct_branch(self.opcode()) {
            return None;
        }
        self.instruction.operands.iter().find_map(|operand| match operand {
            Operand::PCOffset(offset) => Some(self.address.wrapping_add_signed(*offset)),
            _ => None,
        })
    }

    /// The address an ADR or ADRP computes.
    pub fn pc_relative_address(&self) -> Option<u64> {
        let Operand::PCOffset(offset) = self.operand(1) else { return None };
        match self.opcode() {
            Opcode::ADR => Some(self.address.wrapping_add_signed(offset)),
            Opcode::ADRP => Some((self.address & !0xfff).wrapping_add_signed(offset)),
            _ => None,
        }
    }

    /// Whether Linux's arm64 uprobes simulate it (arch/arm64/kernel/probes/decode-insn.c,
    /// `arm_probe_decode_insn`): B, BL, B.cond, CBZ/CBNZ, TBZ/TBNZ, BR/BLR/RET, ADR/ADRP and
    /// the general-register literal loads. Every other instruction is stepped out of line.
    pub fn is_emulated(&self) -> bool {
        match self.opcode() {
            Opcode::B
            | Opcode::BL
            | Opcode::Bcc(_)
            | Opcode::CBZ
            | Opcode::CBNZ
            | Opcode::TBZ
            | Opcode::TBNZ
            | Opcode::BR
            | Opcode::BLR
            | Opcode::RET
            | Opcode::ADR
            | Opcode::ADRP => true,
            Opcode::LDR | Opcode::LDRSW => {
                matches!(self.operand(0), Operand::Register(..))
                    && matches!(self.operand(1), Operand::PCOffset(_))
            }
            _ => false,
        }
    }

    /// Whether control may leave the straight line here (a branch, call, return, trap).
    pub fn leaves_straight_line(&self) -> bool {
        is_direct_branch(self.opcode())
            || matches!(
                self.opcode(),
                Opcode::BR
                    | Opcode::BLR
                    | Opcode::RET
                    | Opcode::SVC
                    | Opcode::HVC
                    | Opcode::SMC
                    | Opcode::BRK
                    | Opcode::HLT
                    | Opcode::UDF
                    | Opcode::ERET
            )
    }

    /// `b.ls`, `bl`, `adrp x2`: the mnemonic and a register operand, as `inspect` shows it.
    pub fn describe(&self) -> String {
        let text = self.instruction.to_string();
        let mut words = text.split([' ', ',']).filter(|word| !word.is_empty());
        let mnemonic = words.next().unwrap_or_default().to_owned();
        match words.next() {
            Some(register)
                if matches!(self.operand(0), Operand::Register(..) | Operand::RegisterOrSP(..)) =>
            {
                format!("{mnemonic} {register}")
            }
            _ => mnemonic,
        }
    }

    /// The general registers it writes, always or maybe (over-approximated: a scan must stop
    /// believing what it knew about them): its destination(s), a base register written back,
    /// the link register of a call.
    pub fn written_registers(&self) -> Vec<u16> {
        let mut written = Vec::new();
        let register = |operand: Operand| match operand {
            Operand::Register(_, 31) => None,
            Operand::Register(_, n) | Operand::RegisterOrSP(_, n) | Operand::RegisterPair(_, n) => {
                Some(n)
            }
            _ => None,
        };
        let opcode = self.opcode();
        let destinations = match opcode {
            _ if writes_nothing_named(opcode) => 0,
            Opcode::LDP
            | Opcode::LDPSW
            | Opcode::LDNP
            | Opcode::LDXP
            | Opcode::LDAXP
            | Opcode::CASP(_) => 2,
            _ if is_atomic_rmw(opcode) => 2,
            _ => 1,
        };
        written
            .extend(self.instruction.operands[..destinations].iter().filter_map(|o| register(*o)));
        for operand in self.instruction.operands {
            match operand {
                Operand::RegPreIndex(base, _, true)
                | Operand::RegPostIndex(base, _)
                | Operand::RegPostIndexReg(base, _) => written.push(base),
                _ => {}
            }
        }
        if matches!(opcode, Opcode::BL | Opcode::BLR) {
            written.push(LR);
        }
        written
    }
}

fn is_direct_branch(opcode: Opcode) -> bool {
    matches!(
        opcode,
        Opcode::B
            | Opcode::BL
            | Opcode::Bcc(_)
            | Opcode::CBZ
            | Opcode::CBNZ
            | Opcode::TBZ
            | Opcode::TBNZ
    )
}

/// Atomic read-modify-writes whose second register receives the old value (SWP, LDADD, …) or
/// whose first does (CAS): both counted as written.
fn is_atomic_rmw(opcode: Opcode) -> bool {
    matches!(
        opcode,
        Opcode::SWP(_)
            | Opcode::SWPB(_)
            | Opcode::SWPH(_)
            | Opcode::CAS(_)
            | Opcode::CASB(_)
            | Opcode::CASH(_)
            | Opcode::LDADD(_)
            | Opcode::LDADDB(_)
            | Opcode::LDADDH(_)
            | Opcode::LDCLR(_)
            | Opcode::LDCLRB(_)
            | Opcode::LDCLRH(_)
            | Opcode::LDEOR(_)
            | Opcode::LDEORB(_)
            | Opcode::LDEORH(_)
            | Opcode::LDSET(_)
            | Opcode::LDSETB(_)
            | Opcode::LDSETH(_)
            | Opcode::LDSMAX(_)
            | Opcode::LDSMAXB(_)
            | Opcode::LDSMAXH(_)
            | Opcode::LDSMIN(_)
            | Opcode::LDSMINB(_)
            | Opcode::LDSMINH(_)
            | Opcode::LDUMAX(_)
            | Opcode::LDUMAXB(_)
            | Opcode::LDUMAXH(_)
            | Opcode::LDUMIN(_)
            | Opcode::LDUMINB(_)
            | Opcode::LDUMINH(_)
    )
}

/// Instructions whose first operand is read, not written: stores (but the store-exclusives,
/// whose first operand is the status they write), branches, compares into flags, hints.
fn writes_nothing_named(opcode: Opcode) -> bool {
    matches!(
        opcode,
        Opcode::STR
            | Opcode::STRB
            | Opcode::STRH
            | Opcode::STRW
            | Opcode::STUR
            | Opcode::STURB
            | Opcode::STURH
            | Opcode::STP
            | Opcode::STNP
            | Opcode::STLR
            | Opcode::STLRB
            | Opcode::STLRH
            | Opcode::STLLR
            | Opcode::STLLRB
            | Opcode::STLLRH
            | Opcode::STLUR
            | Opcode::STLURB
            | Opcode::STLURH
            | Opcode::STTR
            | Opcode::STTRB
            | Opcode::STTRH
            | Opcode::ST1
            | Opcode::ST2
            | Opcode::ST3
            | Opcode::ST4
            | Opcode::STG
            | Opcode::STZG
            | Opcode::ST2G
            | Opcode::STZ2G
            | Opcode::STGM
            | Opcode::STZGM
            | Opcode::B
            | Opcode::BL
            | Opcode::Bcc(_)
            | Opcode::CBZ
            | Opcode::CBNZ
            | Opcode::TBZ
            | Opcode::TBNZ
            | Opcode::BR
            | Opcode::BLR
            | Opcode::RET
            | Opcode::CCMP
            | Opcode::CCMN
            | Opcode::HINT
            | Opcode::PRFM
            | Opcode::PRFUM
            | Opcode::MSR
            | Opcode::SYS(_)
            | Opcode::DMB(_)
            | Opcode::DSB(_)
            | Opcode::ISB
            | Opcode::CLREX
            | Opcode::SVC
            | Opcode::BRK
            | Opcode::HLT
            | Opcode::UDF
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(word: u32, address: u64) -> Decoded {
        instructions(&word.to_le_bytes(), address).next().unwrap().unwrap()
    }

    /// Encodings from a Go 1.27 arm64 binary (`go tool objdump`).
    #[test]
    fn decoded_as_go_tool_objdump_says() {
        let bls = one(0x5400_0529, 0x52ca8); // BLS 41(PC)
        assert_eq!(bls.opcode(), Opcode::Bcc(COND_LS));
        assert_eq!(bls.branch_target(), Some(0x52ca8 + 41 * 4));
        assert!(bls.is_emulated());
        assert_eq!(bls.describe(), "b.ls");
        let bl = one(0x97fc_e2a0, 0x11a220); // CALL runtime.deferproc(SB)
        assert_eq!(bl.branch_target(), Some(0x11a220 - 816512));
        assert_eq!(bl.written_registers(), [LR]);
        let adrp = one(0xd000_0961, 0x11a1e0); // ADRP 1236992(PC), R1
        assert_eq!(adrp.pc_relative_address(), Some(0x11a000 + 1236992));
        assert_eq!(adrp.describe(), "adrp x1");
        assert!(adrp.is_emulated());
        // MOVD.W R30, -48(RSP): writes back SP only; stepped.
        let push = one(0xf81d_0ffe, 0);
        assert_eq!(push.written_registers(), [SP]);
        assert!(!push.is_emulated());
        // CMP R16, RSP writes no register; STR x3, [x0] neither; LDP writes two.
        assert_eq!(one(0xeb30_63ff, 0).written_registers(), Vec::<u16>::new());
        assert_eq!(one(0xf900_0003, 0).written_registers(), Vec::<u16>::new());
        assert_eq!(one(0xa940_87e0, 0).written_registers(), [0, 1]);
        assert_eq!(one(0xf844_07fe, 0).written_registers(), [LR, SP]); // MOVD.P 64(RSP), R30
        assert!(one(0x5800_0040, 0).is_emulated()); // LDR x0, literal
        assert!(!one(0xd503_201f, 0).is_emulated()); // NOP: stepped on Linux 6.1
        let err = instructions(&[0x1f, 0x20, 0x03], 0).next().unwrap().unwrap_err();
        assert_eq!(err, "truncated instruction at +0x0");
    }
}
