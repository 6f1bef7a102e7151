//! Ring-buffer records → `Event::decode` → the aggregator. The input is a sequence of records,
//! each a length byte and that many bytes, applied in order as the tracer would.
#![no_main]

use deferprobe::aggregator::{Aggregator, Event};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut aggregator = Aggregator::new();
    let mut rest = data;
    while let Some((&len, tail)) = rest.split_first() {
        let (record, tail) = tail.split_at(usize::from(len).min(tail.len()));
        rest = tail;
        match Event::decode(record) {
            Ok(event) => aggregator.apply(&event),
            Err(_) => aggregator.record_undecodable(),
        }
    }
    let _ = aggregator.events();
    let _ = aggregator.goroutines_to_reconcile();
    for (goid, pending) in aggregator.pending_by_goroutine() {
        for record in pending {
            for capture in record.captures() {
                let _ = aggregator.map(capture.map);
            }
        }
        let _ = aggregator.goroutine_sites(goid).count();
    }
    let _ = aggregator
        .sites()
        .map(|(_, totals)| totals.pending())
        .sum::<u64>();
    let _ = aggregator.pending_heap_defers();
});
