//! The paravirtual system device at `0xD000_0000` (DEVICES.md "The system device").
//!
//! ```text
//! offset  access  register
//! 0x00    R       MAGIC          "FTVMSYS1"
//! 0x08    R       CLOCK_NS       ns since the VM started        (nondeterministic)
//! 0x10    R       ENTROPY        64 random bits                 (nondeterministic)
//! 0x18    W       POWER_OFF      stop the VM with this exit code
//! 0x20    W       WAIT_DEADLINE  absolute CLOCK_NS deadline of the next WAIT (0 = none)
//! 0x28    R       WAIT           block until an event or the deadline -> event bits
//! 0x30    W       CONSOLE_ADDR   guest address of bytes to print
//! 0x38    W       CONSOLE_LEN    print CONSOLE_LEN bytes at CONSOLE_ADDR
//! 0x40    W       DEBUG          a u64 for the VMM's debug log
//! ```
//! Every access is one 8-byte MMIO access, i.e. one VM exit (~27 µs under nested PVM): batch.

use core::ptr;
use core::sync::atomic::{AtomicU64, Ordering};

/// The last value written to `WAIT_DEADLINE` (the register keeps its value), `u64::MAX` before the
/// first write: an unchanged deadline costs no exit.
static LAST_DEADLINE: AtomicU64 = AtomicU64::new(u64::MAX);

/// Base address of the MMIO window and of the system device (the guest ABI, `ftvm-abi`).
pub const MMIO_BASE: usize = ftvm_abi::MMIO_BASE as usize;
// Register offsets, magic and WAIT event bits: the guest ABI, defined once for the VMM and the
// guests (`ftvm-abi`).
pub use ftvm_abi::sys::{
    EVENT_BLK, EVENT_CONSOLE_RX, EVENT_NET_RX, EVENT_TIMER, REG_CLOCK_NS, REG_CONSOLE_ADDR,
    REG_CONSOLE_LEN, REG_DEBUG, REG_ENTROPY, REG_MAGIC, REG_POWER_OFF, REG_WAIT, REG_WAIT_DEADLINE,
    SYS_MAGIC,
};

fn read(reg: u64) -> u64 {
    // SAFETY: the system device registers are 8-byte aligned MMIO addresses in the identity-mapped
    // MMIO window (DEVICES.md); a read has no effect on Rust-visible memory.
    unsafe { ptr::read_volatile((MMIO_BASE + reg as usize) as *const u64) }
}

fn write(reg: u64, value: u64) {
    // SAFETY: as in `read`; the VMM handles the write in the exit, and the only guest memory it
    // touches on a write is the console buffer, which `console_write` keeps borrowed.
    unsafe { ptr::write_volatile((MMIO_BASE + reg as usize) as *mut u64, value) }
}

/// Whether the system device answers with its magic.
pub fn present() -> bool {
    read(REG_MAGIC) == SYS_MAGIC
}

/// Nanoseconds since the VM started (nondeterministic: recorded and replayed).
pub fn clock_ns() -> u64 {
    read(REG_CLOCK_NS)
}

/// 64 random bits from the host (nondeterministic: recorded and replayed).
pub fn entropy() -> u64 {
    read(REG_ENTROPY)
}

/// Stops the VM with `code` as its exit code.
pub fn power_off(code: u64) -> ! {
    write(REG_POWER_OFF, code);
    // The VMM does not resume a powered-off guest; should it, spin rather than fault.
    loop {
        core::hint::spin_loop();
    }
}

/// Blocks until an event or until `CLOCK_NS` reaches `deadline_ns` (`None`: no deadline), and
/// returns the event bits (`EVENT_*`). One exit for the WAIT read, plus one for the deadline
/// write when it differs from the previous one.
pub fn wait_until(deadline_ns: Option<u64>) -> u64 {
    let deadline = deadline_ns.map_or(0, |d| d.clamp(1, u64::MAX - 1));
    if LAST_DEADLINE.swap(deadline, Ordering::Relaxed) != deadline {
        write(REG_WAIT_DEADLINE, deadline);
    }
    read(REG_WAIT)
}

/// Like [`wait_until`], but keeps the deadline already in the register when it is still ahead
/// of `now_ns` and not later than `deadline_ns`: the WAIT may then end early (`EVENT_TIMER`
/// before `deadline_ns`; the caller polls and waits again), and the register write, one exit,
/// is saved. For an event loop that recomputes its next timer at every wait (a TCP
/// retransmission timer moves forward with every reply sent), this makes most waits one exit.
pub fn wait_by(now_ns: u64, deadline_ns: Option<u64>) -> u64 {
    let last = LAST_DEADLINE.load(Ordering::Relaxed);
    let keep =
        last != 0 && last != u64::MAX && last > now_ns && deadline_ns.is_none_or(|d| last <= d);
    if keep {
        read(REG_WAIT)
    } else {
        wait_until(deadline_ns)
    }
}

/// Prints `bytes` on the VM's console (two exits, whatever the length).
pub fn console_write(bytes: &[u8]) {
    if bytes.is_empty() {
        return;
    }
    write(REG_CONSOLE_ADDR, bytes.as_ptr() as u64);
    write(REG_CONSOLE_LEN, bytes.len() as u64);
}

/// Sends a value to the VMM's debug log.
pub fn debug(value: u64) {
    write(REG_DEBUG, value);
}
