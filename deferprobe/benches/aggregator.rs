//! Aggregator benchmarks for `cargo xtask bench` (BENCHMARKS.md), no kernel involved:
//!
//! - `throughput`: a synthetic ring-buffer byte stream (heap defer registrations, deferreturns
//!   releasing them, new maps, goroutine exits, in the proportions of a defer-heavy program) is
//!   decoded with [`Event::decode`] and applied to one [`Aggregator`], on one core.
//! - `memory`: 100,000 goroutines each with a pending heap defer, and 1,000,000 distinct maps,
//!   replayed into one aggregator; reports the process's peak RSS. Runs in a
//!   child process of its own (`memory-child`) so nothing else inflates the peak.
//!
//! Each result is one JSON line on stdout. `cargo bench -p deferprobe --bench aggregator -- MODE`
//! (MODE: throughput, memory, or all, the default).
use std::{hint::black_box, process::Command, time::Instant};

use deferprobe::aggregator::{Aggregator, Event};
use deferprobe_common::{
    DeferRegistered, DeferReturn, EventHeader, EventKind, GoroutineExit, MapSeen,
};

fn header(kind: EventKind, ktime_ns: u64, goid: u64) -> EventHeader {
    EventHeader { kind: kind as u32, cpu: (goid % 2) as u32, ktime_ns, goid }
}

/// Appends one event as the ring buffer delivers it: the record, padded to 8 bytes.
fn push<T: Copy>(stream: &mut Vec<u8>, offsets: &mut Vec<(u32, u32)>, event: &T) {
    let start = stream.len();
    // SAFETY: T is one of the #[repr(C)] plain-old-data event structs (no padding holes).
    let bytes =
        unsafe { std::slice::from_raw_parts((event as *const T).cast::<u8>(), size_of::<T>()) };
    stream.extend_from_slice(bytes);
    offsets.push((start as u32, size_of::<T>() as u32));
    stream.resize(stream.len().next_multiple_of(8), 0);
}

fn registered(ktime_ns: u64, goid: u64, closure: u64, caller_pc: u64, sp: u64) -> DeferRegistered {
    DeferRegistered {
        header: header(EventKind::DeferRegistered, ktime_ns, goid),
        closure,
        caller_pc,
        caller_sp: sp,
        g: 0xc000_0000 + goid * 0x400,
        stack_hi: 0,
    }
}

/// A stream of `calls` calls spread over 64 goroutines: each call writes a new map or reuses
/// one (MapSeen for 1 call in 4), registers 10 heap defers, then returns
/// (one DeferReturn releasing all 10). Every 50th call ends its goroutine.
fn defer_heavy_stream(calls: u64) -> (Vec<u8>, Vec<(u32, u32)>) {
    let mut stream = Vec::new();
    let mut offsets = Vec::new();
    let mut t = 1_000_000u64;
    for call in 0..calls {
        let goid = 100 + call % 64;
        let map = 0xc100_0000 + (call / 4) * 0x30;
        let pc = 0x49_0000 + (call % 16) * 0x40;
        let sp = 0xc200_0000 + goid * 0x8000;
        if call % 4 == 0 {
            t += 1;
            let e = MapSeen {
                header: header(EventKind::MapSeen, t, goid),
                map,
                map_type: 0x4a_0000,
                caller_pc: pc,
            };
            push(&mut stream, &mut offsets, &e);
        }
        for i in 0..10u64 {
            t += 1;
            let e = registered(t, goid, 0xc300_0000 + call * 0x100 + i * 0x10, pc, sp);
            push(&mut stream, &mut offsets, &e);
        }
        t += 1;
        let e = DeferReturn {
            header: header(EventKind::DeferReturn, t, goid),
            caller_pc: pc + 8,
            caller_sp: sp,
            stack_hi: 0,
        };
        push(&mut stream, &mut offsets, &e);
        if call % 50 == 49 {
            t += 1;
            push(
                &mut stream,
                &mut offsets,
                &GoroutineExit { header: header(EventKind::GoroutineExit, t, goid) },
            );
        }
    }
    (stream, offsets)
}

