//! The aggregator: pure state built from probe events, no I/O. Events in ([`Event::decode`],
//! [`Aggregator::apply`]); pending heap defers per goroutine and per-site totals out.
//!
//! Model: a heap defer registration adds a pending record to its goroutine, keyed by the frame
//! (caller SP) and site (caller PC). `deferreturn` runs the records of the frame whose SP it is
//! called with; a goroutine's exit ends all its records. Goroutines are keyed by goid, which,
//! unlike the g struct, is never reused.

use std::collections::HashMap;

use deferprobe_common::{DeferRegistered, DeferReturn, EventHeader, EventKind, GoroutineExit};

/// One decoded ring-buffer event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    DeferRegistered(DeferRegistered),
    DeferReturn(DeferReturn),
    GoroutineExit(GoroutineExit),
}

/// Why a ring-buffer record could not be decoded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("event of {0} bytes is shorter than its header")]
    Short(usize),
    #[error("unknown event kind {0}")]
    UnknownKind(u32),
    #[error("{kind:?} event of {len} bytes, expected {expected}")]
    WrongSize { kind: EventKind, len: usize, expected: usize },
}

/// Reads a `#[repr(C)]` plain-old-data value from the exact-size prefix of `bytes`.
fn read_pod<T: Copy>(kind: EventKind, bytes: &[u8]) -> Result<T, DecodeError> {
    let expected = size_of::<T>();
    if bytes.len() < expected {
        return Err(DecodeError::WrongSize { kind, len: bytes.len(), expected });
    }
    // SAFETY: T is a repr(C) struct of integers (any bit pattern is valid) and `bytes` holds at
    // least size_of::<T>() bytes; read_unaligned has no alignment requirement.
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

impl Event {
    /// Decodes one ring-buffer record. Never panics, whatever the bytes.
    pub fn decode(bytes: &[u8]) -> Result<Event, DecodeError> {
        if bytes.len() < size_of::<EventHeader>() {
            return Err(DecodeError::Short(bytes.len()));
        }
        let raw_kind = u32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        let kind = EventKind::from_u32(raw_kind).ok_or(DecodeError::UnknownKind(raw_kind))?;
        Ok(match kind {
            EventKind::DeferRegistered => Event::DeferRegistered(read_pod(kind, bytes)?),
            EventKind::DeferReturn => Event::DeferReturn(read_pod(kind, bytes)?),
            EventKind::GoroutineExit => Event::GoroutineExit(read_pod(kind, bytes)?),
        })
    }

    pub fn header(&self) -> &EventHeader {
        match self {
            Event::DeferRegistered(e) => &e.header,
            Event::DeferReturn(e) => &e.header,
            Event::GoroutineExit(e) => &e.header,
        }
    }
}

/// A heap defer record not yet run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PendingDefer {
    pub closure: u64,
    pub caller_pc: u64,
    pub caller_sp: u64,
    pub registered_ns: u64,
}

/// Registered and released heap defers of one defer site (the PC after the deferproc call).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SiteTotals {
    pub registered: u64,
    pub released: u64,
}

impl SiteTotals {
    pub fn pending(&self) -> u64 {
        self.registered - self.released
    }
}

/// Events seen, by kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventTotals {
    pub defer_registered: u64,
    pub defer_return: u64,
    pub goroutine_exit: u64,
    /// Registrations and returns whose goroutine id could not be read (not tracked).
    pub without_goid: u64,
    pub undecodable: u64,
}

#[derive(Debug, Default)]
pub struct Aggregator {
    pending: HashMap<u64, Vec<PendingDefer>>,
    sites: HashMap<u64, SiteTotals>,
    events: EventTotals,
}

