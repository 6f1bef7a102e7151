//! deferprobe's own machine code that probes are timed on (the governor's calibration) and, in
//! the tests, that the stack-check cookie is checked on, written per architecture. The
//! calibration target holds one instruction of each class the probe plan uses, so that a hit on
//! each is timed: a Go-like stack check's conditional branch (`JBE`, `B.LS`), falling through,
//! probed with the fall-through cookie so the kernel program's flags check runs as it does
//! there; and a direct call (`CALL`, `BL`), like the `runtime.deferproc` / `deferreturn` call
//! sites. Both are instructions the kernel emulates, as every probe of the plan sits on one.
//! Exported under fixed names, so that a probe finds them in /proc/self/exe's symbol table.

// amd64: TEST clears CF and RSP is not zero, so the JBE falls through.
#[cfg(target_arch = "x86_64")]
std::arch::global_asm!(
    ".globl deferprobe_calibration_target",
    ".type deferprobe_calibration_target, @function",
    "deferprobe_calibration_target:",
    "test rsp, rsp",
    "jbe 1f",
    "1:",
    "push rbp",
    "mov rbp, rsp",
    "call deferprobe_calibration_leaf",
    "pop rbp",
    "ret",
    ".size deferprobe_calibration_target, . - deferprobe_calibration_target",
    ".type deferprobe_calibration_leaf, @function",
    "deferprobe_calibration_leaf:",
    "lea rax, [rdi + 1]",
    "ret",
    ".size deferprobe_calibration_leaf, . - deferprobe_calibration_leaf",
);

/// The calibration target's JBE, after `test rsp, rsp` (3 bytes), and its CALL, after the JBE
/// (2), `push rbp` (1) and `mov rbp, rsp` (3).
#[cfg(target_arch = "x86_64")]
pub(crate) const BRANCH_OFFSET: u64 = 3;
#[cfg(target_arch = "x86_64")]
pub(crate) const CALL_OFFSET: u64 = 9;

// arm64: `cmp sp, #0` sets C (no borrow) and clears Z (SP is not zero), so the B.LS falls
// through.
#[cfg(target_arch = "aarch64")]
std::arch::global_asm!(
    ".globl deferprobe_calibration_target",
    ".type deferprobe_calibration_target, @function",
    "deferprobe_calibration_target:",
    "cmp sp, #0",
    "b.ls 1f",
    "1:",
    "stp x29, x30, [sp, #-16]!",
    "mov x29, sp",
    "bl deferprobe_calibration_leaf",
    "ldp x29, x30, [sp], #16",
    "ret",
    ".size deferprobe_calibration_target, . - deferprobe_calibration_target",
    ".type deferprobe_calibration_leaf, @function",
    "deferprobe_calibration_leaf:",
    "add x0, x0, #1",
    "ret",
    ".size deferprobe_calibration_leaf, . - deferprobe_calibration_leaf",
);

/// The calibration target's B.LS, after the `cmp`, and its BL, after the B.LS, `stp` and `mov`.
#[cfg(target_arch = "aarch64")]
pub(crate) const BRANCH_OFFSET: u64 = 4;
#[cfg(target_arch = "aarch64")]
pub(crate) const CALL_OFFSET: u64 = 16;

unsafe extern "C" {
    /// Returns `value + 1`, through the branch and the call above.
    pub(crate) fn deferprobe_calibration_target(value: u64) -> u64;
}

/// Two stack-check branches: one falls through, one is taken (as to `morestack`), each at
/// the offset given below in its function.
#[cfg(test)]
pub(crate) mod stack_checks {
    // amd64: TEST clears CF and RSP is not zero; XOR sets ZF.
    #[cfg(target_arch = "x86_64")]
    std::arch::global_asm!(
        ".globl deferprobe_test_falls_through",
        "deferprobe_test_falls_through:",
        "test rsp, rsp",
        "jbe 1f",
        "1:",
        "ret",
        ".globl deferprobe_test_branch_taken",
        "deferprobe_test_branch_taken:",
        "xor eax, eax",
        "jbe 2f",
        "2:",
        "ret",
    );
    #[cfg(target_arch = "x86_64")]
    pub(crate) const OFFSETS: [u64; 2] = [3, 2];

    // arm64: `cmp sp, #0` sets C and clears Z; `cmp x0, x0` sets Z.
    #[cfg(target_arch = "aarch64")]
    std::arch::global_asm!(
        ".globl deferprobe_test_falls_through",
        "deferprobe_test_falls_through:",
        "cmp sp, #0",
        "b.ls 1f",
        "1:",
        "ret",
        ".globl deferprobe_test_branch_taken",
        "deferprobe_test_branch_taken:",
        "cmp x0, x0",
        "b.ls 2f",
        "2:",
        "ret",
    );
    #[cfg(target_arch = "aarch64")]
    pub(crate) const OFFSETS: [u64; 2] = [4, 4];

    unsafe extern "C" {
        pub(crate) fn deferprobe_test_falls_through();
        pub(crate) fn deferprobe_test_branch_taken();
    }
}
