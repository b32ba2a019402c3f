//! `ftvm-testkit`: what the tests (and the benchmarks) of ftvm share, and production code
//! never depends on (only `[dev-dependencies]` and the bench name it).
//!
//! - Hand-assembled test programs (x86-64 machine code, [`Asm`]) for tests and benchmarks that
//!   must not depend on the guest build. Every program starts with `movabs rax, 0xD000_0000`
//!   (the MMIO base) and addresses the system device relative to RAX.
//! - Guards that skip when KVM or a program is missing (through [`skip`], the one
//!   `SKIP <test>: <reason>` line that `scripts/test.sh` counts; [`require_kvm!`]).
//! - Loopback ports ([`loopback_ports`]), scheduler accounting ([`thread_schedstat`]), one test
//!   at a time ([`one_at_a_time`]), wrappers that count arbiter claims ([`CountingArbiter`]) or
//!   withhold acks ([`StallAcks`]).
//! - [`link`]: the logging link of an in-process pair (sender and receiver over TCP loopback).
//! - [`kv`]: the `kv` guest in a network namespace, and the settings of in-process pairs.
//! - [`experiment`]: the throttle experiment (the throttle scenario tests and benchmark).
//!
//! Where things stayed in production crates, and why: [`netns`] (network namespaces, TAPs) is
//! `ftvm-channel`'s, because `ftvm demo` and the AF_XDP transport use it; [`skip`] stays beside
//! it (netns's `require_root!` prints through it); `ftvm::scenario` (a pair of `ftvm` processes
//! in a namespace) is what `ftvm demo` and `ftvm soak` run.
#![deny(missing_docs)]

pub mod experiment;
pub mod kv;
pub mod link;

pub use ftvm_channel::netns;
pub use ftvm_channel::skip;

use std::time::Duration;

use ftvm_vmm_core::devices::sys::{REG_CONSOLE_ADDR, REG_CONSOLE_LEN, REG_POWER_OFF};
use ftvm_vmm_core::memory::MMIO_BASE;

/// x86-64 register numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Reg {
    /// rax
    Rax = 0,
    /// rcx
    Rcx = 1,
    /// rdx
    Rdx = 2,
    /// rbx
    Rbx = 3,
}

/// A tiny assembler: appends encoded instructions.
#[derive(Debug, Default, Clone)]
pub struct Asm {
    /// The code so far.
    pub code: Vec<u8>,
}

