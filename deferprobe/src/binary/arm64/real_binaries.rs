//! The arm64 decoding on real binaries: the test programs cross-built with GOARCH=arm64 by
//! every toolchain the tests use (plain, stripped, PIE), checked against the bytes and against
//! what the unstripped build's symbol table and DWARF say.

use crate::{
    arch::{Arch, GoRegister},
    binary::{
        GoBinary,
        prologue::CountWhen,
        testbin::{self, Program, Variant},
    },
    layout::{self, LayoutSource},
    plan::{PlanOptions, ProbePlan, ProbeProgram},
};

fn open(toolchain: &testbin::Toolchain, program: Program, variant: Variant) -> GoBinary {
    GoBinary::open(&testbin::build_for(Arch::Arm64, toolchain, program, variant)).unwrap()
}

/// The `BL` at `address` and where it goes.
fn bl_target(binary: &GoBinary, address: u64) -> u64 {
    let word = u32::from_le_bytes(binary.bytes_at(address, 4).unwrap().try_into().unwrap());
    assert_eq!(word & 0xfc00_0000, 0x9400_0000, "not a BL at {address:#x}: {word:#010x}");
    address.wrapping_add_signed(i64::from(((word << 6) as i32) >> 6) * 4)
}

/// Every probe on an instruction the kernel simulates: the stack check's `b.ls` (counting
/// fall-throughs), the `BL`s of deferproc and deferreturn, and in the nosplit functions the
/// first simulated instruction with their registers intact; struct offsets from DWARF or the
/// table, the same on both.
#[test]
fn plans_for_every_release_and_variant() {
    for toolchain in testbin::toolchains() {
        for program in Program::ARM64 {
            for variant in Variant::ALL {
                let what = format!("go{} arm64 {program:?} {variant:?}", toolchain.version);
                let binary = open(&toolchain, program, variant);
                assert_eq!(binary.arch(), Arch::Arm64, "{what}");
                let plan = ProbePlan::build(&binary, &PlanOptions::default()).unwrap();
                assert_eq!(plan.arch, Arch::Arm64, "{what}");
                let source = match variant.stripped() {
                    true => LayoutSource::ReleaseTable,
                    false => LayoutSource::Dwarf,
                };
                assert_eq!(plan.layout_source, source, "{what}");
                assert_eq!(Some(plan.layout), layout::for_release(Arch::Arm64, plan.release));
                let stepped: Vec<_> = plan.probes.iter().filter(|p| !p.emulated).collect();
                assert!(stepped.is_empty(), "{what}: single-stepped probes {stepped:#?}");
                for probe in &plan.probes {
                    let at = probe.address + probe.attach_offset;
                    match probe.call_to {
                        Some(callee) => {
                            assert_eq!(probe.instruction, "bl", "{what}");
                            let target = binary.function(callee).unwrap().address;
                            assert_eq!(bl_target(&binary, at), target, "{what} {probe:?}");
                        }
                        None if probe.count_when == CountWhen::FallsThrough => {
                            assert_eq!(probe.instruction, "b.ls", "{what} {probe:?}");
                            let word = binary.bytes_at(at, 4).unwrap();
                            // B.cond with condition LS (9).
                            assert_eq!((word[3], word[0] & 0x1f), (0x54, 9), "{what} {probe:?}");
                        }
                        None => {}
                    }
                    assert_eq!(
                        binary.file_offset(at).unwrap(),
                        probe.file_offset,
                        "{what} {probe:?}"
                    );
                }
                let spot = |program| {
                    let probe = plan
                        .probes_of(program)
                        .next()
                        .unwrap_or_else(|| panic!("{what}: no {program:?} probe"));
                    (probe.instruction.clone(), probe.count_when)
                };
                assert_eq!(
                    spot(ProbeProgram::Mallocgc),
                    ("b.ls".to_owned(), CountWhen::FallsThrough),
                    "{what}"
                );
                // deferprocStack: MOVD.W R30, …(RSP) first; the BNE of its `gp.m.curg != gp`
                // check, with R0 untouched. fatalpanic: an ADRP before R28 is written.
                assert_eq!(
                    spot(ProbeProgram::DeferProcStack),
                    ("b.ne".to_owned(), CountWhen::Always),
                    "{what}"
                );
                let (fatal, _) = spot(ProbeProgram::FatalPanic);
                assert!(fatal.starts_with("adrp") || fatal.starts_with('b'), "{what}: {fatal}");
                let deferprocs = plan.probes_of(ProbeProgram::DeferProc).count();
                assert!(deferprocs > 0, "{what}");
                for site in binary.heap_defer_sites().unwrap() {
                    assert_eq!(site.return_address, site.call_address + 4, "{what}");
                    assert!(
                        plan.probes_of(ProbeProgram::DeferProc)
                            .any(|p| p.address + p.attach_offset == site.call_address),
                        "{what}: {site:?} unprobed"
                    );
                }
            }
        }
    }
}

