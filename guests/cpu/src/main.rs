//! `cpu`: a compute-bound, deterministic guest.
//!
//! Fills a memory region from a seed, hashes it `rounds` times (each round seeded by the
//! previous one and folding its result back into the region), prints
//! `cpu: checksum=<16 hex digits>` and powers off with exit code 0. It reads neither the clock nor
//! the entropy register unless `timing` is given, so a run and its replay print the same checksum.
//!
//! Command line (all optional): `size=<bytes, k/M/G suffix>` (default 4M), `rounds=<n>` (default
//! 64), `seed=<u64>` (default 1), `timing` (also print the elapsed time read from CLOCK_NS),
//! `quiet` (print nothing before the checksum: the guest then makes no VM exit at all from its
//! start until the checksum line — a guest without exits, which the failover tests use).
#![no_std]
#![no_main]

extern crate alloc;

use alloc::vec;

use ftvm_guest_rt::cmdline::parse_size;
use ftvm_guest_rt::{entry, println, sys, BootInfo};

entry!(main);

/// Exit code for a bad command line.
const EXIT_USAGE: u64 = 2;

fn main(boot: &BootInfo) -> u64 {
    let cmd = boot.cmdline;
    let size = match cmd.get("size").map(parse_size) {
        None => 4 << 20,
        Some(Some(s)) if s >= 32 => s,
        Some(_) => {
            println!("cpu: bad size= (want bytes >= 32, optional k/M/G suffix)");
            return EXIT_USAGE;
        }
    };
    let (rounds, seed) = match (cmd.parse_or("rounds", 64u64), cmd.parse_or("seed", 1u64)) {
        (Ok(r), Ok(s)) => (r, s),
        (Err(e), _) | (_, Err(e)) => {
            println!("cpu: {e}");
            return EXIT_USAGE;
        }
    };
    let timing = cmd.flag("timing");
    let quiet = cmd.flag("quiet");
    let words = (size / 8) as usize;
    if !quiet {
        println!("cpu: size={} rounds={rounds} seed={seed}", words * 8);
    }

    let start = if timing { sys::clock_ns() } else { 0 };
    let mut region = vec![0u64; words];
    let mut state = seed;
    for w in region.iter_mut() {
        *w = splitmix64(&mut state);
    }
    let mut checksum = seed;
    for round in 0..rounds {
        checksum = xxh64_words(&region, checksum);
        let i = (checksum as usize) % words;
        region[i] ^= checksum.rotate_left(round as u32 % 64);
    }
    if timing {
        let ns = sys::clock_ns().saturating_sub(start).max(1);
        let mib_s = (words as u64 * 8 * rounds) as f64 / (1 << 20) as f64 / (ns as f64 / 1e9);
        println!("cpu: elapsed_ns={ns} throughput={mib_s:.0} MiB/s");
    }
    println!("cpu: checksum={checksum:016x}");
    0
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

const P1: u64 = 0x9E37_79B1_85EB_CA87;
const P2: u64 = 0xC2B2_AE3D_27D4_EB4F;
const P3: u64 = 0x1656_67B1_9E37_79F9;
const P4: u64 = 0x85EB_CA77_C2B2_AE63;

fn lane(acc: u64, word: u64) -> u64 {
    acc.wrapping_add(word.wrapping_mul(P2))
        .rotate_left(31)
        .wrapping_mul(P1)
}

/// An xxHash64-style hash of whole words (four independent lanes, then a merge and avalanche).
fn xxh64_words(data: &[u64], seed: u64) -> u64 {
    let mut acc = [
        seed.wrapping_add(P1).wrapping_add(P2),
        seed.wrapping_add(P2),
        seed,
        seed.wrapping_sub(P1),
    ];
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        acc[0] = lane(acc[0], c[0]);
        acc[1] = lane(acc[1], c[1]);
        acc[2] = lane(acc[2], c[2]);
        acc[3] = lane(acc[3], c[3]);
    }
    let mut h = acc[0]
        .rotate_left(1)
        .wrapping_add(acc[1].rotate_left(7))
        .wrapping_add(acc[2].rotate_left(12))
        .wrapping_add(acc[3].rotate_left(18));
    for a in acc {
        h = (h ^ lane(0, a)).wrapping_mul(P1).wrapping_add(P4);
    }
    h = h.wrapping_add((data.len() as u64).wrapping_mul(8));
    for &w in chunks.remainder() {
        h = (h ^ lane(0, w))
            .rotate_left(27)
            .wrapping_mul(P1)
            .wrapping_add(P4);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(P2);
    h ^= h >> 29;
    h = h.wrapping_mul(P3);
    h ^ (h >> 32)
}
