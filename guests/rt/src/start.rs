//! What the [`entry!`](crate::entry) macro expands to calls into: the start routine and the
//! panic handler. The items that the linker or the compiler look for by name (`_start`,
//! `#[panic_handler]`, `#[global_allocator]`, `memcpy`...) are emitted by the macro in the guest
//! binary, not here, so that host unit tests of crates using this library link `std` cleanly.

use core::panic::PanicInfo;

use crate::{boot::BootInfo, heap, sys, PANIC_EXIT_CODE};

/// Exit code when the boot info is invalid.
pub const BAD_BOOT_INFO_EXIT_CODE: u64 = 100;

/// Reads the boot info, sets up the heap, runs `main` and powers off with its result.
///
/// # Safety
/// Called once, by `_start`, with the boot info address the VMM passed in RDI.
pub unsafe fn start(boot_info_addr: usize, main: fn(&BootInfo) -> u64) -> ! {
    // SAFETY: the VMM passes the address of the boot info page (DEVICES.md), identity-mapped
    // and never written again; `from_addr` validates the magic and version.
    let boot = match unsafe { BootInfo::from_addr(boot_info_addr) } {
        Ok(boot) => boot,
        Err(e) => {
            crate::println!("rt: bad boot info at {boot_info_addr:#x}: {e}");
            sys::power_off(BAD_BOOT_INFO_EXIT_CODE)
        }
    };
    let (start, end) = boot.free_memory();
    // SAFETY: [start, end) is RAM that no one else uses: past the loaded image, below the stack
    // (DEVICES.md memory map); the caller guarantees this is the only call.
    unsafe { heap::init(start, end) };
    sys::power_off(main(&boot))
}

/// The panic handler: prints the message and powers off with [`PANIC_EXIT_CODE`].
pub fn panic(info: &PanicInfo<'_>) -> ! {
    crate::println!("panic: {info}");
    sys::power_off(PANIC_EXIT_CODE)
}
