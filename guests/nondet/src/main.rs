//! `nondet`: a test guest with an input nobody can log.
//!
//! It executes one instruction whose result comes from the host CPU, not from a device — RDRAND
//! (`insn=rdrand`, the default) or RDTSC (`insn=rdtsc`) — **once**, then prints that value every
//! `period_ms` milliseconds (`nondet: rdrand=<16 hex digits>`), `count` times (0: forever), and
//! powers off with 0. A primary and a replaying backup each get their own value, so the line the
//! backup would print differs from the one clients saw: exactly what output-verified replay must
//! catch (`ft/LOG_FORMAT.md`, "Output digests"). It ignores CPUID on purpose (a real guest
//! that looks first would not use RDRAND: the VMM hides it). Where the host traps the instruction
//! (RDRAND with VMX RDRAND exiting, RDTSC with CR4.TSD enforced) the guest faults instead, and the
//! VMM stops it with a register dump.
//!
//! Command line: `insn=rdrand|rdtsc`, `period_ms=<n>` (default 100), `count=<n>` (default 0).
#![no_std]
#![no_main]

use ftvm_guest_rt::{entry, println, sys, BootInfo};

entry!(main);

/// Exit code for a bad command line.
const EXIT_USAGE: u64 = 2;
/// Exit code when RDRAND reports no random value after many tries.
const EXIT_NO_VALUE: u64 = 5;

fn main(boot: &BootInfo) -> u64 {
    let cmd = boot.cmdline;
    let insn = cmd.get("insn").unwrap_or("rdrand");
    let (period_ms, count) = match (
        cmd.parse_or("period_ms", 100u64),
        cmd.parse_or("count", 0u64),
    ) {
        (Ok(p), Ok(c)) => (p, c),
        (Err(e), _) | (_, Err(e)) => {
            println!("nondet: {e}");
            return EXIT_USAGE;
        }
    };
    let value = match insn {
        "rdrand" => match rdrand() {
            Some(v) => v,
            None => {
                println!("nondet: rdrand gave no value");
                return EXIT_NO_VALUE;
            }
        },
        "rdtsc" => rdtsc(),
        other => {
            println!("nondet: insn={other}: want rdrand or rdtsc");
            return EXIT_USAGE;
        }
    };
    let mut printed = 0u64;
    loop {
        println!("nondet: {insn}={value:016x}");
        printed += 1;
        if count != 0 && printed >= count {
            return 0;
        }
        let deadline = sys::clock_ns().saturating_add(period_ms.saturating_mul(1_000_000));
        while sys::clock_ns() < deadline {
            sys::wait_until(Some(deadline));
        }
    }
}

/// RDRAND, retried while the CPU reports no value (CF clear).
fn rdrand() -> Option<u64> {
    for _ in 0..100 {
        let value: u64;
        let ok: u8;
        // SAFETY: RDRAND writes only the named output register and the flags; no memory is
        // touched. Where the CPU does not have it or the host traps it, the guest faults and the
        // VMM stops it (that is a result of the test, not undefined behaviour of this program).
        unsafe {
            core::arch::asm!(
                "rdrand {v}",
                "setc {ok}",
                v = out(reg) value,
                ok = out(reg_byte) ok,
                options(nomem, nostack),
            );
        }
        if ok != 0 {
            return Some(value);
        }
    }
    None
}

/// RDTSC (EDX:EAX).
fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: RDTSC writes only EAX and EDX; no memory is touched. With CR4.TSD enforced it faults
    // at CPL3 and the VMM stops the guest.
    unsafe {
        core::arch::asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack));
    }
    u64::from(hi) << 32 | u64::from(lo)
}
