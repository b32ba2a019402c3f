//! Shared helpers for the channel scenario tests: two real processes (the test binary re-runs
//! itself with `FTVM_CHANNEL_CHILD` set to play the primary), deterministic record contents.
#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ftvm_channel::faulty::{Faults, FaultyTransport};
use ftvm_channel::shm::ShmTransport;
use ftvm_channel::tcp::{TcpMode, TcpTransport};
use ftvm_channel::uring::{UringConfig, UringTransport};
use ftvm_channel::{Config, LogReceiver, LogSender, PollerConfig, Transport, TransportError};
use ftvm_ringbuf::{IdleKind, IdleStrategy, SpinThenYield};

pub const CHILD_ENV: &str = "FTVM_CHANNEL_CHILD";
pub const BUF_CAP: usize = 1 << 22;

/// Payload of the record with sequence number `seq`: 8..64 bytes, a big one (fragmented on
/// every transport) every 50 000 records.
pub fn payload(seq: u64, out: &mut Vec<u8>) {
    out.clear();
    let len = if seq % 50_000 == 7 {
        150_000
    } else {
        8 + (seq.wrapping_mul(7) % 57) as usize
    };
    let mut x = seq.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out[..8].copy_from_slice(&seq.to_le_bytes());
}

pub fn kind(seq: u64) -> u16 {
    (seq % 255) as u16
}

/// The parameters the child gets, as one env string: `role;transport;addr;records;faults;generation;digest`.
#[derive(Debug, Clone)]
pub struct ChildSpec {
    pub role: String,
    pub transport: String,
    pub addr: String,
    pub records: u64,
    pub fault_p: f64,
    pub generation: u64,
    pub digest: u8,
}

impl ChildSpec {
    pub fn encode(&self) -> String {
        format!(
            "{};{};{};{};{};{};{}",
            self.role,
            self.transport,
            self.addr,
            self.records,
            self.fault_p,
            self.generation,
            self.digest
        )
    }
    pub fn from_env() -> Option<Self> {
        let s = std::env::var(CHILD_ENV).ok()?;
        let v: Vec<&str> = s.split(';').collect();
        Some(Self {
            role: v[0].into(),
            transport: v[1].into(),
            addr: v[2].into(),
            records: v[3].parse().ok()?,
            fault_p: v[4].parse().ok()?,
            generation: v[5].parse().ok()?,
            digest: v[6].parse().ok()?,
        })
    }
}

/// Re-runs this test binary as the child for test `test`.
pub fn spawn_child(test: &str, spec: &ChildSpec) -> Child {
    Command::new(std::env::current_exe().expect("current exe"))
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, spec.encode())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn child")
}

pub fn config(spec: &ChildSpec) -> Config {
    Config {
        generation: spec.generation,
        digest: [spec.digest; 32],
        rto: Duration::from_millis(5),
        ..Config::default()
    }
}

/// The parent's side of the rendezvous: a listener or shm rings; returns the address string.
pub enum Rendezvous {
    Tcp(TcpListener),
    Shm(PathBuf),
}

impl Rendezvous {
    pub fn new(transport: &str, tag: &str) -> Self {
        match transport {
            "shm" => Rendezvous::Shm(PathBuf::from(format!(
                "/dev/shm/ftvm-test-{}-{tag}",
                std::process::id()
            ))),
            _ => Rendezvous::Tcp(TcpListener::bind("127.0.0.1:0").expect("bind")),
        }
    }
    pub fn addr(&self) -> String {
        match self {
            Rendezvous::Tcp(l) => l.local_addr().expect("addr").to_string(),
            Rendezvous::Shm(p) => p.display().to_string(),
        }
    }
    /// The parent's (backup's) transport.
    pub fn accept(&self, transport: &str, fault_p: f64, seed: u64) -> Box<dyn Transport> {
        let t: Box<dyn Transport> = match (self, transport) {
            (Rendezvous::Shm(p), _) => Box::new(ShmTransport::create(p, 1 << 20).expect("shm")),
            (Rendezvous::Tcp(l), "tcp") => Box::new(
                TcpTransport::from_stream(accept_within(l, CHILD_CONNECT), TcpMode::Blocking)
                    .expect("tcp"),
            ),
            (Rendezvous::Tcp(l), "tcp-spin") => Box::new(
                TcpTransport::from_stream(accept_within(l, CHILD_CONNECT), TcpMode::Spin)
                    .expect("tcp"),
            ),
            (Rendezvous::Tcp(l), "uring") => Box::new(
                UringTransport::from_stream(
                    accept_within(l, CHILD_CONNECT),
                    UringConfig::default(),
                )
                .expect("uring"),
            ),
            _ => panic!("unknown transport {transport}"),
        };
        wrap(t, fault_p, seed)
    }
}

