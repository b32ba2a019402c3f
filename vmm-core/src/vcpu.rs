//! The vCPU: long-mode CPL3 setup, the run loop as a small state machine, and `handle_exit`,
//! the one function every VM exit passes through.
//!
//! ```text
//!             request(Pause)            command(Resume)
//!   Running ─────────────────> Paused ─────────────────> Running
//!      │  POWER_OFF / fault       │ command(Stop)
//!      └──────────────────────> Stopped <┘
//! ```
//! A request is a flag plus a kick: [`VcpuKick::kick`] sets the flag, wakes a blocked WAIT and
//! sends [`kick_signal`] to the vCPU thread, whose handler sets `kvm_run.immediate_exit` so that
//! a `KVM_RUN` entered after the flag check returns at once (no lost wake-up).
//!
//! [`VcpuKick::interrupt_replay`] is the other request: it takes a replaying vCPU out of guest
//! code (the same signal) without pausing it, so that its replay source can decide, between
//! two exits, whether the log ended there
//! ([`ReplaySource::between_exits`](crate::record::ReplaySource::between_exits)). A `KVM_RUN`
//! that returns `EINTR` is never an exit: the exit index counts the guest's exits only, on the
//! primary as on the backup, so an interruption on either side leaves the indices equal.
//!
//! # A replay that runs out pauses the run; its driver decides
//! When the replay source has no entry for the point the vCPU reached (`ReplayError::Exhausted`:
//! the primary's log stopped), the exit handler does not decide what happens next — that
//! decision (wait for the failure detector, ask the arbiter, take the disk and the TAP) can take
//! seconds and belongs to the run's driver (`ft::backup`, `ft::golive`). It only reports where
//! the replay ran out ([`Handled::ReplayExhausted`]) and the run returns
//! [`RunExit::ReplayExhausted`] with the exit left **pending**:
//! ```text
//!   at an external read (CLOCK_NS, ENTROPY, WAIT) ─> PendingExit::Read: KVM still waits for
//!        the read's value; nothing of the failed replayed attempt took effect
//!   at the end of an exit (its logged writes ran out) ─> PendingExit::EndOfExit: the writes
//!        received were applied and checked; queues not yet resynced, exit not yet counted
//!   between two exits (interrupt_replay) ─> nothing pending
//! ```
//! The driver installs the inputs the run continues with (live, after a won take-over) and runs
//! the vCPU again: the pending exit is completed first — the read answered by the device from
//! the new inputs, at the same exit index, or the exit finished — and the guest goes on. No exit
//! is replayed in part and executed again, and nothing is counted twice. While an exit is
//! pending the vCPU state is not saved ([`Vcpu::pending_exit`]): the read has no value yet.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use kvm_bindings::{kvm_msr_entry, kvm_regs, kvm_run, kvm_segment, Msrs, KVM_EXIT_MMIO};
use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::bus::{DeviceError, EventSignal, ExitAction, ExitCtx};
use crate::devices::Devices;
use crate::kvm::KvmContext;
use crate::memory::{
    GuestMem, Layout, BOOT_INFO_ADDR, GDT, GDT_ADDR, GDT_CODE, GDT_DATA, PML4_ADDR,
};
use crate::record::{apply_logged_writes, Inputs, ReplayError};
use crate::state::{Persist, Raw, StateError, VcpuState};

/// CR0 at entry: PE | MP | ET | NE | WP | AM | PG (EM clear).
pub const CR0: u64 = 0x8005_0033;
/// CR4 at entry: TSD | PAE | OSFXSR | OSXMMEXCPT.
pub const CR4: u64 = (1 << 2) | (1 << 5) | (1 << 9) | (1 << 10);
/// EFER at entry: LME | LMA.
pub const EFER: u64 = 0x500;

/// MSRs saved and restored with the vCPU.
pub const SAVED_MSRS: &[u32] = &[
    0x10,        // TSC
    0x174,       // SYSENTER_CS
    0x175,       // SYSENTER_ESP
    0x176,       // SYSENTER_EIP
    0x277,       // PAT
    0xC000_0081, // STAR
    0xC000_0082, // LSTAR
    0xC000_0083, // CSTAR
    0xC000_0084, // SFMASK
    0xC000_0102, // KERNEL_GS_BASE
];

