//! The single-producer single-consumer ring of variable-length records.
//!
//! Protocol (see `layout.rs` for the bytes):
//! - The producer is the only writer of `tail` and `next_seq`; the consumer the only writer of
//!   `head`. Both are positions that never wrap (u64 byte counts).
//! - `claim` reserves space after `tail` (checking against a cached copy of `head`, re-read with
//!   Acquire only when the cache says the buffer is full); the caller fills the payload in place;
//!   `commit` writes the header (and a padding record if the record wrapped) with plain stores and
//!   then publishes everything with one Release store of `tail`. A claim that is dropped, or
//!   whose process dies, publishes nothing.
//! - The consumer reads `tail` with Acquire (only when its cached copy is exhausted), walks the
//!   records up to it, and gives space back with one Release store of `head`. The producer's
//!   Acquire load of `head` orders the consumer's reads before the producer's next writes.
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
    data: NonNull<u8>,
    capacity: usize,
    mask: usize,
    max_payload: usize,
    #[cfg(loom)]
    ctl: LoomControl,
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
        if !capacity.is_power_of_two()
            || capacity < MIN_CAPACITY
            || region_len < region_len_for(capacity)
        {
            return Err(RingError::BadCapacity { capacity, region_len });
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
            return Err(RingError::BadVersion { found: version, expected: VERSION });
        }
        let dlen = probe.read_u32(DESCRIPTOR_LEN_OFFSET);
        let cap = probe.read_u64(CAPACITY_OFFSET);
        let max = probe.read_u64(MAX_PAYLOAD_OFFSET);
        let sum = probe.read_u64(CHECKSUM_OFFSET);
        if sum != descriptor_checksum(magic, version, dlen, cap, max) {
            return Err(RingError::Corrupt { what: "descriptor checksum mismatch".into() });
        }
        let capacity = usize::try_from(cap).unwrap_or(usize::MAX);
        if dlen as usize != DATA_OFFSET
            || !capacity.is_power_of_two()
            || capacity < MIN_CAPACITY
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
        if head > tail || tail - head > cap || head % RECORD_ALIGN as u64 != 0 {
            return Err(RingError::Corrupt { what: format!("head {head} / tail {tail}") });
        }
        Ok(Arc::new(ring))
    }

    fn from_parts(region: Box<dyn Region>, capacity: usize) -> Self {
        // SAFETY: callers checked region.len() >= DATA_OFFSET + capacity, so the offset is in
        // bounds of the allocation.
        let data = unsafe { NonNull::new_unchecked(region.base().as_ptr().add(DATA_OFFSET)) };
        Self {
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
        }
    }

    /// Data capacity in bytes.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Largest payload a record may have.
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
    fn atomic(&self, offset: usize) -> &AtomicU64 {
        debug_assert!(offset % 8 == 0 && offset + 8 <= DATA_OFFSET);
        // SAFETY: offset is 8-aligned inside the descriptor area of a 128-aligned region that
        // lives as long as self; AtomicU64 has the layout of u64 and every access to these words
        // (from any process) is atomic.
        unsafe { &*self.region.base().as_ptr().add(offset).cast::<AtomicU64>() }
    }

    #[cfg(not(loom))]
    fn tail(&self) -> &AtomicU64 {
        self.atomic(TAIL_OFFSET)
    }
    #[cfg(not(loom))]
    fn head(&self) -> &AtomicU64 {
        self.atomic(HEAD_OFFSET)
    }
    #[cfg(not(loom))]
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
    fn tail(&self) -> &AtomicU64 {
        &self.ctl.tail
    }
    #[cfg(loom)]
    fn head(&self) -> &AtomicU64 {
        &self.ctl.head
    }
    #[cfg(loom)]
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
        unsafe { self.region.base().as_ptr().add(offset).cast::<u64>().read_unaligned() }
    }
    fn read_u32(&self, offset: usize) -> u32 {
        // SAFETY: as read_u64.
        unsafe { self.region.base().as_ptr().add(offset).cast::<u32>().read_unaligned() }
    }
    fn write_u64(&self, offset: usize, v: u64) {
        // SAFETY: descriptor words are written only by `init`, before the ring is shared.
        unsafe { self.region.base().as_ptr().add(offset).cast::<u64>().write_unaligned(v) }
    }
    fn write_u32(&self, offset: usize, v: u32) {
        // SAFETY: as write_u64.
        unsafe { self.region.base().as_ptr().add(offset).cast::<u32>().write_unaligned(v) }
    }

    /// Pointer to data offset `off` (callers keep `off + n <= capacity`).
    #[inline]
    fn data_ptr(&self, off: usize) -> *mut u8 {
        debug_assert!(off <= self.capacity);
        // SAFETY: off <= capacity, inside the data area.
        unsafe { self.data.as_ptr().add(off) }
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
}

