//! The single-producer single-consumer ring of variable-length records.
//!
//! Protocol (see `layout.rs` for the bytes):
//! - The producer is the only writer of `tail` and `next_seq`; the consumer the only writer of
//!   `head`. Both are positions that never wrap (u64 byte counts).
//! - `claim` reserves space after `tail` (checking against a cached copy of `head`, re-read with
//!   Acquire only when the cache says the buffer is full; a claim that wraps writes the padding
//!   record then); the caller fills the payload in place; `commit` writes the header with plain
//!   stores and then publishes everything with one Release store of `tail`. A claim that is
//!   dropped, or whose process dies, publishes nothing. `commit_deferred` writes the header but
//!   leaves the Release store to a later `publish` (or commit, or a claim that finds the buffer
//!   full).
//! - The consumer reads `tail` with Acquire (unless its cached copy already reaches the end of
//!   the data area), walks the records up to it, and gives space back with one Release store of
//!   `head`. The producer's Acquire load of `head` orders the consumer's reads before the
//!   producer's next writes.
//!
//! Publication is by `tail` rather than by each record's header (as Aeron does) because there is
//! only ever one claim in flight (the [`Claim`] borrows the producer mutably): a record is visible
//! exactly when everything before it is, so the consumer never has to zero consumed memory.

use std::fmt;
use std::ptr::NonNull;
use std::sync::Arc;

use crossbeam_utils::CachePadded;

use crate::error::{ClaimError, CorruptRecord, RingError};
use crate::idle::IdleStrategy;
use crate::layout::*;
use crate::region::{HeapRegion, Region};
use crate::sync::{AtomicU64, Ordering};

// The shared indices sit on their own cache lines, at least as far apart as `CachePadded` keeps
// values in process memory.
const _: () = assert!(HEAD_OFFSET - TAIL_OFFSET >= std::mem::align_of::<CachePadded<u64>>());
const _: () = assert!(DATA_OFFSET - HEAD_OFFSET >= std::mem::align_of::<CachePadded<u64>>());

/// The first sequence number a fresh buffer assigns; 0 means "none" in acknowledgements.
pub const FIRST_SEQ: u64 = 1;

/// A log buffer in a memory region: the descriptor has been checked or written.
pub struct Ring {
    region: Box<dyn Region>,
    /// `region.base()`, cached (the region never moves its memory). Under loom the indices
    /// live in `ctl` instead, so only the non-loom accessors read it.
    #[cfg_attr(loom, allow(dead_code))]
    base: NonNull<u8>,
    data: NonNull<u8>,
    capacity: usize,
    mask: usize,
    max_payload: usize,
    #[cfg(loom)]
    ctl: LoomControl,
    /// Under loom, one tracked cell per `RECORD_ALIGN` bytes of the data area: the producer
    /// "writes" the cells of every byte it claims and the consumer "reads" those of every byte
    /// it is handed, so loom reports a data race if the index protocol fails to order them.
    #[cfg(loom)]
    cells: Box<[loom::cell::UnsafeCell<()>]>,
}

#[cfg(loom)]
struct LoomControl {
    tail: AtomicU64,
    head: AtomicU64,
    next_seq: AtomicU64,
    producer_pid: AtomicU64,
    consumer_pid: AtomicU64,
}

// SAFETY: all shared mutable state is reached through atomics or through the SPSC protocol
// above, which gives each byte of the data area a single writer at a time.
unsafe impl Send for Ring {}
// SAFETY: as above.
unsafe impl Sync for Ring {}

impl fmt::Debug for Ring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ring")
            .field("capacity", &self.capacity)
            .field("max_payload", &self.max_payload)
            .field("head", &self.head().load(Ordering::Relaxed))
            .field("tail", &self.tail().load(Ordering::Relaxed))
            .finish()
    }
}

impl Ring {
    /// Formats `region` as an empty log buffer with `capacity` data bytes.
    ///
    /// # Errors
    /// [`RingError::BadCapacity`] if `capacity` is not a power of two ≥ 64 or the region is too
    /// small for it.
    pub fn init(region: impl Region + 'static, capacity: usize) -> Result<Arc<Self>, RingError> {
        let region_len = region.len();
        if !valid_capacity(capacity) || region_len < region_len_for(capacity) {
            return Err(RingError::BadCapacity {
                capacity,
                region_len,
            });
        }
        let ring = Self::from_parts(Box::new(region), capacity);
        let max = max_payload(capacity) as u64;
        ring.write_u64(MAGIC_OFFSET, MAGIC);
        ring.write_u32(VERSION_OFFSET, VERSION);
        ring.write_u32(DESCRIPTOR_LEN_OFFSET, DATA_OFFSET as u32);
        ring.write_u64(CAPACITY_OFFSET, capacity as u64);
        ring.write_u64(MAX_PAYLOAD_OFFSET, max);
        ring.write_u64(
            CHECKSUM_OFFSET,
            descriptor_checksum(MAGIC, VERSION, DATA_OFFSET as u32, capacity as u64, max),
        );
        ring.tail().store(0, Ordering::Relaxed);
        ring.head().store(0, Ordering::Relaxed);
        ring.next_seq().store(FIRST_SEQ, Ordering::Relaxed);
        ring.producer_pid().store(0, Ordering::Relaxed);
        ring.consumer_pid().store(0, Ordering::Release);
        Ok(Arc::new(ring))
    }

    /// Attaches to a region that another process (or an earlier `init`) formatted.
    ///
    /// # Errors
    /// [`RingError::BadMagic`], [`RingError::BadVersion`] or [`RingError::Corrupt`] when the
    /// descriptor does not describe a valid buffer that fits the region.
    pub fn attach(region: impl Region + 'static) -> Result<Arc<Self>, RingError> {
        let region_len = region.len();
        if region_len < DATA_OFFSET + MIN_CAPACITY {
            return Err(RingError::Corrupt {
                what: format!("region of {region_len} bytes is smaller than any log buffer"),
            });
        }
        let probe = Self::from_parts(Box::new(region), MIN_CAPACITY);
        let magic = probe.read_u64(MAGIC_OFFSET);
        if magic != MAGIC {
            return Err(RingError::BadMagic { found: magic });
        }
        let version = probe.read_u32(VERSION_OFFSET);
        if version != VERSION {
            return Err(RingError::BadVersion {
                found: version,
                expected: VERSION,
            });
        }
        let dlen = probe.read_u32(DESCRIPTOR_LEN_OFFSET);
        let cap = probe.read_u64(CAPACITY_OFFSET);
        let max = probe.read_u64(MAX_PAYLOAD_OFFSET);
        let sum = probe.read_u64(CHECKSUM_OFFSET);
        if sum != descriptor_checksum(magic, version, dlen, cap, max) {
            return Err(RingError::Corrupt {
                what: "descriptor checksum mismatch".into(),
            });
        }
        let capacity = usize::try_from(cap).unwrap_or(usize::MAX);
        if dlen as usize != DATA_OFFSET
            || !valid_capacity(capacity)
            || region_len < region_len_for(capacity)
            || max != max_payload(capacity) as u64
        {
            return Err(RingError::Corrupt {
                what: format!(
                    "descriptor says capacity {cap}, max payload {max}, descriptor length {dlen}, \
                     region is {region_len} bytes"
                ),
            });
        }
        let ring = Self::from_parts(probe.region, capacity);
        let head = ring.head().load(Ordering::Acquire);
        let tail = ring.tail().load(Ordering::Acquire);
        let align = RECORD_ALIGN as u64;
        if head > tail || tail - head > cap || head % align != 0 || tail % align != 0 {
            return Err(RingError::Corrupt {
                what: format!(
                    "head {head} / tail {tail} (need head <= tail <= head + {cap}, both multiples \
                     of {align})"
                ),
            });
        }
        Ok(Arc::new(ring))
    }

    fn from_parts(region: Box<dyn Region>, capacity: usize) -> Self {
        // SAFETY: callers checked region.len() >= DATA_OFFSET + capacity, so the offset is in
        // bounds of the allocation.
        let data = unsafe { NonNull::new_unchecked(region.base().as_ptr().add(DATA_OFFSET)) };
        Self {
            base: region.base(),
            region,
            data,
            capacity,
            mask: capacity - 1,
            max_payload: max_payload(capacity),
            #[cfg(loom)]
            ctl: LoomControl {
                tail: AtomicU64::new(0),
                head: AtomicU64::new(0),
                next_seq: AtomicU64::new(FIRST_SEQ),
                producer_pid: AtomicU64::new(0),
                consumer_pid: AtomicU64::new(0),
            },
            #[cfg(loom)]
            cells: (0..capacity / RECORD_ALIGN)
                .map(|_| loom::cell::UnsafeCell::new(()))
                .collect(),
        }
    }

    /// Loom only: records a producer write of data bytes `[off, off + len)`.
    #[inline(always)]
    fn track_write(&self, off: usize, len: usize) {
        #[cfg(loom)]
        for cell in &self.cells[off / RECORD_ALIGN..(off + len).div_ceil(RECORD_ALIGN)] {
            cell.with_mut(|_| ());
        }
        #[cfg(not(loom))]
        let _ = (off, len);
    }

    /// Loom only: records a consumer read of data bytes `[off, off + len)`.
    #[inline(always)]
    fn track_read(&self, off: usize, len: usize) {
        #[cfg(loom)]
        for cell in &self.cells[off / RECORD_ALIGN..(off + len).div_ceil(RECORD_ALIGN)] {
            cell.with(|_| ());
        }
        #[cfg(not(loom))]
        let _ = (off, len);
    }

    /// Data capacity in bytes.
    #[inline]
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Largest payload a record may have.
    #[inline]
    pub fn max_payload(&self) -> usize {
        self.max_payload
    }

    /// Producer position (bytes ever committed, padding included).
    pub fn tail_position(&self) -> u64 {
        self.tail().load(Ordering::Acquire)
    }

    /// Consumer position (bytes ever released).
    pub fn head_position(&self) -> u64 {
        self.head().load(Ordering::Acquire)
    }

    /// Bytes committed and not yet released.
    pub fn used(&self) -> usize {
        let head = self.head_position();
        let tail = self.tail_position();
        tail.saturating_sub(head) as usize
    }

    #[cfg(not(loom))]
    #[inline]
    fn atomic(&self, offset: usize) -> &AtomicU64 {
        debug_assert!(offset % 8 == 0 && offset + 8 <= DATA_OFFSET);
        // SAFETY: offset is 8-aligned inside the descriptor area of a 128-aligned region that
        // lives as long as self; AtomicU64 has the layout of u64 and every access to these words
        // (from any process) is atomic.
        unsafe { &*self.base.as_ptr().add(offset).cast::<AtomicU64>() }
    }

    #[cfg(not(loom))]
    #[inline]
    fn tail(&self) -> &AtomicU64 {
        self.atomic(TAIL_OFFSET)
    }
    #[cfg(not(loom))]
    #[inline]
    fn head(&self) -> &AtomicU64 {
        self.atomic(HEAD_OFFSET)
    }
    #[cfg(not(loom))]
    #[inline]
    fn next_seq(&self) -> &AtomicU64 {
        self.atomic(NEXT_SEQ_OFFSET)
    }
    #[cfg(not(loom))]
    fn producer_pid(&self) -> &AtomicU64 {
        self.atomic(PRODUCER_PID_OFFSET)
    }
    #[cfg(not(loom))]
    fn consumer_pid(&self) -> &AtomicU64 {
        self.atomic(CONSUMER_PID_OFFSET)
    }

