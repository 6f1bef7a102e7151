//! Empty library target: lets `deferprobe` name this crate as a build-dependency (so cargo
//! rebuilds it when this crate changes). The probes are in `main.rs` and its modules, built for the BPF target.
#![no_std]
