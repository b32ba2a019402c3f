//! virtio-net with a TAP backend: queue 0 RX, queue 1 TX, `VIRTIO_NET_F_MAC`.
//!
//! ```text
//! TAP fd ──(backend thread: poll + read)──> host RX queue (Mutex<VecDeque>, bounded)
//!                                              │ signal.notify()
//! vCPU thread, WAIT read or RX QueueNotify ────┘ copy into guest RX buffers (recorded)
//! vCPU thread, TX QueueNotify ──> strip the 12-byte virtio-net header ──> write(TAP fd)
//! ```
//! Every packet is prefixed in guest memory by the 12-byte `virtio_net_hdr_v1` (all zero except
//! `num_buffers = 1`).

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use virtio_queue::{Queue, QueueT};

use super::{
    add_used, pop_chain, read_config_space, read_from_chain, write_to_chain, VirtioDevice,
    VIRTIO_F_VERSION_1,
};
use crate::bus::{DeviceError, EventSignal, ExitCtx};
use crate::devices::sys::EVENT_NET_RX;
use crate::state::{StateError, StateReader, StateWriter};

/// `VIRTIO_NET_F_MAC`.
pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
/// Size of `virtio_net_hdr_v1`.
pub const NET_HDR_LEN: usize = 12;
/// Default guest MAC address.
pub const DEFAULT_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
/// Largest frame handled (no offloads).
pub const MAX_FRAME: usize = 1514;
/// Host RX queue bound; older packets are dropped beyond it.
pub const HOST_RX_CAPACITY: usize = 1024;
const QUEUE_SIZES: &[u16] = &[256, 256];
/// `VIRTQ_USED_F_NO_NOTIFY`: the driver need not notify the device of new available buffers.
const VIRTQ_USED_F_NO_NOTIFY: u16 = 1;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: i16 = 0x0002;
const IFF_NO_PI: i16 = 0x1000;

