//! Atomics shim: `std` normally, `loom`'s under `--cfg loom` so the index protocol can be
//! model-checked (the pattern of crossbeam-utils' `primitive` module).

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicU64, Ordering};
#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicU64, Ordering};