impl Asm {
    /// A program that starts with RAX = MMIO base.
    pub fn new() -> Self {
        let mut a = Asm::default();
        a.code.extend_from_slice(&[0x48, 0xB8]);
        a.code.extend_from_slice(&MMIO_BASE.to_le_bytes());
        a
    }
    /// `mov reg, [rax + off]` (a 64-bit MMIO read).
    pub fn load(mut self, reg: Reg, off: u8) -> Self {
        self.code
            .extend_from_slice(&[0x48, 0x8B, 0x40 | ((reg as u8) << 3), off]);
        self
    }
    /// `mov [rax + off], reg` (a 64-bit MMIO write).
    pub fn store(mut self, reg: Reg, off: u8) -> Self {
        self.code
            .extend_from_slice(&[0x48, 0x89, 0x40 | ((reg as u8) << 3), off]);
        self
    }
    /// `mov qword [rax + off], imm32` (sign-extended).
    pub fn store_imm(mut self, off: u8, imm: u32) -> Self {
        self.code.extend_from_slice(&[0x48, 0xC7, 0x40, off]);
        self.code.extend_from_slice(&imm.to_le_bytes());
        self
    }
    /// `mov reg32, imm32` (zero-extended).
    pub fn mov_imm(mut self, reg: Reg, imm: u32) -> Self {
        self.code.push(0xB8 + reg as u8);
        self.code.extend_from_slice(&imm.to_le_bytes());
        self
    }
    /// `xor rbx, rcx`.
    pub fn xor_rbx_rcx(mut self) -> Self {
        self.code.extend_from_slice(&[0x48, 0x31, 0xCB]);
        self
    }
    /// `mov [rdx], rbx`.
    pub fn store_rbx_at_rdx(mut self) -> Self {
        self.code.extend_from_slice(&[0x48, 0x89, 0x1A]);
        self
    }
    /// Repeats `body` RCX = `n` times (`mov ecx, n; L: body; dec ecx; jnz L`).
    pub fn repeat(mut self, n: u32, body: impl FnOnce(Asm) -> Asm) -> Self {
        self = self.mov_imm(Reg::Rcx, n);
        let start = self.code.len();
        let inner = body(Asm::default());
        self.code.extend_from_slice(&inner.code);
        self.code.extend_from_slice(&[0xFF, 0xC9]);
        self.jump_back(0x75, start)
    }
    /// Prints `len` bytes at `addr` (two exits).
    pub fn print(self, addr: u32, len: u32) -> Self {
        self.mov_imm(Reg::Rdx, addr)
            .store(Reg::Rdx, REG_CONSOLE_ADDR as u8)
            .store_imm(REG_CONSOLE_LEN as u8, len)
    }
    /// Powers off with exit code `code`.
    pub fn power_off(self, code: u32) -> Self {
        self.store_imm(REG_POWER_OFF as u8, code)
    }
    /// Powers off with RBX as the exit code.
    pub fn power_off_rbx(self) -> Self {
        self.store(Reg::Rbx, REG_POWER_OFF as u8)
    }
    /// A memory dirtier with a known write pattern: `rounds` times, writes the round number
    /// (1, 2, ...) into the first 8 bytes of each of `pages` 4 KiB pages from `base`, then makes
    /// one exit (a DEBUG write of the round number); after the last round powers off with exit
    /// code `rounds`. Deterministic: its exits, registers and memory at power-off depend on
    /// nothing else. Clobbers RBX, RCX, RDX.
    pub fn dirty_pages(mut self, base: u32, pages: u32, rounds: u32) -> Self {
        use ftvm_vmm_core::devices::sys::REG_DEBUG;
        self.code.extend_from_slice(&[0x31, 0xDB]); // xor ebx, ebx
        let outer = self.code.len();
        self = self.mov_imm(Reg::Rdx, base).mov_imm(Reg::Rcx, pages);
        let inner = self.code.len();
        self.code.extend_from_slice(&[0x48, 0x89, 0x1A]); // mov [rdx], rbx
        self.code
            .extend_from_slice(&[0x48, 0x81, 0xC2, 0x00, 0x10, 0x00, 0x00]); // add rdx, 4096
        self.code.extend_from_slice(&[0xFF, 0xC9]); // dec ecx
        self = self.jump_back(0x75, inner); // jnz inner
        self.code.extend_from_slice(&[0x48, 0xFF, 0xC3]); // inc rbx
        self = self.store(Reg::Rbx, REG_DEBUG as u8);
        self.code.extend_from_slice(&[0x48, 0x81, 0xFB]); // cmp rbx, imm32
        self.code.extend_from_slice(&rounds.to_le_bytes());
        self = self.jump_back(0x75, outer); // jne outer
        self.power_off_rbx()
    }
    /// A conditional jump (`cc`: the short opcode, 0x75 = jnz) back to offset `target`.
    fn jump_back(mut self, cc: u8, target: usize) -> Self {
        let rel = target as i64 - (self.code.len() as i64 + 2);
        if let Ok(r) = i8::try_from(rel) {
            self.code.extend_from_slice(&[cc, r as u8]);
        } else {
            self.code.extend_from_slice(&[0x0F, cc + 0x10]);
            self.code
                .extend_from_slice(&((rel - 4) as i32).to_le_bytes());
        }
        self
    }
    /// Raw bytes.
    pub fn raw(mut self, bytes: &[u8]) -> Self {
        self.code.extend_from_slice(bytes);
        self
    }
    /// The program as a loadable ELF.
    pub fn elf(&self) -> Vec<u8> {
        ftvm_vmm_core::loader::flat_elf(&self.code)
    }
}

/// Why a hardware-dependent test cannot run here, if it cannot (`/dev/kvm` missing or not the
/// KVM a VM needs): [`ftvm_vmm_core::kvm::missing`].
pub use ftvm_vmm_core::kvm::missing as kvm_missing;

/// Prints `SKIP <test>: <program> not installed (Debian package <package>)` and returns true
/// when `program` cannot be run (`<program> --version` fails to start).
pub fn skip_without(test: &str, program: &str, package: &str) -> bool {
    skip::if_missing(test, program_missing(program, package))
}

/// Why `program` cannot be used here (`<program> --version` fails to start), if it cannot:
/// `<program> not installed (Debian package <package>)`.
pub fn program_missing(program: &str, package: &str) -> Option<String> {
    let runs = std::process::Command::new(program)
        .arg("--version")
        .output()
        .is_ok();
    (!runs).then(|| format!("{program} not installed (Debian package {package})"))
}

/// The lowest port [`loopback_ports`] hands out.
const TEST_PORT_LOW: u32 = 10_000;

