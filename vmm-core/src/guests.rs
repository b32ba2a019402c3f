//! The guest programs of `guests/`, embedded in the VMM at build time.
//!
//! `build.rs` builds the guest workspace (`guests/`, see `guests/README.md`) and checks each
//! image: a static x86-64 `ET_EXEC` ELF linked at `0x10000`, written against the ABI of
//! `DEVICES.md`. Boot one with the `cmdline` its README documents.

/// `cpu`: deterministic compute-bound guest; prints `cpu: checksum=<hex>` and powers off with 0.
/// Command line: `size=4M rounds=64 seed=1 timing`.
pub const CPU: &[u8] = include_bytes!(env!("GUEST_CPU_ELF"));

/// `kv`: Redis-protocol key-value server over virtio-net, persisted on virtio-blk.
/// Command line: `ip=10.0.2.15/24 gw=10.0.2.1 port=6379`.
pub const KV: &[u8] = include_bytes!(env!("GUEST_KV_ELF"));

/// `stream`: TCP sink (port 5001) and source (port 5002) for throughput tests.
/// Command line: `ip=10.0.2.15/24 gw=10.0.2.1`.
pub const STREAM: &[u8] = include_bytes!(env!("GUEST_STREAM_ELF"));

/// `nondet`: a test guest that executes RDRAND or RDTSC once (an input nobody logs) and prints
/// the value every period: what output-verified replay and `--check-determinism` must catch.
/// Command line: `insn=rdrand|rdtsc period_ms=100 count=0`.
pub const NONDET: &[u8] = include_bytes!(env!("GUEST_NONDET_ELF"));

/// The names of the embedded guests, as accepted by [`by_name`].
pub const NAMES: [&str; 4] = ["cpu", "kv", "stream", "nondet"];

/// The embedded ELF image of a guest by name (`kv`, `cpu`, `stream`, `nondet`), if it was built.
pub fn by_name(name: &str) -> Option<&'static [u8]> {
    match name {
        "cpu" => Some(CPU),
        "kv" => Some(KV),
        "stream" => Some(STREAM),
        "nondet" => Some(NONDET),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u16_at(elf: &[u8], off: usize) -> u16 {
        u16::from_le_bytes([elf[off], elf[off + 1]])
    }

    fn u64_at(elf: &[u8], off: usize) -> u64 {
        let mut le = [0u8; 8];
        le.copy_from_slice(&elf[off..off + 8]);
        u64::from_le_bytes(le)
    }

    #[test]
    fn every_guest_is_a_static_exec_image_entered_at_0x10000() {
        for name in NAMES {
            let elf = by_name(name).unwrap_or_else(|| panic!("{name} not embedded"));
            assert_eq!(&elf[..4], b"\x7fELF", "{name}: ELF magic");
            assert_eq!(u16_at(elf, 16), 2, "{name}: ET_EXEC");
            assert_eq!(u16_at(elf, 18), 0x3e, "{name}: x86-64");
            assert_eq!(u64_at(elf, 24), 0x10000, "{name}: entry point");
        }
        assert!(by_name("nope").is_none());
    }
}
