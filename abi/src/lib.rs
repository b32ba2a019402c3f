//! `ftvm-abi`: the contract between the VMM (`vmm-core`) and the guest programs (`guests/`),
//! defined once (`vmm-core/DEVICES.md` describes it). Every value is a `u64` (addresses,
//! register offsets and boot info fields are 64-bit on both sides); a guest converts to `usize`
//! where it forms a pointer.
//!
//! ```text
//! guest-physical (= guest-virtual, identity-mapped)
//! 0x0000_8000  boot info       (boot::* offsets)
//! 0x0001_0000  guest image     IMAGE_BASE
//! 0xD000_0000  MMIO window     MMIO_BASE: 0x1000-byte slots
//!              slot 0          the system device (sys::REG_* offsets)
//!              slots 1..=3     virtio-mmio net, blk, console (virtio::*_BASE)
//! ```
//!
//! ```
//! use ftvm_abi::{sys, MMIO_BASE};
//! // The guest reads the clock at this address; the VMM recognizes it in the exit.
//! assert_eq!(MMIO_BASE + sys::REG_CLOCK_NS, 0xD000_0008);
//! ```
#![no_std]
#![deny(missing_docs)]

/// Address of the boot info page the VMM writes before the guest starts.
pub const BOOT_INFO_ADDR: u64 = 0x8000;
/// Where guest images are linked (lowest address a PT_LOAD segment may use).
pub const IMAGE_BASE: u64 = 0x1_0000;
/// Base of the MMIO window (no memory behind it: every access exits to the VMM).
pub const MMIO_BASE: u64 = 0xD000_0000;
/// Size of the MMIO window.
pub const MMIO_SIZE: u64 = 0x1_0000;
/// Size of one device's register window (slot) in the MMIO window.
pub const MMIO_SLOT_SIZE: u64 = 0x1000;
/// Size of the stack area below the end of RAM.
pub const STACK_AREA: u64 = 1 << 20;
/// Gap between the top of the stack and the end of RAM.
pub const STACK_GUARD: u64 = 0x1000;

/// The boot info page at [`BOOT_INFO_ADDR`]: field offsets (each field a little-endian `u64`,
/// the command line bytes last) and values.
///
/// ```text
/// offset  field
/// 0x00    magic "FTVMBOOT"
/// 0x08    ABI version (1)
/// 0x10    mem_size
/// 0x18    image_end      first free byte after the loaded segments, 4 KiB aligned
/// 0x20    stack_top
/// 0x28    mmio_base      MMIO_BASE
/// 0x30    cmdline_len    <= MAX_CMDLINE
/// 0x38    cmdline bytes  UTF-8
/// ```
pub mod boot {
    /// Offset of the magic ([`BOOT_MAGIC`]).
    pub const MAGIC: u64 = 0x00;
    /// Offset of the ABI version ([`ABI_VERSION`]).
    pub const VERSION: u64 = 0x08;
    /// Offset of the RAM size.
    pub const MEM_SIZE: u64 = 0x10;
    /// Offset of the first free byte after the image.
    pub const IMAGE_END: u64 = 0x18;
    /// Offset of the top of the stack.
    pub const STACK_TOP: u64 = 0x20;
    /// Offset of the base of the MMIO window.
    pub const MMIO_BASE: u64 = 0x28;
    /// Offset of the length of the command line.
    pub const CMDLINE_LEN: u64 = 0x30;
    /// Offset of the command line bytes.
    pub const CMDLINE: u64 = 0x38;
    /// The value of the magic field.
    pub const BOOT_MAGIC: u64 = u64::from_le_bytes(*b"FTVMBOOT");
    /// The ABI version (DEVICES.md).
    pub const ABI_VERSION: u64 = 1;
    /// Largest command line, in bytes.
    pub const MAX_CMDLINE: u64 = 4000;
}

/// The paravirtual system device in slot 0 of the MMIO window (DEVICES.md "The system
/// device"): register offsets, magic and the WAIT event bits. Every access is one 8-byte MMIO
/// access, one VM exit.
///
/// ```text
/// offset  access  register
/// 0x00    R       MAGIC          "FTVMSYS1"
/// 0x08    R       CLOCK_NS       ns since the VM started        (nondeterministic, recorded)
/// 0x10    R       ENTROPY        64 random bits                 (nondeterministic, recorded)
/// 0x18    W       POWER_OFF      stop the VM with this exit code
/// 0x20    W       WAIT_DEADLINE  absolute CLOCK_NS deadline of the next WAIT (0 = none)
/// 0x28    R       WAIT           block until an event or the deadline -> event bits (recorded)
/// 0x30    W       CONSOLE_ADDR   guest address of bytes to print
/// 0x38    W       CONSOLE_LEN    print CONSOLE_LEN bytes at CONSOLE_ADDR
/// 0x40    W       DEBUG          a u64 for the VMM's debug log
/// ```
pub mod sys {
    /// `MAGIC` register.
    pub const REG_MAGIC: u64 = 0x00;
    /// `CLOCK_NS` register.
    pub const REG_CLOCK_NS: u64 = 0x08;
    /// `ENTROPY` register.
    pub const REG_ENTROPY: u64 = 0x10;
    /// `POWER_OFF` register.
    pub const REG_POWER_OFF: u64 = 0x18;
    /// `WAIT_DEADLINE` register.
    pub const REG_WAIT_DEADLINE: u64 = 0x20;
    /// `WAIT` register.
    pub const REG_WAIT: u64 = 0x28;
    /// `CONSOLE_ADDR` register.
    pub const REG_CONSOLE_ADDR: u64 = 0x30;
    /// `CONSOLE_LEN` register.
    pub const REG_CONSOLE_LEN: u64 = 0x38;
    /// `DEBUG` register.
    pub const REG_DEBUG: u64 = 0x40;
    /// The value of the `MAGIC` register.
    pub const SYS_MAGIC: u64 = u64::from_le_bytes(*b"FTVMSYS1");

    /// WAIT event: received packets were placed in the net device's RX queue.
    pub const EVENT_NET_RX: u64 = 1 << 0;
    /// WAIT event: a block request completed.
    pub const EVENT_BLK: u64 = 1 << 1;
    /// WAIT event: the deadline passed.
    pub const EVENT_TIMER: u64 = 1 << 2;
    /// WAIT event: console input arrived.
    pub const EVENT_CONSOLE_RX: u64 = 1 << 3;
}

/// The virtio-mmio devices in slots 1..=3 of the MMIO window.
pub mod virtio {
    use super::{MMIO_BASE, MMIO_SLOT_SIZE};

    /// Number of virtio-mmio slots (net, blk, console).
    pub const SLOTS: usize = 3;
    /// Base of the virtio-net device (slot 1).
    pub const NET_BASE: u64 = MMIO_BASE + MMIO_SLOT_SIZE;
    /// Base of the virtio-blk device (slot 2).
    pub const BLK_BASE: u64 = MMIO_BASE + 2 * MMIO_SLOT_SIZE;
    /// Base of the virtio-console device (slot 3).
    pub const CONSOLE_BASE: u64 = MMIO_BASE + 3 * MMIO_SLOT_SIZE;
}

// The slots fit the window.
const _: () = assert!((virtio::SLOTS as u64 + 1) * MMIO_SLOT_SIZE <= MMIO_SIZE);
