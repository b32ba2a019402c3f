//! Failure detection: UDP heartbeats on their own socket, plus "log/ack traffic seen" notes.
//!
//! # What the paper does
//! VMware FT declares a side failed when heartbeats between the two hosts stop *and* the logging
//! traffic (log entries one way, acknowledgments the other) stops, for longer than a timeout.
//! Logging traffic is by far the better signal (it flows continuously on a busy pair), so a
//! quiet heartbeat channel alone never kills a peer that is still streaming its log.
//!
//! # What this module does
//! A [`Detector`] owns one thread and one UDP socket. Every `interval` (10 ms by default) it
//! sends a [heartbeat](#heartbeat-wire-format) to the peer, and it listens for the peer's.
//! Whoever moves log or ack frames calls [`TrafficNote::note`] (one relaxed atomic add; the
//! detector samples the counter on every wake-up). The peer is *presumed failed* once neither a
//! valid heartbeat nor traffic has been seen for `timeout` (300 ms by default); the detector
//! then reports [`DetectorEvent::PeerFailed`] with the *detection time*: the time from the last
//! sign of life to the declaration (≥ `timeout`; traffic notes are time-stamped when sampled,
//! so up to one `interval` late). Detection times are logged with `tracing` and kept in
//! [`DetectorStats`].
//!
//! Presuming a failure is not going live: the caller must then win the next generation on the
//! [arbiter](crate::arbiter) ("never go live blind").
//!
//! # Heartbeats carry liveness only
//! Heartbeats carry the sender's generation and role, but a heartbeat is an unauthenticated
//! UDP datagram: nothing it says is evidence about the pair's generation. The fence
//! ([`Fence`]) advances only on evidence from the [arbiter](crate::arbiter) (a generation
//! read from it, or a lost test-and-set) or from an authenticated frame of the logging channel
//! (its generation check after the handshake) — never on a heartbeat. So:
//! - a heartbeat of this node's generation is a sign of life;
//! - a heartbeat from an *older* generation comes from a superseded node, or is forged: it is
//!   ignored (it does not keep the peer alive) and counted in
//!   [`DetectorStats::stale_heartbeats`];
//! - a heartbeat claiming a *newer* generation is reported once per claimed generation as
//!   [`DetectorEvent::Superseded`], a **claim**: the caller may read the arbiter to check it
//!   (rate-limited), and acts only on what the arbiter says. It is counted in
//!   [`DetectorStats::newer_claims`] and is no sign of life;
//! - two live roles on both sides (primary and primary, or alone) are reported as
//!   [`DetectorEvent::RoleConflict`] — logged only, for the same reason.
//!
//! # Threat model
//! Whoever can send UDP datagrams to a heartbeat port controls every field of a datagram,
//! including, with a raw socket, its source address. What each field can do:
//!
//! | field | effect of a forged value |
//! |---|---|
//! | source address | must equal the configured peer address, or the datagram is dropped ([`DetectorStats::dropped`]); spoofable, so not a proof of origin |
//! | magic, version, length, reserved | anything but the exact format is dropped |
//! | generation | equal: a sign of life; older: ignored; newer: an arbiter read at most (the caller rate-limits it), never a stop |
//! | role | a [`DetectorEvent::RoleConflict`] log line; no decision depends on it |
//! | sequence | counted; no decision depends on it (a forged high sequence cannot make the real peer's heartbeats look old) |
//! | incarnation | a "peer restarted" log line; no decision depends on it |
//!
//! So a forged heartbeat can neither stop a side nor make a healthy peer look failed (nothing
//! a datagram says is taken away from the real peer's heartbeats). What it can do is look like
//! life: forged heartbeats of the right generation from the spoofed peer address keep a dead
//! peer "alive" **as far as the heartbeats go**. That cannot block a failover for long, because
//! the logging channel is the stronger signal and is watched beside the heartbeats: a dead
//! peer's channel breaks (at once when its process dies and the kernel closes the connection,
//! after the channel's peer timeout when its host vanishes), and then the primary goes alone
//! whatever the heartbeats say, and the backup, once its log ran out, contests the next
//! generation on the arbiter after at most two failure timeouts even while heartbeats still
//! arrive ([`golive`](crate::golive)). The arbiter keeps that safe: a peer that was in fact
//! alive either holds the next generation already (the contest is lost) or loses it.
//! Authenticating heartbeats (a keyed MAC with a key exchanged in the channel handshake) would
//! also stop forged signs of life; it is not built.
//!
//! # Heartbeat wire format
//! 32 bytes, little-endian:
//! ```text
//!  0        4     5      6        8              16             24             32
//!  +--------+-----+------+--------+--------------+--------------+--------------+
//!  | magic  | ver | role | (zero) | generation   | sequence     | incarnation  |
//!  | "FTHB" | 1   | u8   | u16    | u64          | u64          | u64          |
//!  +--------+-----+------+--------+--------------+--------------+--------------+
//! ```
//! `sequence` counts the sender's heartbeats; `incarnation` is random per detector instance, so
//! a restarted peer is recognised. Datagrams of another size, magic or version, and datagrams
//! from an address other than the configured peer, are dropped and counted.
//!
//! # Cost
//! One thread that sleeps in `recvfrom` with a timeout: about `2 / interval` wake-ups a second
//! (100 heartbeats sent and 100 received at 10 ms), each a few microseconds. Heartbeats are not
//! on the logging hot path; the only hot-path cost is [`TrafficNote::note`].

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::fence::Fence;
use crate::node::Role;

