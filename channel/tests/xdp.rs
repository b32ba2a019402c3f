//! The log channel's real sender and receiver pollers over the AF_XDP transport, between two
//! network namespaces joined by a veth pair: records arrive exactly once, in order and intact —
//! on a clean link, with 1% of frames lost, duplicated, reordered and truncated, across a link
//! cut of one second — and foreign, short and corrupt frames are dropped and counted.
//!
//! Needs root; without it every test prints `SKIP <test>: <reason>`. The tests run one at a
//! time (a lock): each uses both cores.
#![cfg(feature = "xdp")]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ftvm_channel::faulty::{Faults, FaultyTransport};
use ftvm_channel::netns::{HostPair, HostPairConfig};
use ftvm_channel::xdp::{eth, XdpConfig, XdpStats, XdpTransport};
use ftvm_channel::{frame, Config, LogReceiver, LogSender, PollerConfig, Transport};
use ftvm_ringbuf::{IdleKind, IdleStrategy, SpinThenYield};

const BUF_CAP: usize = 1 << 22;
/// The big record of the clean runs: ~100 frames.
const BIG: usize = 150_000;
/// The big record under faults: ~11 frames. (Go-back-N restarts a fragmented record from its
/// first fragment, so with 3% of frames faulty a 100-fragment record needs dozens of attempts,
/// each a retransmit timeout: seconds per record.)
const BIG_FAULTY: usize = 16_000;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Payload of record `seq`: 8..64 bytes, and one of `big` bytes (fragmented: 150 000 bytes are
/// about 100 AF_XDP frames) every 50 000 records.
fn payload(seq: u64, big: usize, out: &mut Vec<u8>) {
    out.clear();
    let len = if seq % 50_000 == 7 {
        big
    } else {
        8 + (seq.wrapping_mul(7) % 57) as usize
    };
    let mut x = seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out[..8].copy_from_slice(&seq.to_le_bytes());
}

fn kind(seq: u64) -> u16 {
    (seq % 255) as u16
}

fn config() -> Config {
    Config {
        generation: 7,
        rto: Duration::from_millis(5),
        max_inflight_bytes: window(),
        ..Config::default()
    }
}

/// Log bytes in flight: `FTVM_XDP_WINDOW` (for experiments) or 256 KiB. Below what the
/// receiver's UMEM holds (2048 frames), and small enough that a go-back-N after a lost frame
/// costs little: with 4 MiB in flight and 1% loss, 1M records took minutes instead of seconds.
fn window() -> usize {
    std::env::var("FTVM_XDP_WINDOW")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256 << 10)
}

fn poller() -> PollerConfig {
    PollerConfig {
        core: None,
        idle: IdleKind::Yield,
    }
}

struct Link {
    hosts: HostPair,
    a: XdpTransport,
    b: XdpTransport,
}

fn link(prefix: &str) -> Link {
    let hosts = HostPair::create(&HostPairConfig::with_prefix(prefix)).expect("test hosts");
    let c = hosts.config().clone();
    let a = XdpTransport::open(
        &XdpConfig::new(&c.if_a)
            .in_netns(&c.netns_a)
            .with_peer_mac(c.mac_b),
    )
    .expect("AF_XDP in A");
    let b = XdpTransport::open(
        &XdpConfig::new(&c.if_b)
            .in_netns(&c.netns_b)
            .with_peer_mac(c.mac_a),
    )
    .expect("AF_XDP in B");
    Link { hosts, a, b }
}

/// The backup: started on its own thread (the handshake blocks until the primary's HELLO),
/// then checks every record; `progress` tells other threads how far it got.
fn spawn_backup(
    t: Box<dyn Transport>,
    records: u64,
    big: usize,
    progress: Arc<AtomicU64>,
) -> JoinHandle<Result<LogReceiver, String>> {
    std::thread::spawn(move || {
        let (p, c) = ftvm_ringbuf::with_capacity(BUF_CAP).map_err(|e| e.to_string())?;
        let mut rx = LogReceiver::start(p, c, t, config(), poller()).map_err(|e| e.to_string())?;
        let mut expect = 1u64;
        let mut buf = Vec::new();
        let mut bad: Option<String> = None;
        let end = Instant::now() + Duration::from_secs(90);
        while expect <= records {
            let n = rx
                .poll_records(|r| {
                    if bad.is_some() {
                        return;
                    }
                    payload(r.seq(), big, &mut buf);
                    if r.seq() != expect {
                        bad = Some(format!("got record {} expecting {expect}", r.seq()));
                    } else if r.payload() != buf.as_slice() || r.kind() != kind(r.seq()) {
                        bad = Some(format!("content of record {} differs", r.seq()));
                    }
                    expect += 1;
                })
                .map_err(|e| format!("receiver failed at record {expect}: {e}"))?;
            if let Some(b) = bad {
                return Err(b);
            }
            progress.store(expect - 1, Ordering::Relaxed);
            if n == 0 {
                if Instant::now() > end {
                    return Err(format!("timeout at record {expect}: {:?}", rx.snapshot()));
                }
                std::thread::yield_now();
            } else {
                rx.report_executed(expect - 1);
            }
        }
        Ok(rx)
    })
}