/// The first port of the kernel's ephemeral range (`net.ipv4.ip_local_port_range`), if readable.
fn ephemeral_ports_start() -> Option<u32> {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// `N` distinct loopback ports for a test's sockets and child processes, each free for both TCP
/// and UDP when chosen.
///
/// A port found free by binding port 0 and closing the socket can be handed to another socket
/// (a test running in parallel that binds port 0, or any outgoing connection) before the test
/// binds it again; CI saw `AddrInUse` that way. These ports come from below the kernel's
/// ephemeral range (`net.ipv4.ip_local_port_range`), which the kernel never hands out by
/// itself, and a process-wide counter never hands out the same one twice, so only a program
/// that binds fixed ports could take one. The walk starts at an offset derived from the process
/// id, so that test binaries run one after another (and their child processes, which take
/// ports of their own) start at different places.
///
/// Errors: no free port left below the ephemeral range (or that range starts too low to leave
/// room for the walk).
pub fn loopback_ports<const N: usize>() -> std::io::Result<[u16; N]> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);

    let high = ephemeral_ports_start()
        .unwrap_or(32_768)
        .min(u32::from(u16::MAX));
    let span = high.saturating_sub(TEST_PORT_LOW);
    if span < 1_000 {
        return Err(std::io::Error::other(format!(
            "the ephemeral port range starts at {high}: no room for test ports above {TEST_PORT_LOW}"
        )));
    }
    let seed = std::process::id().wrapping_mul(2_654_435_761) % span;
    let _ = NEXT.compare_exchange(u32::MAX, seed, Ordering::Relaxed, Ordering::Relaxed);
    let free = |port: u16| {
        let at = (std::net::Ipv4Addr::LOCALHOST, port);
        std::net::TcpListener::bind(at).is_ok() && std::net::UdpSocket::bind(at).is_ok()
    };
    let mut ports = [0u16; N];
    for slot in &mut ports {
        let mut tried = 0;
        *slot = loop {
            if tried == span {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    format!("no free loopback port in {TEST_PORT_LOW}..{high}"),
                ));
            }
            tried += 1;
            let port = (TEST_PORT_LOW + NEXT.fetch_add(1, Ordering::Relaxed) % span) as u16;
            if free(port) {
                break port;
            }
        };
    }
    Ok(ports)
}

/// What the scheduler did with a thread so far (`/proc/<tid>/schedstat`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SchedStat {
    /// Time it ran.
    pub cpu: Duration,
    /// Time it was ready to run but waited on a run queue: for other threads, for the
    /// hypervisor, or for its cgroup's quota (a throttled group's threads stay queued).
    pub run_queue_wait: Duration,
}

/// The scheduler's accounting of thread `tid` (of any process). Timing tests use the wait to
/// tell a thread held up by the machine from one that did not want to run (a sleep is not a
/// wait), and so excuse a timing excursion only on evidence.
///
/// # Errors
/// The file is missing (the thread exited) or malformed.
pub fn thread_schedstat(tid: i32) -> std::io::Result<SchedStat> {
    let text = std::fs::read_to_string(format!("/proc/{tid}/schedstat"))?;
    let mut f = text.split_whitespace().map(|v| v.parse::<u64>().ok());
    match (f.next().flatten(), f.next().flatten()) {
        (Some(cpu), Some(wait)) => Ok(SchedStat {
            cpu: Duration::from_nanos(cpu),
            run_queue_wait: Duration::from_nanos(wait),
        }),
        _ => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("bad /proc/{tid}/schedstat: {text:?}"),
        )),
    }
}

/// Holds the tests of one test binary to one at a time (a process-wide lock; cargo runs the
/// test binaries one after another). For tests that bound a wall-clock time or run failure
/// detectors with short timeouts: on a 2-core machine two of them side by side starve each
/// other's heartbeat threads, and a spurious failover looks like a bug. Take it first thing in
/// the test (after its SKIP check); a test that panicked while holding it does not poison it.
pub fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static ONE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    ONE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether the process runs as root (needed for TAP devices and network namespaces).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Prints `SKIP <test>: <reason>` and returns from the test when KVM is missing.
#[macro_export]
macro_rules! require_kvm {
    ($name:expr) => {
        if $crate::skip::if_missing($name, $crate::kvm_missing()) {
            return;
        }
    };
}

/// An arbiter wrapper that counts the claims ([`Arbiter::try_acquire`]) refused because the
/// store was unreachable: the event that proves a side is waiting for the arbiter, for tests
/// that would otherwise sleep and then check that nothing happened.
///
/// [`Arbiter::try_acquire`]: ftvm_ft::arbiter::Arbiter::try_acquire
#[derive(Debug)]
pub struct CountingArbiter<A> {
    inner: A,
    unreachable: std::sync::atomic::AtomicU64,
}