/// Heartbeat magic, `"FTHB"`.
pub const HEARTBEAT_MAGIC: [u8; 4] = *b"FTHB";
/// Heartbeat format version.
pub const HEARTBEAT_VERSION: u8 = 1;
/// Size of a heartbeat datagram.
pub const HEARTBEAT_LEN: usize = 32;
/// Offset of the magic.
pub const OFF_MAGIC: usize = 0;
/// Offset of the version byte.
pub const OFF_VERSION: usize = 4;
/// Offset of the role byte ([`Role`] as `u8`).
pub const OFF_ROLE: usize = 5;
/// Offset of the reserved (zero) `u16`.
pub const OFF_RESERVED: usize = 6;
/// Offset of the generation (`u64`).
pub const OFF_GENERATION: usize = 8;
/// Offset of the sequence number (`u64`).
pub const OFF_SEQUENCE: usize = 16;
/// Offset of the incarnation (`u64`).
pub const OFF_INCARNATION: usize = 24;

/// Default heartbeat interval.
pub const DEFAULT_INTERVAL: Duration = Duration::from_millis(10);
/// Default failure timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(300);

/// One heartbeat (see the [wire format](self#heartbeat-wire-format)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heartbeat {
    /// The sender's role.
    pub role: Role,
    /// The sender's generation.
    pub generation: u64,
    /// The sender's heartbeat counter.
    pub sequence: u64,
    /// The sender detector's random instance id.
    pub incarnation: u64,
}

impl Heartbeat {
    /// The datagram for this heartbeat.
    pub fn encode(&self) -> [u8; HEARTBEAT_LEN] {
        let mut b = [0u8; HEARTBEAT_LEN];
        b[OFF_MAGIC..OFF_MAGIC + 4].copy_from_slice(&HEARTBEAT_MAGIC);
        b[OFF_VERSION] = HEARTBEAT_VERSION;
        b[OFF_ROLE] = self.role as u8;
        b[OFF_GENERATION..OFF_GENERATION + 8].copy_from_slice(&self.generation.to_le_bytes());
        b[OFF_SEQUENCE..OFF_SEQUENCE + 8].copy_from_slice(&self.sequence.to_le_bytes());
        b[OFF_INCARNATION..OFF_INCARNATION + 8].copy_from_slice(&self.incarnation.to_le_bytes());
        b
    }

