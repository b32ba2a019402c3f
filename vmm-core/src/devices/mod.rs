//! The devices of DEVICES.md and the bus that dispatches exits to them.

pub mod sys;
pub mod virtio;

use std::fs::File;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::bus::{BusDevice, DeviceError, EventSignal, ExitAction, ExitCtx, DEVICE_SIZE};
use crate::memory::{GuestMem, MMIO_BASE, MMIO_SIZE};
use crate::record::Inputs;
use crate::state::{DeviceState, DevicesState, Persist, StateError, VirtioState};

use self::sys::{SysDevice, EVENT_BLK, EVENT_TIMER, REG_CONSOLE_LEN, REG_WAIT};
use self::virtio::mmio::VirtioMmio;

/// Where console output (system device CONSOLE and virtio-console) goes.
#[derive(Debug, Clone, Default)]
pub enum ConsoleOutput {
    /// The VMM's standard output.
    #[default]
    Stdout,
    /// A file (appended).
    File(Arc<Mutex<File>>),
    /// An in-memory buffer (tests).
    Buffer(Arc<Mutex<Vec<u8>>>),
    /// Discarded.
    Null,
}

impl ConsoleOutput {
    /// Writes `bytes` to the console.
    ///
    /// # Errors
    /// The I/O error of the underlying file or stdout.
    pub fn write(&self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            ConsoleOutput::Stdout => {
                let mut out = std::io::stdout().lock();
                out.write_all(bytes)?;
                out.flush()
            }
            ConsoleOutput::File(f) => f.lock().unwrap_or_else(|e| e.into_inner()).write_all(bytes),
            ConsoleOutput::Buffer(b) => {
                b.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .extend_from_slice(bytes);
                Ok(())
            }
            ConsoleOutput::Null => Ok(()),
        }
    }
}

/// Number of virtio-mmio slots (net, blk, console).
pub const VIRTIO_SLOTS: usize = ftvm_abi::virtio::SLOTS;

/// All devices of a VM, by address.
#[derive(Debug)]
pub struct Devices {
    /// The system device.
    pub sys: SysDevice,
    /// virtio-mmio slots 1..=3 (`None`: no device; answers magic and device ID 0).
    pub virtio: [VirtioMmio; VIRTIO_SLOTS],
    /// Wakes a blocked WAIT.
    pub signal: Arc<EventSignal>,
    /// Set by the controller to make a blocked WAIT return at once.
    pub interrupt: Arc<AtomicBool>,
    blk_completed: bool,
    /// Called after an exit that wrote console output ([`Devices::set_console_hook`]).
    console_hook: Option<ConsoleHook>,
}

/// A function called on the vCPU thread after the guest wrote to a console
/// ([`Devices::set_console_hook`]).
#[derive(Clone)]
pub struct ConsoleHook(pub Arc<dyn Fn() + Send + Sync>);

impl std::fmt::Debug for ConsoleHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ConsoleHook")
    }
}

/// The device an MMIO address belongs to.
enum Target {
    Sys(u64),
    Virtio(usize, u64),
    None,
}

impl Devices {
    /// A bus with the system device and the given virtio slots.
    pub fn new(
        sys: SysDevice,
        virtio: [VirtioMmio; VIRTIO_SLOTS],
        signal: Arc<EventSignal>,
        interrupt: Arc<AtomicBool>,
    ) -> Self {
        Devices {
            sys,
            virtio,
            signal,
            interrupt,
            blk_completed: false,
            console_hook: None,
        }
    }

    /// Sets (or clears) the function called on the vCPU thread at the end of every exit that
    /// wrote console output (the system device's `CONSOLE_LEN`, a virtio-console transmit): a
    /// primary hands the bytes to its output gate there, tagged with the log position of that
    /// exit, instead of a thread looking at the console buffer every millisecond.
    pub fn set_console_hook(&mut self, hook: Option<ConsoleHook>) {
        self.console_hook = hook;
    }

    fn console_written(&self) {
        if let Some(ConsoleHook(hook)) = &self.console_hook {
            hook();
        }
    }

    fn target(addr: u64) -> Target {
        if !(MMIO_BASE..MMIO_BASE + MMIO_SIZE).contains(&addr) {
            return Target::None;
        }
        let off = addr - MMIO_BASE;
        let slot = off / DEVICE_SIZE;
        let reg = off % DEVICE_SIZE;
        match slot {
            0 => Target::Sys(reg),
            s if (s as usize) <= VIRTIO_SLOTS => Target::Virtio(s as usize - 1, reg),
            _ => Target::None,
        }
    }

    /// Handles an MMIO read.
    ///
    /// # Errors
    /// A [`DeviceError`] from the device.
    pub fn read(
        &mut self,
        ctx: &mut ExitCtx<'_>,
        addr: u64,
        data: &mut [u8],
    ) -> Result<(), DeviceError> {
        match Self::target(addr) {
            Target::Sys(REG_WAIT) => {
                let v = self.wait(ctx, addr)?;
                crate::bus::put_le(data, v);
                Ok(())
            }
            // A log that ran out at this read fails it with `Replay(Exhausted)`, and the replayed
            // attempt had no effect besides the failed read: the exit handler leaves it pending
            // and the run's driver decides (`crate::vcpu`, module docs).
            Target::Sys(reg) => self.sys.read(ctx, reg, data),
            Target::Virtio(i, reg) => self.virtio[i].read(ctx, reg, data),
            Target::None => {
                tracing::debug!(addr, "MMIO read outside any device");
                data.fill(0);
                Ok(())
            }
        }
    }

