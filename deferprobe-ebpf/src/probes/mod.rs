//! One module per probe area; each handler is an `on_*` function the entry points in
//! `main.rs` call.

pub(crate) mod allocations;
pub(crate) mod defers;
pub(crate) mod goroutines;
pub(crate) mod map_writes;
pub(crate) mod processes;