    /// Parses a datagram; `None` if it is not a valid heartbeat.
    pub fn decode(b: &[u8]) -> Option<Self> {
        if b.len() != HEARTBEAT_LEN
            || b[OFF_MAGIC..OFF_MAGIC + 4] != HEARTBEAT_MAGIC
            || b[OFF_VERSION] != HEARTBEAT_VERSION
            || b[OFF_RESERVED..OFF_RESERVED + 2] != [0, 0]
        {
            return None;
        }
        let u64_at = |off: usize| {
            let mut v = [0u8; 8];
            v.copy_from_slice(&b[off..off + 8]);
            u64::from_le_bytes(v)
        };
        Some(Self {
            role: Role::from_u8(b[OFF_ROLE])?,
            generation: u64_at(OFF_GENERATION),
            sequence: u64_at(OFF_SEQUENCE),
            incarnation: u64_at(OFF_INCARNATION),
        })
    }
}

/// Settings of a [`Detector`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DetectorConfig {
    /// Local address of the heartbeat socket (port 0: any free port).
    pub bind: SocketAddr,
    /// The peer's heartbeat address; datagrams from elsewhere are dropped.
    pub peer: SocketAddr,
    /// This node's role (carried in heartbeats; changeable with [`Detector::set_role`]).
    pub role: Role,
    /// Heartbeat period.
    pub interval: Duration,
    /// Silence after which the peer is presumed failed (must exceed `interval`).
    pub timeout: Duration,
}

impl DetectorConfig {
    /// A configuration with the default interval (10 ms) and timeout (300 ms).
    pub fn new(bind: SocketAddr, peer: SocketAddr, role: Role) -> Self {
        Self {
            bind,
            peer,
            role,
            interval: DEFAULT_INTERVAL,
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

/// What the detector believes about the peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerState {
    /// A sign of life (or the detector's start) within the last `timeout`.
    Alive,
    /// Presumed failed: silent for at least `timeout`.
    Failed,
}

/// Something the detector reports (on its own thread: handlers must be quick).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DetectorEvent {
    /// The peer is presumed failed.
    PeerFailed {
        /// Time from the last sign of life to this declaration.
        detection_time: Duration,
        /// Whether any heartbeat of the current generation was ever received.
        ever_heard: bool,
    },
    /// A presumed-failed peer showed a sign of life again (a partition healed, or it
    /// restarted).
    PeerRecovered {
        /// How long it had been presumed failed.
        down_for: Duration,
    },
    /// A heartbeat claims a newer generation than this node's. Only a claim (heartbeats are
    /// not authenticated): the caller may read the arbiter to check it, never stop on it alone.
    Superseded {
        /// The peer's generation.
        peer_generation: u64,
        /// This node's generation.
        ours: u64,
    },
    /// Both sides claim a live role (primary / alone): split brain.
    RoleConflict {
        /// The peer's role.
        peer: Role,
        /// This node's role.
        ours: Role,
    },
}

/// Counters of a [`Detector`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DetectorStats {
    /// Heartbeats sent.
    pub heartbeats_sent: u64,
    /// Heartbeats that could not be sent (socket errors).
    pub send_errors: u64,
    /// Valid heartbeats from the peer (any generation).
    pub heartbeats_received: u64,
    /// Heartbeats ignored because their generation was older than ours.
    pub stale_heartbeats: u64,
    /// The peer's heartbeats that never arrived: gaps in its sequence numbers (within one
    /// incarnation of its detector; a reordered late one is not un-counted).
    pub heartbeats_missed: u64,
    /// Heartbeats that claimed a generation newer than ours (reported as
    /// [`DetectorEvent::Superseded`] once per claimed generation; no sign of life).
    pub newer_claims: u64,
    /// Datagrams dropped: not a heartbeat, or not from the peer.
    pub dropped: u64,
    /// Times the traffic counter was found to have moved.
    pub traffic_samples: u64,
    /// Times the peer was presumed failed.
    pub failures_declared: u64,
    /// The most recent detection time (last sign of life → declared failed).
    pub last_detection: Option<Duration>,
}

