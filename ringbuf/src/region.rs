//! Backing memory for a log buffer: the heap, or a shared mapping of a `memfd` or file that a
//! second process maps too.
//!
//! This is one of the few modules with `unsafe`: it owns raw allocations and mappings and hands
//! out their base pointer. Everything else reaches the memory through [`Region`].

use std::alloc::{self, Layout};
use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::ptr::NonNull;

use crate::error::RegionError;

/// A block of memory that holds a log buffer.
///
/// # Safety
/// `base()` must point to `len()` bytes that stay valid, readable and writable, and 128-byte
/// aligned, for as long as the region lives; the region must not move them.
pub unsafe trait Region: Send + Sync {
    /// Base address of the memory.
    fn base(&self) -> NonNull<u8>;
    /// Length of the memory in bytes.
    fn len(&self) -> usize;
    /// True if `len()` is zero.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

const REGION_ALIGN: usize = 128;

/// A zero-filled, 128-byte-aligned heap allocation.
#[derive(Debug)]
pub struct HeapRegion {
    ptr: NonNull<u8>,
    layout: Layout,
}

// SAFETY: the allocation is owned exclusively by this value; concurrent access is governed by the
// ring's atomics, which is the same contract as sharing `&[AtomicU8]`.
unsafe impl Send for HeapRegion {}
// SAFETY: as above.
unsafe impl Sync for HeapRegion {}

impl HeapRegion {
    /// Allocates `len` zeroed bytes.
    ///
    /// # Errors
    /// [`RegionError::Alloc`] if `len` is zero or the allocation fails.
    pub fn new(len: usize) -> Result<Self, RegionError> {
        let layout =
            Layout::from_size_align(len, REGION_ALIGN).map_err(|_| RegionError::Alloc { len })?;
        if len == 0 {
            return Err(RegionError::Alloc { len });
        }
        // SAFETY: layout has non-zero size (checked above).
        let ptr = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(ptr).ok_or(RegionError::Alloc { len })?;
        Ok(Self { ptr, layout })
    }
}

impl Drop for HeapRegion {
    fn drop(&mut self) {
        // SAFETY: ptr was allocated in `new` with exactly this layout and is freed once.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

// SAFETY: the allocation is `layout.size()` bytes, 128-aligned, and lives until drop.
unsafe impl Region for HeapRegion {
    fn base(&self) -> NonNull<u8> {
        self.ptr
    }
    fn len(&self) -> usize {
        self.layout.size()
    }
}

/// A `MAP_SHARED` mapping of a memfd or a file; another process maps the same memory by
/// inheriting or receiving the fd, or by opening `/proc/<pid>/fd/<n>` or the file path.
#[derive(Debug)]
pub struct SharedRegion {
    ptr: NonNull<u8>,
    len: usize,
    fd: OwnedFd,
}

// SAFETY: the mapping is owned by this value; access is governed by the ring's atomics.
unsafe impl Send for SharedRegion {}
// SAFETY: as above.
unsafe impl Sync for SharedRegion {}

impl SharedRegion {
    /// Creates an anonymous memfd of `len` bytes (zero-filled) and maps it.
    ///
    /// # Errors
    /// [`RegionError::Os`] if `memfd_create`, `ftruncate` or `mmap` fails.
    pub fn memfd(name: &str, len: usize) -> Result<Self, RegionError> {
        let cname = CString::new(name.replace('\0', "_")).unwrap_or_default();
        // SAFETY: cname is a valid NUL-terminated string; flags are valid.
        let raw = unsafe { libc::memfd_create(cname.as_ptr(), 0) };
        if raw < 0 {
            return Err(RegionError::os("memfd_create"));
        }
        // SAFETY: raw is a fresh fd we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let size = libc::off_t::try_from(len).map_err(|_| RegionError::Alloc { len })?;
        // SAFETY: fd is a valid memfd.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), size) } != 0 {
            return Err(RegionError::os("ftruncate"));
        }
        Self::map(fd, len)
    }

    /// Maps an existing fd (a memfd received from another process, or an open file) whole.
    ///
    /// # Errors
    /// [`RegionError::Os`] if `fstat` or `mmap` fails; [`RegionError::Alloc`] if it is empty.
    pub fn from_fd(fd: OwnedFd) -> Result<Self, RegionError> {
        // SAFETY: zeroed stat is a valid out-parameter.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: fd is valid and st is a valid pointer.
        if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
            return Err(RegionError::os("fstat"));
        }
        let len = usize::try_from(st.st_size).unwrap_or(0);
        Self::map(fd, len)
    }

