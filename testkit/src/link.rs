//! A logging link over TCP on loopback: the primary's [`LogSender`] and the backup's
//! [`LogReceiver`], each over a log buffer of its own — the wiring every in-process pair of the
//! tests (and the throttle experiment) needs, in one place.
//!
//! The two ends are started on different threads (each `start` waits for the other's half of
//! the channel handshake), usually after each side has built its VM, sometimes inside a
//! network namespace. So the link is set up in two steps: [`TcpLink::connect`] makes the TCP
//! connection from the calling thread (its network namespace: loopback is per namespace) and
//! hands out the two ends; each side then starts its end where it runs.
//!
//! ```no_run
//! use ftvm_testkit::link::TcpLink;
//!
//! let (backup, primary) = TcpLink::new().ring(1 << 20).connect()?;
//! let rx = std::thread::spawn(move || backup.start(Default::default()));
//! let mut tx = primary.start(Default::default())?;
//! let _rx = rx.join().expect("backup thread")?;
//! tx.producer().push(1, b"entry")?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::net::TcpListener;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use ftvm_channel::tcp::{TcpMode, TcpTransport};
use ftvm_channel::{Config, LogReceiver, LogSender, PollerConfig, Transport, TransportError};

use crate::StallAcks;

/// How long the primary's end waits for the TCP connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Settings of a link before it is connected: a listener on `127.0.0.1`, each end's log buffer
/// size, the TCP mode and the pollers. Defaults: 1 MiB buffers, [`TcpMode::Spin`], the
/// default [`PollerConfig`].
#[derive(Debug)]
pub struct TcpLink {
    listener: TcpListener,
    ring: usize,
    mode: TcpMode,
    poller: PollerConfig,
}

impl Default for TcpLink {
    fn default() -> Self {
        Self::new()
    }
}

impl TcpLink {
    /// A link listening on an ephemeral loopback port.
    ///
    /// # Panics
    /// When no loopback port can be bound (the test cannot run).
    pub fn new() -> Self {
        TcpLink {
            listener: TcpListener::bind("127.0.0.1:0").expect("bind a loopback port"),
            ring: 1 << 20,
            mode: TcpMode::Spin,
            poller: PollerConfig::default(),
        }
    }

    /// Each end's log buffer holds `bytes` (a power of two).
    pub fn ring(mut self, bytes: usize) -> Self {
        self.ring = bytes;
        self
    }

    /// Both ends use `mode` ([`TcpMode::Blocking`]: "tcp", [`TcpMode::Spin`]: "tcp-spin").
    pub fn mode(mut self, mode: TcpMode) -> Self {
        self.mode = mode;
        self
    }

    /// Both ends' pollers run with `poller`.
    pub fn poller(mut self, poller: PollerConfig) -> Self {
        self.poller = poller;
        self
    }

    /// Connects from the calling thread (and its network namespace) and returns the backup's
    /// end (which accepts this connection) and the primary's end (which holds it).
    ///
    /// # Errors
    /// The loopback connection fails.
    pub fn connect(self) -> Result<(BackupEnd, PrimaryEnd), TransportError> {
        let addr = self
            .listener
            .local_addr()
            .map_err(|e| TransportError::Setup {
                what: format!("listener address: {e}"),
            })?;
        let t = TcpTransport::connect(addr, self.mode, CONNECT_TIMEOUT)?;
        let primary = PrimaryEnd {
            transport: Box::new(t),
            ring: self.ring,
            poller: self.poller,
        };
        let backup = BackupEnd {
            listener: self.listener,
            ring: self.ring,
            mode: self.mode,
            poller: self.poller,
        };
        Ok((backup, primary))
    }

    /// Both ends started with `config` (the receiver on a thread of its own), for tests that
    /// need the link but no VM.
    ///
    /// # Panics
    /// When the link cannot be connected or either end fails to start.
    pub fn start(self, config: Config) -> (LogSender, LogReceiver) {
        let (backup, primary) = self.connect().expect("connect");
        let rx_config = config.clone();
        let rx = std::thread::spawn(move || backup.start(rx_config));
        let sender = primary.start(config).expect("sender");
        (sender, rx.join().expect("backup thread").expect("receiver"))
    }
}

/// The backup's end of a [`TcpLink`]: the connection waiting to be accepted.
#[derive(Debug)]
pub struct BackupEnd {
    listener: TcpListener,
    ring: usize,
    mode: TcpMode,
    poller: PollerConfig,
}

impl BackupEnd {
    /// Accepts the primary's connection and starts the receiver over a new log buffer
    /// (returns once the primary's end has started too: the handshake).
    ///
    /// # Errors
    /// The log buffer cannot be made ([`TransportError::Setup`]), the accept fails, or the
    /// handshake fails (the primary's configuration differs, ...).
    pub fn start(self, config: Config) -> Result<LogReceiver, TransportError> {
        let (p, c) = ring(self.ring)?;
        let t = TcpTransport::accept(&self.listener, self.mode)?;
        LogReceiver::start(p, c, Box::new(t), config, self.poller)
    }
}

/// The primary's end of a [`TcpLink`]: the connected transport.
pub struct PrimaryEnd {
    transport: Box<dyn Transport>,
    ring: usize,
    poller: PollerConfig,
}

impl std::fmt::Debug for PrimaryEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrimaryEnd")
            .field("transport", &self.transport.name())
            .field("ring", &self.ring)
            .finish()
    }
}

impl PrimaryEnd {
    /// Withholds what this end receives (the backup's acks and heartbeats) while `stall` is
    /// set ([`StallAcks`]); set it only after [`start`](Self::start) returned, since the
    /// handshake's answer is a received frame too.
    pub fn stall_acks(self, stall: Arc<AtomicBool>) -> Self {
        PrimaryEnd {
            transport: Box::new(StallAcks {
                inner: self.transport,
                stall,
            }),
            ..self
        }
    }

    /// Starts the sender over a new log buffer (returns once the backup's end has answered
    /// the handshake).
    ///
    /// # Errors
    /// The log buffer cannot be made ([`TransportError::Setup`]) or the handshake fails.
    pub fn start(self, config: Config) -> Result<LogSender, TransportError> {
        let (p, c) = ring(self.ring)?;
        LogSender::start(p, c, self.transport, config, self.poller)
    }
}

/// A log buffer of `bytes`.
fn ring(bytes: usize) -> Result<(ftvm_ringbuf::Producer, ftvm_ringbuf::Consumer), TransportError> {
    ftvm_ringbuf::with_capacity(bytes).map_err(|e| TransportError::Setup {
        what: format!("log buffer of {bytes} bytes: {e}"),
    })
}
