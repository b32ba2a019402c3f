//! The AF_XDP transport on its own, with raw frames between two network namespaces joined by a
//! veth pair: frames arrive intact and in order, the attach modes work, frames that are not
//! ours are dropped and counted, and the socket lets go of the interface when dropped.
#![cfg(feature = "xdp")]

use std::time::{Duration, Instant};

use ftvm_channel::netns::{HostPair, HostPairConfig};
use ftvm_channel::xdp::{eth, AttachMode, XdpConfig, XdpTransport};
use ftvm_channel::Transport;

fn hosts(prefix: &str) -> HostPair {
    HostPair::create(&HostPairConfig::with_prefix(prefix)).expect("create test hosts")
}

fn open(hosts: &HostPair, side: char, attach: AttachMode) -> XdpTransport {
    let cfg = hosts.config();
    let (ns, ifname, peer) = match side {
        'a' => (&cfg.netns_a, &cfg.if_a, cfg.mac_b),
        _ => (&cfg.netns_b, &cfg.if_b, cfg.mac_a),
    };
    XdpTransport::open(
        &XdpConfig::new(ifname)
            .in_netns(ns)
            .with_attach(attach)
            .with_peer_mac(peer),
    )
    .expect("open AF_XDP transport")
}

fn frame(seq: u64, len: usize, out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&seq.to_le_bytes());
    let mut x = seq | 1;
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.push(x as u8);
    }
    out.truncate(len);
}

/// Sends `n` frames from `a` to `b` in windows of `window` (so the receiver keeps up without
/// any reliability layer) and checks every received frame; returns how many arrived.
fn stream(a: &mut XdpTransport, b: &mut XdpTransport, n: u64, window: u64) -> u64 {
    let max = a.max_frame();
    let mut buf = Vec::new();
    let mut expect = Vec::new();
    let mut next_rx = 0u64;
    let mut sent = 0u64;
    let deadline = Instant::now() + Duration::from_secs(30);
    while next_rx < n && Instant::now() < deadline {
        while sent < n && sent < next_rx + window {
            let len = 16 + (sent as usize * 31) % (max - 16);
            frame(sent, len, &mut buf);
            if !a.send(&buf).expect("send") {
                break;
            }
            sent += 1;
        }
        a.flush().expect("flush");
        let mut bad = None;
        b.poll_recv(&mut |f: &[u8]| {
            let seq = u64::from_le_bytes(f[..8].try_into().expect("8 bytes"));
            frame(seq, f.len(), &mut expect);
            if f != expect.as_slice() || seq < next_rx {
                bad.get_or_insert(seq);
            }
            next_rx = seq + 1;
        })
        .expect("poll_recv");
        assert_eq!(bad, None, "corrupt or reordered frame");
        // A frame lost by the link would stall the window: tolerate it (no reliability here).
        if sent == next_rx + window && b.counters().rx_frames == 0 {
            std::thread::yield_now();
        }
    }
    next_rx
}

#[test]
fn xdp_raw_frames_skb_and_drv() {
    ftvm_channel::require_root!("xdp_raw_frames_skb_and_drv");
    let hosts = hosts("fx-raw");
    for attach in [AttachMode::Skb, AttachMode::Drv] {
        let mut a = open(&hosts, 'a', attach);
        let mut b = open(&hosts, 'b', attach);
        assert_eq!(a.mode().attach, attach);
        eprintln!("xdp_raw: mode {} max_frame {}", a.mode(), a.max_frame());
        assert_eq!(
            a.max_frame(),
            1500 - 2,
            "MTU minus the envelope's length field"
        );
        assert_eq!(a.local_mac(), hosts.config().mac_a);
        let n = 200_000;
        let got = stream(&mut a, &mut b, n, 256);
        assert_eq!(got, n, "{attach}: every frame arrived ({:?})", b.counters());
        let (ca, cb) = (a.counters(), b.counters());
        assert_eq!(ca.tx_frames, n);
        assert!(ca.tx_kicks > 0, "copy mode needs kicks");
        assert_eq!(cb.rx_frames, n);
        assert_eq!(cb.rx_wrong_ethertype + cb.rx_short, 0);
        // Too large a frame is refused, not truncated.
        let big = vec![0u8; a.max_frame() + 1];
        assert!(a.send(&big).is_err());
        drop((a, b));
        // The XDP program is gone with the sockets.
        let out = hosts
            .a()
            .ip(&["link", "show", "dev", "fx-raw-va"])
            .expect("ip link");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            !text.contains("xdp"),
            "XDP program detached on drop: {text}"
        );
    }
}

