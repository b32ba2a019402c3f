//! The sender's poller with `IdleKind::Park`: it sleeps while every committed record is
//! acknowledged, and `LogSender::notify` wakes it. Real TCP on loopback, in-process.

use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ftvm_channel::poller::{LogReceiver, LogSender, PollerConfig};
use ftvm_channel::reliable::Config;
use ftvm_channel::tcp::{TcpMode, TcpTransport};
use ftvm_ringbuf::IdleKind;

/// Starts a receiver that consumes everything; returns its thread (yielding the records seen,
/// in order) and the flag that stops it.
fn backup(listener: TcpListener) -> (std::thread::JoinHandle<Vec<u64>>, Arc<AtomicBool>) {
    let done = Arc::new(AtomicBool::new(false));
    let d = Arc::clone(&done);
    let t = std::thread::spawn(move || {
        let (p, c) = ftvm_ringbuf::with_capacity(1 << 16).unwrap();
        let t = TcpTransport::accept(&listener, TcpMode::Blocking).unwrap();
        let mut rx = LogReceiver::start(
            p,
            c,
            Box::new(t),
            Config::default(),
            PollerConfig::default(),
        )
        .unwrap();
        let mut seen = Vec::new();
        while !d.load(Ordering::Acquire) {
            let _ = rx.poll_records(|r| {
                seen.push(u64::from_le_bytes(r.payload()[..8].try_into().unwrap()))
            });
            rx.wait_for_records(Duration::from_millis(1));
        }
        seen
    });
    (t, done)
}

fn sender(
    idle: IdleKind,
) -> (
    LogSender,
    std::thread::JoinHandle<Vec<u64>>,
    Arc<AtomicBool>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (rx, done) = backup(listener);
    let (p, c) = ftvm_ringbuf::with_capacity(1 << 16).unwrap();
    let t = TcpTransport::connect(addr, TcpMode::Blocking, Duration::from_secs(10)).unwrap();
    let pc = PollerConfig { core: None, idle };
    let tx = LogSender::start(p, c, Box::new(t), Config::default(), pc).unwrap();
    (tx, rx, done)
}

fn push(tx: &mut LogSender, i: u64) -> u64 {
    let seq = tx.producer().push(7, &i.to_le_bytes()).unwrap();
    tx.notify(seq);
    seq
}

#[test]
fn quiet_sender_sleeps_between_bursts_and_loses_nothing() {
    let (mut tx, rx, done) = sender(IdleKind::Park);
    let mut last = 0;
    for round in 0..20u64 {
        for i in 0..10 {
            last = push(&mut tx, round * 10 + i);
        }
        assert!(
            tx.wait_acked(last, Duration::from_secs(10)).unwrap(),
            "round {round}: records not acknowledged"
        );
        // Quiet: everything committed is acknowledged; the poller goes to sleep.
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        tx.quiet_sleeps() >= 20,
        "the poller slept {} times in 20 quiet pauses",
        tx.quiet_sleeps()
    );
    done.store(true, Ordering::Release);
    let seen = rx.join().unwrap();
    assert_eq!(
        seen,
        (0..200).collect::<Vec<u64>>(),
        "lost or reordered records"
    );
}

#[test]
fn sender_without_notify_or_park_never_sleeps() {
    for (idle, notify) in [(IdleKind::Park, false), (IdleKind::Yield, true)] {
        let (mut tx, rx, done) = sender(idle);
        let mut last = 0;
        for i in 0..50u64 {
            last = tx.producer().push(7, &i.to_le_bytes()).unwrap();
            if notify {
                tx.notify(last);
            }
            if i % 10 == 9 {
                assert!(tx.wait_acked(last, Duration::from_secs(10)).unwrap());
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        assert!(tx.wait_acked(last, Duration::from_secs(10)).unwrap());
        assert_eq!(tx.quiet_sleeps(), 0, "{idle:?}, notify {notify}");
        done.store(true, Ordering::Release);
        assert_eq!(rx.join().unwrap(), (0..50).collect::<Vec<u64>>());
    }
}
