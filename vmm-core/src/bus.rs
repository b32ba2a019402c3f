//! The MMIO bus: which device answers an address, and the context an exit is handled in.
//!
//! ```text
//! 0xD000_0000  system device   (devices::sys)
//! 0xD000_1000  virtio-net      (devices::virtio::net behind devices::virtio::mmio)
//! 0xD000_2000  virtio-blk
//! 0xD000_3000  virtio-console
//! ```
//!
//! Threading and lock order: the bus and every device are owned by the vCPU thread and touched
//! only while it handles an exit, so no device is behind a lock. The only state shared with other
//! threads is a backend's host-side input queue (the TAP receive queue, a `Mutex` taken alone,
//! never while holding another lock) and the [`EventSignal`] that wakes a blocked WAIT.

use std::sync::{Condvar, Mutex};
use std::time::Instant;

use vm_memory::{Bytes, GuestAddress};

use crate::memory::GuestMem;
use crate::record::{Inputs, OutputDigest, OutputSource, ReplayError};

/// Size of each device's MMIO range.
pub const DEVICE_SIZE: u64 = ftvm_abi::MMIO_SLOT_SIZE;

/// Errors of device emulation during an exit.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The guest asked a device to access memory outside RAM.
    #[error("device access to guest memory at {addr:#x} (+{len}) is out of range")]
    GuestMemory {
        /// The address.
        addr: u64,
        /// The length.
        len: usize,
    },
    /// A backend I/O operation failed.
    #[error("{what}")]
    Backend {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The replay source failed.
    #[error("replay input")]
    Replay(#[source] ReplayError),
    /// A virtqueue operation failed.
    #[error("virtqueue: {0}")]
    Queue(String),
}

/// What an exit handled by a device asks the vCPU loop to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitAction {
    /// Resume the guest.
    Continue,
    /// Stop the VM with this exit code (POWER_OFF).
    PowerOff(u64),
}

/// Everything a device may touch while handling one exit.
#[derive(Debug)]
pub struct ExitCtx<'a> {
    /// Guest memory.
    pub mem: &'a GuestMem,
    /// Index of the current exit (0-based, counts every exit of the VM).
    pub exit: u64,
    /// Where outside inputs come from and go to.
    pub inputs: &'a mut Inputs,
}