/// Errors of the vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A KVM vCPU ioctl failed.
    #[error("KVM {what}")]
    Kvm {
        /// The ioctl.
        what: &'static str,
        /// The cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The guest faulted, triple-faulted or halted; the VM is stopped.
    #[error("guest stopped by {reason} after {exits} exits\n{regs}")]
    GuestFault {
        /// What happened (`triple fault (KVM_EXIT_SHUTDOWN)`, `HLT`, …).
        reason: String,
        /// Exits handled before it.
        exits: u64,
        /// A register dump.
        regs: String,
    },
    /// The replay source failed between two exits ([`VcpuKick::interrupt_replay`]).
    #[error("replay input before exit {exit}")]
    Replay {
        /// The exit index (exits handled so far).
        exit: u64,
        /// The cause.
        #[source]
        source: ReplayError,
    },
    /// The MMIO read left pending when the replay ran out ([`PendingExit::Read`]) is no longer
    /// the exit `kvm_run` holds: it cannot be answered.
    #[error("the MMIO read of {addr:#x} left pending at exit {exit} is gone from kvm_run")]
    PendingReadLost {
        /// The exit index.
        exit: u64,
        /// The MMIO address of the pending read.
        addr: u64,
    },
    /// A device failed while handling an exit.
    #[error("device error at exit {exit} ({kind:?} at {addr:#x})")]
    Device {
        /// The exit index.
        exit: u64,
        /// The exit kind.
        kind: ExitKind,
        /// The MMIO address.
        addr: u64,
        /// The cause.
        #[source]
        source: DeviceError,
    },
}

/// Exit kinds counted by [`ExitStats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExitKind {
    /// MMIO read of the system device (except WAIT).
    SysRead,
    /// MMIO write to the system device.
    SysWrite,
    /// WAIT read.
    Wait,
    /// MMIO read of a virtio device register.
    VirtioRead,
    /// MMIO write to a virtio register other than QueueNotify.
    VirtioWrite,
    /// virtio QueueNotify.
    VirtioNotify,
    /// Anything else (faults, unexpected exits).
    Other,
}

impl ExitKind {
    /// All kinds, in display order.
    pub const ALL: [ExitKind; 7] = [
        ExitKind::SysRead,
        ExitKind::SysWrite,
        ExitKind::Wait,
        ExitKind::VirtioRead,
        ExitKind::VirtioWrite,
        ExitKind::VirtioNotify,
        ExitKind::Other,
    ];

    /// A short name (`sys_read`, …).
    pub fn name(self) -> &'static str {
        match self {
            ExitKind::SysRead => "sys_read",
            ExitKind::SysWrite => "sys_write",
            ExitKind::Wait => "wait",
            ExitKind::VirtioRead => "virtio_read",
            ExitKind::VirtioWrite => "virtio_write",
            ExitKind::VirtioNotify => "virtio_notify",
            ExitKind::Other => "other",
        }
    }

    fn classify(addr: u64, write: bool) -> ExitKind {
        use crate::memory::MMIO_BASE;
        let off = addr.wrapping_sub(MMIO_BASE);
        match (off / 0x1000, off % 0x1000, write) {
            (0, 0x28, false) => ExitKind::Wait,
            (0, _, false) => ExitKind::SysRead,
            (0, _, true) => ExitKind::SysWrite,
            (1..=3, 0x50, true) => ExitKind::VirtioNotify,
            (1..=3, _, true) => ExitKind::VirtioWrite,
            (1..=3, _, false) => ExitKind::VirtioRead,
            _ => ExitKind::Other,
        }
    }
}

/// Exit counters. `total` is the exit index of record/replay: it counts every exit caused by
/// the guest and nothing else (kicks and signals are counted apart in `interrupts`).
#[derive(Debug, Default)]
pub struct ExitStats {
    /// Exits handled (shared, for progress displays).
    pub total: Arc<AtomicU64>,
    /// Per kind, in [`ExitKind::ALL`] order (shared: the metrics endpoint reads them while the
    /// vCPU runs; one writer, the vCPU thread, so a bump is a load and a store).
    pub by_kind: Arc<[AtomicU64; 7]>,
    /// KVM_RUN returns caused by kicks (EINTR), not by the guest.
    pub interrupts: u64,
}

