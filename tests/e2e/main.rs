//! End-to-end tests: the real deferprobe binary loads real eBPF programs into this kernel and
//! traces real Go programs (tests/go) built with several Go releases. Every count is checked
//! against the ground truth the Go program computes itself. Run as root, after
//! `cargo xtask go-programs` (`./x test` does both).

mod bad_input;
mod c_shared;
mod checks;
mod cli_errors;
mod containers;
mod correlation;
mod counts;
mod defer_sites;
mod demo;
mod edges;
mod endings;
mod follow;
mod governor;
mod idle_probes;
mod matrix;
mod metrics;
mod placement;
mod pprof;
mod runtime_state;
mod safety;
mod support;