/// A jumbo MTU gets page-sized UMEM frames and a matching `max_frame`.
#[test]
fn xdp_jumbo_mtu() {
    ftvm_channel::require_root!("xdp_jumbo_mtu");
    let mut cfg = HostPairConfig::with_prefix("fx-jumbo");
    cfg.mtu = Some(ftvm_channel::xdp::veth::VETH_MTU);
    let hosts = HostPair::create(&cfg).expect("create test hosts");
    let mut a = open(&hosts, 'a', AttachMode::Skb);
    let mut b = open(&hosts, 'b', AttachMode::Skb);
    assert_eq!(a.max_frame(), 3826 - 2);
    assert_eq!(stream(&mut a, &mut b, 20_000, 256), 20_000);
}

/// Frames with a wrong EtherType or too short are dropped and counted; ours still arrive.
#[test]
fn xdp_drops_foreign_and_short_frames() {
    ftvm_channel::require_root!("xdp_drops_foreign_and_short_frames");
    let hosts = hosts("fx-bad");
    let mut b = open(&hosts, 'b', AttachMode::Skb);
    let cfg = hosts.config().clone();
    // Raw AF_PACKET socket in A, writing whole Ethernet frames onto the wire.
    let sent = hosts
        .a()
        .run(move || raw_send_bad_frames(&cfg.if_a, cfg.mac_b, cfg.mac_a))
        .expect("run in a");
    assert_eq!(sent, 4);
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut good = Vec::new();
    while Instant::now() < deadline && good.is_empty() {
        b.poll_recv(&mut |f: &[u8]| good.push(f.to_vec()))
            .expect("poll_recv");
    }
    // Frames arrive in order on one queue: the good one is last, so all were seen.
    let c = b.counters();
    assert_eq!(good, vec![b"ours".to_vec()], "{c:?}");
    assert_eq!(c.rx_wrong_ethertype, 1, "{c:?}");
    assert_eq!(c.rx_short, 2, "{c:?}");
    assert_eq!(c.rx_frames, 1, "{c:?}");
}

/// Sends, in order: a frame of EtherType 0x0800, a 15-byte frame, a frame whose length field
/// claims more than it carries, and a good frame carrying `ours`. Returns how many were sent.
fn raw_send_bad_frames(ifname: &str, dst: [u8; 6], src: [u8; 6]) -> usize {
    let hdr = eth::header_template(dst, src, eth::ETHERTYPE_FTVM);
    let mut frames: Vec<Vec<u8>> = Vec::new();
    let mut wrong = eth::header_template(dst, src, 0x0800).to_vec();
    wrong.extend_from_slice(&[0u8; 50]);
    frames.push(wrong);
    frames.push(hdr[..15].to_vec());
    let mut lying = hdr.to_vec();
    lying[eth::LEN_OFFSET..eth::PAYLOAD_OFFSET].copy_from_slice(&100u16.to_be_bytes());
    lying.extend_from_slice(&[0u8; 44]);
    frames.push(lying);
    let mut good = vec![0u8; 64];
    let n = eth::encode(&hdr, b"ours", &mut good).expect("fits");
    good.truncate(n);
    frames.push(good);

    // SAFETY: plain socket(2); checked below.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW,
            i32::from((libc::ETH_P_ALL as u16).to_be()),
        )
    };
    assert!(
        fd >= 0,
        "AF_PACKET socket: {}",
        std::io::Error::last_os_error()
    );
    let ifindex = {
        let name = std::ffi::CString::new(ifname).expect("name");
        // SAFETY: `name` is a valid NUL-terminated string.
        unsafe { libc::if_nametoindex(name.as_ptr()) }
    };
    assert!(ifindex > 0, "no interface {ifname}");
    // SAFETY: sockaddr_ll is plain old data; all-zero is valid.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_ifindex = ifindex as i32;
    addr.sll_halen = 6;
    addr.sll_addr[..6].copy_from_slice(&dst);
    let mut sent = 0;
    for f in &frames {
        // SAFETY: `f` and `addr` are valid for the lengths given.
        let rc = unsafe {
            libc::sendto(
                fd,
                f.as_ptr().cast(),
                f.len(),
                0,
                std::ptr::from_ref(&addr).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(
            rc,
            f.len() as isize,
            "sendto: {}",
            std::io::Error::last_os_error()
        );
        sent += 1;
    }
    // SAFETY: `fd` is ours and closed once.
    unsafe { libc::close(fd) };
    sent
}