/// A failed detector operation.
#[derive(Debug, thiserror::Error)]
pub enum DetectorError {
    /// The configuration is unusable.
    #[error("invalid detector configuration: {0}")]
    InvalidConfig(String),
    /// The heartbeat socket could not be bound.
    #[error("cannot bind the heartbeat socket to {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The heartbeat socket could not be configured.
    #[error("cannot configure the heartbeat socket")]
    Socket(#[source] io::Error),
    /// The detector thread could not be started.
    #[error("cannot start the detector thread")]
    Spawn(#[source] io::Error),
    /// The detector thread panicked (reported by [`Detector::stop`]).
    #[error("the detector thread panicked")]
    Panicked,
}

/// Handle for reporting "log/ack traffic seen from the peer"; cheap to clone and to call.
///
/// Note only frames that passed the generation check ([`Fence::check`]): a stale primary's
/// frames must not keep it "alive" any more than its stale heartbeats do.
#[derive(Debug, Clone)]
pub struct TrafficNote {
    counter: Arc<AtomicU64>,
}

impl TrafficNote {
    /// Records that a frame from the peer arrived (one relaxed atomic add).
    #[inline]
    pub fn note(&self) {
        self.counter.fetch_add(1, Ordering::Relaxed);
    }
}

#[derive(Debug, Default)]
struct Shared {
    stop: AtomicBool,
    role: AtomicU8,
    failed: AtomicBool,
    stats: Mutex<DetectorStats>,
}

impl Shared {
    fn update(&self, f: impl FnOnce(&mut DetectorStats)) {
        let mut s = self
            .stats
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut s);
    }
}

/// A running failure detector (see the [module docs](self)). Stops when dropped.
#[derive(Debug)]
pub struct Detector {
    shared: Arc<Shared>,
    traffic: TrafficNote,
    local_addr: SocketAddr,
    thread: Option<JoinHandle<()>>,
}

impl Detector {
    /// Binds the heartbeat socket and starts the detector thread. `fence` supplies the
    /// generation stamped on and required of heartbeats; `on_event` is called on the detector
    /// thread for every [`DetectorEvent`].
    ///
    /// The peer starts out [`PeerState::Alive`]: the start counts as a sign of life, so a peer
    /// that never shows up is declared failed `timeout` after the start.
    ///
    /// # Errors
    /// [`DetectorError::InvalidConfig`] for a zero interval or a timeout not above the
    /// interval, [`DetectorError::Bind`] / [`DetectorError::Socket`] for socket errors,
    /// [`DetectorError::Spawn`] when the thread cannot be started.
    pub fn spawn(
        config: DetectorConfig,
        fence: Fence,
        on_event: impl FnMut(DetectorEvent) + Send + 'static,
    ) -> Result<Self, DetectorError> {
        if config.interval.is_zero() || config.timeout <= config.interval {
            return Err(DetectorError::InvalidConfig(format!(
                "interval {:?} must be non-zero and below timeout {:?}",
                config.interval, config.timeout
            )));
        }
        let socket = UdpSocket::bind(config.bind).map_err(|source| DetectorError::Bind {
            addr: config.bind,
            source,
        })?;
        let local_addr = socket.local_addr().map_err(DetectorError::Socket)?;
        let shared = Arc::new(Shared {
            role: AtomicU8::new(config.role as u8),
            ..Default::default()
        });
        let traffic = TrafficNote {
            counter: Arc::new(AtomicU64::new(0)),
        };
        let mut worker = Worker {
            socket,
            config,
            fence,
            shared: shared.clone(),
            traffic: traffic.counter.clone(),
            on_event: Box::new(on_event),
            incarnation: incarnation(),
            sequence: 0,
            last_life: Instant::now(),
            failed_at: None,
            ever_heard: false,
            traffic_seen: 0,
            peer_incarnation: None,
            peer_sequence: None,
            superseded_reported: 0,
            conflict_reported: false,
            send_errors_logged: 0,
        };
        let thread = thread::Builder::new()
            .name("ft-detector".into())
            .spawn(move || worker.run())
            .map_err(DetectorError::Spawn)?;
        Ok(Self {
            shared,
            traffic,
            local_addr,
            thread: Some(thread),
        })
    }

