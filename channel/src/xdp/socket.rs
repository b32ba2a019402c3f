//! [`XdpTransport`]: one AF_XDP socket with its UMEM and its four rings.

use std::fmt;
use std::fs::File;
use std::mem::ManuallyDrop;
use std::num::NonZeroU32;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use xsk_rs::config::{
    BindFlags, FrameSize, Interface, QueueSize, SocketConfig, UmemConfig, XdpFlags,
};
use xsk_rs::{CompQueue, FillQueue, FrameDesc, RxQueue, Socket, TxQueue, Umem};

use super::eth::{self, Reject};
use super::sys;
use super::{bump, AttachMode, CopyMode, XdpConfig, XdpCounters, XdpError, XdpMode, XdpStats};
use crate::error::TransportError;
use crate::netns;
use crate::transport::Transport;

/// Bytes per UMEM frame for MTUs up to 1778 (the kernel's minimum chunk; holds a 1500-byte MTU
/// frame after the 256-byte XDP headroom).
const FRAME_SIZE: u32 = 2048;
/// Bytes per UMEM frame for larger MTUs (a page: the largest aligned chunk; MTU up to 3826).
const FRAME_SIZE_LARGE: u32 = 4096;
/// The XDP headroom the kernel keeps in front of every received frame.
const XDP_HEADROOM: u32 = 256;
/// Frames taken from the RX ring per `consume` call.
const RX_BATCH: usize = 64;

/// The kernel objects. Dropped explicitly, inside the namespace they were created in.
struct Xsk {
    // Field order is drop order: the rings hold the socket, which holds the UMEM; xsk-rs counts
    // references, so the UMEM is unregistered only after the socket is gone in any case.
    tx: TxQueue,
    rx: RxQueue,
    fq: FillQueue,
    cq: CompQueue,
    umem: Umem,
}

/// An AF_XDP [`Transport`]: raw Ethernet frames of EtherType `0x88B5` carrying one channel frame
/// each (see the [module docs](super)).
///
/// Owns the UMEM and the fill, completion, RX and TX rings; dropping it deletes the socket,
/// detaches the XDP program (inside the interface's namespace) and unmaps the UMEM.
pub struct XdpTransport {
    xsk: ManuallyDrop<Xsk>,
    /// The network namespace the socket was created in (for the teardown).
    netns: File,
    /// Transmit frames owned by us (not in the TX or completion ring).
    free_tx: Vec<FrameDesc>,
    /// Receive frames read and waiting to go back into the fill ring.
    fill_pending: Vec<FrameDesc>,
    /// Scratch descriptors for ring reads.
    scratch: Vec<FrameDesc>,
    /// Ethernet header + length template.
    header: [u8; eth::OVERHEAD],
    ethertype: u16,
    max_frame: usize,
    ring_size: u32,
    kick_batch: usize,
    /// Frames put on the TX ring since the last kick.
    unkicked: usize,
    mode: XdpMode,
    local_mac: [u8; 6],
    ifname: String,
    queue_id: u32,
    stats: Arc<XdpStats>,
}

impl fmt::Debug for XdpTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("XdpTransport")
            .field("ifname", &self.ifname)
            .field("queue_id", &self.queue_id)
            .field("mode", &self.mode)
            .field("max_frame", &self.max_frame)
            .field("counters", &self.stats.snapshot())
            .finish_non_exhaustive()
    }
}

/// How long to retry a bind that fails with EBUSY (see [`XdpTransport::open`]).
const BUSY_RETRY: Duration = Duration::from_secs(2);

fn is_busy(e: &xsk_rs::socket::SocketCreateError) -> bool {
    std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<std::io::Error>())
        .and_then(std::io::Error::raw_os_error)
        == Some(libc::EBUSY)
}

fn config_error(what: impl Into<String>) -> XdpError {
    XdpError::Config { what: what.into() }
}

