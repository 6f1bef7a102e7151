//! The kernel side, seen from userspace: loads the embedded eBPF object with the plan's
//! configuration, attaches every planned probe to one process, and reads what the probes
//! produce (per-CPU counters and ring-buffer events). Dropping a [`Tracer`] detaches everything;
//! the kernel also does so if deferprobe dies (links are held by file descriptors only).

use std::{num::NonZeroU32, path::Path};

use aya::{
    Ebpf, EbpfLoader,
    sys::{UProbeMultiFeature, is_uprobe_multi_supported},
    maps::{HashMap, MapData, MapType, PerCpuArray, RingBuf},
    programs::{
        UProbe,
        uprobe::{UProbeAttachLocation, UProbeScope},
    },
};
use deferprobe_common::{Counters, KnownMap, ProbeConfig};

use crate::{
    error::{Error, Result},
    plan::{ProbePlan, ProbeProgram},
};

/// The compiled deferprobe-ebpf object, built by build.rs.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/deferprobe"));

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
    _ebpf: Ebpf,
    mode: AttachMode,
    events: RingBuf<MapData>,
    counters: PerCpuArray<MapData, Counters>,
    known_maps: HashMap<MapData, u64, KnownMap>,
    attached: usize,
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
        let mut ebpf = EbpfLoader::new()
            .override_global("PROBE_CONFIG", &config, true)
            .map_max_entries("EVENTS", ring_bytes)
            .load(EBPF_OBJECT)
            .map_err(|err| bpf_error("loading the eBPF programs", &err))?;

        let pid = NonZeroU32::new(pid).ok_or_else(|| Error::usage("pid 0 is not a process"))?;
        // Go programs are multi-threaded: a multi-uprobe link must filter by process, not by
        // thread (fixed in Linux 6.9).
        let mode = match is_uprobe_multi_supported(UProbeMultiFeature::ProcessScopedPidFilter) {
            Ok(true) => AttachMode::Multi,
            _ => AttachMode::PerPoint,
        };
        let mut attached = 0;
        for program in ProbeProgram::ALL {
            let offsets: Vec<u64> = plan.probes_of(program).map(|p| p.file_offset).collect();
            if offsets.is_empty() {
                continue;
            }
            let name = match mode {
                AttachMode::Multi => format!("{}_multi", program.name()),
                AttachMode::PerPoint => program.name().to_owned(),
            };
            let uprobe: &mut UProbe = ebpf
                .program_mut(&name)
                .ok_or_else(|| Error::internal(format!("no eBPF program {name}")))?
                .try_into()
                .map_err(|err| bpf_error(program.name(), &err))?;
            uprobe.load().map_err(|err| bpf_error(&format!("loading {}", program.name()), &err))?;
            let points = offsets.iter().map(|&offset| UProbeAttachLocation::AbsoluteOffset(offset));
            uprobe.attach(points, exe, UProbeScope::OneProcess(pid)).map_err(|err| {
                bpf_error(&format!("attaching {} to {}", program.name(), exe.display()), &err)
            })?;
            attached += offsets.len();
        }

        let events = ebpf
            .take_map("EVENTS")
            .ok_or_else(|| Error::internal("no EVENTS map"))
            .and_then(|map| RingBuf::try_from(map).map_err(|err| bpf_error("EVENTS", &err)))?;
        let counters = ebpf
            .take_map("COUNTERS")
            .ok_or_else(|| Error::internal("no COUNTERS map"))
            .and_then(|map| PerCpuArray::try_from(map).map_err(|err| bpf_error("COUNTERS", &err)))?;
        let known_maps = ebpf
            .take_map("KNOWN_MAPS")
            .ok_or_else(|| Error::internal("no KNOWN_MAPS map"))
            .and_then(|map| HashMap::try_from(map).map_err(|err| bpf_error("KNOWN_MAPS", &err)))?;
        Ok(Tracer { _ebpf: ebpf, mode, events, counters, known_maps, attached })
    }

    /// Number of attach points (one per probed function).
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

    /// mapassign calls on `map` since it entered the kernel's known-maps set; None if it is not
    /// (or no longer) there.
    pub fn map_writes(&self, map: u64) -> Option<u64> {
        self.known_maps.get(&map, 0).ok().map(|known| known.writes)
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

/// The configuration the probes read (ELF virtual addresses; the probes work out the load bias
/// of PIE binaries themselves).
fn probe_config(plan: &ProbePlan) -> ProbeConfig {
    let mallocgc = plan.probes_of(ProbeProgram::Mallocgc).next();
    ProbeConfig {
        g_goid: plan.layout.g_goid,
        g_m: plan.layout.g_m,
        m_curg: plan.layout.m_curg,
        mallocgc_start: plan.mallocgc_range.0,
        mallocgc_end: plan.mallocgc_range.1,
        mallocgc_probe: mallocgc.map_or(0, |p| p.address + p.attach_offset),
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
const BTF_PATH: &str = "/sys/kernel/btf/vmlinux";

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

/// Maps an aya error to one line of the right kind: permission problems are the common case.
fn bpf_error(what: &str, err: &dyn std::error::Error) -> Error {
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

    #[test]
    fn missing_kernel_features_are_named() {
        assert!(missing_kernel_features(true, true).is_ok());
        let no_btf = missing_kernel_features(false, true).unwrap_err();
        assert_eq!(no_btf.kind, ErrorKind::Kernel);
        assert_eq!(no_btf.kind.exit_code(), 5);
        assert_eq!(
            no_btf.to_string(),
            "kernel lacks BTF (/sys/kernel/btf/vmlinux missing: need a kernel built with \
             CONFIG_DEBUG_INFO_BTF=y)"
        );
        let no_ring = missing_kernel_features(true, false).unwrap_err();
        assert_eq!(no_ring.kind, ErrorKind::Kernel);
        assert_eq!(
            no_ring.to_string(),
            "kernel lacks BPF ring buffer support (need Linux >= 5.8)"
        );
        let neither = missing_kernel_features(false, false).unwrap_err().to_string();
        assert!(neither.starts_with("kernel lacks BTF ("), "{neither}");
        assert!(neither.ends_with(") and BPF ring buffer support (need Linux >= 5.8)"), "{neither}");
    }
}
