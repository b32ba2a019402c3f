//! `ftvm-vmm-core`: a small KVM virtual machine monitor whose every nondeterministic input
//! passes through one place, so that a backup VM can replay a primary (`DESIGN.md`, "Where
//! nondeterminism is captured").
//!
//! Layout (modelled on Firecracker's `vstate/`):
//! - [`kvm`], [`vm`], [`vcpu`]: the KVM objects; [`vcpu::handle_exit`] is the one exit handler;
//! - [`memory`]: guest RAM and the fixed boot layout; [`loader`]: static ELF guests;
//! - [`bus`] + [`devices`]: the system device and virtio-mmio net/blk/console (DEVICES.md);
//! - [`record`]: the record/replay seams; [`determinism`]: whether a guest replays to the same
//!   state (`ftvm run --check-determinism`); [`state`]: typed, versioned save/restore;
//! - [`dirty`]: dirty-page tracking; [`transfer`]: live state transfer (pre-copy, stop-and-copy,
//!   continuation on another VM at the same exit);
//! - [`guests`]: the embedded guest programs; [`digest`]: digests of a VM's initial state and
//!   registers (pairing, divergence checks).
//!
//! The VMM alone: fault tolerance (the log channel, primary, backup, failover) is the
//! `ftvm-ft` crate, which drives this one through the [`record`] seams; the guest ABI is the
//! `ftvm-abi` crate, shared with the guest programs.
//!
//! # Example
//!
//! ```no_run
//! use ftvm_vmm_core::vm::{Vm, VmConfig, RunOutcome};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let elf = ftvm_vmm_core::guests::by_name("cpu").ok_or("cpu guest not built")?;
//! let config = VmConfig { mem_size: 64 << 20, cmdline: "iters=1000".into(), ..Default::default() };
//! let mut vm = Vm::new(&config, elf)?;
//! match vm.run()? {
//!     RunOutcome::PoweredOff(code) => println!("exit code {code}, {} exits", vm.stats().total()),
//!     other => println!("stopped: {other:?}"),
//! }
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]

pub mod bus;
pub mod determinism;
pub mod devices;
pub mod digest;
pub mod dirty;
pub mod guests;
pub mod kvm;
pub mod loader;
pub mod memory;
pub mod record;
pub mod state;
pub mod transfer;
pub mod vcpu;
pub mod vm;

pub use vm::{RunOutcome, Vm, VmConfig, VmError, VmState, VmThread};

/// `e` and its chain of sources on one line, `: `-separated (for logs, reports and SKIP
/// reasons, where `{e}` alone would drop the cause).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
