//! `memcpy`, `memmove`, `memset`, `memcmp`, `bcmp`: no libc is linked. The copies use
//! `rep movsb`/`rep stosb` in inline assembly (fast on current CPUs with ERMSB) so that LLVM
//! cannot recognise them as copy loops and compile them into calls to themselves.
//!
//! The unmangled C symbols are emitted by [`entry!`](crate::entry) in the guest binary and
//! forward here.

use core::arch::asm;

/// Copies `n` bytes from `src` to `dest` (non-overlapping).
///
/// # Safety
/// The C contract: both ranges valid for `n` bytes, not overlapping.
#[inline(always)]
pub unsafe fn memcpy(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees both ranges; DF is clear per the SysV ABI.
    unsafe {
        asm!(
            "rep movsb",
            inout("rcx") n => _,
            inout("rdi") dest => _,
            inout("rsi") src => _,
            options(nostack, preserves_flags)
        );
    }
    dest
}

/// Copies `n` bytes from `src` to `dest`; the ranges may overlap.
///
/// # Safety
/// The C contract: both ranges valid for `n` bytes.
#[inline(always)]
pub unsafe fn memmove(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dest as usize).wrapping_sub(src as usize) >= n {
        // dest is before src, or past its end: a forward copy never reads what it wrote.
        // SAFETY: as above.
        return unsafe { memcpy(dest, src, n) };
    }
    // Overlapping with dest after src: copy backwards.
    // SAFETY: the caller guarantees both ranges; n > 0 here, so the last-byte pointers are in
    // range; DF is restored to clear before the block ends, as the ABI requires.
    unsafe {
        asm!(
            "std",
            "rep movsb",
            "cld",
            inout("rcx") n => _,
            inout("rdi") dest.add(n - 1) => _,
            inout("rsi") src.add(n - 1) => _,
            options(nostack)
        );
    }
    dest
}

/// Sets `n` bytes at `dest` to `c as u8`.
///
/// # Safety
/// The C contract: the range is valid for `n` bytes.
#[inline(always)]
pub unsafe fn memset(dest: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees the range; DF is clear per the SysV ABI.
    unsafe {
        asm!(
            "rep stosb",
            inout("rcx") n => _,
            inout("rdi") dest => _,
            in("al") c as u8,
            options(nostack, preserves_flags)
        );
    }
    dest
}

/// Compares `n` bytes.
///
/// # Safety
/// The C contract: both ranges valid for `n` bytes.
#[inline(always)]
pub unsafe fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        // SAFETY: i < n and the caller guarantees both ranges.
        let (x, y) = unsafe { (*a.add(i), *b.add(i)) };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
        i += 1;
    }
    0
}

/// Compares `n` bytes for equality (0 = equal).
///
/// # Safety
/// The C contract: both ranges valid for `n` bytes.
#[inline(always)]
pub unsafe fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract.
    unsafe { memcmp(a, b, n) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_sets_and_compares() {
        let src: Vec<u8> = (0..100).collect();
        let mut dst = vec![0u8; 100];
        // SAFETY: both buffers hold 100 bytes and do not overlap.
        unsafe { memcpy(dst.as_mut_ptr(), src.as_ptr(), 100) };
        assert_eq!(dst, src);
        // SAFETY: 50 bytes inside `dst`.
        unsafe { memset(dst.as_mut_ptr().add(10), 0xAB, 50) };
        assert!(dst[10..60].iter().all(|&b| b == 0xAB));
        assert_eq!(dst[60], 60);
        // SAFETY: both hold 100 bytes.
        let (lt, eq) = unsafe {
            (
                memcmp(dst.as_ptr(), src.as_ptr(), 100),
                bcmp(src.as_ptr(), src.as_ptr(), 100),
            )
        };
        assert!(lt > 0, "0xAB > 10 at the first difference");
        assert_eq!(eq, 0);
    }

    #[test]
    fn memmove_handles_both_overlaps() {
        let mut buf: Vec<u8> = (0..64).collect();
        let p = buf.as_mut_ptr();
        // SAFETY: ranges [0, 40) and [8, 48) inside the 64-byte buffer.
        unsafe { memmove(p.add(8), p, 40) };
        assert_eq!(&buf[8..48], &(0..40).collect::<Vec<u8>>()[..]);
        let mut buf: Vec<u8> = (0..64).collect();
        let p = buf.as_mut_ptr();
        // SAFETY: ranges [8, 48) and [0, 40) inside the buffer.
        unsafe { memmove(p, p.add(8), 40) };
        assert_eq!(&buf[..40], &(8..48).collect::<Vec<u8>>()[..]);
        // SAFETY: a zero-length move touches nothing.
        unsafe { memmove(p.add(1), p, 0) };
    }
}