fn throughput() {
    let (stream, offsets) = defer_heavy_stream(50_000);
    let events_per_pass = offsets.len() as u64;
    let mut best = f64::MAX;
    let mut total_events = 0u64;
    let mut total_secs = 0.0;
    for pass in 0..12 {
        let mut aggregator = Aggregator::new();
        let started = Instant::now();
        for &(start, len) in &offsets {
            let bytes = &stream[start as usize..(start + len) as usize];
            match Event::decode(black_box(bytes)) {
                Ok(event) => aggregator.apply(&event),
                Err(_) => aggregator.record_undecodable(),
            }
        }
        let secs = started.elapsed().as_secs_f64();
        black_box(&aggregator);
        let totals = aggregator.events();
        assert_eq!(totals.undecodable, 0);
        assert_eq!(aggregator.pending_heap_defers(), 0, "every registration is released");
        if pass >= 2 {
            // The first passes warm caches and the allocator.
            best = best.min(secs);
            total_events += events_per_pass;
            total_secs += secs;
        }
    }
    println!(
        "{{\"bench\":\"aggregator_throughput\",\"events_per_pass\":{},\"stream_bytes\":{},\"passes\":10,\"mean_events_per_sec\":{:.0},\"best_events_per_sec\":{:.0}}}",
        events_per_pass,
        stream.len(),
        total_events as f64 / total_secs,
        events_per_pass as f64 / best
    );
}

fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn memory_child(goroutines: u64, maps: u64) {
    let before = peak_rss_kib();
    let mut aggregator = Aggregator::new();
    let mut t = 1u64;
    let mut buf = Vec::with_capacity(128);
    let decode_apply = |aggregator: &mut Aggregator, bytes: &[u8]| {
        let event = Event::decode(bytes).expect("valid event");
        aggregator.apply(&event);
    };
    // Events go through bytes one at a time, as from the ring buffer: the stream itself is not
    // kept, only the aggregator's state.
    let mut one = |aggregator: &mut Aggregator, event_bytes: &[u8]| {
        buf.clear();
        buf.extend_from_slice(event_bytes);
        decode_apply(aggregator, &buf);
    };
    fn bytes_of<T>(e: &T) -> &[u8] {
        // SAFETY: plain-old-data event structs.
        unsafe { std::slice::from_raw_parts((e as *const T).cast::<u8>(), size_of::<T>()) }
    }
    for m in 0..maps {
        t += 1;
        let goid = 1 + m % goroutines.max(1);
        let e = MapSeen {
            header: header(EventKind::MapSeen, t, goid),
            map: 0xc100_0000 + m * 0x30,
            map_type: 0x4a_0000 + (m % 64) * 0x100,
            caller_pc: 0x49_0000 + (m % 256) * 0x10,
        };
        one(&mut aggregator, bytes_of(&e));
    }
    for goid in 1..=goroutines {
        t += 1;
        let e = registered(
            t,
            goid,
            0xc300_0000 + goid * 0x100,
            0x49_0000 + (goid % 256) * 0x40,
            0xc200_0000 + goid * 0x8000,
        );
        one(&mut aggregator, bytes_of(&e));
    }
    assert_eq!(aggregator.pending_heap_defers(), goroutines);
    assert_eq!(aggregator.events().map_seen, maps);
    let peak = peak_rss_kib();
    black_box(&aggregator);
    println!(
        "{{\"bench\":\"aggregator_memory\",\"goroutines\":{goroutines},\"pending_defers\":{goroutines},\"maps\":{maps},\"rss_before_kib\":{before},\"peak_rss_kib\":{peak}}}"
    );
}

fn main() {
    // cargo bench passes `--bench`; ignore flags.
    let mode =
        std::env::args().skip(1).find(|a| !a.starts_with('-')).unwrap_or_else(|| "all".into());
    match mode.as_str() {
        "throughput" => throughput(),
        "memory-child" => {
            let n = |i: usize| std::env::args().nth(i).and_then(|a| a.parse().ok()).unwrap_or(0);
            memory_child(n(2), n(3))
        }
        "memory" | "all" => {
            if mode == "all" {
                throughput();
            }
            // The goal's case, then each half alone to attribute the memory.
            for (goroutines, maps) in [(100_000, 1_000_000), (100_000, 0), (0, 1_000_000)] {
                let out = Command::new(std::env::current_exe().expect("own path"))
                    .args(["memory-child", &goroutines.to_string(), &maps.to_string()])
                    .output()
                    .expect("running the memory child");
                assert!(
                    out.status.success(),
                    "memory child failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                print!("{}", String::from_utf8_lossy(&out.stdout));
            }
        }
        other => {
            eprintln!("unknown mode {other} (throughput, memory, all)");
            std::process::exit(2);
        }
    }
}
