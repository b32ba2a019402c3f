//! A peer SIGKILLed in the middle of a frame: the survivor gets a clear `Closed { mid_frame:
//! true }` error after every complete record, and never a partial record. On shared memory
//! (where frames are published atomically) a peer killed while streaming is detected by the
//! peer timeout, after every record it had seen acknowledged and nothing it never sent.
//!
//! The two tests run one at a time (a lock): each bounds a detection time.

mod common;

use std::io::Write;
use std::net::TcpListener;
use std::os::unix::process::ExitStatusExt;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::*;
use ftvm_channel::tcp::{TcpMode, TcpTransport};
use ftvm_channel::{Config, LogReceiver, LogSender, TransportError};

const RECORDS: u64 = 10_000;
/// Records the shm child streams after the first `RECORDS` were acknowledged, before it dies.
const MORE: u64 = 5_000;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

fn die() -> ! {
    // SAFETY: plain signal to ourselves.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGKILL);
    }
    unreachable!("SIGKILL returned")
}

fn cfg() -> Config {
    Config {
        generation: 1,
        peer_timeout: Duration::from_millis(500),
        ..Config::default()
    }
}

/// Pushes the records `seqs` (waiting for room).
fn push_records(tx: &mut LogSender, seqs: std::ops::RangeInclusive<u64>) {
    let mut buf = Vec::new();
    for seq in seqs {
        payload(seq, &mut buf);
        while tx.producer().push(kind(seq), &buf).is_err() {
            std::thread::yield_now();
        }
    }
}

/// Child: sends RECORDS records, waits for their acks, then writes half a frame on the raw
/// socket and kills itself.
fn child_tcp(spec: &ChildSpec) {
    let t = TcpTransport::connect(
        spec.addr.parse().expect("addr"),
        TcpMode::Spin,
        Duration::from_secs(10),
    )
    .expect("connect");
    let mut raw = t.stream().try_clone().expect("clone");
    let (p, c) = ftvm_ringbuf::with_capacity(BUF_CAP).expect("buffer");
    let mut tx = LogSender::start(p, c, Box::new(t), cfg(), poller()).expect("handshake");
    push_records(&mut tx, 1..=RECORDS);
    assert!(tx
        .wait_acked(RECORDS, Duration::from_secs(30))
        .expect("acks"));
    // Half a frame: a length prefix announcing 200 bytes, then 50 of them.
    let mut half = 200u32.to_le_bytes().to_vec();
    half.extend_from_slice(&[0x5A; 50]);
    raw.write_all(&half).expect("write");
    raw.flush().expect("flush");
    std::thread::sleep(Duration::from_millis(20));
    die();
}

/// Child: sends RECORDS records over shm and waits for their acks, then streams MORE and
/// kills itself in the middle of the stream.
fn child_shm(spec: &ChildSpec) {
    let t = connect("shm", &spec.addr, 0.0, 1).expect("open");
    let (p, c) = ftvm_ringbuf::with_capacity(BUF_CAP).expect("buffer");
    let mut tx = LogSender::start(p, c, t, cfg(), poller()).expect("handshake");
    push_records(&mut tx, 1..=RECORDS);
    assert!(tx
        .wait_acked(RECORDS, Duration::from_secs(30))
        .expect("acks"));
    push_records(&mut tx, RECORDS + 1..=RECORDS + MORE);
    die();
}

#[test]
fn tcp_peer_killed_mid_frame() {
    if let Some(spec) = ChildSpec::from_env() {
        child_tcp(&spec);
        return;
    }
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let spec = ChildSpec {
        role: "primary".into(),
        transport: "tcp-spin".into(),
        addr: l.local_addr().expect("addr").to_string(),
        records: RECORDS,
        fault_p: 0.0,
        generation: 1,
        digest: 0,
    };
    let _one = one_at_a_time();
    let mut child = spawn_child("tcp_peer_killed_mid_frame", &spec);
    let t = TcpTransport::accept(&l, TcpMode::Spin).expect("accept");
    let (p, c) = backup_buffer();
    let mut rx = LogReceiver::start(p, c, Box::new(t), cfg(), poller()).expect("handshake");
    let (err, got) = receive_until_error(&mut rx, Duration::from_secs(30));
    let status = child.wait().expect("wait");
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
    assert_eq!(
        got, RECORDS,
        "every complete record delivered, nothing more"
    );
    assert!(
        matches!(err, TransportError::Closed { mid_frame: true }),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("in the middle of a frame"),
        "{err}"
    );
}

#[test]
fn shm_peer_killed_detected() {
    if let Some(spec) = ChildSpec::from_env() {
        child_shm(&spec);
        return;
    }
    let rv = Rendezvous::new("shm", "peer_death");
    let t = rv.accept("shm", 0.0, 0);
    let spec = ChildSpec {
        role: "primary".into(),
        transport: "shm".into(),
        addr: rv.addr(),
        records: RECORDS,
        fault_p: 0.0,
        generation: 1,
        digest: 0,
    };
    let _one = one_at_a_time();
    let mut child = spawn_child("shm_peer_killed_detected", &spec);
    // When the child died (as soon as its parent can tell).
    let died = std::thread::spawn(move || {
        let status = child.wait().expect("wait");
        (status, Instant::now())
    });
    let (p, c) = backup_buffer();
    let mut rx = LogReceiver::start(p, c, t, cfg(), poller()).expect("handshake");
    let (err, got) = receive_until_error(&mut rx, Duration::from_secs(30));
    let detected = Instant::now();
    let (status, died_at) = died.join().expect("waiter");
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
    // Every record the child saw acknowledged arrived, each whole and in order (checked as
    // received), and nothing it never sent.
    assert!(
        (RECORDS..=RECORDS + MORE).contains(&got),
        "got {got} records; the child had {RECORDS} acknowledged and sent at most {}",
        RECORDS + MORE
    );
    // Detected by the peer timeout: not before it could have run out, and soon after.
    let timeout = cfg().peer_timeout;
    assert!(matches!(err, TransportError::PeerTimeout { .. }), "{err:?}");
    let after = detected.saturating_duration_since(died_at);
    eprintln!("shm_peer_killed_detected: {got} records, detected {after:?} after the child died");
    assert!(
        after + Duration::from_millis(100) >= timeout / 2
            && after <= timeout + Duration::from_secs(2),
        "detected {after:?} after the death (peer timeout {timeout:?})"
    );
}
