//! Handshake refusals: a protocol version, generation, pairing-digest or settings mismatch is
//! refused with a clear error on both sides (real TCP sockets, real sender and receiver); a
//! listening backup drops stray connections and pairs with the real primary afterwards.

use std::net::TcpListener;
use std::time::Duration;

use ftvm_channel::frame::{self, Frame, Hello, Role};
use ftvm_channel::reliable::{SettingsCheck, TcpIncoming};
use ftvm_channel::tcp::{TcpMode, TcpTransport};
use ftvm_channel::{Config, Receiver, Refusal, Sender, Transport, TransportError};

fn cfg(generation: u64, digest: u8) -> Config {
    Config {
        generation,
        digest: [digest; 32],
        handshake_timeout: Duration::from_secs(5),
        ..Config::default()
    }
}

fn pair() -> (TcpTransport, TcpTransport) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let a = TcpTransport::connect(
        l.local_addr().expect("addr"),
        TcpMode::Spin,
        Duration::from_secs(5),
    )
    .expect("connect");
    let b = TcpTransport::accept(&l, TcpMode::Spin).expect("accept");
    (a, b)
}

/// Runs a real sender and a real receiver with the given configurations; returns both errors
/// (both must be [`TransportError::Refused`] with the same reason).
fn both_refuse(primary: Config, backup: Config) -> (String, String) {
    let (a, b) = pair();
    let rx = std::thread::spawn(move || {
        let (p, _c) = ftvm_ringbuf::with_capacity(1 << 16).expect("buffer");
        Receiver::accept(Box::new(b), p, backup).map(|_| ())
    });
    let (_p, c) = ftvm_ringbuf::with_capacity(1 << 16).expect("buffer");
    let tx = Sender::connect(Box::new(a), c, 1, primary).map(|_| ());
    let rx = rx.join().expect("receiver thread");
    let (Err(te), Err(re)) = (tx, rx) else {
        panic!("a mismatched handshake was accepted")
    };
    let (TransportError::Refused { reason: a, .. }, TransportError::Refused { reason: b, .. }) =
        (&te, &re)
    else {
        panic!("not refusals: {te:?} / {re:?}")
    };
    assert_eq!(a, b);
    (te.to_string(), re.to_string())
}

#[test]
fn generation_mismatch_refused_on_both_sides() {
    let (tx, rx) = both_refuse(cfg(5, 1), cfg(4, 1));
    assert!(
        tx.contains("generation mismatch") && tx.contains('5') && tx.contains('4'),
        "{tx}"
    );
    assert!(rx.contains("generation mismatch"), "{rx}");
}

#[test]
fn pairing_digest_mismatch_refused_on_both_sides() {
    let (tx, rx) = both_refuse(cfg(1, 0xAA), cfg(1, 0xBB));
    assert!(tx.contains("pairing digest mismatch"), "{tx}");
    assert!(
        rx.contains("pairing digest mismatch") && rx.contains("aaaa") && rx.contains("bbbb"),
        "{rx}"
    );
}

/// A settings check that accepts only `want`, naming both blobs otherwise.
fn settings(mine: &str, want: &'static str) -> Config {
    Config {
        settings: mine.as_bytes().to_vec(),
        check_settings: Some(SettingsCheck(std::sync::Arc::new(
            move |theirs: &[u8]| {
                if theirs == want.as_bytes() {
                    Ok(())
                } else {
                    Err(format!(
                        "settings differ: {} against {want}",
                        String::from_utf8_lossy(theirs)
                    ))
                }
            },
        ))),
        ..cfg(1, 1)
    }
}

#[test]
fn settings_mismatch_refused_on_both_sides_and_settings_exchanged() {
    let (tx, rx) = both_refuse(settings("P", "B"), settings("B", "X"));
    assert!(
        tx.contains("the backup refused") && tx.contains("P against X"),
        "{tx}"
    );
    assert!(rx.contains("P against X"), "{rx}");
    // Matching: each side learns the other's blob.
    let (a, b) = pair();
    let rx = std::thread::spawn(move || {
        let (p, _c) = ftvm_ringbuf::with_capacity(1 << 16).expect("buffer");
        Receiver::accept(Box::new(b), p, settings("B", "P")).map(|r| r.peer_settings().to_vec())
    });
    let (_p, c) = ftvm_ringbuf::with_capacity(1 << 16).expect("buffer");
    let tx = Sender::connect(Box::new(a), c, 1, settings("P", "B")).expect("primary handshake");
    assert_eq!(tx.peer_settings(), b"B");
    assert_eq!(rx.join().expect("thread").expect("backup handshake"), b"P");
}

/// A TCP listener on a free loopback port whose connections become tcp-spin transports.
fn tcp_incoming() -> (TcpIncoming, std::net::SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    let make = |s| Ok(Box::new(TcpTransport::from_stream(s, TcpMode::Spin)?) as Box<dyn Transport>);
    (TcpIncoming::new(l, Box::new(make)).expect("incoming"), addr)
}

