//! The processor architectures deferprobe reads and traces Go programs on (linux/amd64,
//! linux/arm64), chosen from the binary's ELF machine, and Go's register ABI (ABIInternal) on
//! each: which register holds an argument, the current goroutine, the return address. Machine
//! code decoding per architecture lives in `binary::isa`; the eBPF programs have their own
//! per-architecture register accessors (deferprobe-ebpf's `arch.rs`).

use serde::Serialize;

/// A processor architecture Go binaries are built for, by its GOARCH name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Arch {
    Amd64,
    Arm64,
}

/// A register by the role Go's ABIInternal gives it, whatever it is called on an architecture.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GoRegister {
    /// The n-th integer argument (0-based): RAX, RBX, RCX, RDI, … on amd64, R0, R1, … on arm64.
    Arg(u8),
    /// The current goroutine's `g`: R14 on amd64, R28 on arm64.
    G,
    /// The closure context: RDX on amd64, R26 on arm64.
    ClosureContext,
    /// The stack pointer.
    Sp,
    /// The return address at a function's entry: the word at [RSP] on amd64 (so RSP must be
    /// unchanged), the link register (R30) on arm64.
    ReturnAddress,
    /// The probed instruction's own address (RIP, PC): never clobbered.
    Pc,
}

/// ABIInternal's integer argument registers on amd64, in order.
const AMD64_ARGS: [&str; 9] = ["rax", "rbx", "rcx", "rdi", "rsi", "r8", "r9", "r10", "r11"];

impl Arch {
    /// Every architecture deferprobe supports.
    pub const ALL: [Arch; 2] = [Arch::Amd64, Arch::Arm64];

    /// The architecture of an ELF file's machine, if deferprobe supports it.
    pub fn from_elf(architecture: object::Architecture) -> Option<Arch> {
        match architecture {
            object::Architecture::X86_64 => Some(Arch::Amd64),
            object::Architecture::Aarch64 => Some(Arch::Arm64),
            _ => None,
        }
    }

    /// The architecture this deferprobe runs on: the only one whose programs it can probe
    /// (`inspect` reads both).
    pub const fn host() -> Arch {
        #[cfg(target_arch = "x86_64")]
        let host = Arch::Amd64;
        #[cfg(target_arch = "aarch64")]
        let host = Arch::Arm64;
        host
    }

    /// `amd64`, `arm64`.
    pub fn goarch(self) -> &'static str {
        match self {
            Arch::Amd64 => "amd64",
            Arch::Arm64 => "arm64",
        }
    }

    /// The register's name as the architecture's assembly calls it (`rax`, `x0`, `[rsp]`,
    /// `lr`): what `inspect` prints.
    pub fn register_name(self, register: GoRegister) -> String {
        match (self, register) {
            (Arch::Amd64, GoRegister::Arg(n)) => {
                AMD64_ARGS.get(usize::from(n)).copied().unwrap_or("stack").to_owned()
            }
            (Arch::Arm64, GoRegister::Arg(n)) if n < 16 => format!("x{n}"),
            (Arch::Arm64, GoRegister::Arg(_)) => "stack".to_owned(),
            (Arch::Amd64, GoRegister::G) => "r14".to_owned(),
            (Arch::Arm64, GoRegister::G) => "x28".to_owned(),
            (Arch::Amd64, GoRegister::ClosureContext) => "rdx".to_owned(),
            (Arch::Arm64, GoRegister::ClosureContext) => "x26".to_owned(),
            (Arch::Amd64, GoRegister::Sp) => "rsp".to_owned(),
            (Arch::Arm64, GoRegister::Sp) => "sp".to_owned(),
            (Arch::Amd64, GoRegister::ReturnAddress) => "[rsp]".to_owned(),
            (Arch::Arm64, GoRegister::ReturnAddress) => "lr".to_owned(),
            (Arch::Amd64, GoRegister::Pc) => "rip".to_owned(),
            (Arch::Arm64, GoRegister::Pc) => "pc".to_owned(),
        }
    }

    /// Length of the direct call instruction (`CALL rel32`, `BL`): a call's return address is
    /// its address plus this.
    pub fn call_len(self) -> u64 {
        match self {
            Arch::Amd64 => deferprobe_common::amd64::CALL_LEN,
            Arch::Arm64 => deferprobe_common::arm64::CALL_LEN,
        }
    }

    /// The direct call's mnemonic, as the plan shows the instruction a call-site probe sits on.
    pub fn call_mnemonic(self) -> &'static str {
        match self {
            Arch::Amd64 => "call",
            Arch::Arm64 => "bl",
        }
    }
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.goarch())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn register_names() {
        let names = |arch: Arch| {
            [GoRegister::Arg(0), GoRegister::Arg(2), GoRegister::G, GoRegister::ReturnAddress]
                .map(|r| arch.register_name(r))
        };
        assert_eq!(names(Arch::Amd64), ["rax", "rcx", "r14", "[rsp]"]);
        assert_eq!(names(Arch::Arm64), ["x0", "x2", "x28", "lr"]);
        assert_eq!(Arch::Arm64.register_name(GoRegister::ClosureContext), "x26");
        assert_eq!(Arch::from_elf(object::Architecture::Aarch64), Some(Arch::Arm64));
        assert_eq!(Arch::from_elf(object::Architecture::I386), None);
        assert_eq!((Arch::Amd64.call_len(), Arch::Arm64.call_len()), (5, 4));
    }
}
