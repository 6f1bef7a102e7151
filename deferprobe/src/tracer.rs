//! The kernel side, seen from userspace: loads the embedded eBPF object with the plan's
//! configuration, attaches every planned probe to one process (its executable, and the Go
//! plugins found in it later: [`Tracer::add_module`]), and reads what the probes
//! produce (per-CPU counters and ring-buffer events). Dropping a [`Tracer`] detaches everything;
//! the kernel also does so if deferprobe dies (links are held by file descriptors only).

use std::{
    collections::HashMap as StdHashMap,
    num::NonZeroU32,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, MapType, PerCpuArray, RingBuf},
    programs::{
        UProbe,
        uprobe::{UProbeAttachLocation, UProbeAttachPoint, UProbeLinkId, UProbeScope},
    },
    sys::{UProbeMultiFeature, is_uprobe_multi_supported},
};
use deferprobe_common::{
    COOKIE_FALLS_THROUGH, Counters, Gate, KnownMap, ProbeConfig, RecentMap, recent_map_slot,
};

use crate::{
    binary::prologue::CountWhen,
    error::{Error, Result},
    plan::{ProbePlan, ProbeProgram},
};

/// The compiled deferprobe-ebpf object, built by build.rs.
pub(crate) static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/deferprobe"));

/// The probes of a Go module other than the executable (a plugin: a separate ELF file with its
/// own copy of the runtime's functions, which its code calls directly).
struct ModuleProbes {
    path: PathBuf,
    offsets: StdHashMap<ProbeProgram, Vec<(u64, u64)>>,
    links: StdHashMap<ProbeProgram, UProbeLinkId>,
}

/// How the probes are attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    /// One multi-uprobe link per program (Linux >= 6.9, process-scoped PID filter).
    Multi,
    /// One perf-event uprobe per attach point (any kernel deferprobe supports); detaching costs
    /// the kernel a synchronisation per point.
    PerPoint,
}

pub struct Tracer {
    // Owns the programs and their links: dropping it detaches.
    ebpf: Ebpf,
    mode: AttachMode,
    exe: PathBuf,
    pid: NonZeroU32,
    /// File offsets to attach, with their attach cookies, per program.
    offsets: StdHashMap<ProbeProgram, Vec<(u64, u64)>>,
    /// The live link of each attached program.
    links: StdHashMap<ProbeProgram, UProbeLinkId>,
    /// The `CALL runtime.deferreturn` probes of each function that owns heap defer records
    /// (by function address), and the link of each function whose probes are on.
    frames: StdHashMap<u64, Vec<(u64, u64)>>,
    frame_links: StdHashMap<u64, UProbeLinkId>,
    /// Programs switched on ([`Tracer::set_attached`]), whether or not the executable has
    /// points for them: what a module added later attaches.
    on: std::collections::HashSet<ProbeProgram>,
    /// Other Go modules of the process (plugins), probed with their own plans.
    modules: Vec<ModuleProbes>,
    calibration: Option<Calibration>,
    events: RingBuf<MapData>,
    counters: PerCpuArray<MapData, Counters>,
    known_maps: HashMap<MapData, u64, KnownMap>,
    recent_maps: PerCpuArray<MapData, RecentMap>,
    /// The kernel's goroutine-id cache switch: its generation, 0 while off; and the number of
    /// generations so far.
    goroutine_id_cache: Array<MapData, u64>,
    /// The sampled families' counting gates, by [`Gate`].
    gates: Array<MapData, u32>,
    goroutine_id_generation: u64,
    goroutine_id_generations: u64,
    attached: usize,
    /// The target exited before every probe was attached.
    exited_during_attach: bool,
}