impl ExitStats {
    /// The exit index (number of guest exits so far).
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }
    /// Count of one kind.
    pub fn count(&self, kind: ExitKind) -> u64 {
        ExitKind::ALL
            .iter()
            .position(|k| *k == kind)
            .map_or(0, |i| self.by_kind[i].load(Ordering::Relaxed))
    }
    fn bump(&mut self, kind: ExitKind) {
        if let Some(i) = ExitKind::ALL.iter().position(|k| *k == kind) {
            let c = &self.by_kind[i];
            c.store(c.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
        }
        self.total.fetch_add(1, Ordering::Relaxed);
    }
}

thread_local! {
    /// The `kvm_run` of the vCPU running on this thread (null when none).
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// The signal used to kick a vCPU thread out of `KVM_RUN`.
pub fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN() + 2
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KVM_RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: KVM_RUN holds the `kvm_run` mapping of the vCPU owned by this thread, set
        // while that vCPU is alive and cleared before it is dropped; a byte store is
        // async-signal-safe.
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
}

fn install_kick_handler() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if let Err(e) = vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler) {
            tracing::warn!(error = %e, "cannot install the vCPU kick signal handler");
        }
    });
}

/// Asks a running vCPU to come back to its controller (pause or stop).
#[derive(Debug, Default)]
pub struct VcpuKick {
    requested: AtomicBool,
    /// [`VcpuKick::request_stop`] was asked (sticky: the run is to end, not just pause).
    stop: AtomicBool,
    /// [`VcpuKick::interrupt_replay`] was asked (sticky while the run replays).
    replay_check: AtomicBool,
    thread: std::sync::Mutex<Option<libc::pthread_t>>,
    signal: Arc<EventSignal>,
    interrupt: Arc<AtomicBool>,
}

impl VcpuKick {
    pub(crate) fn new(signal: Arc<EventSignal>, interrupt: Arc<AtomicBool>) -> Self {
        VcpuKick {
            requested: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            replay_check: AtomicBool::new(false),
            thread: Default::default(),
            signal,
            interrupt,
        }
    }

    /// Requests the vCPU to leave its run loop at the next exit (or at once, if in KVM_RUN or
    /// blocked in WAIT).
    pub fn kick(&self) {
        self.requested.store(true, Ordering::Release);
        self.interrupt.store(true, Ordering::Release);
        self.signal.notify();
        self.signal_thread();
    }

    /// Asks the run to end (a planned stop: the operator's SIGTERM, or a peer that left the
    /// pair as planned): marks the request, which [`VcpuKick::stop_requested`] reports from
    /// then on, and kicks the vCPU ([`VcpuKick::kick`]). Whoever drives the run decides what
    /// stopping means (a primary first waits until its held outputs are released).
    pub fn request_stop(&self) {
        self.stop.store(true, Ordering::Release);
        self.kick();
    }

    /// Whether [`VcpuKick::request_stop`] was asked.
    pub fn stop_requested(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// Whether a kick is waiting to be taken by the run loop: code that blocks inside an exit
    /// (a replay waiting for the log's next entry) gives up its wait when it sees one.
    pub fn kick_pending(&self) -> bool {
        self.requested.load(Ordering::Acquire)
    }

    /// Asks a replaying vCPU to ask its replay source, at the next point between two exits,
    /// whether the log ended there
    /// ([`ReplaySource::between_exits`](crate::record::ReplaySource::between_exits)), and then
    /// at every later one while it replays (the request is sticky: a source may have entries
    /// left at the first point and none at a later one). A vCPU inside guest code leaves
    /// `KVM_RUN` at once (the kick signal); nothing is paused and no exit is counted. No
    /// effect on a live run. A backup's failure detector asks this when the primary is
    /// presumed failed, so that a guest that makes no exit can be taken over too.
    pub fn interrupt_replay(&self) {
        self.replay_check.store(true, Ordering::Release);
        self.signal_thread();
    }

    /// Sends the kick signal to the vCPU thread if it is in its run loop.
    fn signal_thread(&self) {
        let t = *self.thread.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = t {
            // SAFETY: `t` is the pthread of the running vCPU loop, registered by it and cleared
            // before that loop returns, so the thread exists; the signal's handler is installed.
            unsafe { libc::pthread_kill(t, kick_signal()) };
        }
    }

    fn take(&self) -> bool {
        let r = self.requested.swap(false, Ordering::AcqRel);
        if r {
            self.interrupt.store(false, Ordering::Release);
        }
        r
    }
}

/// Why the run loop returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunExit {
    /// The guest wrote POWER_OFF with this code.
    PowerOff(u64),
    /// A kick arrived ([`VcpuKick::kick`]).
    Kicked,
    /// The exit limit given to the run was reached.
    ExitLimit,
    /// The replay source ran out at exit `exit` (module docs): the run is paused there, with
    /// the exit pending if `at` is inside one; running again completes it from the inputs then
    /// installed.
    ReplayExhausted {
        /// The exit index where the replay ran out (the pending exit's, or the number of exits
        /// completed when it ran out between two exits).
        exit: u64,
        /// Where.
        at: ExhaustedAt,
    },
}

