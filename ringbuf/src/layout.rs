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
//!  record (16-byte aligned, so a gap at the end always fits a padding header)
//!  0      4        6        8                16
//!  ┌──────┬────────┬────────┬────────────────┬─────────────── ─ ─
//!  │ len  │ kind   │ flags  │ seq            │ payload (len bytes)
//!  │ u32  │ u16    │ u16    │ u64            │
//!  └──────┴────────┴────────┴────────────────┴─────────────── ─ ─
//! ```
//!
//! Positions are byte counts since the buffer was created; `position & (capacity - 1)` is the
//! offset in the data area. A record never straddles the end of the data area: when it would,
//! the producer writes a *padding record* (`kind == KIND_PADDING`) that fills the rest of the
//! area and puts the record at offset 0. Records become visible to the consumer only through the
//! release store of `tail` at commit, so a record whose producer died before committing is never
//! seen. All integers are little-endian (native on x86-64).

/// Magic number at offset 0: `b"FTVMLOG1"` read as a little-endian u64.
pub const MAGIC: u64 = u64::from_le_bytes(*b"FTVMLOG1");
/// Layout version; bump when anything in this file changes.
pub const VERSION: u32 = 1;

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
pub const RECORD_HEADER_LEN: usize = 16;
/// Record alignment in the data area.
pub const RECORD_ALIGN: usize = 16;
/// Offset of the payload length (u32) in a record header.
pub const REC_LEN_OFFSET: usize = 0;
/// Offset of the record kind (u16) in a record header.
pub const REC_KIND_OFFSET: usize = 4;
/// Offset of the record flags (u16) in a record header.
pub const REC_FLAGS_OFFSET: usize = 6;
/// Offset of the sequence number (u64) in a record header.
pub const REC_SEQ_OFFSET: usize = 8;
/// The kind of a padding record; user kinds must be below it.
pub const KIND_PADDING: u16 = 0xFFFF;

/// Smallest data capacity accepted.
pub const MIN_CAPACITY: usize = 64;

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
/// always fits once the buffer drains, wherever the wrap point lies.
pub const fn max_payload(capacity: usize) -> usize {
    capacity / 2 - RECORD_HEADER_LEN
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