    /// The handle to give to whoever moves log/ack frames from the peer.
    pub fn traffic(&self) -> TrafficNote {
        self.traffic.clone()
    }

    /// Shorthand for `self.traffic().note()`.
    #[inline]
    pub fn note_traffic(&self) {
        self.traffic.note();
    }

    /// The heartbeat socket's local address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Changes the role carried by this node's heartbeats (after a failover).
    pub fn set_role(&self, role: Role) {
        self.shared.role.store(role as u8, Ordering::Relaxed);
    }

    /// What the detector currently believes about the peer.
    pub fn peer_state(&self) -> PeerState {
        if self.shared.failed.load(Ordering::Acquire) {
            PeerState::Failed
        } else {
            PeerState::Alive
        }
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> DetectorStats {
        *self
            .shared
            .stats
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Registers this detector's counters with `observer` (its statistics' lock, which only
    /// the detector thread takes otherwise, once per snapshot).
    pub fn observe_into(&self, observer: &super::observe::Observer) {
        let shared = Arc::clone(&self.shared);
        observer.set_detector(move || {
            let d = *shared
                .stats
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            super::observe::DetectorSnapshot {
                heartbeats_sent: d.heartbeats_sent,
                send_errors: d.send_errors,
                heartbeats_received: d.heartbeats_received,
                stale_heartbeats: d.stale_heartbeats,
                heartbeats_missed: d.heartbeats_missed,
                dropped: d.dropped,
                failures_declared: d.failures_declared,
                last_detection_ms: d.last_detection.map(super::observe::ms),
            }
        });
    }

    /// Stops the thread and waits for it (at most about one `interval`).
    ///
    /// # Errors
    /// [`DetectorError::Panicked`] if the detector thread panicked.
    pub fn stop(mut self) -> Result<(), DetectorError> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<(), DetectorError> {
        self.shared.stop.store(true, Ordering::Release);
        match self.thread.take() {
            Some(t) => t.join().map_err(|_| DetectorError::Panicked),
            None => Ok(()),
        }
    }
}

impl Drop for Detector {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            tracing::error!(error = %e, "failure detector ended abnormally");
        }
    }
}

/// A random-enough id for this detector instance (time and pid; no RNG dependency).
fn incarnation() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mix = nanos
        ^ (u64::from(std::process::id()) << 32)
        ^ COUNTER
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15);
    // SplitMix64 finaliser.
    let mut z = mix.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

struct Worker {
    socket: UdpSocket,
    config: DetectorConfig,
    fence: Fence,
    shared: Arc<Shared>,
    traffic: Arc<AtomicU64>,
    on_event: Box<dyn FnMut(DetectorEvent) + Send>,
    incarnation: u64,
    sequence: u64,
    last_life: Instant,
    failed_at: Option<Instant>,
    ever_heard: bool,
    traffic_seen: u64,
    peer_incarnation: Option<u64>,
    /// The highest sequence heard from the peer's current incarnation.
    peer_sequence: Option<u64>,
    superseded_reported: u64,
    conflict_reported: bool,
    send_errors_logged: u64,
}

