//! The entry point, the panic handler and the unwinding stubs.

use core::arch::global_asm;
use core::panic::PanicInfo;

use crate::{boot::BootInfo, heap, sys, PANIC_EXIT_CODE};

// `_start` is placed first in the image by link.ld (`.text.entry`). The VMM passes the boot info
// address in RDI and sets RSP ≡ 8 (mod 16); re-aligning here makes the entry robust anyway.
global_asm!(
    ".section .text.entry,\"ax\",@progbits",
    ".global _start",
    "_start:",
    "xor ebp, ebp",
    "and rsp, -16",
    "call {start}",
    "ud2",
    start = sym rt_start,
);

extern "Rust" {
    /// Defined by the guest binary through [`crate::entry!`].
    fn __ftvm_guest_main(boot: &BootInfo) -> u64;
}

/// Reads the boot info, sets up the heap, runs the guest's main and powers off with its result.
extern "C" fn rt_start(boot_info_addr: usize) -> ! {
    // SAFETY: the VMM passes the address of the boot info page (DEVICES.md), identity-mapped
    // and readable; `from_addr` validates the magic and version before trusting the fields.
    let boot = match unsafe { BootInfo::from_addr(boot_info_addr) } {
        Ok(boot) => boot,
        Err(e) => {
            crate::println!("rt: bad boot info at {boot_info_addr:#x}: {e}");
            sys::power_off(PANIC_EXIT_CODE - 1)
        }
    };
    let (start, end) = boot.free_memory();
    // SAFETY: [start, end) is RAM that no one else uses: past the loaded image, below the stack
    // (DEVICES.md memory map), and this is the only call.
    unsafe { heap::init(start, end) };
    // SAFETY: the symbol is defined by the guest binary with exactly this signature (entry!).
    let code = unsafe { __ftvm_guest_main(&boot) };
    sys::power_off(code)
}

#[panic_handler]
fn panic(info: &PanicInfo<'_>) -> ! {
    crate::println!("panic: {info}");
    sys::power_off(PANIC_EXIT_CODE)
}

/// Never called: the guests are built with `panic = "abort"`, but precompiled `core` may still
/// reference the personality routine.
#[no_mangle]
extern "C" fn rust_eh_personality() {}