    #[cfg(loom)]
    #[inline]
    fn tail(&self) -> &AtomicU64 {
        &self.ctl.tail
    }
    #[cfg(loom)]
    #[inline]
    fn head(&self) -> &AtomicU64 {
        &self.ctl.head
    }
    #[cfg(loom)]
    #[inline]
    fn next_seq(&self) -> &AtomicU64 {
        &self.ctl.next_seq
    }
    #[cfg(loom)]
    fn producer_pid(&self) -> &AtomicU64 {
        &self.ctl.producer_pid
    }
    #[cfg(loom)]
    fn consumer_pid(&self) -> &AtomicU64 {
        &self.ctl.consumer_pid
    }

    fn read_u64(&self, offset: usize) -> u64 {
        // SAFETY: offset + 8 <= DATA_OFFSET <= region length; unaligned read of plain bytes.
        unsafe {
            self.region
                .base()
                .as_ptr()
                .add(offset)
                .cast::<u64>()
                .read_unaligned()
        }
    }
    fn read_u32(&self, offset: usize) -> u32 {
        // SAFETY: as read_u64.
        unsafe {
            self.region
                .base()
                .as_ptr()
                .add(offset)
                .cast::<u32>()
                .read_unaligned()
        }
    }
    fn write_u64(&self, offset: usize, v: u64) {
        // SAFETY: descriptor words are written only by `init`, before the ring is shared.
        unsafe {
            self.region
                .base()
                .as_ptr()
                .add(offset)
                .cast::<u64>()
                .write_unaligned(v)
        }
    }
    fn write_u32(&self, offset: usize, v: u32) {
        // SAFETY: as write_u64.
        unsafe {
            self.region
                .base()
                .as_ptr()
                .add(offset)
                .cast::<u32>()
                .write_unaligned(v)
        }
    }

    fn take_role(&self, slot: &AtomicU64, role: &'static str) -> Result<(), RingError> {
        let me = u64::from(std::process::id());
        let mut cur = slot.load(Ordering::Acquire);
        loop {
            if cur != 0 && process_alive(cur) {
                return Err(RingError::RoleTaken { role, pid: cur });
            }
            match slot.compare_exchange(cur, me, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Ok(()),
                Err(now) => cur = now,
            }
        }
    }

    /// Gives up the role in `slot` if this process holds it (a role taken over by another
    /// process after a crash stays with that process).
    fn release_role(slot: &AtomicU64) {
        let me = u64::from(std::process::id());
        let _ = slot.compare_exchange(me, 0, Ordering::AcqRel, Ordering::Relaxed);
    }
}

fn region_len_for(capacity: usize) -> usize {
    DATA_OFFSET.saturating_add(capacity)
}

/// Whether `pid` names a live process: `kill(pid, 0)` finds it (or lacks permission to signal
/// it) and it is not a zombie (killed but not yet reaped by its parent).
#[cfg(not(loom))]
fn process_alive(pid: u64) -> bool {
    let Ok(raw) = libc::pid_t::try_from(pid) else {
        return false;
    };
    if raw <= 0 {
        return false;
    }
    // SAFETY: kill with signal 0 only checks for existence and permission.
    let rc = unsafe { libc::kill(raw, 0) };
    if rc != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH) {
        return false;
    }
    // `/proc/<pid>/stat` is "pid (comm) S ...": the state follows the last ')'.
    match std::fs::read_to_string(format!("/proc/{raw}/stat")) {
        Ok(stat) => !matches!(
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.trim_start().chars().next()),
            Some('Z' | 'X')
        ),
        Err(_) => true,
    }
}

#[cfg(loom)]
fn process_alive(_pid: u64) -> bool {
    true
}

/// Creates a heap-backed buffer with `capacity` data bytes and returns its two ends.
///
/// # Errors
/// See [`Ring::init`].
pub fn with_capacity(capacity: usize) -> Result<(Producer, Consumer), RingError> {
    if !valid_capacity(capacity) {
        return Err(RingError::BadCapacity {
            capacity,
            region_len: region_len_for(capacity),
        });
    }
    let region = HeapRegion::new(region_len_for(capacity))?;
    let ring = Ring::init(region, capacity)?;
    Ok((Producer::new(ring.clone())?, Consumer::new(ring)?))
}

/// The writing end. One per buffer (enforced across processes with the pid in the descriptor).
pub struct Producer {
    ring: Arc<Ring>,
    /// The ring's geometry, copied so that the hot path does not go through the `Arc`.
    geo: Geometry,
    /// Position after the last committed record (published or not).
    tail: u64,
    /// The value of the shared `tail`: everything before it is visible to the consumer.
    published: u64,
    /// The consumer's position when last read plus the capacity: a claim ending at or before
    /// it fits without looking at the shared `head` (rtrb's cached-index trick).
    limit: u64,
    /// `min(limit, end of the lap of the data area the tail was in when this was computed)`:
    /// a claim ending at or before it needs neither a wrap nor a look at `head`, so the fast
    /// path is one compare. (Once the tail moves into the next lap, every claim ends past it
    /// and the slow path computes it again.)
    fast_limit: u64,
    next_seq: u64,
}

/// A ring's data area and sizes, as each end keeps them.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    data: NonNull<u8>,
    capacity: usize,
    mask: usize,
    max_payload: usize,
}

impl Geometry {
    fn of(ring: &Ring) -> Self {
        Self {
            data: ring.data,
            capacity: ring.capacity,
            mask: ring.mask,
            max_payload: ring.max_payload,
        }
    }

    /// Pointer to data offset `off` (callers keep `off + n <= capacity`).
    #[inline(always)]
    fn ptr(&self, off: usize) -> *mut u8 {
        debug_assert!(off <= self.capacity);
        // SAFETY: off <= capacity, inside the data area.
        unsafe { self.data.as_ptr().add(off) }
    }
}

// SAFETY: the geometry's pointer is into the data area owned by the `Arc<Ring>` each end holds
// (the ring is `Send + Sync`); each end touches only the bytes the protocol gives it. The ends
// stay `Send + Sync` as they were before they kept the pointer: every access to the data area
// goes through `&mut self` (or a `Claim`/`Batch` borrowing it mutably); `&self` methods read
// only the end's own fields and the ring's atomics.
unsafe impl Send for Producer {}
// SAFETY: as above.
unsafe impl Sync for Producer {}
// SAFETY: as above.
unsafe impl Send for Consumer {}
// SAFETY: as above.
unsafe impl Sync for Consumer {}

/// How far past a record the producer asks for cache lines in exclusive state (`prefetchw`),
/// when the consumer has released them (and the most it asks for per claim). The lines it is
/// about to write were last read by the consumer's core, so each store would otherwise wait for
/// that core to give the line up; asking early overlaps those transfers. (A read prefetch on
/// the consumer side made no measurable difference — the hardware prefetcher follows the
/// sequential walk — so there is none.)
const PREFETCH_AHEAD: usize = 1024;

/// The longest record span whose prefetch range (`RECORD_ALIGN`-aligned) touches at most two
/// lines: a range starting at most `64 - RECORD_ALIGN` bytes into a line ends in the next one.
const PREFETCH_SHORT: usize = 64 + RECORD_ALIGN;
const _: () = assert!(RECORD_ALIGN <= 64 && PREFETCH_AHEAD % 64 == 0);

/// How far past a record's end its prefetch range reaches (see `prefetch_span`): a
/// record ending at `end` may prefetch only when `end + prefetch_reach(span)` is within the
/// consumer's released space and the tail's lap (`fast_limit`).
#[inline(always)]
const fn prefetch_reach(span: usize) -> u64 {
    (PREFETCH_AHEAD
        + if span < PREFETCH_AHEAD {
            span
        } else {
            PREFETCH_AHEAD
        }) as u64
}

/// An `asm!` of `prefetchw` hints with the given template and operands, on x86-64 outside
/// loom (whose models have no caches); elsewhere nothing.
///
/// The blocks are `nomem` and take addresses as integers: a prefetch reads and writes no memory
/// as far as the program can tell. (With `readonly`, the compiler had to store the producer's
/// tail and sequence number to memory before every prefetch, two stores per record.)
/// `_mm_prefetch` with `_MM_HINT_ET0` would compile to a plain read prefetch unless the crate
/// were built with `prfchw`, hence the `asm!`.
macro_rules! prefetchw {
    ($($operands:tt)*) => {
        #[cfg(all(target_arch = "x86_64", not(loom)))]
        // SAFETY: `prefetchw` only hints the cache (CPUs without it run it as a NOP); it never
        // faults nor changes memory, whatever the address.
        unsafe {
            std::arch::asm!($($operands)*, options(nostack, preserves_flags, nomem));
        }
    };
}

/// Hints that the line at `p` will be written soon (`prefetchw`). Never faults.
#[inline(always)]
fn prefetch_write(p: *const u8) {
    prefetchw!("prefetchw [{p}]", p = in(reg) p.addr());
    let _ = p; // used only by the asm (x86-64, outside loom)
}

/// Asks for cache lines `PREFETCH_AHEAD` bytes past the end of the record at `rec` (`span`
/// bytes) in exclusive state: the record's own bytes shifted by `span + PREFETCH_AHEAD`, at
/// most `PREFETCH_AHEAD` of them, so that successive records of one size ask for every line
/// once. The caller (a claim's fast path, or a reservation's record) checked that the consumer
/// is done with those bytes and that they lie in the tail's lap of the data area. A range of at
/// most `PREFETCH_SHORT` bytes (8-byte aligned) lies in at most two lines, its first and its
/// last, so a short record costs two `prefetchw` addressed off the record's own pointer and no
/// loop.
#[inline(always)]
fn prefetch_span(rec: *const u8, span: usize) {
    if span <= PREFETCH_SHORT {
        prefetch_write_ahead(rec, span);
        prefetch_write_ahead(rec, 2 * span - 1);
    } else {
        let first = rec.wrapping_add(span + PREFETCH_AHEAD);
        let n = span.min(PREFETCH_AHEAD);
        let mut at = 0;
        while at + 256 <= n {
            prefetch_write_4(first.wrapping_add(at));
            at += 256;
        }
        while at < n {
            prefetch_write(first.wrapping_add(at));
            at += 64;
        }
    }
}

/// `prefetch_write` of the four lines from `p`: one address register for the four (a
/// `prefetch_write` each costs an `lea` each, which is 16 instructions of a 1 KiB record's).
#[inline(always)]
fn prefetch_write_4(p: *const u8) {
    prefetchw!(
        "prefetchw [{p}]",
        "prefetchw [{p} + 64]",
        "prefetchw [{p} + 128]",
        "prefetchw [{p} + 192]",
        p = in(reg) p.addr()
    );
    let _ = p; // used only by the asm (x86-64, outside loom)
}