impl Tracer {
    /// Loads the programs, with an event ring buffer of `ring_bytes` (a power of two, a multiple
    /// of the page size), and attaches every probe of `plan` to `exe` (the target's executable,
    /// e.g. /proc/PID/exe), firing only in process `pid`.
    pub fn attach(plan: &ProbePlan, exe: &Path, pid: u32, ring_bytes: u32) -> Result<Tracer> {
        check_kernel_features()?;
        if EBPF_OBJECT.is_empty() {
            return Err(Error::internal(
                "this deferprobe was built with AYA_BUILD_SKIP=1 and has no eBPF programs",
            ));
        }
        let config = probe_config(plan);
        let mut loader = EbpfLoader::new();
        loader.override_global("PROBE_CONFIG", &config, true).map_max_entries("EVENTS", ring_bytes);
        // The process tree has a copy of the object of its own (crate::process_tree).
        small_maps(&mut loader, &["PROCESS_TREE", "TREE_EVENTS"]);
        let mut ebpf =
            loader.load(EBPF_OBJECT).map_err(|err| bpf_error("loading the eBPF programs", &err))?;

        let pid = NonZeroU32::new(pid).ok_or_else(|| Error::usage("pid 0 is not a process"))?;
        // Go programs are multi-threaded: a multi-uprobe link must filter by process, not by
        // thread (fixed in Linux 6.9).
        let mode = match is_uprobe_multi_supported(UProbeMultiFeature::ProcessScopedPidFilter) {
            Ok(true) => AttachMode::Multi,
            _ => AttachMode::PerPoint,
        };
        let mut offsets = StdHashMap::new();
        let mut frames: StdHashMap<u64, Vec<(u64, u64)>> = StdHashMap::new();
        for probe in plan.probes_of(ProbeProgram::DeferReturn) {
            frames
                .entry(probe.address)
                .or_default()
                .push((probe.file_offset, attach_cookie(probe)));
        }
        for program in ProbeProgram::ALL {
            let points = attach_points(plan, program);
            if points.is_empty() {
                continue;
            }
            loaded_program(&mut ebpf, program, mode)?;
            // deferreturn's probes are switched per function ([`Tracer::arm_frames`]).
            if program != ProbeProgram::DeferReturn {
                offsets.insert(program, points);
            }
        }
        let attached = offsets.values().map(Vec::len).sum::<usize>()
            + frames.values().map(Vec::len).sum::<usize>();
        // Once per deferprobe process: the tracers of a `--follow`ed tree share it (each
        // would otherwise cost the program it traces, stopped meanwhile, a calibration).
        let calibration = *CALIBRATION.get_or_init(|| calibrate(&mut ebpf, mode));

        let events = take_map(&mut ebpf, "EVENTS")?;
        let counters = take_map(&mut ebpf, "COUNTERS")?;
        let known_maps = take_map(&mut ebpf, "KNOWN_MAPS")?;
        let recent_maps = take_map(&mut ebpf, "RECENT_MAPS")?;
        let goroutine_id_cache = take_map(&mut ebpf, "GOROUTINE_ID_CACHE")?;
        let gates = take_map(&mut ebpf, "GATES")?;
        let mut tracer = Tracer {
            ebpf,
            mode,
            exe: exe.to_path_buf(),
            pid,
            offsets,
            links: StdHashMap::new(),
            frames,
            frame_links: StdHashMap::new(),
            on: Default::default(),
            modules: Vec::new(),
            calibration,
            events,
            counters,
            known_maps,
            recent_maps,
            goroutine_id_cache,
            gates,
            goroutine_id_generation: 0,
            goroutine_id_generations: 0,
            attached,
            exited_during_attach: false,
        };
        let functions: Vec<u64> = tracer.frames.keys().copied().collect();
        let attached = ProbeProgram::ALL
            .into_iter()
            .try_for_each(|program| tracer.set_attached(program, true))
            .and_then(|()| tracer.arm_frames(&functions).map(drop));
        if let Err(err) = attached {
            // A process that exits while its probes are attached makes the rest fail (its
            // /proc/PID/exe is gone): the tracer keeps what it saw, and the trace ends at once
            // as the target's exit.
            if !crate::target::has_exited(pid.get()) {
                return Err(err);
            }
            tracer.exited_during_attach = true;
        }
        for gate in Gate::ALL {
            tracer.set_gate(gate, true)?;
        }
        tracer.set_goroutine_id_cache(true)?;
        Ok(tracer)
    }

    /// Opens or closes a sampled family's counting gate (see [`Gate`]): open it once its
    /// probes are attached, close it before detaching them.
    pub fn set_gate(&mut self, gate: Gate, open: bool) -> Result<()> {
        self.gates
            .set(gate as u32, &u32::from(open), 0)
            .map_err(|err| bpf_error("switching a counting gate", &err))
    }

