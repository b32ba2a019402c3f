//! AF_XDP transport: channel frames as raw Ethernet frames (EtherType `0x88B5`), one channel
//! frame per Ethernet frame, through an `AF_XDP` socket bound to one queue of one interface.
//!
//! ```text
//!  poller ──send()──▶ free TX frames ─▶ TX ring ──kick (sendto, every 32 frames)──▶ NIC / veth
//!        ◀─poll_recv()── RX ring ◀── kernel ◀── fill ring ◀── frames handed back after reading
//!                        completion ring ──▶ free TX frames (reclaimed when the free list is empty)
//!                        ┌──────────────── UMEM (2·ring_size frames of 2 KiB) ───────────────┐
//!                        │ first half: receive frames      │ second half: transmit frames    │
//!                        └─────────────────────────────────────────────────────────────────┘
//! ```
//!
//! The transport knows nothing of the protocol: fragmentation, sequence numbers, CRCs, acks and
//! retransmission are the channel's frame and reliability layers, shared with every other
//! transport. [`XdpTransport::max_frame`](crate::Transport::max_frame) is the interface MTU minus
//! the 2-byte length of the envelope ([`eth`]); frames whose EtherType is not ours or that are
//! truncated are dropped and counted ([`XdpCounters`]).
//!
//! Pitfalls handled (measured on these machines, the project's measurement notes, `shared/RECIPES.md` "AF_XDP", kept outside this repository):
//! - the fill ring is twice the number of receive frames, so it never looks full (the kernel
//!   publishes its consumer position late), and frames it did not take are kept in a list and
//!   handed back on the next call rather than lost;
//! - in copy mode every transmit needs a `sendto` kick and the kernel sends at most 32 frames per
//!   kick: the transport kicks once per [`XdpConfig::kick_batch`] frames and `flush` kicks until
//!   the TX ring is drained; `XDP_USE_NEED_WAKEUP` is always requested and the flags honoured, so
//!   a zero-copy driver that needs no kick costs no system call;
//! - the socket is created, and its XDP program detached again on drop, inside the network
//!   namespace of the interface (`setns` on the calling thread, restored afterwards) — detaching
//!   from another namespace would address the wrong interface index.
//!
//! Needs root (`CAP_NET_ADMIN`, `CAP_SYS_ADMIN` for `setns`, `CAP_BPF`) and the Debian packages
//! `libelf-dev clang m4 libpcap-dev` to build `xsk-rs`' bundled libxdp.

pub mod eth;
mod socket;
pub mod sys;
pub mod veth;

pub use socket::XdpTransport;

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::error::TransportError;
use crate::netns::NetnsError;

/// How the XDP program that redirects frames to the socket is attached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AttachMode {
    /// Generic XDP (`XDP_FLAGS_SKB_MODE`): works on every interface, copy mode only. The
    /// fastest mode on veth on these machines (measured here: 2.6 µs RTT vs 3.3 µs for DRV).
    #[default]
    Skb,
    /// Native XDP in the driver (`XDP_FLAGS_DRV_MODE`); zero-copy where the driver supports it.
    Drv,
}

impl fmt::Display for AttachMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Skb => "skb",
            Self::Drv => "drv",
        })
    }
}

/// Whether frames are copied between the UMEM and the driver's buffers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CopyMode {
    /// Zero-copy where the kernel can, copy otherwise (`XDP_COPY` in SKB mode, where zero-copy
    /// is impossible; no flag in DRV mode, so the kernel picks). [`XdpTransport::mode`] tells
    /// what was obtained.
    #[default]
    Auto,
    /// Always copy (`XDP_COPY`).
    Copy,
    /// Zero-copy or fail (`XDP_ZEROCOPY`).
    ZeroCopy,
}

/// The mode the kernel actually gave the socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct XdpMode {
    /// How the XDP program is attached.
    pub attach: AttachMode,
    /// Whether the socket runs zero-copy (`XDP_OPTIONS_ZEROCOPY`).
    pub zero_copy: bool,
}

impl fmt::Display for XdpMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let copy = if self.zero_copy { "zero-copy" } else { "copy" };
        write!(f, "{}/{copy}", self.attach)
    }
}

/// Where and how to bind an [`XdpTransport`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct XdpConfig {
    /// Interface to bind to (e.g. a veth end).
    pub ifname: String,
    /// Receive/transmit queue of the interface (0 on veth).
    pub queue_id: u32,
    /// Network namespace (a name under `/run/netns`) holding the interface; `None`: the calling
    /// thread's.
    pub netns: Option<String>,
    /// How to attach the XDP program.
    pub attach: AttachMode,
    /// Copy or zero-copy.
    pub copy: CopyMode,
    /// Destination MAC of every frame; `None`: broadcast (fine on a point-to-point veth).
    pub peer_mac: Option<[u8; 6]>,
    /// EtherType of our frames (default [`eth::ETHERTYPE_FTVM`]).
    pub ethertype: u16,
    /// Entries of the RX, TX and completion rings, and the number of receive frames and of
    /// transmit frames (a power of two; the fill ring gets twice as many entries). Default 2048.
    pub ring_size: u32,
    /// Kick the kernel (`sendto`) once per this many queued frames (default 32: what a
    /// generic-mode kick sends at most).
    pub kick_batch: usize,
}

