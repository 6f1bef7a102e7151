//! Issue 5, "Bad input": every mistake a user can make gets one clear line on stderr and the
//! documented exit code (README "Exit codes"). Extends cli_errors.rs (flags, missing pid and
//! file, non-Go process, missing privileges) with kernel threads, Go releases older than 1.19,
//! garbage and truncated ELF files, and targets whose executable changed on disk.

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    thread,
    time::Duration,
};

use crate::{cli_errors::assert_fails, support::*};

/// `.go.buildinfo` magic; the version string follows the 32-byte header, prefixed by its length.
const BUILDINFO_MAGIC: &[u8] = b"\xff Go buildinf:";

/// A file in a fresh per-test directory, removed (with the directory) on drop.
pub(crate) struct Scratch {
    pub(crate) dir: PathBuf,
}

impl Scratch {
    pub(crate) fn new(test: &str) -> Scratch {
        let dir =
            workspace_root().join("target/e2e").join(format!("{test}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        Scratch { dir }
    }

    /// Writes `bytes` to `name` as an executable file (not to be run by this process: see
    /// [`Scratch::copy`]).
    pub(crate) fn file(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let path = self.dir.join(name);
        fs::write(&path, bytes).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    /// Copies the executable `from` to `name` with cp(1). Written from this multi-threaded test
    /// process, its write descriptor could be inherited by another test's fork and make
    /// running it fail with ETXTBSY.
    pub(crate) fn copy(&self, name: &str, from: &Path) -> PathBuf {
        let path = self.dir.join(name);
        let status = std::process::Command::new("cp").arg(from).arg(&path).status().unwrap();
        assert!(status.success(), "cp {} {}", from.display(), path.display());
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn path_arg(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[test]
fn invalid_values_and_unknown_flags_exit_64() {
    for (args, message) in [
        (&["run", "--pid", "1", "--duration", "-5s"][..], "longer than zero"),
        (&["run", "--pid", "1", "--max-overhead", "-1"], "must be more than 0"),
        (&["run", "--pid", "1", "--interval", "1ns"], "must be at least 100ms"),
        (&["run", "--pid", "1", "--kill-after", "-1s"], "longer than zero"),
        (&["run", "--pid", "1", "--duration", "0s"], "longer than zero"),
        (&["run", "--pid", "1", "--duration", ""], "invalid value '' for '--duration"),
        (&["run", "--pid", "1", "--interval", "soon"], "not a duration"),
        (&["run", "--pid", "1", "--interval", "5"], "time unit needed"),
        (&["run", "--pid", "-1"], "`-1` is not a process id"),
        (&["snapshot", "--pid", "-1"], "`-1` is not a process id"),
        (&["run", "--pid", "abc"], "`abc` is not a process id"),
        (&["run", "--pid", "1", "--min-pending", "0"], "for '--min-pending"),
        (&["run", "--pid", "1", "--", "true"], "cannot be used with"),
        (&["run", "-x", "--pid", "1"], "-x"),
        (&["inspect"], "required arguments were not provided: <BINARY>"),
        (&["inspect", "--frobnicate", "/bin/true"], "--frobnicate"),
    ] {
        assert_fails(args, EXIT_USAGE, message);
    }
}

/// pid 2 is kthreadd on every Linux: no executable to attach to.
#[test]
fn kernel_thread_exits_66() {
    require_root();
    let comm = fs::read_to_string("/proc/2/comm").unwrap();
    assert_eq!(comm.trim(), "kthreadd");
    assert_fails(
        &["run", "--pid", "2"],
        EXIT_NO_TARGET,
        "pid 2 has no executable (a kernel thread",
    );
}

/// A copy of a real Go 1.21 binary whose `.go.buildinfo` says it was built by an older Go.
/// `patch` gets the bytes from the buildinfo magic on.
fn older_go_binary(scratch: &Scratch, name: &str, patch: impl FnOnce(&mut [u8])) -> PathBuf {
    let mut bytes = fs::read(go_program("1.21.13", "workload")).unwrap();
    let at = bytes
        .windows(BUILDINFO_MAGIC.len())
        .position(|window| window == BUILDINFO_MAGIC)
        .expect("buildinfo magic");
    assert_eq!(&bytes[at + 32..at + 42], b"\x09go1.21.13", "version string where expected");
    patch(&mut bytes[at..]);
    scratch.file(name, &bytes)
}

/// Two honest stand-ins for binaries older than Go 1.19, made from a real Go 1.21 binary: its
/// version rewritten to "go1.17.13" (same length, so the format stays valid), and its
/// inline-strings flag cleared, the `.go.buildinfo` format of Go 1.17 and older (pointers to the
/// strings instead).
#[test]
fn go_older_than_1_19_exits_65() {
    require_root();
    let scratch = Scratch::new("old-go");
    let go117 =
        older_go_binary(&scratch, "go117", |blob| blob[33..42].copy_from_slice(b"go1.17.13"));
    let pre118 = older_go_binary(&scratch, "pre118", |blob| blob[15] &= !0x2);
    for (binary, expected) in [
        (&go117, "built with go1.17.13, but deferprobe supports Go 1.19 to 1.27"),
        (&pre118, "built by Go older than 1.18, but deferprobe supports Go 1.19 to 1.27"),
    ] {
        assert_fails(&["inspect", path_arg(binary)], EXIT_UNSUPPORTED, expected);
        assert_fails(&["inspect", "--json", path_arg(binary)], EXIT_UNSUPPORTED, expected);
        assert_fails(&["run", "--", path_arg(binary), "-calls", "1"], EXIT_UNSUPPORTED, expected);
    }
}

/// Garbage, truncated ELF files and directories given to `inspect` are refused (exit 65), the
/// message naming the file.
#[test]
fn garbage_and_truncated_files_exit_65() {
    let scratch = Scratch::new("garbage");
    let garbage: Vec<u8> =
        (0..65536u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let garbage = scratch.file("garbage", &garbage);
    assert_fails(&["inspect", path_arg(&garbage)], EXIT_UNSUPPORTED, "not an ELF file");
    let empty = scratch.file("empty", b"");
    assert_fails(&["inspect", path_arg(&empty)], EXIT_UNSUPPORTED, "not an ELF file");
    assert_fails(&["inspect", path_arg(&scratch.dir)], EXIT_UNSUPPORTED, path_arg(&scratch.dir));

    let real = fs::read(go_program(&go_releases()[0], "workload")).unwrap();
    for len in [4, 63, 64, 4096, real.len() / 4, real.len() / 2, real.len() - 1] {
        let truncated = scratch.file(&format!("truncated-{len}"), &real[..len]);
        let output = deferprobe().args(["inspect", path_arg(&truncated)]).output().unwrap();
        let (stdout, stderr) = text(&output);
        assert_eq!(
            output.status.code(),
            Some(EXIT_UNSUPPORTED),
            "{len} bytes:\n{stdout}\n{stderr}"
        );
        assert_eq!(stderr.lines().count(), 1, "{len} bytes: {stderr}");
        assert!(
            stderr.starts_with(&format!("deferprobe: error: {}: ", truncated.display())),
            "{stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

/// The target's executable was deleted, or replaced by another file, after it started: deferprobe
/// reads and probes it through /proc/PID/exe (the original inode) and counts exactly.
#[test]
fn executable_deleted_or_replaced_on_disk_still_traced() {
    require_root();
    let scratch = Scratch::new("replaced");
    let original = go_program(&go_releases()[0], "workload");
    for change in ["deleted", "replaced"] {
        let path = scratch.copy(change, &original);
        let mut workload =
            Workload::start(&path, &["-calls", "20", "-defers", "25", "-goroutines", "10"]);
        match change {
            "deleted" => fs::remove_file(&path).unwrap(),
            _ => {
                // A new file renamed over the old path (how installers replace binaries; writing
                // into a running executable fails with ETXTBSY).
                let replacement = scratch.file("replacement", b"#!/bin/sh\nexit 0\n");
                fs::rename(&replacement, &path).unwrap();
            }
        }
        let exe = fs::read_link(format!("/proc/{}/exe", workload.pid())).unwrap();
        assert!(exe.to_string_lossy().ends_with(" (deleted)"), "{change}: {}", exe.display());

        let report_file = report_path(&format!("exe-{change}"));
        let mut cmd = deferprobe();
        cmd.args(["run", "--pid", &workload.pid().to_string(), "--interval", "100ms", "--report"])
            .arg(&report_file);
        let mut tracer = Running::spawn(cmd);
        tracer.wait_for("probes attached");
        let truth = workload.work();
        thread::sleep(Duration::from_millis(200));
        workload.end();
        let (code, stdout, stderr) = tracer.finish();
        assert_eq!(code, 0, "{change}: {stdout}\n{}", stderr.join("\n"));
        let report = read_json(&report_file);
        assert_eq!(truth.heap_defers, 20 * 25 + 10 * 2);
        assert_eq!(report["counts"]["deferproc"], truth.heap_defers, "{change}: {report}");
        assert_eq!(report["counts"]["lost_events"], 0, "{change}: {report}");
        assert_eq!(report["target"]["go_version"], truth.go_version.as_str(), "{change}");
        assert_eq!(report["pending"]["heap_defers"], 0, "{change}: {report}");
    }
}

/// Go executables for other systems and processors, cross-built here with the default release:
/// `inspect` and `run -- FILE` name what the file is (exit 65) and never run it. A linux/arm64
/// one is read by `inspect`, and `run` refuses it on this amd64 machine the same way.
#[test]
fn other_systems_and_processors_exit_65() {
    require_root();
    let scratch = Scratch::new("platforms");
    fs::write(scratch.dir.join("go.mod"), "module deferprobe.test/cross\n\ngo 1.21\n").unwrap();
    fs::write(
        scratch.dir.join("main.go"),
        "package main\n\nimport \"fmt\"\n\nfunc main() { fmt.Println(\"hello\") }\n",
    )
    .unwrap();
    let release = &go_releases()[0];
    let go = workspace_root().join(format!("target/go/{release}/go/bin/go"));
    assert!(go.exists(), "{} is missing: run `cargo xtask setup`", go.display());
    for (goos, goarch, what) in [
        ("freebsd", "amd64", "a FreeBSD ELF file (GOOS=freebsd)"),
        ("windows", "amd64", "a Windows PE file"),
        ("darwin", "amd64", "a macOS Mach-O file"),
        ("linux", "arm64", "a linux/arm64 Go binary"),
    ] {
        let output = scratch.dir.join(format!("hello-{goos}-{goarch}"));
        let built = std::process::Command::new(&go)
            .current_dir(&scratch.dir)
            .env("GOOS", goos)
            .env("GOARCH", goarch)
            .env("CGO_ENABLED", "0")
            .env("GOTOOLCHAIN", "local")
            .env("GOFLAGS", "-mod=mod")
            .env("GOCACHE", workspace_root().join(format!("target/go-cache/{release}-cross")))
            .args(["build", "-o"])
            .arg(&output)
            .arg(".")
            .output()
            .unwrap();
        assert!(built.status.success(), "{goos}/{goarch}: {}", text(&built).1);
        if goarch == "arm64" {
            let (_, inspection) = inspect(&output);
            assert_eq!(inspection["plan"]["arch"], "arm64");
            let expected = format!(
                "{}: {what}; this deferprobe runs on linux/amd64 and traces only linux/amd64 \
                 programs (`inspect` reads both)",
                output.display()
            );
            assert_fails(&["run", "--", path_arg(&output)], EXIT_UNSUPPORTED, &expected);
            continue;
        }
        let expected = format!(
            "{}: {what}; deferprobe reads linux/amd64 and linux/arm64 Go binaries",
            output.display()
        );
        assert_fails(&["inspect", path_arg(&output)], EXIT_UNSUPPORTED, &expected);
        assert_fails(&["inspect", "--json", path_arg(&output)], EXIT_UNSUPPORTED, &expected);
        assert_fails(&["run", "--", path_arg(&output)], EXIT_UNSUPPORTED, &expected);
        let output = deferprobe().args(["run", "--", path_arg(&output)]).output().unwrap();
        assert!(!text(&output).0.contains("hello"), "{goos}/{goarch} was run");
    }
}

/// A copy of the workload with random bytes over its `.debug_info` contents (after the
/// compression header: Go compresses DWARF) runs and is traced exactly: the
/// release table stands in for the DWARF, and the report says so.
#[test]
fn corrupt_dwarf_falls_back_to_the_release_table() {
    use object::{Object as _, ObjectSection as _, read::elf::ElfFile64};
    require_root();
    let scratch = Scratch::new("corrupt-dwarf");
    let original = go_program(&go_releases()[0], "workload");
    let mut bytes = fs::read(&original).unwrap();
    let (start, end) = {
        let elf = ElfFile64::<object::Endianness>::parse(&*bytes).unwrap();
        let section = elf.section_by_name(".debug_info").expect("the workload has DWARF");
        // The compressed data (after the Elf64_Chdr of SHF_COMPRESSED or the header of a
        // `.zdebug_info`), or the plain contents: it is what the section holds that is random.
        let range = section.compressed_file_range().unwrap();
        (range.offset as usize, (range.offset + range.compressed_size) as usize)
    };
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    for byte in &mut bytes[start..end] {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        *byte = state as u8;
    }
    let written = scratch.file("corrupt.tmp", &bytes);
    let copy = scratch.copy("corrupt", &written);

    let (text, json) = inspect(&copy);
    assert_eq!(json["plan"]["layout_source"], "release_table", "{json}");
    let note = json["plan"]["layout_note"].as_str().unwrap_or_else(|| panic!("no note: {json}"));
    assert!(
        note.starts_with(&format!(
            "the binary's DWARF could not be used ({}: corrupt DWARF: ",
            copy.display()
        )),
        "{note}"
    );
    assert!(text.contains("(ReleaseTable)") && text.contains(note), "{text}");

    let args = ["-calls", "20", "-defers", "25", "-goroutines", "10"];
    let traced = trace_command("corrupt-dwarf", &copy, &args);
    let context = format!("stderr:\n{}\nreport: {}", traced.stderr, traced.report);
    assert_eq!(traced.code, 0, "{context}");
    let truth = ground_truth(&traced.stdout);
    assert_eq!(truth.heap_defers, 20 * 25 + 10 * 2, "the program's own count");
    assert_eq!(traced.count("deferproc"), truth.heap_defers, "{context}");
    assert_eq!(traced.count("deferreturn"), truth.heap_defer_frame_returns, "{context}");
    assert_eq!(traced.report["probes"]["layout_source"], "release_table", "{context}");
    assert_eq!(traced.report["pending"]["heap_defers"], 0, "{context}");
    let notes = traced.report["notes"].as_array().unwrap();
    assert!(notes.iter().any(|n| n == note), "the note {note:?} is missing\n{context}");
    assert!(traced.stderr.contains("the binary's DWARF is unusable"), "{context}");
}