/// The primary: appends `records` records and waits until all are acknowledged.
fn run_primary(t: Box<dyn Transport>, records: u64, big: usize) -> LogSender {
    let (p, c) = ftvm_ringbuf::with_capacity(BUF_CAP).expect("buffer");
    let mut tx = LogSender::start(p, c, t, config(), poller()).expect("handshake");
    let mut buf = Vec::new();
    let mut idle = SpinThenYield::new(100);
    for seq in 1..=records {
        payload(seq, big, &mut buf);
        let mut claim = tx
            .producer()
            .claim_blocking(kind(seq), buf.len(), &mut idle as &mut dyn IdleStrategy)
            .expect("claim");
        claim.copy_from_slice(&buf);
        assert_eq!(claim.commit(), seq);
        if seq % 4096 == 0 {
            assert!(tx.is_running(), "sender poller stopped: {:?}", tx.error());
        }
    }
    let acked = tx
        .wait_acked(records, Duration::from_secs(60))
        .expect("sender poller");
    assert!(acked, "not all acknowledged in time: {:?}", tx.snapshot());
    tx
}

/// Ships `records` records from A to B over `a`/`b` (wrapped as given) and returns the
/// endpoints' counters after checking every record on the way.
fn transfer(
    a: Box<dyn Transport>,
    b: Box<dyn Transport>,
    records: u64,
    big: usize,
    progress: Arc<AtomicU64>,
) -> (ftvm_channel::StatsSnapshot, ftvm_channel::StatsSnapshot) {
    let done = Arc::new(AtomicU64::new(0));
    let monitor = {
        let (progress, done) = (Arc::clone(&progress), Arc::clone(&done));
        std::thread::spawn(move || {
            let t0 = Instant::now();
            let mut last = t0;
            while done.load(Ordering::Relaxed) == 0 {
                std::thread::sleep(Duration::from_millis(20));
                if last.elapsed() >= Duration::from_secs(5) {
                    last = Instant::now();
                    eprintln!(
                        "  ... {:?}: {} of {records} records delivered",
                        t0.elapsed(),
                        progress.load(Ordering::Relaxed)
                    );
                }
            }
        })
    };
    let backup = spawn_backup(b, records, big, progress);
    let tx = run_primary(a, records, big);
    let rx = backup
        .join()
        .expect("backup thread")
        .unwrap_or_else(|e| panic!("backup: {e}"));
    done.store(1, Ordering::Relaxed);
    monitor.join().expect("monitor");
    let (s, r) = (tx.snapshot(), rx.snapshot());
    assert_eq!(r.records_delivered, records, "exactly once: {r:?}");
    (s, r)
}

#[test]
fn xdp_million_records_in_order() {
    ftvm_channel::require_root!("xdp_million_records_in_order");
    let _serial = serial();
    let Link { hosts, a, b } = link("fx-1m");
    let (sa, sb) = (a.stats(), b.stats());
    let records = 1_000_000;
    let t0 = Instant::now();
    let (s, r) = transfer(Box::new(a), Box::new(b), records, BIG, Arc::default());
    eprintln!(
        "xdp_million_records_in_order: {records} records in {:?}; sender {s:?}; receiver {r:?}; \
         xdp A {:?}; xdp B {:?}",
        t0.elapsed(),
        sa.snapshot(),
        sb.snapshot()
    );
    assert!(s.frames_sent > 0 && sb.snapshot().rx_frames > 0);
    assert_eq!(sb.snapshot().rx_wrong_ethertype + sb.snapshot().rx_short, 0);
    drop(hosts);
}

#[test]
fn xdp_million_records_with_faults() {
    ftvm_channel::require_root!("xdp_million_records_with_faults");
    let _serial = serial();
    let Link { hosts, a, b } = link("fx-ft");
    let faults = |seed| Faults {
        loss: 0.01,
        duplicate: 0.01,
        reorder: 0.01,
        truncate: 0.0,
        refuse: 0.0,
        seed,
    };
    let a = FaultyTransport::new(a, faults(11));
    let b = FaultyTransport::new(b, faults(12));
    let records = 1_000_000;
    let t0 = Instant::now();
    let (s, r) = transfer(
        Box::new(a),
        Box::new(b),
        records,
        BIG_FAULTY,
        Arc::default(),
    );
    eprintln!(
        "xdp_million_records_with_faults: {records} records in {:?}; sender {s:?}; receiver {r:?}",
        t0.elapsed()
    );
    assert!(s.retransmitted_frames > 0, "losses were repaired: {s:?}");
    assert!(r.drop_duplicate + r.drop_out_of_order > 0, "{r:?}");
    drop(hosts);
}