impl ExitCtx<'_> {
    /// Whether the VM is replaying a log.
    pub fn is_replay(&self) -> bool {
        self.inputs.is_replay()
    }

    /// The value of an MMIO read at `addr` that comes from outside: `live()` when live (and
    /// recorded), the logged value when replaying.
    ///
    /// # Errors
    /// [`DeviceError::Replay`] if the log has no such read.
    pub fn external_read(
        &mut self,
        addr: u64,
        live: impl FnOnce() -> u64,
    ) -> Result<u64, DeviceError> {
        match self.inputs {
            Inputs::Live(rec) => {
                let v = live();
                rec.external_read(self.exit, addr, v);
                Ok(v)
            }
            Inputs::Replay(src) => src
                .external_read(self.exit, addr)
                .map_err(DeviceError::Replay),
        }
    }

    /// Whether outputs are digested in this run: a primary logs their digests, a replay that
    /// verifies outputs compares them; otherwise (a plain run, a side running alone) devices
    /// skip hashing.
    pub fn wants_outputs(&self) -> bool {
        match &*self.inputs {
            Inputs::Live(rec) => rec.wants_outputs(),
            Inputs::Replay(src) => src.verifies_outputs(),
        }
    }

    /// Reports the outputs a device is about to emit in this exit: `fill` adds them to an
    /// [`OutputDigest`] of `source` (it runs only if [`ExitCtx::wants_outputs`]; nothing is
    /// reported when it adds none). Live, the recorder logs the digest (a primary: before the
    /// outputs are tagged for the output rule, so the digest's log position is at most their
    /// tag); replaying, the source compares it with the digest the primary logged here.
    ///
    /// # Errors
    /// [`DeviceError::Replay`] with [`ReplayError::Diverged`] when the replayed output differs
    /// from the logged one. A log that ended before this output's digest is no error: the
    /// primary never released that output, and the replay goes live (or ends) at the end of
    /// the exit, as at any missing entry.
    pub fn output(
        &mut self,
        source: OutputSource,
        fill: impl FnOnce(&mut OutputDigest),
    ) -> Result<(), DeviceError> {
        if !self.wants_outputs() {
            return Ok(());
        }
        let mut d = OutputDigest::new(source);
        fill(&mut d);
        if d.is_empty() {
            return Ok(());
        }
        match self.inputs {
            Inputs::Live(rec) => {
                rec.output(self.exit, &d);
                Ok(())
            }
            Inputs::Replay(src) => match src.output(self.exit, &d) {
                Ok(()) | Err(ReplayError::Exhausted { .. }) => Ok(()),
                Err(e) => Err(DeviceError::Replay(e)),
            },
        }
    }

    /// Writes `data` into guest memory at `gpa` and reports it to the recorder.
    ///
    /// # Errors
    /// [`DeviceError::GuestMemory`] if the range is not RAM.
    pub fn write_guest(&mut self, gpa: u64, data: &[u8]) -> Result<(), DeviceError> {
        self.mem
            .write_slice(data, GuestAddress(gpa))
            .map_err(|_| DeviceError::GuestMemory {
                addr: gpa,
                len: data.len(),
            })?;
        if let Inputs::Live(rec) = self.inputs {
            rec.guest_write(self.exit, gpa, data);
        }
        Ok(())
    }

    /// Reports to the recorder `len` bytes at `gpa` that were written by code that writes guest
    /// memory directly (the `virtio-queue` used ring).
    ///
    /// # Errors
    /// [`DeviceError::GuestMemory`] if the range is not RAM.
    pub fn record_written(&mut self, gpa: u64, len: usize) -> Result<(), DeviceError> {
        if let Inputs::Live(rec) = self.inputs {
            let mut buf = vec![0u8; len];
            self.mem
                .read_slice(&mut buf, GuestAddress(gpa))
                .map_err(|_| DeviceError::GuestMemory { addr: gpa, len })?;
            rec.guest_write(self.exit, gpa, &buf);
        }
        Ok(())
    }

    /// Reads guest memory.
    ///
    /// # Errors
    /// [`DeviceError::GuestMemory`] if the range is not RAM.
    pub fn read_guest(&self, gpa: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        self.mem
            .read_slice(buf, GuestAddress(gpa))
            .map_err(|_| DeviceError::GuestMemory {
                addr: gpa,
                len: buf.len(),
            })
    }
}

/// A device on the MMIO bus. Offsets are relative to the device's base.
pub trait BusDevice: Send {
    /// Handles a read of `data.len()` bytes at `offset`.
    ///
    /// # Errors
    /// A [`DeviceError`] stops the VM.
    fn read(
        &mut self,
        ctx: &mut ExitCtx<'_>,
        offset: u64,
        data: &mut [u8],
    ) -> Result<(), DeviceError>;
    /// Handles a write at `offset`.
    ///
    /// # Errors
    /// A [`DeviceError`] stops the VM.
    fn write(
        &mut self,
        ctx: &mut ExitCtx<'_>,
        offset: u64,
        data: &[u8],
    ) -> Result<ExitAction, DeviceError>;
}

/// Wakes a vCPU blocked in WAIT: set by backends when input arrives and by the VM's controller
/// when it wants the vCPU back (pause, stop).
#[derive(Debug, Default)]
pub struct EventSignal {
    pending: Mutex<bool>,
    cv: Condvar,
}

impl EventSignal {
    /// Marks an event as pending and wakes the waiter.
    pub fn notify(&self) {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        *p = true;
        self.cv.notify_all();
    }

    /// Waits until an event is pending or `deadline` passes (`None`: no deadline), and clears
    /// the pending flag. Returns whether an event was pending.
    pub fn wait(&self, deadline: Option<Instant>) -> bool {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if *p {
                *p = false;
                return true;
            }
            match deadline {
                None => p = self.cv.wait(p).unwrap_or_else(|e| e.into_inner()),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return false;
                    }
                    p = self
                        .cv
                        .wait_timeout(p, d - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            }
        }
    }
}

/// Read a little-endian value of `data.len()` ≤ 8 bytes.
pub fn le_value(data: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = data.len().min(8);
    b[..n].copy_from_slice(&data[..n]);
    u64::from_le_bytes(b)
}

/// Fill `data` with the low bytes of `value`, little-endian.
pub fn put_le(data: &mut [u8], value: u64) {
    let b = value.to_le_bytes();
    let n = data.len().min(8);
    data[..n].copy_from_slice(&b[..n]);
    for x in data.iter_mut().skip(n) {
        *x = 0;
    }
}
