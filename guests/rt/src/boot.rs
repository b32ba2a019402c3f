//! The boot info page the VMM writes at `0x8000` (DEVICES.md "Boot info").
//!
//! ```text
//! offset  field (u64, little-endian)
//! 0x00    magic "FTVMBOOT"
//! 0x08    ABI version (1)
//! 0x10    mem_size
//! 0x18    image_end      first free byte after the loaded segments, 4 KiB aligned
//! 0x20    stack_top
//! 0x28    mmio_base      0xD000_0000
//! 0x30    cmdline_len    <= 4000
//! 0x38    cmdline bytes  UTF-8
//! ```

use core::fmt;

use crate::cmdline::Cmdline;

// The field offsets and values are the guest ABI's (`ftvm-abi`, shared with the VMM).
use ftvm_abi::boot as abi;

/// Offset of the magic.
pub const OFF_MAGIC: usize = abi::MAGIC as usize;
/// Offset of the ABI version.
pub const OFF_VERSION: usize = abi::VERSION as usize;
/// Offset of the guest memory size.
pub const OFF_MEM_SIZE: usize = abi::MEM_SIZE as usize;
/// Offset of the end of the loaded image.
pub const OFF_IMAGE_END: usize = abi::IMAGE_END as usize;
/// Offset of the initial stack top.
pub const OFF_STACK_TOP: usize = abi::STACK_TOP as usize;
/// Offset of the MMIO window base.
pub const OFF_MMIO_BASE: usize = abi::MMIO_BASE as usize;
/// Offset of the command-line length.
pub const OFF_CMDLINE_LEN: usize = abi::CMDLINE_LEN as usize;
/// Offset of the command-line bytes.
pub const OFF_CMDLINE: usize = abi::CMDLINE as usize;
/// The largest command line the ABI allows.
pub const CMDLINE_MAX: usize = abi::MAX_CMDLINE as usize;
/// The boot info magic.
pub const MAGIC: u64 = abi::BOOT_MAGIC;
/// The ABI version these guests are written against.
pub const ABI_VERSION: u64 = abi::ABI_VERSION;
/// The stack the VMM provides: `[stack_top - STACK_SIZE + 4 KiB, stack_top)`; the heap ends below.
pub const STACK_SIZE: u64 = ftvm_abi::STACK_AREA;
/// The size of the boot info page.
pub const BOOT_INFO_SIZE: usize = 0x1000;

/// The boot info, validated.
#[derive(Debug, Clone, Copy)]
pub struct BootInfo {
    /// Guest memory size in bytes.
    pub mem_size: u64,
    /// First free byte after the loaded image.
    pub image_end: u64,
    /// Initial stack top.
    pub stack_top: u64,
    /// Base of the MMIO window.
    pub mmio_base: u64,
    /// The command line.
    pub cmdline: Cmdline<'static>,
}

/// Why a boot info page was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootInfoError {
    /// The page is shorter than its fields.
    Truncated,
    /// The magic is not `"FTVMBOOT"`.
    BadMagic(u64),
    /// The ABI version is not [`ABI_VERSION`].
    BadVersion(u64),
    /// `cmdline_len` exceeds [`CMDLINE_MAX`].
    CmdlineTooLong(u64),
    /// The command line is not UTF-8.
    CmdlineNotUtf8,
    /// `image_end`, `stack_top` and `mem_size` are not in increasing order.
    BadLayout,
}

impl fmt::Display for BootInfoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Truncated => write!(f, "boot info truncated"),
            Self::BadMagic(m) => write!(f, "bad magic {m:#018x}"),
            Self::BadVersion(v) => write!(f, "unsupported ABI version {v}"),
            Self::CmdlineTooLong(n) => write!(f, "command line of {n} bytes (max {CMDLINE_MAX})"),
            Self::CmdlineNotUtf8 => write!(f, "command line is not UTF-8"),
            Self::BadLayout => write!(f, "image_end <= stack_top <= mem_size does not hold"),
        }
    }
}

fn field(page: &[u8], off: usize) -> Result<u64, BootInfoError> {
    let bytes = page.get(off..off + 8).ok_or(BootInfoError::Truncated)?;
    let mut le = [0u8; 8];
    le.copy_from_slice(bytes);
    Ok(u64::from_le_bytes(le))
}

