//! Runtime of the ftvm guest programs.
//!
//! Every guest is a `no_std`, `no_main` ELF executable linked at `0x10000` (`link.ld`) that the
//! VMM runs at CPL3 in 64-bit long mode with identity-mapped memory. The contract with the VMM —
//! memory map, boot info, the paravirtual system device and the virtio-mmio devices — is
//! `vmm-core/DEVICES.md`. This crate provides:
//!
//! - the entry point `_start` (aligns the stack, reads the [`BootInfo`], sets up the heap over the
//!   free memory and calls the guest's `main` declared with [`entry!`]), powering off with the
//!   value `main` returns;
//! - the system device registers ([`sys`]): clock, entropy, power-off, WAIT, console, debug;
//! - console printing ([`print!`], [`println!`]);
//! - a global allocator over the free memory ([`heap`]);
//! - the `memcpy` family, the panic handler (prints, then powers off with [`PANIC_EXIT_CODE`]);
//! - a [`virtio_drivers::Hal`] for identity-mapped memory ([`hal::IdentityHal`]) and the
//!   addresses of the virtio-mmio devices ([`hal::mmio_transport`]);
//! - command-line parsing ([`cmdline::Cmdline`]).
//!
//! A guest looks like this:
//!
//! ```ignore
//! #![no_std]
//! #![no_main]
//! use ftvm_guest_rt::{entry, println, BootInfo};
//!
//! entry!(main);
//!
//! fn main(boot: &BootInfo) -> u64 {
//!     println!("hello, cmdline={}", boot.cmdline.as_str());
//!     0 // the exit code written to POWER_OFF
//! }
//! ```
//!
//! Under `cfg(test)` (host unit tests) the runtime items — entry point, allocator, panic
//! handler, `memcpy` — are left out and the crate links `std`, so the pure parts are testable.
#![cfg_attr(not(test), no_std)]
#![deny(missing_docs)]

extern crate alloc;

pub mod boot;
pub mod cmdline;
pub mod console;
pub mod hal;
pub mod heap;
#[cfg(not(test))]
mod mem;
#[cfg(not(test))]
mod start;
pub mod sys;

pub use boot::BootInfo;

/// The exit code written to `POWER_OFF` when the guest panics.
pub const PANIC_EXIT_CODE: u64 = 101;

/// Declares the guest's main function: `fn(&BootInfo) -> u64`, whose return value becomes the
/// VM's exit code (written to `POWER_OFF`).
#[macro_export]
macro_rules! entry {
    ($main:path) => {
        /// The guest's entry point called by the runtime after the heap is set up.
        #[no_mangle]
        pub fn __ftvm_guest_main(boot: &$crate::BootInfo) -> u64 {
            let main: fn(&$crate::BootInfo) -> u64 = $main;
            main(boot)
        }
    };
}
