//! [`virtio_drivers::Hal`] for the guests' identity-mapped memory, and the virtio-mmio devices.
//!
//! Guest-physical equals guest-virtual (DEVICES.md), so DMA memory is simply page-aligned heap
//! memory and sharing a buffer needs no bounce copy: the device (the VMM) reads and writes guest
//! memory directly, only during exits.

use alloc::alloc::{alloc_zeroed, dealloc, Layout};
use core::ptr::NonNull;

use virtio_drivers::transport::mmio::{MmioError, MmioTransport, VirtIOHeader};
use virtio_drivers::{BufferDirection, Hal, PhysAddr, PAGE_SIZE};

/// Base of the virtio-net device (the guest ABI, `ftvm-abi`).
pub const VIRTIO_NET_BASE: usize = ftvm_abi::virtio::NET_BASE as usize;
/// Base of the virtio-blk device.
pub const VIRTIO_BLK_BASE: usize = ftvm_abi::virtio::BLK_BASE as usize;
/// Base of the virtio-console device.
pub const VIRTIO_CONSOLE_BASE: usize = ftvm_abi::virtio::CONSOLE_BASE as usize;
/// Size of each device's register window.
pub const VIRTIO_MMIO_SIZE: usize = ftvm_abi::MMIO_SLOT_SIZE as usize;

/// The identity-mapped HAL.
#[derive(Debug)]
pub struct IdentityHal;

fn dma_layout(pages: usize) -> Option<Layout> {
    Layout::from_size_align(pages.checked_mul(PAGE_SIZE)?, PAGE_SIZE).ok()
}

// SAFETY: `dma_alloc` returns zeroed, page-aligned memory that belongs to no one else until
// `dma_dealloc`; physical = virtual addresses; shared buffers are used in place (the device sees
// the same memory), so no copy-back is needed in `unshare`.
unsafe impl Hal for IdentityHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        let Some(layout) = dma_layout(pages).filter(|l| l.size() > 0) else {
            return (0, NonNull::dangling());
        };
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        match NonNull::new(ptr) {
            Some(p) => (p.as_ptr() as PhysAddr, p),
            // paddr 0 makes virtio-drivers report `Error::DmaError`.
            None => (0, NonNull::dangling()),
        }
    }

    unsafe fn dma_dealloc(_paddr: PhysAddr, vaddr: NonNull<u8>, pages: usize) -> i32 {
        let Some(layout) = dma_layout(pages) else {
            return -1;
        };
        // SAFETY: the caller passes what `dma_alloc` returned for the same page count, which
        // allocated with this layout.
        unsafe { dealloc(vaddr.as_ptr(), layout) };
        0
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, _size: usize) -> NonNull<u8> {
        NonNull::new(paddr as usize as *mut u8).unwrap_or(NonNull::dangling())
    }

    unsafe fn share(buffer: NonNull<[u8]>, _direction: BufferDirection) -> PhysAddr {
        buffer.as_ptr().cast::<u8>() as usize as PhysAddr
    }

    unsafe fn unshare(_paddr: PhysAddr, _buffer: NonNull<[u8]>, _direction: BufferDirection) {}
}

/// The virtio-mmio transport of the device at `base`.
///
/// # Safety
/// `base` must be one of the `VIRTIO_*_BASE` addresses (a device window of the identity-mapped
/// MMIO region, valid for the whole run), and at most one transport per device may exist.
///
/// # Errors
/// The transport's error when no valid (or no configured) device is there.
pub unsafe fn mmio_transport(base: usize) -> Result<MmioTransport<'static>, MmioError> {
    let header = NonNull::new(base as *mut VirtIOHeader).ok_or(MmioError::BadMagic(0))?;
    // SAFETY: guaranteed by the caller; the window is VIRTIO_MMIO_SIZE bytes.
    unsafe { MmioTransport::new(header, VIRTIO_MMIO_SIZE) }
}
