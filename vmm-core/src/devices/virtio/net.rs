//! virtio-net with a TAP backend: queue 0 RX, queue 1 TX, `VIRTIO_NET_F_MAC`.
//!
//! ```text
//! TAP fd ──(backend thread: poll + read)──> host RX queue (Mutex<VecDeque>, bounded)
//!                                              │ signal.notify()
//! vCPU thread, WAIT read or RX QueueNotify ────┘ copy into guest RX buffers (recorded)
//! vCPU thread, TX QueueNotify ──> strip the 12-byte virtio-net header ──> TX sink:
//!     Direct: write(TAP fd) │ Gated: OutputGate (written by its releaser once acknowledged)
//!     │ Drop (a replaying backup)
//! ```
//! The TAP and the TX sink are held in a [`NetHandle`] shared with the VMM, so that fault
//! tolerance can switch them while the VM runs: the primary gates its transmits under the output
//! rule and switches to [`TxMode::Direct`] when it runs alone; a backup that goes live attaches
//! the service TAP ([`NetHandle::attach_tap`]) and transmits directly.
//! Every packet is prefixed in guest memory by the 12-byte `virtio_net_hdr_v1` (all zero except
//! `num_buffers = 1`).

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use virtio_queue::{Queue, QueueT};

use super::{
    add_used, pop_chain, read_config_space, read_from_chain, write_to_chain, VirtioDevice,
    VIRTIO_F_VERSION_1,
};
use crate::bus::{DeviceError, EventSignal, ExitCtx};
use crate::devices::sys::EVENT_NET_RX;
use crate::record::OutputSource;
use crate::state::{DeviceState, NetState, Persist, StateError};

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

    /// Writes one frame (without virtio-net header) to the interface.
    ///
    /// # Errors
    /// The I/O error of the write (the interface is down, its queue is full).
    pub fn write_frame(&self, frame: &[u8]) -> std::io::Result<usize> {
        (&self.file).write(frame)
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

/// Holds transmitted frames back until the log position they are tagged with is acknowledged
/// (the primary's output rule, implemented by `ftvm_ft::output::OutputGate`).
pub trait TxGate: Send + Sync {
    /// The tag of an output produced now: the current log position.
    fn tag(&self) -> u64;
    /// Takes `frame` (without virtio-net header), tagged `tag`; the gate writes it to the TAP
    /// once `tag` is acknowledged.
    fn submit(&self, tag: u64, frame: Vec<u8>);
}

/// Where the frames the guest transmits go.
#[derive(Clone, Default)]
pub enum TxMode {
    /// Written to the TAP at once (a plain run, a backup after go-live, a primary alone).
    #[default]
    Direct,
    /// Handed to a gate with the log position current when the guest notified the TX queue.
    Gated(Arc<dyn TxGate>),
    /// Dropped (a backup that replays; replayed transmits are always dropped anyway).
    Drop,
}

impl std::fmt::Debug for TxMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TxMode::Direct => "Direct",
            TxMode::Gated(_) => "Gated",
            TxMode::Drop => "Drop",
        })
    }
}

/// A function writing frames to a net device's TAP ([`NetHandle::frame_writer`]).
pub type FrameWriter = Box<dyn FnMut(&[u8]) + Send>;

/// Transmit counters of a [`NetHandle`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct TxCounters {
    /// Frames written to the TAP by the vCPU ([`TxMode::Direct`]).
    pub direct: u64,
    /// Frames handed to a gate ([`TxMode::Gated`]).
    pub gated: u64,
    /// Frames dropped (replay, [`TxMode::Drop`], no TAP, or the TAP write failed).
    pub dropped: u64,
}

#[derive(Debug)]
struct NetShared {
    tap: Mutex<Option<Arc<Tap>>>,
    mode: Mutex<TxMode>,
    signal: Arc<EventSignal>,
    direct: AtomicU64,
    gated: AtomicU64,
    dropped: AtomicU64,
}

/// The parts of a virtio-net device the VMM may change while the VM runs: its TAP and its
/// transmit sink. Cheap to clone.
///
/// Lock order: the TX mode, then the TAP (the vCPU writes a direct frame holding both; a gate's
/// releaser takes only the TAP).
#[derive(Debug, Clone)]
pub struct NetHandle(Arc<NetShared>);

impl NetHandle {
    fn new(tap: Option<Tap>, signal: Arc<EventSignal>) -> Self {
        NetHandle(Arc::new(NetShared {
            tap: Mutex::new(tap.map(Arc::new)),
            mode: Mutex::new(TxMode::Direct),
            signal,
            direct: AtomicU64::new(0),
            gated: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        }))
    }

