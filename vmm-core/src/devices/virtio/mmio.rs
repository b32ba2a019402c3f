//! The virtio-mmio transport, version 2 ("modern"), virtio 1.x §4.2.2.
//!
//! ```text
//! 0x000 MagicValue  R  0x74726976        0x050 QueueNotify      W
//! 0x004 Version     R  2                 0x060 InterruptStatus  R
//! 0x008 DeviceID    R  (0: no device)    0x064 InterruptACK     W
//! 0x00c VendorID    R                    0x070 Status           RW (0 resets)
//! 0x010 DeviceFeatures      R            0x080/0x084 QueueDesc low/high      W
//! 0x014 DeviceFeaturesSel   W            0x090/0x094 QueueDriver low/high    W (avail ring)
//! 0x020 DriverFeatures      W            0x0a0/0x0a4 QueueDevice low/high    W (used ring)
//! 0x024 DriverFeaturesSel   W            0x0fc ConfigGeneration R
//! 0x030 QueueSel    W                    0x100.. device configuration space
//! 0x034 QueueNumMax R   0x038 QueueNum W   0x044 QueueReady RW
//! ```
//! No interrupts are raised (DEVICES.md): `InterruptStatus` bit 0 is set when a buffer was used.

use virtio_queue::{Queue, QueueT};

use crate::bus::{le_value, put_le, BusDevice, DeviceError, ExitAction, ExitCtx};
use crate::devices::virtio::VirtioDevice;
use crate::memory::GuestMem;
use crate::state::{DeviceState, QueueState, StateError, TransportState};

/// `MagicValue` ("virt").
pub const MMIO_MAGIC: u32 = 0x7472_6976;
/// Transport version.
pub const MMIO_VERSION: u32 = 2;
/// `VendorID` ("FTVM" would not fit the convention; QEMU's is 0x554d4551).
pub const VENDOR_ID: u32 = 0x4d56_5446;

const MAGIC: u64 = 0x000;
const VERSION: u64 = 0x004;
const DEVICE_ID: u64 = 0x008;
const VENDOR: u64 = 0x00c;
const DEVICE_FEATURES: u64 = 0x010;
const DEVICE_FEATURES_SEL: u64 = 0x014;
const DRIVER_FEATURES: u64 = 0x020;
const DRIVER_FEATURES_SEL: u64 = 0x024;
const QUEUE_SEL: u64 = 0x030;
const QUEUE_NUM_MAX: u64 = 0x034;
const QUEUE_NUM: u64 = 0x038;
const QUEUE_READY: u64 = 0x044;
pub(crate) const QUEUE_NOTIFY: u64 = 0x050;
const INTERRUPT_STATUS: u64 = 0x060;
const INTERRUPT_ACK: u64 = 0x064;
const STATUS: u64 = 0x070;
const QUEUE_DESC_LOW: u64 = 0x080;
const QUEUE_DESC_HIGH: u64 = 0x084;
const QUEUE_AVAIL_LOW: u64 = 0x090;
const QUEUE_AVAIL_HIGH: u64 = 0x094;
const QUEUE_USED_LOW: u64 = 0x0a0;
const QUEUE_USED_HIGH: u64 = 0x0a4;
const CONFIG_GENERATION: u64 = 0x0fc;
const CONFIG: u64 = 0x100;

/// A virtio-mmio slot: the transport registers and queues, and the device behind them.
#[derive(Debug)]
pub struct VirtioMmio {
    device: Option<Box<dyn VirtioDevice>>,
    queues: Vec<Queue>,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    status: u32,
    interrupt_status: u32,
    completed: bool,
}

impl VirtioMmio {
    /// A slot with `device`, or an empty slot (`None`).
    ///
    /// # Errors
    /// [`DeviceError::Queue`] if the device asks for an invalid queue size.
    pub fn new(device: Option<Box<dyn VirtioDevice>>) -> Result<Self, DeviceError> {
        let mut queues = Vec::new();
        if let Some(d) = &device {
            for &max in d.queue_max_sizes() {
                queues.push(Queue::new(max).map_err(|e| DeviceError::Queue(e.to_string()))?);
            }
        }
        Ok(VirtioMmio {
            device,
            queues,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            status: 0,
            interrupt_status: 0,
            completed: false,
        })
    }

    /// The device ID (0 for an empty slot).
    pub fn device_type(&self) -> u32 {
        self.device.as_ref().map_or(0, |d| d.device_type())
    }

    /// Whether a buffer was used since the last call.
    pub fn take_completed(&mut self) -> bool {
        std::mem::take(&mut self.completed)
    }

