//! Both ends of a link of any transport between two fresh network namespaces joined by a veth
//! pair — so that `xdp`, `tcp`, `tcp-spin` and `uring` are compared over one network path (the
//! channel benchmark's veth rows).
//!
//! ```text
//!  netns <prefix>-a (10.77.0.1)  ── veth ──  netns <prefix>-b (10.77.0.2)
//!  end A: AF_XDP socket on <prefix>-va        end B: AF_XDP socket on <prefix>-vb
//!     or TCP client                              or TCP server (listener in B)
//! ```
//!
//! Each end holds the namespaces alive; they are deleted when both ends are dropped.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;

use super::{XdpConfig, XdpError, XdpTransport};
use crate::error::TransportError;
use crate::netns::{HostPair, HostPairConfig, NetnsError, DEFAULT_IPV4_B};
use crate::tcp::{TcpMode, TcpTransport};
use crate::transport::Transport;
use crate::uring::{UringConfig, UringTransport};

/// Ring size of the AF_XDP ends: 4096 receive frames (15 MB of 3.8 KB frames) hold more than
/// the reliability layer's default 4 MiB window, so a slow receiver does not overflow its UMEM.
pub const VETH_XDP_RING_SIZE: u32 = 4096;

/// MTU of the veth pair: the largest whose Ethernet frame fits a page-sized UMEM frame after
/// the XDP headroom (4096 - 256 - 14), so one AF_XDP frame carries three 1 KiB records.
pub const VETH_MTU: u32 = 3826;

/// Creating a veth link failed.
#[derive(Debug, thiserror::Error)]
pub enum VethLinkError {
    /// The namespaces or the veth pair could not be made (not root?).
    #[error("could not create the test hosts")]
    Hosts(#[from] NetnsError),
    /// An AF_XDP end could not be opened.
    #[error("could not open an AF_XDP end")]
    Xdp(#[from] XdpError),
    /// A TCP connection over the veth pair could not be made.
    #[error("could not connect TCP over the veth pair ({what})")]
    Tcp {
        /// Which step.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Wrapping a socket as a transport failed.
    #[error("could not set up the {kind} transport")]
    Transport {
        /// Transport kind.
        kind: &'static str,
        /// Why.
        #[source]
        source: TransportError,
    },
    /// Not a transport this module knows.
    #[error("unknown transport {0:?} (xdp, tcp, tcp-spin, uring)")]
    Unknown(String),
}

/// End A (primary) and end B (backup) of a link.
pub type LinkEnds = (Box<dyn Transport>, Box<dyn Transport>);

/// A transport end that keeps the namespaces it lives in alive.
struct Hosted {
    // Field order is drop order: the socket before (possibly) the namespaces.
    inner: Box<dyn Transport>,
    _hosts: Arc<HostPair>,
}

impl Transport for Hosted {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn max_frame(&self) -> usize {
        self.inner.max_frame()
    }
    fn send(&mut self, frame: &[u8]) -> Result<bool, TransportError> {
        self.inner.send(frame)
    }
    fn flush(&mut self) -> Result<(), TransportError> {
        self.inner.flush()
    }
    fn poll_recv(&mut self, on_frame: &mut dyn FnMut(&[u8])) -> Result<usize, TransportError> {
        self.inner.poll_recv(on_frame)
    }
}

/// Creates namespaces `<prefix>-a`/`<prefix>-b` (replacing leftovers; `prefix` ≤ 12 bytes)
/// joined by a veth pair with IPv4 addresses, and returns end A (the primary's) and end B (the
/// backup's) of a `kind` link over it: `"xdp"` (AF_XDP, SKB mode), `"tcp"`, `"tcp-spin"` or
/// `"uring"` (TCP from A to a listener in B).
///
/// # Errors
/// [`VethLinkError`] when not root, a namespace or socket cannot be made, or `kind` is unknown.
pub fn veth_link(kind: &str, prefix: &str) -> Result<LinkEnds, VethLinkError> {
    if !["xdp", "tcp", "tcp-spin", "uring"].contains(&kind) {
        return Err(VethLinkError::Unknown(kind.to_owned()));
    }
    let mut config = HostPairConfig::with_prefix(prefix).with_ipv4();
    config.mtu = Some(VETH_MTU);
    let hosts = Arc::new(HostPair::create(&config)?);
    let c = hosts.config();
    let (a, b): (Box<dyn Transport>, Box<dyn Transport>) = if kind == "xdp" {
        let end = |ns: &str, ifname: &str, peer| {
            let mut cfg = XdpConfig::new(ifname).in_netns(ns).with_peer_mac(peer);
            cfg.ring_size = VETH_XDP_RING_SIZE;
            XdpTransport::open(&cfg)
        };
        (
            Box::new(end(&c.netns_a, &c.if_a, c.mac_b)?),
            Box::new(end(&c.netns_b, &c.if_b, c.mac_a)?),
        )
    } else {
        let tcp = |what, source| VethLinkError::Tcp { what, source };
        let listener = hosts
            .b()
            .run(|| TcpListener::bind((DEFAULT_IPV4_B, 0)))?
            .map_err(|e| tcp("bind in B", e))?;
        let addr: SocketAddr = listener.local_addr().map_err(|e| tcp("local_addr", e))?;
        let sa = hosts
            .a()
            .run(|| TcpStream::connect(addr))?
            .map_err(|e| tcp("connect from A", e))?;
        let (sb, _) = listener.accept().map_err(|e| tcp("accept in B", e))?;
        let wrap = |kind: &'static str, s: TcpStream| -> Result<Box<dyn Transport>, _> {
            let t: Result<Box<dyn Transport>, TransportError> = match kind {
                "tcp" => TcpTransport::from_stream(s, TcpMode::Blocking).map(|t| Box::new(t) as _),
                "tcp-spin" => TcpTransport::from_stream(s, TcpMode::Spin).map(|t| Box::new(t) as _),
                _ => {
                    UringTransport::from_stream(s, UringConfig::default()).map(|t| Box::new(t) as _)
                }
            };
            t.map_err(|source| VethLinkError::Transport { kind, source })
        };
        let kind: &'static str = match kind {
            "tcp" => "tcp",
            "tcp-spin" => "tcp-spin",
            _ => "uring",
        };
        (wrap(kind, sa)?, wrap(kind, sb)?)
    };
    Ok((
        Box::new(Hosted {
            inner: a,
            _hosts: Arc::clone(&hosts),
        }),
        Box::new(Hosted {
            inner: b,
            _hosts: hosts,
        }),
    ))
}