#[test]
fn xdp_link_down_for_a_second() {
    ftvm_channel::require_root!("xdp_link_down_for_a_second");
    let _serial = serial();
    let Link { hosts, a, b } = link("fx-cut");
    let records = 600_000;
    let progress = Arc::new(AtomicU64::new(0));
    let cut_at = records / 3;
    let (cut_tx, cut_rx) = std::sync::mpsc::channel();
    let watcher = {
        let progress = Arc::clone(&progress);
        let ns_a = hosts.config().netns_a.clone();
        let ifname = hosts.config().if_a.clone();
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(60);
            while progress.load(Ordering::Relaxed) < cut_at && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
            let ip = |state: &str| {
                ftvm_channel::netns::ip(&["-n", &ns_a, "link", "set", "dev", &ifname, state])
                    .expect("ip link set")
            };
            let at = progress.load(Ordering::Relaxed);
            ip("down");
            std::thread::sleep(Duration::from_millis(300));
            let during = progress.load(Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(700));
            ip("up");
            cut_tx.send((at, during)).expect("report cut");
        })
    };
    let (s, r) = transfer(
        Box::new(a),
        Box::new(b),
        records,
        BIG,
        Arc::clone(&progress),
    );
    watcher.join().expect("watcher");
    let (at, during) = cut_rx.recv().expect("the link was cut");
    eprintln!(
        "xdp_link_down_for_a_second: cut at record {at} (at {during} 300 ms later); \
         sender {s:?}; receiver {r:?}"
    );
    assert!(at >= cut_at && at < records, "the cut happened mid-stream");
    assert!(
        s.retransmit_timeouts > 0,
        "the cut was noticed and repaired: {s:?}"
    );
    drop(hosts);
}

/// A frame with a wrong EtherType, a short frame and a frame with a bad CRC, sent from A with
/// a raw `AF_PACKET` socket while the log streams: the first two are dropped and counted by the
/// transport, the third by the channel's frame layer; the stream is unharmed.
#[test]
fn xdp_bad_frames_dropped_and_counted() {
    ftvm_channel::require_root!("xdp_bad_frames_dropped_and_counted");
    let _serial = serial();
    let Link { hosts, a, b } = link("fx-bad2");
    let sb: Arc<XdpStats> = b.stats();
    let records = 200_000;
    let progress = Arc::new(AtomicU64::new(0));
    let injector = {
        let progress = Arc::clone(&progress);
        let c = hosts.config().clone();
        let a_ns = hosts.a().name().to_owned();
        std::thread::spawn(move || {
            while progress.load(Ordering::Relaxed) < 1000 {
                std::thread::sleep(Duration::from_millis(1));
            }
            ftvm_channel::netns::enter_netns(&a_ns).expect("enter A");
            inject_bad_frames(&c.if_a, c.mac_b, c.mac_a)
        })
    };
    let (_s, r) = transfer(
        Box::new(a),
        Box::new(b),
        records,
        BIG,
        Arc::clone(&progress),
    );
    assert_eq!(injector.join().expect("injector"), 3);
    let x = sb.snapshot();
    eprintln!("xdp_bad_frames_dropped_and_counted: receiver {r:?}; xdp B {x:?}");
    assert_eq!(x.rx_wrong_ethertype, 1, "{x:?}");
    assert_eq!(x.rx_short, 1, "{x:?}");
    assert_eq!(r.drop_crc, 1, "{r:?}");
    drop(hosts);
}

/// Sends three bad frames from the calling thread's namespace out of `ifname`.
fn inject_bad_frames(ifname: &str, dst: [u8; 6], src: [u8; 6]) -> usize {
    let ours = eth::header_template(dst, src, eth::ETHERTYPE_FTVM);
    // 1. A well-formed channel frame under another EtherType (IPv4).
    let mut hb = Vec::new();
    frame::encode_heartbeat(&mut hb, config().generation, 42);
    let mut wrong = eth::header_template(dst, src, 0x0800).to_vec();
    wrong.extend_from_slice(&(hb.len() as u16).to_be_bytes());
    wrong.extend_from_slice(&hb);
    // 2. Our EtherType, but cut inside the envelope's length field.
    let short = ours[..eth::OVERHEAD - 1].to_vec();
    // 3. Our EtherType, a channel frame whose body was corrupted after its CRC was computed.
    let mut corrupt_frame = hb.clone();
    corrupt_frame[frame::HEADER_LEN] ^= 0x5a;
    let mut corrupt = vec![0u8; eth::OVERHEAD + corrupt_frame.len()];
    let n = eth::encode(&ours, &corrupt_frame, &mut corrupt).expect("fits");
    corrupt.truncate(n);

    // SAFETY: plain socket(2); checked below.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW,
            i32::from((libc::ETH_P_ALL as u16).to_be()),
        )
    };
    assert!(fd >= 0, "AF_PACKET: {}", std::io::Error::last_os_error());
    let name = std::ffi::CString::new(ifname).expect("name");
    // SAFETY: `name` is a valid NUL-terminated string.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    assert!(ifindex > 0, "no interface {ifname}");
    // SAFETY: sockaddr_ll is plain old data; all-zero is valid.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_ifindex = ifindex as i32;
    addr.sll_halen = 6;
    addr.sll_addr[..6].copy_from_slice(&dst);
    let mut sent = 0;
    for f in [&wrong, &short, &corrupt] {
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
