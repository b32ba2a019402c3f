//! The built-in client of `ftvm demo` and of the fault tests: a few threads speaking the Redis
//! protocol (RESP) to the `kv` guest, recording every `SET` acknowledged with `+OK` in a
//! [`Checker`], and a final check that every acknowledged write is readable.
//!
//! ```text
//! thread t:  SET demo:t:0 v0 ─> +OK ─> acked(demo:t:0 = v0) ─> SET demo:t:1 v1 ─> ...
//!            (one request at a time per connection; a connection error or timeout drops the
//!             connection and the write in flight is "unknown": neither acked nor lost;
//!             an error reply — `-OOM` from a full store, `-ERR disk full` — is an answer:
//!             the write is not acked, the thread goes on with the next key)
//! check:     GET every acked key (pipelined) ─> must equal the acked value
//! ```
//! Every key is written once, so "readable" is exact: the value read back must be the value
//! acknowledged.

use std::io::{self, BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A failure of the client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server could not be reached.
    #[error("cannot connect to {addr}")]
    Connect {
        /// The server.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A request or its reply failed on the wire.
    #[error("request to {addr} failed")]
    Io {
        /// The server.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The server's reply is not RESP.
    #[error("bad reply from {addr}: {what}")]
    Protocol {
        /// The server.
        addr: SocketAddr,
        /// What was wrong.
        what: String,
    },
    /// A client thread could not be started or could not enter the network namespace.
    #[error("cannot start client thread")]
    Thread(#[source] io::Error),
}

/// One RESP reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `+...`
    Simple(String),
    /// `-...`
    Error(String),
    /// `:n`
    Integer(i64),
    /// `$n ...` (`None`: `$-1`, no such key).
    Bulk(Option<Vec<u8>>),
    /// `*n ...`
    Array(Vec<Reply>),
}

/// One connection to a RESP server.
#[derive(Debug)]
pub struct RespConn {
    addr: SocketAddr,
    reader: BufReader<TcpStream>,
    out: Vec<u8>,
}

impl RespConn {
    /// Connects with `timeout` for the connection and for every reply.
    ///
    /// # Errors
    /// [`ClientError::Connect`].
    pub fn connect(addr: SocketAddr, timeout: Duration) -> Result<Self, ClientError> {
        let connect = |source| ClientError::Connect { addr, source };
        let stream = TcpStream::connect_timeout(&addr, timeout).map_err(connect)?;
        stream.set_read_timeout(Some(timeout)).map_err(connect)?;
        stream.set_write_timeout(Some(timeout)).map_err(connect)?;
        stream.set_nodelay(true).map_err(connect)?;
        Ok(RespConn {
            addr,
            reader: BufReader::with_capacity(64 << 10, stream),
            out: Vec::with_capacity(4096),
        })
    }

    /// Appends one command to the output buffer (sent by [`RespConn::flush`]).
    pub fn queue(&mut self, args: &[&[u8]]) {
        self.out
            .extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
        for a in args {
            self.out
                .extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            self.out.extend_from_slice(a);
            self.out.extend_from_slice(b"\r\n");
        }
    }

    /// Sends the queued commands.
    ///
    /// # Errors
    /// [`ClientError::Io`].
    pub fn flush(&mut self) -> Result<(), ClientError> {
        let r = self.reader.get_mut().write_all(&self.out);
        self.out.clear();
        r.map_err(|source| self.io(source))
    }

    fn io(&self, source: io::Error) -> ClientError {
        ClientError::Io {
            addr: self.addr,
            source,
        }
    }

    fn protocol(&self, what: impl Into<String>) -> ClientError {
        ClientError::Protocol {
            addr: self.addr,
            what: what.into(),
        }
    }

    fn line(&mut self) -> Result<String, ClientError> {
        let mut line = Vec::new();
        let n = self
            .reader
            .read_until(b'\n', &mut line)
            .map_err(|source| self.io(source))?;
        if n == 0 {
            return Err(self.io(io::ErrorKind::UnexpectedEof.into()));
        }
        if !line.ends_with(b"\r\n") {
            return Err(self.protocol("reply line without CRLF"));
        }
        line.truncate(line.len() - 2);
        String::from_utf8(line).map_err(|_| self.protocol("reply line is not UTF-8"))
    }

    /// Reads one reply.
    ///
    /// # Errors
    /// [`ClientError::Io`] / [`ClientError::Protocol`].
    pub fn read_reply(&mut self) -> Result<Reply, ClientError> {
        let line = self.line()?;
        let (tag, rest) = line.split_at(line.len().min(1));
        let int = |s: &str| -> Result<i64, ClientError> {
            s.parse()
                .map_err(|_| self.protocol(format!("bad integer {s:?}")))
        };
        Ok(match tag {
            "+" => Reply::Simple(rest.to_string()),
            "-" => Reply::Error(rest.to_string()),
            ":" => Reply::Integer(int(rest)?),
            "$" => {
                let n = int(rest)?;
                if n < 0 {
                    Reply::Bulk(None)
                } else {
                    let n = usize::try_from(n).map_err(|_| self.protocol("bulk length"))?;
                    let mut data = vec![0u8; n + 2];
                    io::Read::read_exact(&mut self.reader, &mut data)
                        .map_err(|source| self.io(source))?;
                    data.truncate(n);
                    Reply::Bulk(Some(data))
                }
            }
            "*" => {
                let n = int(rest)?;
                let mut items = Vec::new();
                for _ in 0..n.max(0) {
                    items.push(self.read_reply()?);
                }
                Reply::Array(items)
            }
            _ => return Err(self.protocol(format!("unknown reply {line:?}"))),
        })
    }

    /// Sends one command and reads its reply.
    ///
    /// # Errors
    /// [`ClientError::Io`] / [`ClientError::Protocol`].
    pub fn command(&mut self, args: &[&[u8]]) -> Result<Reply, ClientError> {
        self.queue(args);
        self.flush()?;
        self.read_reply()
    }
}

/// The writes acknowledged to the clients, and the outcome of reading them back.
#[derive(Debug, Default)]
pub struct Checker {
    acked: Mutex<Vec<(String, String)>>,
}

/// The outcome of [`Checker::verify`].
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct CheckReport {
    /// Acknowledged writes read back.
    pub checked: u64,
    /// Acknowledged writes missing or with another value.
    pub lost: u64,
    /// Up to 10 examples of lost writes (`key: expected, got`).
    pub examples: Vec<String>,
}

impl Checker {
    /// Records writes acknowledged with `+OK`.
    pub fn record(&self, writes: impl IntoIterator<Item = (String, String)>) {
        self.acked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(writes);
    }

    /// How many writes were acknowledged.
    pub fn len(&self) -> usize {
        self.acked.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether no write was acknowledged.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Reads every acknowledged write back with `GET` (pipelined in batches) over `conn`.
    ///
    /// # Errors
    /// [`ClientError`] when the server cannot be asked (a lost write is not an error: it is
    /// counted in the report).
    pub fn verify(&self, conn: &mut RespConn) -> Result<CheckReport, ClientError> {
        let acked = self.acked.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut report = CheckReport::default();
        for batch in acked.chunks(256) {
            for (k, _) in batch {
                conn.queue(&[b"GET", k.as_bytes()]);
            }
            conn.flush()?;
            for (k, v) in batch {
                let got = conn.read_reply()?;
                report.checked += 1;
                if got != Reply::Bulk(Some(v.as_bytes().to_vec())) {
                    report.lost += 1;
                    if report.examples.len() < 10 {
                        report
                            .examples
                            .push(format!("{k}: expected {v:?}, got {got:?}"));
                    }
                }
            }
        }
        Ok(report)
    }
}

/// Settings of a [`Load`].
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// Network namespace the client threads enter (`None`: this one).
    pub netns: Option<String>,
    /// The server.
    pub addr: SocketAddr,
    /// Client threads (one connection each).
    pub threads: usize,
    /// Connect and reply timeout; a longer silence drops the connection (the write in flight
    /// is then neither acked nor lost) and counts as an error.
    pub timeout: Duration,
    /// Key prefix (`<prefix>:<thread>:<n>`).
    pub prefix: String,
}

/// Counters of a running [`Load`].
#[derive(Debug, Default)]
struct LoadShared {
    stop: AtomicBool,
    /// Acknowledged SETs.
    ops: AtomicU64,
    /// Connection failures, timeouts and error replies other than `-OOM`.
    errors: AtomicU64,
    /// `-OOM` replies (the store is full; the write was not applied).
    oom: AtomicU64,
    /// Nanoseconds since `base` of the newest reply (of any kind).
    last_reply_ns: AtomicU64,
    /// After this mark (ns since `base`, 0: none), the time of the first reply (of any kind).
    mark_ns: AtomicU64,
    first_after_mark_ns: AtomicU64,
    last_error: Mutex<Option<String>>,
}

/// Client threads writing unique keys with `SET` as fast as the server answers.
#[derive(Debug)]
pub struct Load {
    shared: Arc<LoadShared>,
    base: Instant,
    checker: Arc<Checker>,
    threads: Vec<JoinHandle<()>>,
}

/// A snapshot of a [`Load`]'s counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadStats {
    /// Acknowledged SETs so far.
    pub ops: u64,
    /// Errors so far (connection failures, timeouts, error replies other than `-OOM`).
    pub errors: u64,
    /// `-OOM` replies so far: writes the full store refused (not acknowledged, not lost).
    pub oom: u64,
    /// When the newest reply (of any kind) arrived.
    pub last_reply: Option<Instant>,
}

/// Whether an error reply is the store's "out of memory" (`-OOM ...`, as Redis's `maxmemory`).
pub fn is_oom(error: &str) -> bool {
    error.starts_with("OOM ")
}

impl Load {
    /// Starts `config.threads` client threads.
    ///
    /// # Errors
    /// [`ClientError::Thread`].
    pub fn start(config: &LoadConfig, checker: Arc<Checker>) -> Result<Self, ClientError> {
        let shared = Arc::new(LoadShared::default());
        let base = Instant::now();
        let mut threads = Vec::new();
        for t in 0..config.threads {
            let (shared, checker, config) = (shared.clone(), checker.clone(), config.clone());
            let h = std::thread::Builder::new()
                .name(format!("client-{t}"))
                .spawn(move || client_thread(t, &config, &shared, &checker, base))
                .map_err(ClientError::Thread)?;
            threads.push(h);
        }
        Ok(Load {
            shared,
            base,
            checker,
            threads,
        })
    }

    /// The counters now.
    pub fn stats(&self) -> LoadStats {
        let last = self.shared.last_reply_ns.load(Ordering::Acquire);
        LoadStats {
            ops: self.shared.ops.load(Ordering::Acquire),
            errors: self.shared.errors.load(Ordering::Acquire),
            oom: self.shared.oom.load(Ordering::Acquire),
            last_reply: (last > 0).then(|| self.base + Duration::from_nanos(last)),
        }
    }

    /// From now on, remember when the first reply arrives (see [`Load::first_reply_after_mark`]).
    pub fn mark(&self, at: Instant) {
        let ns = u64::try_from(at.saturating_duration_since(self.base).as_nanos())
            .unwrap_or(u64::MAX)
            .max(1);
        self.shared.first_after_mark_ns.store(0, Ordering::Release);
        self.shared.mark_ns.store(ns, Ordering::Release);
    }

    /// The first reply (of any kind: an error reply is an answer too) received after the
    /// [mark](Load::mark), if any yet.
    pub fn first_reply_after_mark(&self) -> Option<Instant> {
        let ns = self.shared.first_after_mark_ns.load(Ordering::Acquire);
        (ns > 0).then(|| self.base + Duration::from_nanos(ns))
    }

    /// The most recent client error, if any.
    pub fn last_error(&self) -> Option<String> {
        self.shared
            .last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The checker the threads record into.
    pub fn checker(&self) -> &Arc<Checker> {
        &self.checker
    }

    /// Stops the threads (each finishes its request in flight), waits for them and returns the
    /// final counters (the checker then holds every acknowledged write).
    pub fn stop(&mut self) -> LoadStats {
        self.halt();
        self.stats()
    }

    fn halt(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                tracing::error!("a client thread panicked");
            }
        }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.halt();
    }
}