impl XdpTransport {
    /// Creates the UMEM and the socket, binds it to `config.ifname` queue `config.queue_id`
    /// (inside `config.netns` when given: the calling thread enters it for the duration of this
    /// call), attaches the XDP program in the requested mode and fills the fill ring.
    ///
    /// # Errors
    /// [`XdpError`] when the namespace or interface does not exist, the configuration is not
    /// usable, or the kernel refuses the UMEM or the socket (not root, mode unsupported).
    pub fn open(config: &XdpConfig) -> Result<Self, XdpError> {
        let _entered = match &config.netns {
            Some(name) => Some(netns::enter_scoped(name)?),
            None => None,
        };
        let ring_size = config.ring_size;
        if !ring_size.is_power_of_two() || !(64..=16384).contains(&ring_size) {
            return Err(config_error(format!(
                "ring_size {ring_size} is not a power of two in 64..=16384"
            )));
        }
        if config.kick_batch == 0 {
            return Err(config_error("kick_batch is 0"));
        }
        let netns_file = sys::current_netns().map_err(|source| XdpError::Interface {
            ifname: config.ifname.clone(),
            source,
        })?;
        let info = sys::if_info(&config.ifname).map_err(|source| XdpError::Interface {
            ifname: config.ifname.clone(),
            source,
        })?;

        let qsize = |n: u32| QueueSize::new(n).map_err(|e| config_error(e.to_string()));
        // Large MTUs (jumbo frames on veth) carry several records per frame: use page-sized
        // UMEM frames when a 2 KiB one cannot hold a full-size Ethernet frame.
        let frame_size = if info.mtu + eth::ETH_HEADER_LEN as u32 + XDP_HEADROOM <= FRAME_SIZE {
            FRAME_SIZE
        } else {
            FRAME_SIZE_LARGE
        };
        let umem_config = UmemConfig::builder()
            .frame_size(FrameSize::new(frame_size).map_err(|e| config_error(e.to_string()))?)
            .fill_queue_size(qsize(2 * ring_size)?)
            .comp_queue_size(qsize(ring_size)?)
            .frame_headroom(0)
            .build()
            .map_err(|e| config_error(e.to_string()))?;
        // Largest Ethernet frame a UMEM frame holds (after the XDP headroom).
        let umem_mtu = umem_config.mtu() as usize;
        let frame_count =
            NonZeroU32::new(2 * ring_size).ok_or_else(|| config_error("ring_size is 0"))?;
        let (umem, descs) = Umem::new(umem_config, frame_count, false).map_err(XdpError::Umem)?;

        let mut bind = BindFlags::XDP_USE_NEED_WAKEUP;
        match (config.copy, config.attach) {
            // Generic XDP cannot do zero-copy: ask for copy mode outright.
            (CopyMode::Auto, AttachMode::Skb) | (CopyMode::Copy, _) => bind |= BindFlags::XDP_COPY,
            (CopyMode::Auto, AttachMode::Drv) => {} // the kernel tries zero-copy, else copies
            (CopyMode::ZeroCopy, _) => bind |= BindFlags::XDP_ZEROCOPY,
        }
        let xdp_flags = match config.attach {
            AttachMode::Skb => XdpFlags::XDP_FLAGS_SKB_MODE,
            AttachMode::Drv => XdpFlags::XDP_FLAGS_DRV_MODE,
        };
        let socket_config = SocketConfig::builder()
            .rx_queue_size(qsize(ring_size)?)
            .tx_queue_size(qsize(ring_size)?)
            .xdp_flags(xdp_flags)
            .bind_flags(bind)
            .build();
        let iface: Interface = config
            .ifname
            .parse()
            .map_err(|_| config_error(format!("interface name {:?}", config.ifname)))?;
        let socket_error = |source| XdpError::Socket {
            ifname: config.ifname.clone(),
            queue_id: config.queue_id,
            attach: config.attach,
            source,
        };
        // The kernel releases the buffer pool of a socket closed just before on the same queue
        // from a work queue: binding again at once can fail with EBUSY for a moment.
        let busy_until = Instant::now() + BUSY_RETRY;
        let (tx, mut rx, rings) = loop {
            // SAFETY: the UMEM was created just above and is not shared with any other socket,
            // so the (interface, queue) pair is not already bound through it.
            match unsafe { Socket::new(socket_config, &umem, &iface, config.queue_id) } {
                Ok(queues) => break queues,
                Err(e) if is_busy(&e) && Instant::now() < busy_until => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(socket_error(e)),
            }
        };
        let (mut fq, cq) = rings.ok_or_else(|| {
            config_error("the kernel returned no fill/completion rings for a fresh UMEM")
        })?;
        let zero_copy = sys::xdp_zero_copy(rx.fd().as_raw_fd()).map_err(XdpError::Options)?;

        let split = ring_size as usize;
        let rx_frames = &descs[..split];
        let free_tx = descs[split..].to_vec();
        // SAFETY: the receive frames belong to this UMEM and are in no ring yet.
        let filled = unsafe { fq.produce(rx_frames) };
        let fill_pending = rx_frames[filled..].to_vec();
        if fq.needs_wakeup() {
            fq.wakeup(rx.fd_mut(), 0).map_err(XdpError::Options)?;
        }

        let mode = XdpMode {
            attach: config.attach,
            zero_copy,
        };
        let max_frame = (info.mtu as usize).min(umem_mtu - eth::ETH_HEADER_LEN)
            - (eth::OVERHEAD - eth::ETH_HEADER_LEN);
        tracing::info!(
            ifname = %config.ifname,
            queue = config.queue_id,
            netns = config.netns.as_deref().unwrap_or("(current)"),
            %mode,
            mtu = info.mtu,
            max_frame,
            "AF_XDP socket bound"
        );
        let dst = config.peer_mac.unwrap_or(eth::BROADCAST);
        Ok(Self {
            xsk: ManuallyDrop::new(Xsk {
                tx,
                rx,
                fq,
                cq,
                umem,
            }),
            netns: netns_file,
            free_tx,
            fill_pending,
            scratch: vec![FrameDesc::default(); split.max(RX_BATCH)],
            header: eth::header_template(dst, info.mac, config.ethertype),
            ethertype: config.ethertype,
            max_frame,
            ring_size,
            kick_batch: config.kick_batch,
            unkicked: 0,
            mode,
            local_mac: info.mac,
            ifname: config.ifname.clone(),
            queue_id: config.queue_id,
            stats: Arc::new(XdpStats::default()),
        })
    }

