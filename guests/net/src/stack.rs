//! The interface, its sockets and the WAIT-based event loop helpers.

use alloc::vec;
use alloc::vec::Vec;
use core::fmt;

use smoltcp::iface::{Config, Interface, PollResult, SocketHandle, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpCidr};
use virtio_drivers::transport::mmio::MmioError;
use virtio_drivers::transport::{DeviceType, Transport};

use ftvm_guest_rt::hal::{mmio_transport, VIRTIO_NET_BASE};
use ftvm_guest_rt::sys;

use crate::config::NetConfig;
use crate::phy::{Net, PhyStats, VirtioPhy, RX_BUF_LEN};

/// How long a peer may leave sent data unacknowledged before its connection is aborted.
pub const PEER_TIMEOUT: Duration = Duration::from_secs(60);

/// Why the network could not be brought up.
#[derive(Debug)]
pub enum NetError {
    /// No virtio-mmio device answers at the net device's address.
    Transport(MmioError),
    /// The device there is not a network device.
    NotNet(DeviceType),
    /// The virtio-net driver failed to initialise.
    Driver(virtio_drivers::Error),
}

impl fmt::Display for NetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Transport(e) => write!(f, "virtio-net transport at {VIRTIO_NET_BASE:#x}: {e}"),
            Self::NotNet(t) => write!(f, "device at {VIRTIO_NET_BASE:#x} is {t:?}, not network"),
            Self::Driver(e) => write!(f, "virtio-net driver: {e}"),
        }
    }
}

/// The TCP/IP stack of a guest.
pub struct Stack {
    /// The smoltcp interface.
    pub iface: Interface,
    /// The sockets.
    pub sockets: SocketSet<'static>,
    phy: VirtioPhy,
}

impl fmt::Debug for Stack {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Stack")
            .field("phy", &self.phy)
            .finish_non_exhaustive()
    }
}

impl Stack {
    /// Brings up the virtio-net device and the interface. Reads one `ENTROPY` value (the seed of
    /// TCP initial sequence numbers and ephemeral ports).
    ///
    /// # Errors
    /// [`NetError`] when the device is missing or its driver fails.
    pub fn new(cfg: &NetConfig) -> Result<Self, NetError> {
        // SAFETY: VIRTIO_NET_BASE is the net device window, and this is its only transport
        // (a guest creates one Stack).
        let transport = unsafe { mmio_transport(VIRTIO_NET_BASE) }.map_err(NetError::Transport)?;
        if transport.device_type() != DeviceType::Network {
            return Err(NetError::NotNet(transport.device_type()));
        }
        let net = Net::new(transport, RX_BUF_LEN).map_err(NetError::Driver)?;
        let mut phy = VirtioPhy::new(net);
        let mut config = Config::new(HardwareAddress::Ethernet(EthernetAddress(phy.mac())));
        config.random_seed = sys::entropy();
        let mut iface = Interface::new(config, &mut phy, Self::now());
        iface.update_ip_addrs(|addrs| {
            // A fresh interface has room for its first address.
            let _ = addrs.push(IpCidr::Ipv4(cfg.ip));
        });
        if let Some(gw) = cfg.gateway {
            // Only fails when the route table is full; it is empty here.
            let _ = iface.routes_mut().add_default_ipv4_route(gw);
        }
        Ok(Self {
            iface,
            sockets: SocketSet::new(Vec::new()),
            phy,
        })
    }

    /// The current time from `CLOCK_NS` (one exit: read it once per loop iteration).
    pub fn now() -> Instant {
        Instant::from_micros((sys::clock_ns() / 1000) as i64)
    }

    /// Adds a TCP socket with `rx`/`tx` byte buffers listening on `port`. A connection whose
    /// peer stops acknowledging for [`PEER_TIMEOUT`] is aborted.
    pub fn add_listener(&mut self, port: u16, rx: usize, tx: usize) -> SocketHandle {
        self.add_listener_with(port, vec![0; rx], vec![0; tx])
    }

    /// [`Stack::add_listener`] for a guest that must outlive a full heap: `None` (and no
    /// socket) when the heap cannot hold the buffers.
    pub fn try_add_listener(&mut self, port: u16, rx: usize, tx: usize) -> Option<SocketHandle> {
        let zeroed = |n: usize| {
            let mut v = Vec::new();
            v.try_reserve_exact(n).ok()?;
            v.resize(n, 0);
            Some(v)
        };
        let (rx, tx) = (zeroed(rx)?, zeroed(tx)?);
        Some(self.add_listener_with(port, rx, tx))
    }

    fn add_listener_with(&mut self, port: u16, rx: Vec<u8>, tx: Vec<u8>) -> SocketHandle {
        let mut socket = tcp::Socket::new(tcp::SocketBuffer::new(rx), tcp::SocketBuffer::new(tx));
        socket.set_timeout(Some(PEER_TIMEOUT));
        // listen() only fails for port 0 or a socket that is already open.
        let _ = socket.listen(port);
        self.sockets.add(socket)
    }

    /// Processes received frames, timers and queued sends. Returns whether a socket changed.
    pub fn poll(&mut self, now: Instant) -> bool {
        self.iface.poll(now, &mut self.phy, &mut self.sockets) == PollResult::SocketStateChanged
    }

    /// Waits (WAIT register) until a frame arrives or smoltcp's next timer is due; returns the
    /// WAIT event bits, or [`sys::EVENT_NET_RX`] at once when frames are already waiting.
    pub fn wait(&mut self, now: Instant) -> u64 {
        if self.phy.rx_pending() {
            return sys::EVENT_NET_RX;
        }
        let now_ns = now.total_micros() as u64 * 1000;
        let deadline = match self.iface.poll_delay(now, &self.sockets) {
            Some(d) if d.total_micros() == 0 => return sys::EVENT_TIMER,
            Some(d) => Some(now_ns + d.total_micros() * 1000),
            None => None,
        };
        // An earlier deadline still pending serves as well (an early wake-up re-polls and
        // waits again) and saves the WAIT_DEADLINE write: the retransmission timer moves on
        // with every reply, so a fresh deadline at each wait would cost one exit per request.
        sys::wait_by(now_ns, deadline)
    }

    /// The device's frame counters.
    pub fn phy_stats(&self) -> PhyStats {
        self.phy.stats()
    }

    /// The interface's MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.phy.mac()
    }
}