fn region_len_for(capacity: usize) -> usize {
    DATA_OFFSET + capacity
}

#[cfg(not(loom))]
fn process_alive(pid: u64) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else { return false };
    // SAFETY: kill with signal 0 only checks for existence and permission.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
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
    let region = HeapRegion::new(region_len_for(capacity.max(MIN_CAPACITY)))?;
    let ring = Ring::init(region, capacity)?;
    Ok((Producer::new(ring.clone())?, Consumer::new(ring)?))
}

/// The writing end. One per buffer (enforced across processes with the pid in the descriptor).
pub struct Producer {
    ring: Arc<Ring>,
    tail: u64,
    cached_head: u64,
    next_seq: u64,
}

impl fmt::Debug for Producer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Producer")
            .field("tail", &self.tail)
            .field("next_seq", &self.next_seq)
            .finish()
    }
}

/// Where a claimed record goes.
#[derive(Debug, Clone, Copy)]
struct Plan {
    /// Data offset of the padding record, if the record wraps.
    pad_at: Option<usize>,
    /// Data offset of the record header.
    at: usize,
    /// Total bytes the claim advances `tail` by.
    advance: usize,
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
        Ok(Self { ring, tail, cached_head, next_seq })
    }

    /// The buffer.
    pub fn ring(&self) -> &Arc<Ring> {
        &self.ring
    }

    /// Sequence number the next commit assigns.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Sets the sequence number of the next record (a receiver mirroring a remote log does this
    /// once so that local and remote numbers agree).
    pub fn set_next_seq(&mut self, seq: u64) {
        self.next_seq = seq;
        self.ring.next_seq().store(seq, Ordering::Release);
    }

    /// Position after the last committed record.
    pub fn position(&self) -> u64 {
        self.tail
    }

    /// Free bytes, re-reading the consumer's position.
    pub fn free(&mut self) -> usize {
        self.cached_head = self.ring.head().load(Ordering::Acquire);
        self.ring.capacity - (self.tail - self.cached_head) as usize
    }

    fn plan(&mut self, kind: u16, len: usize) -> Result<Plan, ClaimError> {
        if kind == KIND_PADDING {
            return Err(ClaimError::ReservedKind(kind));
        }
        if len > self.ring.max_payload {
            return Err(ClaimError::TooLarge { len, max: self.ring.max_payload });
        }
        let span = record_span(len);
        let off = (self.tail as usize) & self.ring.mask;
        let to_end = self.ring.capacity - off;
        let (pad_at, at, advance) =
            if span <= to_end { (None, off, span) } else { (Some(off), 0, to_end + span) };
        let cap = self.ring.capacity as u64;
        if self.tail + advance as u64 - self.cached_head > cap {
            self.cached_head = self.ring.head().load(Ordering::Acquire);
            let used = self.tail - self.cached_head;
            if used + advance as u64 > cap {
                return Err(ClaimError::Full {
                    needed: advance,
                    available: (cap - used) as usize,
                });
            }
        }
        Ok(Plan { pad_at, at, advance })
    }

    /// Claims space for a record of `len` payload bytes of `kind`, to be filled in place.
    ///
    /// # Errors
    /// [`ClaimError::Full`] when the consumer has not released enough space (nothing blocks);
    /// [`ClaimError::TooLarge`] when the record can never fit; [`ClaimError::ReservedKind`].
    #[inline]
    pub fn claim(&mut self, kind: u16, len: usize) -> Result<Claim<'_>, ClaimError> {
        let plan = self.plan(kind, len)?;
        Ok(Claim { producer: self, plan, kind, len })
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
        Ok(Claim { producer: self, plan, kind, len })
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

