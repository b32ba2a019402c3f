//! Dirty-page tracking of guest memory while the guest runs: the pages written since the last
//! look, by the vCPU (KVM's dirty log) **and** by the VMM's own device threads (vm-memory's
//! bitmap), for the pre-copy rounds of a live state transfer ([`crate::transfer`]).
//!
//! ```text
//!   vCPU stores ──(KVM write-protects the slot; the fault marks the page)──> KVM dirty bitmap ─┐
//!   VMM stores (device writes: RX frames, disk read data, used rings;                           ├─ take() ─> DirtySet
//!    every vm-memory write on GuestMem) ──> vm-memory AtomicBitmap (one bit per 4 KiB page) ───┘  (union, cleared)
//! ```
//!
//! # Why both, and why these two mechanisms
//! KVM sees only what the guest writes through its page tables. The VMM writes guest memory
//! itself — virtio-net copies received frames into RX buffers, virtio-blk copies disk read data,
//! every device writes used-ring entries and `used.idx` — from the host side of the mapping,
//! where KVM's write protection never fires. Those writes all go through `vm-memory`
//! ([`GuestMem`] is a `GuestMemoryMmap<AtomicBitmap>`: the workspace's `backend-bitmap`
//! feature), whose `VolatileSlice` marks the bitmap **after** each copy or store, so every
//! device write path is covered without code in the devices (`virtio-queue`'s used-ring
//! stores included), and a page copied while a device writes it is marked again and sent in
//! the next round. The bitmap is always on: one `fetch_or` per page written by the VMM, next
//! to a copy of that page's bytes (a ~27 µs exit around it); [`DirtyLog::start`] clears it.
//!
//! For the vCPU, KVM offers the **dirty log bitmap** (`KVM_MEM_LOG_DIRTY_PAGES` on the memory
//! slot, harvested with `KVM_GET_DIRTY_LOG`, which returns and clears the bitmap and
//! write-protects the pages again) and the **dirty ring** (`KVM_CAP_DIRTY_LOG_RING`: one ring of
//! dirtied guest frame numbers per vCPU, mmap'd from the vCPU fd, harvested in user space,
//! reset with `KVM_RESET_DIRTY_RINGS`). Both are reported on this PVM host. We use the bitmap:
//! - the ring must be enabled before the vCPU exists (for the whole VM lifetime, not just
//!   during a transfer), and a full ring stops the vCPU with `KVM_EXIT_DIRTY_RING_FULL`, an
//!   exit that is not the guest's (the exit index of record/replay must not see it), so the run
//!   loop would have to harvest on the vCPU thread; the bitmap needs nothing from the vCPU
//!   thread and is switched on and off on a live slot;
//! - the ring's advantage is a harvest cost proportional to the pages dirtied rather than to
//!   the memory size, which matters with many vCPUs and hundreds of GiB. With one vCPU and
//!   guests of 64 MiB to 1 GiB the bitmap's harvest should be small next to copying the pages
//!   it names (not measured yet: see below);
//! - `kvm-ioctls` wraps the bitmap (`VmFd::get_dirty_log`) and not the ring, which would need
//!   our own mmap of a kernel ring with acquire/release on its entries' flags.
//!
//! Not measured yet: there is no `dirty` benchmark in `ftvm-bench` and no `results/dirty.json`
//! (these docs named both before they existed); `BENCHMARKS.md`, "Not measured yet".
//!
//! # Use
//! [`DirtyLog`] is a cloneable handle ([`Vm::dirty_log`](crate::vm::Vm::dirty_log)) usable from
//! any thread while the vCPU thread runs the VM: [`DirtyLog::start`], then
//! [`DirtyLog::take`] as often as wanted (each returns the pages written since the previous
//! one, and clears them), then [`DirtyLog::stop`]. Harvest **before** copying the pages a set
//! names: a page written after the harvest is in the next set.

use std::sync::{Arc, Mutex};

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;
use vm_memory::GuestMemoryBackend;

use crate::memory::GuestMem;

/// Size of a page tracked (4 KiB: KVM's and vm-memory's granularity on x86-64).
pub const PAGE_SIZE: u64 = 4096;

/// Errors of dirty tracking.
#[derive(Debug, thiserror::Error)]
pub enum DirtyError {
    /// Turning dirty logging on or off on the memory slot failed.
    #[error("KVM_SET_USER_MEMORY_REGION (dirty logging {})", if *.enable { "on" } else { "off" })]
    SetRegion {
        /// Whether it was being turned on.
        enable: bool,
        /// The cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// `KVM_GET_DIRTY_LOG` failed.
    #[error("KVM_GET_DIRTY_LOG")]
    GetLog(#[source] kvm_ioctls::Error),
    /// [`DirtyLog::take`] was called while tracking is off.
    #[error("dirty tracking is not started")]
    NotStarted,
}

/// A run of consecutive dirty pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRun {
    /// First page number (guest-physical address / [`PAGE_SIZE`]).
    pub first: u64,
    /// Number of pages.
    pub count: u64,
}

impl PageRun {
    /// Guest-physical address of the first page.
    pub fn gpa(&self) -> u64 {
        self.first * PAGE_SIZE
    }
    /// Length in bytes.
    pub fn bytes(&self) -> u64 {
        self.count * PAGE_SIZE
    }
}

/// A set of pages, one bit per page (bit `p % 64` of word `p / 64` is page `p`: KVM's layout).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtySet {
    bits: Vec<u64>,
    pages: u64,
}