/// A listening backup meets, in turn, a connection that closes at once, one that sends
/// garbage, one that sends a HELLO of another protocol version, and one that stays silent
/// (still open): it drops or refuses each, keeps listening, and pairs with the real primary.
#[test]
fn listening_backup_drops_strays_and_pairs_with_the_primary() {
    use std::io::Write;
    let (mut incoming, addr) = tcp_incoming();
    let rx = std::thread::spawn(move || {
        let (p, _c) = ftvm_ringbuf::with_capacity(1 << 16).expect("buffer");
        Receiver::listen(&mut incoming, p, cfg(1, 1)).map(|(_, report)| report)
    });
    drop(std::net::TcpStream::connect(addr).expect("connect"));
    let mut garbage = std::net::TcpStream::connect(addr).expect("connect");
    garbage.write_all(&[0xFF; 64]).expect("garbage");
    drop(garbage);
    let mut old =
        TcpTransport::connect(addr, TcpMode::Spin, Duration::from_secs(5)).expect("connect");
    assert!(old.send(&hello_next_version(Role::Primary)).expect("send"));
    old.flush().expect("flush");
    let refusal = recv_one(&mut old);
    assert!(matches!(
        frame::decode(&refusal).map(|d| d.frame),
        Ok(Frame::Refuse { reason: 1, .. })
    ));
    drop(old);
    let _silent = std::net::TcpStream::connect(addr).expect("connect");
    std::thread::sleep(Duration::from_millis(100));
    let (_p, c) = ftvm_ringbuf::with_capacity(1 << 16).expect("buffer");
    let t = TcpTransport::connect(addr, TcpMode::Spin, Duration::from_secs(5)).expect("connect");
    let tx = Sender::connect(Box::new(t), c, 1, cfg(1, 1)).expect("the primary pairs");
    assert_eq!(tx.acked_seq(), 0);
    let report = rx.join().expect("thread").expect("the backup pairs");
    assert_eq!(report.strays, 3, "{report:?}");
}

/// A listening backup still refuses a primary of this version whose digest differs: that is
/// a misconfiguration, not a stray.
#[test]
fn listening_backup_refuses_a_mismatched_primary() {
    let (mut incoming, addr) = tcp_incoming();
    let rx = std::thread::spawn(move || {
        let (p, _c) = ftvm_ringbuf::with_capacity(1 << 16).expect("buffer");
        Receiver::listen(&mut incoming, p, cfg(1, 1)).map(|_| ())
    });
    let (_p, c) = ftvm_ringbuf::with_capacity(1 << 16).expect("buffer");
    let t = TcpTransport::connect(addr, TcpMode::Spin, Duration::from_secs(5)).expect("connect");
    let te = Sender::connect(Box::new(t), c, 1, cfg(1, 2)).expect_err("mismatch accepted");
    let re = rx.join().expect("thread").expect_err("mismatch accepted");
    for e in [&te, &re] {
        assert!(
            matches!(
                e,
                TransportError::Refused {
                    reason: Refusal::Digest,
                    ..
                }
            ),
            "{e:?}"
        );
    }
}

#[test]
fn matching_handshake_accepted() {
    let (a, b) = pair();
    let rx = std::thread::spawn(move || {
        let (p, _c) = ftvm_ringbuf::with_capacity(1 << 16).expect("buffer");
        Receiver::accept(Box::new(b), p, cfg(2, 7)).map(|r| r.expected_seq())
    });
    let (_p, c) = ftvm_ringbuf::with_capacity(1 << 16).expect("buffer");
    let tx = Sender::connect(Box::new(a), c, 1, cfg(2, 7)).expect("primary handshake");
    assert_eq!(rx.join().expect("thread").expect("backup handshake"), 1);
    assert_eq!(tx.acked_seq(), 0);
}

/// A HELLO of `role` expecting record `seq` next, for a log buffer of `capacity` bytes taking
/// records of up to `max_payload` bytes (digest `[1; 32]`, generation 1 as [`cfg`] makes).
fn hello_frame(role: Role, seq: u64, capacity: u64, max_payload: u64) -> Vec<u8> {
    let mut b = Vec::new();
    let h = Hello {
        role,
        max_frame: 65536,
        capacity,
        max_payload,
        seq,
        executed: seq.saturating_sub(1),
        digest: [1; 32],
    };
    frame::encode_hello(&mut b, 1, &h, &[]);
    b
}

/// Makes a HELLO of another protocol version (valid checksum).
fn hello_next_version(role: Role) -> Vec<u8> {
    let mut b = hello_frame(role, 1, 1 << 16, 1000);
    b[frame::VERSION_OFFSET] = frame::VERSION + 1;
    frame::finish(&mut b);
    b
}