/// `prefetch_write(p + at + PREFETCH_AHEAD)`, with the constant in the addressing mode.
#[inline(always)]
fn prefetch_write_ahead(p: *const u8, at: usize) {
    prefetchw!(
        "prefetchw [{p} + {at} + {ahead}]",
        p = in(reg) p.addr(),
        at = in(reg) at,
        ahead = const PREFETCH_AHEAD
    );
    let _ = (p, at); // used only by the asm (x86-64, outside loom)
}

impl fmt::Debug for Producer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Producer")
            .field("tail", &self.tail)
            .field("published", &self.published)
            .field("next_seq", &self.next_seq)
            .finish()
    }
}

/// Where a claimed record goes.
#[derive(Debug, Clone, Copy)]
struct Plan {
    /// Data offset of the record header.
    at: usize,
    /// Position of the record header: the tail, or (when the record wraps and a padding record
    /// fills the rest of the data area, already written by `plan_slow`) the start of the next
    /// lap.
    start: u64,
}

impl Producer {
    /// Takes the producer role of `ring`.
    ///
    /// # Errors
    /// [`RingError::RoleTaken`] if a live process (this one included) already holds it.
    pub fn new(ring: Arc<Ring>) -> Result<Self, RingError> {
        ring.take_role(ring.producer_pid(), "producer")?;
        let tail = ring.tail().load(Ordering::Acquire);
        let cached_head = ring.head().load(Ordering::Acquire);
        let next_seq = ring.next_seq().load(Ordering::Acquire);
        let limit = cached_head + ring.capacity as u64;
        Ok(Self {
            geo: Geometry::of(&ring),
            limit,
            fast_limit: fast_limit(limit, tail, ring.mask),
            ring,
            tail,
            published: tail,
            next_seq,
        })
    }

    /// The buffer.
    #[inline]
    pub fn ring(&self) -> &Arc<Ring> {
        &self.ring
    }

    /// Sequence number the next commit assigns.
    #[inline]
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Sets the sequence number of the next record (a receiver mirroring a remote log does this
    /// once so that local and remote numbers agree).
    ///
    /// # Errors
    /// [`RingError::NotEmpty`] unless every record committed so far has been released: a
    /// reader rebuilds sequence numbers from the next one (`layout.rs`), so the records in the
    /// buffer would change numbers.
    pub fn set_next_seq(&mut self, seq: u64) -> Result<(), RingError> {
        let head = self.ring.head().load(Ordering::Acquire);
        if head != self.tail {
            return Err(RingError::NotEmpty {
                unread: self.tail.saturating_sub(head),
            });
        }
        self.next_seq = seq;
        self.ring.next_seq().store(seq, Ordering::Release);
        Ok(())
    }

    /// Position after the last committed record (including records committed with
    /// [`Claim::commit_deferred`] and not yet published).
    #[inline]
    pub fn position(&self) -> u64 {
        self.tail
    }

    /// Position up to which records are visible to the consumer.
    #[inline]
    pub fn published_position(&self) -> u64 {
        self.published
    }

    /// Makes every record committed with [`Claim::commit_deferred`] visible to the consumer,
    /// with one Release store of `tail`. Cheap when there is nothing to publish.
    #[inline]
    pub fn publish(&mut self) {
        if self.published != self.tail {
            self.published = self.tail;
            publish_to(&self.ring, self.tail, self.next_seq);
        }
    }

    /// Free bytes, re-reading the consumer's position.
    pub fn free(&mut self) -> usize {
        let head = self.ring.head().load(Ordering::Acquire);
        debug_assert!(head <= self.tail, "head {head} beyond tail {}", self.tail);
        self.limit = head + self.geo.capacity as u64;
        self.fast_limit = fast_limit(self.limit, self.tail, self.geo.mask);
        (self.limit - self.tail) as usize
    }

    /// Where a record of `len` bytes goes. The common case — it fits before the end of the
    /// data area and the cached head says there is room — is a few instructions; wrapping,
    /// re-reading the head and errors are out of line, in functions that take values rather
    /// than `&mut self`, so that a caller's loop can keep the producer's indices in registers.
    #[inline(always)]
    fn plan(&mut self, kind: u16, len: usize) -> Result<Plan, ClaimError> {
        if kind >= KIND_PADDING || len > self.geo.max_payload {
            return Err(refusal(kind, len, self.geo.max_payload));
        }
        self.plan_span::<true>(record_span(len))
    }

    /// [`Self::plan`] for `span` bytes (a multiple of `RECORD_ALIGN`, at most half the data
    /// area); `PREFETCH`: ask for the lines after them (a single record; a reservation's
    /// records ask for their own).
    #[inline(always)]
    fn plan_span<const PREFETCH: bool>(&mut self, span: usize) -> Result<Plan, ClaimError> {
        let end = self.tail + span as u64;
        // The fast path also needs room for the prefetch range after the record (see
        // `prefetch_span`), so it is one compare; a record that fits but is too close to the
        // limit or the end of the lap for the prefetch takes the out-of-line path (and no
        // prefetch).
        if end + prefetch_reach(span) <= self.fast_limit {
            let off = (self.tail as usize) & self.geo.mask;
            self.ring.track_write(off, span);
            if PREFETCH {
                prefetch_span(self.geo.ptr(off), span);
            }
            return Ok(Plan {
                at: off,
                start: self.tail,
            });
        }
        let slow = plan_slow(&self.ring, self.tail, self.limit, span);
        self.limit = slow.limit;
        self.fast_limit = fast_limit(slow.limit, self.tail, self.geo.mask);
        if slow.full {
            // Deferred records must become visible, or the consumer could never free the
            // space this claim waits for.
            self.publish();
            return Err(ClaimError::Full {
                needed: slow.pad + span,
                available: (slow.limit - self.tail) as usize,
            });
        }
        Ok(Plan {
            at: slow.at,
            start: self.tail + slow.pad as u64,
        })
    }

    /// Claims space for a record of `len` payload bytes of `kind`, to be filled in place.
    ///
    /// # Errors
    /// [`ClaimError::Full`] when the consumer has not released enough space (nothing blocks);
    /// [`ClaimError::TooLarge`] when the record can never fit; [`ClaimError::ReservedKind`].
    #[inline]
    pub fn claim(&mut self, kind: u16, len: usize) -> Result<Claim<'_>, ClaimError> {
        let plan = self.plan(kind, len)?;
        Ok(Claim {
            producer: self,
            plan,
            kind,
            len,
        })
    }

    /// Reserves `bytes` of contiguous space (rounded up to `RECORD_ALIGN`) for several records,
    /// written with [`Reservation::claim`] or [`Reservation::push`] and committed together with
    /// one check of the consumer's position for all of them (a single claim checks per
    /// record). `bytes` counts record spans, header and alignment included
    /// ([`crate::layout::record_span`]). The reservation is all or nothing: its records become
    /// committed only at [`Reservation::commit`] (or `commit_deferred`); dropping it commits
    /// none. Space left unused at commit stays free.
    ///
    /// # Errors
    /// [`ClaimError::Full`] when the consumer has not released enough space;
    /// [`ClaimError::TooLarge`] when `bytes` exceeds the largest record span (half the data
    /// area, see [`Ring::max_payload`]): such a reservation might never fit.
    #[inline]
    pub fn reserve(&mut self, bytes: usize) -> Result<Reservation<'_>, ClaimError> {
        let max = self.geo.max_payload + RECORD_HEADER_LEN;
        if bytes > max {
            return Err(ClaimError::TooLarge { len: bytes, max });
        }
        let bytes = align_up(bytes, RECORD_ALIGN);
        let plan = self.plan_span::<false>(bytes)?;
        // Data offsets from here on: the reserved space is contiguous, so position = base + offset.
        let base = plan.start - plan.at as u64;
        let end = plan.at + bytes;
        // A record gets the single claim's prefetch when its prefetch range ends at or below
        // `prefetch_end`: released by the consumer, in this lap. When that holds for any
        // record the reservation can hold (the range reaches at most `prefetch_reach(bytes)`
        // past its end), `prefetch_all` says so once, and a loop of claims tests a flag that
        // does not change instead of comparing offsets per record.
        let prefetch_end = self
            .fast_limit
            .saturating_sub(base)
            .min(self.geo.capacity as u64) as usize;
        let prefetch_all = end as u64 + prefetch_reach(bytes) <= prefetch_end as u64;
        let seq = self.next_seq;
        Ok(Reservation {
            data: self.geo.data,
            producer: self,
            at: plan.at,
            end,
            prefetch_all,
            prefetch_end,
            base,
            seq,
        })
    }

    /// Like [`Self::claim`], but waits for space with `idle` instead of returning `Full`.
    ///
    /// # Errors
    /// [`ClaimError::TooLarge`] or [`ClaimError::ReservedKind`]; never `Full`.
    pub fn claim_blocking(
        &mut self,
        kind: u16,
        len: usize,
        idle: &mut dyn IdleStrategy,
    ) -> Result<Claim<'_>, ClaimError> {
        idle.reset();
        let plan = loop {
            match self.plan(kind, len) {
                Ok(plan) => break plan,
                Err(ClaimError::Full { .. }) => idle.idle(0),
                Err(e) => return Err(e),
            }
        };
        Ok(Claim {
            producer: self,
            plan,
            kind,
            len,
        })
    }

    /// Copies `payload` into a new record and commits it; returns its sequence number.
    ///
    /// # Errors
    /// As [`Self::claim`].
    #[inline]
    pub fn push(&mut self, kind: u16, payload: &[u8]) -> Result<u64, ClaimError> {
        let mut claim = self.claim(kind, payload.len())?;
        claim.copy_from_slice(payload);
        Ok(claim.commit())
    }
}

/// The error for a claim that can never succeed.
#[cold]
#[inline]
fn refusal(kind: u16, len: usize, max: usize) -> ClaimError {
    if kind >= KIND_PADDING {
        ClaimError::ReservedKind(kind)
    } else {
        ClaimError::TooLarge { len, max }
    }
}

/// Stores `next_seq` and then, with Release, `tail`: everything before `tail` becomes visible.
///
/// Out of line (it runs once per batch): with the atomic stores inlined in a caller's loop of
/// claims, LLVM treats them as clobbering all memory and keeps the producer's tail and sequence
/// number in memory, storing and reloading them for every record.
#[inline(never)]
extern "C" fn publish_to(ring: &Ring, tail: u64, next_seq: u64) {
    ring.next_seq().store(next_seq, Ordering::Relaxed);
    ring.tail().store(tail, Ordering::Release);
}

/// `min(limit, end of the lap of the data area that position `tail` is in)`.
#[inline]
fn fast_limit(limit: u64, tail: u64, mask: usize) -> u64 {
    limit.min((tail | mask as u64) + 1)
}

/// What [`plan_slow`] found.
#[repr(C)]
struct SlowPlan {
    /// Where the record goes (meaningless when `full`).
    at: usize,
    /// Padding before it.
    pad: usize,
    /// The new limit (the consumer's position plus the capacity).
    limit: u64,
    /// The record does not fit.
    full: bool,
}

