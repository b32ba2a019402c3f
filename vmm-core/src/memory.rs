//! Guest memory and the fixed boot layout of DEVICES.md: page tables, GDT, boot info.
//!
//! ```text
//! guest-physical (= guest-virtual, identity-mapped with 2 MiB pages, P|RW|U)
//! 0x0000_0000  null page (mapped, unused)
//! 0x0000_1000  PML4            PML4[0] -> PDPT
//! 0x0000_2000  PDPT            PDPT[0..4] -> PD0..PD3
//! 0x0000_3000  PD0..PD3        4 x 512 x 2 MiB = the whole 4 GiB (RAM and the MMIO window)
//! 0x0000_8000  boot info       (BOOT_* offsets below)
//! 0x0000_9000  GDT             null, code64 DPL3 (0x08), data DPL3 (0x10)
//! 0x0001_0000  guest image     PT_LOAD segments of the ELF
//! image_end    free            heap, DMA buffers
//! mem-1 MiB    stack           RSP at entry = stack_top - 8, stack_top = mem - 4 KiB
//! 0xD000_0000  MMIO window     no memory slot: every access exits
//! ```

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// The guest's memory: one anonymous mapping starting at guest-physical 0, with vm-memory's
/// dirty bitmap (one bit per 4 KiB page, set by every write the VMM makes through it:
/// [`crate::dirty`]).
pub type GuestMem = GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;

/// Address of the PML4 table.
pub const PML4_ADDR: u64 = 0x1000;
/// Address of the PDPT.
pub const PDPT_ADDR: u64 = 0x2000;
/// Address of the first of the four page directories.
pub const PD_ADDR: u64 = 0x3000;
// The layout the guests rely on is the ABI crate's (one definition for the VMM and guests/).
/// Boot info field offsets (all u64), the magic and the ABI version.
pub use ftvm_abi::boot;
pub use ftvm_abi::boot::{ABI_VERSION, BOOT_MAGIC};
pub use ftvm_abi::{BOOT_INFO_ADDR, IMAGE_BASE, MMIO_BASE, MMIO_SIZE, STACK_AREA, STACK_GUARD};
/// Largest command line.
pub const MAX_CMDLINE: usize = ftvm_abi::boot::MAX_CMDLINE as usize;
/// Address of the GDT.
pub const GDT_ADDR: u64 = 0x9000;
/// Largest RAM size: RAM must end below the MMIO window.
pub const MAX_MEM_SIZE: u64 = MMIO_BASE;

/// GDT selector of the 64-bit code segment (RPL 0; the VMM loads it with RPL 3).
pub const GDT_CODE: u16 = 0x08;
/// GDT selector of the data segment.
pub const GDT_DATA: u16 = 0x10;
/// GDT entries: null, code64 (P, DPL3, S, type 0xB, L, G), data (P, DPL3, S, type 0x3, D/B, G).
pub const GDT: [u64; 3] = [0, 0x00AF_FB00_0000_FFFF, 0x00CF_F300_0000_FFFF];

const PAGE_2M: u64 = 2 << 20;
const PTE_PRESENT_RW_USER: u64 = 0x7;
const PTE_HUGE: u64 = 0x80;

/// Errors of guest memory setup.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The size is not a multiple of 4 KiB, too small for the fixed layout, or too big.
    #[error("invalid guest memory size {size:#x}: {reason}")]
    BadSize {
        /// The requested size.
        size: u64,
        /// Why it is not valid.
        reason: &'static str,
    },
    /// mmap of the guest memory failed.
    #[error("cannot allocate {size:#x} bytes of guest memory")]
    Alloc {
        /// The requested size.
        size: u64,
        /// The cause.
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    /// A write into guest memory was out of range.
    #[error("guest memory access at {addr:#x} out of range")]
    Access {
        /// The guest address.
        addr: u64,
        /// The cause.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// Where things are in a VM of a given size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// RAM size in bytes.
    pub mem_size: u64,
    /// Lowest stack address.
    pub stack_bottom: u64,
    /// Top of the stack (RSP at entry is `stack_top - 8`).
    pub stack_top: u64,
}

impl Layout {
    /// The layout of a VM with `mem_size` bytes of RAM.
    ///
    /// # Errors
    /// [`MemoryError::BadSize`] if the size is not 4 KiB aligned, below 2 MiB or above 3.25 GiB.
    pub fn new(mem_size: u64) -> Result<Self, MemoryError> {
        let bad = |reason| {
            Err(MemoryError::BadSize {
                size: mem_size,
                reason,
            })
        };
        if mem_size % 0x1000 != 0 {
            return bad("not a multiple of 4 KiB");
        }
        if mem_size < IMAGE_BASE + STACK_AREA + 0x1000 {
            return bad("smaller than the fixed layout (image at 64 KiB + 1 MiB stack)");
        }
        if mem_size > MAX_MEM_SIZE {
            return bad("RAM must end below the MMIO window at 0xD000_0000");
        }
        Ok(Layout {
            mem_size,
            stack_bottom: mem_size - STACK_AREA,
            stack_top: mem_size - STACK_GUARD,
        })
    }
}

/// Allocates `size` bytes of zeroed guest memory at guest-physical 0.
///
/// # Errors
/// [`MemoryError::Alloc`] if the mapping fails.
pub fn allocate(size: u64) -> Result<GuestMem, MemoryError> {
    let len = usize::try_from(size).map_err(|_| MemoryError::BadSize {
        size,
        reason: "does not fit in usize",
    })?;
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), len)])
        .map_err(|source| MemoryError::Alloc { size, source })
}

