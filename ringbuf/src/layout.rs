//! The memory layout of a log buffer, as data.
//!
//! ```text
//!  region offset
//!  0x000 ┌──────────────────────────────────────────────────────────────┐
//!        │ descriptor: magic u64 | version u32 | descriptor_len u32     │  written once by `init`
//!        │             capacity u64 | max_payload u64 | checksum u64    │
//!  0x080 ├──────────────────────────────────────────────────────────────┤
//!        │ tail (producer position, u64, never wraps)  | producer pid   │  own cache lines
//!        │ next_seq (u64)                                               │  (CachePadded spacing)
//!  0x100 ├──────────────────────────────────────────────────────────────┤
//!        │ head (consumer position, u64, never wraps)  | consumer pid   │
//!  0x180 ├──────────────────────────────────────────────────────────────┤
//!        │ data: `capacity` bytes (a power of two), records back to back │
//!        └──────────────────────────────────────────────────────────────┘
//!
//!  record (8-byte aligned, so a gap at the end always fits a padding header)
//!  0        3      4                8
//!  ┌────────┬──────┬────────────────┬─────────────── ─ ─
//!  │ len    │ kind │ seq (low 32)   │ payload (len bytes)
//!  │ u24    │ u8   │ u32            │
//!  └────────┴──────┴────────────────┴─────────────── ─ ─
//! ```
//!
//! The header is one little-endian u64: `len | kind << 24 | (seq as u32) << 32`. It holds the
//! low 32 bits of the sequence number; a reader rebuilds the whole number from the `next_seq`
//! it loads together with `tail` ([`seq_from_low`]): every record it can see lies fewer than
//! `capacity / RECORD_ALIGN` ≤ 2^29 records before that bound, so the low bits name exactly one
//! candidate. An 8-byte header instead of a 16-byte one makes a 64-byte record take 72 bytes of
//! buffer instead of 80 (`ringbuf/DESIGN.md`, "Why an 8-byte header").
//!
//! Positions are byte counts since the buffer was created; `position & (capacity - 1)` is the
//! offset in the data area. A record never straddles the end of the data area: when it would,
//! the producer writes a *padding record* (`kind == KIND_PADDING`) that fills the rest of the
//! area and puts the record at offset 0. Records become visible to the consumer only through the
//! release store of `tail` at commit, so a record whose producer died before committing is never
//! seen. All integers are little-endian (native on x86-64).

/// Magic number at offset 0: `b"FTVMLOG1"` read as a little-endian u64.
pub const MAGIC: u64 = u64::from_le_bytes(*b"FTVMLOG1");
/// Layout version; bump when anything in this file changes. (2: the 8-byte record header.)
pub const VERSION: u32 = 2;

/// Offset of the magic number.
pub const MAGIC_OFFSET: usize = 0;
/// Offset of the layout version (u32).
pub const VERSION_OFFSET: usize = 8;
/// Offset of the descriptor length (u32): `DATA_OFFSET`, so that a reader can check it.
pub const DESCRIPTOR_LEN_OFFSET: usize = 12;
/// Offset of the data capacity in bytes (u64, a power of two).
pub const CAPACITY_OFFSET: usize = 16;
/// Offset of the largest payload accepted (u64).
pub const MAX_PAYLOAD_OFFSET: usize = 24;
/// Offset of the descriptor checksum (u64): a hash of the four fields above.
pub const CHECKSUM_OFFSET: usize = 32;

/// Offset of the producer's position (AtomicU64).
pub const TAIL_OFFSET: usize = 0x80;
/// Offset of the pid of the process holding the producer role (AtomicU64, 0 = none).
pub const PRODUCER_PID_OFFSET: usize = 0x88;
/// Offset of the next sequence number to assign (AtomicU64, written by the producer only).
pub const NEXT_SEQ_OFFSET: usize = 0x90;
/// Offset of the consumer's position (AtomicU64).
pub const HEAD_OFFSET: usize = 0x100;
/// Offset of the pid of the process holding the consumer role (AtomicU64, 0 = none).
pub const CONSUMER_PID_OFFSET: usize = 0x108;
/// Offset of the data area; also the descriptor length.
pub const DATA_OFFSET: usize = 0x180;

/// Length of a record header.
pub const RECORD_HEADER_LEN: usize = 8;
/// Record alignment in the data area.
pub const RECORD_ALIGN: usize = 8;
/// Offset of the payload length (u24) in a record header.
pub const REC_LEN_OFFSET: usize = 0;
/// Offset of the record kind (u8) in a record header.
pub const REC_KIND_OFFSET: usize = 3;
/// Offset of the low 32 bits of the sequence number (u32) in a record header.
pub const REC_SEQ_OFFSET: usize = 4;
/// The kind of a padding record; user kinds must be below it (0..=254).
pub const KIND_PADDING: u16 = 0xFF;
/// The largest payload length the header's 24-bit field holds.
pub const MAX_RECORD_LEN: usize = (1 << 24) - 1;