    /// Turns the kernel's goroutine-id cache on (a new generation: ids cached before are
    /// ignored) or off. It forgets a goroutine's id when goexit1 sees the goroutine end, so it
    /// may be on only while goexit1 is attached: turn it on after attaching goexit1, off before
    /// detaching it.
    pub fn set_goroutine_id_cache(&mut self, on: bool) -> Result<()> {
        let on = on && self.links.contains_key(&ProbeProgram::Goexit1);
        let generation = match on {
            true if self.goroutine_id_generation != 0 => return Ok(()),
            true => {
                self.goroutine_id_generations += 1;
                self.goroutine_id_generations
            }
            false => 0,
        };
        self.goroutine_id_cache
            .set(0, &generation, 0)
            .map_err(|err| bpf_error("switching the goroutine-id cache", &err))?;
        self.goroutine_id_generation = generation;
        Ok(())
    }

    /// Attaches or detaches every probe of `program` (no-op if already so, or if the plan has
    /// none). The governor samples probe families this way.
    pub fn set_attached(&mut self, program: ProbeProgram, attach: bool) -> Result<()> {
        match attach {
            true => self.on.insert(program),
            false => self.on.remove(&program),
        };
        let (mode, pid) = (self.mode, self.pid);
        if let Some(offsets) = self.offsets.get(&program) {
            let uprobe = loaded_program(&mut self.ebpf, program, mode)?;
            switch(uprobe, program, attach, &self.exe, offsets, &mut self.links, pid)?;
        }
        for module in &mut self.modules {
            let Some(offsets) = module.offsets.get(&program) else { continue };
            let uprobe = loaded_program(&mut self.ebpf, program, mode)?;
            switch(uprobe, program, attach, &module.path, offsets, &mut module.links, pid)?;
        }
        Ok(())
    }

    /// Probes another Go module of the process (a plugin, at `path`) with its own `plan`: each
    /// program the governor has on now is attached to it at once, the others when they are
    /// switched on. Returns the number of attach points.
    pub fn add_module(&mut self, plan: &ProbePlan, path: &Path) -> Result<usize> {
        let mut module = ModuleProbes {
            path: path.to_path_buf(),
            offsets: StdHashMap::new(),
            links: StdHashMap::new(),
        };
        for program in ProbeProgram::ALL {
            let points = attach_points(plan, program);
            if !points.is_empty() {
                module.offsets.insert(program, points);
            }
        }
        let points = module.offsets.values().map(Vec::len).sum();
        let mut attached = Ok(());
        for (&program, offsets) in &module.offsets {
            if self.on.contains(&program) {
                attached = loaded_program(&mut self.ebpf, program, self.mode).and_then(|uprobe| {
                    switch(uprobe, program, true, path, offsets, &mut module.links, self.pid)
                });
                if attached.is_err() {
                    break;
                }
            }
        }
        if let Err(err) = attached {
            // All or nothing: a module reported unprobed has no probe left behind.
            for (&program, offsets) in &module.offsets {
                if let Ok(uprobe) = loaded_program(&mut self.ebpf, program, self.mode) {
                    let _ =
                        switch(uprobe, program, false, path, offsets, &mut module.links, self.pid);
                }
            }
            return Err(err);
        }
        self.modules.push(module);
        self.attached += points;
        Ok(points)
    }

    /// What one probe hit costs on this machine, measured at load (None if it couldn't be).
    pub fn hit_cost(&self) -> Option<Duration> {
        self.calibration.map(|c| c.hit_cost())
    }

    /// What a hit costs per instruction class, measured at load.
    pub fn calibration(&self) -> Option<Calibration> {
        self.calibration
    }

    /// Number of attach points in the plan (one per probed function).
    /// Attaches the `CALL runtime.deferreturn` probes of `functions` (ELF addresses of
    /// functions in the plan) whose probes are not on. Returns how many probes were attached.
    pub fn arm_frames(&mut self, functions: &[u64]) -> Result<usize> {
        let mut attached = 0;
        for function in functions {
            let Some(points) = self.frames.get(function) else { continue };
            if self.frame_links.contains_key(function) {
                continue;
            }
            let uprobe = loaded_program(&mut self.ebpf, ProbeProgram::DeferReturn, self.mode)?;
            let mut links = StdHashMap::new();
            switch(
                uprobe,
                ProbeProgram::DeferReturn,
                true,
                &self.exe,
                points,
                &mut links,
                self.pid,
            )?;
            if let Some(link) = links.remove(&ProbeProgram::DeferReturn) {
                self.frame_links.insert(*function, link);
                attached += points.len();
            }
        }
        Ok(attached)
    }

