//! Loading a static x86-64 ELF executable (`ET_EXEC`, linked at 0x10000) into guest memory.
//!
//! ```text
//! ELF64 header (64 bytes, little-endian)       program header (56 bytes each)
//! 0x00 e_ident  "\x7fELF", class 2, data 1     0x00 p_type   (1 = PT_LOAD)
//! 0x10 e_type   2 = EXEC (3 = DYN/PIE: no)     0x08 p_offset
//! 0x12 e_machine 62 = x86-64                   0x10 p_vaddr  (identity-mapped: = guest phys)
//! 0x18 e_entry                                 0x20 p_filesz
//! 0x20 e_phoff                                 0x28 p_memsz  (memsz - filesz zeroed)
//! 0x36 e_phentsize  0x38 e_phnum
//! ```

use vm_memory::{Bytes, GuestAddress};

use crate::memory::{GuestMem, Layout, IMAGE_BASE};

const EHDR_SIZE: usize = 64;
const PHDR_SIZE: usize = 56;
const ET_EXEC: u16 = 2;
const ET_DYN: u16 = 3;
const EM_X86_64: u16 = 62;
const PT_LOAD: u32 = 1;
const MAX_PHNUM: u16 = 64;

/// Why an ELF image was rejected.
#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    /// Shorter than what its headers describe.
    #[error("truncated ELF: needs {needed} bytes, file has {len}")]
    Truncated {
        /// Bytes needed.
        needed: u64,
        /// Bytes present.
        len: usize,
    },
    /// Does not start with `\x7fELF`.
    #[error("not an ELF file (bad magic)")]
    NotElf,
    /// Not ELF64 little-endian.
    #[error("not a 64-bit little-endian ELF")]
    NotElf64Le,
    /// A position-independent executable or shared object.
    #[error(
        "ELF is ET_DYN (PIE or shared object); guests must be static ET_EXEC linked at 0x10000"
    )]
    Pie,
    /// Neither EXEC nor DYN.
    #[error("ELF type {0} is not ET_EXEC")]
    NotExec(u16),
    /// Not x86-64.
    #[error("ELF machine {0} is not x86-64 (62)")]
    WrongMachine(u16),
    /// Bad program header table.
    #[error("bad program header table: {0}")]
    BadPhdrs(&'static str),
    /// No PT_LOAD segment.
    #[error("ELF has no PT_LOAD segment")]
    NoSegments,
    /// A segment with filesz > memsz.
    #[error("segment at {vaddr:#x}: filesz {filesz:#x} > memsz {memsz:#x}")]
    BadSegment {
        /// Segment address.
        vaddr: u64,
        /// Bytes in the file.
        filesz: u64,
        /// Bytes in memory.
        memsz: u64,
    },
    /// A segment outside `[0x10000, stack_bottom)`.
    #[error(
        "segment {start:#x}..{end:#x} is outside guest RAM available to images \
         ({min:#x}..{max:#x}); give the VM more memory or link at 0x10000"
    )]
    OutOfRange {
        /// Segment start.
        start: u64,
        /// Segment end.
        end: u64,
        /// Lowest allowed address.
        min: u64,
        /// Highest allowed end (the stack bottom).
        max: u64,
    },
    /// The entry point is not inside a loaded segment.
    #[error("entry point {0:#x} is not inside a loaded segment")]
    BadEntry(u64),
    /// Writing into guest memory failed.
    #[error("cannot write segment into guest memory at {addr:#x}")]
    Memory {
        /// The address.
        addr: u64,
        /// The cause.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// What the loader placed in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadedImage {
    /// Entry point (RIP at start).
    pub entry: u64,
    /// First free byte after the segments, 4 KiB aligned.
    pub image_end: u64,
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}
fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}
fn u64_at(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

#[derive(Debug, Clone, Copy)]
struct Segment {
    offset: u64,
    vaddr: u64,
    filesz: u64,
    memsz: u64,
}

/// Checks the headers of `elf` against `layout` and returns its segments and entry point.
fn parse(elf: &[u8], layout: &Layout) -> Result<(Vec<Segment>, u64), LoaderError> {
    if elf.len() < 4 || &elf[..4] != b"\x7fELF" {
        return Err(LoaderError::NotElf);
    }
    if elf.len() < EHDR_SIZE {
        return Err(LoaderError::Truncated {
            needed: EHDR_SIZE as u64,
            len: elf.len(),
        });
    }
    if elf[4] != 2 || elf[5] != 1 {
        return Err(LoaderError::NotElf64Le);
    }
    match u16_at(elf, 0x10) {
        ET_EXEC => {}
        ET_DYN => return Err(LoaderError::Pie),
        t => return Err(LoaderError::NotExec(t)),
    }
    let machine = u16_at(elf, 0x12);
    if machine != EM_X86_64 {
        return Err(LoaderError::WrongMachine(machine));
    }
    let entry = u64_at(elf, 0x18);
    let phoff = u64_at(elf, 0x20);
    let phentsize = u16_at(elf, 0x36);
    let phnum = u16_at(elf, 0x38);
    if usize::from(phentsize) != PHDR_SIZE {
        return Err(LoaderError::BadPhdrs("e_phentsize is not 56"));
    }
    if phnum == 0 || phnum > MAX_PHNUM {
        return Err(LoaderError::BadPhdrs("e_phnum is 0 or above 64"));
    }
    let table_end = phoff
        .checked_add(u64::from(phnum) * PHDR_SIZE as u64)
        .ok_or(LoaderError::BadPhdrs("table offset overflows"))?;
    if table_end > elf.len() as u64 {
        return Err(LoaderError::Truncated {
            needed: table_end,
            len: elf.len(),
        });
    }
    let mut segments = Vec::new();
    for i in 0..usize::from(phnum) {
        let ph = &elf[phoff as usize + i * PHDR_SIZE..][..PHDR_SIZE];
        if u32_at(ph, 0) != PT_LOAD {
            continue;
        }
        let seg = Segment {
            offset: u64_at(ph, 0x08),
            vaddr: u64_at(ph, 0x10),
            filesz: u64_at(ph, 0x20),
            memsz: u64_at(ph, 0x28),
        };
        if seg.memsz == 0 {
            continue;
        }
        if seg.filesz > seg.memsz {
            return Err(LoaderError::BadSegment {
                vaddr: seg.vaddr,
                filesz: seg.filesz,
                memsz: seg.memsz,
            });
        }
        let file_end = seg
            .offset
            .checked_add(seg.filesz)
            .ok_or(LoaderError::BadPhdrs("segment offset overflows"))?;
        if file_end > elf.len() as u64 {
            return Err(LoaderError::Truncated {
                needed: file_end,
                len: elf.len(),
            });
        }
        let end = seg.vaddr.saturating_add(seg.memsz);
        if seg.vaddr < IMAGE_BASE || end > layout.stack_bottom {
            return Err(LoaderError::OutOfRange {
                start: seg.vaddr,
                end,
                min: IMAGE_BASE,
                max: layout.stack_bottom,
            });
        }
        segments.push(seg);
    }
    if segments.is_empty() {
        return Err(LoaderError::NoSegments);
    }
    if !segments
        .iter()
        .any(|s| entry >= s.vaddr && entry < s.vaddr + s.memsz)
    {
        return Err(LoaderError::BadEntry(entry));
    }
    Ok((segments, entry))
}

/// Loads `elf` into `mem`: copies each PT_LOAD segment's file bytes to its address and zeroes
/// the rest of its memory size.
///
/// # Errors
/// A [`LoaderError`] naming what is wrong with the file; nothing is written then.
pub fn load_elf(mem: &GuestMem, layout: &Layout, elf: &[u8]) -> Result<LoadedImage, LoaderError> {
    let (segments, entry) = parse(elf, layout)?;
    let mut image_end = IMAGE_BASE;
    for s in &segments {
        let data = &elf[s.offset as usize..(s.offset + s.filesz) as usize];
        mem.write_slice(data, GuestAddress(s.vaddr))
            .map_err(|source| LoaderError::Memory {
                addr: s.vaddr,
                source,
            })?;
        let zeros = vec![0u8; (s.memsz - s.filesz) as usize];
        let bss = s.vaddr + s.filesz;
        mem.write_slice(&zeros, GuestAddress(bss))
            .map_err(|source| LoaderError::Memory { addr: bss, source })?;
        image_end = image_end.max(s.vaddr + s.memsz);
    }
    let image_end = (image_end + 0xfff) & !0xfff;
    Ok(LoadedImage { entry, image_end })
}

/// Builds a minimal valid ELF image around `code` (one RWX PT_LOAD at 0x10000, entry at its
/// start). Used by tests and benchmarks to run hand-assembled programs.
pub fn flat_elf(code: &[u8]) -> Vec<u8> {
    let mut e = vec![0u8; EHDR_SIZE + PHDR_SIZE];
    e[..4].copy_from_slice(b"\x7fELF");
    e[4] = 2;
    e[5] = 1;
    e[6] = 1;
    e[0x10..0x12].copy_from_slice(&ET_EXEC.to_le_bytes());
    e[0x12..0x14].copy_from_slice(&EM_X86_64.to_le_bytes());
    e[0x14..0x18].copy_from_slice(&1u32.to_le_bytes());
    let code_off = 0x1000u64;
    e[0x18..0x20].copy_from_slice(&IMAGE_BASE.to_le_bytes());
    e[0x20..0x28].copy_from_slice(&(EHDR_SIZE as u64).to_le_bytes());
    e[0x34..0x36].copy_from_slice(&(EHDR_SIZE as u16).to_le_bytes());
    e[0x36..0x38].copy_from_slice(&(PHDR_SIZE as u16).to_le_bytes());
    e[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
    let ph = EHDR_SIZE;
    e[ph..ph + 4].copy_from_slice(&PT_LOAD.to_le_bytes());
    e[ph + 4..ph + 8].copy_from_slice(&7u32.to_le_bytes());
    e[ph + 8..ph + 0x10].copy_from_slice(&code_off.to_le_bytes());
    e[ph + 0x10..ph + 0x18].copy_from_slice(&IMAGE_BASE.to_le_bytes());
    e[ph + 0x18..ph + 0x20].copy_from_slice(&IMAGE_BASE.to_le_bytes());
    let len = code.len() as u64;
    e[ph + 0x20..ph + 0x28].copy_from_slice(&len.to_le_bytes());
    e[ph + 0x28..ph + 0x30].copy_from_slice(&(len + 0x1000).to_le_bytes());
    e[ph + 0x30..ph + 0x38].copy_from_slice(&0x1000u64.to_le_bytes());
    e.resize(code_off as usize, 0);
    e.extend_from_slice(code);
    e
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::allocate;

    fn setup() -> (GuestMem, Layout) {
        let layout = Layout::new(4 << 20).unwrap();
        (allocate(layout.mem_size).unwrap(), layout)
    }

    #[test]
    fn loads_flat_elf_and_zeroes_bss() {
        let (mem, layout) = setup();
        mem.write_slice(&[0xAA; 16], GuestAddress(IMAGE_BASE + 4))
            .unwrap();
        let img = load_elf(&mem, &layout, &flat_elf(&[0x90, 0x90, 0xf4])).unwrap();
        assert_eq!(img.entry, IMAGE_BASE);
        assert_eq!(img.image_end, IMAGE_BASE + 0x2000);
        let mut b = [0u8; 8];
        mem.read_slice(&mut b, GuestAddress(IMAGE_BASE)).unwrap();
        assert_eq!(b, [0x90, 0x90, 0xf4, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn rejects_bad_images() {
        let (mem, layout) = setup();
        let good = flat_elf(&[0xf4]);
        assert!(matches!(
            load_elf(&mem, &layout, b"#!/bin/sh\n"),
            Err(LoaderError::NotElf)
        ));
        assert!(matches!(
            load_elf(&mem, &layout, &good[..40]),
            Err(LoaderError::Truncated { .. })
        ));
        assert!(matches!(
            load_elf(&mem, &layout, &good[..0x1000]),
            Err(LoaderError::Truncated { .. })
        ));
        let mut pie = good.clone();
        pie[0x10] = 3;
        assert!(matches!(
            load_elf(&mem, &layout, &pie),
            Err(LoaderError::Pie)
        ));
        let mut arm = good.clone();
        arm[0x12] = 183;
        assert!(matches!(
            load_elf(&mem, &layout, &arm),
            Err(LoaderError::WrongMachine(183))
        ));
        let mut low = good.clone();
        low[EHDR_SIZE + 0x10..EHDR_SIZE + 0x18].copy_from_slice(&0x1000u64.to_le_bytes());
        assert!(matches!(
            load_elf(&mem, &layout, &low),
            Err(LoaderError::OutOfRange { .. })
        ));
        let mut big = good.clone();
        big[EHDR_SIZE + 0x28..EHDR_SIZE + 0x30].copy_from_slice(&(64u64 << 20).to_le_bytes());
        assert!(matches!(
            load_elf(&mem, &layout, &big),
            Err(LoaderError::OutOfRange { .. })
        ));
        let mut entry = good;
        entry[0x18..0x20].copy_from_slice(&0x50_0000u64.to_le_bytes());
        assert!(matches!(
            load_elf(&mem, &layout, &entry),
            Err(LoaderError::BadEntry(_))
        ));
    }
}