    /// Opens and maps a file (or `/proc/<pid>/fd/<n>` of another process's memfd).
    ///
    /// # Errors
    /// [`RegionError::Open`] if the file cannot be opened read-write; see [`Self::from_fd`].
    pub fn open(path: &Path) -> Result<Self, RegionError> {
        let file = File::options()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|source| RegionError::Open {
                path: path.to_owned(),
                source,
            })?;
        Self::from_fd(OwnedFd::from(file))
    }

    /// Creates (or truncates) a file of `len` zero bytes and maps it.
    ///
    /// # Errors
    /// [`RegionError::Open`] if the file cannot be created; [`RegionError::Os`] on mapping.
    pub fn create_file(path: &Path, len: usize) -> Result<Self, RegionError> {
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(|source| RegionError::Open {
                path: path.to_owned(),
                source,
            })?;
        file.set_len(len as u64)
            .map_err(|source| RegionError::Open {
                path: path.to_owned(),
                source,
            })?;
        Self::map(OwnedFd::from(file), len)
    }

    fn map(fd: OwnedFd, len: usize) -> Result<Self, RegionError> {
        if len == 0 {
            return Err(RegionError::Alloc { len });
        }
        // SAFETY: we request a fresh shared mapping of a valid fd; the kernel picks the address.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(RegionError::os("mmap"));
        }
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or_else(|| RegionError::os("mmap"))?;
        Ok(Self { ptr, len, fd })
    }

    /// The fd behind the mapping, to pass to another process.
    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }
}

impl Drop for SharedRegion {
    fn drop(&mut self) {
        // SAFETY: ptr/len describe the mapping made in `map`, unmapped exactly once.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

// SAFETY: mmap returns page-aligned memory of `len` bytes that lives until munmap in drop.
unsafe impl Region for SharedRegion {
    fn base(&self) -> NonNull<u8> {
        self.ptr
    }
    fn len(&self) -> usize {
        self.len
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heap_region_is_zeroed_aligned_and_rejects_zero() {
        let r = HeapRegion::new(4096).unwrap();
        assert_eq!(r.len(), 4096);
        assert_eq!(r.base().as_ptr() as usize % REGION_ALIGN, 0);
        // SAFETY: the region owns 4096 readable bytes.
        let bytes = unsafe { std::slice::from_raw_parts(r.base().as_ptr(), r.len()) };
        assert!(bytes.iter().all(|b| *b == 0));
        assert!(matches!(
            HeapRegion::new(0),
            Err(RegionError::Alloc { len: 0 })
        ));
        assert!(matches!(
            HeapRegion::new(usize::MAX),
            Err(RegionError::Alloc { .. })
        ));
    }

    #[test]
    fn two_mappings_of_one_memfd_share_memory() {
        let a = SharedRegion::memfd("region-test", 8192).unwrap();
        let b = SharedRegion::from_fd(a.fd().try_clone().unwrap()).unwrap();
        assert_eq!((a.len(), b.len()), (8192, 8192));
        assert_ne!(a.base(), b.base());
        // SAFETY: both mappings are 8192 bytes long; nothing else touches them.
        unsafe {
            a.base().as_ptr().add(100).write(0x5A);
            assert_eq!(b.base().as_ptr().add(100).read(), 0x5A);
        }
        let path = format!("/proc/self/fd/{}", a.fd().as_raw_fd());
        let c = SharedRegion::open(Path::new(&path)).unwrap();
        // SAFETY: as above.
        assert_eq!(unsafe { c.base().as_ptr().add(100).read() }, 0x5A);
    }

    #[test]
    fn file_regions_and_their_errors() {
        let dir = std::env::temp_dir().join(format!("ftvm-region-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("log");
        let a = SharedRegion::create_file(&path, 4096).unwrap();
        let b = SharedRegion::open(&path).unwrap();
        assert_eq!(b.len(), 4096);
        // SAFETY: both map the same 4096-byte file.
        unsafe {
            a.base().as_ptr().write(7);
            assert_eq!(b.base().as_ptr().read(), 7);
        }
        let missing = dir.join("missing");
        assert!(matches!(
            SharedRegion::open(&missing),
            Err(RegionError::Open { .. })
        ));
        let empty = dir.join("empty");
        std::fs::write(&empty, b"").unwrap();
        assert!(matches!(
            SharedRegion::open(&empty),
            Err(RegionError::Alloc { len: 0 })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
