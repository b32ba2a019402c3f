//! The `ftvm` command-line tool's library: the primary/backup processes ([`pair`]; a backup
//! that joins a running primary: [`joiner`]), the
//! one-command failover demo ([`demo`]) and the pieces the fault tests share with it
//! ([`scenario`]: a pair of `ftvm` processes in a network namespace; [`client`]: the built-in
//! Redis-protocol client and the acknowledged-writes checker; [`soak`]: the demo's load for
//! minutes, watching both processes' memory).

#![deny(missing_docs)]

use std::path::PathBuf;

use anyhow::{bail, Context};

pub mod cli;
pub mod client;
pub mod config;
pub mod demo;
pub mod exit;
pub mod join;
pub mod joiner;
pub mod lifecycle;
pub mod metrics;
pub mod pair;
pub mod pairing;
pub mod scenario;
pub mod soak;
pub mod stat;
pub mod transport;

/// Parses a size with an optional K/M/G suffix (`64M`, `2g`, `4096`).
///
/// # Errors
/// A message for a malformed or overflowing size.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, 'k' | 'K')) => (&s[..i], 1u64 << 10),
        Some((i, 'm' | 'M')) => (&s[..i], 1 << 20),
        Some((i, 'g' | 'G')) => (&s[..i], 1 << 30),
        _ => (s, 1),
    };
    let n: u64 = num.parse().map_err(|e| format!("bad size {s:?}: {e}"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} overflows"))
}

/// The ELF of an embedded guest (`cpu`, `kv`, `stream`, `nondet`) or of a file.
///
/// # Errors
/// No such embedded guest and no such file, or the file cannot be read.
pub fn load_guest(name: &str) -> anyhow::Result<Vec<u8>> {
    if let Some(elf) = ftvm_vmm_core::guests::by_name(name) {
        return Ok(elf.to_vec());
    }
    let path = PathBuf::from(name);
    if !path.exists() && !name.contains('/') {
        bail!(
            "no embedded guest named {name:?} (embedded: {}) and no such file",
            ftvm_vmm_core::guests::NAMES.join(", ")
        );
    }
    std::fs::read(&path).with_context(|| format!("cannot read guest ELF {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("64M").unwrap(), 64 << 20);
        assert_eq!(parse_size("2g").unwrap(), 2 << 30);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("x").is_err());
    }
}