impl BootInfo {
    /// Parses and validates a boot info page.
    ///
    /// # Errors
    /// A [`BootInfoError`] saying which field is wrong.
    pub fn parse(page: &'static [u8]) -> Result<Self, BootInfoError> {
        let magic = field(page, OFF_MAGIC)?;
        if magic != MAGIC {
            return Err(BootInfoError::BadMagic(magic));
        }
        let version = field(page, OFF_VERSION)?;
        if version != ABI_VERSION {
            return Err(BootInfoError::BadVersion(version));
        }
        let mem_size = field(page, OFF_MEM_SIZE)?;
        let image_end = field(page, OFF_IMAGE_END)?;
        let stack_top = field(page, OFF_STACK_TOP)?;
        let mmio_base = field(page, OFF_MMIO_BASE)?;
        if !(image_end <= stack_top && stack_top <= mem_size) {
            return Err(BootInfoError::BadLayout);
        }
        let len = field(page, OFF_CMDLINE_LEN)?;
        if len > CMDLINE_MAX as u64 {
            return Err(BootInfoError::CmdlineTooLong(len));
        }
        let bytes = page
            .get(OFF_CMDLINE..OFF_CMDLINE + len as usize)
            .ok_or(BootInfoError::Truncated)?;
        let text = core::str::from_utf8(bytes).map_err(|_| BootInfoError::CmdlineNotUtf8)?;
        Ok(Self {
            mem_size,
            image_end,
            stack_top,
            mmio_base,
            cmdline: Cmdline::new(text),
        })
    }

    /// Reads the boot info page at `addr`.
    ///
    /// # Safety
    /// `addr` must point to [`BOOT_INFO_SIZE`] readable bytes that are never written again.
    ///
    /// # Errors
    /// As [`BootInfo::parse`].
    pub unsafe fn from_addr(addr: usize) -> Result<Self, BootInfoError> {
        // SAFETY: guaranteed by the caller.
        let page = unsafe { core::slice::from_raw_parts(addr as *const u8, BOOT_INFO_SIZE) };
        Self::parse(page)
    }

    /// The free memory for the heap: `[image_end, stack_top - STACK_SIZE)`, 4 KiB aligned
    /// (empty if the stack reaches down to the image).
    pub fn free_memory(&self) -> (usize, usize) {
        let start = self.image_end.next_multiple_of(0x1000);
        let end = self.stack_top.saturating_sub(STACK_SIZE) & !0xfff;
        (start as usize, end.max(start) as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(fields: [u64; 7], cmdline: &[u8]) -> &'static [u8] {
        let mut page = vec![0u8; BOOT_INFO_SIZE];
        for (i, v) in fields.iter().enumerate() {
            page[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
        }
        page[OFF_CMDLINE..OFF_CMDLINE + cmdline.len()].copy_from_slice(cmdline);
        Box::leak(page.into_boxed_slice())
    }

    const MIB: u64 = 1 << 20;

    #[test]
    fn parses_a_valid_page() {
        let cmd = b"ip=10.0.2.15/24 port=6379";
        let p = page(
            [
                MAGIC,
                1,
                64 * MIB,
                0x20000,
                64 * MIB - 4096,
                0xD000_0000,
                cmd.len() as u64,
            ],
            cmd,
        );
        let b = BootInfo::parse(p).expect("valid");
        assert_eq!(b.mem_size, 64 * MIB);
        assert_eq!(b.mmio_base, 0xD000_0000);
        assert_eq!(b.cmdline.get("port"), Some("6379"));
        assert_eq!(
            b.free_memory(),
            (0x20000, (63 * MIB - 4096) as usize & !0xfff)
        );
    }

    #[test]
    fn rejects_bad_fields() {
        let p = page([0, 1, 64 * MIB, 0x20000, 64 * MIB, 0, 0], b"");
        assert_eq!(BootInfo::parse(p).unwrap_err(), BootInfoError::BadMagic(0));
        let p = page([MAGIC, 2, 64 * MIB, 0x20000, 64 * MIB, 0, 0], b"");
        assert_eq!(
            BootInfo::parse(p).unwrap_err(),
            BootInfoError::BadVersion(2)
        );
        let p = page([MAGIC, 1, 64 * MIB, 0x20000, 64 * MIB, 0, 5000], b"");
        assert_eq!(
            BootInfo::parse(p).unwrap_err(),
            BootInfoError::CmdlineTooLong(5000)
        );
        let p = page([MAGIC, 1, 64 * MIB, 0x20000, 65 * MIB, 0, 0], b"");
        assert_eq!(BootInfo::parse(p).unwrap_err(), BootInfoError::BadLayout);
        let p = page([MAGIC, 1, 64 * MIB, 0x20000, 64 * MIB, 0, 2], &[0xff, 0xfe]);
        assert_eq!(
            BootInfo::parse(p).unwrap_err(),
            BootInfoError::CmdlineNotUtf8
        );
        assert_eq!(
            BootInfo::parse(&[0u8; 4]).unwrap_err(),
            BootInfoError::Truncated
        );
    }

    #[test]
    fn free_memory_is_empty_when_the_stack_reaches_the_image() {
        let p = page([MAGIC, 1, 2 * MIB, 0x20000, MIB, 0, 0], b"");
        let (start, end) = BootInfo::parse(p).expect("valid").free_memory();
        assert_eq!(start, end);
    }
}