    /// Whether outside input can arrive for this device.
    pub fn has_input(&self) -> bool {
        self.device.as_ref().is_some_and(|d| d.has_input())
    }

    /// Delivers pending host input (live runs only); returns WAIT event bits.
    ///
    /// # Errors
    /// A [`DeviceError`] from the device.
    pub fn deliver_input(&mut self, ctx: &mut ExitCtx<'_>) -> Result<u64, DeviceError> {
        if ctx.is_replay() || self.status & 0x4 == 0 {
            return Ok(0);
        }
        let Some(dev) = self.device.as_mut() else {
            return Ok(0);
        };
        let ev = dev.deliver_input(&mut self.queues, ctx)?;
        if ev != 0 {
            self.interrupt_status |= 1;
        }
        Ok(ev)
    }

    /// Replay: lets the device compare what it did itself in exit `exit` with the primary's
    /// results, now in `mem` ([`VirtioDevice::check_replayed_exit`]).
    ///
    /// # Errors
    /// The device's [`DeviceError`].
    pub fn check_replayed_exit(&mut self, mem: &GuestMem, exit: u64) -> Result<(), DeviceError> {
        match self.device.as_mut() {
            Some(d) => d.check_replayed_exit(mem, exit),
            None => Ok(()),
        }
    }

    /// Sets each ready queue's positions from its used ring (replay).
    ///
    /// # Errors
    /// [`DeviceError::Queue`] if a used ring cannot be read.
    pub fn resync_queues(&mut self, mem: &GuestMem) -> Result<(), DeviceError> {
        for q in &mut self.queues {
            if !q.ready() {
                continue;
            }
            let used = q
                .used_idx(mem, std::sync::atomic::Ordering::Acquire)
                .map_err(|e| DeviceError::Queue(format!("used idx: {e}")))?;
            if used.0 != q.next_used() {
                self.interrupt_status |= 1;
            }
            q.set_next_used(used.0);
            q.set_next_avail(used.0);
        }
        Ok(())
    }

    fn selected(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn reset(&mut self) {
        for q in &mut self.queues {
            q.reset();
        }
        self.driver_features = 0;
        self.status = 0;
        self.interrupt_status = 0;
        self.queue_sel = 0;
    }
}

impl BusDevice for VirtioMmio {
    fn read(
        &mut self,
        _ctx: &mut ExitCtx<'_>,
        offset: u64,
        data: &mut [u8],
    ) -> Result<(), DeviceError> {
        if offset >= CONFIG {
            match &self.device {
                Some(d) => d.read_config(offset - CONFIG, data),
                None => data.fill(0),
            }
            return Ok(());
        }
        let Some(dev) = &self.device else {
            let v = match offset {
                MAGIC => MMIO_MAGIC,
                VERSION => MMIO_VERSION,
                _ => 0,
            };
            put_le(data, u64::from(v));
            return Ok(());
        };
        let v: u32 = match offset {
            MAGIC => MMIO_MAGIC,
            VERSION => MMIO_VERSION,
            DEVICE_ID => dev.device_type(),
            VENDOR => VENDOR_ID,
            DEVICE_FEATURES => match self.device_features_sel {
                0 => dev.features() as u32,
                1 => (dev.features() >> 32) as u32,
                _ => 0,
            },
            QUEUE_NUM_MAX => self
                .queues
                .get(self.queue_sel as usize)
                .map_or(0, |q| q.max_size().into()),
            QUEUE_READY => self
                .queues
                .get(self.queue_sel as usize)
                .map_or(0, |q| q.ready().into()),
            INTERRUPT_STATUS => self.interrupt_status,
            STATUS => self.status,
            CONFIG_GENERATION => 0,
            _ => 0,
        };
        put_le(data, u64::from(v));
        Ok(())
    }

