//! Issue 13: every probe sits on an instruction the kernel emulates (about 0.7 µs a hit on the
//! development VMs) rather than single-steps (10–20 µs), in the plans of every matrix binary
//! and of the real Debian Go servers (Go 1.19, stripped) the benchmarks run.

use std::path::PathBuf;

use serde_json::Value;

use crate::support::*;

/// Debian's Go servers, installed by `cargo xtask setup` (xtask's `DEBIAN_PROGRAMS`).
const DEBIAN_PROGRAMS: [&str; 4] =
    ["/usr/bin/prometheus", "/usr/bin/etcd", "/usr/bin/hugo", "/usr/bin/syncthing"];

/// Every binary under target/go-programs/matrix, and the Debian servers.
fn binaries() -> Vec<PathBuf> {
    let matrix = workspace_root().join("target/go-programs/matrix");
    let mut binaries: Vec<PathBuf> = std::fs::read_dir(&matrix)
        .unwrap_or_else(|e| panic!("{}: {e} (run `cargo xtask go-programs`)", matrix.display()))
        .flat_map(|dir| std::fs::read_dir(dir.unwrap().path()).unwrap())
        .map(|file| file.unwrap().path())
        .collect();
    binaries.sort();
    assert!(binaries.len() >= 20, "{binaries:?}");
    for program in DEBIAN_PROGRAMS {
        let path = PathBuf::from(program);
        assert!(path.exists(), "{program} is missing: install it with `cargo xtask setup`");
        binaries.push(path);
    }
    binaries
}

#[test]
fn every_probe_is_on_an_emulated_instruction() {
    for binary in binaries() {
        let (text, json) = inspect(&binary);
        let what = binary.display();
        let probes = json["plan"]["probes"].as_array().unwrap();
        assert!(!probes.is_empty(), "{what}");
        let stepped: Vec<&Value> = probes.iter().filter(|p| p["emulated"] != true).collect();
        assert!(stepped.is_empty(), "{what}: single-stepped probes {stepped:#?}");
        assert!(text.contains("every probe is on an instruction the kernel emulates"), "{what}");
        for probe in probes {
            // The stack check's JBE counts only fall-throughs (a call once, even when
            // morestack restarts it); every other spot counts every hit.
            let expected = match probe["instruction"].as_str().unwrap() {
                "jbe" => "falls_through",
                _ => "always",
            };
            assert_eq!(probe["count_when"], expected, "{what}: {probe}");
        }
        // Function probes of the runtime sit on their stack check's JBE, but for nosplit
        // functions (deferprocStack, fatalpanic), which start with an emulated instruction on
        // Go >= 1.21 and get the first emulated one before any branch on 1.19 and 1.20.
        for name in ["runtime.mallocgc", "runtime.goexit1", "runtime.mapassign_faststr"] {
            let probe = probes.iter().find(|p| p["symbol"] == name);
            assert!(probe.is_some_and(|p| p["instruction"] == "jbe"), "{what}: {probe:?}");
        }
    }
}
