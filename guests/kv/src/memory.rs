//! The memory limit (`maxmemory`) and the accounting behind it.
//!
//! `kv` keeps everything in a fixed heap (the guest's RAM between its image and its stack,
//! `ftvm-guest-rt`). An allocation that fails there is fatal: the runtime's allocation-error
//! path panics and the guest powers off with 101 — on the primary *and* on the replaying backup,
//! so fault tolerance does not help. Like Redis with `maxmemory` and the `noeviction` policy,
//! `kv` therefore refuses a write it cannot hold, with
//! `-OOM command not allowed when used memory > 'maxmemory'.`, and keeps serving: reads,
//! deletes and the log go on, and a `DEL` frees room for writes again.
//!
//! ```text
//!  heap (HeapUsage::size)
//!  ├──────────────── maxmemory ───────────────┤── reserve ──────────────────────┤
//!  │ store (keys, values, tree), log buffer,  │ sockets not yet created,       │
//!  │ sockets and buffers in use               │ transient buffers, MIN_FREE     │
//!  ▲ used (HeapUsage::used) must stay below: a write needing `need` bytes is accepted only
//!    while used + need <= maxmemory
//! ```
//!
//! Why it holds:
//! - **The store never eats the reserve.** A write is admitted on the allocator's own count of
//!   the heap in use (`used`, as Redis's `used_memory`) plus an estimate of what the write adds
//!   (key, value, [`ENTRY_OVERHEAD`] for the tree, and its log record). Key and value are
//!   copied with `try_reserve` before anything is logged, so an estimate that is off, or a
//!   fragmented heap, still ends in an `-OOM` reply, never in a panic, and never in a logged
//!   write that was not applied.
//! - **What a client sizes is fallible and bounded.** A connection's request buffer grows with
//!   [`Memory::try_grow`], which also refuses growth that would leave less than [`MIN_FREE`]
//!   bytes of the heap free; a request that cannot be buffered closes that connection (as Redis
//!   closes a client over its query-buffer limit). A reply that carries stored data (`GET`,
//!   `MGET`, `ECHO`) is reserved the same way before it is written; one that does not fit gets
//!   an error reply instead. A connection reads no more requests while its unsent replies
//!   exceed a bound, so replies cannot pile up.
//! - **The reserve covers the rest**: the sockets still to be created (each has fixed smoltcp
//!   buffers, created as connections arrive, up to `conns`), the frames in flight (the virtio-net
//!   driver allocates each transmitted frame), tree nodes, small replies. [`default_maxmemory`]
//!   sizes it from the heap and the socket settings; `maxmemory=` on the command line overrides.
//! - Both sides of an FT pair make the same decisions: the heap is guest memory and the guest is
//!   deterministic, so the primary and the replaying backup refuse the same writes.

use alloc::vec::Vec;

/// Heap bytes that client-sized buffers ([`Memory::try_grow`]) always leave free, for the small
/// allocations that cannot fail gracefully (a transmitted frame, a tree node, a short reply).
pub const MIN_FREE: usize = 512 << 10;

/// Estimated heap bytes of one key beyond its key and value bytes: its share of a B-tree node
/// (a slot of two `Vec` headers, 48 bytes, in nodes that are on average about 3/4 full) and
/// two allocation headers with rounding.
pub const ENTRY_OVERHEAD: usize = 96;

/// The smallest reserve (heap not available to `maxmemory`).
pub const MIN_RESERVE: usize = 1 << 20;

/// The heap as the allocator counts it.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct HeapUsage {
    /// Bytes allocated now.
    pub used: usize,
    /// The most bytes allocated at any time.
    pub peak: usize,
    /// Bytes of the heap in all.
    pub size: usize,
}

/// Reads the heap's usage (in the guest: the runtime's allocator).
pub type Gauge = fn() -> HeapUsage;

/// The heap cannot hold an allocation (or holding it would leave less than [`MIN_FREE`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoMemory;

/// The default `maxmemory` for a heap of `heap` bytes whose guest will create `sockets_to_come`
/// more sockets of `socket_bytes` each: the heap minus a reserve of those sockets plus
/// `max(heap / 16, MIN_RESERVE)`, and never less than a quarter of the heap.
pub fn default_maxmemory(heap: usize, sockets_to_come: usize, socket_bytes: usize) -> usize {
    let reserve = sockets_to_come
        .saturating_mul(socket_bytes)
        .saturating_add((heap / 16).max(MIN_RESERVE));
    heap.saturating_sub(reserve).max(heap / 4)
}

/// The largest `maxmemory` accepted for a heap of `heap` bytes (a larger `maxmemory=` is
/// lowered to it): the heap minus [`MIN_RESERVE`].
pub fn max_maxmemory(heap: usize) -> usize {
    heap.saturating_sub(MIN_RESERVE)
}

/// The limit and where the heap's usage is read.
#[derive(Debug, Clone, Copy)]
pub struct Memory {
    maxmemory: usize,
    gauge: Option<Gauge>,
}