/// Where a replay ran out ([`RunExit::ReplayExhausted`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExhaustedAt {
    /// At an external MMIO read (`CLOCK_NS`, `ENTROPY`, `WAIT`) whose value the log lacks:
    /// the read is pending, and answered by the device when the run resumes.
    Read,
    /// At the end of an exit: its writes were applied as far as the log went; the exit is
    /// finished when the run resumes, and the next exit runs with the new inputs.
    EndOfExit,
    /// Between two exits ([`VcpuKick::interrupt_replay`]): nothing is pending.
    BetweenExits,
}

/// An exit left incomplete because the replay ran out there ([`Handled::ReplayExhausted`]);
/// the next run completes it (module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PendingExit {
    /// An MMIO read whose logged value is missing: KVM waits for its value in `kvm_run`.
    Read {
        /// The MMIO address.
        addr: u64,
    },
    /// The end of an exit whose logged writes ran out (those received were applied): the
    /// virtqueues are resynced and the exit counted when it resumes, then `action` is taken.
    EndOfExit {
        /// The MMIO address of the exit.
        addr: u64,
        /// Its kind.
        kind: ExitKind,
        /// What the exit asked the run loop to do.
        action: ExitAction,
    },
}

impl PendingExit {
    /// Where the replay ran out.
    pub fn at(&self) -> ExhaustedAt {
        match self {
            PendingExit::Read { .. } => ExhaustedAt::Read,
            PendingExit::EndOfExit { .. } => ExhaustedAt::EndOfExit,
        }
    }
}

/// A vCPU.
#[derive(Debug)]
pub struct Vcpu {
    fd: VcpuFd,
    /// Digest of the CPUID it was given ([`KvmContext::cpuid_digest`]).
    cpuid_digest: u64,
    /// The exit the last run left pending (its replay ran out there), completed by the next.
    pending: Option<PendingExit>,
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
    move |source| VcpuError::Kvm { what, source }
}