    /// Handles an MMIO write.
    ///
    /// # Errors
    /// A [`DeviceError`] from the device.
    pub fn write(
        &mut self,
        ctx: &mut ExitCtx<'_>,
        addr: u64,
        data: &[u8],
    ) -> Result<ExitAction, DeviceError> {
        match Self::target(addr) {
            Target::Sys(reg) => {
                let a = self.sys.write(ctx, reg, data)?;
                if reg == REG_CONSOLE_LEN {
                    self.console_written();
                }
                Ok(a)
            }
            Target::Virtio(i, reg) => {
                let a = self.virtio[i].write(ctx, reg, data)?;
                let kind = self.virtio[i].device_type();
                if self.virtio[i].take_completed() && kind == 2 {
                    self.blk_completed = true;
                }
                if kind == 3 && reg == self::virtio::mmio::QUEUE_NOTIFY {
                    self.console_written();
                }
                Ok(a)
            }
            Target::None => {
                tracing::debug!(addr, "MMIO write outside any device");
                Ok(ExitAction::Continue)
            }
        }
    }

    /// WAIT: delivers pending input, else blocks until input, the deadline, or an interrupt.
    fn wait(&mut self, ctx: &mut ExitCtx<'_>, addr: u64) -> Result<u64, DeviceError> {
        if let Inputs::Replay(src) = ctx.inputs {
            // A log that ran out at this WAIT fails it (nothing else happened here): the exit
            // stays pending, and a run that continues live answers it below; the writes
            // logged for it before its missing read are then dropped.
            let v = src
                .external_read(ctx.exit, addr)
                .map_err(DeviceError::Replay)?;
            self.blk_completed = false;
            return Ok(v);
        }
        let mut events = 0;
        loop {
            for dev in &mut self.virtio {
                events |= dev.deliver_input(ctx)?;
            }
            if std::mem::take(&mut self.blk_completed) {
                events |= EVENT_BLK;
            }
            if events != 0 {
                break;
            }
            let deadline = self.sys.wait_deadline;
            if deadline != 0 && self.sys.clock_now() >= deadline {
                events = EVENT_TIMER;
                break;
            }
            let can_block = self.virtio.iter().any(VirtioMmio::has_input);
            if deadline == 0 && !can_block {
                events = EVENT_TIMER;
                break;
            }
            if self.interrupt.load(Ordering::Acquire) {
                // The controller wants the vCPU (pause/stop): a spurious wake-up (0 events).
                break;
            }
            let until = (deadline != 0).then(|| self.sys.instant_of(deadline));
            self.signal.wait(until);
        }
        ctx.external_read(addr, || events)
    }

    /// Replay: after the logged writes of exit `exit` were applied to `mem`, and before any
    /// go-live decision there, lets each device compare what it did itself with the primary's
    /// results ([`VirtioDevice::check_replayed_exit`](virtio::VirtioDevice::check_replayed_exit)).
    ///
    /// # Errors
    /// The first device's [`DeviceError`].
    pub fn check_replayed_exit(&mut self, mem: &GuestMem, exit: u64) -> Result<(), DeviceError> {
        for dev in &mut self.virtio {
            dev.check_replayed_exit(mem, exit)?;
        }
        Ok(())
    }

    /// Replay: after the logged writes of an exit were applied, sets every queue's positions
    /// from its used ring (devices complete every chain they take within the exit, so
    /// `next_avail == next_used == used.idx` at every exit boundary).
    ///
    /// # Errors
    /// [`DeviceError::Queue`] if a used ring cannot be read.
    pub fn resync_queues(&mut self, mem: &GuestMem) -> Result<(), DeviceError> {
        for dev in &mut self.virtio {
            dev.resync_queues(mem)?;
        }
        Ok(())
    }
}

/// The system device, each virtio slot (transport, queues, device) and the WAIT events pending
/// on the bus. The slots' states are typed by device: a snapshot's NET section can only meet a
/// virtio-net slot.
impl Persist for Devices {
    type State = DevicesState;

    fn save(&self) -> Result<DevicesState, StateError> {
        let pending = if self.blk_completed { EVENT_BLK } else { 0 };
        let mut st = DevicesState {
            sys: self.sys.save_state(pending),
            net: None,
            blk: None,
            console: None,
        };
        for dev in &self.virtio {
            match dev.save_state()? {
                None => {}
                Some((transport, DeviceState::Net(device))) => {
                    st.net = Some(VirtioState { transport, device })
                }
                Some((transport, DeviceState::Blk(device))) => {
                    st.blk = Some(VirtioState { transport, device })
                }
                Some((transport, DeviceState::Console(device))) => {
                    st.console = Some(VirtioState { transport, device })
                }
            }
        }
        Ok(st)
    }

    fn restore(&mut self, st: &DevicesState) -> Result<(), StateError> {
        let pending = self.sys.restore_state(&st.sys);
        self.blk_completed = pending & EVENT_BLK != 0;
        let net = st
            .net
            .as_ref()
            .map(|s| (&s.transport, DeviceState::Net(s.device)));
        let blk = st
            .blk
            .as_ref()
            .map(|s| (&s.transport, DeviceState::Blk(s.device)));
        let console = st
            .console
            .as_ref()
            .map(|s| (&s.transport, DeviceState::Console(s.device)));
        for (slot, s) in self.virtio.iter_mut().zip([net, blk, console]) {
            slot.restore_state(s.as_ref().map(|(t, d)| (*t, d)))?;
        }
        Ok(())
    }
}
