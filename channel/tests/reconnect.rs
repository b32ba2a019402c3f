//! Kill the connection mid-stream (twice), reconnect, resume: every record delivered exactly
//! once, in order (two processes, real TCP and io_uring sockets).

mod common;

use std::net::{Shutdown, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use common::*;
use ftvm_channel::tcp::{TcpMode, TcpTransport};
use ftvm_channel::uring::{UringConfig, UringTransport};
use ftvm_channel::{LogReceiver, LogSender, Transport, TransportError};

const RECORDS: u64 = 300_000;
const CUTS: [u64; 2] = [60_000, 180_000];

fn backup_transport(kind: &str, l: &TcpListener) -> (Box<dyn Transport>, TcpStream) {
    let s = accept_within(l, Duration::from_secs(20));
    let cut = s.try_clone().expect("clone");
    let t: Box<dyn Transport> = match kind {
        "uring" => Box::new(UringTransport::from_stream(s, UringConfig::default()).expect("uring")),
        _ => Box::new(TcpTransport::from_stream(s, TcpMode::Spin).expect("tcp")),
    };
    (t, cut)
}

/// The primary: keeps appending; whenever the link breaks, connects again and resumes.
fn primary(spec: &ChildSpec) -> Result<(), TransportError> {
    let t = connect(&spec.transport, &spec.addr, 0.0, 1)?;
    let (p, c) = ftvm_ringbuf::with_capacity(BUF_CAP).expect("buffer");
    let mut tx = LogSender::start(p, c, t, config(spec), poller())?;
    let mut buf = Vec::new();
    let mut seq = 1;
    let mut reconnects = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    // Until every record is sent and acknowledged, and the backup cut the link every time it
    // means to (on a loaded machine the backup's consumer may lag so far behind that every
    // record is in its buffer before it makes a cut).
    while seq <= spec.records || tx.acked_seq() < spec.records || reconnects < CUTS.len() {
        assert!(
            Instant::now() < deadline,
            "primary stuck at {seq}, acked {}",
            tx.acked_seq()
        );
        if !tx.is_running() {
            let e = tx.error();
            eprintln!("primary: link broke ({e:?}), reconnecting");
            reconnects += 1;
            let t = connect(&spec.transport, &spec.addr, 0.0, 1)?;
            tx.reconnect(t)?;
            continue;
        }
        if seq > spec.records {
            std::thread::yield_now();
            continue;
        }
        payload(seq, &mut buf);
        match tx.producer().claim(kind(seq), buf.len()) {
            Ok(mut claim) => {
                claim.copy_from_slice(&buf);
                assert_eq!(claim.commit(), seq);
                seq += 1;
            }
            Err(_) => std::thread::yield_now(),
        }
    }
    eprintln!(
        "primary done after {reconnects} reconnects: {:?}",
        tx.snapshot()
    );
    assert_eq!(reconnects, CUTS.len(), "the primary did not see every cut");
    Ok(())
}

fn reconnect_resume(test: &str, kind: &str) {
    if let Some(spec) = ChildSpec::from_env() {
        if let Err(e) = primary(&spec) {
            eprintln!("primary failed: {e}");
            std::process::exit(1);
        }
        return;
    }
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let spec = ChildSpec {
        role: "primary".into(),
        transport: kind.into(),
        addr: l.local_addr().expect("addr").to_string(),
        records: RECORDS,
        fault_p: 0.0,
        generation: 9,
        digest: 1,
    };
    let mut child = spawn_child(test, &spec);
    let (t, mut cut) = backup_transport(kind, &l);
    let (p, c) = backup_buffer();
    let mut rx = LogReceiver::start(p, c, t, config(&spec), poller()).expect("handshake");
    let mut expect = 1u64;
    let mut buf = Vec::new();
    let mut cuts = CUTS.iter().peekable();
    let deadline = Instant::now() + Duration::from_secs(90);
    while expect <= RECORDS {
        assert!(Instant::now() < deadline, "backup stuck at {expect}");
        if cuts.peek().is_some_and(|&&c| expect > c) {
            cuts.next();
            cut.shutdown(Shutdown::Both).expect("cut the connection");
            // Drain what arrived before the cut until the poller reports the broken link. (It
            // must be drained: with its log buffer full the poller leaves the socket unread,
            // so it would never read the end of the stream.)
            loop {
                assert!(
                    Instant::now() < deadline,
                    "the cut went unnoticed at {expect}"
                );
                match rx.poll_records(|r| check(r, &mut expect, &mut buf)) {
                    Ok(0) => std::thread::yield_now(),
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
            let (t, c2) = backup_transport(kind, &l);
            cut = c2;
            rx.reconnect(t).expect("re-handshake");
            continue;
        }
        let got = rx.poll_records(|r| check(r, &mut expect, &mut buf));
        match got {
            Ok(0) => std::thread::yield_now(),
            Ok(_) => {}
            Err(e) => panic!("receiver failed at {expect}: {e}"),
        }
    }
    let status = child.wait().expect("wait");
    assert!(status.success(), "primary failed: {status}");
    assert_eq!(rx.snapshot().records_delivered, RECORDS);
    // Nothing more arrives: exactly once.
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(
        rx.poll_records(|r| panic!("extra record {}", r.seq()))
            .unwrap_or(0),
        0
    );
}

/// Checks that `r` is record `expect` with its content, and steps `expect`.
fn check(r: ftvm_ringbuf::Record<'_>, expect: &mut u64, buf: &mut Vec<u8>) {
    payload(r.seq(), buf);
    assert_eq!(r.seq(), *expect, "out of order or duplicated");
    assert_eq!(r.payload(), &buf[..], "content of record {}", r.seq());
    *expect += 1;
}

#[test]
fn tcp_reconnect_resume() {
    reconnect_resume("tcp_reconnect_resume", "tcp-spin");
}

#[test]
fn uring_reconnect_resume() {
    reconnect_resume("uring_reconnect_resume", "uring");
}
