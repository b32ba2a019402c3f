//! Handshake refusals: a protocol version, generation or pairing-digest mismatch is refused
//! with a clear error on both sides (real TCP sockets, real sender and receiver).

use std::net::TcpListener;
use std::time::Duration;

use ftvm_channel::frame::{self, Frame, Hello, Role};
use ftvm_channel::tcp::{TcpMode, TcpTransport};
use ftvm_channel::{Config, Receiver, Sender, Transport, TransportError};

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

/// Runs a real sender and a real receiver with the given configurations; returns both errors.
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
    assert!(matches!(te, TransportError::Setup { .. }), "{te:?}");
    assert!(matches!(re, TransportError::Setup { .. }), "{re:?}");
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

/// Makes a HELLO of another protocol version (valid checksum).
fn hello_next_version(role: Role) -> Vec<u8> {
    let mut b = Vec::new();
    let h = Hello {
        role,
        max_frame: 65536,
        capacity: 1 << 16,
        max_payload: 1000,
        seq: 1,
        executed: 0,
        digest: [1; 32],
    };
    frame::encode_hello(&mut b, 1, &h);
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
        Ok(Frame::Hello(_))
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