    fn tap(&self) -> Option<Arc<Tap>> {
        self.0.tap.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The current transmit mode.
    pub fn tx_mode(&self) -> TxMode {
        self.0
            .mode
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Sets the transmit mode.
    pub fn set_tx(&self, mode: TxMode) {
        self.switch_tx(mode, || ());
    }

    /// Sets the transmit mode after running `before` while no frame can be transmitted (the
    /// vCPU's transmits wait for the switch): e.g. flush a gate before going direct, so that
    /// frames leave in the order the guest sent them.
    pub fn switch_tx(&self, mode: TxMode, before: impl FnOnce()) {
        let mut m = self.0.mode.lock().unwrap_or_else(|e| e.into_inner());
        before();
        tracing::info!(from = ?*m, to = ?mode, "virtio-net transmit mode");
        *m = mode;
    }

    /// Opens the TAP interface `name` (an existing persistent one, or a new one) and makes it
    /// the device's backend: received packets are delivered from now on, transmits go to it.
    /// A previously attached TAP is closed.
    ///
    /// # Errors
    /// [`TapError`].
    pub fn attach_tap(&self, name: &str) -> Result<(), TapError> {
        let tap = Arc::new(Tap::open(name, self.0.signal.clone())?);
        *self.0.tap.lock().unwrap_or_else(|e| e.into_inner()) = Some(tap);
        self.0.signal.notify();
        Ok(())
    }

    /// The name of the attached TAP, if any.
    pub fn tap_name(&self) -> Option<String> {
        self.tap().map(|t| t.name().to_string())
    }

    /// Writes `frame` to the attached TAP (a gate's sink); returns whether it was written.
    pub fn write_frame(&self, frame: &[u8]) -> bool {
        let Some(tap) = self.tap() else {
            return false;
        };
        match tap.write_frame(frame) {
            Ok(_) => true,
            Err(e) => {
                tracing::debug!(error = %e, "TAP write failed, packet dropped");
                false
            }
        }
    }

    /// A function writing frames to the TAP attached at the time of each call (a gate's sink).
    /// It holds the device weakly: a gate stored in the device's own TX mode does not keep the
    /// device (and its TAP) alive.
    pub fn frame_writer(&self) -> FrameWriter {
        let weak = Arc::downgrade(&self.0);
        Box::new(move |frame: &[u8]| {
            if let Some(shared) = weak.upgrade() {
                NetHandle(shared).write_frame(frame);
            }
        })
    }

    /// Transmit counters.
    pub fn tx_counters(&self) -> TxCounters {
        TxCounters {
            direct: self.0.direct.load(Ordering::Relaxed),
            gated: self.0.gated.load(Ordering::Relaxed),
            dropped: self.0.dropped.load(Ordering::Relaxed),
        }
    }
}

/// The virtio-net device.
#[derive(Debug)]
pub struct Net {
    mac: [u8; 6],
    shared: NetHandle,
    rx_packets: u64,
    tx_packets: u64,
}

impl Net {
    /// A net device on `tap` (`None`: not connected; TX is dropped, nothing is received until a
    /// TAP is attached through the [`NetHandle`]). `signal` wakes a blocked WAIT when a packet
    /// arrives on a TAP attached later.
    pub fn new(tap: Option<Tap>, mac: [u8; 6], signal: Arc<EventSignal>) -> Self {
        Net {
            mac,
            shared: NetHandle::new(tap, signal),
            rx_packets: 0,
            tx_packets: 0,
        }
    }

    /// The handle to switch the TAP and the transmit mode while the VM runs.
    pub fn handle(&self) -> NetHandle {
        self.shared.clone()
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
        let Some(tap) = self.shared.tap() else {
            return Ok(false);
        };
        Self::suppress_rx_notify(queues, ctx)?;
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
        let shared = &self.shared.0;
        let mode = shared.mode.lock().unwrap_or_else(|e| e.into_inner());
        let mut frames = Vec::new();
        let mut used = false;
        while let Some((head, descs)) = pop_chain(&mut queues[1], ctx.mem)? {
            let mut frame = read_from_chain(&descs, ctx, NET_HDR_LEN + 65536)?;
            if frame.len() > NET_HDR_LEN {
                frame.drain(..NET_HDR_LEN);
                frames.push(frame);
            }
            self.tx_packets += 1;
            add_used(&mut queues[1], ctx, head, 0)?;
            used = true;
        }
        // The frames' digest goes into the log first (a replay compares it with the primary's)
        // ...
        ctx.output(OutputSource::Net, |d| {
            for f in &frames {
                d.add(f);
            }
        })?;
        // ... then the output rule's tag: the log position now, which covers every entry of
        // this exit, the digest included (the guest wrote the frames before notifying).
        let tag = match &*mode {
            TxMode::Gated(gate) if !ctx.is_replay() => gate.tag(),
            _ => 0,
        };
        let tap = match &*mode {
            TxMode::Direct if !ctx.is_replay() => self.shared.tap(),
            _ => None,
        };
        for payload in frames {
            let sent = match (&*mode, &tap) {
                _ if ctx.is_replay() => false,
                (TxMode::Gated(gate), _) => {
                    gate.submit(tag, payload);
                    shared.gated.fetch_add(1, Ordering::Relaxed);
                    true
                }
                (TxMode::Direct, Some(tap)) => match tap.write_frame(&payload) {
                    Ok(_) => {
                        shared.direct.fetch_add(1, Ordering::Relaxed);
                        true
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "TAP write failed, packet dropped");
                        false
                    }
                },
                _ => false,
            };
            if !sent {
                shared.dropped.fetch_add(1, Ordering::Relaxed);
            }
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
        self.shared
            .0
            .tap
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }
    fn save_device(&self) -> Result<DeviceState, StateError> {
        self.save().map(DeviceState::Net)
    }
    fn restore_device(&mut self, state: &DeviceState) -> Result<(), StateError> {
        match state {
            DeviceState::Net(s) => self.restore(s),
            other => Err(super::wrong_device("virtio-net", other)),
        }
    }
}

/// The guest-visible state only: frames the TAP received that the guest has not been given
/// yet stay with the backend they arrived on (like frames on a wire). The side that goes on
/// recording after a transfer delivers (and logs) them; a migrated VM loses them, as a network
/// may, and TCP sends them again.
impl Persist for Net {
    type State = NetState;
    fn save(&self) -> Result<NetState, StateError> {
        Ok(NetState {
            mac: self.mac,
            rx_packets: self.rx_packets,
            tx_packets: self.tx_packets,
        })
    }
    fn restore(&mut self, s: &NetState) -> Result<(), StateError> {
        self.mac = s.mac;
        self.rx_packets = s.rx_packets;
        self.tx_packets = s.tx_packets;
        Ok(())
    }
}