impl XdpConfig {
    /// Defaults for interface `ifname`: queue 0, the calling thread's namespace, SKB mode, copy
    /// or zero-copy as available, broadcast destination, EtherType `0x88B5`, 2048-entry rings.
    #[must_use]
    pub fn new(ifname: &str) -> Self {
        Self {
            ifname: ifname.to_owned(),
            queue_id: 0,
            netns: None,
            attach: AttachMode::Skb,
            copy: CopyMode::Auto,
            peer_mac: None,
            ethertype: eth::ETHERTYPE_FTVM,
            ring_size: 2048,
            kick_batch: 32,
        }
    }

    /// Binds inside network namespace `name`.
    #[must_use]
    pub fn in_netns(mut self, name: &str) -> Self {
        self.netns = Some(name.to_owned());
        self
    }

    /// Uses attach mode `attach`.
    #[must_use]
    pub fn with_attach(mut self, attach: AttachMode) -> Self {
        self.attach = attach;
        self
    }

    /// Sends to `mac` instead of broadcasting.
    #[must_use]
    pub fn with_peer_mac(mut self, mac: [u8; 6]) -> Self {
        self.peer_mac = Some(mac);
        self
    }
}

/// Live packet counters of one [`XdpTransport`], shareable with a monitoring thread
/// ([`XdpTransport::stats`]) while a poller owns the transport. Only the owning thread writes.
#[derive(Debug, Default)]
pub struct XdpStats {
    tx_frames: AtomicU64,
    tx_kicks: AtomicU64,
    tx_full: AtomicU64,
    rx_frames: AtomicU64,
    rx_wrong_ethertype: AtomicU64,
    rx_short: AtomicU64,
    rx_wakeups: AtomicU64,
}

/// Adds `n` to a counter that only one thread writes (no locked read-modify-write needed).
fn bump(c: &AtomicU64, n: u64) {
    c.store(c.load(Relaxed).wrapping_add(n), Relaxed);
}

impl XdpStats {
    /// Our counters now (the kernel's fields are zero: see [`XdpTransport::counters`]).
    #[must_use]
    pub fn snapshot(&self) -> XdpCounters {
        XdpCounters {
            tx_frames: self.tx_frames.load(Relaxed),
            tx_kicks: self.tx_kicks.load(Relaxed),
            tx_full: self.tx_full.load(Relaxed),
            rx_frames: self.rx_frames.load(Relaxed),
            rx_wrong_ethertype: self.rx_wrong_ethertype.load(Relaxed),
            rx_short: self.rx_short.load(Relaxed),
            rx_wakeups: self.rx_wakeups.load(Relaxed),
            ..XdpCounters::default()
        }
    }
}

/// Packet counters of one [`XdpTransport`]: ours, and the kernel's (`XDP_STATISTICS`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct XdpCounters {
    /// Frames queued for transmission.
    pub tx_frames: u64,
    /// `sendto` kicks made.
    pub tx_kicks: u64,
    /// `send` calls refused because no transmit frame or TX ring slot was free.
    pub tx_full: u64,
    /// Channel frames handed to the receiver.
    pub rx_frames: u64,
    /// Received frames dropped because of their EtherType.
    pub rx_wrong_ethertype: u64,
    /// Received frames dropped because they were truncated.
    pub rx_short: u64,
    /// Fill-ring wake-ups (`poll`) made.
    pub rx_wakeups: u64,
    /// Kernel: frames dropped for other reasons (e.g. larger than a UMEM frame).
    pub kernel_rx_dropped: u64,
    /// Kernel: frames dropped because the RX ring was full.
    pub kernel_rx_ring_full: u64,
    /// Kernel: frames dropped because the fill ring was empty.
    pub kernel_fill_ring_empty: u64,
    /// Kernel: invalid descriptors on the RX / TX rings.
    pub kernel_invalid_descs: u64,
}

/// Setting up an AF_XDP socket failed.
#[derive(Debug, thiserror::Error)]
pub enum XdpError {
    /// Entering the interface's network namespace failed.
    #[error("could not enter the interface's network namespace")]
    Netns(#[from] NetnsError),
    /// The interface could not be looked up (no such interface in that namespace?).
    #[error("could not look up interface {ifname}")]
    Interface {
        /// Interface name.
        ifname: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The configuration is not usable.
    #[error("invalid AF_XDP configuration: {what}")]
    Config {
        /// What is wrong.
        what: String,
    },
    /// The UMEM could not be created or registered.
    #[error("could not create the UMEM")]
    Umem(#[source] xsk_rs::umem::UmemCreateError),
    /// The socket could not be created or bound (not root? an XDP program of another mode
    /// already attached? zero-copy required but unsupported?).
    #[error("could not bind an AF_XDP socket to {ifname} queue {queue_id} in {attach} mode")]
    Socket {
        /// Interface name.
        ifname: String,
        /// Queue.
        queue_id: u32,
        /// Requested attach mode.
        attach: AttachMode,
        /// Why.
        #[source]
        source: xsk_rs::socket::SocketCreateError,
    },
    /// Reading the socket's options failed.
    #[error("could not read the AF_XDP socket's options")]
    Options(#[source] std::io::Error),
}

impl From<XdpError> for TransportError {
    fn from(e: XdpError) -> Self {
        let mut what = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            what.push_str(": ");
            what.push_str(&s.to_string());
            source = s.source();
        }
        Self::Setup { what }
    }
}