fn write_u64(mem: &GuestMem, addr: u64, value: u64) -> Result<(), MemoryError> {
    mem.write_obj(value, GuestAddress(addr))
        .map_err(|source| MemoryError::Access { addr, source })
}

/// Writes the page tables, the GDT and the boot info.
///
/// # Errors
/// [`MemoryError::Access`] if the memory is smaller than the layout (cannot happen for a memory
/// of `layout.mem_size` bytes).
pub fn write_boot_structures(
    mem: &GuestMem,
    layout: &Layout,
    image_end: u64,
    cmdline: &[u8],
) -> Result<(), MemoryError> {
    write_u64(mem, PML4_ADDR, PDPT_ADDR | PTE_PRESENT_RW_USER)?;
    for pd in 0..4u64 {
        let pd_addr = PD_ADDR + pd * 0x1000;
        write_u64(mem, PDPT_ADDR + pd * 8, pd_addr | PTE_PRESENT_RW_USER)?;
        for i in 0..512u64 {
            let page = (pd * 512 + i) * PAGE_2M;
            write_u64(mem, pd_addr + i * 8, page | PTE_PRESENT_RW_USER | PTE_HUGE)?;
        }
    }
    for (i, entry) in GDT.iter().enumerate() {
        write_u64(mem, GDT_ADDR + 8 * i as u64, *entry)?;
    }
    let b = BOOT_INFO_ADDR;
    write_u64(mem, b + boot::MAGIC, BOOT_MAGIC)?;
    write_u64(mem, b + boot::VERSION, ABI_VERSION)?;
    write_u64(mem, b + boot::MEM_SIZE, layout.mem_size)?;
    write_u64(mem, b + boot::IMAGE_END, image_end)?;
    write_u64(mem, b + boot::STACK_TOP, layout.stack_top)?;
    write_u64(mem, b + boot::MMIO_BASE, MMIO_BASE)?;
    write_u64(mem, b + boot::CMDLINE_LEN, cmdline.len() as u64)?;
    mem.write_slice(cmdline, GuestAddress(b + boot::CMDLINE))
        .map_err(|source| MemoryError::Access {
            addr: b + boot::CMDLINE,
            source,
        })?;
    Ok(())
}

/// A 64-bit FNV-1a digest of all guest memory, for comparing two runs.
pub fn digest(mem: &GuestMem) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut buf = vec![0u8; 1 << 16];
    for region in mem.iter() {
        let len = vm_memory::GuestMemoryRegion::len(region);
        let start = vm_memory::GuestMemoryRegion::start_addr(region).0;
        let mut off = 0u64;
        while off < len {
            let n = (len - off).min(buf.len() as u64) as usize;
            if mem
                .read_slice(&mut buf[..n], GuestAddress(start + off))
                .is_err()
            {
                break;
            }
            for b in &buf[..n] {
                h ^= u64::from(*b);
                h = h.wrapping_mul(0x100_0000_01b3);
            }
            off += n as u64;
        }
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_rejects_bad_sizes() {
        assert!(Layout::new(0x1234).is_err());
        assert!(Layout::new(1 << 20).is_err());
        assert!(Layout::new(4 << 30).is_err());
        let l = Layout::new(16 << 20).unwrap();
        assert_eq!(l.stack_top, (16 << 20) - 0x1000);
        assert_eq!(l.stack_bottom, 15 << 20);
    }

    #[test]
    fn boot_structures_are_written() {
        let layout = Layout::new(4 << 20).unwrap();
        let mem = allocate(layout.mem_size).unwrap();
        write_boot_structures(&mem, &layout, 0x20000, b"port=1").unwrap();
        let magic: u64 = mem.read_obj(GuestAddress(BOOT_INFO_ADDR)).unwrap();
        assert_eq!(magic, BOOT_MAGIC);
        let pd_mmio: u64 = mem
            .read_obj(GuestAddress(PD_ADDR + 3 * 0x1000 + 8 * 128))
            .unwrap();
        assert_eq!(pd_mmio & !0xfff, MMIO_BASE);
        let mut cmd = [0u8; 6];
        mem.read_slice(&mut cmd, GuestAddress(BOOT_INFO_ADDR + boot::CMDLINE))
            .unwrap();
        assert_eq!(&cmd, b"port=1");
    }
}