fn seg(selector: u16, type_: u8, l: u8, db: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: selector | 3,
        type_,
        present: 1,
        dpl: 3,
        db,
        s: 1,
        l,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// The one exit handler: dispatches an exit to the bus, counts it, and applies the logged
/// writes when replaying. Returns what the run loop does next; where the replay ran out, it
/// only reports so ([`Handled::ReplayExhausted`], module docs).
///
/// # Errors
/// [`VcpuError::Device`] if a device fails; a guest fault is reported by the caller, which has
/// the registers.
pub fn handle_exit(
    exit: VcpuExit<'_>,
    devices: &mut Devices,
    mem: &GuestMem,
    inputs: &mut Inputs,
    stats: &mut ExitStats,
) -> Result<Handled, VcpuError> {
    let index = stats.total();
    match exit {
        VcpuExit::MmioRead(addr, data) => read_exit(devices, mem, inputs, stats, addr, data),
        VcpuExit::MmioWrite(addr, data) => {
            let kind = ExitKind::classify(addr, true);
            let mut ctx = ExitCtx {
                mem,
                exit: index,
                inputs,
            };
            let action = devices
                .write(&mut ctx, addr, data)
                .map_err(device_error(index, kind, addr))?;
            finish_exit(devices, mem, inputs, stats, (kind, addr, action))
        }
        VcpuExit::Shutdown => Ok(Handled::Fault("triple fault (KVM_EXIT_SHUTDOWN)".into())),
        VcpuExit::Hlt => Ok(Handled::Fault("HLT".into())),
        VcpuExit::IoIn(port, _) | VcpuExit::IoOut(port, _) => Ok(Handled::Fault(format!(
            "port I/O to {port:#x} (only MMIO is supported)"
        ))),
        VcpuExit::FailEntry(reason, cpu) => Ok(Handled::Fault(format!(
            "KVM entry failure {reason:#x} on cpu {cpu}"
        ))),
        VcpuExit::InternalError => Ok(Handled::Fault("KVM internal error".into())),
        other => Ok(Handled::Fault(format!("unexpected exit {other:?}"))),
    }
}

fn device_error(exit: u64, kind: ExitKind, addr: u64) -> impl Fn(DeviceError) -> VcpuError {
    move |source| VcpuError::Device {
        exit,
        kind,
        addr,
        source,
    }
}

/// An MMIO read (a new exit, or the one a run left pending): the device answers `data`, then
/// the exit is finished. A read whose replayed value is missing stays pending: a device read
/// that fails with [`ReplayError::Exhausted`] has had no effect (only the system device's
/// external reads consult the log), so it can be answered again from other inputs.
fn read_exit(
    devices: &mut Devices,
    mem: &GuestMem,
    inputs: &mut Inputs,
    stats: &mut ExitStats,
    addr: u64,
    data: &mut [u8],
) -> Result<Handled, VcpuError> {
    let index = stats.total();
    let kind = ExitKind::classify(addr, false);
    let mut ctx = ExitCtx {
        mem,
        exit: index,
        inputs,
    };
    match devices.read(&mut ctx, addr, data) {
        Ok(()) => finish_exit(
            devices,
            mem,
            inputs,
            stats,
            (kind, addr, ExitAction::Continue),
        ),
        Err(DeviceError::Replay(ReplayError::Exhausted { .. })) => {
            Ok(Handled::ReplayExhausted(PendingExit::Read { addr }))
        }
        Err(source) => Err(device_error(index, kind, addr)(source)),
    }
}

/// The end of an exit: when replaying, the writes logged for it are applied and the devices'
/// own results checked against the log; then the exit is completed ([`complete_exit`]) — or,
/// if the log ran out before the exit's end, left pending.
fn finish_exit(
    devices: &mut Devices,
    mem: &GuestMem,
    inputs: &mut Inputs,
    stats: &mut ExitStats,
    (kind, addr, action): (ExitKind, u64, ExitAction),
) -> Result<Handled, VcpuError> {
    let Inputs::Replay(src) = inputs else {
        stats.bump(kind);
        return Ok(Handled::Action(action));
    };
    let index = stats.total();
    let dev_err = device_error(index, kind, addr);
    let logged = apply_logged_writes(src.as_mut(), mem, index);
    // What a device did itself in this exit (a backup's own disk copy) is compared with the
    // primary's results the log just put in place — before anything is reported: a backup
    // never goes live on a disk copy it knows to differ.
    devices.check_replayed_exit(mem, index).map_err(&dev_err)?;
    match logged {
        Ok(()) => complete_exit(devices, mem, stats, (kind, addr, action)),
        // The log ran out at the end of this exit: the writes of this exit received so far
        // are applied; the driver decides, and the next run completes the exit.
        Err(ReplayError::Exhausted { .. }) => {
            Ok(Handled::ReplayExhausted(PendingExit::EndOfExit {
                addr,
                kind,
                action,
            }))
        }
        Err(e) => Err(dev_err(DeviceError::Replay(e))),
    }
}

/// Completes a replayed exit (its logged writes applied): every queue's positions from its
/// used ring, then the exit is counted.
fn complete_exit(
    devices: &mut Devices,
    mem: &GuestMem,
    stats: &mut ExitStats,
    (kind, addr, action): (ExitKind, u64, ExitAction),
) -> Result<Handled, VcpuError> {
    devices
        .resync_queues(mem)
        .map_err(device_error(stats.total(), kind, addr))?;
    stats.bump(kind);
    Ok(Handled::Action(action))
}

/// Between two exits of a run asked to check its replay ([`VcpuKick::interrupt_replay`]): `exit`
/// exits are complete and the next one has not begun. Asks the replay source whether its log
/// ended here: `Ok(true)` if so (the run returns to its driver, nothing pending). A live run
/// clears the request.
///
/// # Errors
/// [`VcpuError::Replay`] if the source failed.
fn between_exits(inputs: &mut Inputs, exit: u64, kick: &VcpuKick) -> Result<bool, VcpuError> {
    let Inputs::Replay(src) = inputs else {
        kick.replay_check.store(false, Ordering::Release);
        return Ok(false);
    };
    match src.between_exits(exit) {
        Ok(()) => Ok(false),
        Err(ReplayError::Exhausted { .. }) => Ok(true),
        Err(source) => Err(VcpuError::Replay { exit, source }),
    }
}

/// The outcome of [`handle_exit`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handled {
    /// The exit was handled.
    Action(ExitAction),
    /// The guest cannot continue (the string says why).
    Fault(String),
    /// The replay ran out in this exit, which is left pending for the run's driver (module
    /// docs).
    ReplayExhausted(PendingExit),
}