impl Aggregator {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn apply(&mut self, event: &Event) {
        let goid = event.header().goid;
        match event {
            Event::DeferRegistered(e) => {
                self.events.defer_registered += 1;
                self.sites.entry(e.caller_pc).or_default().registered += 1;
                if goid == 0 {
                    // Counted in the site, but without a goroutine it can't be released.
                    self.sites.entry(e.caller_pc).or_default().released += 1;
                    self.events.without_goid += 1;
                    return;
                }
                self.pending.entry(goid).or_default().push(PendingDefer {
                    closure: e.closure,
                    caller_pc: e.caller_pc,
                    caller_sp: e.caller_sp,
                    registered_ns: e.header.ktime_ns,
                });
            }
            Event::DeferReturn(e) => {
                self.events.defer_return += 1;
                if goid == 0 {
                    self.events.without_goid += 1;
                    return;
                }
                self.release(goid, |record| record.caller_sp == e.caller_sp);
            }
            Event::GoroutineExit(_) => {
                self.events.goroutine_exit += 1;
                self.release(goid, |_| true);
            }
        }
    }

    /// Counts a ring-buffer record that [`Event::decode`] rejected.
    pub fn record_undecodable(&mut self) {
        self.events.undecodable += 1;
    }

    fn release(&mut self, goid: u64, mut runs: impl FnMut(&PendingDefer) -> bool) {
        let Some(records) = self.pending.get_mut(&goid) else { return };
        records.retain(|record| {
            if runs(record) {
                self.sites.entry(record.caller_pc).or_default().released += 1;
                false
            } else {
                true
            }
        });
        if records.is_empty() {
            self.pending.remove(&goid);
        }
    }

    pub fn events(&self) -> EventTotals {
        self.events
    }

    /// Heap defers registered and not yet run, over all goroutines.
    pub fn pending_heap_defers(&self) -> u64 {
        self.pending.values().map(|records| records.len() as u64).sum()
    }

    /// Goroutines with at least one pending heap defer, and their records (oldest first).
    pub fn pending_by_goroutine(&self) -> impl Iterator<Item = (u64, &[PendingDefer])> {
        self.pending.iter().map(|(goid, records)| (*goid, records.as_slice()))
    }

    /// Per-site totals, keyed by caller PC.
    pub fn sites(&self) -> impl Iterator<Item = (u64, SiteTotals)> + '_ {
        self.sites.iter().map(|(pc, totals)| (*pc, *totals))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(kind: EventKind, goid: u64, ktime_ns: u64) -> EventHeader {
        EventHeader { kind: kind as u32, cpu: 0, ktime_ns, goid }
    }

    fn registered(goid: u64, pc: u64, sp: u64) -> Event {
        Event::DeferRegistered(DeferRegistered {
            header: header(EventKind::DeferRegistered, goid, 0),
            closure: 0xc000_0000 + pc,
            caller_pc: pc,
            caller_sp: sp,
        })
    }

    fn returned(goid: u64, sp: u64) -> Event {
        Event::DeferReturn(DeferReturn {
            header: header(EventKind::DeferReturn, goid, 0),
            caller_pc: 0,
            caller_sp: sp,
        })
    }

    fn exited(goid: u64) -> Event {
        Event::GoroutineExit(GoroutineExit { header: header(EventKind::GoroutineExit, goid, 0) })
    }

    fn bytes_of<T: Copy>(value: &T) -> Vec<u8> {
        // SAFETY: test-only view of a repr(C) POD value.
        unsafe { std::slice::from_raw_parts((value as *const T).cast::<u8>(), size_of::<T>()) }
            .to_vec()
    }

