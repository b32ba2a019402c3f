//! A whole VM: KVM VM fd, guest memory, one vCPU, the devices, and its control handle.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::bus::{DeviceError, EventSignal};
use crate::devices::sys::SysDevice;
use crate::devices::virtio::blk::{Blk, BlkError, BlkHandle};
use crate::devices::virtio::console::Console;
use crate::devices::virtio::mmio::VirtioMmio;
use crate::devices::virtio::net::{Net, NetHandle, Tap, TapError, DEFAULT_MAC};
use crate::devices::virtio::VirtioDevice;
use crate::devices::{ConsoleOutput, Devices};
use crate::dirty::DirtyLog;
use crate::kvm::{KvmContext, KvmError};
use crate::loader::{load_elf, LoaderError};
use crate::memory::{allocate, write_boot_structures, GuestMem, Layout, MemoryError, MAX_CMDLINE};
use crate::record::Inputs;
use crate::state::{ConfigState, ExitState, MachineState, Persist, Snapshot, StateError};
pub use crate::vcpu::ExhaustedAt;
use crate::vcpu::{ExitKind, ExitStats, RunExit, Vcpu, VcpuError, VcpuKick};

/// Default RAM size (64 MiB).
pub const DEFAULT_MEM_SIZE: u64 = 64 << 20;

/// How to build a VM.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// RAM size in bytes.
    pub mem_size: u64,
    /// The command line passed in the boot info.
    pub cmdline: String,
    /// Raw disk image for virtio-blk.
    pub disk: Option<PathBuf>,
    /// TAP interface for virtio-net.
    pub tap: Option<String>,
    /// Whether a virtio-net device exists even without a TAP (TX dropped, no RX).
    pub net_without_backend: bool,
    /// Console output.
    pub console: ConsoleOutput,
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            mem_size: DEFAULT_MEM_SIZE,
            cmdline: String::new(),
            disk: None,
            tap: None,
            net_without_backend: false,
            console: ConsoleOutput::Stdout,
        }
    }
}