    /// Detaches the `CALL runtime.deferreturn` probes of `functions`. Returns how many.
    pub fn disarm_frames(&mut self, functions: &[u64]) -> Result<usize> {
        let mut detached = 0;
        for function in functions {
            let Some(link) = self.frame_links.remove(function) else { continue };
            let uprobe = loaded_program(&mut self.ebpf, ProbeProgram::DeferReturn, self.mode)?;
            let mut links = StdHashMap::from([(ProbeProgram::DeferReturn, link)]);
            let points = &self.frames[function];
            switch(
                uprobe,
                ProbeProgram::DeferReturn,
                false,
                &self.exe,
                points,
                &mut links,
                self.pid,
            )?;
            detached += points.len();
        }
        Ok(detached)
    }

    /// Functions whose deferreturn probes are on, and functions that have some.
    pub fn armed_frames(&self) -> (usize, usize) {
        (self.frame_links.len(), self.frames.len())
    }

    /// Whether the target exited before every probe of the plan was attached.
    pub fn exited_during_attach(&self) -> bool {
        self.exited_during_attach
    }

    pub fn attached(&self) -> usize {
        self.attached
    }

    pub fn mode(&self) -> AttachMode {
        self.mode
    }

    /// The counters summed over all CPUs.
    pub fn counters(&self) -> Result<Counters> {
        let per_cpu =
            self.counters.get(&0, 0).map_err(|err| bpf_error("reading the counters", &err))?;
        let mut total = Counters::ZERO;
        for cpu in per_cpu.iter() {
            for (sum, value) in total.values.iter_mut().zip(cpu.values) {
                *sum += value;
            }
        }
        Ok(total)
    }

    /// mapassign calls on `map` since it entered the kernel's known-maps set (its entry's count
    /// plus what the CPUs' recent-maps slots hold for it); None if it is not (or no longer)
    /// there.
    pub fn map_writes(&self, map: u64) -> Option<u64> {
        let known = self.known_maps.get(&map, 0).ok()?.writes;
        let recent = self.recent_maps.get(&recent_map_slot(map), 0).map_or(0, |slots| {
            slots.iter().filter(|slot| slot.map == map).map(|slot| slot.writes).sum()
        });
        Some(known + recent)
    }

    /// Hands every event waiting in the ring buffer to `on_event`; returns how many.
    pub fn drain(&mut self, mut on_event: impl FnMut(&[u8])) -> usize {
        let mut drained = 0;
        while let Some(item) = self.events.next() {
            on_event(&item);
            drained += 1;
        }
        drained
    }
}

/// `program` in the eBPF object, loaded into the kernel (on first use: an executable without
/// points for a program doesn't load it, a plugin may need it).
fn loaded_program(ebpf: &mut Ebpf, program: ProbeProgram, mode: AttachMode) -> Result<&mut UProbe> {
    let name = program_name(program.name(), mode);
    let uprobe: &mut UProbe = ebpf
        .program_mut(&name)
        .ok_or_else(|| Error::internal(format!("no eBPF program {name}")))?
        .try_into()
        .map_err(|err| bpf_error(program.name(), &err))?;
    if uprobe.fd().is_err() {
        uprobe.load().map_err(|err| bpf_error(&format!("loading {}", program.name()), &err))?;
    }
    Ok(uprobe)
}

/// Attaches `program` to `offsets` in `file`, or detaches it (its link in `links`); nothing
/// if it already is so.
fn switch(
    uprobe: &mut UProbe,
    program: ProbeProgram,
    attach: bool,
    file: &Path,
    offsets: &[(u64, u64)],
    links: &mut StdHashMap<ProbeProgram, UProbeLinkId>,
    pid: NonZeroU32,
) -> Result<()> {
    match (attach, links.get(&program)) {
        (true, None) => {
            let points = offsets.iter().map(|&(offset, cookie)| UProbeAttachPoint {
                location: UProbeAttachLocation::AbsoluteOffset(offset),
                cookie: Some(cookie),
            });
            let link =
                uprobe.attach(points, file, UProbeScope::OneProcess(pid)).map_err(|err| {
                    bpf_error(&format!("attaching {} to {}", program.name(), file.display()), &err)
                })?;
            links.insert(program, link);
        }
        (false, Some(_)) => {
            let link = links.remove(&program).expect("checked");
            let link = uprobe
                .take_link(link)
                .map_err(|err| bpf_error(&format!("detaching {}", program.name()), &err))?;
            // Closing a uprobe link removes its breakpoints at once, then waits for an RCU
            // grace period (20–70 ms measured under load). Waiting here would keep the
            // families detached after this one attached that much longer than their
            // sampling window: the wait happens on a thread of its own.
            std::thread::spawn(move || drop(link));
        }
        _ => {}
    }
    Ok(())
}