/// How long the parent waits for its child process to connect.
const CHILD_CONNECT: Duration = Duration::from_secs(20);

/// The next connection on `l`; fails the test when none comes within `limit` (a child process
/// that died before connecting would otherwise leave the test blocked in `accept` for good).
pub fn accept_within(l: &TcpListener, limit: Duration) -> TcpStream {
    l.set_nonblocking(true).expect("non-blocking listener");
    let deadline = Instant::now() + limit;
    loop {
        match l.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).expect("blocking stream");
                return s;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(
                    Instant::now() < deadline,
                    "no connection from the child process within {limit:?}"
                );
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

fn wrap(t: Box<dyn Transport>, p: f64, seed: u64) -> Box<dyn Transport> {
    if p > 0.0 {
        Box::new(FaultyTransport::new(t, Faults::uniform(p, seed)))
    } else {
        t
    }
}

/// The child's (primary's) transport.
pub fn connect(
    transport: &str,
    addr: &str,
    fault_p: f64,
    seed: u64,
) -> Result<Box<dyn Transport>, TransportError> {
    let t: Box<dyn Transport> = match transport {
        "shm" => Box::new(ShmTransport::open(addr.as_ref(), Duration::from_secs(10))?),
        "tcp" | "tcp-spin" | "uring" => {
            let a: SocketAddr = addr.parse().expect("socket address");
            let mode = if transport == "tcp" {
                TcpMode::Blocking
            } else {
                TcpMode::Spin
            };
            let t = TcpTransport::connect(a, mode, Duration::from_secs(10))?;
            if transport == "uring" {
                let s = t
                    .stream()
                    .try_clone()
                    .map_err(|source| TransportError::Io {
                        op: "clone",
                        source,
                    })?;
                drop(t);
                Box::new(UringTransport::from_stream(s, UringConfig::default())?)
            } else {
                Box::new(t)
            }
        }
        _ => panic!("unknown transport {transport}"),
    };
    Ok(wrap(t, fault_p, seed))
}

pub fn poller() -> PollerConfig {
    PollerConfig {
        core: None,
        idle: IdleKind::Yield,
    }
}

/// The primary: appends `records` records and waits until all are acknowledged.
pub fn run_primary(spec: &ChildSpec) -> Result<(), TransportError> {
    let t = connect(&spec.transport, &spec.addr, spec.fault_p, 1)?;
    let (p, c) = ftvm_ringbuf::with_capacity(BUF_CAP).expect("buffer");
    let mut tx = LogSender::start(p, c, t, config(spec), poller())?;
    let mut buf = Vec::new();
    let mut idle = SpinThenYield::new(100);
    for seq in 1..=spec.records {
        payload(seq, &mut buf);
        let mut claim = tx
            .producer()
            .claim_blocking(kind(seq), buf.len(), &mut idle as &mut dyn IdleStrategy)
            .expect("claim");
        claim.copy_from_slice(&buf);
        assert_eq!(claim.commit(), seq);
        if seq % 4096 == 0 && !tx.is_running() {
            return Err(tx
                .error()
                .unwrap_or(TransportError::Closed { mid_frame: false }));
        }
    }
    if !tx.wait_acked(spec.records, Duration::from_secs(60))? {
        panic!("not everything acknowledged in time: {:?}", tx.snapshot());
    }
    eprintln!("primary done: {:?}", tx.snapshot());
    Ok(())
}

/// The backup: receives until `records` records arrived, checking each one.
pub fn run_backup(
    mut rx: LogReceiver,
    records: u64,
    deadline: Duration,
) -> Result<LogReceiver, String> {
    let mut expect = 1u64;
    let mut buf = Vec::new();
    let end = Instant::now() + deadline;
    let mut bad: Option<String> = None;
    while expect <= records {
        let n = rx
            .poll_records(|r| {
                if bad.is_some() {
                    return;
                }
                payload(r.seq(), &mut buf);
                if r.seq() != expect {
                    bad = Some(format!("got seq {} expected {expect}", r.seq()));
                } else if r.payload() != &buf[..] || r.kind() != kind(r.seq()) {
                    bad = Some(format!("content of record {} differs", r.seq()));
                }
                expect += 1;
            })
            .map_err(|e| format!("receiver failed at record {expect}: {e}"))?;
        if let Some(b) = bad {
            return Err(b);
        }
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
}

pub fn backup_buffer() -> (ftvm_ringbuf::Producer, ftvm_ringbuf::Consumer) {
    ftvm_ringbuf::with_capacity(BUF_CAP).expect("buffer")
}

/// Receives until the link ends (at most `limit`), checking that every record is the next one,
/// whole and uncorrupted; returns the error that ended it and how many records came.
pub fn receive_until_error(rx: &mut LogReceiver, limit: Duration) -> (TransportError, u64) {
    let mut expect = 1;
    let mut buf = Vec::new();
    let deadline = Instant::now() + limit;
    loop {
        assert!(
            Instant::now() < deadline,
            "the link did not end within {limit:?}"
        );
        match rx.poll_records(|r| {
            payload(r.seq(), &mut buf);
            assert_eq!(r.seq(), expect);
            assert_eq!(
                r.payload(),
                &buf[..],
                "partial or corrupt record {}",
                r.seq()
            );
            expect += 1;
        }) {
            Ok(0) => std::thread::yield_now(),
            Ok(_) => {}
            Err(e) => return (e, expect - 1),
        }
    }
}

/// How [`stream_records`] runs: records `1..=records`, each end's log buffer `ring` bytes, the
/// pollers' idle strategy `idle` (with `Park` the test threads sleep 200 µs between looks
/// too), the backup's deadline `within`, record contents from `payload`.
#[derive(Clone, Copy)]
pub struct Stream {
    pub records: u64,
    pub ring: usize,
    pub idle: IdleKind,
    pub within: Duration,
    pub payload: fn(u64, &mut Vec<u8>),
}

impl Stream {
    fn pause(&self) {
        if matches!(self.idle, IdleKind::Park) {
            std::thread::sleep(Duration::from_micros(200));
        } else {
            std::thread::yield_now();
        }
    }
}

/// A primary streams `s.records` records to a backup over a loopback TCP connection, each
/// end's transport made from its stream by `primary` / `backup` (the backup's on its own
/// thread, as the handshake needs); the backup checks every record's order, kind and content.
/// Returns both ends once every record was acknowledged and delivered.
pub fn stream_records(
    s: &Stream,
    primary: impl FnOnce(TcpStream) -> Box<dyn Transport>,
    backup: impl FnOnce(TcpStream) -> Box<dyn Transport> + Send + 'static,
) -> (LogSender, LogReceiver) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let a = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
    let (b, _) = l.accept().expect("accept");
    let pc = PollerConfig {
        core: None,
        idle: s.idle,
    };
    let bs = *s;
    let backup = std::thread::spawn(move || {
        let (p, c) = ftvm_ringbuf::with_capacity(bs.ring).expect("buffer");
        let mut rx = LogReceiver::start(p, c, backup(b), Config::default(), pc).expect("accept");
        let (mut expect, mut buf) = (1, Vec::new());
        let deadline = Instant::now() + bs.within;
        while expect <= bs.records {
            assert!(Instant::now() < deadline, "stuck at {expect}");
            let n = rx
                .poll_records(|r| {
                    (bs.payload)(r.seq(), &mut buf);
                    assert_eq!(r.seq(), expect, "out of order");
                    assert_eq!(r.kind(), kind(r.seq()));
                    assert_eq!(r.payload(), &buf[..], "content of {}", r.seq());
                    expect += 1;
                })
                .expect("receive");
            if n == 0 {
                bs.pause();
            }
        }
        // Handed back, so that it outlives the primary's wait for the last ack.
        rx
    });
    let (p, c) = ftvm_ringbuf::with_capacity(s.ring).expect("buffer");
    let mut tx = LogSender::start(p, c, primary(a), Config::default(), pc).expect("connect");
    let mut buf = Vec::new();
    for seq in 1..=s.records {
        (s.payload)(seq, &mut buf);
        while tx.producer().push(kind(seq), &buf).is_err() {
            s.pause();
        }
    }
    assert!(tx.wait_acked(s.records, s.within).expect("acks"));
    let rx = backup.join().expect("backup");
    assert_eq!(rx.snapshot().records_delivered, s.records);
    (tx, rx)
}