/// Errors of building, running and snapshotting a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// KVM is not usable.
    #[error("KVM")]
    Kvm(#[from] KvmError),
    /// A VM ioctl failed.
    #[error("KVM {what}")]
    VmIoctl {
        /// The ioctl.
        what: &'static str,
        /// The cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Memory setup failed (bad size, allocation).
    #[error("guest memory")]
    Memory(#[from] MemoryError),
    /// The guest image was rejected.
    #[error("cannot load guest ELF")]
    Loader(#[from] LoaderError),
    /// The command line is too long.
    #[error("command line is {0} bytes; the limit is {MAX_CMDLINE}")]
    Cmdline(usize),
    /// The disk image cannot be used.
    #[error("virtio-blk")]
    Disk(#[from] BlkError),
    /// The TAP device cannot be used.
    #[error("virtio-net")]
    Tap(#[from] TapError),
    /// A device could not be created.
    #[error("device setup")]
    Device(#[from] DeviceError),
    /// The vCPU failed or the guest faulted.
    #[error("vCPU")]
    Vcpu(#[from] VcpuError),
    /// Save or restore failed.
    #[error("snapshot")]
    State(#[from] StateError),
    /// The vCPU thread is gone ([`VmThread`]).
    #[error("the VM thread cannot do this now: {0}")]
    Thread(&'static str),
    /// The VM is paused inside exit `exit`, whose replay ran out there
    /// ([`RunOutcome::ReplayExhausted`]): its state cannot be captured until a run completes
    /// that exit.
    #[error("the VM is paused inside exit {exit} (its replay ran out there): run it before capturing its state")]
    ExitPending {
        /// The exit index.
        exit: u64,
    },
    /// The operation needs a paused VM ([`VmThread::pause`] first); it is in `state`.
    #[error("the VM must be paused for this (it is {state:?})")]
    NotPaused {
        /// The state it is in.
        state: VmState,
    },
}

/// Why [`Vm::run`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunOutcome {
    /// The guest powered off with this exit code.
    PoweredOff(u64),
    /// Paused by a kick ([`VmControl::kick`]); the VM can run again or be saved.
    Paused,
    /// The exit limit was reached; the VM can run again or be saved.
    ExitLimit,
    /// The replay source ran out at exit `exit` (it holds nothing more: the primary's log
    /// stopped). The run is paused right there, inside the exit if `at` says so: the driver
    /// decides what follows — install live inputs ([`Vm::set_inputs`]) and run again, and the
    /// pending exit is completed live at the same exit index; or give up. See
    /// [`crate::vcpu`], "A replay that runs out pauses the run".
    ReplayExhausted {
        /// The exit index where the replay ran out.
        exit: u64,
        /// Where: at an external read, at the end of an exit, or between two exits.
        at: ExhaustedAt,
    },
}

/// Controls a VM from another thread.
#[derive(Debug, Clone)]
pub struct VmControl {
    kick: Arc<VcpuKick>,
    exits: Arc<std::sync::atomic::AtomicU64>,
}

impl VmControl {
    /// A control of no VM: its kicks reach nobody and it counts no exits (for unit tests of
    /// what kicks or stops a VM, such as the replication crate's link watch).
    pub fn detached() -> Self {
        VmControl {
            kick: Arc::default(),
            exits: Arc::default(),
        }
    }

    /// Makes a running [`Vm::run`] return [`RunOutcome::Paused`] promptly (even from a WAIT).
    pub fn kick(&self) {
        self.kick.kick();
    }
    /// Makes a replaying vCPU leave guest code and ask its replay source whether the log
    /// ended there, without pausing ([`VcpuKick::interrupt_replay`]).
    pub fn interrupt_replay(&self) {
        self.kick.interrupt_replay();
    }
    /// Asks the VM's run to end: [`Vm::run`] returns [`RunOutcome::Paused`] promptly and
    /// [`VmControl::stop_requested`] is true from then on (a planned stop, see
    /// [`VcpuKick::request_stop`]).
    pub fn request_stop(&self) {
        self.kick.request_stop();
    }
    /// Whether [`VmControl::request_stop`] was asked.
    pub fn stop_requested(&self) -> bool {
        self.kick.stop_requested()
    }
    /// Whether a kick ([`VmControl::kick`]) is pending ([`VcpuKick::kick_pending`]).
    pub fn kick_pending(&self) -> bool {
        self.kick.kick_pending()
    }
    /// Exits handled so far (the exit index).
    pub fn exits(&self) -> u64 {
        self.exits.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// A VM with one vCPU.
#[derive(Debug)]
pub struct Vm {
    _kvm: KvmContext,
    _vm_fd: Arc<VmFd>,
    dirty: DirtyLog,
    mem: GuestMem,
    vcpu: Vcpu,
    devices: Devices,
    config: VmConfig,
    stats: ExitStats,
    inputs: Inputs,
    kick: Arc<VcpuKick>,
    run_time: Duration,
    net: Option<NetHandle>,
    disk: Option<BlkHandle>,
}

type Built = (Devices, Arc<VcpuKick>, Option<NetHandle>, Option<BlkHandle>);

fn build_devices(config: &VmConfig) -> Result<Built, VmError> {
    let signal = Arc::new(EventSignal::default());
    let interrupt = Arc::new(AtomicBool::new(false));
    let net_dev = match &config.tap {
        Some(name) => Some(Net::new(
            Some(Tap::open(name, signal.clone())?),
            DEFAULT_MAC,
            signal.clone(),
        )),
        None if config.net_without_backend => Some(Net::new(None, DEFAULT_MAC, signal.clone())),
        None => None,
    };
    let net_handle = net_dev.as_ref().map(Net::handle);
    let net = net_dev.map(|n| Box::new(n) as Box<dyn VirtioDevice>);
    let blk_dev = config.disk.as_deref().map(Blk::open).transpose()?;
    let disk_handle = blk_dev.as_ref().map(Blk::handle);
    let blk = blk_dev.map(|b| Box::new(b) as Box<dyn VirtioDevice>);
    let console: Box<dyn VirtioDevice> = Box::new(Console::new(config.console.clone()));
    let devices = Devices::new(
        SysDevice::new(config.console.clone()),
        [
            VirtioMmio::new(net)?,
            VirtioMmio::new(blk)?,
            VirtioMmio::new(Some(console))?,
        ],
        signal.clone(),
        interrupt.clone(),
    );
    Ok((
        devices,
        Arc::new(VcpuKick::new(signal, interrupt)),
        net_handle,
        disk_handle,
    ))
}

impl Vm {
    fn create(config: &VmConfig) -> Result<(Self, Layout), VmError> {
        if config.cmdline.len() > MAX_CMDLINE {
            return Err(VmError::Cmdline(config.cmdline.len()));
        }
        let layout = Layout::new(config.mem_size)?;
        let kvm = KvmContext::new()?;
        let vm_fd = kvm.kvm.create_vm().map_err(|source| VmError::VmIoctl {
            what: "KVM_CREATE_VM",
            source,
        })?;
        let mem = allocate(layout.mem_size)?;
        let host = mem
            .get_host_address(GuestAddress(0))
            .map_err(|_| MemoryError::BadSize {
                size: layout.mem_size,
                reason: "no host mapping",
            })?;
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: layout.mem_size,
            userspace_addr: host as u64,
        };
        // SAFETY: the region describes the live anonymous mapping owned by `mem`, which the Vm
        // keeps alive as long as `vm_fd` (both are fields of the same Vm, and `mem` is never
        // replaced; the dirty log's clones of both keep them alive together too).
        unsafe { vm_fd.set_user_memory_region(region) }.map_err(|source| VmError::VmIoctl {
            what: "KVM_SET_USER_MEMORY_REGION",
            source,
        })?;
        let vcpu = Vcpu::new(&vm_fd, &kvm)?;
        let (devices, kick, net, disk) = build_devices(config)?;
        let vm_fd = Arc::new(vm_fd);
        Ok((
            Vm {
                _kvm: kvm,
                dirty: DirtyLog::new(vm_fd.clone(), mem.clone(), region),
                _vm_fd: vm_fd,
                mem,
                vcpu,
                devices,
                config: config.clone(),
                stats: ExitStats::default(),
                inputs: Inputs::default(),
                kick,
                run_time: Duration::ZERO,
                net,
                disk,
            },
            layout,
        ))
    }

    /// Builds a VM and loads the guest ELF `elf` into it, ready to run.
    ///
    /// # Errors
    /// [`VmError`]: KVM missing, bad memory size, bad ELF, missing disk, TAP failure.
    pub fn new(config: &VmConfig, elf: &[u8]) -> Result<Self, VmError> {
        let (vm, layout) = Self::create(config)?;
        let image = load_elf(&vm.mem, &layout, elf)?;
        write_boot_structures(&vm.mem, &layout, image.image_end, config.cmdline.as_bytes())?;
        vm.vcpu.configure(image.entry, &layout)?;
        Ok(vm)
    }

    /// Builds a VM from a snapshot file written by [`Vm::save`]. `config` supplies the backends
    /// (disk, TAP, console); its memory size and command line are taken from the snapshot.
    ///
    /// # Errors
    /// [`VmError::State`] if the snapshot is unreadable or does not fit, other [`VmError`]s as
    /// for [`Vm::new`].
    pub fn restore(config: &VmConfig, path: &Path) -> Result<Self, VmError> {
        let snap = Snapshot::read_from(path)?;
        let mut vm = Self::for_state(config, &snap.machine.config)?;
        vm.mem
            .write_slice(&snap.memory, GuestAddress(0))
            .map_err(|_| StateError::Mismatch("memory".into()))?;
        vm.apply_state(&snap.machine)?;
        Ok(vm)
    }

    /// Builds a VM with zeroed memory and no guest loaded, to receive a state: the memory size
    /// and command line come from `state`, the backends (disk, TAP, console) from `backends`.
    /// Fill its memory ([`Vm::memory`]), then [`Vm::apply_state`]; it then continues from the
    /// exit the state was captured at ([`crate::transfer::Sink`] does this).
    ///
    /// # Errors
    /// As [`Vm::new`], without the ELF errors.
    pub fn for_state(backends: &VmConfig, state: &ConfigState) -> Result<Self, VmError> {
        let config = VmConfig {
            mem_size: state.mem_size,
            cmdline: state.cmdline.clone(),
            ..backends.clone()
        };
        Ok(Self::create(&config)?.0)
    }

    /// Captures everything but memory (vCPU, devices, exit counters) at the current exit
    /// boundary: the VM is not running (`&mut self`).
    ///
    /// # Errors
    /// [`VmError::State`] if KVM refuses to give the vCPU state; [`VmError::ExitPending`] if
    /// the last run left an exit pending ([`RunOutcome::ReplayExhausted`]).
    pub fn capture(&mut self) -> Result<MachineState, VmError> {
        if self.vcpu.pending_exit().is_some() {
            return Err(VmError::ExitPending {
                exit: self.stats.total(),
            });
        }
        let by_kind = std::array::from_fn(|i| {
            self.stats.by_kind[i].load(std::sync::atomic::Ordering::Relaxed)
        });
        let devices = self.devices.save()?;
        Ok(MachineState {
            config: self.config_state(),
            vcpu: self.vcpu.save()?,
            devices,
            exits: ExitState {
                total: self.stats.total(),
                by_kind,
            },
        })
    }

    /// The configuration part of this VM's state: memory size, command line, devices present.
    pub fn config_state(&self) -> ConfigState {
        ConfigState {
            mem_size: self.config.mem_size,
            cmdline: self.config.cmdline.clone(),
            devices: self.devices.virtio.each_ref().map(|d| d.device_type() != 0),
        }
    }

    /// Puts a captured state back (memory is the caller's): vCPU, devices and exit counters;
    /// the next exit of this VM is exit `state.exit_index()`.
    ///
    /// # Errors
    /// [`VmError::State`]: another memory size or device set than this VM's, a device or vCPU
    /// state that does not fit, another CPUID.
    pub fn apply_state(&mut self, state: &MachineState) -> Result<(), VmError> {
        let here = self.config_state().devices;
        if state.config.mem_size != self.config.mem_size || state.config.devices != here {
            return Err(StateError::Mismatch(format!(
                "the state is of a VM with {} bytes and devices (net, blk, console) {:?}; this \
                 one has {} bytes and {here:?}",
                state.config.mem_size, state.config.devices, self.config.mem_size
            ))
            .into());
        }
        self.vcpu.restore(&state.vcpu)?;
        self.devices.restore(&state.devices)?;
        self.stats
            .total
            .store(state.exits.total, std::sync::atomic::Ordering::Relaxed);
        for (k, v) in self.stats.by_kind.iter().zip(state.exits.by_kind) {
            k.store(v, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(())
    }

    /// Saves the whole VM (vCPU, devices, memory, exit counters) to `path`. The VM must not be
    /// running, which `&mut self` guarantees; it can run on afterwards.
    ///
    /// # Errors
    /// [`VmError::State`].
    pub fn save(&mut self, path: &Path) -> Result<(), VmError> {
        let machine = self.capture()?;
        let mut memory = vec![0u8; self.config.mem_size as usize];
        self.mem
            .read_slice(&mut memory, GuestAddress(0))
            .map_err(|_| StateError::Mismatch("memory read".into()))?;
        Snapshot { machine, memory }.write_to(path)?;
        Ok(())
    }

    /// The dirty-page tracker of this VM's memory, usable from any thread while the VM runs.
    pub fn dirty_log(&self) -> DirtyLog {
        self.dirty.clone()
    }

    /// Sets where nondeterministic inputs come from (default: live, no recorder).
    pub fn set_inputs(&mut self, inputs: Inputs) {
        self.inputs = inputs;
    }

    /// The live recorder installed with [`Vm::set_inputs`], if it is an `R` (and says so:
    /// [`Recorder::as_any_mut`](crate::record::Recorder::as_any_mut)): the run that lent it
    /// reaches it between two runs of the VM.
    pub fn recorder_mut<R: std::any::Any>(&mut self) -> Option<&mut R> {
        match &mut self.inputs {
            Inputs::Live(r) => r.as_any_mut()?.downcast_mut::<R>(),
            Inputs::Replay(_) => None,
        }
    }

    /// Takes back the live recorder if it is an `R`; the inputs are then live without a
    /// recorder. `None` (and the inputs unchanged) otherwise.
    pub fn take_recorder<R: std::any::Any>(&mut self) -> Option<Box<R>> {
        self.recorder_mut::<R>()?;
        match std::mem::take(&mut self.inputs) {
            Inputs::Live(r) => r.into_any()?.downcast::<R>().ok(),
            Inputs::Replay(_) => None,
        }
    }

    /// The replay source installed with [`Vm::set_inputs`], if it is an `S` (and says so:
    /// [`ReplaySource::as_any_mut`](crate::record::ReplaySource::as_any_mut)).
    pub fn replay_mut<S: std::any::Any>(&mut self) -> Option<&mut S> {
        match &mut self.inputs {
            Inputs::Replay(r) => r.as_any_mut()?.downcast_mut::<S>(),
            Inputs::Live(_) => None,
        }
    }

    /// Takes back the replay source if it is an `S`; the inputs are then live without a
    /// recorder. `None` (and the inputs unchanged) otherwise.
    pub fn take_replay<S: std::any::Any>(&mut self) -> Option<Box<S>> {
        self.replay_mut::<S>()?;
        match std::mem::take(&mut self.inputs) {
            Inputs::Replay(r) => r.into_any()?.downcast::<S>().ok(),
            Inputs::Live(_) => None,
        }
    }

    /// Sets (or clears, `None`) a function called on the vCPU thread after every exit in which
    /// the guest wrote console output ([`Devices::set_console_hook`]).
    pub fn set_console_hook(&mut self, hook: Option<Arc<dyn Fn() + Send + Sync>>) {
        self.devices
            .set_console_hook(hook.map(crate::devices::ConsoleHook));
    }

    /// Whether a stop was requested ([`VmControl::request_stop`]).
    pub fn stop_requested(&self) -> bool {
        self.kick.stop_requested()
    }

    /// A handle to pause the VM from another thread and watch its exit count.
    pub fn control(&self) -> VmControl {
        VmControl {
            kick: self.kick.clone(),
            exits: self.stats.total.clone(),
        }
    }

    /// Runs the guest on the calling thread until it powers off or is paused.
    ///
    /// # Errors
    /// [`VmError::Vcpu`] on a guest fault (the message has a register dump) or device error.
    pub fn run(&mut self) -> Result<RunOutcome, VmError> {
        self.run_until(None)
    }

    /// Like [`Vm::run`], but returns [`RunOutcome::ExitLimit`] once `limit` exits in total have
    /// been handled (deterministic stopping points for save/restore and replay).
    ///
    /// # Errors
    /// As [`Vm::run`].
    pub fn run_until(&mut self, limit: Option<u64>) -> Result<RunOutcome, VmError> {
        let start = Instant::now();
        let r = self.vcpu.run(
            &mut self.devices,
            &self.mem,
            &mut self.inputs,
            &mut self.stats,
            &self.kick,
            limit,
        );
        self.run_time += start.elapsed();
        Ok(match r? {
            RunExit::PowerOff(code) => RunOutcome::PoweredOff(code),
            RunExit::Kicked => RunOutcome::Paused,
            RunExit::ExitLimit => RunOutcome::ExitLimit,
            RunExit::ReplayExhausted { exit, at } => RunOutcome::ReplayExhausted { exit, at },
        })
    }

    /// The virtio-net device's handle (switch its TAP and transmit mode while the VM runs), if
    /// the VM has a net device.
    pub fn net(&self) -> Option<&NetHandle> {
        self.net.as_ref()
    }

    /// The virtio-blk device's handle (disk mode for shared-disk pairs, counters), if the VM
    /// has a disk.
    pub fn disk(&self) -> Option<&BlkHandle> {
        self.disk.as_ref()
    }

    /// The disk's handle if it is shared with the other side of a pair
    /// ([`BlkHandle::set_shared`]).
    pub fn shared_disk(&self) -> Option<&BlkHandle> {
        self.disk().filter(|d| d.is_shared())
    }

    /// Exit counters.
    pub fn stats(&self) -> &ExitStats {
        &self.stats
    }

    /// Exits by kind as `(name, count)`.
    pub fn exits_by_kind(&self) -> Vec<(&'static str, u64)> {
        ExitKind::ALL
            .iter()
            .map(|k| (k.name(), self.stats.count(*k)))
            .collect()
    }

    /// Time spent in [`Vm::run`] so far.
    pub fn run_time(&self) -> Duration {
        self.run_time
    }

    /// A digest of all guest memory.
    pub fn memory_digest(&self) -> u64 {
        crate::memory::digest(&self.mem)
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMem {
        &self.mem
    }

    /// The configuration.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// A register dump of the vCPU.
    pub fn dump_registers(&self) -> String {
        self.vcpu.dump_registers()
    }
}

/// A console that collects output in memory (for tests and tools).
pub fn buffer_console() -> (ConsoleOutput, Arc<Mutex<Vec<u8>>>) {
    let buf = Arc::new(Mutex::new(Vec::new()));
    (ConsoleOutput::Buffer(buf.clone()), buf)
}

/// The state of a VM running on its own vCPU thread ([`VmThread`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmState {
    /// The vCPU is in its run loop.
    Running,
    /// The vCPU waits for a command; the VM can be saved.
    Paused,
    /// The vCPU thread has ended (power off, error or stop).
    Stopped,
}

enum Command {
    Resume,
    Save(PathBuf, std::sync::mpsc::Sender<Result<(), VmError>>),
    Capture(std::sync::mpsc::Sender<Result<MachineState, VmError>>),
    Stop,
}

struct Shared {
    state: Mutex<VmState>,
    changed: std::sync::Condvar,
}

impl Shared {
    fn set(&self, s: VmState) {
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = s;
        self.changed.notify_all();
    }
    fn get(&self) -> VmState {
        *self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn wait_while(&self, s: VmState) -> VmState {
        let g = self.state.lock().unwrap_or_else(|e| e.into_inner());
        *self
            .changed
            .wait_while(g, |cur| *cur == s)
            .unwrap_or_else(|e| e.into_inner())
    }
}

/// A VM on its own vCPU thread, driven as a small state machine:
///
/// ```text
///            pause()            resume()
///  Running ──────────> Paused ──────────> Running
///     │ power off / error │ save(path): stays Paused
///     └────────> Stopped <┘ stop()
/// ```
/// Dropping it stops the VM and joins the thread.
#[derive(Debug)]
pub struct VmThread {
    control: VmControl,
    commands: std::sync::mpsc::Sender<Command>,
    shared: Arc<Shared>,
    handle: Option<std::thread::JoinHandle<Result<(Vm, RunOutcome), VmError>>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("state", &self.get())
            .finish()
    }
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Command::Resume => "Resume",
            Command::Save(..) => "Save",
            Command::Capture(..) => "Capture",
            Command::Stop => "Stop",
        })
    }
}

impl VmThread {
    /// Starts `vm` running on a new thread named `vcpu0`.
    ///
    /// # Errors
    /// The I/O error if the thread cannot be created.
    pub fn spawn(mut vm: Vm) -> std::io::Result<Self> {
        let control = vm.control();
        let (tx, rx) = std::sync::mpsc::channel::<Command>();
        let shared = Arc::new(Shared {
            state: Mutex::new(VmState::Running),
            changed: Default::default(),
        });
        let sh = shared.clone();
        let handle = std::thread::Builder::new()
            .name("vcpu0".into())
            .spawn(move || {
                let result = (|| loop {
                    sh.set(VmState::Running);
                    match vm.run()? {
                        RunOutcome::PoweredOff(code) => return Ok(RunOutcome::PoweredOff(code)),
                        RunOutcome::Paused | RunOutcome::ExitLimit => {}
                        // Nobody here decides what a replay that ran out continues with.
                        o @ RunOutcome::ReplayExhausted { .. } => return Ok(o),
                    }
                    sh.set(VmState::Paused);
                    loop {
                        match rx.recv() {
                            Ok(Command::Resume) => break,
                            Ok(Command::Save(path, reply)) => {
                                let _ = reply.send(vm.save(&path));
                            }
                            Ok(Command::Capture(reply)) => {
                                let _ = reply.send(vm.capture());
                            }
                            Ok(Command::Stop) | Err(_) => return Ok(RunOutcome::Paused),
                        }
                    }
                })();
                sh.set(VmState::Stopped);
                result.map(|outcome| (vm, outcome))
            })?;
        Ok(VmThread {
            control,
            commands: tx,
            shared,
            handle: Some(handle),
        })
    }

    /// The current state.
    pub fn state(&self) -> VmState {
        self.shared.get()
    }

    /// Exits handled so far.
    pub fn exits(&self) -> u64 {
        self.control.exits()
    }

    /// Pauses the VM (kicks the vCPU out of KVM_RUN or WAIT) and waits until it is paused or
    /// stopped; returns the state reached. A pause always falls **between two exits**: a kick
    /// that finds the vCPU in guest code makes `KVM_RUN` return `EINTR` (no exit is counted),
    /// one that finds it blocked in a WAIT completes that WAIT (0 events) first, and the run
    /// loop checks for the kick only between exits. While paused, [`VmThread::exits`] is the
    /// exit index the VM continues from (the next exit has that index).
    pub fn pause(&self) -> VmState {
        if self.shared.get() == VmState::Running {
            self.control.kick();
            return self.shared.wait_while(VmState::Running);
        }
        self.shared.get()
    }

    /// Resumes a paused VM.
    pub fn resume(&self) {
        if self.shared.get() == VmState::Paused {
            let _ = self.commands.send(Command::Resume);
            // Wait until the vCPU has left Paused, so that a following pause() kicks it.
            self.shared.wait_while(VmState::Paused);
        }
    }

    /// Saves the paused VM to `path` (see [`Vm::save`]).
    ///
    /// # Errors
    /// [`VmError::Thread`] if the VM is not paused; [`VmError::State`] if the save fails.
    pub fn save(&self, path: &Path) -> Result<(), VmError> {
        self.ask(|tx| Command::Save(path.to_path_buf(), tx))?
    }

    /// Captures the paused VM's state without its memory ([`Vm::capture`]): the final state of
    /// a transfer. The VM stays paused at the same exit ([`VmThread::exits`]).
    ///
    /// # Errors
    /// [`VmError::Thread`] if the VM is not paused; [`VmError::State`] if KVM fails.
    pub fn capture(&self) -> Result<MachineState, VmError> {
        self.ask(Command::Capture)?
    }

    /// Sends a command to the paused vCPU thread and waits for its reply.
    fn ask<T>(
        &self,
        command: impl FnOnce(std::sync::mpsc::Sender<T>) -> Command,
    ) -> Result<T, VmError> {
        let state = self.shared.get();
        if state != VmState::Paused {
            return Err(VmError::NotPaused { state });
        }
        let (tx, rx) = std::sync::mpsc::channel();
        self.commands
            .send(command(tx))
            .map_err(|_| VmError::Thread("the vCPU thread has ended"))?;
        rx.recv()
            .map_err(|_| VmError::Thread("the vCPU thread has ended"))
    }

    /// Waits for the guest to power off (or the VM to fail) and returns the VM and outcome.
    ///
    /// # Errors
    /// The [`VmError`] that stopped the VM.
    pub fn join(mut self) -> Result<(Vm, RunOutcome), VmError> {
        self.join_inner()
    }

    /// Stops the VM (from any state), joins the thread and returns the VM and how it ended
    /// ([`RunOutcome::Paused`] if it was stopped before powering off).
    ///
    /// # Errors
    /// The [`VmError`] that stopped the VM, if it failed.
    pub fn stop(mut self) -> Result<(Vm, RunOutcome), VmError> {
        self.pause();
        let _ = self.commands.send(Command::Stop);
        self.join_inner()
    }

    fn join_inner(&mut self) -> Result<(Vm, RunOutcome), VmError> {
        match self.handle.take().map(std::thread::JoinHandle::join) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(VmError::Thread("the vCPU thread panicked")),
            None => Err(VmError::Thread("the vCPU thread was already joined")),
        }
    }
}

impl Drop for VmThread {
    fn drop(&mut self) {
        if self.handle.is_some() {
            self.pause();
            let _ = self.commands.send(Command::Stop);
            let _ = self.join_inner();
        }
    }
}
