//! amd64 machine code, decoded with iced-x86: [`Amd64`] is its [`Isa`]. Go's ABIInternal
//! registers as iced-x86 names them are here ([`register`]).

pub(crate) mod calls;
mod closures;
pub(crate) mod prologue;
mod variables;

use iced_x86::Register;

use crate::{
    arch::GoRegister,
    binary::{
        AllgVariables, BinaryError,
        closures::{Built, Callees},
        isa::{DirectCall, Isa},
        prologue::ProbeSpot,
    },
};

/// ABIInternal's integer argument registers, in order.
const ARGS: [Register; 9] = [
    Register::RAX,
    Register::RBX,
    Register::RCX,
    Register::RDI,
    Register::RSI,
    Register::R8,
    Register::R9,
    Register::R10,
    Register::R11,
];

/// The register that holds `register`'s role: `[rsp]` (the return address) is RSP, which must
/// stay unchanged; the program counter is none.
pub(crate) fn register(register: GoRegister) -> Option<Register> {
    match register {
        GoRegister::Arg(n) => ARGS.get(usize::from(n)).copied(),
        GoRegister::G => Some(Register::R14),
        GoRegister::ClosureContext => Some(Register::RDX),
        GoRegister::Sp | GoRegister::ReturnAddress => Some(Register::RSP),
        GoRegister::Pc => None,
    }
}

pub(crate) struct Amd64;

impl Isa for Amd64 {
    fn probe_spot(
        &self,
        code: &[u8],
        address: u64,
        reads: &[GoRegister],
    ) -> Result<ProbeSpot, BinaryError> {
        let reads: Vec<Register> = reads.iter().filter_map(|r| register(*r)).collect();
        prologue::probe_spot(code, address, &reads)
    }

    fn direct_calls(
        &self,
        code: &[u8],
        address: u64,
        targets: &[u64],
    ) -> Result<Vec<DirectCall>, BinaryError> {
        calls::direct_calls(code, address, targets)
    }

    fn closures_built(
        &self,
        code: &[u8],
        address: u64,
        callees: &Callees,
        is_type: &dyn Fn(u64) -> bool,
        is_function: &dyn Fn(u64) -> bool,
    ) -> Built {
        closures::closures_built(code, address, callees, is_type, is_function)
    }

    fn allg_from_allgadd(&self, code: &[u8], address: u64) -> Option<AllgVariables> {
        variables::from_allgadd(code, address)
    }
}