impl Vcpu {
    /// Creates vCPU 0 of `vm` with the fixed CPUID.
    ///
    /// # Errors
    /// [`VcpuError::Kvm`].
    pub fn new(vm: &kvm_ioctls::VmFd, kvm: &KvmContext) -> Result<Self, VcpuError> {
        let fd = vm.create_vcpu(0).map_err(kvm_err("KVM_CREATE_VCPU"))?;
        fd.set_cpuid2(&kvm.cpuid)
            .map_err(kvm_err("KVM_SET_CPUID2"))?;
        install_kick_handler();
        Ok(Vcpu {
            fd,
            cpuid_digest: kvm.cpuid_digest(),
            pending: None,
        })
    }

    /// Puts the vCPU in 64-bit mode at CPL3 at `entry` (DEVICES.md).
    ///
    /// # Errors
    /// [`VcpuError::Kvm`].
    pub fn configure(&self, entry: u64, layout: &Layout) -> Result<(), VcpuError> {
        let mut sregs = self.fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        let code = seg(GDT_CODE, 0xb, 1, 0);
        let data = seg(GDT_DATA, 0x3, 0, 1);
        sregs.cs = code;
        sregs.ds = data;
        sregs.es = data;
        sregs.fs = data;
        sregs.gs = data;
        sregs.ss = data;
        sregs.gdt.base = GDT_ADDR;
        sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
        sregs.idt.base = 0;
        sregs.idt.limit = 0;
        sregs.cr0 = CR0;
        sregs.cr3 = PML4_ADDR;
        sregs.cr4 = CR4;
        sregs.efer = EFER;
        self.fd
            .set_sregs(&sregs)
            .map_err(kvm_err("KVM_SET_SREGS"))?;
        let regs = kvm_regs {
            rip: entry,
            rsp: layout.stack_top - 8,
            rdi: BOOT_INFO_ADDR,
            rflags: 0x2,
            ..Default::default()
        };
        self.fd.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
        let fpu = kvm_bindings::kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        self.fd.set_fpu(&fpu).map_err(kvm_err("KVM_SET_FPU"))?;
        Ok(())
    }

    /// A register dump for error messages.
    pub fn dump_registers(&self) -> String {
        let (Ok(r), Ok(s)) = (self.fd.get_regs(), self.fd.get_sregs()) else {
            return "  (registers unavailable)".into();
        };
        format!(
            "  rip {:#018x} rsp {:#018x} rflags {:#x}\n  rax {:#018x} rbx {:#018x} rcx {:#018x} rdx {:#018x}\n  \
             rsi {:#018x} rdi {:#018x} rbp {:#018x} r8  {:#018x}\n  r9  {:#018x} r10 {:#018x} r11 {:#018x} r12 {:#018x}\n  \
             r13 {:#018x} r14 {:#018x} r15 {:#018x}\n  cr0 {:#x} cr2 {:#x} cr3 {:#x} cr4 {:#x} efer {:#x} cs {:#x} ss {:#x}",
            r.rip, r.rsp, r.rflags, r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp, r.r8, r.r9,
            r.r10, r.r11, r.r12, r.r13, r.r14, r.r15, s.cr0, s.cr2, s.cr3, s.cr4, s.efer,
            s.cs.selector, s.ss.selector
        )
    }

