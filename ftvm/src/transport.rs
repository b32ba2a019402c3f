//! The logging channel's transport of each side, from its configuration (`--transport`,
//! `--peer`): where a backup waits for its primary, what a primary connects to, and the
//! AF_XDP socket both may open (a joined pair's own link too: [`crate::join`]).

use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use ftvm_channel::reliable::{Accepted, Incoming, OneLink, TcpIncoming, TransportMaker};
use ftvm_channel::shm::ShmTransport;
use ftvm_channel::tcp::{TcpMode, TcpTransport};
use ftvm_channel::uring::{UringConfig, UringTransport};
use ftvm_channel::{Transport, TransportError};

use crate::config::{CommonConfig, Transport as LogTransport};

/// The size of the shared-memory rings of the `shm` transport.
pub(crate) const SHM_CAPACITY: usize = 1 << 22;

/// Where the backup waits for its primary: the logging port (tcp, tcp-spin, uring: every
/// connection is a candidate, strays are dropped and the port keeps listening), or the one
/// link there is (shm: the rings, which it creates afresh; xdp: the interface).
pub(crate) fn backup_incoming(s: &CommonConfig) -> anyhow::Result<Box<dyn Incoming>> {
    let peer = s.peer()?;
    let tcp = |make: TransportMaker| -> anyhow::Result<Box<dyn Incoming>> {
        let listener =
            TcpListener::bind(peer).with_context(|| format!("cannot listen on {peer}"))?;
        eprintln!("backup: listening on {}", listener.local_addr()?);
        Ok(Box::new(TcpIncoming::new(listener, make)?))
    };
    let one = |transport: Box<dyn Transport>| -> Box<dyn Incoming> {
        Box::new(OneLink(Some(Accepted {
            transport,
            peer: peer.to_string(),
            source: peer.to_string(),
            persistent: true,
        })))
    };
    match s.transport {
        LogTransport::Tcp | LogTransport::TcpSpin => {
            let mode = if s.transport == LogTransport::Tcp {
                TcpMode::Blocking
            } else {
                TcpMode::Spin
            };
            tcp(Box::new(move |stream| {
                Ok(Box::new(TcpTransport::from_stream(stream, mode)?) as Box<dyn Transport>)
            }))
        }
        LogTransport::Uring => tcp(Box::new(|stream| {
            Ok(
                Box::new(UringTransport::from_stream(stream, UringConfig::default())?)
                    as Box<dyn Transport>,
            )
        })),
        LogTransport::Shm => {
            eprintln!("backup: shm rings at {peer}");
            Ok(one(Box::new(ShmTransport::create(
                Path::new(peer),
                SHM_CAPACITY,
            )?)))
        }
        LogTransport::Xdp => Ok(one(xdp_transport(s)?)),
    }
}

/// AF_XDP: `--peer` names this side's interface (a veth end or a NIC facing the peer); the
/// channel handshake then pairs the two sides as over any other transport.
fn xdp_transport(s: &CommonConfig) -> anyhow::Result<Box<dyn Transport>> {
    let peer = s.peer()?;
    open_xdp(peer).with_context(|| format!("cannot open AF_XDP on {peer}"))
}

/// AF_XDP on `interface` (also a joined pair's link, [`crate::join`]).
#[cfg(feature = "xdp")]
pub(crate) fn open_xdp(interface: &str) -> Result<Box<dyn Transport>, TransportError> {
    use ftvm_channel::xdp::{XdpConfig, XdpTransport};
    let t = XdpTransport::open(&XdpConfig::new(interface))?;
    eprintln!("AF_XDP on {interface} ({})", t.mode());
    Ok(Box::new(t))
}

/// Without the `xdp` feature: a setup error that says how to build it.
#[cfg(not(feature = "xdp"))]
pub(crate) fn open_xdp(_: &str) -> Result<Box<dyn Transport>, TransportError> {
    Err(TransportError::Setup {
        what: "--transport xdp: this ftvm was built without the `xdp` feature (cargo build \
               --release -p ftvm --features xdp)"
            .into(),
    })
}

/// The primary's end of the logging link: it connects to the backup's `--peer` (tcp,
/// tcp-spin, uring) or opens the rings the backup created (shm), waiting 30 s at most for
/// the backup, or opens AF_XDP on its own interface (xdp).
pub(crate) fn primary_transport(s: &CommonConfig) -> anyhow::Result<Box<dyn Transport>> {
    let timeout = Duration::from_secs(30);
    let peer = s.peer()?;
    let addr = || -> anyhow::Result<std::net::SocketAddr> {
        std::net::ToSocketAddrs::to_socket_addrs(peer)
            .with_context(|| format!("bad peer address {peer}"))?
            .next()
            .with_context(|| format!("no address for {peer}"))
    };
    match s.transport {
        LogTransport::Tcp => Ok(Box::new(TcpTransport::connect(
            addr()?,
            TcpMode::Blocking,
            timeout,
        )?)),
        LogTransport::TcpSpin => Ok(Box::new(TcpTransport::connect(
            addr()?,
            TcpMode::Spin,
            timeout,
        )?)),
        LogTransport::Uring => {
            let a = addr()?;
            let deadline = Instant::now() + timeout;
            let stream = loop {
                match TcpStream::connect(a) {
                    Ok(st) => break st,
                    Err(_) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(10))
                    }
                    Err(e) => return Err(e).with_context(|| format!("cannot connect to {a}")),
                }
            };
            Ok(Box::new(UringTransport::from_stream(
                stream,
                UringConfig::default(),
            )?))
        }
        LogTransport::Shm => Ok(Box::new(ShmTransport::open(Path::new(peer), timeout)?)),
        LogTransport::Xdp => xdp_transport(s),
    }
}