    fn write(
        &mut self,
        ctx: &mut ExitCtx<'_>,
        offset: u64,
        data: &[u8],
    ) -> Result<ExitAction, DeviceError> {
        if self.device.is_none() || offset >= CONFIG {
            return Ok(ExitAction::Continue);
        }
        let v = le_value(data) as u32;
        match offset {
            DEVICE_FEATURES_SEL => self.device_features_sel = v,
            DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            DRIVER_FEATURES => match self.driver_features_sel {
                0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v),
                1 => {
                    self.driver_features =
                        (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32)
                }
                _ => {}
            },
            QUEUE_SEL => self.queue_sel = v,
            QUEUE_NUM if v != 0 => {
                // (0 is written when a driver releases a queue; keep the old size, the queue
                // is not ready then.)
                if let Some(q) = self.selected() {
                    q.set_size(v as u16);
                }
            }
            QUEUE_READY => {
                if let Some(q) = self.selected() {
                    q.set_ready(v == 1);
                }
            }
            QUEUE_DESC_LOW => self
                .selected()
                .into_iter()
                .for_each(|q| q.set_desc_table_address(Some(v), None)),
            QUEUE_DESC_HIGH => self
                .selected()
                .into_iter()
                .for_each(|q| q.set_desc_table_address(None, Some(v))),
            QUEUE_AVAIL_LOW => self
                .selected()
                .into_iter()
                .for_each(|q| q.set_avail_ring_address(Some(v), None)),
            QUEUE_AVAIL_HIGH => self
                .selected()
                .into_iter()
                .for_each(|q| q.set_avail_ring_address(None, Some(v))),
            QUEUE_USED_LOW => self
                .selected()
                .into_iter()
                .for_each(|q| q.set_used_ring_address(Some(v), None)),
            QUEUE_USED_HIGH => self
                .selected()
                .into_iter()
                .for_each(|q| q.set_used_ring_address(None, Some(v))),
            QUEUE_NOTIFY => {
                let idx = v as usize;
                if idx < self.queues.len() && self.status & 0x4 != 0 {
                    if let Some(dev) = self.device.as_mut() {
                        if dev.notify(idx, &mut self.queues, ctx)? {
                            self.interrupt_status |= 1;
                            self.completed = true;
                        }
                    }
                }
            }
            INTERRUPT_ACK => self.interrupt_status &= !v,
            STATUS => {
                if v == 0 {
                    self.reset();
                } else {
                    self.status = v;
                }
            }
            _ => tracing::trace!(offset, "write to read-only or unknown virtio-mmio register"),
        }
        Ok(ExitAction::Continue)
    }
}

impl VirtioMmio {
    /// The transport's and the device's state; `None` for an empty slot.
    ///
    /// # Errors
    /// The device's [`StateError`].
    pub fn save_state(&self) -> Result<Option<(TransportState, DeviceState)>, StateError> {
        let Some(dev) = &self.device else {
            return Ok(None);
        };
        let queues = self
            .queues
            .iter()
            .map(|q| {
                let s = q.state();
                QueueState {
                    max_size: s.max_size,
                    next_avail: s.next_avail,
                    next_used: s.next_used,
                    event_idx_enabled: s.event_idx_enabled,
                    size: s.size,
                    ready: s.ready,
                    desc_table: s.desc_table,
                    avail_ring: s.avail_ring,
                    used_ring: s.used_ring,
                }
            })
            .collect();
        let transport = TransportState {
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            status: self.status,
            interrupt_status: self.interrupt_status,
            completed: self.completed,
            queues,
        };
        Ok(Some((transport, dev.save_device()?)))
    }

    /// Restores what [`VirtioMmio::save_state`] captured; `None` must meet an empty slot.
    ///
    /// # Errors
    /// [`StateError::Mismatch`] if the slot holds another device (or none), another number of
    /// queues, or an invalid queue.
    pub fn restore_state(
        &mut self,
        state: Option<(&TransportState, &DeviceState)>,
    ) -> Result<(), StateError> {
        let (t, d) = match (state, &mut self.device) {
            (None, None) => return Ok(()),
            (Some((t, d)), Some(dev)) => {
                dev.restore_device(d)?;
                (t, d)
            }
            (s, dev) => {
                return Err(StateError::Mismatch(format!(
                    "the state has {:?} in a slot where this VM has device type {}",
                    s.map(|(_, d)| d),
                    dev.as_ref().map_or(0, |d| d.device_type())
                )))
            }
        };
        if t.queues.len() != self.queues.len() {
            return Err(StateError::Mismatch(format!(
                "{} queues in the state of {d:?}, the device has {}",
                t.queues.len(),
                self.queues.len()
            )));
        }
        for (q, s) in self.queues.iter_mut().zip(&t.queues) {
            let state = virtio_queue::QueueState {
                max_size: s.max_size,
                next_avail: s.next_avail,
                next_used: s.next_used,
                event_idx_enabled: s.event_idx_enabled,
                size: s.size,
                ready: s.ready,
                desc_table: s.desc_table,
                avail_ring: s.avail_ring,
                used_ring: s.used_ring,
            };
            *q = Queue::try_from(state)
                .map_err(|e| StateError::Mismatch(format!("invalid queue state: {e}")))?;
        }
        self.device_features_sel = t.device_features_sel;
        self.driver_features_sel = t.driver_features_sel;
        self.driver_features = t.driver_features;
        self.queue_sel = t.queue_sel;
        self.status = t.status;
        self.interrupt_status = t.interrupt_status;
        self.completed = t.completed;
        Ok(())
    }
}