fn recv_one(t: &mut TcpTransport) -> Vec<u8> {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let mut got = None;
        t.poll_recv(&mut |f| {
            got.get_or_insert_with(|| f.to_vec());
        })
        .expect("recv");
        if let Some(g) = got {
            return g;
        }
        assert!(std::time::Instant::now() < deadline, "no frame");
        std::thread::yield_now();
    }
}

#[test]
fn version_mismatch_refused_by_backup_with_reason() {
    let (mut a, b) = pair();
    let rx = std::thread::spawn(move || {
        let (p, _c) = ftvm_ringbuf::with_capacity(1 << 16).expect("buffer");
        Receiver::accept(Box::new(b), p, cfg(1, 1)).map(|_| ())
    });
    assert!(a.send(&hello_next_version(Role::Primary)).expect("send"));
    a.flush().expect("flush");
    let refusal = recv_one(&mut a);
    let Ok(frame::Decoded {
        frame: Frame::Refuse { text, .. },
        ..
    }) = frame::decode(&refusal)
    else {
        panic!("expected a REFUSE frame")
    };
    assert!(text.contains("protocol version mismatch"), "{text}");
    let err = rx
        .join()
        .expect("thread")
        .expect_err("accepted another version")
        .to_string();
    let next = (frame::VERSION + 1).to_string();
    assert!(
        err.contains("protocol version mismatch") && err.contains(&next),
        "{err}"
    );
}

#[test]
fn version_mismatch_refused_by_primary() {
    let (a, mut b) = pair();
    let tx = std::thread::spawn(move || {
        let (_p, c) = ftvm_ringbuf::with_capacity(1 << 16).expect("buffer");
        Sender::connect(Box::new(a), c, 1, cfg(1, 1)).map(|_| ())
    });
    let first = recv_one(&mut b);
    assert!(matches!(
        frame::decode(&first).map(|d| d.frame),
        Ok(Frame::Hello { .. })
    ));
    assert!(b.send(&hello_next_version(Role::Backup)).expect("send"));
    b.flush().expect("flush");
    let err = tx
        .join()
        .expect("thread")
        .expect_err("accepted another version")
        .to_string();
    let next = format!("protocol version {}", frame::VERSION + 1);
    assert!(err.contains(&next), "{err}");
}

/// A fake backup's HELLO, as the real receiver would send it, expecting record `seq` next
/// (a buffer large enough for the primary's records).
fn backup_hello(seq: u64) -> Vec<u8> {
    hello_frame(Role::Backup, seq, 1 << 20, 1 << 19)
}

/// A real sender (holding records 1..=3) against a forged backup: `script` answers the
/// primary's HELLO; returns the sender's error, or `Ok(acked)` when it was still paired after
/// two seconds of polling.
fn forged_backup(script: Vec<Vec<u8>>) -> Result<u64, TransportError> {
    let (a, mut b) = pair();
    let fake = std::thread::spawn(move || {
        let _hello = recv_one(&mut b);
        // One frame at a time, after the sender had time to act on the previous one.
        for f in &script {
            assert!(b.send(f).expect("send"));
            b.flush().expect("flush");
            std::thread::sleep(Duration::from_millis(200));
        }
        std::thread::sleep(Duration::from_secs(3));
    });
    let (mut p, c) = ftvm_ringbuf::with_capacity(1 << 16).expect("buffer");
    for i in 0..3u8 {
        p.push(1, &[i; 8]).expect("room");
    }
    let result = Sender::connect(Box::new(a), c, 1, cfg(1, 1)).and_then(|mut tx| {
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while std::time::Instant::now() < deadline {
            tx.poll()?;
            assert!(tx.shared().acked_seq() <= 3, "acked past the records held");
        }
        Ok(tx.shared().acked_seq())
    });
    fake.join().expect("fake backup");
    result
}

/// A backup that acknowledges records the primary never sent (a forged or broken peer) is a
/// protocol violation: the sender stops with that error instead of releasing outputs on it.
#[test]
fn an_ack_beyond_what_was_sent_is_a_protocol_violation() {
    let mut ack = Vec::new();
    frame::encode_ack(&mut ack, 1, 1_000, 0, 0, 0);
    match forged_backup(vec![backup_hello(1), ack]) {
        Err(TransportError::Protocol { what }) => {
            assert!(what.contains("1000"), "{what}")
        }
        other => panic!("expected a protocol violation, got {other:?}"),
    }
}

/// A backup whose HELLO claims to hold records the primary never sent is refused (a gap), not
/// taken at its word.
#[test]
fn a_backup_claiming_unsent_records_is_refused() {
    match forged_backup(vec![backup_hello(50)]) {
        Err(TransportError::Refused {
            reason: Refusal::Gap,
            text,
        }) => assert!(text.contains("49"), "{text}"),
        other => panic!("expected a gap refusal, got {other:?}"),
    }
}
