//! Forged heartbeats against a serving pair (real `ftvm` processes, real UDP, kv under client
//! load): heartbeats carry liveness only, so no datagram in the heartbeat format — whatever its
//! fields, and even with the peer's source address spoofed through a raw socket — stops a side,
//! moves the pair's generation, or keeps a killed primary "alive" past the failover.
//! Needs root and /dev/kvm (prints SKIP otherwise).

mod common;

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ftvm::scenario::{Scenario, Side, BACKUP_HEARTBEAT_PORT, PRIMARY_HEARTBEAT_PORT};
use ftvm_ft::detector::{Heartbeat, HEARTBEAT_LEN, OFF_MAGIC, OFF_RESERVED, OFF_VERSION};
use ftvm_ft::Role;

/// Sends UDP datagrams with any source address: a raw IPv4 socket (`IP_HDRINCL`), created
/// inside the scenario's namespace (the socket stays there whichever thread uses it).
struct Spoofer {
    fd: OwnedFd,
}

impl Spoofer {
    fn new(s: &Scenario) -> Self {
        s.in_netns(|| {
            // SAFETY: plain socket(2) call; the result is checked before it is owned.
            let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
            assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
            // SAFETY: `fd` is a fresh descriptor nobody else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            Spoofer { fd }
        })
        .expect("enter namespace")
    }

    /// Sends `payload` as a UDP datagram from `from` to `to` (IPv4 header written here; the
    /// kernel fills in the header checksum and total length; UDP checksum 0 = none).
    fn send(&self, from: SocketAddrV4, to: SocketAddrV4, payload: &[u8]) {
        let udp_len = 8 + payload.len();
        let mut p = Vec::with_capacity(20 + udp_len);
        p.extend_from_slice(&[
            0x45,
            0,
            0,
            0,
            0,
            0,
            0x40,
            0,
            64,
            libc::IPPROTO_UDP as u8,
            0,
            0,
        ]);
        p.extend_from_slice(&from.ip().octets());
        p.extend_from_slice(&to.ip().octets());
        p.extend_from_slice(&from.port().to_be_bytes());
        p.extend_from_slice(&to.port().to_be_bytes());
        p.extend_from_slice(&(udp_len as u16).to_be_bytes());
        p.extend_from_slice(&[0, 0]);
        p.extend_from_slice(payload);
        let total = (p.len() as u16).to_be_bytes();
        p[2..4].copy_from_slice(&total);
        let dst = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(to.ip().octets()),
            },
            sin_zero: [0; 8],
        };
        // SAFETY: `p` and `dst` outlive the call; the length arguments are theirs.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                p.as_ptr().cast(),
                p.len(),
                0,
                std::ptr::addr_of!(dst).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        assert_eq!(
            n,
            p.len() as isize,
            "raw send: {}",
            std::io::Error::last_os_error()
        );
    }
}

fn loopback(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::LOCALHOST, port)
}

/// Every combination of the heartbeat's fields, each valid / newer / older / garbage (the pair
/// is in generation 1), then datagrams of a wrong magic, version, reserved field and length.
fn forged_datagrams() -> Vec<Vec<u8>> {
    const GARBAGE: u64 = 0xA5A5_5A5A_DEAD_BEEF;
    let generations = [1, 2, 0, u64::MAX];
    let sequences = [1_000, u64::MAX - 1, 0, GARBAGE];
    let incarnations = [0x1234_5678, u64::MAX, 0, GARBAGE];
    let roles: [u8; 4] = [
        Role::Primary as u8,
        Role::Alone as u8,
        Role::Backup as u8,
        0xEE,
    ];
    let mut out = Vec::new();
    for generation in generations {
        for sequence in sequences {
            for incarnation in incarnations {
                for role in roles {
                    let mut b = Heartbeat {
                        role: Role::Primary,
                        generation,
                        sequence,
                        incarnation,
                    }
                    .encode();
                    b[ftvm_ft::detector::OFF_ROLE] = role;
                    out.push(b.to_vec());
                }
            }
        }
    }
    let newer = Heartbeat {
        role: Role::Alone,
        generation: 7,
        sequence: 1,
        incarnation: 1,
    }
    .encode();
    let mut bad_magic = newer;
    bad_magic[OFF_MAGIC] = b'X';
    let mut bad_version = newer;
    bad_version[OFF_VERSION] = 9;
    let mut bad_reserved = newer;
    bad_reserved[OFF_RESERVED] = 1;
    out.extend([
        bad_magic.to_vec(),
        bad_version.to_vec(),
        bad_reserved.to_vec(),
    ]);
    for len in [0, 1, HEARTBEAT_LEN - 1, HEARTBEAT_LEN + 1, 64, 512] {
        let mut b = newer.to_vec();
        b.resize(len, 0xFF);
        out.push(b);
    }
    out
}

/// Both sides alive, the arbiter still naming generation 1 held by the primary.
fn assert_pair_untouched(s: &mut Scenario) {
    for side in [Side::Primary, Side::Backup] {
        let node = match side {
            Side::Primary => s.primary.as_mut(),
            Side::Backup => s.backup.as_mut(),
        }
        .expect("node");
        assert_eq!(
            node.try_status(),
            None,
            "the {} exited\n{}",
            side.name(),
            s.stderr_of_both()
        );
    }
    assert_eq!(
        s.generations(),
        vec![(1, "primary".to_string())],
        "{}",
        s.stderr_of_both()
    );
}