impl DirtySet {
    /// No page of a memory of `pages` pages.
    pub fn empty(pages: u64) -> Self {
        DirtySet {
            bits: vec![0; pages.div_ceil(64) as usize],
            pages,
        }
    }

    /// Every page of a memory of `pages` pages (the first pre-copy round).
    pub fn full(pages: u64) -> Self {
        let mut s = Self::empty(pages);
        for p in 0..pages {
            s.insert(p);
        }
        s
    }

    /// A set over `pages` pages from a KVM-layout bitmap (bits past `pages` are ignored).
    pub fn from_bits(mut bits: Vec<u64>, pages: u64) -> Self {
        bits.resize(pages.div_ceil(64) as usize, 0);
        if pages % 64 != 0 {
            if let Some(last) = bits.last_mut() {
                *last &= (1u64 << (pages % 64)) - 1;
            }
        }
        DirtySet { bits, pages }
    }

    /// Pages in the memory this set describes.
    pub fn capacity(&self) -> u64 {
        self.pages
    }

    /// Number of pages in the set.
    pub fn count(&self) -> u64 {
        self.bits.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Whether no page is in the set.
    pub fn is_empty(&self) -> bool {
        self.bits.iter().all(|w| *w == 0)
    }

    /// Whether page `page` is in the set.
    pub fn contains(&self, page: u64) -> bool {
        self.bits
            .get((page / 64) as usize)
            .is_some_and(|w| w & (1 << (page % 64)) != 0)
    }

    /// Adds page `page` (ignored past the end).
    pub fn insert(&mut self, page: u64) {
        if page < self.pages {
            self.bits[(page / 64) as usize] |= 1 << (page % 64);
        }
    }

    /// Adds every page of `other` (a set over the same memory).
    pub fn union(&mut self, other: &DirtySet) {
        for (a, b) in self.bits.iter_mut().zip(&other.bits) {
            *a |= *b;
        }
    }

    /// The pages of the set as runs of consecutive pages, in address order.
    pub fn runs(&self) -> impl Iterator<Item = PageRun> + '_ {
        let mut page = 0u64;
        std::iter::from_fn(move || {
            while page < self.pages {
                let w = self.bits[(page / 64) as usize] >> (page % 64);
                if w == 0 {
                    page = (page / 64 + 1) * 64;
                    continue;
                }
                page += u64::from(w.trailing_zeros());
                let first = page;
                while page < self.pages && self.contains(page) {
                    page += 1;
                }
                return Some(PageRun {
                    first,
                    count: page - first,
                });
            }
            None
        })
    }

    /// The raw bitmap (KVM's layout).
    pub fn bits(&self) -> &[u64] {
        &self.bits
    }
}

/// What one [`DirtyLog::take`] found, by source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Harvest {
    /// Every page written (the union of the two below).
    pub pages: DirtySet,
    /// Pages KVM reported (written by the vCPU).
    pub kvm: u64,
    /// Pages the VMM's bitmap reported (written by devices on the host side).
    pub vmm: u64,
}

#[derive(Debug)]
struct Inner {
    vm_fd: Arc<VmFd>,
    mem: GuestMem,
    region: kvm_userspace_memory_region,
    on: Mutex<bool>,
}

/// The dirty tracker of one VM (see the module documentation). Cheap to clone; it keeps the
/// VM fd and the guest memory mapping alive.
#[derive(Debug, Clone)]
pub struct DirtyLog(Arc<Inner>);

impl DirtyLog {
    /// The tracker of memory slot `region` of `vm_fd`, backed by `mem`.
    pub(crate) fn new(
        vm_fd: Arc<VmFd>,
        mem: GuestMem,
        region: kvm_userspace_memory_region,
    ) -> Self {
        DirtyLog(Arc::new(Inner {
            vm_fd,
            mem,
            region,
            on: Mutex::new(false),
        }))
    }

    /// Pages in guest memory.
    pub fn pages(&self) -> u64 {
        self.0.region.memory_size / PAGE_SIZE
    }