impl LoadShared {
    /// Notes a reply (of any kind) received now.
    fn replied(&self, base: Instant) {
        let now = u64::try_from(base.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.last_reply_ns.fetch_max(now, Ordering::AcqRel);
        let mark = self.mark_ns.load(Ordering::Acquire);
        if mark > 0 && now >= mark {
            let _ = self.first_after_mark_ns.compare_exchange(
                0,
                now,
                Ordering::AcqRel,
                Ordering::Acquire,
            );
        }
    }
}

fn client_thread(
    t: usize,
    config: &LoadConfig,
    shared: &LoadShared,
    checker: &Checker,
    base: Instant,
) {
    if let Some(ns) = &config.netns {
        if let Err(e) = ftvm_channel::netns::enter_netns(ns) {
            shared.errors.fetch_add(1, Ordering::Relaxed);
            *shared.last_error.lock().unwrap_or_else(|e| e.into_inner()) =
                Some(format!("client {t}: cannot enter namespace {ns}: {e}"));
            return;
        }
    }
    let mut conn: Option<RespConn> = None;
    let mut acked = Vec::with_capacity(1024);
    let mut n = 0u64;
    let fail = |what: String| {
        shared.errors.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(thread = t, %what, "client error");
        *shared.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(what);
    };
    while !shared.stop.load(Ordering::Acquire) {
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match RespConn::connect(config.addr, config.timeout) {
                Ok(c) => conn.insert(c),
                Err(e) => {
                    fail(format!("client {t}: {}", error_chain(&e)));
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
            },
        };
        let key = format!("{}:{t}:{n}", config.prefix);
        let value = format!("v{n}-{t}");
        n += 1;
        let reply = c.command(&[b"SET", key.as_bytes(), value.as_bytes()]);
        if reply.is_ok() {
            shared.replied(base);
        }
        match reply {
            Ok(Reply::Simple(s)) if s == "OK" => {
                acked.push((key, value));
                if acked.len() >= 256 {
                    checker.record(acked.drain(..));
                }
                shared.ops.fetch_add(1, Ordering::AcqRel);
            }
            Ok(Reply::Error(e)) if is_oom(&e) => {
                shared.oom.fetch_add(1, Ordering::AcqRel);
            }
            Ok(other) => fail(format!("client {t}: SET {key} answered {other:?}")),
            Err(e) => {
                fail(format!("client {t}: {}", error_chain(&e)));
                conn = None;
            }
        }
    }
    checker.record(acked);
}

/// The messages of an error and its sources, joined with `: `.
pub use ftvm_vmm_core::error_chain;

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// A tiny RESP server: answers SET with +OK and GET from a map, one connection at a time;
    /// `lose`: a key it acknowledges without storing; `full_after`: keys it holds before it
    /// answers SET with `-OOM`.
    fn fake_server(lose: Option<&'static str>, full_after: Option<usize>) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            let mut map = std::collections::HashMap::<Vec<u8>, Vec<u8>>::new();
            for s in l.incoming() {
                let Ok(s) = s else { return };
                let mut r = BufReader::new(s.try_clone().unwrap());
                let mut w = s;
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).unwrap_or(0) == 0 {
                        break;
                    }
                    let n: usize = line[1..].trim().parse().unwrap();
                    let mut args = Vec::new();
                    for _ in 0..n {
                        let mut len = String::new();
                        r.read_line(&mut len).unwrap();
                        let len: usize = len[1..].trim().parse().unwrap();
                        let mut d = vec![0; len + 2];
                        io::Read::read_exact(&mut r, &mut d).unwrap();
                        d.truncate(len);
                        args.push(d);
                    }
                    let reply = match args[0].as_slice() {
                        b"SET" if full_after.is_some_and(|n| map.len() >= n) => {
                            b"-OOM command not allowed when used memory > 'maxmemory'.\r\n".to_vec()
                        }
                        b"SET" => {
                            if lose != Some(std::str::from_utf8(&args[1]).unwrap()) {
                                map.insert(args[1].clone(), args[2].clone());
                            }
                            b"+OK\r\n".to_vec()
                        }
                        b"GET" => match map.get(&args[1]) {
                            Some(v) => {
                                let mut o = format!("${}\r\n", v.len()).into_bytes();
                                o.extend_from_slice(v);
                                o.extend_from_slice(b"\r\n");
                                o
                            }
                            None => b"$-1\r\n".to_vec(),
                        },
                        _ => b"-ERR unknown\r\n".to_vec(),
                    };
                    w.write_all(&reply).unwrap();
                }
            }
        });
        addr
    }

    /// A load of one client thread on `addr` and its checker.
    fn one_client(addr: SocketAddr) -> (Load, Arc<Checker>) {
        let checker = Arc::new(Checker::default());
        let cfg = LoadConfig {
            netns: None,
            addr,
            threads: 1,
            timeout: Duration::from_secs(5),
            prefix: "t".into(),
        };
        (Load::start(&cfg, checker.clone()).unwrap(), checker)
    }

    #[test]
    fn load_records_acked_writes_and_check_finds_them() {
        let addr = fake_server(None, None);
        let (mut load, checker) = one_client(addr);
        while load.stats().ops < 500 {
            std::thread::sleep(Duration::from_millis(5));
        }
        let stats = load.stop();
        assert_eq!(stats.errors, 0);
        assert_eq!(checker.len() as u64, stats.ops);
        let mut c = RespConn::connect(addr, Duration::from_secs(5)).unwrap();
        let r = checker.verify(&mut c).unwrap();
        assert_eq!((r.checked, r.lost), (stats.ops, 0));
    }

    #[test]
    fn check_reports_a_lost_write() {
        let addr = fake_server(Some("t:0:3"), None);
        let checker = Checker::default();
        let mut c = RespConn::connect(addr, Duration::from_secs(5)).unwrap();
        for i in 0..10 {
            let k = format!("t:0:{i}");
            assert_eq!(
                c.command(&[b"SET", k.as_bytes(), b"x"]).unwrap(),
                Reply::Simple("OK".into())
            );
            checker.record([(k, "x".to_string())]);
        }
        let r = checker.verify(&mut c).unwrap();
        assert_eq!((r.checked, r.lost), (10, 1));
        assert!(r.examples[0].contains("t:0:3"), "{:?}", r.examples);
    }

    #[test]
    fn oom_replies_are_answers_counted_apart_not_acks() {
        let (mut load, checker) = one_client(fake_server(None, Some(50)));
        let deadline = Instant::now() + Duration::from_secs(20);
        while load.stats().oom < 200 {
            assert!(Instant::now() < deadline, "{:?}", load.stats());
            std::thread::sleep(Duration::from_millis(5));
        }
        // Only -OOM from now on: a reply after the mark still comes.
        load.mark(Instant::now());
        while load.first_reply_after_mark().is_none() {
            assert!(Instant::now() < deadline, "no reply after the mark");
            std::thread::sleep(Duration::from_millis(5));
        }
        let stats = load.stop();
        assert_eq!(stats.ops, 50, "{stats:?}");
        assert_eq!(stats.errors, 0, "{:?}", load.last_error());
        assert!(stats.last_reply.is_some());
        assert_eq!(checker.len(), 50);
        assert!(is_oom(
            "OOM command not allowed when used memory > 'maxmemory'."
        ));
        assert!(!is_oom("ERR disk full: write not applied"));
    }
}