    #[test]
    fn decodes_every_kind_and_rejects_garbage() {
        for event in [registered(7, 0x401000, 0xc000100), returned(7, 0xc000100), exited(7)] {
            let bytes = match &event {
                Event::DeferRegistered(e) => bytes_of(e),
                Event::DeferReturn(e) => bytes_of(e),
                Event::GoroutineExit(e) => bytes_of(e),
            };
            assert_eq!(Event::decode(&bytes), Ok(event));
            assert!(Event::decode(&bytes[..bytes.len() - 1]).is_err());
        }
        assert_eq!(Event::decode(&[1, 0, 0]), Err(DecodeError::Short(3)));
        assert_eq!(Event::decode(&[9; 24]), Err(DecodeError::UnknownKind(0x0909_0909)));
        // A DeferRegistered header with no payload.
        let header_only = bytes_of(registered(1, 2, 3).header());
        assert!(matches!(Event::decode(&header_only), Err(DecodeError::WrongSize { .. })));
    }

    #[test]
    fn loop_defers_pile_up_until_the_frame_returns() {
        let mut agg = Aggregator::new();
        for _ in 0..300 {
            agg.apply(&registered(5, 0x401000, 0xc000_8000));
        }
        assert_eq!(agg.pending_heap_defers(), 300);
        // Another frame's return releases nothing of this one.
        agg.apply(&returned(5, 0xc000_7000));
        assert_eq!(agg.pending_heap_defers(), 300);
        agg.apply(&returned(5, 0xc000_8000));
        assert_eq!(agg.pending_heap_defers(), 0);
        let sites: Vec<_> = agg.sites().collect();
        assert_eq!(sites, [(0x401000, SiteTotals { registered: 300, released: 300 })]);
    }

    #[test]
    fn per_request_handlers_release_everything() {
        let mut agg = Aggregator::new();
        for request in 0..1000u64 {
            let goid = 100 + request % 7;
            for _ in 0..3 {
                agg.apply(&registered(goid, 0x402000, 0xc001_0000));
            }
            agg.apply(&returned(goid, 0xc001_0000));
        }
        assert_eq!(agg.pending_heap_defers(), 0);
        assert_eq!(agg.pending_by_goroutine().count(), 0);
        let totals = agg.sites().next().unwrap().1;
        assert_eq!((totals.registered, totals.released, totals.pending()), (3000, 3000, 0));
    }

    #[test]
    fn nested_frames_and_goroutine_exit() {
        let mut agg = Aggregator::new();
        agg.apply(&registered(9, 0x401000, 0xc000_9000)); // outer frame
        agg.apply(&registered(9, 0x402000, 0xc000_8000)); // inner frame
        agg.apply(&registered(10, 0x402000, 0xc000_8000)); // other goroutine, same sp
        agg.apply(&returned(9, 0xc000_8000));
        assert_eq!(agg.pending_heap_defers(), 2);
        agg.apply(&exited(9));
        assert_eq!(agg.pending_heap_defers(), 1);
        assert_eq!(agg.pending_by_goroutine().map(|(g, r)| (g, r.len())).collect::<Vec<_>>(), [(10, 1)]);
        assert_eq!(agg.events().goroutine_exit, 1);
    }

    #[test]
    fn interleaved_goroutines() {
        // Events of two goroutines interleaved (as records from two CPUs arrive).
        let mut agg = Aggregator::new();
        for i in 0..50 {
            agg.apply(&registered(1, 0x401000, 0xc000_1000));
            agg.apply(&registered(2, 0x401000, 0xc000_2000));
            if i % 10 == 9 {
                agg.apply(&returned(2, 0xc000_2000));
            }
        }
        assert_eq!(agg.pending_by_goroutine().find(|(g, _)| *g == 1).unwrap().1.len(), 50);
        assert!(agg.pending_by_goroutine().all(|(g, _)| g == 1));
    }

    #[test]
    fn unknown_goroutine_is_counted_not_tracked() {
        let mut agg = Aggregator::new();
        agg.apply(&registered(0, 0x401000, 0xc000_1000));
        agg.apply(&returned(0, 0xc000_1000));
        agg.record_undecodable();
        assert_eq!(agg.pending_heap_defers(), 0);
        assert_eq!(agg.events().without_goid, 2);
        assert_eq!(agg.events().undecodable, 1);
    }
}
