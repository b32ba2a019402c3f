//! Hand-assembled test programs (x86-64 machine code) for tests and benchmarks that must not
//! depend on the guest build, plus guards that skip when KVM is missing.
//!
//! Every program starts with `movabs rax, 0xD000_0000` (the MMIO base) and addresses the
//! system device relative to RAX.

use crate::devices::sys::{REG_CONSOLE_ADDR, REG_CONSOLE_LEN, REG_POWER_OFF};
use crate::memory::MMIO_BASE;

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
        let rel = start as i64 - (self.code.len() as i64 + 2);
        if let Ok(r) = i8::try_from(rel) {
            self.code.extend_from_slice(&[0x75, r as u8]);
        } else {
            self.code.extend_from_slice(&[0x0F, 0x85]);
            self.code
                .extend_from_slice(&((rel - 4) as i32).to_le_bytes());
        }
        self
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
    /// Raw bytes.
    pub fn raw(mut self, bytes: &[u8]) -> Self {
        self.code.extend_from_slice(bytes);
        self
    }
    /// The program as a loadable ELF.
    pub fn elf(&self) -> Vec<u8> {
        crate::loader::flat_elf(&self.code)
    }
}

/// Why a hardware-dependent test cannot run here, if it cannot.
pub fn kvm_missing() -> Option<String> {
    match kvm_ioctls::Kvm::new() {
        Ok(_) => None,
        Err(e) => Some(format!("/dev/kvm not usable: {e}")),
    }
}

/// Prints `SKIP <test>: <program> not installed (Debian package <package>)` and returns true
/// when `program` cannot be run (`<program> --version` fails to start).
pub fn skip_without(test: &str, program: &str, package: &str) -> bool {
    if std::process::Command::new(program)
        .arg("--version")
        .output()
        .is_ok()
    {
        return false;
    }
    eprintln!("SKIP {test}: {program} not installed (Debian package {package})");
    true
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
        if let Some(reason) = $crate::testing::kvm_missing() {
            eprintln!("SKIP {}: {}", $name, reason);
            return;
        }
    };
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