/// `Producer::plan` when the record wraps or the cached head says the buffer may be full.
///
/// Out of line and `extern "C"`: a caller in another crate then knows that the call cannot
/// unwind (a panic would abort) and is handed values, not the producer, so a loop of claims
/// keeps the producer's tail and sequence number in registers instead of reloading them from
/// memory for every claim. (Inlined, its Acquire load of `head` made LLVM reload them.)
#[cold]
#[inline(never)]
extern "C" fn plan_slow(ring: &Ring, tail: u64, limit: u64, span: usize) -> SlowPlan {
    let off = (tail as usize) & ring.mask;
    let to_end = ring.capacity - off;
    let (at, pad) = if span <= to_end {
        (off, 0)
    } else {
        (0, to_end)
    };
    let advance = (pad + span) as u64;
    let mut limit = limit;
    if tail + advance > limit {
        let head = ring.head().load(Ordering::Acquire);
        debug_assert!(head <= tail, "head {head} beyond tail {tail}");
        limit = head + ring.capacity as u64;
        if tail + advance > limit {
            return SlowPlan {
                at,
                pad,
                limit,
                full: true,
            };
        }
    }
    if pad != 0 {
        ring.track_write(off, pad);
        // The padding record fills the rest of the lap; writing it now (the space is ours) keeps
        // the commit path free of a branch. If the claim is dropped, the tail does not move
        // and the bytes are never read.
        write_header(
            ring.data.as_ptr().wrapping_add(off),
            (pad - RECORD_HEADER_LEN) as u32,
            KIND_PADDING,
            0,
        );
    }
    ring.track_write(at, span);
    SlowPlan {
        at,
        pad,
        limit,
        full: false,
    }
}

impl Drop for Producer {
    fn drop(&mut self) {
        self.publish();
        Ring::release_role(self.ring.producer_pid());
    }
}

/// Space claimed for one record; fill it through `DerefMut<Target = [u8]>`, then [`Claim::commit`].
/// Dropping it without committing publishes nothing.
pub struct Claim<'a> {
    producer: &'a mut Producer,
    plan: Plan,
    kind: u16,
    len: usize,
}

impl fmt::Debug for Claim<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Claim")
            .field("kind", &self.kind)
            .field("len", &self.len)
            .finish()
    }
}

impl<'a> Claim<'a> {
    /// Publishes the record (and any deferred before it) and returns its sequence number.
    #[inline]
    pub fn commit(self) -> u64 {
        let len = self.len;
        self.commit_len(len)
    }

    /// Publishes the record with only its first `len` payload bytes (`len` ≤ the claimed length;
    /// larger values are clamped). Returns its sequence number.
    #[inline]
    pub fn commit_len(self, len: usize) -> u64 {
        let p = self.write(len);
        p.publish();
        p.next_seq - 1
    }

    /// Commits the record without publishing it: it gets its sequence number now and becomes
    /// visible to the consumer at the next [`Producer::publish`], [`Claim::commit`], or when a
    /// claim finds the buffer full, or when the producer is dropped. Batching publications
    /// saves one contended cache-line transfer per record; a producer that dies before
    /// publishing loses the deferred records (the consumer never sees them).
    #[inline]
    pub fn commit_deferred(self) -> u64 {
        let len = self.len;
        let p = self.write(len);
        p.next_seq - 1
    }

    /// Writes the header(s) and advances the producer's local tail and sequence number.
    #[inline]
    fn write(self, len: usize) -> &'a mut Producer {
        let len = len.min(self.len);
        let p = self.producer;
        let seq = p.next_seq;
        write_header(p.geo.ptr(self.plan.at), len as u32, self.kind, seq);
        p.next_seq = seq + 1;
        p.tail = self.plan.start + record_span(len) as u64;
        p
    }
}

/// Contiguous space for several records, from [`Producer::reserve`].
pub struct Reservation<'a> {
    producer: &'a mut Producer,
    /// The data area (the producer's, held here so that a loop of claims keeps it in a
    /// register: stores through the claimed slices might alias the producer).
    data: NonNull<u8>,
    /// Data offset of the next record.
    at: usize,
    /// Data offset where the reserved space ends.
    end: usize,
    /// Every record gets the single claim's prefetch (see `prefetch_span`).
    prefetch_all: bool,
    /// Otherwise, a record whose prefetch range ends at or below this data offset gets it.
    prefetch_end: usize,
    /// Position of data offset 0 in the reservation's lap (position = `base` + offset).
    base: u64,
    /// Sequence number of the next record.
    seq: u64,
}

// SAFETY: the data pointer is the producer's, which the reservation borrows mutably: sending
// the reservation is sending that borrow (`Producer` is `Send`), and `&Reservation` reads only
// plain fields.
unsafe impl Send for Reservation<'_> {}
// SAFETY: as for `Send`: `&self` methods read only plain fields.
unsafe impl Sync for Reservation<'_> {}

impl fmt::Debug for Reservation<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reservation")
            .field("pos", &(self.base + self.at as u64))
            .field("end", &(self.base + self.end as u64))
            .field("seq", &self.seq)
            .finish()
    }
}

impl<'a> Reservation<'a> {
    /// Bytes of the reservation not yet used by records.
    #[inline]
    pub fn remaining(&self) -> usize {
        self.end - self.at
    }

    /// Sequence number the next record gets.
    #[inline]
    pub fn next_seq(&self) -> u64 {
        self.seq
    }

    /// Appends a record of `len` payload bytes of `kind` and returns its payload to fill in
    /// place. Its header is written now; it is committed with the reservation.
    ///
    /// # Errors
    /// [`ClaimError::Full`] when its span exceeds [`Self::remaining`] (nothing is written);
    /// [`ClaimError::ReservedKind`].
    #[inline]
    pub fn claim(&mut self, kind: u16, len: usize) -> Result<&mut [u8], ClaimError> {
        let left = self.end - self.at;
        // len <= left first, so that record_span cannot overflow.
        if kind >= KIND_PADDING || len > left {
            return Err(self.refuse(kind, len));
        }
        let span = record_span(len);
        if span > left {
            return Err(self.refuse(kind, len));
        }
        // SAFETY: at < end <= capacity: inside the data area.
        let p = unsafe { self.data.as_ptr().add(self.at) };
        if self.prefetch_all || self.at + span + prefetch_reach(span) as usize <= self.prefetch_end
        {
            prefetch_span(p, span);
        }
        write_header(p, len as u32, kind, self.seq);
        self.seq += 1;
        self.at += span;
        // SAFETY: the record [p, p + span) lies inside the reserved space of the data area,
        // which only this producer writes until the commit publishes it; the reservation borrows
        // the producer mutably and the slice borrows the reservation.
        Ok(unsafe { std::slice::from_raw_parts_mut(p.add(RECORD_HEADER_LEN), len) })
    }

    /// Appends a record holding a copy of `payload`; returns its sequence number.
    ///
    /// # Errors
    /// As [`Self::claim`].
    #[inline]
    pub fn push(&mut self, kind: u16, payload: &[u8]) -> Result<u64, ClaimError> {
        let seq = self.seq;
        self.claim(kind, payload.len())?.copy_from_slice(payload);
        Ok(seq)
    }

    #[cold]
    fn refuse(&self, kind: u16, len: usize) -> ClaimError {
        if kind >= KIND_PADDING {
            ClaimError::ReservedKind(kind)
        } else {
            ClaimError::Full {
                needed: len.saturating_add(RECORD_HEADER_LEN),
                available: self.remaining(),
            }
        }
    }

    /// Commits every record appended and publishes them (with anything deferred before);
    /// returns the sequence number the next record gets.
    #[inline]
    pub fn commit(self) -> u64 {
        let p = self.commit_deferred_inner();
        p.publish();
        p.next_seq
    }

    /// Commits every record appended without publishing them (see [`Claim::commit_deferred`]);
    /// returns the sequence number the next record gets.
    #[inline]
    pub fn commit_deferred(self) -> u64 {
        self.commit_deferred_inner().next_seq
    }

    #[inline]
    fn commit_deferred_inner(self) -> &'a mut Producer {
        let p = self.producer;
        // Nothing appended: the tail stays (a padding record written for the reservation
        // lies beyond it, unread, as after a dropped claim).
        if self.seq != p.next_seq {
            p.tail = self.base + self.at as u64;
            p.next_seq = self.seq;
        }
        p
    }
}

impl std::ops::Deref for Claim<'_> {
    type Target = [u8];
    #[inline]
    fn deref(&self) -> &[u8] {
        // SAFETY: the claimed payload lies inside the data area (plan checked it fits before
        // the end) and no one else touches it until commit publishes it.
        unsafe {
            std::slice::from_raw_parts(
                self.producer.geo.ptr(self.plan.at + RECORD_HEADER_LEN),
                self.len,
            )
        }
    }
}

impl std::ops::DerefMut for Claim<'_> {
    #[inline]
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as Deref; the producer is borrowed mutably, so this is the only reference.
        unsafe {
            std::slice::from_raw_parts_mut(
                self.producer.geo.ptr(self.plan.at + RECORD_HEADER_LEN),
                self.len,
            )
        }
    }
}

#[inline(always)]
fn write_header(p: *mut u8, len: u32, kind: u16, seq: u64) {
    // SAFETY: p points to RECORD_HEADER_LEN (8) bytes of the data area owned by the producer
    // until the tail store that follows; records are 8-byte aligned in a data area that starts
    // 128-aligned, but the store does not rely on it.
    unsafe {
        p.cast::<u64>()
            .write_unaligned(header_word(len, kind, seq).to_le())
    }
}

/// The reading end. One per buffer.
pub struct Consumer {
    ring: Arc<Ring>,
    geo: Geometry,
    head: u64,
    cached_tail: u64,
    /// The producer's `next_seq`, loaded right after `cached_tail`: above the sequence number
    /// of every record before `cached_tail`, and close enough for [`seq_from_low`].
    seq_bound: u64,
}

impl fmt::Debug for Consumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Consumer")
            .field("head", &self.head)
            .finish()
    }
}

impl Consumer {
    /// Takes the consumer role of `ring`.
    ///
    /// # Errors
    /// [`RingError::RoleTaken`] if a live process (this one included) already holds it.
    pub fn new(ring: Arc<Ring>) -> Result<Self, RingError> {
        ring.take_role(ring.consumer_pid(), "consumer")?;
        let head = ring.head().load(Ordering::Acquire);
        let mut consumer = Self {
            geo: Geometry::of(&ring),
            ring,
            head,
            cached_tail: 0,
            seq_bound: 0,
        };
        consumer.load_tail();
        Ok(consumer)
    }

    /// The buffer.
    #[inline]
    pub fn ring(&self) -> &Arc<Ring> {
        &self.ring
    }

    /// Position of the oldest unreleased byte.
    #[inline]
    pub fn position(&self) -> u64 {
        self.head
    }

    /// Position after the last committed record (re-reads the producer's index).
    pub fn committed_position(&mut self) -> u64 {
        self.load_tail();
        self.cached_tail
    }

    /// Loads the producer's `tail` (Acquire) and then its `next_seq`. The producer stores
    /// `next_seq` before its Release store of `tail`, so the `next_seq` read here is at least
    /// the one published with that tail: above every record before it.
    #[inline]
    fn load_tail(&mut self) {
        self.cached_tail = self.ring.tail().load(Ordering::Acquire);
        debug_assert!(
            self.cached_tail >= self.head,
            "tail {} behind head {}",
            self.cached_tail,
            self.head
        );
        self.seq_bound = self.ring.next_seq().load(Ordering::Relaxed);
    }