/// The program's name in the eBPF object for `mode`.
fn program_name(base: &str, mode: AttachMode) -> String {
    match mode {
        AttachMode::Multi => format!("{base}_multi"),
        AttachMode::PerPoint => base.to_owned(),
    }
}

use crate::calibration_target::{self, deferprobe_calibration_target};

/// Times `calls` calls of the calibration target.
fn time_calls(calls: u64) -> Duration {
    let started = Instant::now();
    let mut value = 0;
    for _ in 0..calls {
        // SAFETY: a leaf function of ours that only adds 1 (see the assembly above).
        value = unsafe { deferprobe_calibration_target(std::hint::black_box(value)) };
    }
    std::hint::black_box(value);
    started.elapsed()
}

/// Times `calls` calls of the calibration target, each after touching every cache line of
/// `work`: a hit in a real program comes between other work that has taken the caches, which
/// makes it cost more than in a tight loop. Returns the median call: on a busy machine a few
/// calls are preempted, and would weigh milliseconds in a mean.
fn time_cold_calls(calls: u64, work: &mut [u8]) -> Duration {
    let mut times = Vec::with_capacity(calls as usize);
    let mut value = 0;
    for _ in 0..calls {
        for line in work.chunks_mut(64) {
            line[0] = line[0].wrapping_add(1);
        }
        std::hint::black_box(&mut *work);
        let started = Instant::now();
        // SAFETY: a leaf function of ours that only adds 1 (see the assembly above).
        value = unsafe { deferprobe_calibration_target(std::hint::black_box(value)) };
        times.push(started.elapsed());
    }
    std::hint::black_box(value);
    times.sort();
    times.get(times.len() / 2).copied().unwrap_or_default()
}

/// What one uprobe hit costs here, per instruction class the plan uses (JBE, CALL): the most
/// expensive (what the governor plans with), and each. None if it can't be measured (e.g. a
/// stripped deferprobe binary).
fn calibrate(ebpf: &mut Ebpf, mode: AttachMode) -> Option<Calibration> {
    let name = program_name("calibrate", mode);
    let uprobe: &mut UProbe = ebpf.program_mut(&name)?.try_into().ok()?;
    uprobe.load().ok()?;
    let jbe = calibrate_at(uprobe, calibration_target::BRANCH_OFFSET, Some(COOKIE_FALLS_THROUGH))?;
    let call = calibrate_at(uprobe, calibration_target::CALL_OFFSET, None)?;
    Some(Calibration { jbe, call })
}

/// The calibration of the first tracer of this process.
static CALIBRATION: std::sync::OnceLock<Option<Calibration>> = std::sync::OnceLock::new();

/// One hit's cost per instruction class (see [`calibrate`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Calibration {
    pub jbe: Duration,
    pub call: Duration,
}

impl Calibration {
    /// The dearer class: what a hit is planned to cost.
    pub fn hit_cost(&self) -> Duration {
        self.jbe.max(self.call)
    }
}

