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
//! The items looked up by name — `_start`, the panic handler, the global allocator, `memcpy` and
//! friends, `rust_eh_personality` — are emitted by [`entry!`] in the guest binary only, so that
//! this library and the libraries built on it can be unit-tested on the host with `std`.
#![cfg_attr(not(test), no_std)]
#![deny(missing_docs)]

extern crate alloc;

pub mod boot;
pub mod cmdline;
pub mod console;
pub mod hal;
pub mod heap;
pub mod mem;
pub mod start;
pub mod sys;

pub use boot::BootInfo;

/// The exit code written to `POWER_OFF` when the guest panics.
pub const PANIC_EXIT_CODE: u64 = 101;

/// Declares the guest's main function, `fn(&BootInfo) -> u64` (its return value becomes the VM's
/// exit code, written to `POWER_OFF`), and emits the runtime items of the binary: `_start`, the
/// panic handler, the global allocator, the `memcpy` family and `rust_eh_personality`.
#[macro_export]
macro_rules! entry {
    ($main:path) => {
        // `_start` is placed first in the image by link.ld (`.text.entry`). The VMM passes the
        // boot info address in RDI and sets RSP = 8 (mod 16); re-aligning makes this robust.
        ::core::arch::global_asm!(
            ".section .text.entry,\"ax\",@progbits",
            ".global _start",
            "_start:",
            "xor ebp, ebp",
            "and rsp, -16",
            "call {start}",
            "ud2",
            start = sym __ftvm_rt_start,
        );

        extern "C" fn __ftvm_rt_start(boot_info_addr: usize) -> ! {
            let main: fn(&$crate::BootInfo) -> u64 = $main;
            // SAFETY: called once, by `_start`, with the address the VMM passed in RDI.
            unsafe { $crate::start::start(boot_info_addr, main) }
        }

        #[panic_handler]
        fn __ftvm_panic(info: &::core::panic::PanicInfo<'_>) -> ! {
            $crate::start::panic(info)
        }

        #[global_allocator]
        static __FTVM_ALLOCATOR: $crate::heap::GuestAllocator = $crate::heap::GuestAllocator;

        /// C `memcpy` (no libc is linked).
        ///
        /// # Safety
        /// The C contract.
        #[no_mangle]
        pub unsafe extern "C" fn memcpy(d: *mut u8, s: *const u8, n: usize) -> *mut u8 {
            // SAFETY: same contract.
            unsafe { $crate::mem::memcpy(d, s, n) }
        }

        /// C `memmove`.
        ///
        /// # Safety
        /// The C contract.
        #[no_mangle]
        pub unsafe extern "C" fn memmove(d: *mut u8, s: *const u8, n: usize) -> *mut u8 {
            // SAFETY: same contract.
            unsafe { $crate::mem::memmove(d, s, n) }
        }

        /// C `memset`.
        ///
        /// # Safety
        /// The C contract.
        #[no_mangle]
        pub unsafe extern "C" fn memset(d: *mut u8, c: i32, n: usize) -> *mut u8 {
            // SAFETY: same contract.
            unsafe { $crate::mem::memset(d, c, n) }
        }

        /// C `memcmp`.
        ///
        /// # Safety
        /// The C contract.
        #[no_mangle]
        pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
            // SAFETY: same contract.
            unsafe { $crate::mem::memcmp(a, b, n) }
        }

        /// C `bcmp`.
        ///
        /// # Safety
        /// The C contract.
        #[no_mangle]
        pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
            // SAFETY: same contract.
            unsafe { $crate::mem::bcmp(a, b, n) }
        }

        /// Never called (`panic = "abort"`), but precompiled `core` may reference it.
        #[no_mangle]
        extern "C" fn rust_eh_personality() {}
    };
}
