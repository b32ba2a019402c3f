//! The io_uring transport's non-default configurations still move records exactly once and in
//! order: one-shot receives instead of multishot, no COOP_TASKRUN, SQPOLL (or its logged
//! fallback where the kernel refuses it), every send on an io-wq worker (pinned to one core),
//! and every send inline.

mod common;

use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use common::{kind, payload};
use ftvm_channel::uring::{UringConfig, UringTransport};
use ftvm_channel::{Config, LogReceiver, LogSender, PollerConfig};
use ftvm_ringbuf::IdleKind;

const RECORDS: u64 = 20_000;

fn run(cfg: UringConfig) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let a = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
    let (b, _) = l.accept().expect("accept");
    // Parked when idle: with SQPOLL a kernel thread already takes a core.
    let pc = PollerConfig {
        core: None,
        idle: IdleKind::Park,
    };
    let backup = std::thread::spawn(move || {
        let t = UringTransport::from_stream(b, cfg).expect("uring backup");
        let (p, c) = ftvm_ringbuf::with_capacity(1 << 22).expect("buffer");
        let mut rx = LogReceiver::start(p, c, Box::new(t), Config::default(), pc).expect("accept");
        let mut expect = 1;
        let mut buf = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while expect <= RECORDS {
            assert!(Instant::now() < deadline, "stuck at {expect}");
            let n = rx
                .poll_records(|r| {
                    payload(r.seq(), &mut buf);
                    assert_eq!(r.seq(), expect);
                    assert_eq!(r.payload(), &buf[..]);
                    expect += 1;
                })
                .expect("receive");
            if n == 0 {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        // Handed back, so that it outlives the primary's wait for the last ack.
        rx
    });
    let t = UringTransport::from_stream(a, cfg).expect("uring primary");
    let (p, c) = ftvm_ringbuf::with_capacity(1 << 22).expect("buffer");
    let mut tx = LogSender::start(p, c, Box::new(t), Config::default(), pc).expect("connect");
    let mut buf = Vec::new();
    for seq in 1..=RECORDS {
        payload(seq, &mut buf);
        while tx.producer().push(kind(seq), &buf).is_err() {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    assert!(tx
        .wait_acked(RECORDS, Duration::from_secs(60))
        .expect("acks"));
    let rx = backup.join().expect("backup");
    assert_eq!(rx.snapshot().records_delivered, RECORDS);
}

#[test]
fn uring_one_shot_receive() {
    run(UringConfig {
        multishot: false,
        ..UringConfig::default()
    });
}

#[test]
fn uring_without_coop_taskrun() {
    run(UringConfig {
        coop_taskrun: false,
        ..UringConfig::default()
    });
}

#[test]
fn uring_sqpoll_or_fallback() {
    run(UringConfig {
        sqpoll: Some(10),
        ..UringConfig::default()
    });
}

#[test]
fn uring_every_send_on_a_worker() {
    run(UringConfig {
        async_send_min: Some(0),
        worker_cpu: Some(0),
        ..UringConfig::default()
    });
}

#[test]
fn uring_every_send_inline() {
    run(UringConfig {
        async_send_min: None,
        ..UringConfig::default()
    });
}