    /// The exit the last run left pending because its replay ran out there (module docs);
    /// the next run completes it first.
    pub fn pending_exit(&self) -> Option<PendingExit> {
        self.pending
    }

    /// Runs the guest until POWER_OFF, a kick, a fault, `limit` exits in total, or the replay
    /// running out (module docs). An exit the last run left pending is completed first.
    ///
    /// # Errors
    /// [`VcpuError`] on a guest fault (with a register dump), a device error or a KVM failure.
    pub fn run(
        &mut self,
        devices: &mut Devices,
        mem: &GuestMem,
        inputs: &mut Inputs,
        stats: &mut ExitStats,
        kick: &VcpuKick,
        limit: Option<u64>,
    ) -> Result<RunExit, VcpuError> {
        let run_ptr: *mut kvm_run = self.fd.get_kvm_run();
        KVM_RUN.with(|p| p.set(run_ptr));
        // SAFETY: pthread_self has no preconditions.
        *kick.thread.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(unsafe { libc::pthread_self() });
        let result = match self.pending.take() {
            Some(p) => self
                .resume(p, devices, mem, inputs, stats)
                .and_then(|done| match done {
                    Some(r) => Ok(r),
                    None => self.run_inner(devices, mem, inputs, stats, kick, limit),
                }),
            None => self.run_inner(devices, mem, inputs, stats, kick, limit),
        };
        *kick.thread.lock().unwrap_or_else(|e| e.into_inner()) = None;
        if !matches!(self.pending, Some(PendingExit::Read { .. })) {
            // Complete an answered MMIO read so that saved registers include its value (a read
            // left pending has no value yet: the next run answers it).
            self.fd.set_kvm_immediate_exit(1);
            let _ = self.fd.run();
            self.fd.set_kvm_immediate_exit(0);
        }
        KVM_RUN.with(|p| p.set(std::ptr::null_mut()));
        result
    }

    fn run_inner(
        &mut self,
        devices: &mut Devices,
        mem: &GuestMem,
        inputs: &mut Inputs,
        stats: &mut ExitStats,
        kick: &VcpuKick,
        limit: Option<u64>,
    ) -> Result<RunExit, VcpuError> {
        loop {
            if kick.take() {
                return Ok(RunExit::Kicked);
            }
            if limit.is_some_and(|l| stats.total() >= l) {
                return Ok(RunExit::ExitLimit);
            }
            if kick.replay_check.load(Ordering::Acquire)
                && between_exits(inputs, stats.total(), kick)?
            {
                return Ok(RunExit::ReplayExhausted {
                    exit: stats.total(),
                    at: ExhaustedAt::BetweenExits,
                });
            }
            let exit = match self.fd.run() {
                Ok(exit) => exit,
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    self.fd.set_kvm_immediate_exit(0);
                    stats.interrupts += 1;
                    continue;
                }
                Err(source) => {
                    return Err(VcpuError::Kvm {
                        what: "KVM_RUN",
                        source,
                    })
                }
            };
            let handled = handle_exit(exit, devices, mem, inputs, stats)?;
            if let Some(r) = self.after(handled, stats)? {
                return Ok(r);
            }
        }
    }

    /// What the run loop does after an exit was handled: `None` to go on.
    fn after(&mut self, handled: Handled, stats: &ExitStats) -> Result<Option<RunExit>, VcpuError> {
        match handled {
            Handled::Action(ExitAction::Continue) => Ok(None),
            Handled::Action(ExitAction::PowerOff(code)) => Ok(Some(RunExit::PowerOff(code))),
            Handled::ReplayExhausted(p) => {
                self.pending = Some(p);
                Ok(Some(RunExit::ReplayExhausted {
                    exit: stats.total(),
                    at: p.at(),
                }))
            }
            Handled::Fault(reason) => Err(VcpuError::GuestFault {
                reason,
                exits: stats.total(),
                regs: self.dump_registers(),
            }),
        }
    }

    /// Completes the exit the last run left pending, from the inputs installed now: `Some`
    /// if the run ends there (the exit powered off, or the replay ran out again).
    fn resume(
        &mut self,
        pending: PendingExit,
        devices: &mut Devices,
        mem: &GuestMem,
        inputs: &mut Inputs,
        stats: &mut ExitStats,
    ) -> Result<Option<RunExit>, VcpuError> {
        let handled = match pending {
            PendingExit::Read { addr } => {
                let exit = stats.total();
                let data = self
                    .pending_read(addr)
                    .ok_or(VcpuError::PendingReadLost { exit, addr })?;
                tracing::debug!(exit, addr, "completing the read the replay left pending");
                read_exit(devices, mem, inputs, stats, addr, data)?
            }
            PendingExit::EndOfExit { addr, kind, action } => {
                complete_exit(devices, mem, stats, (kind, addr, action))?
            }
        };
        self.after(handled, stats)
    }

    /// The data buffer of the MMIO read of `addr` that `kvm_run` holds (the exit a run left
    /// pending), where KVM takes its value from at the next `KVM_RUN`.
    fn pending_read(&mut self, addr: u64) -> Option<&mut [u8]> {
        let run = self.fd.get_kvm_run();
        if run.exit_reason != KVM_EXIT_MMIO {
            return None;
        }
        // SAFETY: the exit reason is KVM_EXIT_MMIO, so `mmio` is the union member the kernel
        // filled (kvm-ioctls' `VcpuFd::run` reads it the same way), and nothing ran the vCPU
        // since: it still describes the pending read.
        let mmio = unsafe { &mut run.__bindgen_anon_1.mmio };
        let len = mmio.len as usize;
        (mmio.is_write == 0 && mmio.phys_addr == addr && len <= mmio.data.len())
            .then(|| &mut mmio.data[..len])
    }
}

