//! Digests for pairing and divergence detection.
//!
//! - [`pairing_digest`]: what the primary and the backup exchange in the channel handshake
//!   (guest image, command line, memory size, disk contents); the channel refuses to pair two
//!   ends whose digests differ, so a backup never replays a log against a different initial
//!   state.
//! - [`register_digest`]: a digest of the vCPU's architectural registers, logged at every
//!   checkpoint and compared by the backup at the same exit index.
//!
//! The hash is FNV-1a (64-bit; four differently seeded lanes for the 32-byte pairing digest):
//! these digests detect accidents (a different image, a replay that went astray), they are not
//! a defence against an adversary.

use std::io::Read;
use std::path::Path;

use crate::vm::Vm;

const FNV_PRIME: u64 = 0x100_0000_01b3;
const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// A streaming FNV-1a hasher with four seeded lanes.
#[derive(Debug, Clone)]
pub struct Fnv4 {
    lanes: [u64; 4],
}

impl Default for Fnv4 {
    fn default() -> Self {
        Fnv4 {
            lanes: [0, 1, 2, 3].map(|i: u64| FNV_OFFSET ^ i.wrapping_mul(0x9e37_79b9_7f4a_7c15)),
        }
    }
}

impl Fnv4 {
    /// Hashes `bytes`.
    pub fn update(&mut self, bytes: &[u8]) {
        for b in bytes {
            for (i, h) in self.lanes.iter_mut().enumerate() {
                *h ^= u64::from(*b).wrapping_add(i as u64);
                *h = h.wrapping_mul(FNV_PRIME);
            }
        }
    }
    /// Hashes a length-prefixed field (so that field boundaries count).
    pub fn field(&mut self, bytes: &[u8]) {
        self.update(&(bytes.len() as u64).to_le_bytes());
        self.update(bytes);
    }
    /// The 32-byte digest.
    pub fn finish(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        for (i, h) in self.lanes.iter().enumerate() {
            out[i * 8..i * 8 + 8].copy_from_slice(&h.to_le_bytes());
        }
        out
    }
    /// The first lane (a 64-bit digest).
    pub fn finish64(&self) -> u64 {
        self.lanes[0]
    }
}

/// The digest both ends exchange in the handshake: guest image, command line, memory size and,
/// if any, the disk image's contents.
///
/// # Errors
/// The I/O error reading the disk image.
pub fn pairing_digest(
    elf: &[u8],
    cmdline: &str,
    mem_size: u64,
    disk: Option<&Path>,
) -> std::io::Result<[u8; 32]> {
    let mut h = Fnv4::default();
    h.field(b"ftvm-pair-v1");
    h.field(elf);
    h.field(cmdline.as_bytes());
    h.field(&mem_size.to_le_bytes());
    if let Some(p) = disk {
        let mut f = std::fs::File::open(p)?;
        let mut buf = vec![0u8; 1 << 16];
        let mut total = 0u64;
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            total += n as u64;
        }
        h.field(&total.to_le_bytes());
    }
    Ok(h.finish())
}

/// A digest of the vCPU registers (general-purpose registers, RIP, RFLAGS, control registers,
/// EFER, CS/SS selectors).
pub fn register_digest(vm: &Vm) -> u64 {
    let mut h = Fnv4::default();
    h.update(vm.dump_registers().as_bytes());
    h.finish64()
}

/// A 64-bit digest of a file's contents (disk images at the end of a run).
///
/// # Errors
/// The I/O error reading it.
pub fn file_digest(path: &Path) -> std::io::Result<u64> {
    let mut h = Fnv4::default();
    h.update(&std::fs::read(path)?);
    Ok(h.finish64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairing_digest_covers_every_input() {
        let d = pairing_digest(b"elf", "a=1", 1 << 20, None).unwrap();
        assert_eq!(d, pairing_digest(b"elf", "a=1", 1 << 20, None).unwrap());
        assert_ne!(d, pairing_digest(b"elg", "a=1", 1 << 20, None).unwrap());
        assert_ne!(d, pairing_digest(b"elf", "a=2", 1 << 20, None).unwrap());
        assert_ne!(d, pairing_digest(b"elf", "a=1", 2 << 20, None).unwrap());
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("d.img");
        std::fs::write(&disk, [0u8; 512]).unwrap();
        let with = pairing_digest(b"elf", "a=1", 1 << 20, Some(&disk)).unwrap();
        assert_ne!(d, with);
        std::fs::write(&disk, [1u8; 512]).unwrap();
        assert_ne!(
            with,
            pairing_digest(b"elf", "a=1", 1 << 20, Some(&disk)).unwrap()
        );
    }
}