impl Memory {
    /// No limit, no gauge (host tests, and the log's recovery).
    pub const fn unlimited() -> Self {
        Self {
            maxmemory: usize::MAX,
            gauge: None,
        }
    }

    /// A limit of `maxmemory` bytes on the usage `gauge` reads. Without a gauge, the usage is
    /// the store's own estimate of its data set (host tests).
    pub const fn new(maxmemory: usize, gauge: Option<Gauge>) -> Self {
        Self { maxmemory, gauge }
    }

    /// The limit in bytes (`usize::MAX`: none).
    pub fn maxmemory(&self) -> usize {
        self.maxmemory
    }

    /// The heap's usage; `dataset` (the store's estimate) stands in without a gauge.
    pub fn usage(&self, dataset: usize) -> HeapUsage {
        match self.gauge {
            Some(g) => g(),
            None => HeapUsage {
                used: dataset,
                peak: dataset,
                size: usize::MAX,
            },
        }
    }

    /// Whether a write that adds about `need` bytes fits under the limit.
    pub fn admits(&self, dataset: usize, need: usize) -> bool {
        self.usage(dataset).used.saturating_add(need) <= self.maxmemory
    }

    /// Makes room for `extra` more bytes in `buf` (amortised doubling), failing instead of
    /// panicking, and refusing growth that would leave less than [`MIN_FREE`] of the heap free.
    ///
    /// # Errors
    /// [`NoMemory`]: `buf` is unchanged.
    pub fn try_grow(&self, buf: &mut Vec<u8>, extra: usize) -> Result<(), NoMemory> {
        let want = buf.len().checked_add(extra).ok_or(NoMemory)?;
        if want <= buf.capacity() {
            return Ok(());
        }
        let target = want.max(buf.capacity().saturating_mul(2));
        // While it moves, the old block and the new one are both allocated.
        if !self.has_room(target) {
            return Err(NoMemory);
        }
        buf.try_reserve_exact(target - buf.len())
            .map_err(|_| NoMemory)
    }

    /// Whether `bytes` more can be allocated while leaving [`MIN_FREE`] of the heap free
    /// (always, without a gauge).
    pub fn has_room(&self, bytes: usize) -> bool {
        self.gauge.is_none_or(|g| {
            let u = g();
            u.size.saturating_sub(u.used) >= bytes.saturating_add(MIN_FREE)
        })
    }
}

/// A copy of `bytes`, or [`NoMemory`] when the heap cannot hold it.
///
/// # Errors
/// [`NoMemory`].
pub fn try_copy(bytes: &[u8]) -> Result<Vec<u8>, NoMemory> {
    let mut v = Vec::new();
    v.try_reserve_exact(bytes.len()).map_err(|_| NoMemory)?;
    v.extend_from_slice(bytes);
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1 << 20;

    #[test]
    fn default_limit_leaves_a_reserve() {
        // 64 MiB guest, 192 sockets still to come of 24 KiB.
        let heap = 62 * MIB;
        let m = default_maxmemory(heap, 192, 24 << 10);
        assert_eq!(m, heap - 192 * (24 << 10) - heap / 16);
        // A tiny heap keeps a quarter whatever the sockets would need.
        assert_eq!(default_maxmemory(4 * MIB, 4096, 1 << 20), MIB);
        assert_eq!(max_maxmemory(4 * MIB), 3 * MIB);
        assert_eq!(max_maxmemory(MIB / 2), 0);
    }

    #[test]
    fn admission_counts_usage_plus_need() {
        let m = Memory::new(1000, None);
        assert!(m.admits(900, 100));
        assert!(!m.admits(900, 101));
        assert!(Memory::unlimited().admits(usize::MAX - 1, 1));
        fn gauge() -> HeapUsage {
            HeapUsage {
                used: 500,
                peak: 700,
                size: 2000,
            }
        }
        let g = Memory::new(1000, Some(gauge));
        assert!(g.admits(0, 500), "the gauge, not the data set, counts");
        assert!(!g.admits(0, 501));
        assert_eq!(g.usage(123).peak, 700);
    }

    #[test]
    fn try_grow_keeps_min_free_and_leaves_the_buffer_on_failure() {
        fn small_heap() -> HeapUsage {
            HeapUsage {
                used: 0,
                peak: 0,
                size: MIN_FREE + 4096,
            }
        }
        let m = Memory::new(usize::MAX, Some(small_heap));
        let mut buf = Vec::new();
        m.try_grow(&mut buf, 4096).expect("fits above MIN_FREE");
        assert!(buf.capacity() >= 4096);
        buf.extend_from_slice(&[1; 4096]);
        assert_eq!(m.try_grow(&mut buf, 1), Err(NoMemory));
        assert_eq!(buf.len(), 4096);
        assert_eq!(
            Memory::unlimited().try_grow(&mut buf, usize::MAX),
            Err(NoMemory),
            "an impossible size is refused, not a panic"
        );
        assert_eq!(try_copy(b"abc"), Ok(b"abc".to_vec()));
    }
}
