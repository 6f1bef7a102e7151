//! Issue 12: `inspect`'s heap-defer sites against the compiler's own list. `go build
//! -gcflags=all=-d=defer` prints "heap-allocated defer" for every defer statement that
//! allocates a record each time it runs, in every package it compiles; the linker then drops
//! the functions nothing reaches. So every site inspect lists must be on the compiler's list,
//! and every one of the main package's must be in the binary. Checked on the test programs and
//! on a program linking most of the standard library, with the oldest and newest releases of
//! tests/go/releases.txt, for linux/amd64 and linux/arm64 (cross-built: `inspect` reads arm64
//! binaries on any machine). The build cache (target/defer-sites-cache) replays the compiler's
//! output, so only the first run compiles the standard library.

use std::{collections::BTreeSet, path::Path, process::Command};

use crate::support::*;

/// The programs whose own (main package) defers are checked.
const PROGRAMS: [&str; 5] = ["pending", "captures", "workload", "stress", "stdlib"];

/// `(absolute file, line)` of every heap-allocated defer the compiler reports for `program`,
/// and the binary it built.
fn compiler_sites(
    release: &str,
    goarch: &str,
    program: &str,
) -> (BTreeSet<(String, u64)>, std::path::PathBuf) {
    let root = workspace_root();
    let sources = root.join("tests/go");
    let out =
        root.join("target/defer-sites").join(format!("go{release}")).join(goarch).join(program);
    let go = root.join("target/go").join(release).join("go/bin/go");
    assert!(go.exists(), "{} is missing: run `cargo xtask setup`", go.display());
    let output = Command::new(&go)
        .args(["build", "-gcflags=all=-d=defer", "-o"])
        .arg(&out)
        .arg(format!("./{program}"))
        .current_dir(&sources)
        .env("GOTOOLCHAIN", "local")
        .env("GOARCH", goarch)
        .env("GOCACHE", root.join("target/defer-sites-cache").join(format!("{release}-{goarch}")))
        .env("GOFLAGS", "-mod=mod")
        .env("CGO_ENABLED", "0")
        .output()
        .unwrap();
    let (stdout, stderr) = text(&output);
    assert!(output.status.success(), "go{release} {goarch} build ./{program}: {stderr}{stdout}");
    let sites = stderr
        .lines()
        .filter(|line| line.ends_with(": heap-allocated defer"))
        .map(|line| {
            // FILE:LINE:COLUMN: heap-allocated defer; FILE is relative to tests/go where it
            // lies below it (the main package, a GOROOT inside the workspace).
            let mut parts = line.rsplitn(4, ':');
            let (_, _column, line, file) =
                (parts.next(), parts.next(), parts.next().unwrap(), parts.next().unwrap());
            let file = std::fs::canonicalize(sources.join(Path::new(file)))
                .unwrap_or_else(|e| panic!("{file}: {e}"))
                .display()
                .to_string();
            (file, line.parse().unwrap())
        })
        .collect();
    (sites, out)
}

#[test]
fn inspect_heap_defer_sites_are_the_compilers_own() {
    heap_defer_sites_are_the_compilers_own("amd64");
}

#[test]
fn inspect_arm64_heap_defer_sites_are_the_compilers_own() {
    heap_defer_sites_are_the_compilers_own("arm64");
}

fn heap_defer_sites_are_the_compilers_own(goarch: &str) {
    let mut releases = go_releases();
    releases.sort_by_key(|r| r.split('.').map(|n| n.parse::<u32>().unwrap()).collect::<Vec<_>>());
    for release in [releases[0].clone(), releases[releases.len() - 1].clone()] {
        for program in PROGRAMS {
            let what = format!("go{release} {goarch} {program}");
            let (compiler, binary) = compiler_sites(&release, goarch, program);
            let (_, inspection) = inspect(&binary);
            assert_eq!(inspection["plan"]["arch"], goarch, "{what}");
            let inspected: BTreeSet<(String, u64)> = inspection["heap_defer_sites"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| (s["file"].as_str().unwrap().to_owned(), s["line"].as_u64().unwrap()))
                .collect();
            let extra: Vec<_> = inspected.difference(&compiler).collect();
            assert!(
                extra.is_empty(),
                "{what}: inspect lists sites the compiler doesn't: {extra:?}"
            );
            let main_dir = workspace_root().join("tests/go").join(program).display().to_string();
            let main = |sites: &BTreeSet<(String, u64)>| -> BTreeSet<(String, u64)> {
                sites.iter().filter(|(file, _)| file.starts_with(&main_dir)).cloned().collect()
            };
            assert!(!main(&compiler).is_empty(), "{what}: the program has no loop defer");
            assert_eq!(main(&inspected), main(&compiler), "{what}: the main package's sites");
            if program == "stdlib" {
                let library = inspected.len() - main(&inspected).len();
                assert!(
                    library >= 3,
                    "{what}: only {library} standard-library sites: {inspected:?}"
                );
                println!(
                    "{what}: {} compiler sites, {} in the binary",
                    compiler.len(),
                    inspected.len()
                );
            }
        }
    }
}