/// The cost of one hit of the (empty) calibration program on the calibration target at
/// `offset`: the target's median call timed without and with it, in this process, each call
/// after other work has taken the caches (see [`time_cold_calls`]).
fn calibrate_at(uprobe: &mut UProbe, offset: u64, cookie: Option<u64>) -> Option<Duration> {
    const CALLS: u64 = 200;
    let mut work = vec![0u8; CALIBRATION_WORK_BYTES];
    let plain_before = time_cold_calls(CALLS, &mut work);
    let pid = NonZeroU32::new(std::process::id())?;
    let point = UProbeAttachPoint {
        location: UProbeAttachLocation::SymbolOffset("deferprobe_calibration_target", offset),
        cookie,
    };
    let link = uprobe.attach([point], "/proc/self/exe", UProbeScope::OneProcess(pid)).ok()?;
    time_calls(20); // the first hits set up the process's uprobe area
    let probed = time_cold_calls(CALLS, &mut work);
    let hot = time_calls(CALLS);
    uprobe.detach(link).ok()?;
    let plain_after = time_cold_calls(CALLS, &mut work);
    let plain = (plain_before + plain_after).as_nanos() as f64 / 2.0;
    let cold = probed.as_nanos() as f64 - plain;
    tracing::debug!(
        offset,
        cold_hit_ns = cold,
        hot_hit_ns = hot.as_nanos() as f64 / CALLS as f64,
        "calibration"
    );
    Some(Duration::from_nanos(cold.max(1.0) as u64))
}

/// What the calibration touches between two calls: about an L2 cache.
const CALIBRATION_WORK_BYTES: usize = 512 * 1024;

/// The configuration the probes read.
fn probe_config(plan: &ProbePlan) -> ProbeConfig {
    ProbeConfig {
        g_goid: plan.layout.g_goid,
        g_m: plan.layout.g_m,
        m_curg: plan.layout.m_curg,
        size_specialized_max: plan.size_specialized_max,
    }
}

/// BTF and ring buffers are required (kernel >= 5.8): probes for both, then
/// [`missing_kernel_features`] decides.
fn check_kernel_features() -> Result<()> {
    let btf = Path::new(BTF_PATH).exists();
    let ring_buffer = aya::sys::is_map_supported(MapType::RingBuf)
        .map_err(|err| bpf_error("probing for BPF ring buffer support", &err))?;
    missing_kernel_features(btf, ring_buffer)
}

/// Where the kernel exposes its BTF.
pub(crate) const BTF_PATH: &str = "/sys/kernel/btf/vmlinux";

/// The kernel error (exit code 5) naming every required feature the probes found missing.
pub fn missing_kernel_features(btf: bool, ring_buffer: bool) -> Result<()> {
    let mut missing = Vec::new();
    if !btf {
        missing.push(format!(
            "BTF ({BTF_PATH} missing: need a kernel built with CONFIG_DEBUG_INFO_BTF=y)"
        ));
    }
    if !ring_buffer {
        missing.push("BPF ring buffer support (need Linux >= 5.8)".to_owned());
    }
    if missing.is_empty() {
        return Ok(());
    }
    Err(Error::kernel(format!("kernel lacks {}", missing.join(" and "))))
}

/// Makes the maps `names` of the object about to be loaded as small as the kernel allows: a
/// copy of the object that doesn't use them (the probes' or the process tree's).
pub(crate) fn small_maps<'a>(loader: &mut EbpfLoader<'a>, names: &[&'a str]) {
    for name in names {
        // Ring buffers: one page; hash maps: a few entries (LRU maps keep some per CPU).
        let entries = match *name {
            "EVENTS" | "TREE_EVENTS" => 4096,
            _ => 256,
        };
        loader.map_max_entries(name, entries);
    }
}

/// Maps an aya error to one line of the right kind: permission problems are the common case.
/// Takes map `name` out of the loaded object as the map type it is used as.
fn take_map<T>(ebpf: &mut Ebpf, name: &str) -> Result<T>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or_else(|| Error::internal(format!("no {name} map")))?;
    T::try_from(map).map_err(|err| bpf_error(name, &err))
}

/// The file offsets of `program`'s probes in `plan`, with their attach cookies.
fn attach_points(plan: &ProbePlan, program: ProbeProgram) -> Vec<(u64, u64)> {
    plan.probes_of(program).map(|probe| (probe.file_offset, attach_cookie(probe))).collect()
}

/// What the kernel program must know of a probe's spot ([`COOKIE_FALLS_THROUGH`]).
fn attach_cookie(probe: &crate::plan::PlannedProbe) -> u64 {
    match probe.count_when {
        CountWhen::FallsThrough => COOKIE_FALLS_THROUGH,
        CountWhen::Always => 0,
    }
}