/// The heap-defer sites of the workload (the `defer` in `main.loopDefers`' loop), and the
/// closure each passes: its code and its struct type with one captured map, as on amd64.
#[test]
fn heap_defer_sites_and_their_closures() {
    let loop_defer = "defer func() { sink += len(m) }()";
    let line = testbin::source_line(Program::Workload, loop_defer);
    for toolchain in testbin::toolchains() {
        for variant in Variant::ALL {
            let what = format!("go{} arm64 {variant:?}", toolchain.version);
            let binary = open(&toolchain, Program::Workload, variant);
            let sites = binary.heap_defer_sites().unwrap();
            let main: Vec<_> =
                sites.iter().filter(|s| s.location.function.starts_with("main.")).collect();
            assert_eq!(main.len(), 1, "{what}: {sites:#?}");
            assert_eq!(
                (main[0].location.function.as_str(), main[0].location.line),
                ("main.loopDefers", line)
            );
            let closures = binary.closure_types_for(&sites);
            let deferred = closures
                .deferred_at(main[0].return_address)
                .unwrap_or_else(|| panic!("{what}: no closure for {:?}", main[0]));
            let function = binary.function_at(deferred.code).unwrap();
            assert_eq!(function.address, deferred.code, "{what}");
            assert!(function.name.starts_with("main.loopDefers.func"), "{what}: {function:?}");
            let layout = deferred.layout.unwrap_or_else(|| panic!("{what}: no layout"));
            let kinds: Vec<_> = layout.captures.iter().map(|c| c.typ.name.as_str()).collect();
            assert!(kinds.iter().any(|name| name.starts_with("map[")), "{what}: {layout:?}");
        }
    }
}

/// `runtime.allglen` / `allgptr` decoded from `runtime.allgadd`'s STLRs equal the symbol
/// table's; the stripped build (whose data the linker lays out a little differently) finds two
/// variables in its initialised or zeroed data too.
#[test]
fn runtime_variables_without_symbols() {
    for toolchain in testbin::toolchains() {
        let what = format!("go{} arm64", toolchain.version);
        let plain = open(&toolchain, Program::Workload, Variant::Plain);
        let allgadd = plain.function("runtime.allgadd").unwrap();
        let decoded =
            plain.isa().allg_from_allgadd(plain.function_code(&allgadd).unwrap(), allgadd.address);
        assert!(decoded.is_some(), "{what}");
        assert_eq!(decoded, plain.allg_variables(), "{what}");
        let stripped = open(&toolchain, Program::Workload, Variant::Stripped);
        let found = stripped.allg_variables().unwrap_or_else(|| panic!("{what}: stripped"));
        for variable in [found.allglen, found.allgptr] {
            assert_eq!(stripped.initial_u64(variable), Some(0), "{what}: {found:?}");
        }
    }
}

/// The struct offsets the arm64 DWARF gives are the built-in table's (so stripped arm64
/// binaries may use it).
#[test]
fn dwarf_layout_is_the_release_table() {
    for toolchain in testbin::toolchains() {
        let binary = open(&toolchain, Program::Workload, Variant::Plain);
        let release = binary.build_info().release;
        let dwarf = binary.runtime_layout_from_dwarf().unwrap();
        assert_eq!(dwarf, layout::for_release(Arch::Arm64, release), "go{}", toolchain.version);
    }
}

/// The ABI registers the programs read are the arm64 ones.
#[test]
fn program_registers_on_arm64() {
    let names: Vec<String> = ProbeProgram::DeferProc
        .registers()
        .iter()
        .map(|(register, _)| Arch::Arm64.register_name(*register))
        .collect();
    assert_eq!(names, ["x0", "x28", "sp", "pc"]);
    assert_eq!(super::register(GoRegister::ReturnAddress), Some(30));
}
