//! A smoltcp [`Device`] over the virtio-net driver.

use core::cell::RefCell;

use smoltcp::phy::{Device, DeviceCapabilities, Medium, RxToken, TxToken};
use smoltcp::time::Instant;
use virtio_drivers::device::net::{RxBuffer, VirtIONet};
use virtio_drivers::transport::mmio::MmioTransport;

use ftvm_guest_rt::hal::IdentityHal;

/// Descriptors per virtqueue (the VMM must offer at least this `QueueNumMax`).
pub const QUEUE_SIZE: usize = 64;
/// Size of each receive buffer (virtio-net header + Ethernet frame of MTU 1500).
pub const RX_BUF_LEN: usize = 2048;
/// Ethernet MTU including the 14-byte header.
pub const ETHERNET_MTU: usize = 1514;

/// The virtio-net driver as the guests use it.
pub type Net = VirtIONet<IdentityHal, MmioTransport<'static>, QUEUE_SIZE>;

/// Frame counters.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PhyStats {
    /// Frames received.
    pub rx_frames: u64,
    /// Frames sent.
    pub tx_frames: u64,
    /// Frames the driver failed to send (dropped).
    pub tx_errors: u64,
    /// RX buffers the driver failed to give back to the device.
    pub rx_recycle_errors: u64,
}

/// The smoltcp device.
pub struct VirtioPhy {
    net: RefCell<Net>,
    stats: RefCell<PhyStats>,
}

impl core::fmt::Debug for VirtioPhy {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("VirtioPhy")
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl VirtioPhy {
    /// Wraps a driver.
    pub fn new(net: Net) -> Self {
        Self {
            net: RefCell::new(net),
            stats: RefCell::new(PhyStats::default()),
        }
    }

    /// The device's MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.net.borrow().mac_address()
    }

    /// Whether a received frame is waiting in the RX queue (reads guest memory only, no exit).
    pub fn rx_pending(&self) -> bool {
        self.net.borrow().can_recv()
    }

    /// The frame counters.
    pub fn stats(&self) -> PhyStats {
        *self.stats.borrow()
    }
}

/// A received frame.
#[allow(missing_debug_implementations)] // RxBuffer has no Debug
pub struct PhyRx<'a> {
    phy: &'a VirtioPhy,
    buf: RxBuffer,
}

/// Permission to send one frame.
#[derive(Debug)]
pub struct PhyTx<'a> {
    phy: &'a VirtioPhy,
}

impl Device for VirtioPhy {
    type RxToken<'a> = PhyRx<'a>;
    type TxToken<'a> = PhyTx<'a>;

    fn receive(&mut self, _timestamp: Instant) -> Option<(PhyRx<'_>, PhyTx<'_>)> {
        let buf = self.net.get_mut().receive().ok()?;
        self.stats.get_mut().rx_frames += 1;
        Some((PhyRx { phy: self, buf }, PhyTx { phy: self }))
    }

    fn transmit(&mut self, _timestamp: Instant) -> Option<PhyTx<'_>> {
        self.net.get_mut().can_send().then_some(PhyTx { phy: self })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = ETHERNET_MTU;
        caps
    }
}

impl RxToken for PhyRx<'_> {
    fn consume<R, F>(self, f: F) -> R
    where
        F: FnOnce(&[u8]) -> R,
    {
        let result = f(self.buf.packet());
        if self
            .phy
            .net
            .borrow_mut()
            .recycle_rx_buffer(self.buf)
            .is_err()
        {
            self.phy.stats.borrow_mut().rx_recycle_errors += 1;
        }
        result
    }
}

impl TxToken for PhyTx<'_> {
    fn consume<R, F>(self, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        let mut buf = self.phy.net.borrow().new_tx_buffer(len);
        let result = f(buf.packet_mut());
        let sent = self.phy.net.borrow_mut().send(buf);
        let mut stats = self.phy.stats.borrow_mut();
        match sent {
            Ok(()) => stats.tx_frames += 1,
            Err(_) => stats.tx_errors += 1,
        }
        result
    }
}