pub(crate) fn bpf_error(what: &str, err: &dyn std::error::Error) -> Error {
    let mut message = format!("{what}: {err}");
    let mut source = err.source();
    while let Some(cause) = source {
        message.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    if message.contains("Operation not permitted") || message.contains("Permission denied") {
        Error::permission(format!(
            "{message} (deferprobe needs root, or CAP_BPF + CAP_PERFMON + CAP_SYS_PTRACE)"
        ))
    } else {
        Error::internal(message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    use crate::calibration_target::stack_checks::{
        self, deferprobe_test_branch_taken, deferprobe_test_falls_through,
    };

    /// The kernel side of a probe on a stack check's JBE: with the fall-through cookie, a hit
    /// counts only when the flags say the branch falls through (a taken one goes to morestack,
    /// which restarts the function); without it, every hit counts. Real programs, real uprobes
    /// on this process's own code: needs root.
    #[test]
    fn jbe_probes_count_only_fall_throughs() {
        // SAFETY: geteuid has no preconditions.
        assert_eq!(unsafe { libc::geteuid() }, 0, "this test loads eBPF programs: run as root");
        let mut ebpf = EbpfLoader::new().load(EBPF_OBJECT).expect("load the eBPF object");
        let counters: PerCpuArray<MapData, Counters> =
            PerCpuArray::try_from(ebpf.take_map("COUNTERS").unwrap()).unwrap();
        // deferprocStack's probe counts only while its family's gate is open.
        let mut gates: Array<MapData, u32> =
            Array::try_from(ebpf.take_map("GATES").unwrap()).unwrap();
        gates.set(Gate::StackDefers as u32, &1, 0).unwrap();
        let uprobe: &mut UProbe = ebpf.program_mut("deferproc_stack").unwrap().try_into().unwrap();
        uprobe.load().unwrap();
        let pid = NonZeroU32::new(std::process::id()).unwrap();
        let count = || -> u64 {
            let counter = deferprobe_common::Counter::DeferProcStack;
            counters.get(&0, 0).unwrap().iter().map(|c| c.get(counter)).sum()
        };
        for (cookie, expected_taken) in [(COOKIE_FALLS_THROUGH, 0), (0, 100)] {
            let points = [
                ("deferprobe_test_falls_through", stack_checks::OFFSETS[0]),
                ("deferprobe_test_branch_taken", stack_checks::OFFSETS[1]),
            ]
            .map(|(symbol, offset)| UProbeAttachPoint {
                location: UProbeAttachLocation::SymbolOffset(symbol, offset),
                cookie: Some(cookie),
            });
            let links: Vec<_> = points
                .into_iter()
                .map(|point| {
                    uprobe.attach([point], "/proc/self/exe", UProbeScope::OneProcess(pid)).unwrap()
                })
                .collect();
            let before = count();
            for _ in 0..100 {
                // SAFETY: leaf functions of ours that only branch and return.
                unsafe { deferprobe_test_falls_through() };
            }
            assert_eq!(count() - before, 100, "falls through, cookie {cookie}");
            let before = count();
            for _ in 0..100 {
                // SAFETY: as above.
                unsafe { deferprobe_test_branch_taken() };
            }
            assert_eq!(count() - before, expected_taken, "taken, cookie {cookie}");
            for link in links {
                uprobe.detach(link).unwrap();
            }
        }
    }

    #[test]
    fn missing_kernel_features_are_named() {
        assert!(missing_kernel_features(true, true).is_ok());
        let no_btf = missing_kernel_features(false, true).unwrap_err();
        assert_eq!(no_btf.kind, ErrorKind::Kernel);
        assert_eq!(no_btf.kind.exit_code(), 69);
        assert_eq!(
            no_btf.to_string(),
            "kernel lacks BTF (/sys/kernel/btf/vmlinux missing: need a kernel built with \
             CONFIG_DEBUG_INFO_BTF=y)"
        );
        let no_ring = missing_kernel_features(true, false).unwrap_err();
        assert_eq!(no_ring.kind, ErrorKind::Kernel);
        assert_eq!(no_ring.to_string(), "kernel lacks BPF ring buffer support (need Linux >= 5.8)");
        let neither = missing_kernel_features(false, false).unwrap_err().to_string();
        assert!(neither.starts_with("kernel lacks BTF ("), "{neither}");
        assert!(
            neither.ends_with(") and BPF ring buffer support (need Linux >= 5.8)"),
            "{neither}"
        );
    }
}
