//! The global allocator: a first-fit linked-list heap over the free memory between the loaded
//! image and the stack (DEVICES.md memory map). Single-threaded, so the spin lock never spins.

/// The global allocator of the guest.
#[cfg(not(test))]
#[global_allocator]
static HEAP: linked_list_allocator::LockedHeap = linked_list_allocator::LockedHeap::empty();

/// Hands `[start, end)` to the global allocator.
///
/// # Safety
/// The range must be unused, writable RAM, and this must be called once, before any allocation.
pub unsafe fn init(start: usize, end: usize) {
    #[cfg(not(test))]
    // SAFETY: guaranteed by the caller.
    unsafe {
        HEAP.lock().init(start as *mut u8, end - start)
    };
    #[cfg(test)]
    let _ = (start, end);
}

/// `(used, free)` bytes of the heap.
pub fn usage() -> (usize, usize) {
    #[cfg(not(test))]
    {
        let heap = HEAP.lock();
        (heap.used(), heap.free())
    }
    #[cfg(test)]
    (0, 0)
}