    /// The mode the kernel gave the socket (attach mode, zero-copy or copy).
    #[must_use]
    pub fn mode(&self) -> XdpMode {
        self.mode
    }

    /// MAC address of the bound interface (the source of every frame sent).
    #[must_use]
    pub fn local_mac(&self) -> [u8; 6] {
        self.local_mac
    }

    /// Name of the bound interface.
    #[must_use]
    pub fn ifname(&self) -> &str {
        &self.ifname
    }

    /// A handle on the live counters, readable from other threads while a poller owns the
    /// transport (the kernel's counters are only in [`Self::counters`]).
    #[must_use]
    pub fn stats(&self) -> Arc<XdpStats> {
        Arc::clone(&self.stats)
    }

    /// Packet counters, ours and the kernel's (`XDP_STATISTICS`, read now).
    #[must_use]
    pub fn counters(&self) -> XdpCounters {
        let mut c = self.stats.snapshot();
        if let Ok(k) = self.xsk.rx.fd().xdp_statistics() {
            c.kernel_rx_dropped = k.rx_dropped();
            c.kernel_rx_ring_full = k.rx_ring_full();
            c.kernel_fill_ring_empty = k.rx_fill_ring_empty_descs();
            c.kernel_invalid_descs = k.rx_invalid_descs() + k.tx_invalid_descs();
        }
        c
    }

    /// Moves completed transmit frames back to the free list.
    fn reclaim(&mut self) {
        // SAFETY: the completion ring only returns frames of this UMEM that we put on the TX
        // ring; the kernel is done with them.
        let n = unsafe { self.xsk.cq.consume(&mut self.scratch) };
        self.free_tx.extend_from_slice(&self.scratch[..n]);
    }

    /// Frames on the TX ring the kernel has not taken yet.
    fn tx_queued(&mut self) -> u32 {
        self.ring_size - self.xsk.tx.nb_free_exact()
    }

    /// One `sendto` when the kernel asks for it (always in copy mode).
    fn kick(&mut self) -> Result<(), TransportError> {
        if self.xsk.tx.needs_wakeup() {
            self.xsk.tx.wakeup().map_err(|source| TransportError::Io {
                op: "sendto (AF_XDP kick)",
                source,
            })?;
            bump(&self.stats.tx_kicks, 1);
        }
        self.unkicked = self.unkicked.saturating_sub(self.kick_batch);
        Ok(())
    }

    /// Hands read receive frames back to the kernel.
    fn refill(&mut self) -> Result<(), TransportError> {
        if self.fill_pending.is_empty() {
            return Ok(());
        }
        // SAFETY: the pending frames belong to this UMEM, were taken from the RX ring and have
        // been read; nothing refers to them any more.
        let n = unsafe { self.xsk.fq.produce(&self.fill_pending) };
        self.fill_pending.drain(..n);
        if self.xsk.fq.needs_wakeup() {
            let xsk = &mut *self.xsk;
            xsk.fq
                .wakeup(xsk.rx.fd_mut(), 0)
                .map_err(|source| TransportError::Io {
                    op: "poll (AF_XDP fill ring wake-up)",
                    source,
                })?;
            bump(&self.stats.rx_wakeups, 1);
        }
        Ok(())
    }
}