    /// The committed, unreleased records from the head, as one contiguous slice of the data
    /// area (a batch stops at the end of the area; the next one starts at offset 0).
    /// Release them with [`Batch::release`] or [`Consumer::release_to`].
    #[inline]
    pub fn read(&mut self) -> Batch<'_> {
        let head = self.head;
        self.read_from(head)
    }

    /// Like [`Self::read`], but starting at `position` (≥ the head, at a record boundary):
    /// a sender that keeps records until they are acknowledged reads ahead of its head.
    #[inline]
    pub fn read_from(&mut self, position: u64) -> Batch<'_> {
        let position = position.max(self.head);
        let off = (position as usize) & self.geo.mask;
        let to_end = self.geo.capacity - off;
        // Re-read the producer's index unless the cached one already reaches the end of the
        // area (then the batch could not be longer anyway).
        if self.cached_tail < position + to_end as u64 {
            self.load_tail();
        }
        let tail = self.cached_tail.max(position);
        let n = ((tail - position) as usize).min(to_end);
        self.ring.track_read(off, n);
        Batch {
            consumer: self,
            start: position,
            off,
            len: n,
        }
    }

    /// Gives back every byte before `position` (clamped to the committed tail).
    #[inline]
    pub fn release_to(&mut self, position: u64) {
        let position = position.min(self.cached_tail);
        if position > self.head {
            self.head = position;
            self.ring.head().store(position, Ordering::Release);
        }
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        Ring::release_role(self.ring.consumer_pid());
    }
}

/// A contiguous run of committed records (possibly ending in a padding record).
pub struct Batch<'a> {
    consumer: &'a mut Consumer,
    start: u64,
    off: usize,
    len: usize,
}

impl fmt::Debug for Batch<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Batch")
            .field("start", &self.start)
            .field("len", &self.len)
            .finish()
    }
}

impl<'a> Batch<'a> {
    /// True when there is nothing to read.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Position of the first byte.
    #[inline]
    pub fn start_position(&self) -> u64 {
        self.start
    }

    /// Position after the last byte.
    #[inline]
    pub fn end_position(&self) -> u64 {
        self.start + self.len as u64
    }

    /// The raw bytes (record headers included), for zero-copy hand-off.
    #[inline]
    pub fn as_bytes(&self) -> &[u8] {
        // SAFETY: [off, off+len) is inside the data area, committed (below the Acquire-loaded
        // tail) and not yet released, so the producer does not write it while this borrow lives.
        unsafe { std::slice::from_raw_parts(self.consumer.geo.ptr(self.off), self.len) }
    }

    /// Iterates over the records (padding skipped). A header whose record would run past the
    /// batch, or a truncated header (possible only if the shared memory was scribbled on),
    /// yields one `Err` and ends the iteration. Every record handed out lies inside the batch;
    /// the walk checks nothing else (a scribbled length that stays inside the batch, like a
    /// scribbled payload, comes out as it is), so a consumer of shared memory it does not
    /// trust validates what it decodes.
    #[inline]
    pub fn records(&self) -> Records<'_> {
        let bytes = self.as_bytes();
        Records {
            bytes,
            at: 0,
            end: bytes.len() & !(RECORD_ALIGN - 1),
            start: self.start,
            seq_bound: self.consumer.seq_bound,
            expect: 0,
            stride: record_span(0),
        }
    }

    /// Releases the whole batch.
    #[inline]
    pub fn release(self) {
        let end = self.end_position();
        self.consumer.release_to(end);
    }
}

/// Iterator over the records of a [`Batch`].
///
/// The cursor is an offset into the batch's bytes, not a shrinking slice: stepping past a
/// record is one add, and its position is computed only when asked for. The next offset is
/// guessed from the record before (`expect`, `stride`) and checked against each header, so the
/// next header's load does not wait for this one's (`ringbuf/DESIGN.md`, "What the hot path
/// does").
#[derive(Debug)]
pub struct Records<'a> {
    /// The batch's bytes.
    bytes: &'a [u8],
    /// Offset of the next record header in `bytes`: a multiple of `RECORD_ALIGN` below `end`,
    /// or at least `end` when the walk is over.
    at: usize,
    /// `bytes.len()` rounded down to `RECORD_ALIGN`: records end at multiples of it, so bytes
    /// past it can only be a truncated header (a scribbled tail).
    end: usize,
    /// Position of `bytes[0]`.
    start: u64,
    /// See [`Consumer::seq_bound`].
    seq_bound: u64,
    /// The low half of a header (length and kind) that the walk expects next: that of the
    /// last record it handed out through the general path (at first, an empty record of kind
    /// 0).
    expect: u32,
    /// `record_span` of `expect`'s length: the guess for the next record's span.
    stride: usize,
}

/// `x`, as a value the optimiser cannot see through; costs no instruction. The walk's guessed
/// offset goes through it so that the compiler, knowing on the fast path that the header
/// matches the expected one, does not compute the offset from the header instead and put the
/// header's load back into the chain of offsets.
#[inline(always)]
fn opaque(x: usize) -> usize {
    #[cfg(all(target_arch = "x86_64", not(loom)))]
    {
        let mut x = x;
        // SAFETY: an empty asm block (a comment) with one register in and out: it touches no
        // memory, stack or flags, and leaves the register as it was.
        unsafe {
            std::arch::asm!("/* {0} */", inout(reg) x, options(pure, nomem, nostack, preserves_flags));
        }
        x
    }
    #[cfg(not(all(target_arch = "x86_64", not(loom))))]
    x
}

impl<'a> Iterator for Records<'a> {
    type Item = Result<Record<'a>, CorruptRecord>;

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        const { assert!(RECORD_HEADER_LEN == RECORD_ALIGN) };
        loop {
            let at = self.at;
            if at >= self.end {
                if at < self.bytes.len() {
                    return Some(Err(self.fail(at, "truncated record header")));
                }
                return None;
            }
            // SAFETY: `at` is a multiple of RECORD_ALIGN (it starts at 0 and moves by record
            // spans) below `end`, a multiple of RECORD_ALIGN at most `bytes.len()`; so the
            // RECORD_HEADER_LEN (= RECORD_ALIGN) header bytes at `at` lie inside `bytes`.
            let word = unsafe { self.bytes.as_ptr().add(at).cast::<u64>().read_unaligned() };
            let word = u64::from_le(word);
            // The common case first: a record of the same length and kind as the one before
            // it (the header's low half equals `expect`), ending before the batch does. It
            // cannot be padding: a padding record runs to the end of the data area, where
            // every batch that holds it ends. (A scribbled header with the padding kind in
            // mid-batch is handed out as a record of kind 255, which no producer writes.) The
            // next offset is the guess, `at` plus the previous span, which does not wait for
            // this header's load: the CPU predicts the branch and starts on the next header
            // while this one is in flight, as an array queue computes every item's address
            // from its index (a walk that waits for each header is a chain of load, mask,
            // round and add per record). The check is one 32-bit compare.
            let guess = opaque(at + self.stride);
            let (len, kind, seq_low) = split_header(word);
            if word as u32 == self.expect && guess < self.end {
                return Some(Ok(self.take(at, len, guess, kind, seq_low)));
            }
            let span = record_span(len);
            let next = at + span;
            if next < self.end {
                self.expect = word as u32;
                self.stride = span;
                return Some(Ok(self.take(at, len, next, kind, seq_low)));
            }
            if next > self.end {
                return Some(Err(self.fail(at, "record runs past the tail")));
            }
            if kind != KIND_PADDING {
                // The batch's last record.
                return Some(Ok(self.take(at, len, next, kind, seq_low)));
            }
            // A padding record: skip it.
            self.at = next;
        }
    }
}

impl<'a> Records<'a> {
    /// Hands out the record at offset `at`, `len` payload bytes, and steps to `next` (the
    /// caller checked `next <= end`).
    #[inline(always)]
    fn take(&mut self, at: usize, len: usize, next: usize, kind: u16, seq_low: u32) -> Record<'a> {
        debug_assert!(at + RECORD_HEADER_LEN + len <= next && next <= self.end);
        // SAFETY: at + RECORD_HEADER_LEN + len <= next <= end <= bytes.len() (record_span
        // rounds up the header and payload; the caller checked next).
        let raw = unsafe { self.bytes.get_unchecked(at..at + RECORD_HEADER_LEN + len) };
        self.at = next;
        Record {
            position: self.start + at as u64,
            next_position: self.start + next as u64,
            seq: seq_from_low(seq_low, self.seq_bound),
            kind,
            raw,
        }
    }

    /// Ends the iteration after reporting a malformed header at offset `at`.
    #[cold]
    fn fail(&mut self, at: usize, what: &'static str) -> CorruptRecord {
        self.at = self.bytes.len();
        CorruptRecord {
            position: self.start + at as u64,
            what,
        }
    }
}

/// One committed record, borrowed from the buffer.
#[derive(Debug, Clone, Copy)]
pub struct Record<'a> {
    position: u64,
    next_position: u64,
    seq: u64,
    kind: u16,
    raw: &'a [u8],
}

impl<'a> Record<'a> {
    /// Position of the record header.
    #[inline]
    pub fn position(&self) -> u64 {
        self.position
    }
    /// Position right after this record (release to here to free it and all before it).
    #[inline]
    pub fn next_position(&self) -> u64 {
        self.next_position
    }
    /// Sequence number assigned at commit.
    #[inline]
    pub fn seq(&self) -> u64 {
        self.seq
    }
    /// Record kind.
    #[inline]
    pub fn kind(&self) -> u16 {
        self.kind
    }
    /// The payload.
    #[inline]
    pub fn payload(&self) -> &'a [u8] {
        &self.raw[RECORD_HEADER_LEN..]
    }
    /// Header and payload, as stored.
    #[inline]
    pub fn raw(&self) -> &'a [u8] {
        self.raw
    }
}

#[cfg(all(test, not(loom)))]
#[allow(clippy::drop_non_drop)] // `drop(batch)` marks where a borrow ends
mod tests {
    use std::os::unix::fs::FileExt;

    use super::*;
    use crate::region::SharedRegion;

    fn drain(rx: &mut Consumer) -> Vec<(u64, u16, Vec<u8>)> {
        let mut out = Vec::new();
        loop {
            let batch = rx.read();
            if batch.is_empty() {
                return out;
            }
            for r in batch.records() {
                let r = r.expect("well-formed record");
                out.push((r.seq(), r.kind(), r.payload().to_vec()));
            }
            batch.release();
        }
    }