/// Every combination of forged heartbeat fields, from the spoofed peer address and from a
/// stranger's, at both heartbeat ports of a pair serving kv under load, three rounds: the
/// service stays up (writes keep being acknowledged, no client error), no side exits, the
/// arbiter still names generation 1. Each side logs that it checked a claimed generation on
/// the arbiter and ignored it (proof the forgeries arrived).
#[test]
fn forged_heartbeats_of_every_field_combination_do_not_stop_a_serving_pair() {
    const TEST: &str = "forged_heartbeats_of_every_field_combination_do_not_stop_a_serving_pair";
    if common::skip(TEST) {
        return;
    }
    let _serial = common::serial();
    let mut s = Scenario::start(common::config("forge")).expect("start pair");
    let mut load = common::load(&s, 2, "f");
    common::wait_ops(&s, &load, 100, Duration::from_secs(20));
    let spoofer = Spoofer::new(&s);
    let stranger = s
        .in_netns(|| UdpSocket::bind("127.0.0.1:0").expect("bind"))
        .expect("enter namespace");
    let datagrams = forged_datagrams();
    // (target, spoofed source): each side's port, "from" the other side's port.
    let targets = [
        (
            loopback(BACKUP_HEARTBEAT_PORT),
            loopback(PRIMARY_HEARTBEAT_PORT),
        ),
        (
            loopback(PRIMARY_HEARTBEAT_PORT),
            loopback(BACKUP_HEARTBEAT_PORT),
        ),
    ];
    let mut sent = 0;
    for _round in 0..3 {
        for d in &datagrams {
            for (to, from) in targets {
                spoofer.send(from, to, d);
                stranger.send_to(d, to).expect("send");
                sent += 2;
            }
        }
        std::thread::sleep(Duration::from_millis(500));
        assert_pair_untouched(&mut s);
    }
    eprintln!("{TEST}: {sent} forged datagrams sent");
    // Time for any reaction (an arbiter read, a stop) to happen.
    std::thread::sleep(Duration::from_secs(2));
    assert_pair_untouched(&mut s);
    common::wait_ops(&s, &load, 200, Duration::from_secs(20));
    // Proof that the forgeries arrived: each side saw a claimed newer generation, and the
    // primary checked one on the arbiter.
    for (side, needle) in [
        (Side::Primary, "does not confirm"),
        (Side::Primary, "claims a newer generation"),
        (Side::Backup, "claims a newer generation"),
    ] {
        let node = match side {
            Side::Primary => s.primary.as_ref(),
            Side::Backup => s.backup.as_ref(),
        }
        .expect("node");
        assert!(
            node.find_line(needle).is_some(),
            "the {} logged no {needle:?} (did the forgeries arrive?)\n{}",
            side.name(),
            node.stderr_text()
        );
    }
    let stats = load.stop();
    assert_eq!(stats.errors, 0, "client errors: {:?}", load.last_error());
    common::assert_no_acked_write_lost(&s, load.checker());
    assert_pair_untouched(&mut s);
    s.shutdown_guest();
    common::assert_exits_with(s.primary.as_mut().expect("primary"), 0);
    common::assert_exits_with(s.backup.as_mut().expect("backup"), 0);
}

/// Valid-looking heartbeats of the current generation, spoofed from the primary's address to
/// the backup every 5 ms, before and after the primary is SIGKILLed: they must not keep the
/// dead primary "alive" — its logging link broke, so the backup contests the next generation
/// anyway, goes live and serves; no acknowledged write is lost.
#[test]
fn forged_heartbeats_do_not_keep_a_killed_primary_alive() {
    const TEST: &str = "forged_heartbeats_do_not_keep_a_killed_primary_alive";
    if common::skip(TEST) {
        return;
    }
    let _serial = common::serial();
    let mut config = common::config("forgek");
    config.transport = "tcp".into();
    let mut s = Scenario::start(config).expect("start pair");
    let mut load = common::load(&s, 2, "k");
    common::wait_ops(&s, &load, 100, Duration::from_secs(20));
    let spoofer = Arc::new(Spoofer::new(&s));
    let stop = Arc::new(AtomicBool::new(false));
    let forger = {
        let (spoofer, stop) = (Arc::clone(&spoofer), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut sequence = 1u64 << 40;
            while !stop.load(Ordering::Acquire) {
                sequence += 1;
                let hb = Heartbeat {
                    role: Role::Primary,
                    generation: 1,
                    sequence,
                    incarnation: 42,
                };
                spoofer.send(
                    loopback(PRIMARY_HEARTBEAT_PORT),
                    loopback(BACKUP_HEARTBEAT_PORT),
                    &hb.encode(),
                );
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let t_kill = Instant::now();
    s.primary.take().expect("primary").kill();
    load.mark(Instant::now());
    let live = s
        .backup
        .as_mut()
        .expect("backup")
        .wait_line("LIVE", Duration::from_secs(15));
    stop.store(true, Ordering::Release);
    forger.join().expect("forger thread");
    let live = live.unwrap_or_else(|| {
        panic!(
            "the backup did not go live while forged heartbeats arrived\n{}",
            s.stderr_of_both()
        )
    });
    eprintln!("{TEST}: {live}; {:?} after the kill", t_kill.elapsed());
    assert!(live.contains("generation 2"), "{live}");
    common::wait_first_reply(&s, &load, Duration::from_secs(20));
    common::wait_ops(&s, &load, 100, Duration::from_secs(20));
    load.stop();
    common::assert_no_acked_write_lost(&s, load.checker());
    assert_eq!(
        s.generations(),
        vec![(1, "primary".to_string()), (2, "backup".to_string())]
    );
    s.shutdown_guest();
    common::assert_exits_with(s.backup.as_mut().expect("backup"), 0);
}