impl Drop for Producer {
    fn drop(&mut self) {
        let me = u64::from(std::process::id());
        let _ = self.ring.producer_pid().compare_exchange(
            me,
            0,
            Ordering::AcqRel,
            Ordering::Relaxed,
        );
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
        f.debug_struct("Claim").field("kind", &self.kind).field("len", &self.len).finish()
    }
}

impl Claim<'_> {
    /// Publishes the record and returns its sequence number.
    #[inline]
    pub fn commit(self) -> u64 {
        let len = self.len;
        self.commit_len(len)
    }

    /// Publishes the record with only its first `len` payload bytes (`len` ≤ the claimed length;
    /// larger values are clamped). Returns its sequence number.
    pub fn commit_len(self, len: usize) -> u64 {
        let len = len.min(self.len);
        let p = self.producer;
        let ring = &p.ring;
        let mut advance = self.plan.advance - record_span(self.len) + record_span(len);
        if let Some(pad_at) = self.plan.pad_at {
            let pad_len = ring.capacity - pad_at - RECORD_HEADER_LEN;
            write_header(ring.data_ptr(pad_at), pad_len as u32, KIND_PADDING, 0);
        } else {
            advance = record_span(len);
        }
        let seq = p.next_seq;
        write_header(ring.data_ptr(self.plan.at), len as u32, self.kind, seq);
        p.next_seq += 1;
        p.tail += advance as u64;
        ring.next_seq().store(p.next_seq, Ordering::Relaxed);
        ring.tail().store(p.tail, Ordering::Release);
        seq
    }
}

impl std::ops::Deref for Claim<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: the claimed payload lies inside the data area (plan checked it fits before
        // the end) and no one else touches it until commit publishes it.
        unsafe {
            std::slice::from_raw_parts(
                self.producer.ring.data_ptr(self.plan.at + RECORD_HEADER_LEN),
                self.len,
            )
        }
    }
}

impl std::ops::DerefMut for Claim<'_> {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as Deref; the producer is borrowed mutably, so this is the only reference.
        unsafe {
            std::slice::from_raw_parts_mut(
                self.producer.ring.data_ptr(self.plan.at + RECORD_HEADER_LEN),
                self.len,
            )
        }
    }
}

#[inline]
fn write_header(p: *mut u8, len: u32, kind: u16, seq: u64) {
    // SAFETY: p points to RECORD_HEADER_LEN bytes of the data area owned by the producer until
    // the tail store that follows.
    unsafe {
        p.add(REC_LEN_OFFSET).cast::<u32>().write_unaligned(len);
        p.add(REC_KIND_OFFSET).cast::<u16>().write_unaligned(kind);
        p.add(REC_FLAGS_OFFSET).cast::<u16>().write_unaligned(0);
        p.add(REC_SEQ_OFFSET).cast::<u64>().write_unaligned(seq);
    }
}

/// The reading end. One per buffer.
pub struct Consumer {
    ring: Arc<Ring>,
    head: u64,
    cached_tail: u64,
}

impl fmt::Debug for Consumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Consumer").field("head", &self.head).finish()
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
        let cached_tail = ring.tail().load(Ordering::Acquire);
        Ok(Self { ring, head, cached_tail })
    }

    /// The buffer.
    pub fn ring(&self) -> &Arc<Ring> {
        &self.ring
    }

    /// Position of the oldest unreleased byte.
    pub fn position(&self) -> u64 {
        self.head
    }

    /// Position after the last committed record (re-reads the producer's index).
    pub fn committed_position(&mut self) -> u64 {
        self.cached_tail = self.ring.tail().load(Ordering::Acquire);
        self.cached_tail
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
    pub fn read_from(&mut self, position: u64) -> Batch<'_> {
        let position = position.max(self.head);
        if position >= self.cached_tail {
            self.cached_tail = self.ring.tail().load(Ordering::Acquire);
        }
        let tail = self.cached_tail.max(position);
        let off = (position as usize) & self.ring.mask;
        let n = ((tail - position) as usize).min(self.ring.capacity - off);
        Batch { consumer: self, start: position, off, len: n }
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
        let me = u64::from(std::process::id());
        let _ = self.ring.consumer_pid().compare_exchange(
            me,
            0,
            Ordering::AcqRel,
            Ordering::Relaxed,
        );
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
        f.debug_struct("Batch").field("start", &self.start).field("len", &self.len).finish()
    }
}

