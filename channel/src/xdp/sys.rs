//! The few raw system calls the AF_XDP transport needs beyond `xsk-rs`: interface facts by
//! `ioctl` (which, unlike `/sys/class/net`, answers for the calling thread's network namespace)
//! and the socket's `XDP_OPTIONS`.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// What the transport needs to know about the interface it binds to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IfInfo {
    /// Interface index.
    pub index: u32,
    /// MAC address.
    pub mac: [u8; 6],
    /// MTU (bytes of payload after the Ethernet header).
    pub mtu: u32,
}

fn ifreq_for(ifname: &str) -> io::Result<libc::ifreq> {
    let name = CString::new(ifname).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let bytes = name.as_bytes_with_nul();
    if bytes.len() > libc::IFNAMSIZ {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    // SAFETY: `ifreq` is plain old data (a name array and a union of integers, addresses and a
    // pointer); all-zero is a valid value of it.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    Ok(req)
}

fn ioctl(fd: RawFd, request: libc::c_ulong, req: &mut libc::ifreq) -> io::Result<()> {
    // SAFETY: `req` is a valid, exclusively borrowed `ifreq` for the duration of the call, which
    // is what the SIOCGIF* requests read and write.
    let rc = unsafe { libc::ioctl(fd, request as _, std::ptr::from_mut(req)) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Index, MAC and MTU of `ifname` in the calling thread's network namespace.
///
/// # Errors
/// The OS error (`ENODEV` when there is no such interface).
pub fn if_info(ifname: &str) -> io::Result<IfInfo> {
    // SAFETY: plain socket(2) call; the result is checked below.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a freshly created descriptor that nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    let fd = sock.as_raw_fd();

    let mut req = ifreq_for(ifname)?;
    ioctl(fd, libc::SIOCGIFINDEX, &mut req)?;
    // SAFETY: SIOCGIFINDEX filled the `ifru_ifindex` member of the union.
    let index = unsafe { req.ifr_ifru.ifru_ifindex };

    let mut req = ifreq_for(ifname)?;
    ioctl(fd, libc::SIOCGIFMTU, &mut req)?;
    // SAFETY: SIOCGIFMTU filled the `ifru_mtu` member of the union.
    let mtu = unsafe { req.ifr_ifru.ifru_mtu };

    let mut req = ifreq_for(ifname)?;
    ioctl(fd, libc::SIOCGIFHWADDR, &mut req)?;
    // SAFETY: SIOCGIFHWADDR filled the `ifru_hwaddr` member of the union.
    let hw = unsafe { req.ifr_ifru.ifru_hwaddr };
    let mut mac = [0u8; 6];
    for (dst, src) in mac.iter_mut().zip(hw.sa_data.iter()) {
        *dst = *src as u8;
    }
    Ok(IfInfo {
        index: u32::try_from(index).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?,
        mac,
        mtu: u32::try_from(mtu).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?,
    })
}

/// Whether the AF_XDP socket `fd` runs in zero-copy mode (`XDP_OPTIONS_ZEROCOPY`).
///
/// # Errors
/// The OS error of `getsockopt(SOL_XDP, XDP_OPTIONS)`.
pub fn xdp_zero_copy(fd: RawFd) -> io::Result<bool> {
    let mut opts = libc::xdp_options { flags: 0 };
    let mut len = std::mem::size_of::<libc::xdp_options>() as libc::socklen_t;
    // SAFETY: `opts` and `len` are valid for writes and `len` holds the size of `opts`.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_XDP,
            libc::XDP_OPTIONS,
            std::ptr::from_mut(&mut opts).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(opts.flags & libc::XDP_OPTIONS_ZEROCOPY != 0)
}

/// The calling thread's network namespace, as a file to `setns` back into later.
///
/// # Errors
/// The OS error of opening `/proc/thread-self/ns/net`.
pub fn current_netns() -> io::Result<File> {
    File::open("/proc/thread-self/ns/net")
}

/// Moves the calling thread into the network namespace `ns`.
///
/// # Errors
/// The OS error of `setns(2)`.
pub fn setns(ns: &File) -> io::Result<()> {
    // SAFETY: `ns` is an open namespace descriptor for the duration of the call; setns only
    // changes the calling thread's network namespace.
    let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