    /// Whether tracking is on.
    pub fn is_started(&self) -> bool {
        *self.0.on.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_logging(&self, enable: bool) -> Result<(), DirtyError> {
        let region = kvm_userspace_memory_region {
            flags: if enable { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
            ..self.0.region
        };
        // SAFETY: the region is the VM's slot 0 as registered at creation, describing the
        // mapping owned by `mem`, which this handle keeps alive as long as the VM fd it holds;
        // only the flags change.
        unsafe { self.0.vm_fd.set_user_memory_region(region) }
            .map_err(|source| DirtyError::SetRegion { enable, source })
    }

    fn vmm_bitmap(&self) -> Vec<u64> {
        let mut bits = Vec::new();
        for r in self.0.mem.iter() {
            bits.extend(vm_memory::mmap::MmapRegion::bitmap(r).get_and_reset());
        }
        bits
    }

    /// Starts tracking: from now on every page written is reported by [`DirtyLog::take`].
    /// Starting again while on clears the set.
    ///
    /// # Errors
    /// [`DirtyError::SetRegion`].
    pub fn start(&self) -> Result<(), DirtyError> {
        let mut on = self.0.on.lock().unwrap_or_else(|e| e.into_inner());
        if *on {
            drop(on);
            self.take()?;
            return Ok(());
        }
        // The VMM's bitmap first: a device write between the two steps is then reported (a
        // page too many is harmless, one too few is not).
        self.vmm_bitmap();
        self.set_logging(true)?;
        *on = true;
        Ok(())
    }

    /// The pages written since [`DirtyLog::start`] or the previous `take`, and clears them.
    ///
    /// # Errors
    /// [`DirtyError::NotStarted`], [`DirtyError::GetLog`].
    pub fn take(&self) -> Result<Harvest, DirtyError> {
        if !self.is_started() {
            return Err(DirtyError::NotStarted);
        }
        let pages = self.pages();
        let kvm = self
            .0
            .vm_fd
            .get_dirty_log(self.0.region.slot, self.0.region.memory_size as usize)
            .map_err(DirtyError::GetLog)?;
        let kvm = DirtySet::from_bits(kvm, pages);
        let vmm = DirtySet::from_bits(self.vmm_bitmap(), pages);
        let (kc, vc) = (kvm.count(), vmm.count());
        let mut all = kvm;
        all.union(&vmm);
        Ok(Harvest {
            pages: all,
            kvm: kc,
            vmm: vc,
        })
    }

    /// Stops tracking (KVM stops write-protecting the guest's pages).
    ///
    /// # Errors
    /// [`DirtyError::SetRegion`].
    pub fn stop(&self) -> Result<(), DirtyError> {
        let mut on = self.0.on.lock().unwrap_or_else(|e| e.into_inner());
        if *on {
            self.set_logging(false)?;
            *on = false;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_count_and_union() {
        let mut s = DirtySet::empty(200);
        for p in [0, 1, 2, 63, 64, 65, 130, 199] {
            s.insert(p);
        }
        s.insert(500); // past the end: ignored
        assert_eq!(s.count(), 8);
        let runs: Vec<(u64, u64)> = s.runs().map(|r| (r.first, r.count)).collect();
        assert_eq!(runs, vec![(0, 3), (63, 3), (130, 1), (199, 1)]);
        let mut t = DirtySet::empty(200);
        t.insert(3);
        t.insert(129);
        s.union(&t);
        let runs: Vec<(u64, u64)> = s.runs().map(|r| (r.first, r.count)).collect();
        assert_eq!(runs, vec![(0, 4), (63, 3), (129, 2), (199, 1)]);
        let full = DirtySet::full(130);
        assert_eq!(
            full.runs().collect::<Vec<_>>(),
            vec![PageRun {
                first: 0,
                count: 130
            }]
        );
        assert_eq!(DirtySet::from_bits(vec![u64::MAX; 3], 130), full);
        assert!(DirtySet::empty(10).is_empty());
        assert_eq!(DirtySet::empty(10).runs().count(), 0);
    }

    /// A device-side write (vm-memory, as every device writes) lands in the VMM bitmap, and
    /// nothing else does.
    #[test]
    fn vmm_writes_mark_the_bitmap() {
        use vm_memory::{Bytes, GuestAddress};
        let mem = crate::memory::allocate(1 << 20).unwrap();
        let bitmap = |m: &GuestMem| {
            let r = m.iter().next().unwrap();
            DirtySet::from_bits(vm_memory::mmap::MmapRegion::bitmap(r).get_and_reset(), 256)
        };
        bitmap(&mem);
        mem.write_slice(&[1; 10], GuestAddress(0x5ffc)).unwrap();
        mem.write_obj(7u16, GuestAddress(0x9000)).unwrap();
        let s = bitmap(&mem);
        assert_eq!(
            s.runs().map(|r| (r.first, r.count)).collect::<Vec<_>>(),
            vec![(5, 2), (9, 1)]
        );
        assert!(bitmap(&mem).is_empty(), "get_and_reset clears");
    }
}
