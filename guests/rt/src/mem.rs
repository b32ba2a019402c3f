//! `memcpy`, `memmove`, `memset`, `memcmp`, `bcmp`: no libc is linked. The copies use
//! `rep movsb`/`rep stosb` in inline assembly (fast on current CPUs with ERMSB) so that LLVM
//! cannot recognise them as copy loops and compile them into calls to themselves.

use core::arch::asm;

/// Copies `n` bytes from `src` to `dest` (non-overlapping).
///
/// # Safety
/// The C contract: both ranges valid for `n` bytes, not overlapping.
#[no_mangle]
pub unsafe extern "C" fn memcpy(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
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
#[no_mangle]
pub unsafe extern "C" fn memmove(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
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
#[no_mangle]
pub unsafe extern "C" fn memset(dest: *mut u8, c: i32, n: usize) -> *mut u8 {
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
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
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
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract.
    unsafe { memcmp(a, b, n) }
}