impl Persist for Vcpu {
    type State = VcpuState;

    /// Registers, special registers, XSAVE (x87/SSE/AVX), XCRs, events and MSRs.
    fn save(&self) -> Result<VcpuState, StateError> {
        let k = |what| move |source| StateError::Kvm { what, source };
        let entries: Vec<kvm_msr_entry> = SAVED_MSRS
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries)
            .map_err(|e| StateError::Mismatch(format!("MSR list: {e:?}")))?;
        let n = self.fd.get_msrs(&mut msrs).map_err(k("KVM_GET_MSRS"))?;
        Ok(VcpuState {
            regs: Raw(self.fd.get_regs().map_err(k("KVM_GET_REGS"))?),
            sregs: Raw(self.fd.get_sregs().map_err(k("KVM_GET_SREGS"))?),
            xsave: Raw(self.fd.get_xsave().map_err(k("KVM_GET_XSAVE"))?),
            xcrs: Raw(self.fd.get_xcrs().map_err(k("KVM_GET_XCRS"))?),
            events: Raw(self
                .fd
                .get_vcpu_events()
                .map_err(k("KVM_GET_VCPU_EVENTS"))?),
            msrs: msrs.as_slice()[..n]
                .iter()
                .map(|e| (e.index, e.data))
                .collect(),
            cpuid_digest: self.cpuid_digest,
        })
    }

    fn restore(&mut self, state: &VcpuState) -> Result<(), StateError> {
        let k = |what| move |source| StateError::Kvm { what, source };
        if state.cpuid_digest != self.cpuid_digest {
            return Err(StateError::Cpuid {
                saved: state.cpuid_digest,
                here: self.cpuid_digest,
            });
        }
        let entries: Vec<kvm_msr_entry> = state
            .msrs
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let msrs = Msrs::from_entries(&entries)
            .map_err(|e| StateError::Mismatch(format!("MSR list: {e:?}")))?;
        self.fd
            .set_sregs(&state.sregs.0)
            .map_err(k("KVM_SET_SREGS"))?;
        self.fd.set_regs(&state.regs.0).map_err(k("KVM_SET_REGS"))?;
        // SAFETY: `xsave` is a plain `kvm_xsave` (4 KiB region, no trailing FAM data), as
        // returned by KVM_GET_XSAVE on this kind of host; KVM reads exactly that size.
        unsafe { self.fd.set_xsave(&state.xsave.0) }.map_err(k("KVM_SET_XSAVE"))?;
        self.fd.set_xcrs(&state.xcrs.0).map_err(k("KVM_SET_XCRS"))?;
        self.fd
            .set_vcpu_events(&state.events.0)
            .map_err(k("KVM_SET_VCPU_EVENTS"))?;
        self.fd.set_msrs(&msrs).map_err(k("KVM_SET_MSRS"))?;
        Ok(())
    }
}