impl<A: ftvm_ft::arbiter::Arbiter> CountingArbiter<A> {
    /// Counts the unreachable claims made through `inner`.
    pub fn new(inner: A) -> Self {
        CountingArbiter {
            inner,
            unreachable: Default::default(),
        }
    }

    /// Claims refused as unreachable so far.
    pub fn unreachable(&self) -> u64 {
        self.unreachable.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Waits until `n` more claims than `since` were refused as unreachable; panics after
    /// `limit` (nobody is trying the arbiter).
    pub fn wait_unreachable(&self, since: u64, n: u64, limit: Duration) {
        let start = std::time::Instant::now();
        while self.unreachable() < since + n {
            assert!(
                start.elapsed() < limit,
                "{} unreachable claims in {limit:?}, expected {n}",
                self.unreachable() - since
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

impl<A: ftvm_ft::arbiter::Arbiter> ftvm_ft::arbiter::Arbiter for CountingArbiter<A> {
    fn try_acquire(
        &self,
        generation: u64,
        who: &ftvm_ft::node::NodeId,
    ) -> Result<ftvm_ft::arbiter::Acquire, ftvm_ft::arbiter::ArbiterError> {
        let r = self.inner.try_acquire(generation, who);
        if matches!(&r, Err(e) if e.is_unreachable()) {
            self.unreachable
                .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        }
        r
    }

    fn current(
        &self,
    ) -> Result<Option<(u64, ftvm_ft::node::NodeId)>, ftvm_ft::arbiter::ArbiterError> {
        self.inner.current()
    }
}

/// A transport wrapper that withholds the frames its side receives while `stall` is set (on a
/// primary: the backup's acks and heartbeats), to test the output rule and stalls. Sends pass.
pub struct StallAcks {
    /// The real transport.
    pub inner: Box<dyn ftvm_channel::Transport>,
    /// While set, nothing is received.
    pub stall: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl std::fmt::Debug for StallAcks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StallAcks")
            .field("inner", &self.inner.name())
            .field("stall", &self.stall)
            .finish()
    }
}

impl StallAcks {
    fn stalled(&self) -> bool {
        self.stall.load(std::sync::atomic::Ordering::Acquire)
    }
}

impl ftvm_channel::Transport for StallAcks {
    fn name(&self) -> &'static str {
        "stall-acks"
    }
    fn max_frame(&self) -> usize {
        self.inner.max_frame()
    }
    fn send(&mut self, frame: &[u8]) -> Result<bool, ftvm_channel::TransportError> {
        self.inner.send(frame)
    }
    fn flush(&mut self) -> Result<(), ftvm_channel::TransportError> {
        self.inner.flush()
    }
    fn poll_recv(
        &mut self,
        on_frame: &mut dyn FnMut(&[u8]),
    ) -> Result<usize, ftvm_channel::TransportError> {
        if self.stalled() {
            return Ok(0);
        }
        self.inner.poll_recv(on_frame)
    }
    fn wait(&mut self, timeout: std::time::Duration) -> Result<(), ftvm_channel::TransportError> {
        if self.stalled() {
            std::thread::sleep(timeout.min(std::time::Duration::from_millis(1)));
            return Ok(());
        }
        self.inner.wait(timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedstat_counts_a_spinning_threads_cpu() {
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        let a = thread_schedstat(tid).expect("schedstat");
        let t = std::time::Instant::now();
        while t.elapsed() < Duration::from_millis(20) {
            std::hint::spin_loop();
        }
        let b = thread_schedstat(tid).expect("schedstat");
        assert!(b.cpu > a.cpu, "{a:?} -> {b:?}");
        assert!(b.run_queue_wait >= a.run_queue_wait, "{a:?} -> {b:?}");
        assert!(thread_schedstat(i32::MAX).is_err());
    }

    #[test]
    fn loopback_ports_are_distinct_bindable_and_below_the_ephemeral_range() {
        let a = loopback_ports::<3>().expect("ports");
        let b = loopback_ports::<3>().expect("ports");
        let all: std::collections::HashSet<u16> = a.iter().chain(&b).copied().collect();
        assert_eq!(all.len(), 6, "{a:?} {b:?}");
        let high = ephemeral_ports_start().expect("the ephemeral port range");
        for p in all {
            assert!((TEST_PORT_LOW..high).contains(&u32::from(p)), "{p}");
            std::net::TcpListener::bind(("127.0.0.1", p)).expect("tcp bind");
            std::net::UdpSocket::bind(("127.0.0.1", p)).expect("udp bind");
        }
    }
}
