//! Go modules mapped into the target besides its executable: plugins (`-buildmode=plugin`,
//! loaded by `plugin.Open`). A plugin is a separate ELF file carrying its own copy of the
//! runtime's functions, which its code calls directly (`CALL runtime.deferproc` within the
//! plugin): probes on the executable don't see its defers. [`Modules::poll`] finds the Go
//! modules in `/proc/PID/maps`, plans each one like the executable and attaches the plan;
//! [`Modules::module_pc`] names a pc inside one (its own `.gopclntab`) for the report.

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use tracing::{info, warn};

use crate::{
    binary::GoBinary,
    findings::ModulePc,
    plan::{PlanOptions, ProbePlan},
    report::Location,
    tracer::Tracer,
};

/// One file-backed mapping set of `/proc/PID/maps`: the file, where its offset 0 is mapped,
/// and the address range of all its mappings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MappedFile {
    pub path: PathBuf,
    /// Runtime address of file offset 0 (None if no mapping starts there).
    pub base: Option<u64>,
    /// `[start, end)` over every mapping of the file.
    pub range: (u64, u64),
    pub executable: bool,
}

/// The files mapped in a `/proc/PID/maps` text, in order of first appearance.
pub fn mapped_files(maps: &str) -> Vec<MappedFile> {
    let mut files: Vec<MappedFile> = Vec::new();
    for line in maps.lines() {
        let mut fields = line.split_whitespace();
        let (Some(range), Some(perms), Some(offset), Some(_dev), Some(_inode)) =
            (fields.next(), fields.next(), fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let path: Vec<&str> = fields.collect();
        let path = path.join(" ");
        if !path.starts_with('/') || path.ends_with(" (deleted)") {
            continue;
        }
        let Some((start, end)) = range.split_once('-') else { continue };
        let (Ok(start), Ok(end), Ok(offset)) = (
            u64::from_str_radix(start, 16),
            u64::from_str_radix(end, 16),
            u64::from_str_radix(offset, 16),
        ) else {
            continue;
        };
        let executable = perms.as_bytes().get(2) == Some(&b'x');
        let path = PathBuf::from(path);
        let index = match files.iter().position(|f| f.path == path) {
            Some(index) => index,
            None => {
                files.push(MappedFile { path, base: None, range: (start, end), executable });
                files.len() - 1
            }
        };
        let file = &mut files[index];
        file.range = (file.range.0.min(start), file.range.1.max(end));
        file.executable |= executable;
        if offset == 0 {
            file.base = Some(file.base.map_or(start, |base| base.min(start)));
        }
    }
    files
}

/// A Go module of the target other than its executable.
pub struct Module {
    /// As `/proc/PID/maps` names it.
    pub path: PathBuf,
    pub binary: GoBinary,
    /// Runtime address − ELF virtual address.
    pub bias: u64,
    /// Runtime address range of its mappings.
    pub range: (u64, u64),
    /// When deferprobe found it, after tracing started (None: mapped before).
    pub found_after: Option<Duration>,
    /// Its probe points, when attached; else why not.
    pub probed: Result<usize, String>,
}

impl Module {
    /// Whether records at its sites that no registration seen accounts for were registered
    /// while its code was not probed: it was loaded after tracing started (found at the next
    /// poll), or could not be probed at all.
    fn unseen_were_unprobed(&self) -> bool {
        self.found_after.is_some() || self.probed.is_err()
    }
}

/// The Go modules found in one process so far.
pub struct Modules {
    pid: u32,
    exe: PathBuf,
    options: PlanOptions,
    started: Instant,
    /// Files looked at (Go modules or not): each is opened once.
    seen: HashSet<PathBuf>,
    polled: bool,
    pub found: Vec<Module>,
}

impl Modules {
    /// For process `pid` whose executable is `exe`, planning modules with `options`.
    /// `started_command`: deferprobe started the process, so every module it maps is loaded
    /// after tracing started, even those the first poll finds.
    pub fn new(pid: u32, exe: &Path, options: PlanOptions, started_command: bool) -> Modules {
        let exe = std::fs::read_link(exe).unwrap_or_else(|_| exe.to_path_buf());
        Modules {
            pid,
            exe,
            options,
            started: Instant::now(),
            seen: HashSet::new(),
            polled: started_command,
            found: Vec::new(),
        }
    }

    /// Finds Go modules mapped since the last poll, and probes each with its own plan (a
    /// failure is kept as the reason, reported, and tracing goes on).
    pub fn poll(&mut self, tracer: &mut Tracer) {
        let Ok(maps) = std::fs::read_to_string(format!("/proc/{}/maps", self.pid)) else {
            return;
        };
        let after = self.polled.then(|| self.started.elapsed());
        self.polled = true;
        for file in mapped_files(&maps) {
            if !file.executable || file.path == self.exe || !self.seen.insert(file.path.clone()) {
                continue;
            }
            // Through the target's root: its paths are in its mount namespace.
            let reachable = Path::new(&format!("/proc/{}/root", self.pid))
                .join(file.path.strip_prefix("/").unwrap_or(&file.path));
            // Not a Go module (libc, vdso, ...): no Go build info or function table.
            let Ok(binary) = GoBinary::open(&reachable) else { continue };
            let bias = file.base.map_or(0, |base| base.wrapping_sub(binary.file_start_vaddr()));
            let probed = ProbePlan::build(&binary, &self.options)
                .map_err(|err| err.to_string())
                .and_then(|plan| tracer.add_module(&plan, &reachable).map_err(|e| e.to_string()));
            match &probed {
                Ok(points) => info!(module = %file.path.display(), points, "Go plugin probed"),
                Err(err) => warn!(module = %file.path.display(), %err, "Go plugin not probed"),
            }
            self.found.push(Module {
                path: file.path,
                binary,
                bias,
                range: file.range,
                found_after: after,
                probed,
            });
        }
    }

    /// The module holding runtime address `pc` (a return address), with the source location
    /// of the call before it.
    pub fn module_pc(&self, pc: u64) -> Option<ModulePc> {
        let module = self.found.iter().find(|m| (m.range.0..m.range.1).contains(&pc))?;
        let elf_pc = pc.wrapping_sub(module.bias);
        Some(ModulePc {
            module: module.path.display().to_string(),
            pc: elf_pc,
            location: Location::of_return_address(&module.binary, elf_pc),
            unseen_were_unprobed: module.unseen_were_unprobed(),
        })
    }

    /// Notes on the modules: what is probed and what isn't.
    pub fn notes(&self) -> Vec<String> {
        self.found
            .iter()
            .map(|module| {
                let path = module.path.display();
                match (&module.probed, module.found_after) {
                    (Ok(points), None) => format!(
                        "Go plugin {path} was probed like the executable ({points} points): \
                         counts include its code"
                    ),
                    (Ok(points), Some(after)) => format!(
                        "Go plugin {path} was loaded while traced and found {:.1}s after \
                         tracing started, then probed ({points} points): counts (deferproc, \
                         ...) include its code from then on; pending records at its sites \
                         registered before are counted as pending_unprobed, not as pending \
                         before trace",
                        after.as_secs_f64()
                    ),
                    (Err(err), _) => format!(
                        "Go plugin {path} could not be probed ({err}): its defer registrations \
                         are not in counts.deferproc, and pending records at its sites are \
                         counted as pending_unprobed"
                    ),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_a_files_mappings() {
        let maps = "\
00400000-00401000 r--p 00000000 08:01 11 /usr/bin/host
00401000-00500000 r-xp 00001000 08:01 11 /usr/bin/host
7f0000000000-7f00000bb000 r--p 00000000 08:01 22 /tmp/my plugin.so
7f00000bb000-7f00001b0000 r-xp 000bb000 08:01 22 /tmp/my plugin.so
7f00001b0000-7f00002c7000 r--p 001b0000 08:01 22 /tmp/my plugin.so
7f1000000000-7f1000021000 rw-p 00000000 00:00 0 
7f2000000000-7f2000002000 r-xp 00000000 00:00 0 [vdso]
7f3000000000-7f3000001000 r-xp 00000000 08:01 33 /tmp/gone.so (deleted)
";
        let files = mapped_files(maps);
        assert_eq!(files.len(), 2, "{files:?}");
        assert_eq!(files[0].path, Path::new("/usr/bin/host"));
        assert_eq!(files[1].path, Path::new("/tmp/my plugin.so"));
        assert_eq!(files[1].base, Some(0x7f00_0000_0000));
        assert_eq!(files[1].range, (0x7f00_0000_0000, 0x7f00_002c_7000));
        assert!(files[1].executable);
    }
}
