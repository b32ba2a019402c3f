//! virtio devices (virtio 1.x) behind the modern MMIO transport.

pub mod blk;
pub mod console;
pub mod mmio;
pub mod net;
pub mod owner;

use virtio_queue::{Queue, QueueT};

use crate::bus::{DeviceError, ExitCtx};
use crate::memory::GuestMem;
use crate::state::{DeviceState, StateError};

/// `VIRTIO_F_VERSION_1`: the modern interface.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// One descriptor of a chain, copied out of guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Desc {
    /// Guest address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// Whether the device writes it.
    pub write: bool,
}

/// A virtio device model (the transport handles registers and queue setup).
pub trait VirtioDevice: Send + std::fmt::Debug {
    /// virtio device ID (1 net, 2 blk, 3 console).
    fn device_type(&self) -> u32;
    /// Feature bits offered (including [`VIRTIO_F_VERSION_1`]).
    fn features(&self) -> u64;
    /// Maximum size of each queue (its length is the number of queues).
    fn queue_max_sizes(&self) -> &'static [u16];
    /// Reads the device configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// The driver notified queue `index`: process it. Returns whether a buffer was used.
    ///
    /// # Errors
    /// A [`DeviceError`] stops the VM.
    fn notify(
        &mut self,
        index: usize,
        queues: &mut [Queue],
        ctx: &mut ExitCtx<'_>,
    ) -> Result<bool, DeviceError>;
    /// Copies pending host input (received packets) into the guest; returns WAIT event bits.
    /// Never called when replaying (the log supplies those writes).
    ///
    /// # Errors
    /// A [`DeviceError`] stops the VM.
    fn deliver_input(
        &mut self,
        queues: &mut [Queue],
        ctx: &mut ExitCtx<'_>,
    ) -> Result<u64, DeviceError>;
    /// Whether input can arrive from outside (a WAIT without deadline may then block).
    fn has_input(&self) -> bool;
    /// Replay: the logged writes of exit `exit` were just applied to `mem` (before any go-live
    /// decision at that exit). A device that performed part of the exit itself — a backup's
    /// virtio-blk on its own copy of the disk — compares its results with the primary's, which
    /// those writes put in place. Default: nothing to compare.
    ///
    /// # Errors
    /// A [`DeviceError`] (a result differs) stops the VM.
    fn check_replayed_exit(&mut self, mem: &GuestMem, exit: u64) -> Result<(), DeviceError> {
        let _ = (mem, exit);
        Ok(())
    }
    /// The device-specific state (not the transport's): each device implements
    /// [`Persist`](crate::state::Persist) with its own state struct and wraps it here.
    ///
    /// # Errors
    /// [`StateError`].
    fn save_device(&self) -> Result<DeviceState, StateError>;
    /// Restores what [`VirtioDevice::save_device`] returned.
    ///
    /// # Errors
    /// [`StateError::Mismatch`] if it is another kind of device's state, or does not fit.
    fn restore_device(&mut self, state: &DeviceState) -> Result<(), StateError>;
}

/// Answers a driver's read of `data.len()` bytes (at most 8) at `offset` in a device's
/// configuration space `cfg`; bytes past its end read as zero.
pub fn read_config_space(cfg: &[u8], offset: u64, data: &mut [u8]) {
    let v = usize::try_from(offset)
        .ok()
        .and_then(|o| cfg.get(o..))
        .unwrap_or(&[]);
    let mut b = [0u8; 8];
    let n = v.len().min(data.len()).min(8);
    b[..n].copy_from_slice(&v[..n]);
    crate::bus::put_le(data, u64::from_le_bytes(b));
}

/// Copies the descriptors of the next available chain of `queue`, if any.
///
/// # Errors
/// [`DeviceError::Queue`] on a malformed chain.
pub fn pop_chain(
    queue: &mut Queue,
    mem: &GuestMem,
) -> Result<Option<(u16, Vec<Desc>)>, DeviceError> {
    if !queue.ready() {
        return Ok(None);
    }
    let Some(chain) = queue.pop_descriptor_chain(mem) else {
        return Ok(None);
    };
    let head = chain.head_index();
    let mut descs = Vec::new();
    for d in chain {
        if descs.len() >= usize::from(queue.size()) {
            return Err(DeviceError::Queue(
                "descriptor chain longer than the queue".into(),
            ));
        }
        descs.push(Desc {
            addr: d.addr().0,
            len: d.len(),
            write: d.is_write_only(),
        });
    }
    Ok(Some((head, descs)))
}

/// Puts `head` in the used ring with `len` bytes written, and reports the ring bytes written
/// (the element and `used.idx`) to the recorder.
///
/// # Errors
/// [`DeviceError::Queue`] if the used ring is not in RAM.
pub fn add_used(
    queue: &mut Queue,
    ctx: &mut ExitCtx<'_>,
    head: u16,
    len: u32,
) -> Result<(), DeviceError> {
    let slot = u64::from(queue.next_used() % queue.size());
    queue
        .add_used(ctx.mem, head, len)
        .map_err(|e| DeviceError::Queue(format!("add_used: {e}")))?;
    let used = queue.used_ring();
    ctx.record_written(used + 4 + slot * 8, 8)?;
    ctx.record_written(used + 2, 2)?;
    Ok(())
}

/// Writes `data` into the device-writable descriptors of a chain, in order; returns the bytes
/// written.
///
/// # Errors
/// [`DeviceError::GuestMemory`].
pub fn write_to_chain(
    descs: &[Desc],
    ctx: &mut ExitCtx<'_>,
    mut data: &[u8],
) -> Result<usize, DeviceError> {
    let mut written = 0;
    for d in descs.iter().filter(|d| d.write) {
        if data.is_empty() {
            break;
        }
        let n = data.len().min(d.len as usize);
        ctx.write_guest(d.addr, &data[..n])?;
        data = &data[n..];
        written += n;
    }
    Ok(written)
}

/// Reads all device-readable descriptors of a chain into one buffer (at most `limit` bytes).
///
/// # Errors
/// [`DeviceError::GuestMemory`].
pub fn read_from_chain(
    descs: &[Desc],
    ctx: &ExitCtx<'_>,
    limit: usize,
) -> Result<Vec<u8>, DeviceError> {
    let mut out = Vec::new();
    for d in descs.iter().filter(|d| !d.write) {
        let n = (d.len as usize).min(limit - out.len());
        let start = out.len();
        out.resize(start + n, 0);
        ctx.read_guest(d.addr, &mut out[start..])?;
        if out.len() >= limit {
            break;
        }
    }
    Ok(out)
}

/// The error of restoring `found` into a device of another kind (`what`).
pub(crate) fn wrong_device(what: &str, found: &DeviceState) -> StateError {
    StateError::Mismatch(format!("{what} cannot take the state {found:?}"))
}
