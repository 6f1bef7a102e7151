//! Where a probe goes inside a function, whatever the architecture: the spot
//! ([`ProbeSpot`]), whether the kernel emulates the instruction there, and which hits count as
//! calls. The decoding that finds them is per architecture (`binary::isa`).

use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct ProbeOffset {
    pub offset: u64,
    /// False for functions without a stack check (nosplit): the probe is on the entry.
    pub after_stack_check: bool,
}

/// When a probe's hit counts as a call of its function.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CountWhen {
    /// Every hit is one call.
    Always,
    /// The probe sits on the stack check's JBE, which a call reaches again when `morestack`
    /// grew its stack and restarted it: a hit counts only when the flags say the branch falls
    /// through (CF and ZF clear), once per call.
    FallsThrough,
}

/// Where a probe goes in a function, and what the kernel does with the instruction there.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ProbeSpot {
    pub offset: u64,
    /// The instruction the probe sits on, e.g. `jbe`, `push rbp`, `sub rsp`.
    pub instruction: String,
    /// Whether the kernel emulates it (about 0.7 µs a hit on the development VMs) rather than
    /// single-stepping it out of line (10–20 µs).
    pub emulated: bool,
    pub count_when: CountWhen,
}