    #[test]
    fn both_ends_are_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Producer>();
        check::<Consumer>();
        check::<Ring>();
    }

    #[test]
    fn records_come_back_in_order_with_kinds_and_seqs() {
        let (mut tx, mut rx) = with_capacity(1024).unwrap();
        assert_eq!(tx.next_seq(), FIRST_SEQ);
        for i in 0..10u16 {
            let seq = tx.push(i, &vec![i as u8; usize::from(i) * 3]).unwrap();
            assert_eq!(seq, FIRST_SEQ + u64::from(i));
        }
        let got = drain(&mut rx);
        assert_eq!(got.len(), 10);
        for (i, (seq, kind, payload)) in got.into_iter().enumerate() {
            assert_eq!(seq, FIRST_SEQ + i as u64);
            assert_eq!(usize::from(kind), i);
            assert_eq!(payload, vec![i as u8; i * 3]);
        }
        assert_eq!(rx.ring().used(), 0);
    }

    #[test]
    fn wrap_around_writes_a_padding_record_and_keeps_order() {
        let (mut tx, mut rx) = with_capacity(256).unwrap();
        // 3 records of span 64 put the tail at 192; release them so there is room.
        for i in 0..3u8 {
            tx.push(1, &[i; 56]).unwrap();
        }
        assert_eq!(drain(&mut rx).len(), 3);
        assert_eq!(tx.position(), 192);
        // A record of span 96 does not fit in the last 64 bytes: padding, then offset 0.
        let seq = tx.push(2, &[7; 88]).unwrap();
        assert_eq!(tx.position(), 192 + 64 + 96);
        // The first batch ends at the end of the area and holds only the padding record.
        let batch = rx.read();
        assert_eq!((batch.start_position(), batch.end_position()), (192, 256));
        let raw = batch.as_bytes();
        assert_eq!(u16::from(raw[REC_KIND_OFFSET]), KIND_PADDING);
        assert_eq!(u32::from_le_bytes([raw[0], raw[1], raw[2], 0]), 56);
        assert_eq!(batch.records().count(), 0);
        batch.release();
        // The second starts at offset 0 with the record.
        let batch = rx.read();
        assert_eq!(batch.start_position(), 256);
        let recs: Vec<_> = batch.records().map(Result::unwrap).collect();
        assert_eq!(recs.len(), 1);
        assert_eq!(
            (recs[0].seq(), recs[0].kind(), recs[0].payload()),
            (seq, 2, &[7u8; 88][..])
        );
        assert_eq!(recs[0].next_position(), 256 + 96);
        batch.release();
        assert_eq!(rx.ring().used(), 0);
    }

    #[test]
    fn a_gap_of_exactly_one_header_becomes_an_empty_padding_record() {
        let (mut tx, mut rx) = with_capacity(128).unwrap();
        tx.push(1, &[1; 48]).unwrap(); // span 56
        tx.push(1, &[1; 56]).unwrap(); // span 64: 8 bytes left before the end
        drain(&mut rx);
        tx.push(1, &[2; 16]).unwrap(); // span 24: padding of 8 (len 0), then offset 0
        assert_eq!(tx.position(), 120 + 8 + 24);
        let batch = rx.read();
        assert_eq!(&batch.as_bytes()[..4], &[0, 0, 0, 0xFF]);
        drop(batch);
        let got = drain(&mut rx);
        assert_eq!(got, vec![(FIRST_SEQ + 2, 1, vec![2; 16])]);
    }

    #[test]
    fn zero_length_records() {
        let (mut tx, mut rx) = with_capacity(64).unwrap();
        for _ in 0..10 {
            let c = tx.claim(3, 0).unwrap();
            assert!(c.is_empty());
            c.commit();
            assert_eq!(drain(&mut rx).len(), 1);
        }
        assert_eq!(tx.position(), 10 * RECORD_HEADER_LEN as u64);
        assert_eq!(tx.next_seq(), FIRST_SEQ + 10);
    }

    #[test]
    fn too_large_and_reserved_kind_are_refused() {
        let (mut tx, mut rx) = with_capacity(256).unwrap();
        let max = tx.ring().max_payload();
        assert_eq!(max, 256 / 2 - RECORD_HEADER_LEN);
        assert_eq!(
            tx.claim(1, max + 1).unwrap_err(),
            ClaimError::TooLarge { len: max + 1, max }
        );
        assert_eq!(
            tx.claim(KIND_PADDING, 1).unwrap_err(),
            ClaimError::ReservedKind(KIND_PADDING)
        );
        let mut idle = crate::BusySpin;
        assert!(matches!(
            tx.claim_blocking(1, usize::MAX, &mut idle),
            Err(ClaimError::TooLarge { .. })
        ));
        // The largest record fits wherever the tail is, once the buffer is drained.
        for _ in 0..20 {
            tx.push(1, &vec![9; max]).unwrap();
            tx.push(1, &[1; 8]).unwrap();
            assert_eq!(drain(&mut rx).len(), 2);
        }
    }

    #[test]
    fn full_is_reported_without_blocking_and_clears_after_release() {
        let (mut tx, mut rx) = with_capacity(256).unwrap();
        for _ in 0..4 {
            tx.push(1, &[0; 56]).unwrap(); // span 64
        }
        assert_eq!(
            tx.claim(1, 0).unwrap_err(),
            ClaimError::Full {
                needed: 8,
                available: 0
            }
        );
        assert_eq!(tx.free(), 0);
        // Release one record: 64 bytes free, a 65-byte span is still refused.
        let batch = rx.read();
        let first = batch.records().next().unwrap().unwrap().next_position();
        drop(batch);
        rx.release_to(first);
        assert_eq!(
            tx.claim(1, 57).unwrap_err(),
            ClaimError::Full {
                needed: 72,
                available: 64
            }
        );
        assert_eq!(tx.push(1, &[0; 56]).unwrap(), FIRST_SEQ + 4);
    }

    #[test]
    fn claim_blocking_waits_for_the_consumer() {
        let (mut tx, mut rx) = with_capacity(64).unwrap();
        tx.push(1, &[0; 24]).unwrap(); // span 32
        tx.push(1, &[0; 24]).unwrap(); // full
        let consumer = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(20));
            let n = drain(&mut rx).len();
            (n, rx)
        });
        let mut idle = crate::SpinThenYield::new(100);
        let c = tx.claim_blocking(1, 8, &mut idle).unwrap();
        assert_eq!(c.commit(), FIRST_SEQ + 2);
        let (n, mut rx) = consumer.join().unwrap();
        assert_eq!(n, 2);
        assert_eq!(drain(&mut rx).len(), 1);
    }

    #[test]
    fn a_dropped_claim_publishes_nothing() {
        let (mut tx, mut rx) = with_capacity(256).unwrap();
        let mut c = tx.claim(1, 32).unwrap();
        c.fill(0xAB);
        drop(c);
        assert!(rx.read().is_empty());
        assert_eq!((tx.position(), tx.next_seq()), (0, FIRST_SEQ));
        assert_eq!(tx.push(2, b"x").unwrap(), FIRST_SEQ);
        assert_eq!(drain(&mut rx), vec![(FIRST_SEQ, 2, b"x".to_vec())]);
    }

    #[test]
    fn commit_len_shrinks_the_record_and_clamps() {
        let (mut tx, mut rx) = with_capacity(1024).unwrap();
        let mut c = tx.claim(1, 100).unwrap();
        c[..10].copy_from_slice(b"0123456789");
        c.commit_len(10);
        assert_eq!(tx.position(), record_span(10) as u64);
        let mut c = tx.claim(1, 4).unwrap();
        c.copy_from_slice(b"abcd");
        c.commit_len(1000); // clamped to 4
        assert_eq!(
            drain(&mut rx),
            vec![
                (FIRST_SEQ, 1, b"0123456789".to_vec()),
                (FIRST_SEQ + 1, 1, b"abcd".to_vec())
            ]
        );
    }

    #[test]
    fn commit_len_shrinks_a_wrapped_record() {
        let (mut tx, mut rx) = with_capacity(256).unwrap();
        tx.push(1, &[0; 160]).unwrap_err(); // TooLarge: max is 120
        tx.push(1, &[0; 104]).unwrap(); // span 112
        tx.push(1, &[0; 104]).unwrap(); // tail 224
        drain(&mut rx);
        let mut c = tx.claim(1, 100).unwrap(); // wraps: padding 32 + span 112
        c[..3].copy_from_slice(b"xyz");
        c.commit_len(3);
        assert_eq!(tx.position(), 224 + 32 + record_span(3) as u64);
        assert_eq!(drain(&mut rx), vec![(FIRST_SEQ + 2, 1, b"xyz".to_vec())]);
    }

    #[test]
    fn deferred_commits_appear_at_publish() {
        let (mut tx, mut rx) = with_capacity(256).unwrap();
        let c = tx.claim(1, 8).unwrap();
        assert_eq!(c.commit_deferred(), FIRST_SEQ);
        let c = tx.claim(1, 8).unwrap();
        assert_eq!(c.commit_deferred(), FIRST_SEQ + 1);
        assert!(rx.read().is_empty());
        assert_eq!(tx.published_position(), 0);
        tx.publish();
        assert_eq!(drain(&mut rx).len(), 2);
        // A plain commit publishes the deferred records before it too.
        tx.claim(1, 8).unwrap().commit_deferred();
        tx.push(1, &[1; 8]).unwrap();
        assert_eq!(drain(&mut rx).len(), 2);
        // A claim that finds the buffer full publishes what is deferred.
        for _ in 0..8 {
            tx.claim(1, 24).unwrap().commit_deferred(); // span 32 each: 256 bytes
        }
        assert!(rx.read().is_empty());
        assert!(matches!(tx.claim(1, 0), Err(ClaimError::Full { .. })));
        assert_eq!(drain(&mut rx).len(), 8);
        // Dropping the producer publishes too.
        tx.claim(1, 0).unwrap().commit_deferred();
        drop(tx);
        assert_eq!(drain(&mut rx).len(), 1);
    }

    #[test]
    fn read_from_reads_ahead_and_release_to_frees_a_prefix() {
        let (mut tx, mut rx) = with_capacity(1024).unwrap();
        for i in 0..3u8 {
            tx.push(1, &[i; 5]).unwrap();
        }
        let batch = rx.read();
        let positions: Vec<(u64, u64)> = batch
            .records()
            .map(|r| r.map(|r| (r.position(), r.next_position())).unwrap())
            .collect();
        drop(batch);
        assert_eq!(positions.len(), 3);
        // Read ahead from the second record without releasing anything.
        let batch = rx.read_from(positions[1].0);
        let seqs: Vec<u64> = batch.records().map(|r| r.unwrap().seq()).collect();
        assert_eq!(seqs, vec![FIRST_SEQ + 1, FIRST_SEQ + 2]);
        drop(batch);
        assert_eq!(rx.position(), 0);
        // Release the first record only; a read from the head starts at the second.
        rx.release_to(positions[0].1);
        assert_eq!(rx.position(), positions[0].1);
        assert_eq!(rx.ring().head_position(), positions[0].1);
        let seqs: Vec<u64> = rx.read().records().map(|r| r.unwrap().seq()).collect();
        assert_eq!(seqs, vec![FIRST_SEQ + 1, FIRST_SEQ + 2]);
        // read_from below the head is clamped to it; release_to beyond the tail is clamped.
        assert_eq!(rx.read_from(0).start_position(), positions[0].1);
        rx.release_to(u64::MAX);
        assert_eq!(rx.position(), positions[2].1);
        // Releasing backwards does nothing.
        rx.release_to(0);
        assert_eq!(rx.position(), positions[2].1);
        assert!(rx.read().is_empty());
        assert_eq!(rx.committed_position(), positions[2].1);
    }

    #[test]
    fn a_read_after_a_partial_release_sees_newer_records() {
        let (mut tx, mut rx) = with_capacity(1024).unwrap();
        tx.push(1, b"a").unwrap();
        tx.push(1, b"b").unwrap();
        let first_end = rx.read().records().next().unwrap().unwrap().next_position();
        rx.release_to(first_end);
        tx.push(1, b"c").unwrap();
        let seqs: Vec<u64> = rx.read().records().map(|r| r.unwrap().seq()).collect();
        assert_eq!(seqs, vec![FIRST_SEQ + 1, FIRST_SEQ + 2]);
    }

    #[test]
    fn each_role_is_taken_once_and_freed_on_drop() {
        let (tx, rx) = with_capacity(256).unwrap();
        let ring = tx.ring().clone();
        let me = u64::from(std::process::id());
        match Producer::new(ring.clone()) {
            Err(RingError::RoleTaken { role, pid }) => assert_eq!((role, pid), ("producer", me)),
            other => panic!("expected RoleTaken, got {other:?}"),
        }
        match Consumer::new(ring.clone()) {
            Err(RingError::RoleTaken { role, pid }) => assert_eq!((role, pid), ("consumer", me)),
            other => panic!("expected RoleTaken, got {other:?}"),
        }
        let mut tx = tx;
        tx.push(1, b"a").unwrap();
        drop(tx);
        let mut tx = Producer::new(ring.clone()).unwrap();
        assert_eq!(tx.next_seq(), FIRST_SEQ + 1);
        assert_eq!(tx.position(), record_span(1) as u64);
        tx.push(1, b"b").unwrap();
        drop(rx);
        let mut rx = Consumer::new(ring).unwrap();
        assert_eq!(drain(&mut rx).len(), 2);
    }

    #[test]
    fn set_next_seq_numbers_the_following_records_and_survives_a_new_producer() {
        let (mut tx, mut rx) = with_capacity(256).unwrap();
        tx.set_next_seq(1000).unwrap();
        assert_eq!(tx.push(1, b"a").unwrap(), 1000);
        assert_eq!(tx.push(1, b"b").unwrap(), 1001);
        let ring = tx.ring().clone();
        drop(tx);
        let mut tx = Producer::new(ring).unwrap();
        assert_eq!(tx.next_seq(), 1002);
        assert_eq!(tx.push(1, b"c").unwrap(), 1002);
        let seqs: Vec<u64> = drain(&mut rx).into_iter().map(|r| r.0).collect();
        assert_eq!(seqs, vec![1000, 1001, 1002]);
    }

    #[test]
    fn a_reservation_commits_its_records_together_and_leaves_unused_space_free() {
        let (mut tx, mut rx) = with_capacity(256).unwrap();
        let mut r = tx.reserve(3 * record_span(10) + 5).unwrap();
        assert_eq!(r.remaining(), 3 * 24 + 8); // rounded up to RECORD_ALIGN
        assert_eq!(r.push(4, b"0123456789").unwrap(), FIRST_SEQ);
        r.claim(5, 3).unwrap().copy_from_slice(b"abc");
        assert_eq!(r.next_seq(), FIRST_SEQ + 2);
        // Too long for what is left: refused, nothing written.
        assert_eq!(
            r.claim(1, 60).unwrap_err(),
            ClaimError::Full {
                needed: 68,
                available: 3 * 24 + 8 - 24 - 16
            }
        );
        assert_eq!(
            r.claim(KIND_PADDING, 0).unwrap_err(),
            ClaimError::ReservedKind(KIND_PADDING)
        );
        assert_eq!(r.commit_deferred(), FIRST_SEQ + 2);
        assert!(rx.read().is_empty(), "deferred until published");
        assert_eq!(tx.position(), 24 + 16);
        tx.publish();
        assert_eq!(
            drain(&mut rx),
            vec![
                (FIRST_SEQ, 4, b"0123456789".to_vec()),
                (FIRST_SEQ + 1, 5, b"abc".to_vec())
            ]
        );
        // The next record follows the last one appended, not the end of the reservation.
        assert_eq!(tx.push(1, b"z").unwrap(), FIRST_SEQ + 2);
        let batch = rx.read();
        assert_eq!(batch.start_position(), 40);
        drop(batch);
        assert_eq!(drain(&mut rx).len(), 1);
    }

    #[test]
    fn a_dropped_reservation_commits_nothing() {
        let (mut tx, mut rx) = with_capacity(256).unwrap();
        tx.push(1, b"a").unwrap();
        let mut r = tx.reserve(64).unwrap();
        r.push(2, b"lost").unwrap();
        r.push(2, b"too").unwrap();
        drop(r);
        assert_eq!((tx.position(), tx.next_seq()), (16, FIRST_SEQ + 1));
        assert_eq!(tx.push(3, b"b").unwrap(), FIRST_SEQ + 1);
        assert_eq!(
            drain(&mut rx),
            vec![
                (FIRST_SEQ, 1, b"a".to_vec()),
                (FIRST_SEQ + 1, 3, b"b".to_vec())
            ]
        );
    }

    #[test]
    fn a_reservation_past_the_end_of_the_area_wraps_and_too_large_ones_are_refused() {
        let (mut tx, mut rx) = with_capacity(256).unwrap();
        assert_eq!(
            tx.reserve(129).unwrap_err(),
            ClaimError::TooLarge { len: 129, max: 128 }
        );
        for _ in 0..3 {
            tx.push(1, &[0; 56]).unwrap(); // tail 192
        }
        drain(&mut rx);
        // 96 bytes do not fit in the last 64: padding, then offset 0.
        let mut r = tx.reserve(96).unwrap();
        for i in 0..4u8 {
            r.push(7, &[i; 16]).unwrap();
        }
        assert_eq!(r.commit(), FIRST_SEQ + 7);
        assert_eq!(tx.position(), 256 + 96);
        let got = drain(&mut rx);
        assert_eq!(got.len(), 4);
        assert_eq!(got[3], (FIRST_SEQ + 6, 7, vec![3; 16]));
        // Full: the consumer holds too much. A full reservation publishes deferred records.
        tx.claim(1, 100).unwrap().commit_deferred();
        assert!(matches!(tx.reserve(128), Err(ClaimError::Full { .. })));
        assert_eq!(drain(&mut rx).len(), 1);
    }

    #[test]
    fn sequence_numbers_survive_the_32_bit_wrap_of_the_header_field() {
        // The header holds the low 32 bits; the reader rebuilds the rest from `next_seq`.
        let (mut tx, mut rx) = with_capacity(256).unwrap();
        let start = (5u64 << 32) - 3;
        tx.set_next_seq(start).unwrap();
        let mut want = Vec::new();
        for round in 0..4u64 {
            for i in 0..3 {
                let seq = tx.claim(1, 8).unwrap().commit_deferred();
                assert_eq!(seq, start + round * 3 + i);
                want.push(seq);
            }
            tx.publish();
            // Read some rounds late: records on both sides of the wrap in one batch.
            if round % 2 == 1 {
                let got: Vec<u64> = drain(&mut rx).into_iter().map(|r| r.0).collect();
                assert_eq!(got, std::mem::take(&mut want));
            }
        }
        // A batch read while the producer commits more keeps the numbers of what it holds.
        tx.push(1, b"a").unwrap();
        let batch = rx.read();
        tx.push(1, b"b").unwrap();
        let first = batch.records().next().unwrap().unwrap().seq();
        assert_eq!(first, start + 12);
        drop(batch);
        assert_eq!(drain(&mut rx).len(), 2);
    }

    #[test]
    fn renumbering_a_buffer_that_holds_records_is_refused() {
        let (mut tx, mut rx) = with_capacity(256).unwrap();
        tx.push(1, b"x").unwrap();
        assert!(matches!(
            tx.set_next_seq(100),
            Err(RingError::NotEmpty { unread: 16 })
        ));
        // Deferred (unpublished) records count too.
        drain(&mut rx);
        tx.claim(1, 0).unwrap().commit_deferred();
        assert!(matches!(
            tx.set_next_seq(100),
            Err(RingError::NotEmpty { .. })
        ));
        drain(&mut rx);
        tx.publish();
        drain(&mut rx);
        tx.set_next_seq(100).unwrap();
        assert_eq!(tx.push(1, b"y").unwrap(), 100);
        assert_eq!(drain(&mut rx), vec![(100, 1, b"y".to_vec())]);
    }

    #[test]
    fn kinds_above_the_header_byte_and_lengths_above_24_bits_are_refused() {
        let (mut tx, _rx) = with_capacity(256).unwrap();
        for kind in [KIND_PADDING, 0x100, u16::MAX] {
            assert_eq!(
                tx.claim(kind, 1).unwrap_err(),
                ClaimError::ReservedKind(kind)
            );
        }
        assert_eq!(tx.push(KIND_PADDING - 1, b"k").unwrap(), FIRST_SEQ);
        // A large buffer caps records at the header's 24-bit length, not half the area.
        assert_eq!(max_payload(64 << 20), MAX_RECORD_LEN);
        assert_eq!(max_payload(1 << 20), (1 << 19) - RECORD_HEADER_LEN);
        assert!(matches!(
            with_capacity(MAX_CAPACITY * 2),
            Err(RingError::BadCapacity { .. })
        ));
    }

    #[test]
    fn bad_capacities_are_errors_not_panics() {
        for cap in [0, 1, 32, 100, 1000, usize::MAX] {
            assert!(
                matches!(with_capacity(cap), Err(RingError::BadCapacity { .. })),
                "capacity {cap}"
            );
        }
        let region = HeapRegion::new(DATA_OFFSET + 64).unwrap();
        assert!(matches!(
            Ring::init(region, 128),
            Err(RingError::BadCapacity { .. })
        ));
    }

    /// A ring in a memfd, plus a file handle on the same memory to scribble on.
    fn shared_ring(capacity: usize) -> (Arc<Ring>, std::fs::File) {
        let region = SharedRegion::memfd("ringbuf-test", region_len(capacity)).unwrap();
        let file = std::fs::File::from(region.fd().try_clone().unwrap());
        let ring = Ring::init(region, capacity).unwrap();
        (ring, file)
    }

    /// Both ends of a ring in a memfd, plus the scribbling handle of [`shared_ring`].
    fn shared_ends(capacity: usize) -> (Producer, Consumer, std::fs::File) {
        let (ring, file) = shared_ring(capacity);
        let tx = Producer::new(ring.clone()).unwrap();
        let rx = Consumer::new(ring).unwrap();
        (tx, rx, file)
    }

    fn attach_copy(file: &std::fs::File) -> Result<Arc<Ring>, RingError> {
        let fd = std::os::fd::OwnedFd::from(file.try_clone().unwrap());
        Ring::attach(SharedRegion::from_fd(fd).unwrap())
    }

    #[test]
    fn attach_sees_what_init_wrote() {
        let (ring, file) = shared_ring(4096);
        let mut tx = Producer::new(ring.clone()).unwrap();
        tx.push(5, b"hello").unwrap();
        drop(tx);
        let other = attach_copy(&file).unwrap();
        assert_eq!(other.capacity(), 4096);
        assert_eq!(other.max_payload(), max_payload(4096));
        let mut rx = Consumer::new(other).unwrap();
        assert_eq!(drain(&mut rx), vec![(FIRST_SEQ, 5, b"hello".to_vec())]);
    }

    #[test]
    fn attach_rejects_a_bad_magic() {
        let (_ring, file) = shared_ring(256);
        file.write_all_at(b"NOTALOG!", MAGIC_OFFSET as u64).unwrap();
        match attach_copy(&file) {
            Err(RingError::BadMagic { found }) => {
                assert_eq!(found, u64::from_le_bytes(*b"NOTALOG!"));
            }
            other => panic!("expected BadMagic, got {other:?}"),
        }
    }

    #[test]
    fn attach_rejects_a_bad_version() {
        let (_ring, file) = shared_ring(256);
        file.write_all_at(&7u32.to_le_bytes(), VERSION_OFFSET as u64)
            .unwrap();
        match attach_copy(&file) {
            Err(RingError::BadVersion {
                found: 7,
                expected: VERSION,
            }) => {}
            other => panic!("expected BadVersion, got {other:?}"),
        }
    }

    #[test]
    fn attach_rejects_a_bad_checksum() {
        let (_ring, file) = shared_ring(256);
        // A larger capacity would let a reader run past the region: the checksum catches it.
        file.write_all_at(&(1u64 << 40).to_le_bytes(), CAPACITY_OFFSET as u64)
            .unwrap();
        match attach_copy(&file) {
            Err(RingError::Corrupt { what }) => assert!(what.contains("checksum"), "{what}"),
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }

    #[test]
    fn attach_rejects_a_consistent_descriptor_that_does_not_fit_the_region() {
        let (_ring, file) = shared_ring(256);
        let cap = 1u64 << 20;
        let max = max_payload(1 << 20) as u64;
        let sum = descriptor_checksum(MAGIC, VERSION, DATA_OFFSET as u32, cap, max);
        file.write_all_at(&cap.to_le_bytes(), CAPACITY_OFFSET as u64)
            .unwrap();
        file.write_all_at(&max.to_le_bytes(), MAX_PAYLOAD_OFFSET as u64)
            .unwrap();
        file.write_all_at(&sum.to_le_bytes(), CHECKSUM_OFFSET as u64)
            .unwrap();
        assert!(matches!(attach_copy(&file), Err(RingError::Corrupt { .. })));
    }

    #[test]
    fn attach_rejects_bad_indices() {
        for (head, tail) in [(64u64, 32u64), (0, 512), (4, 16), (0, 20)] {
            let (_ring, file) = shared_ring(256);
            file.write_all_at(&head.to_le_bytes(), HEAD_OFFSET as u64)
                .unwrap();
            file.write_all_at(&tail.to_le_bytes(), TAIL_OFFSET as u64)
                .unwrap();
            match attach_copy(&file) {
                Err(RingError::Corrupt { what }) => assert!(what.contains("head"), "{what}"),
                other => panic!("head {head} tail {tail}: expected Corrupt, got {other:?}"),
            }
        }
    }

    #[test]
    fn attach_rejects_a_region_too_small_for_any_buffer() {
        let region = SharedRegion::memfd("tiny", 64).unwrap();
        assert!(matches!(
            Ring::attach(region),
            Err(RingError::Corrupt { .. })
        ));
        let region = HeapRegion::new(DATA_OFFSET + 64).unwrap(); // zeroes: no magic
        assert!(matches!(
            Ring::attach(region),
            Err(RingError::BadMagic { found: 0 })
        ));
    }

    #[test]
    fn a_scribbled_record_header_is_reported_once_not_trusted() {
        let (mut tx, mut rx, file) = shared_ends(256);
        tx.push(1, &[1; 8]).unwrap();
        tx.push(1, &[2; 8]).unwrap();
        // The second record's length now runs far past the tail.
        let second = DATA_OFFSET + record_span(8);
        file.write_all_at(&10_000u32.to_le_bytes(), second as u64)
            .unwrap();
        let batch = rx.read();
        let items: Vec<_> = batch.records().collect();
        assert_eq!(items.len(), 2);
        assert!(items[0].is_ok());
        let err = items[1].clone().unwrap_err();
        assert_eq!(err.position, record_span(8) as u64);
        // So does a length just long enough to run past it.
        drop(batch);
        file.write_all_at(&64u32.to_le_bytes(), second as u64)
            .unwrap();
        let batch = rx.read();
        let err = batch.records().nth(1).unwrap().unwrap_err();
        assert_eq!(err.what, "record runs past the tail");
        // The padding kind in mid-batch (padding always ends a batch) is not skipped
        // silently: the record comes out with kind 255, which no producer can write.
        drop(batch);
        file.write_all_at(&[8, 0, 0, 1], second as u64).unwrap(); // len 8, kind 1 again
        file.write_all_at(&[KIND_PADDING as u8], DATA_OFFSET as u64 + 3)
            .unwrap();
        let batch = rx.read();
        let kinds: Vec<u16> = batch.records().map(|r| r.unwrap().kind()).collect();
        assert_eq!(kinds, vec![KIND_PADDING, 1]);
    }

    #[test]
    fn a_scribbled_length_inside_the_batch_comes_out_inside_the_batch() {
        let (mut tx, mut rx, file) = shared_ends(256);
        let max = tx.ring().max_payload(); // 120
        for i in 0..10u8 {
            tx.push(1, &[i; 8]).unwrap(); // spans of 16: the batch is 160 bytes
        }
        // The first record now claims 136 bytes (above the maximum, inside the batch): it
        // covers records 1..=8 and the walk goes on with record 9.
        let len = max + 16;
        assert_eq!(record_span(len), 9 * record_span(8));
        file.write_all_at(&(len as u32).to_le_bytes()[..3], DATA_OFFSET as u64)
            .unwrap();
        let batch = rx.read();
        assert_eq!(batch.as_bytes().len(), 160);
        let recs: Vec<_> = batch.records().map(Result::unwrap).collect();
        assert_eq!(recs.len(), 2);
        assert_eq!(recs[0].payload().len(), len);
        assert_eq!(recs[0].next_position(), recs[1].position());
        assert_eq!(recs[1].payload(), &[9; 8]);
        assert_eq!(recs[1].next_position(), batch.end_position());
    }

    /// The walk guesses each record's span from the one before (see `Records::next`); every
    /// guess is checked against the record's own header and the batch's end.
    #[test]
    fn the_walk_checks_its_guessed_offsets_against_each_header_and_the_tail() {
        let (mut tx, mut rx, _file) = shared_ends(512);
        let lens = [0, 0, 8, 8, 8, 24, 24, 0, 8, 8, 8]; // kinds 0, 1, 2, ...: the first is the header the walk expects first
        for (i, &len) in lens.iter().enumerate() {
            tx.push(i as u16, &vec![i as u8; len]).unwrap();
        }
        let batch = rx.read();
        let recs: Vec<_> = batch.records().map(Result::unwrap).collect();
        let got: Vec<_> = recs
            .iter()
            .map(|r| (r.kind(), r.payload().to_vec()))
            .collect();
        let want: Vec<_> = (0..)
            .zip(lens)
            .map(|(i, l)| (i, vec![i as u8; l]))
            .collect();
        assert_eq!(got, want);
        for w in recs.windows(2) {
            assert_eq!(w[0].next_position(), w[1].position());
        }
        assert_eq!(recs[10].next_position(), batch.end_position());
        drop(batch);
        // A run of equal records whose last one the (scribbled) tail cuts after its header:
        // the guessed offset lies past the tail, and the record is reported, not handed out.
        let (mut tx, mut rx, file2) = shared_ends(256);
        for i in 0..5u8 {
            tx.push(1, &[i; 8]).unwrap();
        }
        let tail = 4 * record_span(8) as u64 + RECORD_HEADER_LEN as u64;
        file2
            .write_all_at(&tail.to_le_bytes(), TAIL_OFFSET as u64)
            .unwrap();
        let batch = rx.read();
        let items: Vec<_> = batch.records().collect();
        assert_eq!(items.len(), 5);
        for (i, r) in items[..4].iter().enumerate() {
            assert_eq!(r.as_ref().unwrap().payload(), &[i as u8; 8]);
        }
        let err = items[4].clone().unwrap_err();
        assert_eq!(err.what, "record runs past the tail");
        assert_eq!(err.position, 4 * record_span(8) as u64);
    }

    /// A padding record as long as the record before it: the guessed offset is the end of the
    /// data area, and the padding is skipped there, not handed out.
    #[test]
    fn padding_as_long_as_the_record_before_it_is_skipped() {
        let mut buf = crate::with_capacity(256).unwrap();
        let (tx, rx) = (&mut buf.0, &mut buf.1);
        assert_eq!(tx.ring().capacity(), 256);
        for i in 0..14u8 {
            tx.push(1, &[i; 8]).unwrap(); // spans of 16: offsets 0..224
        }
        assert_eq!(drain(rx).len(), 14);
        tx.push(2, &[14; 8]).unwrap(); // offset 224
        tx.push(3, &[15; 16]).unwrap(); // span 24: padding of 16 at 240, the record at 0
        let batch = rx.read();
        assert_eq!(
            batch.as_bytes().len(),
            32,
            "the record at 224 and the padding"
        );
        let recs: Vec<_> = batch.records().map(Result::unwrap).collect();
        assert_eq!(recs.len(), 1, "padding handed out: {recs:?}");
        assert_eq!((recs[0].kind(), recs[0].payload()), (2, &[14u8; 8][..]));
        batch.release();
        let rest = drain(rx);
        assert_eq!(rest.len(), 1);
        assert_eq!((rest[0].1, rest[0].2.as_slice()), (3, &[15u8; 16][..]));
    }

    #[test]
    fn a_tail_that_cuts_a_header_is_reported_as_truncated() {
        let (mut tx, mut rx, file) = shared_ends(256);
        tx.push(1, &[1; 8]).unwrap();
        tx.push(2, &[2; 8]).unwrap();
        // A scribbled tail 4 bytes into a third header.
        let tail = 2 * record_span(8) as u64 + 4;
        file.write_all_at(&tail.to_le_bytes(), TAIL_OFFSET as u64)
            .unwrap();
        let batch = rx.read();
        assert_eq!(batch.as_bytes().len(), tail as usize);
        let items: Vec<_> = batch.records().collect();
        assert_eq!(items.len(), 3);
        assert_eq!(items[0].as_ref().unwrap().payload(), &[1; 8]);
        assert_eq!(items[1].as_ref().unwrap().payload(), &[2; 8]);
        let err = items[2].clone().unwrap_err();
        assert_eq!(err.what, "truncated record header");
        assert_eq!(err.position, 2 * record_span(8) as u64);
        // Shorter than one header: the error alone.
        drop(batch);
        let batch = rx.read_from(2 * record_span(8) as u64);
        let items: Vec<_> = batch.records().collect();
        assert_eq!(items.len(), 1);
        assert!(items[0].is_err());
    }

    #[test]
    fn process_liveness() {
        assert!(process_alive(u64::from(std::process::id())));
        assert!(!process_alive(0));
        assert!(!process_alive(u64::MAX));
        // A child that exited but is not reaped yet (a zombie) counts as dead.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = u64::from(child.id());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while process_alive(pid) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(!process_alive(pid), "exited child {pid} still looks alive");
        child.wait().unwrap();
        assert!(!process_alive(pid));
    }
}
