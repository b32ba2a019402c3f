//! GOODBYE over real TCP on loopback: a side that leaves the pair on purpose says why, and the
//! other side's poller stops with a typed event ([`TransportError::PeerLeft`], also readable
//! as `peer_goodbye()`), not with a link failure — after every record sent before it.

mod common;

use std::net::TcpListener;
use std::time::{Duration, Instant};

use common::*;
use ftvm_channel::tcp::{TcpMode, TcpTransport};
use ftvm_channel::{Config, Goodbye, GoodbyeReason, LogReceiver, LogSender, TransportError};

const RECORDS: u64 = 2_000;

/// A primary connected to a backup over TCP on loopback; `backup` runs on the backup's
/// thread with its receiver and returns what the test checks there.
fn pair<T: Send + 'static>(
    backup: impl FnOnce(LogReceiver) -> T + Send + 'static,
) -> (LogSender, std::thread::JoinHandle<T>) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    let b = std::thread::spawn(move || {
        let s = accept_within(&l, Duration::from_secs(20));
        let t = TcpTransport::from_stream(s, TcpMode::Spin).expect("backup transport");
        let (p, c) = backup_buffer();
        let rx = LogReceiver::start(p, c, Box::new(t), Config::default(), poller())
            .expect("backup handshake");
        backup(rx)
    });
    let t = TcpTransport::connect(addr, TcpMode::Spin, Duration::from_secs(10)).expect("connect");
    let (p, c) = ftvm_ringbuf::with_capacity(BUF_CAP).expect("buffer");
    let mut tx = LogSender::start(p, c, Box::new(t), Config::default(), poller())
        .expect("primary handshake");
    let mut buf = Vec::new();
    for seq in 1..=RECORDS {
        payload(seq, &mut buf);
        while tx.producer().push(kind(seq), &buf).is_err() {
            std::thread::yield_now();
        }
    }
    (tx, b)
}

/// The backup says it cannot take over: the primary's sender stops with that reason, typed.
#[test]
fn backup_that_cannot_take_over_says_goodbye_and_the_primary_learns_why() {
    let (tx, backup) = pair(|mut rx| {
        let mut got = 0;
        while got < RECORDS {
            got += rx.poll_records(|_| {}).expect("records") as u64;
        }
        rx.goodbye(GoodbyeReason::CannotTakeOver, "disk copy full")
            .expect("say goodbye");
        assert!(!rx.is_running());
        // Saying goodbye twice: the link is already gone.
        assert!(rx.goodbye(GoodbyeReason::PlannedStop, "again").is_err());
    });
    assert!(tx
        .wait_acked(RECORDS, Duration::from_secs(20))
        .expect("acks"));
    backup.join().expect("backup thread");
    let deadline = Instant::now() + Duration::from_secs(10);
    while tx.is_running() {
        assert!(Instant::now() < deadline, "the sender did not stop");
        std::thread::sleep(Duration::from_millis(1));
    }
    let expected = Goodbye {
        reason: GoodbyeReason::CannotTakeOver,
        text: "disk copy full".into(),
    };
    assert_eq!(tx.peer_goodbye(), Some(expected.clone()));
    match tx.error() {
        Some(TransportError::PeerLeft(g)) => assert_eq!(g, expected),
        other => panic!("the sender stopped with {other:?}, not the backup's goodbye"),
    }
    // Still readable after the error was taken.
    assert_eq!(tx.peer_goodbye(), Some(expected));
}

/// The primary stops as planned: the backup reads every record sent before the GOODBYE, then
/// its receiver ends with the reason (`PlannedStop` decodes and surfaces as a typed event).
#[test]
fn planned_stop_of_the_primary_reaches_the_backup_after_every_record() {
    let (tx, backup) = pair(|mut rx| {
        let (e, n) = receive_until_error(&mut rx, Duration::from_secs(20));
        (n, e, rx.peer_goodbye())
    });
    assert!(tx
        .wait_acked(RECORDS, Duration::from_secs(20))
        .expect("acks"));
    tx.goodbye(GoodbyeReason::PlannedStop, "operator asked")
        .expect("say goodbye");
    assert!(!tx.is_running());
    let (n, e, seen) = backup.join().expect("backup thread");
    assert_eq!(n, RECORDS);
    let expected = Goodbye {
        reason: GoodbyeReason::PlannedStop,
        text: "operator asked".into(),
    };
    assert!(
        matches!(&e, TransportError::PeerLeft(g) if *g == expected),
        "{e:?}"
    );
    assert_eq!(seen, Some(expected));
    assert!(tx.peer_goodbye().is_none());
}