/// Errors opening a TAP device.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// /dev/net/tun could not be opened.
    #[error("cannot open /dev/net/tun")]
    Open(#[source] std::io::Error),
    /// The interface name is empty or longer than 15 bytes.
    #[error("invalid TAP interface name {0:?}")]
    Name(String),
    /// TUNSETIFF failed (the interface is busy, or no permission).
    #[error("TUNSETIFF {0}")]
    SetIff(String, #[source] std::io::Error),
    /// Starting the receive thread failed.
    #[error("cannot start the TAP receive thread")]
    Thread(#[source] std::io::Error),
}

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: i16,
    _pad: [u8; 22],
}

/// A TAP interface and its receive thread.
#[derive(Debug)]
pub struct Tap {
    name: String,
    file: File,
    rx: Arc<Mutex<VecDeque<Vec<u8>>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Tap {
    /// Opens (or creates) the TAP interface `name` and starts its receive thread, which
    /// notifies `signal` for each packet.
    ///
    /// # Errors
    /// [`TapError`].
    pub fn open(name: &str, signal: Arc<EventSignal>) -> Result<Self, TapError> {
        if name.is_empty() || name.len() > 15 {
            return Err(TapError::Name(name.into()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::Open)?;
        let mut req = IfReq {
            name: [0; 16],
            flags: IFF_TAP | IFF_NO_PI,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes a `struct ifreq` (40 bytes); `req` is a live,
        // properly sized repr(C) struct with the name NUL-terminated.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) };
        if rc < 0 {
            return Err(TapError::SetIff(
                name.into(),
                std::io::Error::last_os_error(),
            ));
        }
        let rx = Arc::new(Mutex::new(VecDeque::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let reader = file.try_clone().map_err(TapError::Thread)?;
        let thread = {
            let (rx, stop) = (rx.clone(), stop.clone());
            std::thread::Builder::new()
                .name(format!("tap-rx-{name}"))
                .spawn(move || rx_loop(reader, &rx, &stop, &signal))
                .map_err(TapError::Thread)?
        };
        Ok(Tap {
            name: name.into(),
            file,
            rx,
            stop,
            thread: Some(thread),
        })
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

fn rx_loop(mut file: File, rx: &Mutex<VecDeque<Vec<u8>>>, stop: &AtomicBool, signal: &EventSignal) {
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::Acquire) {
        let mut pfd = libc::pollfd {
            fd: file.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `pfd` is one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, 100) };
        if n <= 0 {
            continue;
        }
        loop {
            match file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    let mut q = rx.lock().unwrap_or_else(|e| e.into_inner());
                    if q.len() >= HOST_RX_CAPACITY {
                        q.pop_front();
                    }
                    q.push_back(buf[..n].to_vec());
                    drop(q);
                    signal.notify();
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::error!(error = %e, "TAP read failed; receive thread stops");
                    return;
                }
            }
        }
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The virtio-net device.
#[derive(Debug)]
pub struct Net {
    mac: [u8; 6],
    tap: Option<Tap>,
    rx_packets: u64,
    tx_packets: u64,
}

impl Net {
    /// A net device on `tap` (`None`: not connected; TX is dropped, nothing is received).
    pub fn new(tap: Option<Tap>, mac: [u8; 6]) -> Self {
        Net {
            mac,
            tap,
            rx_packets: 0,
            tx_packets: 0,
        }
    }

    /// Sets `VIRTQ_USED_F_NO_NOTIFY` in the RX used ring unless it is set: RX buffers are
    /// taken only at a WAIT read, so the driver's notify when it re-posts a buffer would be a
    /// VM exit for nothing (the first notify, when the driver sets the queue up, sets it). A
    /// guest-memory write at an exit on the vCPU thread, recorded like every device write.
    fn suppress_rx_notify(queues: &[Queue], ctx: &mut ExitCtx<'_>) -> Result<(), DeviceError> {
        let Some(q) = queues.first().filter(|q| q.ready()) else {
            return Ok(());
        };
        let used = q.used_ring();
        let mut flags = [0u8; 2];
        ctx.read_guest(used, &mut flags)?;
        let flags = u16::from_le_bytes(flags);
        if flags & VIRTQ_USED_F_NO_NOTIFY == 0 {
            ctx.write_guest(used, &(flags | VIRTQ_USED_F_NO_NOTIFY).to_le_bytes())?;
        }
        Ok(())
    }

    /// Packets received / sent so far.
    pub fn counters(&self) -> (u64, u64) {
        (self.rx_packets, self.tx_packets)
    }

    fn fill_rx(
        &mut self,
        queues: &mut [Queue],
        ctx: &mut ExitCtx<'_>,
    ) -> Result<bool, DeviceError> {
        if self.tap.is_none() {
            return Ok(false);
        }
        Self::suppress_rx_notify(queues, ctx)?;
        let Some(tap) = &self.tap else {
            return Ok(false);
        };
        let mut used = false;
        loop {
            let packet = {
                let mut q = tap.rx.lock().unwrap_or_else(|e| e.into_inner());
                if q.is_empty() {
                    break;
                }
                let Some((head, descs)) = pop_chain(&mut queues[0], ctx.mem)? else {
                    break;
                };
                let p = q.pop_front().unwrap_or_default();
                (head, descs, p)
            };
            let (head, descs, p) = packet;
            let mut frame = vec![0u8; NET_HDR_LEN];
            frame[10] = 1;
            frame.extend_from_slice(&p);
            let n = write_to_chain(&descs, ctx, &frame)?;
            add_used(&mut queues[0], ctx, head, n as u32)?;
            self.rx_packets += 1;
            used = true;
        }
        Ok(used)
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        1
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC
    }
    fn queue_max_sizes(&self) -> &'static [u16] {
        QUEUE_SIZES
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut cfg = [0u8; 10];
        cfg[..6].copy_from_slice(&self.mac);
        cfg[6] = 1; // status: VIRTIO_NET_S_LINK_UP
        read_config_space(&cfg, offset, data);
    }
    fn notify(
        &mut self,
        index: usize,
        queues: &mut [Queue],
        ctx: &mut ExitCtx<'_>,
    ) -> Result<bool, DeviceError> {
        if index == 0 {
            return if ctx.is_replay() {
                Ok(false)
            } else {
                self.fill_rx(queues, ctx)
            };
        }
        let mut used = false;
        while let Some((head, descs)) = pop_chain(&mut queues[1], ctx.mem)? {
            let frame = read_from_chain(&descs, ctx, NET_HDR_LEN + 65536)?;
            if frame.len() > NET_HDR_LEN && !ctx.is_replay() {
                if let Some(tap) = &mut self.tap {
                    if let Err(e) = tap.file.write(&frame[NET_HDR_LEN..]) {
                        tracing::debug!(error = %e, "TAP write failed, packet dropped");
                    }
                }
            }
            self.tx_packets += 1;
            add_used(&mut queues[1], ctx, head, 0)?;
            used = true;
        }
        Ok(used)
    }
    fn deliver_input(
        &mut self,
        queues: &mut [Queue],
        ctx: &mut ExitCtx<'_>,
    ) -> Result<u64, DeviceError> {
        Ok(if self.fill_rx(queues, ctx)? {
            EVENT_NET_RX
        } else {
            0
        })
    }
    fn has_input(&self) -> bool {
        self.tap.is_some()
    }
    fn save_device(&self, w: &mut StateWriter) -> Result<(), StateError> {
        w.bytes(&self.mac);
        w.u64(self.rx_packets);
        w.u64(self.tx_packets);
        Ok(())
    }
    fn restore_device(&mut self, r: &mut StateReader<'_>) -> Result<(), StateError> {
        let mac = r.bytes("net mac")?;
        self.mac = mac
            .try_into()
            .map_err(|_| StateError::Mismatch("net MAC length".into()))?;
        self.rx_packets = r.u64("net rx")?;
        self.tx_packets = r.u64("net tx")?;
        Ok(())
    }
}
