//! The `kv` guest's logic, independent of devices so that it is unit-tested on the host: the
//! Redis protocol ([`resp`]), the store and its commands ([`store`]), the append-only log on
//! the block device ([`log`]), and the memory limit ([`memory`]).
#![cfg_attr(not(test), no_std)]
#![deny(missing_docs)]

extern crate alloc;

pub mod log;
pub mod memory;
pub mod resp;
pub mod store;