/// The record header as one little-endian u64 (see the diagram above).
#[inline(always)]
pub const fn header_word(len: u32, kind: u16, seq: u64) -> u64 {
    (len as u64) | ((kind as u64) << 24) | ((seq as u32 as u64) << 32)
}

/// Splits a header word into (payload length, kind, low 32 bits of the sequence number).
#[inline(always)]
pub const fn split_header(word: u64) -> (usize, u16, u32) {
    (
        (word & 0xFF_FFFF) as usize,
        ((word >> 24) & 0xFF) as u16,
        (word >> 32) as u32,
    )
}

/// The sequence number below `bound` whose low 32 bits are `low`: the largest `s < bound` with
/// `s as u32 == low`. Exact for every record a reader can see when `bound` is the `next_seq`
/// published with (or after) the tail it read, because fewer than 2^32 records lie between any
/// of them and `bound` (at most `capacity / RECORD_ALIGN`, and [`MAX_CAPACITY`] keeps that
/// below 2^29).
#[inline(always)]
pub const fn seq_from_low(low: u32, bound: u64) -> u64 {
    let top = bound.wrapping_sub(1);
    top.wrapping_sub((top as u32).wrapping_sub(low) as u64)
}

/// Smallest data capacity accepted.
pub const MIN_CAPACITY: usize = 64;
/// Largest data capacity accepted (4 GiB): keeps the records a reader can see within the
/// 32-bit window of [`seq_from_low`].
pub const MAX_CAPACITY: usize = 1 << 32;

/// Whether a data area of `capacity` bytes is one a buffer can have: a power of two from
/// [`MIN_CAPACITY`] to [`MAX_CAPACITY`].
pub const fn valid_capacity(capacity: usize) -> bool {
    capacity.is_power_of_two() && capacity >= MIN_CAPACITY && capacity <= MAX_CAPACITY
}

/// Bytes a record with `len` payload bytes occupies in the data area.
#[inline]
pub const fn record_span(len: usize) -> usize {
    align_up(RECORD_HEADER_LEN + len, RECORD_ALIGN)
}

/// Rounds `v` up to a multiple of `a` (a power of two).
#[inline]
pub const fn align_up(v: usize, a: usize) -> usize {
    (v + a - 1) & !(a - 1)
}

/// Total region size needed for a data capacity.
pub const fn region_len(capacity: usize) -> usize {
    DATA_OFFSET + capacity
}

/// The largest payload a buffer of `capacity` accepts: any record up to half the data area
/// always fits once the buffer drains, wherever the wrap point lies; and the length must fit
/// the header's 24 bits (16 MiB − 1).
pub const fn max_payload(capacity: usize) -> usize {
    let half = capacity / 2 - RECORD_HEADER_LEN;
    if half < MAX_RECORD_LEN {
        half
    } else {
        MAX_RECORD_LEN
    }
}

/// Checksum of the descriptor fields (FNV-1a over their bytes); detects a torn or scribbled header.
pub fn descriptor_checksum(
    magic: u64,
    version: u32,
    descriptor_len: u32,
    capacity: u64,
    max: u64,
) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |bytes: &[u8]| {
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    };
    feed(&magic.to_le_bytes());
    feed(&version.to_le_bytes());
    feed(&descriptor_len.to_le_bytes());
    feed(&capacity.to_le_bytes());
    feed(&max.to_le_bytes());
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_words_round_trip() {
        for (len, kind, seq) in [
            (0u32, 0u16, 1u64),
            (64, 3, 0x1234_5678_9abc),
            (MAX_RECORD_LEN as u32, KIND_PADDING, u64::MAX),
        ] {
            let (l, k, s) = split_header(header_word(len, kind, seq));
            assert_eq!((l, k, s), (len as usize, kind, seq as u32));
        }
        // Little-endian bytes as the diagram says: len, kind, seq.
        let b = header_word(0x030201, 0x04, 0x0807_0605).to_le_bytes();
        assert_eq!(b, [1, 2, 3, 4, 5, 6, 7, 8]);
    }

    #[test]
    fn sequence_numbers_are_rebuilt_below_the_bound() {
        let window = (MAX_CAPACITY / RECORD_ALIGN) as u64;
        for bound in [1u64, 2, 1 << 32, (1 << 32) + 1, 7 << 40, u64::MAX] {
            for back in [1u64, 2, 1000, window] {
                let Some(seq) = bound.checked_sub(back) else {
                    continue;
                };
                assert_eq!(
                    seq_from_low(seq as u32, bound),
                    seq,
                    "bound {bound} back {back}"
                );
            }
        }
        // The window is well inside the 32 bits the header keeps.
        const { assert!(MAX_CAPACITY / RECORD_ALIGN < 1 << 32) };
    }
}
