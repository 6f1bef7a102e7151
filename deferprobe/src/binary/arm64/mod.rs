//! arm64 machine code, decoded with yaxpeax-arm: [`Arm64`] is its [`Isa`]. Go's ABIInternal
//! registers by number are here ([`register`]).

mod calls;
mod closures;
mod decode;
mod prologue;
mod variables;

use crate::{
    arch::GoRegister,
    binary::{
        AllgVariables, BinaryError,
        closures::{Built, Callees},
        isa::{DirectCall, Isa},
        prologue::ProbeSpot,
    },
};

/// The register number (31: SP) that holds `register`'s role: arguments in R0–R15, g in R28,
/// the closure context in R26, the return address in the link register R30; the program
/// counter is none.
pub(crate) fn register(register: GoRegister) -> Option<u16> {
    match register {
        GoRegister::Arg(n) if n < 16 => Some(u16::from(n)),
        GoRegister::Arg(_) | GoRegister::Pc => None,
        GoRegister::G => Some(28),
        GoRegister::ClosureContext => Some(26),
        GoRegister::Sp => Some(decode::SP),
        GoRegister::ReturnAddress => Some(decode::LR),
    }
}

pub(crate) struct Arm64;

impl Isa for Arm64 {
    fn probe_spot(
        &self,
        code: &[u8],
        address: u64,
        reads: &[GoRegister],
    ) -> Result<ProbeSpot, BinaryError> {
        let reads: Vec<u16> = reads.iter().filter_map(|r| register(*r)).collect();
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

#[cfg(test)]
mod real_binaries;