impl<'a> Batch<'a> {
    /// True when there is nothing to read.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Position of the first byte.
    pub fn start_position(&self) -> u64 {
        self.start
    }

    /// Position after the last byte.
    pub fn end_position(&self) -> u64 {
        self.start + self.len as u64
    }

    /// The raw bytes (record headers included), for zero-copy hand-off.
    pub fn as_bytes(&self) -> &[u8] {
        // SAFETY: [off, off+len) is inside the data area, committed (below the Acquire-loaded
        // tail) and not yet released, so the producer does not write it while this borrow lives.
        unsafe { std::slice::from_raw_parts(self.consumer.ring.data_ptr(self.off), self.len) }
    }

    /// Iterates over the records (padding skipped). A malformed header (possible only if the
    /// shared memory was scribbled on) yields one `Err` and ends the iteration.
    pub fn records(&self) -> Records<'_> {
        Records {
            bytes: self.as_bytes(),
            pos: self.start,
            at: 0,
            max: self.consumer.ring.max_payload,
            failed: false,
        }
    }

    /// Releases the whole batch.
    pub fn release(self) {
        let end = self.end_position();
        self.consumer.release_to(end);
    }
}

/// Iterator over the records of a [`Batch`].
#[derive(Debug)]
pub struct Records<'a> {
    bytes: &'a [u8],
    pos: u64,
    at: usize,
    max: usize,
    failed: bool,
}

impl<'a> Iterator for Records<'a> {
    type Item = Result<Record<'a>, CorruptRecord>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if self.failed || self.at >= self.bytes.len() {
                return None;
            }
            let rest = &self.bytes[self.at..];
            let position = self.pos + self.at as u64;
            if rest.len() < RECORD_HEADER_LEN {
                self.failed = true;
                return Some(Err(CorruptRecord { position, what: "truncated record header" }));
            }
            let len = u32::from_le_bytes(rest[0..4].try_into().unwrap_or_default()) as usize;
            let kind = u16::from_le_bytes(rest[4..6].try_into().unwrap_or_default());
            let flags = u16::from_le_bytes(rest[6..8].try_into().unwrap_or_default());
            let seq = u64::from_le_bytes(rest[8..16].try_into().unwrap_or_default());
            let span = record_span(len);
            if kind != KIND_PADDING && len > self.max {
                self.failed = true;
                return Some(Err(CorruptRecord { position, what: "record length above maximum" }));
            }
            if span > rest.len() {
                self.failed = true;
                return Some(Err(CorruptRecord { position, what: "record runs past the tail" }));
            }
            self.at += span;
            if kind == KIND_PADDING {
                continue;
            }
            return Some(Ok(Record {
                position,
                next_position: self.pos + self.at as u64,
                seq,
                kind,
                flags,
                raw: &rest[..RECORD_HEADER_LEN + len],
            }));
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
    flags: u16,
    raw: &'a [u8],
}

impl<'a> Record<'a> {
    /// Position of the record header.
    pub fn position(&self) -> u64 {
        self.position
    }
    /// Position right after this record (release to here to free it and all before it).
    pub fn next_position(&self) -> u64 {
        self.next_position
    }
    /// Sequence number assigned at commit.
    pub fn seq(&self) -> u64 {
        self.seq
    }
    /// Record kind.
    pub fn kind(&self) -> u16 {
        self.kind
    }
    /// Record flags (0 today).
    pub fn flags(&self) -> u16 {
        self.flags
    }
    /// The payload.
    pub fn payload(&self) -> &'a [u8] {
        &self.raw[RECORD_HEADER_LEN..]
    }
    /// Header and payload, as stored.
    pub fn raw(&self) -> &'a [u8] {
        self.raw
    }
}
