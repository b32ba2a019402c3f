//! The heap: a first-fit linked-list allocator over the free memory between the loaded image and
//! the stack (DEVICES.md memory map). Single-threaded, so its spin lock never spins. The guest
//! binary registers [`GuestAllocator`] as its `#[global_allocator]` (done by
//! [`entry!`](crate::entry)).
//!
//! A failed allocation returns null; the infallible collections of `alloc` then panic (the
//! guest powers off with 101), while `try_reserve` and friends report it to the caller. A guest
//! that must outlive a full heap (`kv`) allocates what its clients size fallibly and reads
//! [`usage`] and [`peak`] to keep a reserve.

use core::alloc::{GlobalAlloc, Layout};
use core::ptr::{self, NonNull};
use core::sync::atomic::{AtomicUsize, Ordering};

use linked_list_allocator::LockedHeap;

static HEAP: LockedHeap = LockedHeap::empty();
/// The most bytes allocated at once so far.
static PEAK: AtomicUsize = AtomicUsize::new(0);

/// Hands `[start, end)` to the heap.
///
/// # Safety
/// The range must be unused, writable RAM, and this must be called once, before any allocation.
pub unsafe fn init(start: usize, end: usize) {
    // SAFETY: guaranteed by the caller.
    unsafe { HEAP.lock().init(start as *mut u8, end - start) };
}

/// `(used, free)` bytes of the heap.
pub fn usage() -> (usize, usize) {
    let heap = HEAP.lock();
    (heap.used(), heap.free())
}

/// The most bytes the heap has had allocated at once.
pub fn peak() -> usize {
    PEAK.load(Ordering::Relaxed)
}

/// The global allocator of a guest, backed by the heap.
#[derive(Debug)]
pub struct GuestAllocator;

// SAFETY: forwards to linked_list_allocator's heap, which returns blocks that fit the layout
// and never overlap a live block.
unsafe impl GlobalAlloc for GuestAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let mut heap = HEAP.lock();
        let p = heap
            .allocate_first_fit(layout)
            .map_or(ptr::null_mut(), NonNull::as_ptr);
        PEAK.fetch_max(heap.used(), Ordering::Relaxed);
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if let Some(p) = NonNull::new(ptr) {
            // SAFETY: the caller passes a block allocated by `alloc` with this layout.
            unsafe { HEAP.lock().deallocate(p, layout) };
        }
    }
}