impl Worker {
    fn run(&mut self) {
        tracing::info!(
            local = ?self.socket.local_addr().ok(),
            peer = %self.config.peer,
            interval_ms = self.config.interval.as_millis() as u64,
            timeout_ms = self.config.timeout.as_millis() as u64,
            "failure detector started"
        );
        let mut next_send = Instant::now();
        let mut buf = [0u8; 64];
        while !self.shared.stop.load(Ordering::Acquire) {
            let now = Instant::now();
            if now >= next_send {
                self.send_heartbeat();
                next_send += self.config.interval;
                if next_send <= now {
                    next_send = now + self.config.interval;
                }
            }
            let traffic = self.traffic.load(Ordering::Relaxed);
            if traffic != self.traffic_seen {
                self.traffic_seen = traffic;
                self.shared.update(|s| s.traffic_samples += 1);
                self.sign_of_life(now);
            }
            self.check_timeout(now);
            // Sleep in recvfrom until the next heartbeat is due or the timeout expires.
            let mut wake = next_send;
            if self.failed_at.is_none() {
                wake = wake.min(self.last_life + self.config.timeout);
            }
            let wait = wake
                .saturating_duration_since(Instant::now())
                .max(Duration::from_micros(100));
            if let Err(e) = self.socket.set_read_timeout(Some(wait)) {
                tracing::error!(error = %e, "cannot set the heartbeat socket timeout");
                thread::sleep(wait);
                continue;
            }
            match self.socket.recv_from(&mut buf) {
                Ok((n, from)) => self.on_datagram(&buf[..n], from),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) => {}
                // ECONNREFUSED and friends: ICMP errors for earlier sends; nothing to do.
                Err(e) => tracing::trace!(error = %e, "heartbeat receive error"),
            }
        }
        tracing::info!("failure detector stopped");
    }

    fn send_heartbeat(&mut self) {
        self.sequence += 1;
        let role = Role::from_u8(self.shared.role.load(Ordering::Relaxed)).unwrap_or(Role::Backup);
        let hb = Heartbeat {
            role,
            generation: self.fence.current(),
            sequence: self.sequence,
            incarnation: self.incarnation,
        };
        match self.socket.send_to(&hb.encode(), self.config.peer) {
            Ok(_) => self.shared.update(|s| s.heartbeats_sent += 1),
            Err(e) => {
                self.shared.update(|s| s.send_errors += 1);
                if self.send_errors_logged % 100 == 0 {
                    tracing::debug!(error = %e, peer = %self.config.peer, "heartbeat send failed");
                }
                self.send_errors_logged += 1;
            }
        }
    }

    fn on_datagram(&mut self, data: &[u8], from: SocketAddr) {
        let Some(hb) = Heartbeat::decode(data).filter(|_| from == self.config.peer) else {
            self.shared.update(|s| s.dropped += 1);
            tracing::trace!(%from, len = data.len(), "dropped datagram");
            return;
        };
        let ours = self.fence.current();
        let same_incarnation = self.peer_incarnation == Some(hb.incarnation);
        let missed = match self.peer_sequence {
            Some(last) if same_incarnation => hb.sequence.saturating_sub(last.saturating_add(1)),
            _ => 0,
        };
        if !same_incarnation || self.peer_sequence.is_none_or(|last| hb.sequence > last) {
            self.peer_sequence = Some(hb.sequence);
        }
        self.shared.update(|s| {
            s.heartbeats_received += 1;
            s.heartbeats_missed += missed;
        });
        if hb.generation < ours {
            self.shared.update(|s| s.stale_heartbeats += 1);
            tracing::trace!(
                peer_generation = hb.generation,
                ours,
                "stale heartbeat ignored"
            );
            return;
        }
        let now = Instant::now();
        if self.peer_incarnation != Some(hb.incarnation) {
            if self.peer_incarnation.is_some() {
                tracing::info!(peer = %from, "peer detector restarted (new incarnation)");
            }
            self.peer_incarnation = Some(hb.incarnation);
        }
        if hb.generation > ours {
            // A claim, not evidence: reported (once per claimed generation) for the caller to
            // check on the arbiter; no sign of life, no fence movement here.
            self.shared.update(|s| s.newer_claims += 1);
            if hb.generation > self.superseded_reported {
                self.superseded_reported = hb.generation;
                tracing::warn!(
                    peer_generation = hb.generation,
                    ours,
                    "a heartbeat claims a newer generation: not acted on unless the arbiter confirms it"
                );
                (self.on_event)(DetectorEvent::Superseded {
                    peer_generation: hb.generation,
                    ours,
                });
            }
            return;
        }
        let role = Role::from_u8(self.shared.role.load(Ordering::Relaxed)).unwrap_or(Role::Backup);
        let conflict = role.is_live() && hb.role.is_live();
        if conflict && !self.conflict_reported {
            tracing::error!(peer_role = %hb.role, our_role = %role, "both sides are live: split brain");
            (self.on_event)(DetectorEvent::RoleConflict {
                peer: hb.role,
                ours: role,
            });
        }
        self.conflict_reported = conflict;
        self.ever_heard = true;
        self.sign_of_life(now);
    }

    fn sign_of_life(&mut self, at: Instant) {
        self.last_life = self.last_life.max(at);
        if let Some(failed_at) = self.failed_at.take() {
            let down_for = at.saturating_duration_since(failed_at);
            self.shared.failed.store(false, Ordering::Release);
            tracing::warn!(
                down_for_ms = down_for.as_millis() as u64,
                "peer presumed failed shows signs of life again"
            );
            (self.on_event)(DetectorEvent::PeerRecovered { down_for });
        }
    }

    fn check_timeout(&mut self, now: Instant) {
        if self.failed_at.is_some() {
            return;
        }
        let silent = now.saturating_duration_since(self.last_life);
        if silent < self.config.timeout {
            return;
        }
        self.failed_at = Some(now);
        self.shared.failed.store(true, Ordering::Release);
        self.shared.update(|s| {
            s.failures_declared += 1;
            s.last_detection = Some(silent);
        });
        tracing::warn!(
            detection_ms = silent.as_secs_f64() * 1e3,
            timeout_ms = self.config.timeout.as_millis() as u64,
            ever_heard = self.ever_heard,
            peer = %self.config.peer,
            "peer presumed failed"
        );
        (self.on_event)(DetectorEvent::PeerFailed {
            detection_time: silent,
            ever_heard: self.ever_heard,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeat_round_trip_and_rejects() {
        let hb = Heartbeat {
            role: Role::Primary,
            generation: 0x0102_0304_0506_0708,
            sequence: 42,
            incarnation: u64::MAX,
        };
        let b = hb.encode();
        assert_eq!(&b[..4], b"FTHB");
        assert_eq!(b[OFF_GENERATION], 0x08, "little-endian");
        assert_eq!(Heartbeat::decode(&b), Some(hb));
        assert_eq!(Heartbeat::decode(&b[..31]), None);
        let mut bad = b;
        bad[OFF_VERSION] = 2;
        assert_eq!(Heartbeat::decode(&bad), None);
        let mut bad = b;
        bad[OFF_ROLE] = 9;
        assert_eq!(Heartbeat::decode(&bad), None);
        let mut bad = b;
        bad[OFF_RESERVED] = 1;
        assert_eq!(Heartbeat::decode(&bad), None);
        let mut bad = b;
        bad[0] = b'X';
        assert_eq!(Heartbeat::decode(&bad), None);
    }

    #[test]
    fn rejects_bad_config() {
        let addr: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        let mut c = DetectorConfig::new(addr, addr, Role::Backup);
        c.timeout = c.interval;
        assert!(matches!(
            Detector::spawn(c, Fence::new(1), |_| {}),
            Err(DetectorError::InvalidConfig(_))
        ));
    }

    #[test]
    fn incarnations_differ() {
        assert_ne!(incarnation(), incarnation());
    }
}
