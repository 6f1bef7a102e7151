//! deferprobe: finds deferred closures piling up in running Go programs, and the maps they keep
//! alive, with uprobes on the Go runtime.
//!
//! Pipeline: [`binary`] analyses the target executable → [`plan`] decides every probe →
//! [`tracer`] loads and attaches the eBPF programs (to the executable, and to the Go plugins
//! [`modules`] finds in the target) → [`session`] drains the ring buffer and the
//! per-CPU counters on timers → [`aggregator`] (pure) turns events into state → [`report`],
//! at the end and while tracing goes on (interim reports, [`metrics`] for Prometheus).

pub mod aggregator;
pub mod arch;
pub mod binary;
mod calibration_target;
pub mod cli;
pub mod cost;
pub mod error;
pub mod estimate;
pub mod findings;
pub mod governor;
pub mod inspect;
pub mod layout;
pub mod metrics;
pub mod modules;
pub mod output;
pub mod plan;
pub mod pprof;
pub mod process_tree;
pub mod report;
pub mod session;
pub mod snapshot;
pub mod state;
pub mod target;
pub mod tracer;