impl Transport for XdpTransport {
    fn name(&self) -> &'static str {
        "xdp"
    }

    fn max_frame(&self) -> usize {
        self.max_frame
    }

    fn send(&mut self, frame: &[u8]) -> Result<bool, TransportError> {
        if frame.len() > self.max_frame {
            return Err(TransportError::FrameTooLarge {
                len: frame.len(),
                max: self.max_frame,
            });
        }
        if self.free_tx.is_empty() {
            self.reclaim();
        }
        let Some(mut desc) = self.free_tx.pop() else {
            // Every frame is in flight: make sure the kernel is working on them.
            bump(&self.stats.tx_full, 1);
            self.kick()?;
            return Ok(false);
        };
        let len = eth::OVERHEAD + frame.len();
        {
            // SAFETY: `desc` is a frame of this UMEM on our free list: neither ring holds it, so
            // the kernel does not access it while we write.
            let mut data = unsafe { self.xsk.umem.data_mut(&mut desc) };
            data.cursor().set_pos(len);
            if eth::encode(&self.header, frame, data.contents_mut()) != Some(len) {
                self.free_tx.push(desc);
                return Err(TransportError::FrameTooLarge {
                    len: frame.len(),
                    max: self.max_frame,
                });
            }
        }
        // SAFETY: `desc` describes a frame of this UMEM, written above, that no ring holds.
        if unsafe { self.xsk.tx.produce_one(&desc) } == 0 {
            self.free_tx.push(desc);
            bump(&self.stats.tx_full, 1);
            self.kick()?;
            return Ok(false);
        }
        bump(&self.stats.tx_frames, 1);
        self.unkicked += 1;
        if self.unkicked >= self.kick_batch {
            self.kick()?;
        }
        Ok(true)
    }

    fn flush(&mut self) -> Result<(), TransportError> {
        // A generic-mode kick sends at most 32 frames: kick until the kernel has taken every
        // frame from the TX ring (bounded, in case the device is busy and refuses more now).
        let mut budget = self.ring_size as usize / self.kick_batch + 2;
        while budget > 0 && self.tx_queued() > 0 {
            self.kick()?;
            budget -= 1;
        }
        self.unkicked = 0;
        if self.free_tx.len() < self.ring_size as usize / 2 {
            self.reclaim();
        }
        Ok(())
    }

    fn poll_recv(&mut self, on_frame: &mut dyn FnMut(&[u8])) -> Result<usize, TransportError> {
        let mut delivered = 0;
        let mut seen = 0;
        while seen < self.ring_size as usize {
            let batch = &mut self.scratch[..RX_BATCH];
            // SAFETY: the RX ring only returns frames of this UMEM that we put on the fill ring;
            // the kernel has finished writing them.
            let n = unsafe { self.xsk.rx.consume(batch) };
            if n == 0 {
                break;
            }
            seen += n;
            for desc in &self.scratch[..n] {
                // SAFETY: `desc` came from the RX ring just now and goes back to the fill ring
                // only after this loop, so the kernel does not write it while we read.
                let data = unsafe { self.xsk.umem.data(desc) };
                match eth::decode(data.contents(), self.ethertype) {
                    Ok(frame) => {
                        on_frame(frame);
                        delivered += 1;
                    }
                    Err(Reject::WrongEtherType) => bump(&self.stats.rx_wrong_ethertype, 1),
                    Err(Reject::Short) => bump(&self.stats.rx_short, 1),
                }
            }
            self.fill_pending.extend_from_slice(&self.scratch[..n]);
            self.refill()?;
        }
        bump(&self.stats.rx_frames, delivered as u64);
        if seen == 0 {
            // Frames the fill ring refused earlier still need to go back.
            self.refill()?;
        }
        Ok(delivered)
    }
}

impl Drop for XdpTransport {
    fn drop(&mut self) {
        tracing::debug!(ifname = %self.ifname, counters = ?self.counters(), "closing AF_XDP socket");
        // libxdp detaches the XDP program by interface index over netlink, from the calling
        // thread's namespace: do it from the namespace the socket was made in.
        let back = match sys::current_netns().and_then(|cur| sys::setns(&self.netns).map(|()| cur))
        {
            Ok(back) => back,
            Err(e) => {
                // Detaching from the wrong namespace could hit another interface with the same
                // index: leak the socket instead (the kernel frees it at exit).
                tracing::error!(ifname = %self.ifname, error = %e,
                    "cannot enter the AF_XDP socket's namespace; leaking the socket");
                return;
            }
        };
        // SAFETY: `xsk` is dropped exactly once, here, and never used afterwards.
        unsafe { ManuallyDrop::drop(&mut self.xsk) };
        if let Err(e) = sys::setns(&back) {
            tracing::error!(error = %e, "could not move the thread back to its network namespace");
        }
    }
}
